"""Ranking and re-ranking on the toy scenes, from a finished `make train` run (docs/design/evaluation.md#ranking).

    python -m scripts.rank_report                          # runs/ of `make train`
    python -m scripts.rank_report --runs /tmp/runs --keep 10

Reads ``<runs>/toy_results/results.json`` (the recipe's stage run folders) and the proposals the
recipe's evaluation wrote (``random/`` and ``blind/predictions.jsonl``, 100 boxes per val image),
then reports on toy-opa val:

- ranking of the labelled boxes (pairwise accuracy within each sample, ROC-AUC, per class): the
  MLE model (toy_finetune), the DPO model (toy_dpo) and the image-blind baseline (its class's box
  density, `metrics.predictions.blind_scores`);
- TPR-FPR@K of the uniform random and the image-blind proposals as drawn (their first K) and
  re-ranked by the DPO model (its top K of 100, ``evaluate.py --rerank``).

Writes ``<runs>/toy_results/ranking/{ranking.md, ranking.json}`` (and the re-ranked evaluations
beside them) and prints the tables. No randomness: the proposals are the recipe's files.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _table(header: list[str], rows: list[list]) -> str:
    cell = lambda v: "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def report(runs: Path, data: Path, split: str, keep: int) -> dict:
    from metrics.annotations import EvaluationError, load_annotations
    from metrics.evaluation import evaluate
    from metrics.predictions import blind_scores
    from metrics.ranking import ranking_metrics
    from metrics.sampling import Sampling, evaluation_model
    from metrics.scoring import split_ranking

    results_file = runs / "toy_results" / "results.json"
    if not results_file.is_file():
        raise EvaluationError(f"{results_file} not found: run `make train` (or scripts.toy_recipe log_root={runs}) first")
    stages = json.loads(results_file.read_text())["stages"]
    ckpt = {name: Path(stages[name]["run_dir"]) / "checkpoints" / "last.ckpt" for name in ("toy_finetune", "toy_dpo")}
    sampling = Sampling(device="cpu")
    out = runs / "toy_results" / "ranking"
    ranking = {
        "MLE (toy_finetune)": split_ranking(evaluation_model(ckpt["toy_finetune"], "cpu"), data, split, sampling, False),
        "DPO (toy_dpo)": split_ranking(evaluation_model(ckpt["toy_dpo"], "cpu"), data, split, sampling, False),
        "image-blind (class box density)": ranking_metrics(blind_scores(load_annotations(data, split),
                                                                        load_annotations(data, "train"))),
    }
    reranking = {}
    for method in ("random", "blind"):
        proposals = runs / "toy_results" / method / "predictions.jsonl"
        if not proposals.is_file():
            raise EvaluationError(f"{proposals} not found: the recipe's evaluation writes it (re-run `make train`)")
        common = dict(split=split, predictions=proposals, ns=[keep], progress=False, sampling=sampling)
        raw = evaluate(data, out / f"{method}_raw", name=f"{method} (first {keep})", **common)
        ranked = evaluate(data, out / f"{method}_reranked", name=f"{method} re-ranked by DPO (top {keep})",
                          rerank=ckpt["toy_dpo"], keep=keep, **common)
        reranking[method] = {kind: {k: doc["metrics"][f"{k}@{keep}"] for k in ("tpr", "fpr", "precision")}
                             for kind, doc in (("raw", raw), ("reranked", ranked))}
    return {"split": split, "keep": keep, "ranking": ranking, "reranking": reranking,
            "checkpoints": {k: str(v) for k, v in ckpt.items()}}


def markdown(doc: dict) -> str:
    classes = sorted({c for r in doc["ranking"].values() for c in r["per_class"]})
    rows = [[name, r["pair_acc"], r["rank_auc"], r["num_pairs"]] + [r["per_class"].get(c, {}).get("pair_acc")
                                                                    for c in classes]
            for name, r in doc["ranking"].items()]
    k = doc["keep"]
    rerank_rows = [[f"{method} proposals", kind if kind == "raw" else "re-ranked by DPO", v["tpr"], v["fpr"], v["precision"]]
                   for method, kinds in doc["reranking"].items() for kind, v in kinds.items()]
    return (f"Ranking of the labelled boxes of toy-opa {doc['split']}:\n\n"
            + _table(["scorer", "pair_acc", "rank_auc", "pairs"] + [f"pair_acc {c}" for c in classes], rows)
            + f"\n\nTPR-FPR@{k} of 100 proposals per image: their first {k} (raw) or the DPO model's top {k}:\n\n"
            + _table(["proposals", "order", f"TPR@{k}", f"FPR@{k}", f"precision@{k}"], rerank_rows))


def main(argv=None) -> int:
    from metrics.annotations import EvaluationError
    from genloc.files import write_atomic, write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs", help="log_root of the make train run (default: runs)")
    p.add_argument("--data", default="data/toy/toy-opa", help="toy-opa shard folder (default: data/toy/toy-opa)")
    p.add_argument("--split", default="val")
    p.add_argument("--keep", type=int, default=10, help="K: proposals kept per image (default 10)")
    args = p.parse_args(argv)
    if args.keep < 1 or args.keep > 100:
        p.error(f"--keep must be in 1..100 (the recipe writes 100 proposals per image), got {args.keep}")
    try:
        doc = report(Path(args.runs), Path(args.data), args.split, args.keep)
    except EvaluationError as e:
        print(f"rank_report: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.runs) / "toy_results" / "ranking"
    text = markdown(doc)
    write_json(out / "ranking.json", doc)
    write_atomic(out / "ranking.md", text + "\n")
    print(text + f"\n\nwrote {out / 'ranking.md'} and {out / 'ranking.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
