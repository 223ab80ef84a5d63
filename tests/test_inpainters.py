"""Insertion back-ends and the instruction-editor baseline end to end, with tiny random pipelines
saved to disk and loaded through `load_backend` / `load_editor` (the path a user's folder takes), on
real photos from tests/fixtures/."""
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from PIL import Image

from genloc.inpainters import (BACKENDS, BackendFolderError, DiffRegion, Inpainter, changed_region, load_backend,
                               load_editor)
from genloc.inpainters.powerpaint import TASK_WORDS, expand, word_tokens
from genloc.inpainting import box_mask, context_rect, feathered_alpha, mask_bbox, working_size
from genloc.testing import (NATIVE, save_flux_fill, save_instruct_pix2pix, save_kandinsky, save_powerpaint, save_sd,
                            save_sdxl, save_tiny_gligen)
from tests.helpers import FIXTURES

CAT = FIXTURES / "libcom" / "controllable_composition" / "background" / "000000049931.png"  # 512x512
PLANE = FIXTURES / "opa_sample" / "reconstructed" / "580029_background_reconstructed.png"  # 640x427

BUILDERS = {  # (back-end name, builder) per pipeline family the back-ends cover
    "sd": ("sd", save_sd), "sdxl": ("sd", save_sdxl), "kandinsky": ("sd", save_kandinsky),
    "flux-fill": ("flux-fill", save_flux_fill), "powerpaint": ("powerpaint", save_powerpaint),
    "gligen": ("gligen", save_tiny_gligen),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = BUILDERS[kind][1](tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get


def _load(folders, kind, **options):
    name = BUILDERS[kind][0]
    if name == "gligen":
        with pytest.warns(FutureWarning, match="deprecated"):
            return load_backend(name, folders(kind), steps=2, **options)
    return load_backend(name, folders(kind), steps=2, **options)


def _outside_identical(before: Image.Image, after: Image.Image, mask: np.ndarray) -> bool:
    a, b = np.asarray(before.convert("RGB")), np.asarray(after)
    return a.shape == b.shape and np.array_equal(a[~mask], b[~mask])


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_backend_end_to_end_on_a_real_photo(folders, kind):
    """Every pipeline family, in crop and whole-image mode: same size out, only masked pixels change,
    the inside does change, and the same seed gives the same edit."""
    inpainter = _load(folders, kind, resolution=NATIVE)
    image = Image.open(PLANE).convert("RGB")
    box = (300.4, 150.2, 352.0, 190.6)
    mask = box_mask(box, image.size, dilate=2)
    for mode in ("crop", "whole"):
        ins = inpainter.insert(image, "airplane", box=box, seed=3, mode=mode, dilate=2, feather=2)
        assert ins.image.size == image.size and ins.mode == mode
        assert _outside_identical(image, ins.image, mask)
        assert not np.array_equal(np.asarray(image)[mask], np.asarray(ins.image)[mask])
        assert ins.mask_box == mask_bbox(mask) and ins.prompt == "a photo of a airplane"
    again = inpainter.insert(image, "airplane", box=box, seed=3, mode="whole", dilate=2, feather=2)
    assert np.array_equal(np.asarray(again.image), np.asarray(ins.image))


@pytest.mark.parametrize("kind", ["sd", "flux-fill"])
def test_crop_mode_draws_a_small_box_with_25x_more_pixels(folders, kind):
    """Acceptance: a real photo >= 4x the back-end's resolution, a box of 1/10 of the image side."""
    inpainter = _load(folders, kind, resolution=NATIVE)
    image = Image.open(CAT).convert("RGB")
    assert min(image.size) >= 4 * inpainter.resolution
    side = image.size[0] / 10
    box = (200.0, 260.0, 200.0 + side, 260.0 + side)
    crop = inpainter.insert(image, "dog", box=box, seed=0)  # auto: the box is smaller than the resolution
    whole = inpainter.insert(image, "dog", box=box, seed=0, mode="whole")
    assert crop.mode == "crop" and whole.mode == "whole"
    ratio = crop.box_canvas_pixels / whole.box_canvas_pixels
    print(f"{kind}: box drawn with {crop.box_canvas_pixels:.0f} canvas pixels in crop mode, "
          f"{whole.box_canvas_pixels:.1f} in whole-image mode: {ratio:.1f}x")
    assert ratio >= 25
    mask = box_mask(box, image.size)
    for ins in (crop, whole):
        assert _outside_identical(image, ins.image, mask)
    # the crop is square around the box and the canvas is the back-end's resolution
    x0, y0, x1, y1 = crop.context
    assert x1 - x0 == y1 - y0 and crop.canvas == (NATIVE, NATIVE)
    assert x0 <= box[0] and y0 <= box[1] and x1 >= box[2] and y1 >= box[3]


def test_auto_mode_uses_the_whole_image_for_large_boxes(folders):
    inpainter = _load(folders, "sd")
    image = Image.open(CAT).convert("RGB")
    big = inpainter.insert(image, "dog", box=(50, 50, 50 + NATIVE + 10, 200), seed=0)
    small = inpainter.insert(image, "dog", box=(50, 50, 50 + NATIVE - 10, 100), seed=0)
    assert (big.mode, small.mode) == ("whole", "crop")
    assert big.context == (0, 0, 512, 512) and big.canvas == (NATIVE, NATIVE)


def test_free_form_mask_and_feathered_edge(folders):
    """A round mask: pixels outside it are untouched; its edge pixels are blends of input and
    generation (feathered inside the mask), its core is the generation."""
    inpainter = _load(folders, "sd")
    image = Image.open(CAT).convert("RGB")
    yy, xx = np.mgrid[:512, :512]
    mask = (xx - 300) ** 2 + (yy - 200) ** 2 < 40 ** 2
    hard = inpainter.insert(image, "dog", mask=mask, seed=1)
    soft = inpainter.insert(image, "dog", mask=mask, seed=1, feather=6)
    assert _outside_identical(image, soft.image, mask) and _outside_identical(image, hard.image, mask)
    orig, h, s = (np.asarray(im, dtype=np.int32) for im in (image, hard.image, soft.image))
    alpha = feathered_alpha(mask, 6)
    core = alpha == 1
    assert np.array_equal(h[core], s[core])
    edge = (alpha > 0) & (alpha < 1)
    expected = np.rint(alpha[edge][:, None] * h[edge] + (1 - alpha[edge][:, None]) * orig[edge])
    assert np.abs(s[edge] - expected).max() <= 1


def test_mask_geometry_helpers():
    mask = np.zeros((30, 40), bool)
    mask[5:16, 10:20] = True
    alpha = feathered_alpha(mask, feather=3)
    assert (alpha[~mask] == 0).all() and alpha[10, 15] == 1
    assert alpha[5, 15] == pytest.approx(0.25) and alpha[6, 15] == pytest.approx(0.5)  # 1/(f+1), 2/(f+1)
    edge = np.zeros((30, 40), bool)
    edge[0:8, 0:8] = True  # touching the image border: no feather there
    assert feathered_alpha(edge, 3)[0, 0] == 1 and feathered_alpha(edge, 3)[0, 7] == pytest.approx(0.25)
    # square crop, 1 + 2 x margin times the long side, moved inside the image
    assert context_rect((10, 5, 20, 15), (40, 30), 0.5) == (5, 0, 25, 20)
    assert context_rect((0, 0, 10, 4), (40, 30), 1.0) == (0, 0, 30, 30)
    assert context_rect((0, 0, 30, 10), (40, 30), 1.0) == (0, 0, 40, 30)  # clipped where the image is small
    assert mask_bbox(box_mask((10.2, 5.0, 20.0, 15.5), (40, 30), dilate=2)) == (8, 3, 22, 18)


def test_powerpaint_task_prompts(folders, tmp_path, monkeypatch):
    """Task words are registered at load (release layout) or found (tokenizer already has them), and
    the embeddings sent to the UNet are P_obj-conditioned and mixed tradeoff * A + (1 - tradeoff) * B."""
    plain = _load(folders, "powerpaint")
    ready = load_backend("powerpaint", save_powerpaint(tmp_path / "ready", task_words_in_tokenizer=True), steps=2)
    tok = plain.pipe.tokenizer
    n_base = plain.pipe.text_encoder.get_input_embeddings().weight.shape[0] - 30
    ids = tok.convert_tokens_to_ids([t for w in TASK_WORDS for t in word_tokens(w)])
    assert ids == list(range(n_base, n_base + 30))
    assert expand("P_obj a cat") == " ".join(word_tokens("P_obj")) + " a cat"
    assert torch.equal(plain.encode("P_obj a photo of a cat"), ready.encode("P_obj a photo of a cat"))
    # the P_obj vectors are what conditions the generation: another task word gives other embeddings
    assert not torch.allclose(plain.encode("P_obj a photo of a cat"), plain.encode("P_ctxt a photo of a cat"))

    seen = {}
    call = type(plain.pipe).__call__

    def spy(pipe, **kwargs):
        seen.update(kwargs)
        return call(pipe, **kwargs)

    monkeypatch.setattr(type(plain.pipe), "__call__", spy)
    image = Image.open(CAT).convert("RGB")
    plain.insert(image, "cat", box=(100, 100, 140, 150), seed=0)
    assert "prompt" not in seen and torch.equal(seen["prompt_embeds"], plain.encode("P_obj a photo of a cat"))
    mixed = load_backend("powerpaint", folders("powerpaint"), steps=2, tradeoff=0.3, prompt_b="P_shape {}")
    mixed.insert(image, "cat", box=(100, 100, 140, 150), seed=0)
    a, b = mixed.encode("P_obj a photo of a cat"), mixed.encode("P_shape a photo of a cat")
    assert torch.allclose(seen["prompt_embeds"], 0.3 * a + 0.7 * b)


def test_bad_folders_fail_naming_folder_and_layout(folders, tmp_path):
    missing = tmp_path / "nope"
    for name in BACKENDS:
        with pytest.raises(BackendFolderError, match=f"{name} back-end: folder {missing} does not exist; expected"):
            with pytest.warns(FutureWarning) if name == "gligen" else nullcontext():
                load_backend(name, missing)
    sd = folders("sd")
    with pytest.raises(BackendFolderError, match="lacks transformer; expected a FluxFillPipeline folder"):
        load_backend("flux-fill", sd)
    with pytest.raises(BackendFolderError, match="StableDiffusionInpaintPipeline"), pytest.warns(FutureWarning):
        load_backend("gligen", sd)
    with pytest.raises(BackendFolderError, match="not PowerPaint v1's text encoder"):
        load_backend("powerpaint", sd)
    with pytest.raises(BackendFolderError, match="8"):
        load_editor("instruct-pix2pix", sd)
    with pytest.raises(ValueError, match="unknown back-end"):
        load_backend("dall-e", sd)


def test_a_pipeline_folder_missing_a_component_names_that_component(folders, tmp_path):
    import shutil

    broken = shutil.copytree(folders("sd"), tmp_path / "sd")
    shutil.rmtree(broken / "unet")
    with pytest.raises(BackendFolderError, match=rf"sd back-end: {broken} lacks unet/; expected"):
        load_backend("sd", broken)


def test_instruction_editor_end_to_end(tmp_path):
    editor = load_editor("instruct-pix2pix", save_instruct_pix2pix(tmp_path / "ip2p"), steps=2)
    image = Image.open(PLANE).convert("RGB")
    edit = editor.edit(image, "airplane", seed=0)
    assert edit.prompt == "add a airplane" and edit.image.size == image.size
    assert edit.canvas == working_size(image.size, NATIVE, 8) == (64, 40)
    # random weights change the picture; the region is the bounding box of the largest changed blob
    assert edit.region_mask.shape == (image.size[1], image.size[0]) and edit.region_mask.any()
    x0, y0, x1, y1 = edit.region
    assert 0 <= x0 < x1 <= image.size[0] and 0 <= y0 < y1 <= image.size[1]
    ys, xs = np.nonzero(edit.region_mask)
    assert (x0, y0) == pytest.approx((xs.min(), ys.min()), abs=image.size[0] / NATIVE + 1)
    again = editor.edit(image, "airplane", seed=0)
    assert np.array_equal(np.asarray(again.image), np.asarray(edit.image))


def test_changed_region_finds_a_pasted_object_on_a_real_photo():
    """A square pasted into a real photo plus mild global noise (an editor re-rendering everything
    slightly): the cleaned difference map keeps the square only."""
    photo = np.asarray(Image.open(PLANE).convert("RGB").resize((160, 107)))
    rng = np.random.default_rng(0)
    edited = np.clip(photo.astype(int) + rng.integers(-12, 13, photo.shape), 0, 255).astype(np.uint8)
    edited[40:70, 90:130] = (200, 30, 30)
    edited[5, 5] = (255, 255, 255)  # an isolated speck
    region = changed_region(photo, edited)
    assert mask_bbox(region) == pytest.approx((90, 40, 130, 70), abs=2)
    assert not changed_region(photo, photo).any()
    strict = changed_region(photo, edited, DiffRegion(threshold=0.99))
    assert not strict.any()


def test_inpainter_interface_checks_its_inputs(folders):
    inpainter = _load(folders, "sd")
    image = Image.open(CAT).convert("RGB")
    with pytest.raises(ValueError, match="exactly one"):
        inpainter.insert(image, "dog")
    with pytest.raises(ValueError, match="mask is 10x10"):
        inpainter.insert(image, "dog", mask=np.ones((10, 10), bool))
    with pytest.raises(ValueError, match="mode"):
        inpainter.insert(image, "dog", box=(0, 0, 10, 10), mode="tile")
    assert isinstance(inpainter, Inpainter)
