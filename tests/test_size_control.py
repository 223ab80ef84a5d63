"""Size and aspect-ratio masks (`ExtentMask`): the sampler stays exact (cached == naive), its
log-probabilities are the model's renormalised over the allowed tokens, and every allowed prefix
can be completed."""
import pytest
import torch

from genloc.testing import naive_reference_decode
from genloc import LocationModel, LocationModelConfig

SIZE = torch.tensor([[0.2, 0.2, 0.1, 0.5], [0.0, 1.0, 0.0, 1.0], [0.05, 0.3, 0.3, 0.3]])
ASPECT = torch.tensor([[0.5, 2.0], [1.0, 1.0], [0.0, float("inf")]])
REGION = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 1.0, 0.5], [0.0, 0.2, 0.6, 1.0]])


@pytest.fixture(scope="module", params=[False, True], ids=["absolute", "relative-extents"])
def model64(request):
    torch.manual_seed(0)
    return LocationModel(LocationModelConfig.preset("tiny", relative_extents=request.param)).double().eval()


def _inputs(batch=3):
    return torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0)), ["car", "bird", "lamp"][:batch]


@pytest.mark.parametrize("kwargs", [dict(size=SIZE), dict(aspect_ratio=ASPECT, temperature=0.8, top_k=20),
                                    dict(size=SIZE, aspect_ratio=ASPECT, region=REGION, top_p=0.9)],
                         ids=["size", "aspect", "all"])
def test_cached_sampler_equals_naive_reference_with_size_masks(model64, kwargs):
    images, categories = _inputs()
    out = model64.sample(images, categories, n=40, generator=torch.Generator().manual_seed(4), **kwargs)
    with torch.no_grad():
        prefix = model64.build_prefix(model64.encode_images(images), model64.encode_texts(categories))
    tokens, log_probs = naive_reference_decode(model64, prefix, 40, generator=torch.Generator().manual_seed(4), **kwargs)
    assert torch.equal(out.tokens, tokens) and torch.equal(out.log_probs, log_probs)


def test_log_probs_are_the_model_renormalised_over_allowed_tokens(model64):
    images, categories = _inputs()
    n = 25
    out = model64.sample(images, categories, n=n, size=SIZE, aspect_ratio=ASPECT, region=REGION,
                         generator=torch.Generator().manual_seed(9))
    tokens = out.tokens.view(-1, 4)
    with torch.no_grad():
        prefix = model64.build_prefix(model64.encode_images(images), model64.encode_texts(categories))
        _, dist = model64.box_log_probs(prefix.repeat_interleave(n, 0), tokens, with_distribution=True)
    bounds = model64.region_bounds(REGION, 3, tokens.device).repeat_interleave(n, 0)
    extents = model64.extent_mask(SIZE, ASPECT, 3, tokens.device).repeat_interleave(n)
    expected = torch.zeros(len(tokens), dtype=torch.float64)
    for step in range(4):
        allowed = model64.allowed_tokens(step, tokens[:, :step], bounds, extents)
        valid = model64.allowed_tokens(step, tokens[:, :step], model64.region_bounds(None, len(tokens), tokens.device))
        assert not (allowed & ~valid).any()  # the size masks only remove tokens
        masked = dist[:, step].masked_fill(~allowed, float("-inf"))
        expected += (masked.gather(1, tokens[:, step:step + 1]).squeeze(1) - masked.logsumexp(-1))
    torch.testing.assert_close(out.log_probs.view(-1).double(), expected, atol=1e-5, rtol=0)


def test_many_constrained_samples_are_valid_and_keep_their_size():
    torch.manual_seed(0)
    model = LocationModel(LocationModelConfig.preset("tiny")).eval()
    images, categories = _inputs()
    size = torch.tensor([[0.3, 0.3, 0.0, 1.0], [0.0, 1.0, 0.05, 0.1], [0.1, 0.4, 0.1, 0.4]])
    aspect = torch.tensor([[0.0, float("inf")], [2.0, 3.0], [1.0, 1.0]])
    gen = torch.Generator().manual_seed(0)
    outs = [model.sample(images, categories, n=500, temperature=3.0, size=size, aspect_ratio=aspect,
                         region=REGION, generator=gen) for _ in range(4)]
    tokens = torch.cat([o.tokens for o in outs], 1)
    assert torch.isfinite(torch.cat([o.log_probs for o in outs], 1)).all()
    ext = (tokens[..., 2:] - tokens[..., :2]).double()
    assert (ext >= 1).all()
    nb = 64
    for i in range(3):
        w, h = ext[i, :, 0], ext[i, :, 1]
        assert ((w + 0.5) / nb >= size[i, 0]).all() and ((w - 0.5) / nb <= size[i, 1]).all()
        assert ((h + 0.5) / nb >= size[i, 2]).all() and ((h - 0.5) / nb <= size[i, 3]).all()
        assert ((w - 0.5) / (h + 0.5) <= aspect[i, 1]).all() and ((w + 0.5) / (h - 0.5) >= aspect[i, 0]).all()
        boxes = outs[0].boxes_norm[i]
        assert (boxes[:, :2] >= REGION[i, :2]).all() and (boxes[:, 2:] <= REGION[i, 2:]).all()
    assert set(ext[0, :, 0].tolist()) == {19.0}  # 0.3 * 64 = 19.2 -> 19 bins
    # widths 0.1..0.4 -> bins 6..26 (half-bin rule), all reachable; square boxes fit the 0.6 x 0.8 region
    assert set(ext[2, :, 0].tolist()) == set(range(6, 27))


def test_impossible_constraints_are_errors_before_decoding():
    torch.manual_seed(0)
    model = LocationModel(LocationModelConfig.preset("tiny")).eval()
    images, categories = _inputs(1)
    with pytest.raises(ValueError, match="no box size fits image 0"):
        model.sample(images, categories, n=2, size=torch.tensor([0.5, 0.5, 0.5, 0.5]), aspect_ratio=torch.tensor([4.0, 4.0]))
    with pytest.raises(ValueError, match="fits inside the region of image 0"):
        model.sample(images, categories, n=2, size=torch.tensor([0.6, 0.6, 0.0, 1.0]), region=torch.tensor([0, 0, 0.5, 1]))
    with pytest.raises(ValueError, match="min <= max"):
        model.sample(images, categories, n=2, size=torch.tensor([0.5, 0.4, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(2,\) or \(1, 2\)"):
        model.sample(images, categories, n=2, aspect_ratio=torch.tensor([1.0, 2.0, 3.0]))
