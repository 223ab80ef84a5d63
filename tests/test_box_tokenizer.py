"""BoxTokenizer: round trip within half a bin, validity of every token box, clear errors."""
import pytest
import torch

from genloc import BoxTokenizer


def _random_boxes(num: int, num_bins: int, gen: torch.Generator) -> torch.Tensor:
    """Boxes at least one bin wide/tall, a quarter of them touching the image edges."""
    lo = torch.rand(num, 2, generator=gen) * (1 - 1 / num_bins)
    size = 1 / num_bins + torch.rand(num, 2, generator=gen) * (1 - 1 / num_bins - lo)
    hi = (lo + size).clamp(max=1.0)
    boxes = torch.cat([lo, hi], dim=1)
    edge = torch.rand(num, 4, generator=gen) < 0.25
    boxes = torch.where(edge, torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(num, 4), boxes)
    return boxes


@pytest.mark.parametrize("num_bins", [2, 7, 64, 256])
def test_round_trip_within_half_a_bin(num_bins):
    tok = BoxTokenizer(num_bins)
    boxes = _random_boxes(5000, num_bins, torch.Generator().manual_seed(num_bins))
    corners = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0], [1 - 1 / num_bins, 0.0, 1.0, 1 / num_bins]])
    boxes = torch.cat([boxes, corners])
    ids = tok.encode(boxes)
    assert ids.dtype == torch.long and ids.min() >= 0 and ids.max() < num_bins
    err = (tok.decode(ids) - boxes).abs().max()
    assert err <= 0.5 / num_bins + 1e-6
    assert ((ids[:, 2] > ids[:, 0]) & (ids[:, 3] > ids[:, 1])).all()


def test_any_leading_shape_and_ids():
    tok = BoxTokenizer(10)
    assert (tok.bos, tok.eos, tok.vocab_size) == (10, 11, 12)
    boxes = _random_boxes(24, 10, torch.Generator().manual_seed(0)).view(2, 3, 4, 4)
    ids = tok.encode(boxes)
    assert ids.shape == (2, 3, 4, 4)
    assert torch.equal(ids.view(-1, 4), tok.encode(boxes.view(-1, 4)))
    assert torch.equal(tok.encode(torch.tensor([0.0, 0.05, 1.0, 0.25])), torch.tensor([0, 0, 9, 2]))
    assert torch.allclose(tok.decode(torch.tensor([0, 4, 9, 5])), torch.tensor([0.05, 0.45, 0.95, 0.55]))


def test_boxes_narrower_than_a_bin_stay_valid():
    tok = BoxTokenizer(10)
    boxes = torch.tensor([
        [0.42, 0.42, 0.43, 0.48],   # both edges in bin 4 -> x2 nudged to bin 5, y2 likewise
        [0.96, 0.96, 0.99, 1.0],    # last bin -> x1/y1 nudged left
        [0.0, 0.0, 0.001, 0.001],
    ])
    ids = tok.encode(boxes)
    assert ids.tolist() == [[4, 4, 5, 5], [8, 8, 9, 9], [0, 0, 1, 1]]
    assert (tok.decode(ids) - boxes).abs().max() <= 1.5 / 10


def test_pixel_round_trip():
    tok = BoxTokenizer(64)
    sizes = torch.tensor([[640, 480], [100, 300]])
    norm = _random_boxes(2, 64, torch.Generator().manual_seed(3))
    px = norm * sizes.repeat(1, 2)
    ids = tok.encode_pixels(px, sizes)
    assert torch.equal(ids, tok.encode(norm))
    back = tok.decode_pixels(ids, sizes)
    assert ((back - px).abs() <= (sizes.repeat(1, 2) / 64 / 2 + 1e-3)).all()
    full = tok.decode_pixels(tok.encode_pixels(torch.tensor([0.0, 0.0, 640.0, 480.0]), torch.tensor([640, 480])),
                             torch.tensor([640, 480]))
    assert torch.allclose(full, torch.tensor([5.0, 3.75, 635.0, 476.25]))


@pytest.mark.parametrize("box, message", [
    ([0.5, 0.1, 0.5, 0.9], "empty"),
    ([0.6, 0.1, 0.5, 0.9], "empty"),
    ([0.1, 0.9, 0.5, 0.2], "empty"),
    ([0.1, float("nan"), 0.5, 0.9], "NaN"),
    ([0.1, 0.1, 1.2, 0.9], "outside the image"),
    ([-0.1, 0.1, 0.5, 0.9], "outside the image"),
])
def test_bad_boxes_raise_naming_the_box(box, message):
    tok = BoxTokenizer(16)
    boxes = torch.tensor([[0.1, 0.1, 0.2, 0.2], box])
    with pytest.raises(ValueError, match=message) as info:
        tok.encode(boxes)
    assert "index (1,)" in str(info.value)


def test_pixel_box_outside_image_and_bad_ids():
    tok = BoxTokenizer(16)
    with pytest.raises(ValueError, match=r"outside the image.*pixel box at index \(0,\)"):
        tok.encode_pixels(torch.tensor([[10.0, 10.0, 700.0, 50.0]]), torch.tensor([[640, 480]]))
    with pytest.raises(ValueError, match="BOS/EOS"):
        tok.decode(torch.tensor([0, 1, 2, tok.bos]))
    with pytest.raises(ValueError, match="num_bins"):
        BoxTokenizer(1)
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 4\]"):
        tok.encode(torch.rand(3, 5))
