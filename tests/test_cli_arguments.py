"""Every command rejects a value of the wrong kind, an empty string or a number out of range with one
line naming the flag and exit code 2, before any model loads or any data is written (docs/reliability.md)."""
import importlib

import pytest

from tests.helpers import FIXTURES

PHOTO = str(FIXTURES / "opa_sample" / "eval_opascore_examples" / "composite_1.jpg")
MODEL = "someone/genloc-model"  # shaped like a Hub id: only loading it would fail

# command module -> arguments that are valid apart from the one under test ({tmp}: a fresh folder)
BASE = {
    "evaluate": ["--baseline", "random", "--annotations", "{tmp}", "--out", "{tmp}/out"],
    "insert": ["--image", PHOTO, "--category", "cat", "--model", MODEL, "--inpainter", "{tmp}", "--out", "{tmp}/out"],
    "demo": ["--model", MODEL],
    "scripts.compare_insertion": ["--images", "{tmp}", "--methods", "m=sd:{tmp}", "--checkpoint", MODEL,
                                  "--out", "{tmp}/out"],
    "scripts.compare_mle_dpo": ["--mle", MODEL, "--dpo", MODEL, "--data", "{tmp}", "--out", "{tmp}/out.json"],
    "scripts.toy_place_many": ["--model", MODEL, "--data", "{tmp}"],
    "scripts.export": ["--checkpoint", MODEL, "--out", "{tmp}/model"],
    "scripts.smoke_gpu": ["--device", "cpu", "--tiny", "--out", "{tmp}/smoke"],
    "scripts.convert_opa": ["--opa-root", "{tmp}", "--out", "{tmp}/out"],
    "scripts.convert_fopa": ["--labels", "{tmp}/pairs.csv", "--backgrounds", "{tmp}", "--out", "{tmp}/out",
                             "--split", "test"],
    "scripts.convert_pipe": ["--parquet", "{tmp}/x.parquet", "--out", "{tmp}/out", "--split", "train"],
    "datamodules.toy.__main__": ["--out", "{tmp}/toy"],
    "datamodules.toy.probe": [MODEL],
    "datamodules.verify": ["{tmp}"],
}

CASES = [
    ("evaluate", ["--split", ""], "--split"), ("evaluate", ["--train-split", " "], "--train-split"),
    ("evaluate", ["--name", ""], "--name"), ("evaluate", ["--out", ""], "--out"),
    ("evaluate", ["--checkpoint", ""], "--checkpoint"), ("evaluate", ["--data", " "], "--data"),
    ("evaluate", ["--predictions", ""], "--predictions"), ("evaluate", ["--annotations", ""], "--annotations"),
    ("insert", ["--inpainter", ""], "--inpainter"), ("insert", ["--clip-weights", ""], "--clip-weights"),
    ("scripts.compare_insertion", ["--clip-weights", ""], "--clip-weights"),
    ("insert", ["--out", ""], "--out"), ("insert", ["--region", ""], "--region"), ("insert", ["--image", ""], "--image"),
    ("demo", ["--port", "0"], "--port"), ("demo", ["--port", "70000"], "--port"), ("demo", ["--model", ""], "--model"),
    ("demo", ["--host", ""], "--host"), ("demo", ["--inpainter", ""], "--inpainter"),
    ("scripts.compare_insertion", ["--limit", "0"], "--limit"), ("scripts.compare_insertion", ["--steps", "0"], "--steps"),
    ("scripts.compare_insertion", ["--margin", "-1"], "--margin"),
    ("scripts.compare_insertion", ["--resolution", "0"], "--resolution"),
    ("scripts.compare_insertion", ["--grid-rows", "0"], "--grid-rows"),
    ("scripts.compare_insertion", ["--grid-cell", "-4"], "--grid-cell"),
    ("scripts.compare_insertion", ["--split", ""], "--split"), ("scripts.compare_insertion", ["--out", ""], "--out"),
    ("scripts.compare_insertion", ["--checkpoint", ""], "--checkpoint"),
    ("scripts.compare_insertion", ["--boxes", ""], "--boxes"),
    ("scripts.compare_mle_dpo", ["--num-samples", "0"], "--num-samples"),
    ("scripts.compare_mle_dpo", ["--batch-size", "0"], "--batch-size"),
    ("scripts.compare_mle_dpo", ["--split", ""], "--split"), ("scripts.compare_mle_dpo", ["--data", ""], "--data"),
    ("scripts.compare_mle_dpo", ["--out", ""], "--out"),
    ("scripts.toy_place_many", ["--max-iou", "1.5"], "--max-iou"),
    ("scripts.toy_place_many", ["--max-iou", "nan"], "--max-iou"),
    ("scripts.toy_place_many", ["--candidates", "0"], "--candidates"),
    ("scripts.toy_place_many", ["--limit", "0"], "--limit"),
    ("scripts.toy_place_many", ["--categories", "car", ""], "--categories"),
    ("scripts.toy_place_many", ["--split", ""], "--split"), ("scripts.toy_place_many", ["--model", ""], "--model"),
    ("scripts.export", ["--out", ""], "--out"), ("scripts.export", ["--push-to-hub", ""], "--push-to-hub"),
    ("scripts.export", ["--eval", ""], "--eval"),
    ("scripts.smoke_gpu", ["--out", ""], "--out"), ("scripts.smoke_gpu", ["--device", ""], "--device"),
    ("scripts.convert_opa", ["--splits", ""], "--splits"), ("scripts.convert_opa", ["--out", ""], "--out"),
    ("scripts.convert_fopa", ["--split", ""], "--split"), ("scripts.convert_fopa", ["--out", " "], "--out"),
    ("scripts.convert_pipe", ["--split", ""], "--split"), ("scripts.convert_pipe", ["--diff-threshold", "300"],
                                                           "--diff-threshold"),
    ("scripts.convert_pipe", ["--min-area", "-1"], "--min-area"), ("scripts.convert_pipe", ["--limit", "0"], "--limit"),
    ("scripts.convert_pipe", ["--category-column", ""], "--category-column"),
    ("datamodules.toy.__main__", ["--size", "0"], "--size"),
    ("datamodules.toy.__main__", ["--num-shards", "0"], "--num-shards"),
    ("datamodules.toy.__main__", ["--classes", ""], "--classes"),
    ("datamodules.toy.__main__", ["--out", ""], "--out"),
    ("datamodules.toy.probe", ["--scenes", "0"], "--scenes"), ("datamodules.toy.probe", ["--ridge", "-1"], "--ridge"),
    ("datamodules.verify", ["--split", ""], "--split"),
]


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Loading a model or an inpainter, or writing toy data, fails the test: checks come first."""
    import datamodules.toy
    import genloc.hub
    import genloc.inpainters

    def heavy(*args, **kwargs):
        pytest.fail("heavy work started before the arguments were checked")

    for module, name in ((genloc.hub, "load_model"), (genloc.hub, "load_location_model"),
                         (genloc.inpainters, "load_backend"), (datamodules.toy, "write_toy_dataset")):
        monkeypatch.setattr(module, name, heavy)


@pytest.mark.parametrize("command, argv, flag", CASES, ids=[f"{c[0]} {' '.join(c[1])!r}" for c in CASES])
def test_a_bad_argument_is_one_line_and_exit_2_before_any_work(command, argv, flag, tmp_path, capsys, no_heavy_work,
                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)  # a check that let an empty path through would write here, not into the repository
    (tmp_path / "pairs.csv").write_text("image,category\nphoto.png,cat\n")
    module = importlib.import_module(command)
    main = getattr(module, "main")
    args = [a.format(tmp=tmp_path) for a in BASE[command]]
    argv = [a.format(tmp=tmp_path) for a in argv]
    flags = {a for a in argv if a.startswith("--")}
    kept, skip = [], False  # the case's flags replace the base's
    for a in args:
        if skip and not a.startswith("--"):
            continue
        skip = a in flags
        if not skip:
            kept.append(a)
    with pytest.raises(SystemExit) as exc:
        main(kept + argv) if command != "datamodules.toy.probe" else main(argv + kept)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and lines and flag in lines[-1] and "error" in lines[-1], lines
    assert not any(line.startswith("Traceback") for line in lines)
