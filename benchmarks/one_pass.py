"""One decoder pass per training step (``module.one_pass=true``) vs the prefix pass plus the boxes' pass
on its KV cache (the default), side by side in one process: MLE steps with one box per image (PIPE)
and with several (OPA-like), and DPO steps (chosen + rejected per image). Same values either way
(tests/test_one_pass.py); this measures only the time. Rounds alternate the variants; medians.

    python -m benchmarks.one_pass [--batch-size 16] [--rounds 6] [--preset tiny] [--device cpu]

The last line is ``RESULT {json}``. On a GPU, ``benchmarks.gpu_check`` times the same switch at
paper scale.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.chip import several_boxes  # noqa: E402
from benchmarks.dpo_step import OPTIM, make_batch  # noqa: E402
from benchmarks.gpu_check import Trainee, seconds, to_device  # noqa: E402
from benchmarks.train_step import alternate  # noqa: E402
from genloc import LocationModelConfig  # noqa: E402
from genloc.checkpoint import save_model_checkpoint  # noqa: E402
from lightning_modules.dpo import DPOModule  # noqa: E402
from lightning_modules.mle import MLEModule  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--preset", default="tiny", choices=("tiny", "paper"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16-mixed"))
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.rounds < 1:
        p.error("--batch-size and --rounds must be >= 1")
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = LocationModelConfig.preset(args.preset, pretrained=False).to_dict()
    size = config["image_size"]
    res: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        modules = {}
        for one_pass in (False, True):
            torch.manual_seed(0)
            modules[one_pass] = MLEModule(model_config=config, optim=OPTIM, one_pass=one_pass).to(device).train()
        reference = Path(tmp) / "mle.ckpt"
        save_model_checkpoint(modules[False].model, reference)
        dpo = {one_pass: DPOModule(optim=OPTIM, beta=0.1, reference=str(reference), one_pass=one_pass).to(device)
               for one_pass in (False, True)}
    for module in dpo.values():
        module._reference()
    layouts = {"MLE, 1 box/image": make_batch(args.batch_size, size),
               "MLE, 1-4 boxes/image": several_boxes(make_batch(args.batch_size, size), 1),
               "DPO, chosen + rejected": make_batch(args.batch_size, size)}
    for name, batch in layouts.items():
        objective = "dpo" if name.startswith("DPO") else "mle"
        pool = dpo if objective == "dpo" else modules
        trainees = {one_pass: Trainee(module, objective) for one_pass, module in pool.items()}
        ready = {one_pass: to_device(pool[one_pass].on_before_batch_transfer(dict(batch), 0), device)
                 for one_pass in pool}
        variants = {label: (lambda _, o=one_pass: seconds(lambda: trainees[o].step(ready[o], args.precision), device))
                    for label, one_pass in (("two passes", False), ("one pass", True))}
        times = alternate(variants, args.rounds, [None])
        res[f"{name}: two passes ms"] = 1e3 * times["two passes"]
        res[f"{name}: one pass ms"] = 1e3 * times["one pass"]
        print(f"{name:<24} two passes {1e3 * times['two passes']:8.1f} ms, one pass {1e3 * times['one pass']:8.1f} ms: "
              f"two / one = {times['two passes'] / times['one pass']:.2f}x", flush=True)
    print(f"({args.preset} preset, batch {args.batch_size}, {args.precision}, {device}, "
          f"{torch.get_num_threads()} thread(s), median of {args.rounds} alternating rounds)")
    print("RESULT " + json.dumps(res))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
