"""Time evaluate.py's predictions mode on the full OPA training label set (62,074 labelled boxes,
shipped in benchmarks/data/ with its licence; the test labels are not public) with 100 random
predictions per sample.

    python -m benchmarks.eval_speed [--labels PATH] [--num-samples 100] [--threads 2]

Prints the end-to-end time of ``evaluate.py --predictions ... --annotations ...`` (parse labels and
predictions, score, write metrics.json and the PNG) and the time of each phase. Target: < 60 s on
2 CPU cores. The last line is ``RESULT {json}`` for benchmarks/run_all.py.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from metrics.annotations import load_annotations
from metrics.evaluation import evaluate, score
from metrics.predictions import baseline_predictions, read_predictions, write_predictions

DEFAULT_LABELS = Path(__file__).resolve().parent / "data" / "fopa_train_data_pair.csv"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labels", default=DEFAULT_LABELS, help="FOPA *_data_pair.csv / *_pair_new.json or raw OPA csv")
    p.add_argument("--num-samples", type=int, default=100, help="random predictions per sample")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target is for 2 cores)")
    args = p.parse_args(argv)
    if not Path(args.labels).is_file():
        p.error(f"--labels {args.labels}: no such file (the default ships in benchmarks/data/)")
    torch.set_num_threads(args.threads)

    t = time.perf_counter()
    samples = load_annotations(args.labels)
    t_labels = time.perf_counter() - t
    boxes = sum(len(s["positives"]) + len(s["negatives"]) for s in samples)
    preds = baseline_predictions(samples, "random_gt_size", args.num_samples, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        pred_file = Path(tmp) / "predictions.jsonl"
        write_predictions(pred_file, preds)
        t = time.perf_counter()
        read = read_predictions(pred_file)
        t_read = time.perf_counter() - t
        t = time.perf_counter()
        score(read, samples, progress=False)
        t_score = time.perf_counter() - t
        t = time.perf_counter()
        doc = evaluate(args.labels, Path(tmp) / "out", predictions=pred_file, progress=False)
        t_total = time.perf_counter() - t
    m = doc["metrics"]
    print(f"labels: {args.labels}")
    print(f"{len(samples)} samples, {boxes} labelled boxes ({m['num_positives']} pos / {m['num_negatives']} neg), "
          f"{args.num_samples} predictions each, {args.threads} torch threads")
    print(f"phases: parse labels {t_labels:.2f} s, read predictions {t_read:.2f} s, score {t_score:.2f} s")
    print(f"evaluate.py predictions mode end to end: {t_total:.2f} s (target < 60 s)")
    print(f"random_gt_size @100: TPR {m['tpr@100']:.4f} FPR {m['fpr@100']:.4f} "
          f"(shared {m['tpr_shared@100']:.4f} / {m['fpr_shared@100']:.4f})")
    print("RESULT " + json.dumps({"seconds": t_total, "samples": len(samples), "boxes": boxes}))


if __name__ == "__main__":
    main()
