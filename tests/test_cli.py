"""The `genloc` command (genloc/cli.py) on a real photo with a tiny model folder and a tiny diffusers
pipeline: boxes inside the photo and the region, an overlay, edits that change only their mask; a bad
argument is one line and exit code 2."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from genloc import GenLocModel, LocationModelConfig
from genloc.cli import main
from genloc.inpainting import box_mask
from genloc.testing import save_tiny_sd_inpainter
from tests.helpers import FIXTURES

PHOTO = FIXTURES / "libcom" / "controllable_composition" / "background" / "000000049931.png"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "tiny"
    GenLocModel(LocationModelConfig.preset("tiny")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return save_tiny_sd_inpainter(tmp_path_factory.mktemp("sd"))


def _read(out):
    doc = json.loads((out / "boxes.json").read_text())
    w, h = Image.open(PHOTO).size
    assert doc["image_size"] == [w, h] and doc["category"] == "cup"
    for rec in doc["boxes"]:
        x1, y1, x2, y2 = rec["box"]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, rec
        assert rec["log_prob"] < 0
    overlay = Image.open(out / "overlay.png")
    assert overlay.size == (w, h)
    assert not np.array_equal(np.asarray(overlay.convert("RGB")), np.asarray(Image.open(PHOTO).convert("RGB")))
    return doc


def test_place_writes_boxes_inside_the_photo_and_region_and_an_overlay(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["place", "--model", str(model_dir), "--image", str(PHOTO), "--category", "cup", "--n", "5",
                 "--region", "right", "--seed", "3", "--out", str(out)]) == 0
    doc = _read(out)
    w = doc["image_size"][0]
    assert len(doc["boxes"]) == 5 and all(rec["box"][0] >= w / 2 - 1 for rec in doc["boxes"])  # half a bin
    assert doc["seed"] == 3 and doc["region"] == "right" and doc["genloc_version"]
    assert sorted(p.name for p in out.iterdir()) == ["boxes.json", "overlay.png"]
    assert f"to {out}" in capsys.readouterr().out


def test_place_with_size_and_aspect_ratio(model_dir, tmp_path):
    out = tmp_path / "out"
    main(["place", "--model", str(model_dir), "--image", str(PHOTO), "--category", "cup", "--size", "160,80",
          "--out", str(out)])
    tolerance = 512 / 64  # a bin of the 512 px photo
    for rec in _read(out)["boxes"]:
        x1, y1, x2, y2 = rec["box"]
        assert abs((x2 - x1) - 160) <= tolerance and abs((y2 - y1) - 80) <= tolerance


def test_insert_draws_the_object_inside_each_box_only(model_dir, sd_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["insert", "--model", str(model_dir), "--image", str(PHOTO), "--category", "cup", "--n", "2",
                 "--inpainter", str(sd_dir), "--steps", "2", "--device", "cpu", "--out", str(out)]) == 0
    doc = _read(out)
    before = np.asarray(Image.open(PHOTO).convert("RGB"))
    for rec in doc["boxes"]:
        edit = np.asarray(Image.open(out / rec["edit"]))
        outside = ~box_mask(rec["mask_box"], (before.shape[1], before.shape[0]))
        assert np.array_equal(edit[outside], before[outside]) and not np.array_equal(edit, before)


@pytest.mark.parametrize("argv, says", [
    (["place", "--n", "0"], "--n must be >= 1"),
    (["place", "--aspect-ratio", "0"], "--aspect-ratio must be > 0"),
    (["place", "--size", "10"], "argument --size: '10' is not W,H"),
    (["place", "--size", "10,-5"], "argument --size: '10,-5': width and height must be > 0"),
    (["place", "--category", " "], "--category must name an object class"),
    (["place", "--region", "middle"], "region 'middle' is neither one of"),
    (["place", "--model", "no/such/folder"], "--model no/such/folder: no such model folder"),
    (["insert", "--inpainter", "no-such-folder"], "--inpainter no-such-folder: no such folder"),
    (["insert", "--steps", "0", "--inpainter", "."], "--steps must be >= 1"),
    (["insert"], "the following arguments are required: --inpainter"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, says, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    base = {"--model": str(model_dir), "--image": str(PHOTO), "--category": "cup", "--out": str(out)}
    given = dict(zip(argv[1::2], argv[2::2]))
    args = [argv[0], *[x for k, v in base.items() if k not in given for x in (k, v)], *argv[1:]]
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1].startswith(f"genloc {argv[0]}: error: {says}"), err
    assert not out.exists()


def test_an_image_that_is_not_a_photo_is_one_line(model_dir, tmp_path, capsys):
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"not a picture")
    with pytest.raises(SystemExit) as exc:
        main(["place", "--model", str(model_dir), "--image", str(bad), "--category", "cup", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"genloc place: error: --image {bad}")
