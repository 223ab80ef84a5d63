"""MLE training step time, every comparison measured side by side in one process (tiny preset,
toy OPA scenes with several positives per image):

- Lightning: `MLEModule` inside a `lightning.Trainer` vs a minimal hand-written loop (same module,
  same in-memory batches, AdamW + LR schedule + grad clipping 1.0 as the trainer config);
- data: the same Trainer fed by the real `ShardDataModule` (JPEG decode, flips; in-process and with
  ``--num-workers`` workers) vs the in-memory batches;
- shared-prefix (`batch_log_probs`, what `MLEModule` uses) vs repeated-prefix teacher forcing;
- bf16 autocast vs fp32; gradient accumulation (2 half batches) vs one full batch;
- DPO with frozen features shared by policy and reference vs the reference re-encoding the images;
- with ``--compile``: `model.compile_decoder=true` (torch.compile) vs eager, plus compile seconds.

Rounds alternate the variants so machine load hits them alike; medians are reported, and the last
line is ``RESULT {json}`` for benchmarks/run_all.py.

    python -m benchmarks.train_step [--quick] [--compile] [--batch-size 16] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from benchmarks.dpo_step import OPTIM, make_batch  # noqa: E402
from datamodules import ShardDataModule  # noqa: E402
from genloc.checkpoint import save_model_checkpoint  # noqa: E402
from lightning_modules.dpo import DPOModule, pair_box_log_probs, pair_boxes  # noqa: E402
from lightning_modules.dpo_loss import dpo_loss  # noqa: E402
from lightning_modules.mle import MLEModule, flatten_boxes  # noqa: E402
from lightning_modules.optim import warmup_cosine  # noqa: E402
from genloc import LocationModelConfig  # noqa: E402

CLIP = 1.0  # configs/schema.py TrainerSection.gradient_clip_val


class StepTimer(L.Callback):
    """Wall and main-process CPU time between consecutive train-batch ends: everything the trainer
    does per step. Equal CPU but more wall time with data workers means the step waited for them."""

    def __init__(self):
        self.ends: list[tuple[float, float]] = []

    def on_train_batch_end(self, *args, **kwargs):
        self.ends.append((time.perf_counter(), time.process_time()))

    def step_times(self, skip: int) -> list[tuple[float, float]]:
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(self.ends[skip:], self.ends[skip + 1:])]


def lightning_step_times(module: MLEModule, steps: int, skip: int, **fit_kwargs) -> list[tuple[float, float]]:
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=CLIP,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(module, **fit_kwargs)
    return timer.step_times(skip)


class PlainLoop:
    """The minimal loop a user would write: AdamW, the module's LR schedule, grad clipping, no Trainer."""

    def __init__(self, module: L.LightningModule, max_steps: int):
        opt = module.hparams.optim
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=opt["lr"], betas=tuple(opt["betas"]),
                                           weight_decay=opt["weight_decay"])
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(step, opt["warmup_steps"], max_steps, opt["min_lr_ratio"]))

    def step(self, loss_fns) -> float:
        """One optimiser step over the micro-batch losses in ``loss_fns`` (callables); wall seconds."""
        start = time.perf_counter()
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        for loss_fn in loss_fns:
            (loss_fn() / len(loss_fns)).backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.optimizer.step()
        self.schedule.step()
        return time.perf_counter() - start


def repeated_prefix_loss(module: MLEModule, batch: dict) -> torch.Tensor:
    """The MLE loss with each image's prefix repeated once per positive box (the reference path)."""
    boxes, owner = flatten_boxes(batch["positives"])
    prefix = module.prefix(batch)
    tokens = module.model.tokenizer.encode(boxes)
    return -module.model.box_log_probs(prefix[owner], tokens).mean()


def merge(a: dict, b: dict) -> dict:
    """Two collated batches as one batch of twice the size."""
    return {k: torch.cat([a[k], b[k]]) if torch.is_tensor(a[k]) else list(a[k]) + list(b[k]) for k in a}


def alternate(variants: dict, rounds: int, inputs: list) -> dict[str, float]:
    """Median seconds of each variant ``fn(input) -> seconds``, called in turn on ``inputs[r]`` for
    ``rounds`` rounds after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds + 1):
        for name, fn in variants.items():
            t = fn(inputs[r % len(inputs)])
            if r:
                times[name].append(t)
    return {name: statistics.median(t) for name, t in times.items()}


def dpo_feature_sharing(batch_size: int, rounds: int) -> dict[str, float]:
    """DPO step with shared frozen features (DPOModule) vs the reference encoding the images itself."""
    config = LocationModelConfig.preset("tiny").to_dict()
    with tempfile.TemporaryDirectory() as tmp:
        mle = MLEModule(model_config=config, optim=OPTIM)
        ckpt = Path(tmp) / "mle.ckpt"
        save_model_checkpoint(mle.model, ckpt)
        dpo = DPOModule(optim=OPTIM, beta=0.1, reference=str(ckpt))
    batch = make_batch(batch_size, config["image_size"])
    ref = dpo._reference()
    pairs = pair_boxes(*(ref.tokenizer.encode(batch[k]) for k in ("chosen", "rejected")), ref.cfg.num_bins)

    def reencode_loss():
        policy = dpo.model
        prefix = policy.build_prefix(policy.encode_images(batch["image"]), policy.encode_texts(batch["category"]))
        lp = pair_box_log_probs(policy, prefix, pairs)
        with torch.no_grad():
            ref_prefix = ref.build_prefix(ref.encode_images(batch["image"]), ref.encode_texts(batch["category"]))
            rp = pair_box_log_probs(ref, ref_prefix, pairs)
        return dpo_loss(lp[:, 0], lp[:, 1], rp[:, 0], rp[:, 1], 0.1)[0].mean()

    loop = PlainLoop(dpo, rounds + 1)
    return alternate({"dpo_shared": lambda _: loop.step([lambda: dpo.dpo_metrics(batch)["loss"]]),
                      "dpo_reencode": lambda _: loop.step([reencode_loss])}, rounds, [None])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds (about a minute on 2 loaded cores, plus compiling)")
    parser.add_argument("--compile", action="store_true", help="also time model.compile_decoder=true (minutes of compiling on CPU)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="steps per Lightning fit (default 30, quick 16)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 4, quick 3)")
    parser.add_argument("--num-workers", type=int, default=1,
                        help="datamodule workers of the second real-data run (configs/data/toy_opa.yaml: 1); "
                             "the first loads in-process (0 workers)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (2 stall on a shared 2-core machine)")
    args = parser.parse_args(argv)
    steps = args.steps or (16 if args.quick else 30)
    rounds = args.rounds or (3 if args.quick else 4)
    skip = 2  # first steps of a fit: optimiser state, worker start-up, shuffle buffer fill
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.manual_seed(0)
    res: dict[str, float] = {}

    with tempfile.TemporaryDirectory() as tmp:
        n_train = args.batch_size * steps * 2
        subprocess.run([sys.executable, "-m", "datamodules.toy", "--out", tmp, "--pipe-train", "0", "--opa-train",
                        str(n_train), "--val", "0", "--test", "0", "--num-shards", "4"], check=True,
                       stdout=subprocess.DEVNULL)

        def datamodule(workers: int) -> ShardDataModule:
            return ShardDataModule(Path(tmp) / "toy-opa", image_size=64, batch_size=args.batch_size,
                                   num_workers=workers, shuffle_buffer=64, val_split=None, test_split=None)

        dm = datamodule(0)
        dm.setup("fit")
        batches = []
        for batch in dm.train_dataloader():
            batches.append(batch)
            if len(batches) == steps:
                break
        boxes_per_image = sum(len(p) for b in batches for p in b["positives"]) / sum(len(b["key"]) for b in batches)
        module = MLEModule(model_config=LocationModelConfig.preset("tiny").to_dict(), optim=OPTIM)

        # Lightning (in-memory) vs Lightning (real loading) vs the plain loop, alternating per round
        real = {"real_data_0w": 0, f"real_data_{args.num_workers}w": args.num_workers}
        times: dict[str, list] = {"lightning": [], **{name: [] for name in real}, "plain": []}
        memory = torch.utils.data.DataLoader(batches, batch_size=None)
        for _ in range(rounds):
            times["lightning"] += lightning_step_times(module, steps, skip, train_dataloaders=memory)
            for name, workers in real.items():
                times[name] += lightning_step_times(module, steps, skip, datamodule=datamodule(workers))
            loop = PlainLoop(module, steps)
            times["plain"] += [(loop.step([lambda b=b: module.box_nll(b)[0]]), 0.0) for b in batches][skip + 1:]
        res.update({f"step_{k}": statistics.median(t[0] for t in v) for k, v in times.items()})
        res.update({f"cpu_{k}": statistics.median(t[1] for t in times[k]) for k in ("lightning", *real)})

        # per-step alternation of the in-loop variants, each round on the next pair of batches
        loop = PlainLoop(module, 10 * steps)
        pairs = [(batches[i], batches[i + 1]) for i in range(0, len(batches) - 1, 2)]

        def bf16_step(pair):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return loop.step([lambda: module.box_nll(pair[0])[0]])

        variants = {
            "shared_prefix": lambda pair: loop.step([lambda: module.box_nll(pair[0])[0]]),
            "repeated_prefix": lambda pair: loop.step([lambda: repeated_prefix_loss(module, pair[0])]),
            "bf16": bf16_step,
            "full_batch": lambda pair: loop.step([lambda: module.box_nll(merge(*pair))[0]]),
            "accumulate_2": lambda pair: loop.step([lambda: module.box_nll(pair[0])[0],
                                                    lambda: module.box_nll(pair[1])[0]]),
        }
        res.update({f"step_{k}": v for k, v in alternate(variants, rounds * 3, pairs).items()})

        if args.compile:
            config = LocationModelConfig.preset("tiny", compile_decoder=True).to_dict()
            compiled = MLEModule(model_config=config, optim=OPTIM)
            compiled.load_state_dict(module.state_dict())
            cloop = PlainLoop(compiled, 10 * steps)
            start = time.perf_counter()
            cloop.step([lambda: compiled.box_nll(batches[0])[0]])  # compiles forward + backward graphs
            res["compile_seconds"] = time.perf_counter() - start
            res.update({f"step_{k}": v for k, v in alternate({
                "eager": lambda pair: loop.step([lambda: module.box_nll(pair[0])[0]]),
                "compiled": lambda pair: cloop.step([lambda: compiled.box_nll(pair[0])[0]]),
            }, rounds * 3, pairs).items()})

    res.update({f"step_{k}": v for k, v in dpo_feature_sharing(args.batch_size, rounds * 3).items()})
    res.update(batch_size=args.batch_size, boxes_per_image=boxes_per_image, threads=torch.get_num_threads())

    ms = {k: 1e3 * v for k, v in res.items() if k.startswith(("step_", "cpu_"))}
    print(f"tiny preset, batch {args.batch_size} toy-OPA images ({boxes_per_image:.2f} positives/image), "
          f"{torch.get_num_threads()} thread(s); median ms per optimiser step")
    for name, value in ms.items():
        print(f"  {name:<27}{value:9.1f} ms")
    print(f"Lightning / plain loop        : {res['step_lightning'] / res['step_plain']:.3f}  (target <= 1.05)")
    for name in real:
        print(f"{name} / in-memory    : {res[f'step_{name}'] / res['step_lightning']:.3f}  (target <= 1.10); "
              f"main-process CPU per step {res[f'cpu_{name}'] / res['cpu_lightning']:.3f}")
    print(f"repeated / shared prefix      : {res['step_repeated_prefix'] / res['step_shared_prefix']:.2f}x")
    print(f"bf16 autocast / fp32          : {res['step_bf16'] / res['step_shared_prefix']:.2f}")
    print(f"accumulate 2 x B / one 2B step: {res['step_accumulate_2'] / res['step_full_batch']:.2f}")
    print(f"DPO re-encode / shared feats  : {res['step_dpo_reencode'] / res['step_dpo_shared']:.2f}x")
    if args.compile:
        print(f"compiled / eager decoder      : {res['step_compiled'] / res['step_eager']:.2f} "
              f"(compile {res['compile_seconds']:.0f} s)")
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
