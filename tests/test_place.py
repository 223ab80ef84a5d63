"""place / place_many on real photos: every input mode, pixel frames, regions, sizes, distinct
boxes, non-overlapping sets, the "no valid set" path and sequential insertion."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from genloc import GenLocModel, LocationModelConfig, NoValidSetError, place, place_many
from genloc.images import to_rgb_image
from genloc.placement import model_input, token_iou
from tests.helpers import FIXTURES

PHOTOS = [FIXTURES / "libcom" / "controllable_composition" / "background" / "000000049931.png",
          FIXTURES / "opa_sample" / "eval_opascore_examples" / "composite_1.jpg",      # 640 x 427
          FIXTURES / "opa_sample" / "reconstructed" / "580029_background_reconstructed.png"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GenLocModel(LocationModelConfig.preset("tiny", relative_extents=True)).eval()


def _photo(i=1) -> Image.Image:
    return Image.open(PHOTOS[i]).convert("RGB")


def _open(path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img.copy()


def _sixteen_bit_png(tmp_path) -> tuple:
    """A real 16-bit grayscale PNG (values = 8-bit gray * 257) and its 8-bit reference."""
    gray = np.asarray(_photo().convert("L"))
    path = tmp_path / "gray16.png"
    Image.fromarray(gray.astype(np.uint16) * 257).save(path)
    return path, gray


def _modes(tmp_path):
    """(name, image input, expected (w, h)) for every input mode, from the real photos."""
    rgb = _photo()
    arr = np.asarray(rgb).copy()
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, rgb.width).astype(np.uint8), (rgb.height, 1))))
    path16, _ = _sixteen_bit_png(tmp_path)
    crop = rgb.crop((10, 20, 311, 193))  # odd, non-square size
    size = rgb.size
    return [
        ("path png", PHOTOS[0], (512, 512)), ("path jpg", PHOTOS[1], size), ("str path", str(PHOTOS[2]), size),
        ("PIL RGB", rgb, size), ("PIL L", rgb.convert("L"), size), ("PIL RGBA", rgba, size),
        ("PIL CMYK", rgb.convert("CMYK"), size), ("PIL P", rgb.convert("P"), size),
        ("16-bit PNG", path16, size), ("PIL I;16", _open(path16), size), ("crop", crop, (301, 173)),
        ("numpy uint8 HWC", arr, size), ("numpy HW gray", arr[..., 0], size), ("numpy HWC1", arr[..., :1], size),
        ("numpy uint16", arr.astype(np.uint16) * 257, size), ("numpy float", arr / 255.0, size),
        ("numpy RGBA", np.asarray(rgba), size),
        ("tensor uint8 CHW", torch.from_numpy(arr).permute(2, 0, 1), size),
        ("tensor float CHW", torch.from_numpy(arr).permute(2, 0, 1).float() / 255, size),
        ("tensor HW", torch.from_numpy(arr[..., 1].copy()), size),
    ]


def _inside(boxes, rect):
    x1, y1, x2, y2 = rect
    return bool(((boxes[:, 0] >= x1 - 1e-4) & (boxes[:, 1] >= y1 - 1e-4) & (boxes[:, 2] <= x2 + 1e-4)
                 & (boxes[:, 3] <= y2 + 1e-4) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all())


def test_place_takes_every_input_mode_and_answers_in_the_images_own_pixels(model, tmp_path):
    modes = _modes(tmp_path)
    lossy = {"PIL RGBA", "PIL CMYK", "16-bit PNG", "PIL I;16", "numpy uint16", "numpy RGBA"}
    for name, image, (w, h) in modes:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = place(model, image, "car", n=20, seed=1)
        assert bool(caught) == (name in lossy), name  # value-changing conversions say so
        assert result.image_size == (w, h), name
        assert result.boxes.shape == (20, 4) and result.log_probs.shape == (20,)
        assert _inside(result.boxes, (0, 0, w, h)), name
        # bin centres of the image's own frame: x = (token + 0.5) / bins * w
        torch.testing.assert_close(result.boxes, (result.tokens.float() + 0.5) / 64 * torch.tensor([w, h, w, h]))
    # a list of images is one batched call with each image's own frame
    calls = []
    original = model.sample
    model.sample = lambda *a, **k: calls.append(a[0].shape) or original(*a, **k)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the notes were checked above
            results = place(model, [image for _, image, _ in modes], "person", n=5, region="right")
    finally:
        del model.sample
    assert calls == [(len(modes), 3, 64, 64)]
    for (name, _, (w, h)), result in zip(modes, results):
        assert result.image_size == (w, h) and _inside(result.boxes, (w / 2, 0, w, h)), name


def test_conversions_match_reference_values(model, tmp_path):
    path16, gray = _sixteen_bit_png(tmp_path)
    assert _open(path16).mode.startswith("I")
    img, notes = to_rgb_image(path16)
    got = np.asarray(img)
    assert np.abs(got.astype(int) - gray[..., None].astype(int)).max() <= 1 and "16-bit" in notes[0]
    # PIL's own conversion clips 16-bit values at 255: the near-white image we must not produce
    naive = np.asarray(_open(path16).convert("RGB"))
    assert naive.mean() > 250 and abs(got.mean() - gray.mean()) < 1
    rgb = _photo()
    rgba = rgb.convert("RGBA")
    alpha = np.zeros((rgb.height, rgb.width), np.uint8)
    alpha[:, : rgb.width // 2] = 255
    rgba.putalpha(Image.fromarray(alpha))
    out = np.asarray(to_rgb_image(rgba)[0])
    assert (out[:, rgb.width // 2:] == 255).all() and np.array_equal(out[:, : rgb.width // 2],
                                                                     np.asarray(rgb)[:, : rgb.width // 2])
    cmyk = rgb.convert("CMYK")
    assert np.array_equal(np.asarray(to_rgb_image(cmyk)[0]), np.asarray(cmyk.convert("RGB")))
    arr = np.asarray(rgb).copy()
    assert np.array_equal(np.asarray(to_rgb_image(torch.from_numpy(arr).permute(2, 0, 1).float() / 255)[0]), arr)
    with pytest.raises(ValueError, match=r"float values must lie in \[0, 1\]"):
        to_rgb_image(arr.astype(np.float32))
    with pytest.raises(ValueError, match="ambiguous"):
        to_rgb_image(arr.astype(np.int64))
    with pytest.raises(ValueError, match="not H x W"):
        to_rgb_image(np.zeros((4, 5, 6), np.uint8))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        to_rgb_image(tmp_path / "nope.png")
    # the model sees exactly what the datamodules feed it (PIL bilinear to the square input)
    x = model_input(model, [rgb])
    ref = np.asarray(rgb.resize((64, 64), Image.BILINEAR), np.float32) / 255
    assert torch.equal(x[0], torch.from_numpy(ref).permute(2, 0, 1))


def test_region_words_and_pixels_hold_every_box(model):
    photo = _photo()
    w, h = photo.size
    for region, rect in [("left", (0, 0, w / 2, h)), ("bottom", (0, h / 2, w, h)),
                         ((100, 50, 400, 300), (100, 50, 400, 300)), ("100,50,400,300", (100, 50, 400, 300))]:
        result = place(model, photo, "bird", n=200, region=region, seed=2)
        assert _inside(result.boxes, rect), region
    with pytest.raises(ValueError, match="inside the 640x427 image"):
        place(model, photo, "bird", region=(0, 0, 700, 10))


def test_size_and_aspect_ratio_hold_to_within_half_a_bin(model):
    photo = _photo()
    w, h = photo.size
    half = torch.tensor([w, h]) / 64 / 2
    result = place(model, photo, "car", n=300, size=(120, 45), seed=3)
    wh = result.boxes[:, 2:] - result.boxes[:, :2]
    assert ((wh - torch.tensor([120.0, 45.0])).abs() <= half + 1e-4).all()
    result = place(model, photo, "car", n=300, size=((50, 200), None), region="right", seed=4)
    wh = result.boxes[:, 2:] - result.boxes[:, :2]
    assert (wh[:, 0] >= 50 - half[0] - 1e-4).all() and (wh[:, 0] <= 200 + half[0] + 1e-4).all()
    assert _inside(result.boxes, (w / 2, 0, w, h)) and len(set(wh[:, 1].tolist())) > 5  # height stays free
    for ratio in (2.0, (0.3, 0.5)):
        lo, hi = (ratio, ratio) if isinstance(ratio, float) else ratio
        result = place(model, photo, "person", n=300, aspect_ratio=ratio, seed=5)
        ext = (result.tokens[:, 2:] - result.tokens[:, :2]).double()  # width, height in bins
        scale = w / h
        assert ((ext[:, 0] - 0.5) / (ext[:, 1] + 0.5) * scale <= hi + 1e-9).all()
        assert ((ext[:, 0] + 0.5) / (ext[:, 1] - 0.5) * scale >= lo - 1e-9).all()
    with pytest.raises(ValueError, match="cannot be drawn"):
        place(model, photo, "car", size=(700, 20))
    with pytest.raises(ValueError, match="cannot be drawn"):
        place(model, photo, "car", size=(2, 20))
    with pytest.raises(ValueError, match="fits inside the region"):
        place(model, photo, "car", size=(400, 20), region="left")
    with pytest.raises(ValueError, match="no box size fits"):
        place(model, photo, "car", size=(100, 100), aspect_ratio=5.0)


def test_distinct_merges_identical_boxes_and_ranks_them(model):
    photo = _photo()
    greedy = place(model, photo, "car", n=12, top_k=1, distinct=True)
    assert greedy.tokens.shape == (1, 4) and greedy.counts.tolist() == [12]
    plain = place(model, photo, "car", n=400, temperature=0.3, seed=6)
    merged = place(model, photo, "car", n=400, temperature=0.3, seed=6, distinct=True)
    assert int(merged.counts.sum()) == 400 and len(merged.tokens) < 400
    assert len({tuple(t) for t in merged.tokens.tolist()}) == len(merged.tokens)
    assert (merged.log_probs[:-1] >= merged.log_probs[1:]).all()
    for tokens, logp, count in zip(merged.tokens, merged.log_probs, merged.counts):
        same = (plain.tokens == tokens).all(1)
        assert int(same.sum()) == int(count) and torch.allclose(plain.log_probs[same], logp)


def _model_log_prob(model, image, category, tokens):
    with torch.no_grad():
        return model(model_input(model, [image]).expand(len(tokens), -1, -1, -1), [category] * len(tokens),
                     tokens).sum(-1)


def test_place_many_never_returns_overlapping_boxes(model):
    photo = _photo()
    categories = ["car", "person", "bird"]
    for max_iou in (0.0, 0.2):
        for seed in range(15):
            group = place_many(model, photo, categories, max_iou=max_iou, seed=seed)
            assert group.boxes.shape == (3, 4) and group.categories == categories
            assert _inside(group.boxes, (0, 0, *photo.size))
            tokens = ((group.boxes / torch.tensor([*photo.size, *photo.size])) * 64 - 0.5).round().long()
            iou = token_iou(tokens, tokens)
            assert (iou[~torch.eye(3, dtype=torch.bool)] <= max_iou + 1e-9).all()
            for i, c in enumerate(categories):  # each box is a model draw with its model log-probability
                torch.testing.assert_close(_model_log_prob(model, photo, c, tokens[i:i + 1])[0], group.log_probs[i],
                                           atol=1e-4, rtol=0)


def test_place_many_says_when_no_valid_set_exists(model):
    photo = _photo()
    w, h = photo.size
    tiny = f"{w * 10 / 64},{h * 10 / 64},{w * 12 / 64},{h * 12 / 64}"  # holds exactly one token box
    with pytest.raises(NoValidSetError, match=r"no valid set for \['cup', 'plate'\] within 3 rounds"):
        place_many(model, photo, ["cup", "plate"], regions=[tiny, tiny], attempts=3, candidates=5)
    group = place_many(model, photo, ["cup", "plate"], regions=[tiny, None])
    assert _inside(group.boxes[:1], (w * 10 / 64, h * 10 / 64, w * 12 / 64, h * 12 / 64))
    with pytest.raises(ValueError, match="regions has 1 entries for 2 categories"):
        place_many(model, photo, ["cup", "plate"], regions=["left"])


def test_place_many_samples_each_next_box_on_the_edited_image(model):
    photo = _photo()
    seen, calls = [], []
    original = model.sample

    def spy(images, *args, **kwargs):
        seen.append(images.clone())
        return original(images, *args, **kwargs)

    def paint(image, box, category, seed):
        calls.append((list(box), category, seed))
        out = image.copy()
        out.paste((0, 0, 0), tuple(int(round(v)) for v in box))
        return out

    model.sample = spy
    try:
        group = place_many(model, photo, ["car", "person"], inpainter=paint, seed=7)
    finally:
        del model.sample
    assert [c[1:] for c in calls] == [("car", 7), ("person", 8)]
    assert calls[0][0] == group.boxes[0].tolist() and calls[1][0] == group.boxes[1].tolist()
    first_edit = photo.copy()
    first_edit.paste((0, 0, 0), tuple(int(round(v)) for v in calls[0][0]))
    assert torch.equal(seen[0], model_input(model, [photo])) and torch.equal(seen[1], model_input(model, [first_edit]))
    assert np.array_equal(np.asarray(group.image), np.asarray(paint(first_edit, calls[1][0], "", 0)))


@pytest.mark.slow
def test_insert_cli_places_several_objects_in_sequence_from_a_model_folder(model, tmp_path, capsys):
    import json

    import insert
    from genloc.testing import save_tiny_sd_inpainter

    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    sd_dir = save_tiny_sd_inpainter(tmp_path / "sd")
    out = tmp_path / "out"
    assert insert.main(["--image", str(PHOTOS[1]), "--category", "car", "person", "--model", str(model_dir),
                        "--inpainter", str(sd_dir), "--steps", "2", "--resolution", "64", "--out", str(out)]) == 0
    records = json.loads((out / "boxes.jsonl").read_text())["boxes"]
    assert [r["category"] for r in records] == ["car", "person"]
    boxes = torch.tensor([r["box"] for r in records])
    w, h = _photo().size
    tokens = (boxes / torch.tensor([w, h, w, h]) * 64 - 0.5).round().long()
    assert token_iou(tokens, tokens)[0, 1] == 0
    before = np.asarray(_photo())
    for rec in records:  # edit_i = edit_{i-1} with object i drawn inside its mask only
        after = np.asarray(Image.open(out / rec["edit"]).convert("RGB"))
        x0, y0, x1, y1 = rec["mask_box"]
        outside = np.ones(before.shape[:2], bool)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(after[outside], before[outside]) and not np.array_equal(after, before)
        before = after
    with pytest.raises(SystemExit) as exc:
        insert.main(["--image", str(PHOTOS[1]), "--category", "car", "person", "--model", str(model_dir), "--n", "3",
                     "--inpainter", str(sd_dir), "--out", str(tmp_path / "again")])
    assert exc.value.code == 2 and "one box each" in capsys.readouterr().err


@pytest.mark.parametrize("category, error, says", [
    ("", ValueError, "empty string"), ("   ", ValueError, "empty string"), (None, TypeError, "NoneType"),
    (3, TypeError, "int"), (["car", ""], ValueError, "empty string")])
def test_place_refuses_a_missing_or_empty_class_name(model, category, error, says):
    images = _photo() if not isinstance(category, list) else [_photo(), _photo()]
    with pytest.raises(error, match=says):
        place(model, images, category, n=2)


@pytest.mark.parametrize("categories, error, says", [
    ("car", TypeError, r"for one object write \['car'\]"), ([], ValueError, "non-empty list"),
    (["car", " "], ValueError, "empty string"), (["car", None], TypeError, "NoneType")])
def test_place_many_refuses_a_string_or_empty_names(model, categories, error, says):
    with pytest.raises(error, match=says):
        place_many(model, _photo(), categories)


@pytest.mark.parametrize("size, dilate", [((24, 18), 0), ((64, 48), 0), ((101, 77), 0), ((101, 77), 4)])
def test_place_many_keeps_the_painted_pixels_apart_and_refuses_boxes_under_a_pixel(model, size, dilate):
    """No overlap holds for the pixel masks an inpainter paints (`box_mask`, grown by ``dilate`` as
    insert.py --dilate grows them), not only for the model's boxes; boxes under one pixel are
    redrawn, and when none fit the answer is NoValidSetError."""
    from genloc.inpainting import box_mask

    photo = _photo().resize(size)
    returned = 0
    for seed in range(8):
        try:
            group = place_many(model, photo, ["car", "person", "bird", "cup"], seed=seed, candidates=30, attempts=3,
                               dilate=dilate)
        except NoValidSetError:
            continue
        returned += 1
        extents = group.boxes[:, 2:] - group.boxes[:, :2]
        assert (extents >= 1).all(), group.boxes
        masks = [box_mask(box, size, dilate) for box in group.boxes.tolist()]
        for i in range(len(masks)):
            for j in range(i):
                assert not (masks[i] & masks[j]).any(), (seed, group.boxes)
    assert returned > 0
    with pytest.raises(NoValidSetError, match="at least one pixel"):  # five objects cannot share four pixels
        place_many(model, _photo().resize((2, 2)), ["car", "person", "bird", "cup", "dog"], candidates=30, attempts=2)


@pytest.mark.parametrize("call, kwargs, error, says", [
    ("place", {"n": 0}, ValueError, "n must be a whole number >= 1"),
    ("place", {"n": 2.5}, ValueError, "n must be a whole number >= 1"),
    ("place", {"n": True}, ValueError, "n must be a whole number >= 1"),
    ("place", {"temperature": 0}, ValueError, "temperature"), ("place", {"top_k": 0}, ValueError, "top_k"),
    ("place", {"top_p": 1.5}, ValueError, "top_p"), ("place", {"seed": "7"}, ValueError, "seed must be a whole number"),
    ("place", {"seed": 1.5}, ValueError, "seed must be a whole number"),
    ("place", {"model": None}, TypeError, "model must be a LocationModel"),
    ("place", {"image": []}, ValueError, "image is an empty list"), ("place", {"image": ""}, ValueError, "empty path"),
    ("place", {"image": None}, TypeError, "unsupported image type NoneType"),
    ("place", {"region": 5}, ValueError, "region 5 is neither"),
    ("place", {"region": ["a", 1, 2, 3]}, ValueError, r"region \['a', 1, 2, 3\] is neither"),
    ("place", {"size": ("a", 30)}, ValueError, "size width must be a number or a"),
    ("place", {"aspect_ratio": "wide"}, ValueError, "aspect_ratio must be a number"),
    ("place", {"aspect_ratio": float("inf")}, ValueError, "aspect_ratio must be positive"),
    ("place", {"distinct": "yes"}, TypeError, "distinct must be True or False"),
    ("place_many", {"max_iou": "0"}, ValueError, "max_iou must be a number in"),
    ("place_many", {"dilate": -1}, ValueError, "dilate must be a whole number >= 0"),
    ("place_many", {"max_iou": float("nan")}, ValueError, "max_iou must be a number in"),
    ("place_many", {"candidates": "5"}, ValueError, "candidates must be a whole number >= 1"),
    ("place_many", {"attempts": 0}, ValueError, "attempts must be a whole number >= 1"),
    ("place_many", {"seed": None}, ValueError, "seed must be a whole number"),
    ("place_many", {"temperature": -1.0}, ValueError, "temperature"),
    ("place_many", {"regions": "left"}, TypeError, "regions must be a list with one entry per object"),
    ("place_many", {"sizes": 5}, TypeError, "sizes must be a list"),
    ("place_many", {"inpainter": "sd"}, TypeError, "inpainter must be a function"),
    ("place_many", {"model": "runs/toy_model"}, TypeError, "model must be a LocationModel"),
])
def test_placement_rejects_wrong_types_and_ranges_before_sampling(model, monkeypatch, call, kwargs, error, says):
    """One line naming the argument, raised before the model draws anything."""
    monkeypatch.setattr(model, "sample", lambda *a, **k: pytest.fail("the model sampled before the check"))
    args = {"model": model, "image": _photo(), **({"category": "car"} if call == "place" else {"categories": ["car"]})}
    args.update(kwargs)
    with pytest.raises(error, match=says):
        (place if call == "place" else place_many)(**args)
