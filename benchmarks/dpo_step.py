"""DPO step time as a ratio of the MLE step time on the same batch, measured side by side.

    python -m benchmarks.dpo_step [--presets tiny paper] [--batch-size 16] [--iters 10] [--device cpu]

One training step = zero_grad, loss, backward, AdamW step over the trainable parameters (random
weights; `paper` shapes with `*_weights=None`). The MLE step scores each sample's positive (the
`chosen` box); the DPO step scores chosen and rejected under the policy (with gradients) and the
frozen reference. Steps of the three variants alternate so machine load affects them alike; the
median is reported. `dpo/naive` is the textbook implementation for comparison: the prefix repeated
for both boxes and the reference encoding the images again.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from genloc.checkpoint import save_model_checkpoint  # noqa: E402
from lightning_modules.dpo import DPOModule  # noqa: E402
from lightning_modules.dpo_loss import dpo_loss  # noqa: E402
from lightning_modules.mle import MLEModule  # noqa: E402
from genloc import LocationModelConfig  # noqa: E402

OPTIM = dict(lr=1e-5, weight_decay=0.01, betas=[0.9, 0.95], warmup_steps=1, min_lr_ratio=0.1)


def make_batch(size: int, image_size: int, seed: int = 0) -> dict:
    """Random images with random valid chosen/rejected boxes (positives = chosen)."""
    g = torch.Generator().manual_seed(seed)

    def boxes():
        lo = torch.rand(size, 2, generator=g) * 0.6
        return torch.cat([lo, lo + 0.1 + torch.rand(size, 2, generator=g) * 0.3], dim=1)

    chosen, rejected = boxes(), boxes()
    return {"image": torch.rand(size, 3, image_size, image_size, generator=g),
            "category": [("car", "bird", "lamp", "person")[i % 4] for i in range(size)],
            "positives": [c[None] for c in chosen], "negatives": [r[None] for r in rejected],
            "key": [f"bench-{i}" for i in range(size)], "chosen": chosen, "rejected": rejected}


def naive_dpo_loss(module: DPOModule, batch: dict) -> torch.Tensor:
    """Repeated prefix for chosen and rejected, separate reference encoder passes."""
    def scores(model):
        prefix = model.build_prefix(model.encode_images(batch["image"]), model.encode_texts(batch["category"]))
        tokens = model.tokenizer.encode(torch.cat([batch["chosen"], batch["rejected"]]).to(prefix.device))
        both = torch.arange(len(prefix), device=prefix.device).repeat(2)
        return model.box_log_probs(prefix[both], tokens).sum(-1).view(2, -1)

    policy = scores(module.model)
    with torch.no_grad():
        ref = scores(module._reference())
    return dpo_loss(policy[0], policy[1], ref[0], ref[1], module.hparams.beta)[0].mean()


def bench(preset: str, batch_size: int, iters: int, device: torch.device) -> dict[str, float]:
    config = LocationModelConfig.preset(preset, pretrained=False).to_dict()
    with tempfile.TemporaryDirectory() as tmp:
        mle = MLEModule(model_config=config, optim=OPTIM)
        ckpt = Path(tmp) / "mle.ckpt"
        save_model_checkpoint(mle.model, ckpt)
        dpo = DPOModule(optim=OPTIM, beta=0.1, reference=str(ckpt))
    mle.to(device).train()
    dpo.to(device).train()
    batch = make_batch(batch_size, config["image_size"])
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    variants = {
        "mle": (mle, lambda: mle.box_nll(batch)[0]),
        "dpo": (dpo, lambda: dpo.dpo_metrics(batch)["loss"]),
        "dpo/naive": (dpo, lambda: naive_dpo_loss(dpo, batch)),
    }
    optimisers = {name: torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
                  for name, (module, _) in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for step in range(iters + 2):  # two warm-up rounds
        for name, (_, loss_fn) in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            optimisers[name].zero_grad(set_to_none=True)
            loss_fn().backward()
            optimisers[name].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny"], choices=["tiny", "paper"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    print(f"{'preset':<7} {'batch':>5} {'device':<6} {'mle ms':>9} {'dpo ms':>9} {'dpo/mle':>8} "
          f"{'naive ms':>9} {'naive/mle':>9}")
    rows = []
    for preset in args.presets:
        t = bench(preset, args.batch_size, args.iters, device)
        rows.append({"preset": preset, "batch": args.batch_size, **t})
        print(f"{preset:<7} {args.batch_size:>5} {device.type:<6} {1e3 * t['mle']:>9.1f} {1e3 * t['dpo']:>9.1f} "
              f"{t['dpo'] / t['mle']:>8.2f} {1e3 * t['dpo/naive']:>9.1f} {t['dpo/naive'] / t['mle']:>9.2f}")
    print("RESULT " + json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
