"""insert.py and genloc/inpainting.py end to end with tiny random diffusers pipelines on real photos:
outside-mask pixels untouched, boxes inside the requested region, records consistent with images."""
import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from skimage import data

import insert
from genloc.checkpoint import save_model_checkpoint
from metrics.inpainting import background_ssim
from genloc.inpainters import load_backend
from genloc.inpainting import box_mask, mask_bbox, parse_region, pixel_rect, working_size
from genloc.testing import TINY_CLIP_NAME, save_tiny_gligen, save_tiny_open_clip, save_tiny_sd_inpainter
from tests.helpers import FIXTURES

PHOTO = FIXTURES / "libcom" / "controllable_composition" / "background" / "000000049931.png"


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return save_tiny_sd_inpainter(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    return save_tiny_open_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture
def chelsea(tmp_path):
    """Real non-square photo (451x300), so aspect handling is exercised."""
    path = tmp_path / "chelsea.png"
    Image.fromarray(data.chelsea()).save(path)
    return path


@pytest.fixture
def stub_sampler(monkeypatch, tmp_path):
    """Stand-in for the location model: seeded random boxes inside the normalised region."""
    def sample(checkpoint, image, category, n, region, seed):
        g = torch.Generator().manual_seed(seed)
        x1, y1, x2, y2 = parse_region(region, image.size) or (0.0, 0.0, 1.0, 1.0)
        lo = torch.rand(n, 2, generator=g) * 0.5
        hi = lo + 0.1 + torch.rand(n, 2, generator=g) * (0.9 - lo)
        u = torch.cat([lo, hi.clamp(max=1.0)], 1)
        norm = torch.stack([x1 + u[:, 0] * (x2 - x1), y1 + u[:, 1] * (y2 - y1),
                            x1 + u[:, 2] * (x2 - x1), y1 + u[:, 3] * (y2 - y1)], 1)
        w, h = image.size
        return norm * torch.tensor([w, h, w, h])

    monkeypatch.setattr(insert, "sample_boxes", sample)
    ckpt = tmp_path / "stub.ckpt"
    ckpt.write_bytes(b"")
    return ckpt


def _load(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _check_outputs(out, photo, region_px):
    """Records match files and images; returns the records."""
    orig = _load(photo)
    h, w = orig.shape[:2]
    records = json.loads((out / "records.json").read_text())
    overlay = _load(out / "overlay.png")
    assert overlay.shape == orig.shape
    for i, rec in enumerate(records):
        assert json.loads((out / f"edit_{i}.json").read_text()) == rec
        assert rec["index"] == i and rec["image_size"] == [w, h]
        x1, y1, x2, y2 = rec["box"]
        rx1, ry1, rx2, ry2 = region_px
        assert rx1 - 1e-3 <= x1 < x2 <= rx2 + 1e-3 and ry1 - 1e-3 <= y1 < y2 <= ry2 + 1e-3
        assert rec["box_norm"] == pytest.approx([x1 / w, y1 / h, x2 / w, y2 / h])
        # the overlay outline sits on the record's pixel rectangle, in the record's colour
        x0, y0, xe, ye = pixel_rect(rec["box"], (w, h))
        edge = np.concatenate([overlay[y0, x0:xe], overlay[ye - 1, x0:xe], overlay[y0:ye, x0], overlay[y0:ye, xe - 1]])
        assert (edge == rec["color"]).all(-1).mean() > 0.5
    return records


def test_insert_end_to_end_sd_region_and_metrics(sd_dir, clip_files, chelsea, stub_sampler, tmp_path):
    cfg_path, weights = clip_files
    out = tmp_path / "out"
    argv = ["--image", str(chelsea), "--category", "dog", "--checkpoint", str(stub_sampler), "--inpainter", str(sd_dir),
            "--n", "2", "--region", "left", "--out", str(out), "--steps", "2", "--resolution", "64",
            "--dilate", "2", "--feather", "3", "--seed", "5", "--clip-weights", str(weights), "--clip-config", str(cfg_path)]
    assert insert.main(argv) == 0
    orig = _load(chelsea)
    h, w = orig.shape[:2]
    records = _check_outputs(out, chelsea, (0, 0, w / 2, h))
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP_NAME, pretrained=str(weights))
    tokens = open_clip.get_tokenizer(TINY_CLIP_NAME)(["a photo of a dog"])
    for rec in records:
        edit = _load(out / rec["edit"])
        assert edit.shape == orig.shape
        assert rec["mask_box"] == list(mask_bbox(box_mask(rec["box"], (w, h), 2)))
        assert rec["mode"] in ("crop", "whole") and len(rec["context"]) == 4
        assert rec["seed"] == 5 + rec["index"] and rec["prompt"] == "a photo of a dog"
        x0, y0, x1, y1 = rec["mask_box"]
        outside = np.ones((h, w), bool)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(edit[outside], orig[outside])
        assert not np.array_equal(edit[~outside], orig[~outside])
        # metrics in the record are recomputable from the written files
        t = lambda a: torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 255
        ssim = background_ssim(t(edit), t(orig), torch.tensor([rec["box_norm"]])).item()
        assert rec["metrics"]["background_ssim"] == pytest.approx(ssim, abs=1e-6)
        bx0, by0, bx1, by1 = pixel_rect(rec["box"], (w, h))
        with torch.no_grad():
            img = model.encode_image(preprocess(Image.fromarray(edit).crop((bx0, by0, bx1, by1)))[None])
            direct = torch.cosine_similarity(img, model.encode_text(tokens)).item()
        assert rec["metrics"]["clip_score"] == pytest.approx(direct, abs=1e-5)


def test_insert_offline_writes_boxes_and_one_hint_line(stub_sampler, tmp_path, capsys):
    out = tmp_path / "out"
    assert insert.main(["--image", str(PHOTO), "--category", "cat", "--checkpoint", str(stub_sampler), "--n", "3",
                        "--region", "100,50,400,300", "--out", str(out)]) == 0
    hints = [line for line in capsys.readouterr().out.splitlines() if "--inpainter" in line]
    assert len(hints) == 1
    records = _check_outputs(out, PHOTO, (100, 50, 400, 300))
    assert len(records) == 3 and all(r["edit"] is None for r in records)
    assert not list(out.glob("edit_*.png"))


def test_insert_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        insert.main(["--image", str(PHOTO), "--category", "cat", "--checkpoint", str(tmp_path / "nope.ckpt")])
    assert exc.value.code == 2
    assert "checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["--n", "0"], "--n must be >= 1"), (["--n", "-3"], "--n must be >= 1"),
    (["--max-iou", "1.5"], "--max-iou must be in [0, 1]"), (["--steps", "0"], "--steps must be >= 1"),
    (["--inpainter", "sd-inpaintnig"], "--inpainter sd-inpaintnig: no such folder"),
    (["--category", ""], "--category must name an object class"), (["--category", "  "], "--category must name"),
    (["--category", "cup", ""], "--category must name an object class"),
])
def test_bad_arguments_fail_at_once_before_any_model_loads(argv, says, stub_sampler, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(insert, "sample_boxes", lambda *a, **k: pytest.fail("the location model was used"))
    monkeypatch.setattr(insert, "load_inpainter", lambda *a, **k: pytest.fail("an inpainter was loaded"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        insert.main(["--image", str(PHOTO), "--category", "cat", "--checkpoint", str(stub_sampler), "--out", str(out),
                     *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1].startswith(f"insert.py: error: {says}") and not out.exists()


@pytest.mark.parametrize("content", [b"just some text, not a picture", "truncated"])
def test_image_that_is_not_an_image_is_a_one_line_error(content, stub_sampler, tmp_path, capsys):
    path = tmp_path / "photo.png"
    path.write_bytes(PHOTO.read_bytes()[:300] if content == "truncated" else content)
    with pytest.raises(SystemExit) as exc:
        insert.main(["--image", str(path), "--category", "cat", "--checkpoint", str(stub_sampler),
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1].startswith(f"insert.py: error: --image {path}")


def test_gligen_backend_keeps_background(tmp_path):
    with pytest.warns(FutureWarning, match="deprecated"):
        inpainter = load_backend("gligen", save_tiny_gligen(tmp_path / "gligen"), steps=2)
    image = Image.fromarray(data.chelsea())
    ins = inpainter.insert(image, "cat", box=(200.5, 40.2, 330.0, 210.7), seed=0, dilate=1, feather=2)
    orig, edit = np.asarray(image), np.asarray(ins.image)
    x0, y0, x1, y1 = ins.mask_box
    outside = np.ones(orig.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert edit.shape == orig.shape and np.array_equal(edit[outside], orig[outside])
    assert not np.array_equal(edit[~outside], orig[~outside])


def test_mask_helpers():
    size = (40, 30)
    assert mask_bbox(box_mask((10.2, 5.0, 20.0, 15.5), size, dilate=2)) == (8, 3, 22, 18)  # (10,5,20,16) grown by 2
    assert box_mask((0, 0, 5, 5), size).sum() == 25
    assert parse_region("left", size) == (0.0, 0.0, 0.5, 1.0)
    assert parse_region("4,3,20,15", size) == (0.1, 0.1, 0.5, 0.5)
    for bad in ("middle", "4,3,50,15", "1,2,3"):
        with pytest.raises(ValueError):
            parse_region(bad, size)
    assert working_size((451, 300), 512) == (512, 344)


def test_insert_with_real_tiny_location_model(tmp_path):
    from genloc import LocationModel, LocationModelConfig

    cfg = LocationModelConfig.preset("tiny")
    model = LocationModel(cfg)
    ckpt = tmp_path / "tiny.ckpt"
    save_model_checkpoint(model, ckpt)
    out = tmp_path / "out"
    assert insert.main(["--image", str(PHOTO), "--category", "cat", "--checkpoint", str(ckpt), "--n", "3",
                        "--region", "right", "--out", str(out)]) == 0
    assert len(_check_outputs(out, PHOTO, (256, 0, 512, 512))) == 3


def test_insert_backend_and_mode_arguments(stub_sampler, tmp_path, capsys):
    """--backend picks the adapter (a folder of another kind is a one-line error, exit 2); --mode is recorded."""
    from genloc.testing import save_powerpaint

    pp = save_powerpaint(tmp_path / "pp")
    out = tmp_path / "out"
    argv = ["--image", str(PHOTO), "--category", "cat", "--checkpoint", str(stub_sampler), "--n", "2", "--out", str(out),
            "--steps", "2", "--inpainter", str(pp)]
    assert insert.main([*argv, "--backend", "powerpaint", "--mode", "whole"]) == 0
    records = json.loads((out / "records.json").read_text())
    assert [r["mode"] for r in records] == ["whole", "whole"] and all(r["backend"] == "powerpaint" for r in records)
    assert all(r["context"] == [0, 0, 512, 512] for r in records)
    with pytest.raises(SystemExit) as exc:
        insert.main([*argv, "--backend", "flux-fill"])
    assert exc.value.code == 2 and "flux-fill back-end" in capsys.readouterr().err
