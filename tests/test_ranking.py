"""The ranking metric (pairwise accuracy, ROC-AUC) against independent computations; the TPR-FPR
callback's val/pair_acc and val/rank_auc against evaluate.py's ranking block; re-ranking."""
import json

import numpy as np
import pytest
import torch

import evaluate
from metrics.predictions import blind_scores
from metrics.ranking import RankingMetric, pair_wins, ranking_metrics
from metrics.sampling import Sampling
from metrics.scoring import box_scores, rerank
from genloc.checkpoint import save_model_checkpoint
from tests.helpers.batches import tiny_module


def _groups(seed=0, num=40):
    """Random groups over 3 classes; scores on a coarse grid so that ties occur, some groups one-sided."""
    rng = np.random.default_rng(seed)
    groups = []
    for i in range(num):
        pos = rng.integers(0, 6, rng.integers(0, 4)) / 2.0
        neg = rng.integers(0, 6, rng.integers(0, 5)) / 2.0 - (i % 3) * 0.5
        groups.append((["cup", "dog", "car"][i % 3], pos, neg))
    groups.append(("dog", np.array([-np.inf, 1.0]), np.array([-np.inf])))
    return groups


def _brute_pairs(pairs):
    """Wins (ties 1/2) over explicit (positive, negative) score pairs, one at a time."""
    return sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs)


def _roc_area(pos, neg):
    """ROC-AUC as the trapezoidal area under the (FPR, TPR) curve swept over every threshold, a
    different algorithm from counting pairs (what sklearn's roc_auc_score does)."""
    thresholds = sorted(set(pos) | set(neg), reverse=True)
    tpr = [0.0] + [sum(p >= t for p in pos) / len(pos) for t in thresholds]
    fpr = [0.0] + [sum(q >= t for q in neg) / len(neg) for t in thresholds]
    return sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(tpr) - 1))


def test_ranking_metrics_equal_independent_computations():
    groups = _groups()
    got = ranking_metrics(groups)
    for name, part in [("all", groups)] + [(c, [g for g in groups if g[0] == c]) for c in ("car", "cup", "dog")]:
        want = got if name == "all" else got["per_class"][name]
        within = [(p, q) for _, pos, neg in part for p in pos for q in neg]
        pos = [p for _, ps, _ in part for p in ps]
        neg = [q for _, _, qs in part for q in qs]
        assert want["pair_acc"] == pytest.approx(_brute_pairs(within) / len(within), abs=1e-9)
        assert want["num_pairs"] == len(within)
        finite_pos, finite_neg = [p for p in pos if np.isfinite(p)], [q for q in neg if np.isfinite(q)]
        if len(finite_pos) == len(pos) and len(finite_neg) == len(neg):
            assert want["rank_auc"] == pytest.approx(_roc_area(pos, neg), abs=1e-9)
        assert want["rank_auc"] == pytest.approx(_brute_pairs([(p, q) for p in pos for q in neg]) / (len(pos) * len(neg)),
                                                 abs=1e-9)
    assert got["num_groups"] == sum(1 for _, p, q in groups if len(p) and len(q))
    assert 0.0 < got["pair_acc"] < 1.0 and got["rank_auc"] != got["pair_acc"]


def test_undefined_and_bad_scores():
    empty = ranking_metrics([("cup", np.array([1.0]), np.array([]))])
    assert empty["pair_acc"] is None and empty["rank_auc"] is None and empty["num_pairs"] == 0
    with pytest.raises(ValueError, match="NaN at index 1"):
        pair_wins([0.0, float("nan")], [1.0])
    assert pair_wins([2.0, 1.0], [1.0, 1.0, 3.0]) == 2 + 2 * 0.5   # 2.0 beats both 1.0s; 1.0 ties them


def test_metric_class_equals_the_function_whatever_the_batches():
    groups = _groups(1)
    metric = RankingMetric()
    for i in range(0, len(groups), 7):
        part = groups[i:i + 7]
        metric.update([torch.as_tensor(p) for _, p, _ in part], [torch.as_tensor(q) for _, _, q in part])
    got, want = metric.compute(), ranking_metrics(groups)
    assert got["pair_acc"] == pytest.approx(want["pair_acc"], abs=1e-12)
    assert got["rank_auc"] == pytest.approx(want["rank_auc"], abs=1e-12)


def _toy_loader(data_root, batch_size=4):
    from datamodules.pipeline import EpochLoader, ShardStream

    return EpochLoader(ShardStream(data_root / "toy-opa", "val", image_size=64, batch_size=batch_size, train=False))


def test_callback_ranking_equals_evaluate(tmp_path, tiny_toy_data):
    import lightning as L

    from callbacks.tpr_fpr import TprFprCallback

    module = tiny_module()
    logged = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                       enable_model_summary=False, enable_checkpointing=False,
                       callbacks=[TprFprCallback(num_samples=10, max_eval_samples=None)]).validate(
        module, dataloaders=_toy_loader(tiny_toy_data), verbose=False)[0]
    save_model_checkpoint(module.model, tmp_path / "m.ckpt")
    doc = evaluate.main(["--model", str(tmp_path / "m.ckpt"), "--data", str(tiny_toy_data / "toy-opa"),
                         "--split", "val", "--num-samples", "10", "--batch-size", "3", "--device", "cpu",
                         "--out", str(tmp_path / "ev"), "--no-progress"])
    ranking = doc["ranking"]
    assert ranking["num_groups"] == 8 and ranking["num_pairs"] > 0
    assert logged["val/pair_acc"] == pytest.approx(ranking["pair_acc"], abs=1e-6)   # logged as float32
    assert logged["val/rank_auc"] == pytest.approx(ranking["rank_auc"], abs=1e-6)
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["ranking"] == ranking
    classes = {c for b in _toy_loader(tiny_toy_data) for c in b["category"]}
    assert set(ranking["per_class"]) == classes
    assert sum(c["num_pairs"] for c in ranking["per_class"].values()) == ranking["num_pairs"]


def test_rerank_keeps_the_top_k_by_score_and_evaluates_them(tmp_path, tiny_toy_data):
    module = tiny_module()
    model = module.model.eval()
    save_model_checkpoint(model, tmp_path / "m.ckpt")
    data = tiny_toy_data / "toy-opa"
    rng = np.random.default_rng(0)
    batches = list(_toy_loader(tiny_toy_data, batch_size=8))
    proposals = {}
    for b in batches:
        for key, (w, h) in zip(b["key"], b["size"].tolist()):
            xs, ys = np.sort(rng.uniform(0, w, (30, 2)), 1), np.sort(rng.uniform(0, h, (30, 2)), 1)
            boxes = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1)
            boxes[3] = [-50, 0, 10, 10]          # outside the image: ranks last
            proposals[key] = boxes
    kept, unscorable = rerank(model, data, "val", proposals, 5, Sampling(device="cpu"), progress=False)
    assert unscorable == len(proposals) and set(kept) == set(proposals)
    for b in batches:   # each sample scored on its own, one box at a time
        for i, key in enumerate(b["key"]):
            w, h = b["size"][i].tolist()
            scores = [float(box_scores(model, b["image"][i:i + 1], [b["category"][i]],
                                       [torch.tensor(box / [w, h, w, h]).float()[None]])[0])
                      if j != 3 else -np.inf for j, box in enumerate(proposals[key])]
            rows = [list(map(tuple, proposals[key])).index(tuple(r)) for r in kept[key]]
            assert [scores[j] for j in rows] == pytest.approx(sorted(scores, reverse=True)[:5], abs=1e-5)
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"key": k, "boxes": v.tolist()}) + "\n" for k, v in proposals.items()))
    doc = evaluate.main(["--predictions", str(preds), "--data", str(data), "--split", "val", "--rerank",
                         str(tmp_path / "m.ckpt"), "--keep", "5", "--device", "cpu", "--out", str(tmp_path / "rr"),
                         "--no-progress"])
    assert doc["rerank"]["keep"] == 5 and doc["rerank"]["unscorable_proposals"] == len(proposals)
    assert doc["ns"] == [5] and doc["ranking"]["num_pairs"] > 0
    top = tmp_path / "top.jsonl"
    top.write_text("".join(json.dumps({"key": k, "boxes": v.tolist()}) + "\n" for k, v in kept.items()))
    plain = evaluate.main(["--predictions", str(top), "--annotations", str(data), "--split", "val", "--ns", "5",
                           "--out", str(tmp_path / "top"), "--no-progress"])
    assert doc["metrics"] == plain["metrics"]


@pytest.mark.parametrize("argv, message", [
    (["--rerank", "m"], "--rerank MODEL and --keep K go together"),
    (["--keep", "3"], "--rerank MODEL and --keep K go together"),
    (["--rerank", "m", "--keep", "0"], "--keep must be >= 1"),
    (["--rerank", "m", "--keep", "5", "--ns", "10"], "--keep is 5"),
])
def test_rerank_arguments(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as err:
        evaluate.main(["--predictions", "p.jsonl", "--annotations", str(tmp_path)] + argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_blind_scores_are_the_class_box_density():
    train = [{"key": "t0", "category": "cup", "width": 100, "height": 50, "positives": [[10, 10, 30, 20]],
              "negatives": []},
             {"key": "t1", "category": "cup", "width": 200, "height": 100, "positives": [[24, 20, 56, 44]],
              "negatives": []}]
    samples = [{"key": "s", "category": "cup", "width": 400, "height": 200,
                "positives": [[40, 40, 120, 80]], "negatives": [[300, 120, 390, 190], [40, 40, 120, 80]]}]
    (category, pos, neg), = blind_scores(samples, train)
    assert category == "cup" and pos[0] == neg[1] and pos[0] > neg[0]     # image-blind: the same box, the same score
    assert ranking_metrics([(category, pos, neg)])["pair_acc"] == 0.75


def test_rank_report_runs_on_a_recipe_folder(tmp_path, tiny_toy_data):
    """scripts.rank_report on a folder laid out as `make train` leaves it (two tiny checkpoints, the
    recipe's random and blind proposal files): its numbers are evaluate.py's."""
    from metrics.evaluation import evaluate as evaluate_method
    from scripts import rank_report

    data = tiny_toy_data / "toy-opa"
    runs = tmp_path / "runs"
    stages = {}
    for i, stage in enumerate(("toy_finetune", "toy_dpo")):
        torch.manual_seed(i)
        module = tiny_module()
        save_model_checkpoint(module.model, runs / stage / "default" / "checkpoints" / "last.ckpt")
        stages[stage] = {"run_dir": str(runs / stage / "default")}
    (runs / "toy_results").mkdir(parents=True)
    (runs / "toy_results" / "results.json").write_text(json.dumps({"stages": stages}))
    for baseline in ("random", "blind"):
        evaluate_method(data, runs / "toy_results" / baseline, split="val", baseline=baseline,
                        sampling=Sampling(num_samples=20, device="cpu"), progress=False)
    assert rank_report.main(["--runs", str(runs), "--data", str(data), "--keep", "5"]) == 0
    doc = json.loads((runs / "toy_results" / "ranking" / "ranking.json").read_text())
    dpo = evaluate.main(["--model", stages["toy_dpo"]["run_dir"] + "/checkpoints/last.ckpt", "--data", str(data),
                         "--split", "val", "--num-samples", "5", "--device", "cpu", "--out", str(tmp_path / "d"),
                         "--no-progress"])
    assert doc["ranking"]["DPO (toy_dpo)"] == dpo["ranking"]
    blind = json.loads((runs / "toy_results" / "blind" / "metrics.json").read_text())
    assert doc["ranking"]["image-blind (class box density)"] == blind["ranking"]
    assert set(doc["reranking"]) == {"random", "blind"} and "| random proposals | raw |" in (
        runs / "toy_results" / "ranking" / "ranking.md").read_text()
    assert rank_report.main(["--runs", str(tmp_path / "nothing"), "--data", str(data)]) == 2
