"""MLE vs DPO side by side on toy scenes: same data, same sampling budget, same seed.

    python scripts/compare_mle_dpo.py --mle runs/toy_finetune/default/checkpoints/last.ckpt \
        --dpo runs/toy_dpo/default/checkpoints/last.ckpt --data data/toy/toy-opa --split val

Per model: N boxes per evaluation sample (default 100), the oracle's implausible and plausible
rates (`datamodules.toy.is_plausible` on the sample's `meta["scene"]`), TPR/FPR at n = N
(`metrics.tpr_fpr.TPRFPR`, separate denominators) and the TPR of both models at one matched FPR:
the smaller of the two FPR@N, where each curve (points n = 10..N, plus the origin) is linearly
interpolated. The image-blind baseline's plausible rate (random training positives of the same
class) is printed beside them. Prints one table and writes everything to a JSON file.
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def evaluate(model, data: str, split: str, num_samples: int, seed: int, batch_size: int,
             max_samples: int | None, device: torch.device) -> dict:
    """Sample `num_samples` boxes per sample of `split` and score them (oracle + TPR-FPR curve)."""
    from datamodules import ShardDataModule
    from datamodules.toy import is_plausible
    from metrics.tpr_fpr import DEFAULT_NS, TPRFPR, result_curves

    dm = ShardDataModule(data, image_size=model.cfg.image_size, batch_size=batch_size, num_workers=0,
                         flip_prob=0.0, train_split=None, val_split=split, test_split=None)
    dm.setup("validate")
    ns = [n for n in DEFAULT_NS if n < num_samples] + [num_samples]
    metric = TPRFPR(ns=ns).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    plausible = total = seen = 0
    model = model.to(device).eval()
    for batch in dm.val_dataloader():
        take = len(batch["category"]) if max_samples is None else min(len(batch["category"]), max_samples - seen)
        if take <= 0:
            break
        out = model.sample(batch["image"][:take].to(device), list(batch["category"][:take]), n=num_samples,
                           generator=generator)
        boxes = out.boxes_norm
        metric.update(boxes, [p.to(device) for p in batch["positives"][:take]],
                      [q.to(device) for q in batch["negatives"][:take]])
        for i in range(take):
            verdict = is_plausible(batch["meta"][i]["scene"], batch["category"][i], boxes[i].double().cpu().numpy())
            plausible += int(np.sum(verdict))
            total += len(verdict)
        seen += take
    curves = result_curves(metric.compute(), ns)
    return {"num_eval_samples": seen, "num_boxes": total, "plausible_rate": plausible / max(total, 1),
            "implausible_rate": 1 - plausible / max(total, 1), "curves": curves}


def tpr_at_fpr(curves: dict, fpr: float) -> float:
    """TPR of the curve (origin + its points, sorted by FPR) linearly interpolated at `fpr`."""
    xs = np.array([0.0] + curves["fpr"])
    ys = np.array([0.0] + curves["tpr"])
    order = np.argsort(xs, kind="stable")
    return float(np.interp(fpr, xs[order], ys[order]))


def blind_rate(data: str, split: str, num_samples: int, seed: int, max_samples: int | None) -> float:
    from datamodules.shards import iter_annotations
    from datamodules.toy import blind_baseline_rate

    evals = list(iter_annotations(data, split))[:max_samples]
    return blind_baseline_rate(iter_annotations(data, "train"), evals, n=num_samples, seed=seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mle", required=True, help="MLE checkpoint (the DPO reference)")
    parser.add_argument("--dpo", required=True, help="DPO checkpoint")
    parser.add_argument("--data", default="data/toy/toy-opa", help="toy shard folder (needs meta.scene)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--num-samples", type=int, default=100, help="boxes sampled per evaluation sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate only the first k samples")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON path (default: next to the DPO run, "
                                                    "<run>/compare_mle_dpo_<split>.json)")
    args = parser.parse_args(argv)

    from lightning_modules.checkpoint import CheckpointError, load_location_model

    device = torch.device(args.device)
    rows = {}
    try:
        for name, path in (("mle", args.mle), ("dpo", args.dpo)):
            rows[name] = evaluate(load_location_model(path), args.data, args.split, args.num_samples, args.seed,
                                  args.batch_size, args.max_samples, device)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    matched = min(rows["mle"]["curves"]["fpr"][-1], rows["dpo"]["curves"]["fpr"][-1])
    for row in rows.values():
        row["tpr_at_matched_fpr"] = tpr_at_fpr(row["curves"], matched)
    blind = blind_rate(args.data, args.split, args.num_samples, args.seed, args.max_samples)

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

    out = Path(args.out) if args.out else Path(args.dpo).resolve().parent.parent / f"compare_mle_dpo_{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "matched_fpr": matched, "blind_plausible_rate": blind,
                               **rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
