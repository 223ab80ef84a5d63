"""One loader: every entry point that takes a location model accepts a checkpoint, a model folder and
a Hub id (`genloc.hub.load_model`), and gives the same result from each; a reference that is none of
them is one line before any model loads."""
import argparse
import json
import shutil

import pytest
import torch
from PIL import Image

from genloc import demo
import evaluate
import insert
from genloc import GenLocModel, LocationModelConfig
from genloc.checkpoint import save_model_checkpoint
from genloc.cli import main as genloc_main
from genloc.hub import FILES
from scripts import compare_insertion, compare_mle_dpo, export, toy_place_many
from tests.helpers import FIXTURES

PHOTO = FIXTURES / "opa_sample" / "eval_opascore_examples" / "composite_1.jpg"
HUB_ID = "someone/genloc-tiny"
KINDS = ("checkpoint", "folder", "hub")


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """The same tiny model as a checkpoint, a model folder and a Hub cache entry."""
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    model = GenLocModel(LocationModelConfig.preset("tiny")).eval()
    save_model_checkpoint(model, root / "tiny.ckpt")
    model.save_pretrained(root / "folder")
    snapshot = root / "hub" / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    for name in FILES:
        shutil.copy(root / "folder" / name, snapshot / name)
    return {"checkpoint": str(root / "tiny.ckpt"), "folder": str(root / "folder"), "hub": HUB_ID,
            "hub_cache": str(root / "hub"), "model": model}


@pytest.fixture
def sources(stored, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", stored["hub_cache"])
    return {kind: stored[kind] for kind in KINDS}


def _same_for_every_kind(results: dict):
    first = results["checkpoint"]
    assert all(results[kind] == first for kind in KINDS), results


def test_evaluate(sources, tiny_toy_data, tmp_path):
    results = {}
    for kind, source in sources.items():
        doc = evaluate.main(["--model", source, "--data", str(tiny_toy_data / "toy-opa"), "--split", "val",
                             "--num-samples", "10", "--device", "cpu", "--no-progress", "--out", str(tmp_path / kind)])
        results[kind] = (doc["metrics"], (tmp_path / kind / "predictions.jsonl").read_bytes())
    _same_for_every_kind(results)


def test_genloc_place(sources, tmp_path):
    results = {}
    for kind, source in sources.items():
        assert genloc_main(["place", "--image", str(PHOTO), "--category", "car", "--model", source, "--n", "3",
                            "--out", str(tmp_path / kind)]) == 0
        results[kind] = [r["box"] for r in json.loads((tmp_path / kind / "boxes.jsonl").read_text())["boxes"]]
    _same_for_every_kind(results)


def test_demo(sources):
    results = {}
    for kind, source in sources.items():
        backends = demo.load_backends(source, None, "sd", "cpu", 2)
        results[kind] = demo.place_boxes(backends, str(PHOTO), "car", 3, 1.0, seed=0).records
    _same_for_every_kind(results)


def test_compare_insertion(sources, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.open(PHOTO).convert("RGB").resize((160, 107)).save(photos / "street.png")
    (photos / "pairs.csv").write_text("image,category\nstreet.png,car\n")
    samples = compare_insertion.read_samples(photos, "test")
    results = {}
    for kind, source in sources.items():
        args = compare_insertion.build_parser().parse_args(["--images", str(photos), "--methods", "m=sd:unused",
                                                            "--model", source, "--out", str(tmp_path / kind)])
        results[kind] = compare_insertion.genloc_boxes(args, samples)
    _same_for_every_kind(results)


def test_compare_mle_dpo(sources, tiny_toy_data, tmp_path, capsys):
    results = {}
    data = ["--data", str(tiny_toy_data / "toy-opa"), "--num-samples", "10", "--device", "cpu"]
    for kind, source in sources.items():
        out = tmp_path / f"{kind}.json"
        assert compare_mle_dpo.main(["--mle", source, "--dpo", source, *data, "--out", str(out)]) == 0
        doc = json.loads(out.read_text())
        results[kind] = (doc["mle"], doc["dpo"])
    _same_for_every_kind(results)
    with pytest.raises(SystemExit) as exc:  # the default output lies beside a checkpoint's run only
        compare_mle_dpo.main(["--mle", sources["folder"], "--dpo", sources["folder"], *data])
    assert exc.value.code == 2 and "--out is needed" in capsys.readouterr().err


def test_export(sources, stored, tmp_path):
    for kind, source in sources.items():
        assert export.main(["--model", source, "--out", str(tmp_path / kind)]) == 0
        again = GenLocModel.from_pretrained(str(tmp_path / kind))
        expected = stored["model"].state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in again.state_dict().items())


def test_toy_place_many(sources, tiny_toy_data, capsys):
    results = {}
    for kind, source in sources.items():
        assert toy_place_many.main(["--model", source, "--data", str(tiny_toy_data / "toy-opa"), "--split", "val",
                                    "--limit", "2", "--candidates", "10"]) == 0
        results[kind] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    _same_for_every_kind(results)


@pytest.mark.parametrize("entry, argv", [
    (insert.main, ["--image", str(PHOTO), "--category", "car", "--model", "{bad}", "--inpainter", "{tmp}",
                   "--out", "{tmp}/o"]),
    (genloc_main, ["place", "--image", str(PHOTO), "--category", "car", "--model", "{bad}", "--out", "{tmp}/o"]),
    (export.main, ["--model", "{bad}", "--out", "{tmp}/m"]),
    (compare_mle_dpo.main, ["--mle", "{bad}", "--dpo", "{bad}", "--out", "{tmp}/x.json"]),
])
@pytest.mark.parametrize("bad, says", [("runs/typo.ckpt", "not found"), ("no_such_folder", "not found"),
                                       ("", "must not be empty")])
def test_a_reference_that_is_no_model_is_one_line_before_loading(entry, argv, bad, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        entry([a.format(bad=bad, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and says in err.splitlines()[-1] and err.splitlines()[-1].count("error:") == 1, err


def test_is_model_source_rejects_what_no_loader_can_read():
    from genloc.hub import is_model_source

    assert is_model_source(HUB_ID) and is_model_source(str(FIXTURES))
    assert not any(is_model_source(s) for s in ("", "  ", None, 3, "runs/typo.ckpt", "no_such_folder",
                                                argparse.Namespace()))
