"""genloc/boxes.py: conversions, the FOPA centre rule, normalisation, flips, pixel rectangles and the
one validity rule (IoU is tested with the TPR-FPR metric in tests/test_tpr_fpr.py)."""
import numpy as np
import pytest
import torch

from genloc import boxes as B


def _random_boxes(n, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    lo = torch.rand(n, 2, generator=g) * 0.6
    wh = torch.rand(n, 2, generator=g) * 0.35 + 0.01
    return torch.cat([lo, lo + wh], dim=1) * scale


def test_conversions_round_trip_and_keep_the_input_kind():
    xyxy = _random_boxes(20, 0, 100.0).double()
    for there, back in ((B.xyxy_to_xywh, B.xywh_to_xyxy), (B.xyxy_to_cxcywh, B.cxcywh_to_xyxy)):
        out = there(xyxy)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
        assert torch.allclose(back(out), xyxy, atol=1e-9)
        as_numpy = there(xyxy.numpy())
        assert isinstance(as_numpy, np.ndarray) and np.allclose(as_numpy, out.numpy())
    assert B.xywh_to_xyxy([10, 20, 5, 7]).tolist() == [10, 20, 15, 27]
    assert B.xyxy_to_cxcywh([0, 0, 4, 2]).tolist() == [2, 1, 4, 2]
    assert B.xyxy_to_xywh(torch.zeros(2, 3, 4)).shape == (2, 3, 4)


def test_fopa_centre_rule_is_integer_halving_and_exact_inverse():
    # odd sizes: top-left = centre - w//2, so the box is not centred exactly
    assert B.fopa_centre_to_xyxy([25, 40, 11, 6]).tolist() == [20, 37, 31, 43]
    assert B.fopa_centre_to_xyxy([[25, 40, 10, 7]]).tolist() == [[20, 37, 30, 44]]
    rng = np.random.default_rng(0)
    tl = rng.integers(0, 500, size=(200, 2))
    wh = rng.integers(1, 200, size=(200, 2))
    xyxy = np.concatenate([tl, tl + wh], axis=1).astype(float)
    centres = B.xyxy_to_fopa_centre(xyxy)
    assert np.array_equal(B.fopa_centre_to_xyxy(centres), xyxy)
    assert np.array_equal(centres[:, 2:], wh)


def test_normalise_denormalise_and_hflip():
    px = _random_boxes(10, 1, 64.0)
    sizes = torch.tensor([[640, 480]]).expand(10, 2)
    norm = B.normalise(px, (640, 480))
    assert norm.dtype == torch.float32 and torch.allclose(B.denormalise(norm, (640, 480)), px, atol=1e-4)
    assert torch.equal(B.normalise(px, sizes), norm)                          # per-row sizes broadcast
    assert np.allclose(B.normalise(px.numpy(), (640, 480)), norm.numpy(), atol=1e-7)
    assert B.denormalise(np.array([0.5, 0.25, 1.0, 1.0]), (10, 20)).tolist() == [5.0, 5.0, 10.0, 20.0]

    flipped = B.hflip(norm)
    assert torch.allclose(B.hflip(flipped), norm, atol=1e-6)                  # an involution
    assert torch.equal(flipped[:, [1, 3]], norm[:, [1, 3]])
    assert ((flipped[:, 2] - flipped[:, 0]) - (norm[:, 2] - norm[:, 0])).abs().max() < 1e-6   # same width
    assert B.hflip([[10, 1, 30, 2]], width=100).tolist() == [[70, 1, 90, 2]]
    assert B.hflip(torch.zeros(0, 4)).shape == (0, 4)


def test_pixel_rect_covers_every_touched_pixel():
    assert B.pixel_rect((10.2, 5.0, 20.0, 15.5), (40, 30)) == (10, 5, 20, 16)
    assert B.pixel_rect((3.4, 3.4, 3.6, 3.6), (40, 30)) == (3, 3, 4, 4)         # sub-pixel box: one pixel
    assert B.pixel_rect((-3, -1, 50, 40), (40, 30)) == (0, 0, 40, 30)           # clipped
    assert B.pixel_rect((40, 30, 41, 31), (40, 30)) == (39, 29, 40, 30)         # never empty
    norm = _random_boxes(6, 2)
    scaled = norm.double() * torch.tensor([150, 100, 150, 100], dtype=torch.float64)
    assert B.pixel_rects(norm, (150, 100)) == [B.pixel_rect(b, (150, 100)) for b in scaled]


@pytest.mark.parametrize("box, problem", [
    ([0.1, 0.1, 0.5, 0.5], None),
    ([-0.01, 0.0, 0.5, 1.01], None),                       # exactly the tolerance: valid, clipped
    ([-0.0101, 0.0, 0.5, 0.5], "outside the image"),
    ([0.1, 0.1, 1.0102, 0.5], "outside the image"),
    ([0.5, 0.1, 0.5, 0.5], "empty (needs"),
    ([0.6, 0.1, 0.5, 0.5], "empty (needs"),
    ([0.1, float("nan"), 0.5, 0.5], "not finite"),
    ([0.1, 0.1, float("inf"), 0.5], "not finite"),
    ([-0.009, 0.1, -0.001, 0.5], "empty after clipping"),  # inside the tolerance band only
])
def test_the_validity_rule(box, problem):
    check = B.validate_boxes(box)
    if problem is None:
        assert check.valid and check.clipped.tolist() == np.clip(box, 0, 1).tolist()
        check.raise_first()
    else:
        assert not check.valid and B.PROBLEMS[int(check.problem) - 1].startswith(problem)
        with pytest.raises(ValueError, match="index"):
            check.raise_first()


def test_rule_reads_the_same_in_pixels_and_normalised():
    rng = np.random.default_rng(4)
    norm = rng.uniform(-0.03, 1.03, size=(4000, 4))
    sizes = rng.integers(16, 1000, size=(4000, 2)).astype(float)
    px = norm * np.concatenate([sizes, sizes], axis=1)
    a, b = B.validate_boxes(norm), B.validate_boxes(px, sizes)
    assert {0, 2, 3} <= set(a.problem.tolist())                 # the sample exercises several rules
    at_boundary = np.isclose(norm, -B.TOLERANCE, atol=1e-9) | np.isclose(norm, 1 + B.TOLERANCE, atol=1e-9)
    keep = ~at_boundary.any(1)                                   # float rounding may tip exact ties
    assert np.array_equal(a.problem[keep], b.problem[keep])


def test_check_counts_and_error_name_the_box():
    boxes = torch.tensor([[0.1, 0.1, 0.2, 0.2], [0.3, 0.1, 0.2, 0.2], [0, 0, 64, 2], [1, 1, 2, float("nan")]])
    check = B.validate_boxes(boxes)
    assert check.valid.tolist() == [True, False, False, False]
    assert check.counts() == {B.PROBLEMS[0]: 1, B.PROBLEMS[1]: 1, B.PROBLEMS[2]: 1}
    with pytest.raises(KeyError, match=r"empty \(needs x1 < x2.*normalised box at index \(1,\) = \[0.3.*3 bad box"):
        check.raise_first("normalised box", KeyError)
    with pytest.raises(ValueError, match=r"outside the image: pixel box at index \(0, 1\).*the 640x480 image"):
        B.validate_boxes(torch.tensor([[[1, 1, 5, 5], [600, 10, 700, 50]]]), (640, 480)).raise_first("pixel box")
    assert B.validate_boxes([]).problem.shape == (0,) and not B.validate_boxes(np.zeros((0, 4))).counts()
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 4\]"):
        B.validate_boxes(torch.rand(3, 5))
    with pytest.raises(ValueError, match="positive"):
        B.validate_boxes([[1, 1, 2, 2]], (0, 10))
