"""scripts/compare_insertion.py on 3 real photos with tiny random pipelines: edits, table, grid,
resuming, shard input and bad input."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from metrics.inpainting import background_ssim
from genloc.inpainting import pixel_rect
from scripts import compare_insertion
from genloc.testing import save_instruct_pix2pix, save_powerpaint, save_sd, save_tiny_open_clip
from tests.helpers import FIXTURES

PHOTOS = {  # real photos: two libcom COCO crops (512x512) and the OPA background 580029 (640x427)
    "cat.png": (FIXTURES / "libcom/controllable_composition/background/000000049931.png", "dog"),
    "frisbee.png": (FIXTURES / "libcom/controllable_composition/background/000000460450.png", "dog"),
    "sky.png": (FIXTURES / "opa_sample/reconstructed/580029_background_reconstructed.png", "airplane"),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from genloc import LocationModel, LocationModelConfig

    root = tmp_path_factory.mktemp("compare")
    for folder, scale in (("photos", 1), ("small", 4)):  # small: the same photos at 1/4 side, for quick mechanics
        (root / folder).mkdir()
        with open(root / folder / "pairs.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "category"])
            for name, (src, category) in PHOTOS.items():
                image = Image.open(src).convert("RGB")
                image.resize((image.width // scale, image.height // scale), Image.BICUBIC).save(root / folder / name)
                writer.writerow([name, category])
    torch.manual_seed(0)
    cfg = LocationModelConfig.preset("tiny")
    ckpt = root / "tiny.ckpt"
    torch.save({"hyper_parameters": {"model_config": cfg.to_dict()},
                "state_dict": {"model." + k: v for k, v in LocationModel(cfg).state_dict().items()}}, ckpt)
    clip_cfg, clip_weights = save_tiny_open_clip(root / "clip")
    return {"photos": root / "photos", "small": root / "small", "ckpt": ckpt, "clip": ["--clip-weights", str(clip_weights), "--clip-config", str(clip_cfg)],
            "sd": save_sd(root / "sd"), "powerpaint": save_powerpaint(root / "pp"),
            "ip2p": save_instruct_pix2pix(root / "ip2p")}


def _methods(setup):
    return [f"genloc+sd=sd:{setup['sd']}", f"genloc+powerpaint=powerpaint:{setup['powerpaint']}",
            f"instructpix2pix=instruct-pix2pix:{setup['ip2p']}"]


def _run(setup, out, *extra, methods=None, images="photos"):
    return compare_insertion.main(["--images", str(setup[images]), "--model", str(setup["ckpt"]), "--out", str(out),
                                   "--steps", "2", "--methods", *(methods or _methods(setup)), *setup["clip"], *extra])


@pytest.mark.slow
def test_compare_writes_edits_table_and_grid(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert _run(setup, out, "--grid-cell", "96") == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["genloc+sd", "genloc+powerpaint", "instructpix2pix"]
    boxes = json.loads((out / "boxes.json").read_text())
    assert sorted(boxes) == ["cat", "frisbee", "sky"]
    for name, m in results["methods"].items():
        for metric in ("background_ssim", "clip_score"):
            stat = m[metric]
            lo, hi = stat["ci95"]
            assert stat["n"] == 3 and lo <= stat["mean"] <= hi
    # every score is recomputable from the written files; back-ends leave pixels outside the box alone
    for row in results["edits"]:
        original = np.asarray(Image.open(setup["photos"] / f"{row['key']}.png").convert("RGB"))
        edit = np.asarray(Image.open(out / "edits" / row["method"] / f"{row['key']}.png"))
        assert edit.shape == original.shape
        h, w = original.shape[:2]
        record = json.loads((out / "edits" / row["method"] / f"{row['key']}.json").read_text())
        if row["method"].startswith("genloc"):
            assert record["box"] == pytest.approx(boxes[row["key"]]) and record["mode"] in ("crop", "whole")
            x0, y0, x1, y1 = pixel_rect(record["box"], (w, h))
            outside = np.ones((h, w), bool)
            outside[y0:y1, x0:x1] = False
            assert np.array_equal(edit[outside], original[outside])
        else:
            assert record["prompt"] == f"add a {row['category']}" and record["box"] == record["region"]
        if row["box"] is not None and row["key"] == "sky":  # one per method: CPU SSIM in float64 is slow
            t = lambda a: torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 255
            box = torch.tensor([row["box"]]) / torch.tensor([w, h, w, h])
            assert row["background_ssim"] == pytest.approx(background_ssim(t(edit), t(original), box).item(), abs=1e-5)
    table = (out / "results.md").read_text()
    assert "| genloc+powerpaint | powerpaint |" in table and "| instructpix2pix | instruct-pix2pix |" in table
    mean = results["methods"]["genloc+sd"]["background_ssim"]["mean"]
    assert f"{mean:.3f}" in table
    grid = Image.open(out / "grid.png")
    assert grid.size == (4 * 96, 22 + 3 * 96)

    # resuming: nothing is regenerated or rescored (no pipeline is even loaded); the same table comes out
    stamps = {p: p.stat().st_mtime_ns for p in (out / "edits").rglob("*") if p.is_file()}
    monkeypatch.setattr(compare_insertion, "load_backend", lambda *a, **k: pytest.fail("reloaded a back-end"))
    monkeypatch.setattr(compare_insertion, "load_editor", lambda *a, **k: pytest.fail("reloaded an editor"))
    assert _run(setup, out, "--grid-cell", "96") == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "edits").rglob("*") if p.is_file()} == stamps
    assert json.loads((out / "results.json").read_text())["methods"] == results["methods"]


def test_compare_resumes_an_interrupted_method(setup, tmp_path):
    out = tmp_path / "out"
    methods = [f"genloc+sd=sd:{setup['sd']}"]
    assert _run(setup, out, methods=methods, images="small") == 0
    done = out / "edits" / "genloc+sd"
    reference = np.asarray(Image.open(done / "sky.png"))
    (done / "sky.json").unlink()  # as if killed between the picture and its record
    keep = (done / "cat.png").stat().st_mtime_ns
    assert _run(setup, out, methods=methods, images="small") == 0
    assert (done / "cat.png").stat().st_mtime_ns == keep
    assert np.array_equal(np.asarray(Image.open(done / "sky.png")), reference)  # same seed, same edit
    with pytest.raises(SystemExit) as exc:  # other settings under the same name would mix edits
        _run(setup, out, "--margin", "1.0", methods=methods, images="small")
    assert exc.value.code == 2


def test_compare_on_a_shard_split_with_a_boxes_file(setup, tmp_path, capsys):
    from datamodules.shard_writer import ShardWriter

    data = tmp_path / "opa"
    lines = []
    with ShardWriter(data, "test", source="test", num_shards=1) as writer:
        for name, (_, category) in PHOTOS.items():
            image = Image.open(setup["small"] / name)
            key = name.split(".")[0]
            box = [20.0, 30.0, 70.0, 75.0]
            assert writer.write(key, {"category": category, "positives": [box]}, image=image) is None
            lines.append(json.dumps({"key": key, "boxes": [box, [0, 0, 10, 10]]}))
        assert writer.write("unlabelled", {"category": "", "positives": [[0, 0, 10, 10]]}, image=image) is None
    (tmp_path / "boxes.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert compare_insertion.main(["--images", str(data), "--boxes", str(tmp_path / "boxes.jsonl"), "--out", str(out),
                                   "--steps", "2", "--methods", f"sd=sd:{setup['sd']}"]) == 0
    assert "skipped 1 sample(s) without an image or a category" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["methods"]["sd"]["clip_score"] is None and results["methods"]["sd"]["background_ssim"]["n"] == 3
    assert all(json.loads((out / "edits/sd" / f"{k}.json").read_text())["box"] == [20.0, 30.0, 70.0, 75.0]
               for k in ("cat", "frisbee", "sky"))


@pytest.mark.parametrize("argv, message", [
    (["--methods", "nonsense"], "expected NAME=KIND:FOLDER"),
    (["--methods", "a=dalle:/x"], "unknown kind 'dalle'"),
    (["--methods", "a b=sd:/x"], "the name may hold only"),
    (["--methods", "a=sd:/nonexistent/sd"], "folder /nonexistent/sd does not exist"),
])
def test_compare_bad_input_is_one_line_and_exit_2(setup, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        compare_insertion.main(["--images", str(setup["photos"]), "--model", str(setup["ckpt"]),
                                "--out", str(tmp_path / "out"), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_compare_needs_boxes_for_back_ends_and_a_known_input_layout(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        compare_insertion.main(["--images", str(setup["photos"]), "--out", str(tmp_path / "o"),
                                "--methods", f"sd=sd:{setup['sd']}"])
    assert exc.value.code == 2 and "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        compare_insertion.main(["--images", str(tmp_path), "--out", str(tmp_path / "o"),
                                "--methods", f"e=instruct-pix2pix:{setup['ip2p']}"])
    assert exc.value.code == 2 and "pairs.csv" in capsys.readouterr().err


def test_a_run_that_failed_before_editing_does_not_block_the_corrected_command(setup, tmp_path, capsys):
    out = tmp_path / "out"
    methods = [f"genloc+sd=sd:{setup['sd']}"]
    args = ["--images", str(setup["small"]), "--out", str(out), "--steps", "2", "--methods", *methods]
    with pytest.raises(SystemExit) as exc:
        compare_insertion.main(args + ["--model", str(tmp_path / "typo.ckpt")])
    assert exc.value.code == 2 and "typo.ckpt" in capsys.readouterr().err
    assert compare_insertion.main(args + ["--model", str(setup["ckpt"])]) == 0
    assert {p.name for p in (out / "edits" / "genloc+sd").glob("*.png")} == set(PHOTOS)
