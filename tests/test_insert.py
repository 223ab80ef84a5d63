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
from genloc import LocationModelConfig
from genloc.checkpoint import save_model_checkpoint
from metrics.inpainting import background_ssim
from genloc.inpainters import load_backend
from genloc.inpainting import box_mask, mask_bbox, pixel_rect, working_size
from genloc.testing import TINY_CLIP_NAME, save_tiny_gligen, save_tiny_model, save_tiny_open_clip, save_tiny_sd_inpainter
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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random location model: boxes are random but honour --region."""
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def _load(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _check_outputs(out, photo, region_px):
    """The photo's boxes.jsonl line matches the files and images; returns its box records."""
    orig = _load(photo)
    h, w = orig.shape[:2]
    line, = (json.loads(text) for text in (out / "boxes.jsonl").read_text().splitlines())
    assert line["image"] == str(photo) and line["image_size"] == [w, h]
    overlay = _load(out / line["overlay"])
    assert overlay.shape == orig.shape and not np.array_equal(overlay, orig)
    bin_w, bin_h = w / 64, h / 64  # the tiny model's bins
    for i, rec in enumerate(line["boxes"]):
        assert rec["index"] == i
        x1, y1, x2, y2 = rec["box"]
        rx1, ry1, rx2, ry2 = region_px
        assert rx1 - bin_w <= x1 < x2 <= rx2 + bin_w and ry1 - bin_h <= y1 < y2 <= ry2 + bin_h
    return line["boxes"]


def test_insert_end_to_end_sd_region_and_metrics(sd_dir, clip_files, chelsea, model_dir, tmp_path):
    cfg_path, weights = clip_files
    out = tmp_path / "out"
    argv = ["--image", str(chelsea), "--category", "dog", "--model", str(model_dir), "--inpainter", str(sd_dir),
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
        assert edit.shape == orig.shape and rec["edit"] == f"chelsea_edit_{rec['index']}.png"
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
        box_norm = torch.tensor([[rec["box"][0] / w, rec["box"][1] / h, rec["box"][2] / w, rec["box"][3] / h]])
        ssim = background_ssim(t(edit), t(orig), box_norm).item()
        assert rec["metrics"]["background_ssim"] == pytest.approx(ssim, abs=1e-6)
        bx0, by0, bx1, by1 = pixel_rect(rec["box"], (w, h))
        with torch.no_grad():
            img = model.encode_image(preprocess(Image.fromarray(edit).crop((bx0, by0, bx1, by1)))[None])
            direct = torch.cosine_similarity(img, model.encode_text(tokens)).item()
        assert rec["metrics"]["clip_score"] == pytest.approx(direct, abs=1e-5)


def test_insert_py_and_genloc_insert_write_the_same_files(sd_dir, model_dir, tmp_path):
    from genloc.cli import main as genloc_main

    argv = ["--image", str(PHOTO), "--category", "cat", "--model", str(model_dir), "--inpainter", str(sd_dir),
            "--n", "2", "--steps", "2", "--resolution", "64"]
    assert insert.main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert genloc_main(["insert", *argv, "--out", str(tmp_path / "b")]) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert names == ["000000049931_edit_0.png", "000000049931_edit_1.png", "000000049931_overlay.png", "boxes.jsonl"]
    a, b = (json.loads((tmp_path / d / "boxes.jsonl").read_text()) for d in "ab")
    assert [r["box"] for r in a["boxes"]] == [r["box"] for r in b["boxes"]]
    assert all(r["metrics"] == {} for r in b["boxes"]) and all("background_ssim" in r["metrics"] for r in a["boxes"])
    for name in names[:3]:
        assert np.array_equal(_load(tmp_path / "a" / name), _load(tmp_path / "b" / name))


def test_insert_checkpoint_flag_still_works_with_a_note(sd_dir, tmp_path, capsys):
    from genloc import LocationModel

    ckpt = tmp_path / "tiny.ckpt"
    torch.manual_seed(0)
    save_model_checkpoint(LocationModel(LocationModelConfig.preset("tiny")), ckpt)
    out = tmp_path / "out"
    assert insert.main(["--image", str(PHOTO), "--category", "cat", "--checkpoint", str(ckpt), "--n", "1",
                        "--region", "right", "--inpainter", str(sd_dir), "--steps", "2", "--resolution", "64",
                        "--out", str(out)]) == 0
    assert "note: --checkpoint is now --model" in capsys.readouterr().err
    assert len(_check_outputs(out, PHOTO, (256, 0, 512, 512))) == 1


def test_insert_missing_model_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        insert.main(["--image", str(PHOTO), "--category", "cat", "--model", str(tmp_path / "nope.ckpt"),
                     "--inpainter", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert f"--model {tmp_path / 'nope.ckpt'} not found: no such model folder or checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["--n", "0"], "argument --n: must be a whole number in [1, 1000]"), (["--n", "-3"], "argument --n: must be"),
    (["--max-iou", "1.5"], "argument --max-iou: must be a number in [0, 1]"),
    (["--steps", "0"], "argument --steps: must be a whole number >= 1"),
    (["--inpainter", "sd-inpaintnig"], "--inpainter sd-inpaintnig: no such folder, and not a Hub id"),
    (["--category", ""], "argument --category: must not be empty"), (["--category", "  "], "argument --category"),
    (["--category", "cup", ""], "argument --category: must not be empty"),
    (["--clip-weights", "no-such.pt"], "--clip-weights no-such.pt: no such file"),
])
def test_bad_arguments_fail_at_once_before_any_model_loads(argv, says, model_dir, sd_dir, tmp_path, capsys,
                                                           monkeypatch):
    import genloc.hub
    import genloc.inpainters

    monkeypatch.setattr(genloc.hub, "load_model", lambda *a, **k: pytest.fail("the location model was used"))
    monkeypatch.setattr(genloc.inpainters, "load_backend", lambda *a, **k: pytest.fail("an inpainter was loaded"))
    out = tmp_path / "out"
    base = ["--image", str(PHOTO), "--category", "cat", "--model", str(model_dir), "--out", str(out)]
    with pytest.raises(SystemExit) as exc:
        insert.main([*base, *([] if "--inpainter" in argv else ["--inpainter", str(sd_dir)]), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1].startswith(f"insert.py: error: {says}") and not out.exists(), err


@pytest.mark.parametrize("content", [b"just some text, not a picture", "truncated"])
def test_image_that_is_not_an_image_is_a_one_line_error(content, model_dir, sd_dir, tmp_path, capsys):
    path = tmp_path / "photo.png"
    path.write_bytes(PHOTO.read_bytes()[:300] if content == "truncated" else content)
    assert insert.main(["--image", str(path), "--category", "cat", "--model", str(model_dir),
                        "--inpainter", str(sd_dir), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert any(line.startswith(f"insert.py: --image {path}") for line in err), err
    assert not (tmp_path / "out" / "boxes.jsonl").exists()  # nothing counted as done


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
    assert working_size((451, 300), 512) == (512, 344)


def test_insert_backend_and_mode_arguments(model_dir, tmp_path, capsys):
    """--backend picks the adapter (a folder of another kind is a one-line error, exit 2); --mode is recorded."""
    from genloc.testing import save_powerpaint

    pp = save_powerpaint(tmp_path / "pp")
    out = tmp_path / "out"
    argv = ["--image", str(PHOTO), "--category", "cat", "--model", str(model_dir), "--n", "2", "--out", str(out),
            "--steps", "2", "--inpainter", str(pp)]
    assert insert.main([*argv, "--backend", "powerpaint", "--mode", "whole"]) == 0
    records = json.loads((out / "boxes.jsonl").read_text())["boxes"]
    assert [r["mode"] for r in records] == ["whole", "whole"]
    assert all(r["context"] == [0, 0, 512, 512] for r in records)
    with pytest.raises(SystemExit) as exc:
        insert.main([*argv, "--backend", "flux-fill", "--out", str(tmp_path / "flux")])
    assert exc.value.code == 2 and "flux-fill back-end" in capsys.readouterr().err
