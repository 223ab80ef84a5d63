"""score: the model's log-probability of given boxes (teacher-forced, one prefix forward per image),
checked against the sampler's own log-probabilities, against batching, and against normalisation."""
import itertools

import pytest
import torch
from PIL import Image

from genloc import GenLocModel, LocationModelConfig, place, score
from genloc.placement import model_input
from tests.test_place import PHOTOS

CONSTRAINTS = [{}, {"region": "left"}, {"region": (100, 50, 500, 400)},
               {"size": ((40, 300), None), "aspect_ratio": (0.5, 2)}, {"size": (120, 80)}]


@pytest.fixture(scope="module", params=[True, False], ids=["relative_extents", "absolute_extents"])
def model(request):
    """Both readings of a box's extent (docs/design/coordinates.md#validity-inside-the-model), float64."""
    torch.manual_seed(0)
    return GenLocModel(LocationModelConfig.preset("tiny", relative_extents=request.param)).eval().double()


def _photo(i=1) -> Image.Image:
    return Image.open(PHOTOS[i]).convert("RGB")


@pytest.mark.parametrize("constraints", CONSTRAINTS, ids=str)
def test_score_equals_sampler_log_probs(model, constraints):
    img = _photo()
    drawn = place(model, img, "cup", n=40, seed=3, **constraints)
    scored = score(model, img, "cup", drawn.boxes, **constraints)
    assert torch.equal(scored.tokens, drawn.tokens)
    torch.testing.assert_close(scored.log_probs, drawn.log_probs.double(), atol=1e-5, rtol=0)
    assert torch.isfinite(scored.log_probs).all()


def test_batching_invariance(model):
    imgs = [_photo(1), _photo(2)]
    boxes = [place(model, img, c, n=12, seed=i).boxes for i, (img, c) in enumerate(zip(imgs, ["cup", "dog"]))]
    together = score(model, imgs, ["cup", "dog"], boxes, region="left")
    for img, c, b, joint in zip(imgs, ["cup", "dog"], boxes, together):
        alone = torch.cat([score(model, img, c, b[j:j + 1], region="left").log_probs for j in range(len(b))])
        torch.testing.assert_close(alone, joint.log_probs, atol=1e-12, rtol=0)
        per_image = score(model, img, c, b, region="left")
        torch.testing.assert_close(per_image.log_probs, joint.log_probs, atol=1e-12, rtol=0)


def test_one_prefix_forward_per_image(model):
    calls = []
    handles = [model.decoder.register_forward_hook(lambda m, args, kw, out: calls.append(kw["inputs_embeds"].shape),
                                                   with_kwargs=True),
               model.image_encoder.patch_embed.register_forward_hook(
                   lambda m, args, out: calls.append(("vit", args[0].shape)))]
    try:
        imgs = [_photo(1), _photo(2), _photo(0)]
        boxes = [[[10, 10, 200, 200]] * 300, [[5, 5, 50, 60]] * 7, [[0, 0, 512, 512]]]
        score(model, imgs, "cup", boxes)
    finally:
        for h in handles:
            h.remove()
    decoder_calls = [c for c in calls if c[0] != "vit"]
    assert len(decoder_calls) == 1 and decoder_calls[0][0] == 3  # one prefix pass over the 3 images
    assert decoder_calls[0][1] == model.prefix_len + 1             # prefix + BOS; the boxes never re-run it
    assert [c[1][0] for c in calls if c[0] == "vit"] == [3]


@pytest.mark.parametrize("constraints", [{}, {"region": "top"}, {"size": ((20, 40), (10, 30))}], ids=str)
def test_probabilities_sum_to_one(constraints):
    """Every token box of an 8-bin model, scored: the probabilities of the allowed boxes sum to 1,
    boxes outside the constraints score -inf."""
    torch.manual_seed(1)
    model = GenLocModel(LocationModelConfig.preset("tiny", num_bins=8, relative_extents=True)).eval().double()
    img = _photo(2)
    w, h = img.size
    ids = [(a, b) for a, b in itertools.combinations(range(8), 2)]
    tokens = torch.tensor([[x1, y1, x2, y2] for x1, x2 in ids for y1, y2 in ids])
    boxes = (tokens.double() + 0.5) / 8 * torch.tensor([w, h, w, h])
    scored = score(model, img, "cup", boxes, **constraints)
    assert torch.equal(scored.tokens, tokens)
    assert torch.logsumexp(scored.log_probs, 0).item() == pytest.approx(0.0, abs=1e-9)
    if constraints:
        assert torch.isinf(scored.log_probs).any() and not torch.isnan(scored.log_probs).any()
    cell = (w / 8) * (h / 8)
    torch.testing.assert_close(scored.log_densities, scored.log_probs - 2 * torch.log(torch.tensor(cell).double()))


def test_model_method_and_list_call(model):
    img = _photo()
    boxes = [[10, 20, 200, 300], [300, 100, 600, 420]]
    direct = score(model, img, "cup", boxes)
    method = model.score(img, "cup", boxes)
    torch.testing.assert_close(method.log_probs, direct.log_probs, atol=0, rtol=0)
    assert direct.image_size == img.size and direct.boxes.shape == (2, 4)
    assert score(model, img, "cup", []).log_probs.shape == (0,)


def test_score_tokens_matches_full_sequence_likelihood(model):
    """Without constraints, the cascade scorer equals the training likelihood's full-sequence path."""
    img = _photo()
    images = model_input(model, [img, _photo(2)])
    tokens = torch.tensor([[3, 4, 20, 30], [0, 0, 63, 63], [10, 50, 11, 63]])
    owner = torch.tensor([1, 0, 1])
    got = model.score_tokens(images, ["cup", "dog"], tokens, owner)
    with torch.no_grad():
        prefix = model.build_prefix(model.encode_images(images), model.encode_texts(["cup", "dog"]))
        want = model.box_log_probs(prefix[owner], tokens).sum(-1)
    torch.testing.assert_close(got, want.double(), atol=1e-5, rtol=0)  # box_log_probs works in float32


@pytest.mark.parametrize("boxes, match", [
    ([[10, 10, 50, 50], [10, 10, 50, 50], [600, 10, 700, 50]], r"index \(2,\)"),   # outside the 640-px width
    ([[10, 10, 50, 50], [50, 10, 10, 50]], r"index \(1,\)"),                        # x2 < x1
    ([[float("nan"), 1, 2, 3]], r"index \(0,\)"),
    ([[1, 2, 3]], r"\[k, 4\]"),
])
def test_bad_boxes_are_errors(model, boxes, match):
    with pytest.raises(ValueError, match=match):
        score(model, _photo(), "cup", boxes)


def test_bad_list_calls(model):
    with pytest.raises(ValueError, match="image 1: .*index \\(0,\\)"):
        score(model, [_photo(), _photo()], "cup", [[[1, 1, 5, 5]], [[-100, 1, 5, 5]]])
    with pytest.raises(ValueError, match="2 images need one"):
        score(model, [_photo(), _photo()], "cup", [[[1, 1, 5, 5]]])
    with pytest.raises(ValueError, match="empty string"):
        score(model, _photo(), "", [[1, 1, 5, 5]])


def test_score_speed_benchmark_runs_tiny(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "score_speed.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.score_speed", "--tiny", "--boxes", "20", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert "sample / score" in proc.stdout and result["boxes"] == 20 and result["max_log_prob_gap"] < 1e-4
