"""evaluate.py --given-size: OPA groups of one foreground size (checked on the real FOPA rows) and
boxes drawn at exactly that size; a model folder works wherever a checkpoint does."""
import csv
import json

import numpy as np
import pytest
import torch

import evaluate
from metrics.annotations import load_annotations, size_groups
from genloc import GenLocModel, LocationModelConfig
from tests.helpers import FIXTURES

FOPA_ROWS = FIXTURES / "opa_sample" / "annotations_original" / "fopa_test_data_pair__bg580029_rows.csv"


def test_size_groups_are_the_fopa_foreground_scale_groups_on_the_real_rows():
    samples = load_annotations(FOPA_ROWS)
    groups = size_groups(samples)
    rows = list(csv.DictReader(open(FOPA_ROWS, newline="")))
    # pooled samples (one per background and category / foreground) hold several sizes ...
    assert len(samples) == 35 and len(rows) == 57
    assert sum(len({tuple(np.subtract(b[2:], b[:2])) for b in s["positives"] + s["negatives"]}) > 1
               for s in samples) > 0
    # ... and splitting them by size gives back exactly the 57 (foreground, scale) rows of FOPA
    assert len(groups) == 57
    assert sorted(g["given_size"] for g in groups) == sorted((float(r["newWidth"]), float(r["newHeight"])) for r in rows)
    for g in groups:
        for box in g["positives"] + g["negatives"]:
            assert (box[2] - box[0], box[3] - box[1]) == g["given_size"]
    for field in ("positives", "negatives"):
        assert sum(len(g[field]) for g in groups) == sum(len(s[field]) for s in samples)  # 133 / 143
    assert len({g["key"] for g in groups}) == 57


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model") / "m"
    GenLocModel(LocationModelConfig.preset("tiny")).save_pretrained(out)
    return out


def test_given_size_draws_each_groups_size_from_a_model_folder(model_dir, tiny_toy_data, tmp_path):
    data = tiny_toy_data / "toy-opa"
    common = ["--model", str(model_dir), "--data", str(data), "--split", "val", "--num-samples", "20",
              "--no-progress", "--batch-size", "3"]
    free = evaluate.main(common + ["--out", str(tmp_path / "free")])
    given = evaluate.main(common + ["--out", str(tmp_path / "given"), "--given-size"])
    assert free["protocol"] == "free-size" and given["protocol"] == "given-size"
    samples = load_annotations(data, "val")
    groups = {g["key"]: g for g in size_groups(samples)}
    # same labelled boxes in both protocols, each counted once
    assert given["counts"]["num_positives"] == free["counts"]["num_positives"]
    assert given["counts"]["num_negatives"] == free["counts"]["num_negatives"]
    assert given["counts"]["num_samples"] == len(groups) > given["source_samples"] == len(samples)
    preds = [json.loads(line) for line in (tmp_path / "given" / "predictions.jsonl").read_text().splitlines()]
    assert {p["key"] for p in preds} == set(groups)
    for p in preds:
        g = groups[p["key"]]
        boxes = np.asarray(p["boxes"])
        half_bin = np.array([g["width"], g["height"]]) / 64 / 2
        wanted = np.clip(g["given_size"], 2 * half_bin, 63 * 2 * half_bin)  # 1..63 bins
        assert boxes.shape == (20, 4)
        assert (np.abs(boxes[:, 2:] - boxes[:, :2] - wanted) <= half_bin + 1e-6).all()
    assert "plausible_rate" in given  # the toy oracle scores the group samples too


def test_given_size_needs_a_model(capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--baseline", "random", "--annotations", str(FOPA_ROWS), "--given-size"])
    assert exc.value.code == 2 and "--given-size needs --model" in capsys.readouterr().err
