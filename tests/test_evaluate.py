"""evaluate.py: real OPA labels scored by hand, predictions/baseline/plot/checkpoint modes end to end."""
import csv
import json
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
import torch

import evaluate
from metrics.annotations import EvaluationError, annotation_kind, load_annotations
from metrics.evaluation import evaluate as evaluate_method, plausible_rates
from metrics.predictions import baseline_predictions, read_predictions
from metrics.sampling import Sampling
from genloc.checkpoint import save_model_checkpoint
from tests.helpers import FIXTURES, ROOT

OPA = FIXTURES / "opa_sample"
FOPA_CSV = OPA / "annotations_original" / "fopa_test_data_pair__bg580029_rows.csv"
FAR = [600.0, 400.0, 610.0, 410.0]          # overlaps no labelled box of background 580029


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def padded(boxes, n=100):
    """``boxes`` followed by boxes that match nothing, ``n`` in all."""
    return list(boxes) + [FAR] * (n - len(boxes))


def test_fopa_labels_pool_like_the_sample_groups_file():
    """The FOPA rows parse to the boxes of the independently derived sample_groups.csv."""
    samples = {s["key"]: s for s in load_annotations(FOPA_CSV)}
    expected = defaultdict(lambda: ([], []))
    with open(OPA / "sample_groups.csv", newline="") as f:
        for row in csv.DictReader(f):
            for i, col in enumerate(("pos_boxes_xywh", "neg_boxes_xywh")):
                expected[f"opa-580029-fg{row['fg_id']}"][i].extend(
                    [x, y, x + w, y + h] for x, y, w, h in json.loads(row[col]))
    assert len(samples) == len(expected) == 35              # 57 rows, 35 distinct foregrounds
    for key, (pos, neg) in expected.items():
        assert sorted(samples[key]["positives"]) == sorted(map(lambda b: list(map(float, b)), pos))
        assert sorted(samples[key]["negatives"]) == sorted(map(lambda b: list(map(float, b)), neg))
    assert sum(len(s["positives"]) for s in samples.values()) == 133
    assert sum(len(s["negatives"]) for s in samples.values()) == 143


def test_real_opa_sample_scored_by_hand(tmp_path):
    samples = load_annotations(FOPA_CSV)
    pos_160915 = next(s for s in samples if s["key"] == "opa-580029-fg160915")["positives"]
    records = {s["key"]: [] for s in samples}           # every other sample: no predictions
    # fg 160915: its 6 positives exactly (IoU 1), then a box matching nothing
    records["opa-580029-fg160915"] = pos_160915 + [FAR]
    # fg 159573: its first negative exactly (= the SmartPlace opa_test_065 composite, label 0)
    records["opa-580029-fg159573"] = [[246, 133, 432, 182]]
    # fg 157816: after 10 boxes matching nothing, the left half of the positive [338,148,533,227]:
    # inter 97.5*79, union 195*79 -> IoU exactly 0.5, a hit, but only from n=20 on
    records["opa-580029-fg157816"] = [FAR] * 10 + [[338, 148, 435.5, 227]]
    # every sample gets 100 boxes (a point "@n" needs n boxes per sample): the rest match nothing
    preds = _write_jsonl(tmp_path / "p.jsonl", [{"key": k, "boxes": padded(b)} for k, b in records.items()])

    doc = evaluate.main(["--predictions", str(preds), "--annotations", str(FOPA_CSV), "--out", str(tmp_path / "o"),
                         "--no-progress"])
    m = doc["metrics"]
    # 35 samples, 133 positive + 143 negative = 276 labelled boxes
    assert (m["num_samples"], m["num_positives"], m["num_negatives"]) == (35, 133, 143)
    # n=10: hit positives 6 (fg160915), hit negatives 1 (fg159573)
    assert m["tpr@10"] == pytest.approx(6 / 133) and m["fpr@10"] == pytest.approx(1 / 143)
    assert m["tpr_shared@10"] == pytest.approx(6 / 276) and m["fpr_shared@10"] == pytest.approx(1 / 276)
    # matched predictions at n=10: 6 positive + 1 negative (the 11 FAR boxes match nothing) -> 6/7
    assert m["precision@10"] == pytest.approx(6 / 7)
    # n>=20: the half box adds a positive -> 7/133, 7/276, precision 7/8; negatives unchanged
    for n in range(20, 101, 10):
        assert m[f"tpr@{n}"] == pytest.approx(7 / 133) and m[f"fpr@{n}"] == pytest.approx(1 / 143)
        assert m[f"tpr_shared@{n}"] == pytest.approx(7 / 276) and m[f"precision@{n}"] == pytest.approx(7 / 8)
    # predictions per n: n for each of the 35 samples
    assert m["num_predictions@10"] == 350 and m["num_predictions@100"] == 3500
    written = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert written["curves"]["tpr"][1] == pytest.approx(7 / 133) and written["iou_threshold"] == 0.5
    assert written["curves"]["fpr_shared"][0] == pytest.approx(1 / 276)
    assert (tmp_path / "o" / "tpr_fpr.png").stat().st_size > 1000
    assert not (tmp_path / "o" / "predictions.jsonl").exists()    # predictions mode does not rewrite them


def test_cli_predictions_mode_subprocess_and_key_errors(tmp_path):
    samples = load_annotations(FOPA_CSV)
    good = _write_jsonl(tmp_path / "good.jsonl", [{"key": s["key"], "boxes": padded(s["negatives"])} for s in samples])
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--predictions", str(good),
                           "--annotations", str(FOPA_CSV), "--out", str(out), "--no-progress", "--name", "negs"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["method"] == "negs" and doc["metrics"]["fpr@100"] == 1.0 and (out / "tpr_fpr.png").is_file()

    # a missing key is an error naming it; extra keys are reported and ignored
    partial = _write_jsonl(tmp_path / "partial.jsonl", [{"key": s["key"], "boxes": padded([])} for s in samples[1:]]
                           + [{"key": "opa-1-nope", "boxes": [FAR]}])
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--predictions", str(partial),
                           "--annotations", str(FOPA_CSV), "--out", str(tmp_path / "x"), "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0 and samples[0]["key"] in proc.stderr and "--allow-missing" in proc.stderr
    doc = evaluate.main(["--predictions", str(partial), "--annotations", str(FOPA_CSV), "--allow-missing",
                         "--out", str(tmp_path / "y"), "--no-progress"])
    assert doc["keys"]["missing_keys"] == 1 and doc["keys"]["extra_keys"] == 1
    assert doc["metrics"]["num_samples"] == 35 and doc["metrics"]["tpr@100"] == 0.0

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "a", "boxes": [[1, 2, 3]]}\n')
    with pytest.raises(EvaluationError, match="bad.jsonl:1"):
        read_predictions(bad)


@pytest.fixture(scope="module")
def toy_shards(tmp_path_factory):
    from datamodules.toy import write_toy_split

    out = tmp_path_factory.mktemp("toy") / "toy-opa"
    write_toy_split(out, "toy-opa", "test", num_samples=6, seed=0, num_shards=2, progress=False)
    write_toy_split(out, "toy-opa", "train", num_samples=40, seed=0, num_shards=2, progress=False)
    return out


@pytest.fixture(scope="module")
def toy_opa_400(tmp_path_factory):
    from datamodules.toy import write_toy_split

    out = tmp_path_factory.mktemp("toy400") / "toy-opa"
    write_toy_split(out, "toy-opa", "train", 300, seed=3, num_shards=2, progress=False)
    write_toy_split(out, "toy-opa", "test", 100, seed=3, num_shards=2, progress=False)
    return out


def test_plausible_rates_pool_boxes_per_class():
    """Generic per-class aggregation: every box of a class counts once, classes sorted, missing keys skipped."""
    samples = [{"key": k, "category": c, "width": 10, "height": 20, "meta": {"m": k}, "positives": [], "negatives": []}
               for k, c in (("a", "zebra"), ("b", "ant"), ("c", "zebra"), ("d", "ant"))]
    preds = {"a": np.array([[0, 0, 4, 4], [6, 0, 9, 4]], float), "b": np.array([[1, 0, 2, 20]], float),
             "c": np.array([[0, 0, 5, 10]], float)}
    seen = []

    def left_half(meta, category, boxes_norm):      # accepts boxes ending in the left half of the image
        seen.append((meta["m"], category, boxes_norm.tolist()))
        return boxes_norm[:, 2] <= 0.5

    rates = plausible_rates(samples, preds, left_half)
    assert list(rates) == ["all", "ant", "zebra"]
    assert rates == {"all": 3 / 4, "ant": 1.0, "zebra": 2 / 3}
    assert seen[0] == ("a", "zebra", [[0.0, 0.0, 0.4, 0.2], [0.6, 0.0, 0.9, 0.2]])   # normalised by (w, h)
    assert [m for m, _, _ in seen] == ["a", "b", "c"]                                   # "d": no predictions


def test_blind_baseline_draws_training_positives_of_the_class(toy_opa_400):
    train = load_annotations(toy_opa_400, "train")
    test = load_annotations(toy_opa_400, "test")
    preds = baseline_predictions(test, "blind", 50, seed=0, train=train)
    again = baseline_predictions(test, "blind", 50, seed=0, train=train)
    assert all(np.array_equal(preds[k], again[k]) for k in preds)                     # seeded
    pools = defaultdict(set)
    for s in train:
        for b in s["positives"]:
            pools[s["category"]].add(tuple(np.round(np.asarray(b) / 64, 9)))
    for s in test:
        assert preds[s["key"]].shape == (50, 4)
        assert {tuple(np.round(b / 64, 9)) for b in preds[s["key"]]} <= pools[s["category"]]
    # A box from another scene rarely fits this one; uniform boxes almost never do (toy oracle).
    oracle = annotation_kind(toy_opa_400, "test").plausible
    blind = plausible_rates(test, preds, oracle)
    uniform = plausible_rates(test, baseline_predictions(test, "random", 50, seed=0), oracle)
    assert 0.1 < blind["all"] <= 0.45 and uniform["all"] < 0.1, (blind, uniform)
    assert set(blind) == {"all", "bird", "car", "lamp", "person"}
    with pytest.raises(EvaluationError, match="no training positive of class 'car'"):
        baseline_predictions(test, "blind", 5, seed=0, train=[s for s in train if s["category"] != "car"])


def test_plausible_rate_only_for_kinds_with_an_oracle(tmp_path):
    """Annotation files (OPA/FOPA) have no data kind: no plausible rate, nothing toy-specific runs."""
    assert annotation_kind(FOPA_CSV, "test").plausible is None
    doc = evaluate.main(["--baseline", "random", "--annotations", str(FOPA_CSV), "--out", str(tmp_path / "r"),
                         "--no-progress"])
    assert "plausible_rate" not in doc
    with pytest.raises(SystemExit) as exit_info:                 # blind needs a shard folder's train split
        evaluate.main(["--baseline", "blind", "--annotations", str(FOPA_CSV), "--out", str(tmp_path / "b")])
    assert exit_info.value.code == 2


def test_the_library_writes_what_the_command_line_writes(toy_shards, tmp_path):
    """`metrics.evaluation.evaluate` (what recipes and benchmarks call) is evaluate.py without argparse:
    same predictions, same metrics.json (but the seconds), same plot."""
    cli = evaluate.main(["--baseline", "random_gt_size", "--annotations", str(toy_shards), "--split", "test",
                         "--seed", "3", "--num-samples", "20", "--no-progress", "--out", str(tmp_path / "cli")])
    lib = evaluate_method(toy_shards, tmp_path / "lib", split="test", baseline="random_gt_size",
                          sampling=Sampling(num_samples=20, seed=3), progress=False)
    assert {**cli, "seconds": 0} == {**lib, "seconds": 0} and lib["ns"] == [10, 20]
    assert (tmp_path / "cli" / "predictions.jsonl").read_text() == (tmp_path / "lib" / "predictions.jsonl").read_text()
    assert (tmp_path / "lib" / "tpr_fpr.png").is_file()
    with pytest.raises(EvaluationError, match="exactly one of"):
        evaluate_method(toy_shards, tmp_path / "x", split="test", baseline="random", predictions=tmp_path / "p.jsonl")


def test_baselines_are_seeded_and_valid_and_plot_mode(toy_shards, tmp_path):
    docs = {}
    for kind in ("random", "random_gt_size", "blind"):
        args = ["--baseline", kind, "--annotations", str(toy_shards), "--split", "test", "--seed", "1",
                "--no-progress"]
        docs[kind] = evaluate.main(args + ["--out", str(tmp_path / kind)])
        again = evaluate.main(args + ["--out", str(tmp_path / f"{kind}2")])
        assert (tmp_path / kind / "predictions.jsonl").read_text() == (tmp_path / f"{kind}2" / "predictions.jsonl").read_text()
        assert docs[kind]["metrics"] == again["metrics"] and docs[kind]["sampling"]["seed"] == 1
        assert 0.0 <= docs[kind]["plausible_rate"] <= 1.0
    samples = {s["key"]: s for s in load_annotations(toy_shards, "test")}
    preds = read_predictions(tmp_path / "random_gt_size" / "predictions.jsonl")
    for key, boxes in preds.items():
        s = samples[key]
        assert boxes.shape == (100, 4)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= s["width"]).all() and (boxes[:, 3] <= s["height"]).all()
        gt = torch.tensor(s["positives"] + s["negatives"], dtype=torch.float64)
        sizes = {tuple(v) for v in (gt[:, 2:] - gt[:, :2]).numpy().round(6).tolist()}
        assert {tuple(v) for v in (boxes[:, 2:] - boxes[:, :2]).round(6).tolist()} <= sizes
    assert docs["blind"]["train_split"] == "train" and set(docs["blind"]["plausible_rate_per_class"]) <= {
        "bird", "car", "lamp", "person"}
    rnd = read_predictions(tmp_path / "random" / "predictions.jsonl")
    assert all((b[:, 0] < b[:, 2]).all() and (b[:, 1] < b[:, 3]).all() for b in rnd.values())

    fig = tmp_path / "both.png"
    evaluate.main(["--plot", str(tmp_path / "random" / "metrics.json"),
                   str(tmp_path / "random_gt_size" / "metrics.json"), "--out", str(fig)])
    assert fig.stat().st_size > 1000
    with pytest.raises(EvaluationError, match="not a metrics.json"):
        evaluate.main(["--plot", str(tmp_path / "random" / "predictions.jsonl"), "--out", str(fig)])


def test_checkpoint_mode_matches_rescoring_its_predictions(toy_shards, tmp_path):
    from genloc import LocationModel, LocationModelConfig

    torch.manual_seed(0)
    cfg = LocationModelConfig.preset("tiny", num_bins=32)
    model = LocationModel(cfg)
    ckpt = tmp_path / "tiny.ckpt"
    save_model_checkpoint(model, ckpt)
    args = ["--model", str(ckpt), "--data", str(toy_shards), "--split", "test", "--batch-size", "4",
            "--temperature", "0.9", "--top-k", "20", "--seed", "5", "--device", "cpu", "--no-progress"]
    doc = evaluate.main(args + ["--out", str(tmp_path / "ck")])
    assert doc["sampling"] == {"num_samples": 100, "temperature": 0.9, "top_k": 20, "top_p": None, "seed": 5,
                               "batch_size": 4, "bf16": False}
    assert doc["metrics"]["num_samples"] == 6 and 0.0 <= doc["plausible_rate"] <= 1.0
    preds = read_predictions(tmp_path / "ck" / "predictions.jsonl")
    assert len(preds) == 6 and all(b.shape == (100, 4) for b in preds.values())
    again = evaluate.main(args + ["--out", str(tmp_path / "ck2")])
    assert again["metrics"] == doc["metrics"]                      # seeded
    rescored = evaluate.main(["--predictions", str(tmp_path / "ck" / "predictions.jsonl"), "--annotations",
                              str(toy_shards), "--split", "test", "--out", str(tmp_path / "re"), "--no-progress"])
    assert rescored["metrics"] == doc["metrics"] and rescored["plausible_rate"] == doc["plausible_rate"]
