"""MLE vs DPO side by side on toy scenes: same data, same sampling budget, same seed.

    python -m scripts.compare_mle_dpo --mle runs/toy_finetune/default/checkpoints/last.ckpt \
        --dpo runs/toy_dpo/default/checkpoints/last.ckpt --data data/toy/toy-opa --split val

Per model (through evaluate.py's checkpoint mode): N boxes per evaluation sample (default 100), the oracle's implausible and plausible
rates (the data kind's plausibility oracle, toy scenes: `meta["scene"]`), TPR/FPR at n = N
(`metrics.tpr_fpr.TPRFPR`, separate denominators) and the TPR of both models at one matched FPR:
the smaller of the two FPR@N, where each curve (points n = 10..N, plus the origin) is linearly
interpolated. The image-blind baseline's plausible rate (random training positives of the same
class, evaluate.py's `--baseline blind`) is printed beside them. Prints one table and writes everything to a JSON file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from genloc.arguments import text, whole  # noqa: E402
from genloc.files import write_atomic  # noqa: E402


def model_rates(checkpoint: str, data: str, split: str, num_samples: int, seed: int, batch_size: int,
                device: str, out_dir: Path) -> dict:
    """evaluate.py's checkpoint mode (same sampler, scoring and oracle), plus the implausible rate."""
    from metrics.evaluation import evaluate
    from metrics.sampling import Sampling

    sampling = Sampling(num_samples=num_samples, seed=seed, batch_size=batch_size, device=device)
    doc = evaluate(data, out_dir, split=split, checkpoint=checkpoint, sampling=sampling, progress=False)
    return {"num_eval_samples": doc["counts"]["num_samples"], "plausible_rate": doc["plausible_rate"],
            "implausible_rate": 1 - doc["plausible_rate"], "curves": doc["curves"]}


def tpr_at_fpr(curves: dict, fpr: float) -> float:
    """TPR of the curve (origin + its points, sorted by FPR) linearly interpolated at `fpr`."""
    xs = np.array([0.0] + curves["fpr"])
    ys = np.array([0.0] + curves["tpr"])
    order = np.argsort(xs, kind="stable")
    return float(np.interp(fpr, xs[order], ys[order]))


def blind_rate(data: str, split: str, num_samples: int, seed: int, out_dir: Path) -> float:
    from metrics.evaluation import evaluate
    from metrics.sampling import Sampling

    doc = evaluate(data, out_dir, split=split, baseline="blind", sampling=Sampling(num_samples=num_samples, seed=seed),
                   progress=False)
    return doc["plausible_rate"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mle", type=text, required=True, help="MLE model (the DPO reference): checkpoint, model folder or Hub id")
    parser.add_argument("--dpo", type=text, required=True, help="DPO model: checkpoint, model folder or Hub id")
    parser.add_argument("--data", type=text, default="data/toy/toy-opa", help="toy shard folder (needs meta.scene)")
    parser.add_argument("--split", type=text, default="val")
    parser.add_argument("--num-samples", type=whole(1), default=100, help="boxes sampled per evaluation sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=whole(1), default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=text, default=None, help="JSON path (default: next to the DPO run, "
                                                    "<run>/compare_mle_dpo_<split>.json)")
    args = parser.parse_args(argv)
    from genloc.hub import is_model_source

    for flag, source in (("--mle", args.mle), ("--dpo", args.dpo)):
        if not is_model_source(source):
            parser.error(f"{flag} {source!r} not found: give a checkpoint, a model folder or a Hub id (owner/name)")
    if args.out is None and not Path(args.dpo).is_file():
        parser.error("--out is needed when --dpo is a model folder or Hub id (the default lies beside a checkpoint's run)")

    from metrics.annotations import EvaluationError

    out = Path(args.out) if args.out else Path(args.dpo).resolve().parent.parent / f"compare_mle_dpo_{args.split}.json"
    rows = {}
    try:
        for name, path in (("mle", args.mle), ("dpo", args.dpo)):
            rows[name] = model_rates(path, args.data, args.split, args.num_samples, args.seed, args.batch_size,
                                     args.device, out.with_suffix("") / name)
        blind = blind_rate(args.data, args.split, args.num_samples, args.seed, out.with_suffix("") / "blind")
    except EvaluationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    matched = min(rows["mle"]["curves"]["fpr"][-1], rows["dpo"]["curves"]["fpr"][-1])
    for row in rows.values():
        row["tpr_at_matched_fpr"] = tpr_at_fpr(row["curves"], matched)

    n = args.num_samples
    print(f"{args.split} of {args.data}: {rows['mle']['num_eval_samples']} samples x {n} boxes, seed {args.seed}")
    header = f"{'model':<6} {'implausible':>11} {'plausible':>9} {'TPR@' + str(n):>8} {'FPR@' + str(n):>8} " \
             f"{'TPR@FPR=' + format(matched, '.3f'):>14} {'prec@' + str(n):>9}"
    print(header)
    for name, row in rows.items():
        c = row["curves"]
        print(f"{name:<6} {row['implausible_rate']:>11.4f} {row['plausible_rate']:>9.4f} {c['tpr'][-1]:>8.4f} "
              f"{c['fpr'][-1]:>8.4f} {row['tpr_at_matched_fpr']:>14.4f} {c['precision'][-1]:>9.4f}")
    print(f"image-blind baseline plausible rate: {blind:.4f}")

    write_atomic(out, json.dumps({"args": vars(args), "matched_fpr": matched, "blind_plausible_rate": blind,
                                  **rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
