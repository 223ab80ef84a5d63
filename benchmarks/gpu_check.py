"""The GPU check: one command that measures what a paper-scale run needs on one GPU, in a few minutes.

`paper` preset (ViT-B/16 224, CLIP ViT-B/32 text, GPT-2 small) with random weights on synthetic
batches (random images, random valid boxes):

- MLE and DPO training steps (zero_grad, loss, backward, clipping 1.0, AdamW) in fp32 and in
  bf16-mixed (autocast around the loss, as Lightning's ``precision=bf16-mixed``): ms per step,
  samples/s, peak memory;
- sampling ``--boxes`` boxes per image with the cascade decoder and with the copied-cache decoder
  (``sample(cascade=False)``) at each of ``--sample-images`` batch sizes: boxes/s, peak memory
  (an out-of-memory is a row saying so), and the sampler's own memory estimate;
- the largest training batch that fits, MLE and DPO, per precision: batch 1, 2, 4, ... until a
  step runs out of memory (caught) or ``--max-batch``;
- the speed switches side by side (CUDA): TF32 for fp32, foreach instead of fused AdamW,
  ``compile_decoder`` (compile time in the note), bf16 cascade sampling;
- MFU of every MLE step row: model FLOPs per sample from the config (`genloc.flops`) times
  samples/s over a bf16 matmul peak measured in the same run (the "matmul peak" row);
- ``train.py``'s fit loop on toy shards (real pipeline, ``--workers`` loader workers) at the same
  batch and precision as the synthetic step, and the ratio of their samples/s.

Writes ``gpu_check.md`` (a Markdown table) and ``gpu_check.json`` into ``--out``, and prints the table.
Sections that would start after ``--time-budget`` seconds are skipped and listed as such.

    python -m benchmarks.gpu_check              # CUDA, paper preset (make bench-gpu)
    python -m benchmarks.gpu_check --quick      # CPU smoke test: tiny preset and shapes, under a minute

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU (weights, gradients and optimizer
state included; "resident" is what was allocated before the measured calls) and the process's
peak RSS on a CPU.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from benchmarks.chip import graphs_compiled, several_boxes, smoke_gpu, sync_check  # noqa: E402
from benchmarks.dpo_step import OPTIM, make_batch  # noqa: E402
from genloc.checkpoint import save_model_checkpoint  # noqa: E402
from genloc.files import write_atomic  # noqa: E402
from genloc.likelihood import BoxBatch  # noqa: E402
from lightning_modules.dpo import DPOModule  # noqa: E402
from lightning_modules.mle import MLEModule  # noqa: E402
from genloc import LocationModelConfig  # noqa: E402
from genloc.flops import training_flops_per_sample  # noqa: E402

GIB = 2 ** 30
CLIP = 1.0  # configs/schema.py TrainerSection.gradient_clip_val
PRECISIONS = ("fp32", "bf16-mixed")


def out_of_memory(error: BaseException) -> bool:
    """CUDA's allocator, cuBLAS/cuDNN workspaces or the CPU allocator running out."""
    text = str(error).lower()
    return (isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "alloc_failed" in text
            or "can't allocate memory" in text)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _proc_status(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory in bytes of the ``with`` block: CUDA allocator peak, or the process's peak RSS on
    a CPU (its high-water mark reset through ``/proc/self/clear_refs`` where Linux allows it)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self.resident = device, None, None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.resident = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.resident = _proc_status("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _proc_status("VmHWM")


def seconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def to_device(value, device: torch.device):
    """Tensors, also inside lists and dicts, moved to ``device`` (what Lightning does to a batch)."""
    if torch.is_tensor(value) or isinstance(value, BoxBatch):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    return value


class Trainee:
    """A module plus its AdamW over the trainable parameters; ``step(batch, precision)`` is one
    training step of the module's objective."""

    def __init__(self, module, objective: str, fused: bool = True):
        self.module, self.objective = module, objective
        self.params = [p for p in module.parameters() if p.requires_grad]
        fused = fused and all(p.is_cuda for p in self.params)  # as lightning_modules/optim.py decides
        self.optimizer = torch.optim.AdamW(self.params, lr=OPTIM["lr"], betas=tuple(OPTIM["betas"]),
                                           weight_decay=OPTIM["weight_decay"], **({"fused": True} if fused else {}))

    def prepare(self, batch: dict, device: torch.device) -> dict:
        """A host batch as the module's training step gets it from Lightning: the module's
        ``on_before_batch_transfer`` (token boxes checked on the host), then moved to ``device``."""
        return to_device(self.module.on_before_batch_transfer(dict(batch), 0), device)

    def step(self, batch: dict, precision: str) -> None:
        self.backward(batch, precision)
        self.update()

    def backward(self, batch: dict, precision: str) -> None:
        """Zeroed gradients, the objective's loss (autocast for bf16-mixed) and its backward pass."""
        device = batch["image"].device
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            if self.objective == "mle":
                loss = self.module.box_nll(batch)[1]
            else:
                loss = self.module.dpo_metrics(batch)["loss"]
        loss.backward()

    def update(self) -> None:
        """Gradient clipping and the optimiser step."""
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.optimizer.step()

    def reset(self, device: torch.device) -> None:
        """After an out-of-memory error: drop gradients and cached blocks."""
        self.optimizer.zero_grad(set_to_none=True)
        free_memory(device)


def row(section: str, variant: str, precision: str, batch: str, ms=None, rate=None, unit="", peak=None,
        resident=None, note="") -> dict:
    return {"section": section, "variant": variant, "precision": precision, "batch": batch, "ms": ms,
            "rate": rate, "unit": unit, "peak_gib": None if peak is None else peak / GIB,
            "resident_gib": None if resident is None else resident / GIB, "note": note}


def time_steps(trainee: Trainee, batch: dict, precision: str, steps: int, device: torch.device,
               variant: str = "", note: str = "") -> dict:
    """Median step time after two warm-up steps, with the peak memory of the timed steps."""
    for _ in range(2):
        trainee.step(batch, precision)
    with PeakMemory(device) as memory:
        times = [seconds(lambda: trainee.step(batch, precision), device) for _ in range(steps)]
    size = len(batch["key"])
    median = statistics.median(times)
    name = trainee.objective.upper() + (f", {variant}" if variant else "")
    return row("train step", name, precision, str(size), 1e3 * median, size / median, "samples/s", memory.peak,
               memory.resident, note)


@contextmanager
def tf32(enabled: bool):
    """TF32 for fp32 matmuls (what train.py's `tf32` switch sets on CUDA) for the block."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def matmul_peak(device: torch.device, size: int, repeats: int = 10) -> dict:
    """bf16 matmul throughput of ``size`` x ``size`` squares: the chip's reachable peak for MFU."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    a @ b  # warm-up (kernel selection)
    median = statistics.median(seconds(lambda: a @ b, device) for _ in range(repeats))
    return row("matmul peak", f"{size}x{size}x{size}", "bf16", "-", 1e3 * median, 2 * size ** 3 / median / 1e12,
               "TFLOP/s")


def add_mfu(rows: list[dict], flops_per_sample: float) -> None:
    """Append ``MFU x %`` to the note of every MLE step row (against this run's matmul peak row)."""
    peak = next((r["rate"] for r in rows if r["section"] == "matmul peak"), None)
    for r in rows:
        if peak and r["section"] in ("train step", "fit loop") and r["variant"].startswith("MLE") and r["rate"]:
            mfu = f"MFU {100 * r['rate'] * flops_per_sample / (peak * 1e12):.1f} %"
            r["note"] = f"{r['note']}; {mfu}" if r["note"] else mfu


def largest_batch(trainee: Trainee, precision: str, image_size: int, max_batch: int, device: torch.device) -> dict:
    """Batch 1, 2, 4, ... one step each until a step runs out of memory or ``max_batch`` is reached."""
    fits, failed, peak = 0, None, None
    size = 1
    while size <= max_batch:
        oom = False
        try:
            batch = trainee.prepare(make_batch(size, image_size, seed=size), device)
            with PeakMemory(device) as memory:
                trainee.step(batch, precision)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not out_of_memory(error):
                raise
            oom = True
        batch = None
        if oom:
            trainee.reset(device)
            failed = size
            break
        fits, peak = size, memory.peak
        size *= 2
    note = f"batch {failed} ran out of memory" if failed else f"stopped at --max-batch {max_batch}"
    return row("largest batch", trainee.objective.upper(), precision, str(fits), peak=peak, note=note)


def sampling_rows(model, images: int, boxes: int, repeats: int, device: torch.device,
                  bf16: bool = False) -> list[dict]:
    """Cascade vs copied-cache decoding of ``images x boxes`` boxes (median of ``repeats`` calls), and
    with ``bf16`` (CUDA) the cascade decoder in bf16 autocast, eager and graphed (``sample(graphs=True)``:
    two untimed calls compile and record the CUDA graphs; the compile time is in the note)."""
    pixels = torch.rand(images, 3, model.cfg.image_size, model.cfg.image_size, device=device,
                        generator=torch.Generator(device).manual_seed(0))
    categories = [("car", "bird", "lamp", "person")[i % 4] for i in range(images)]
    estimate = images * model.sampling_bytes_per_image(boxes)
    rows = []
    variants = ((True, False, False), (False, False, False)) + (((True, True, False), (True, True, True)) if bf16 else ())
    for cascade, half, graphs in variants:
        name = ("cascade graphed" if graphs else "cascade") if cascade else "copied cache"
        shape = f"{images} img x {boxes}"
        precision = "bf16" if half else "fp32"
        oom = False

        def draw():
            model.sample(pixels, categories, n=boxes, cascade=cascade, bf16=half, graphs=graphs)
        try:
            with PeakMemory(device) as memory:
                warm_up = seconds(draw, device) + (seconds(draw, device) if graphs else 0.0)
            median = statistics.median(seconds(draw, device) for _ in range(repeats))
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not out_of_memory(error):
                raise
            oom = True
        if oom:
            free_memory(device)
            rows.append(row("sampling", name, precision, shape, note="out of memory"))
            continue
        note = f"estimate {estimate / GIB:.2f} GiB above resident" if cascade and not half else ""
        if graphs:
            note = f"first two calls (compile, record) {warm_up:.1f} s"
        rows.append(row("sampling", name, precision, shape, 1e3 * median, images * boxes / median, "boxes/s",
                        memory.peak, memory.resident, note))
    return rows


class Budget:
    """Wall-clock budget: sections that would start after it are skipped and reported."""

    def __init__(self, seconds_: float):
        self.start, self.limit, self.skipped = time.perf_counter(), seconds_, []

    def allows(self, what: str) -> bool:
        if time.perf_counter() - self.start < self.limit:
            return True
        self.skipped.append(what)
        return False


EAGER_PATHS = (("two passes", False, False, False), ("one pass", True, False, False))
COMPILED_PATHS = (("one pass, compiled", True, True, False), ("whole step, compiled", True, False, True))


def path_rows(config: dict, host: dict, batches: list[int], precision: str, steps: int, device: torch.device,
              variants: tuple, budget: "Budget", several: list[dict]) -> list[dict]:
    """The MLE step at each of ``batches`` (host batches cut from ``host``) by decoder path, ``variants``
    of (name, one_pass, compile_decoder, compile_step): `EAGER_PATHS` (two passes, the default, and one
    pass) or `COMPILED_PATHS` (one pass with ``compile_decoder``, and ``module.compile_step``, the whole
    forward compiled on bucketed boxes: first-step seconds and graphs compiled in the note).
    ``several``: host batches with 1-4 boxes per image, stepped once each after the timing, so a
    "recompiles" row shows whether a new box count recompiles."""
    rows = []
    for name, one_pass, compile_decoder, compile_step in variants:
        if not budget.allows(f"MLE step, {name}"):
            continue
        torch.manual_seed(0)
        compiled = compile_decoder or compile_step
        module = MLEModule(model_config={**config, "compile_decoder": compile_decoder}, optim=OPTIM,
                           one_pass=one_pass, compile_step=compile_step).to(device).train()
        trainee = Trainee(module, "mle")
        for size in batches:
            if not budget.allows(f"MLE step, {name}, batch {size}"):
                continue
            batch = trainee.prepare(cut(host, size), device)
            graphs = graphs_compiled()
            first = seconds(lambda: trainee.step(batch, precision), device)
            note = f"first step {first:.1f} s, {graphs_compiled() - graphs} graphs compiled" if compiled else ""
            graphs = graphs_compiled()
            try:
                r = time_steps(trainee, batch, precision, steps, device, name, note)
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not out_of_memory(error):
                    raise
                trainee.reset(device)
                rows.append(row("train step", f"MLE, {name}", precision, str(size), note="out of memory"))
                continue
            if compiled:
                r["note"] += f"; {graphs_compiled() - graphs} while timed"
            rows.append(r)
            print(f"MLE step {name} batch {size}: {r['ms']:.1f} ms", file=sys.stderr, flush=True)
        if several and compiled:
            graphs = graphs_compiled()
            counts = []
            for b in several:
                trainee.step(trainee.prepare(b, device), precision)
                counts.append(graphs_compiled() - graphs)
                graphs = graphs_compiled()
            rows.append(row("recompiles", f"MLE, {name}", precision, str(len(several[0]["key"])),
                            note=f"graphs compiled by {len(several)} batches of 1-4 boxes/image: {counts}"))
        trainee = module = None
        free_memory(device)
    return rows


def cut(batch: dict, size: int) -> dict:
    """The first ``size`` samples of a host batch, repeated when it is shorter."""
    total = len(batch["key"])
    index = [i % total for i in range(size)]
    out = {}
    for key, value in batch.items():
        out[key] = value[torch.tensor(index)] if torch.is_tensor(value) else [value[i] for i in index]
    out["key"] = [f"{k}-{n}" for n, k in enumerate(out["key"])]
    return out


class StepClock(L.Callback):
    """Wall time from the end of training step ``skip`` to the end of the last step (two
    synchronisations; Lightning runs checkpoint callbacks after this one, so saves are not timed)."""

    def __init__(self, skip: int):
        self.skip, self.start, self.end, self.steps = skip, None, None, 0

    @property
    def steps_per_second(self) -> float | None:
        if self.start is None or self.end is None or self.steps <= self.skip:
            return None
        return (self.steps - self.skip) / (self.end - self.start)

    def _now(self, module) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.skip:
            self.start = self._now(pl_module)
        elif trainer.global_step == trainer.max_steps:
            self.end = self._now(pl_module)
        self.steps = trainer.global_step


def fit_loop_row(preset: str, config: dict, args, device: torch.device, work: Path, compile_step: bool = False) -> dict:
    """`train.py` (Lightning, toy shards, ``args.workers`` loader workers, no validation) at the batch
    and precision of the synthetic MLE step; steps after the first ``skip`` are timed, and a
    ``torch.profiler`` trace of three untimed steps before them is written into ``args.out``. With
    ``compile_step`` (``module.compile_step=true``, no trace): the graphs compiled over the whole fit
    loop and while timed (torch._dynamo's counters) in the note."""
    from benchmarks.chip import TraceWindow

    import train as train_script
    from configs.schema import load_config
    from datamodules.toy.scenes import write_toy_dataset

    skip, steps = (5, 8) if args.quick else (20, args.fit_steps)
    shards = max(args.workers, 1)
    # the compiled step reads OPA-flavour scenes (1-4 positives per image: several box buckets)
    flavour, data = ("toy-opa", work / "toy_opa") if compile_step else ("toy-pipe", work / "toy")
    write_toy_dataset(data, seed=0, sizes={flavour: {"train": args.batch_size * (steps + 4), "val": 8}},
                      num_shards=shards, progress=False)
    precision = "fp32" if args.quick else "bf16-mixed"
    same_model = [f"model.{k}={str(config[k]).lower()}" for k in ("freeze_image_encoder", "relative_extents")]
    overrides = [f"model={preset}", "model.pretrained=false", f"model.gpt2_dropout={config['gpt2_dropout']}",
                 *same_model, "trainer=cpu" if device.type == "cpu" else "trainer=gpu",
                 f"data.data_dir={data / flavour}", f"data.batch_size={args.batch_size}",
                 f"data.num_workers={args.workers}", f"data.pin_memory={str(device.type == 'cuda').lower()}",
                 f"data.persistent_workers={str(args.workers > 0).lower()}", f"trainer.max_steps={steps}",
                 f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=0",
                 "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                 f"log_root={work / 'runs'}", f"module.compile_step={str(compile_step).lower()}",
                 f"run_name={'compiled_step' if compile_step else 'default'}"]
    if device.type == "cuda":
        overrides.append(f"trainer.devices=[{device.index}]")
    clock = StepClock(skip)
    callbacks = [clock] if compile_step else [clock, TraceWindow(first=skip - 4, count=3, out=Path(args.out))]
    graphs = graphs_compiled()
    timed = GraphsWhileTimed(skip)
    train_script.train(load_config(overrides), extra_callbacks=[*callbacks, timed])
    rate = clock.steps_per_second
    note = f"{args.workers} workers, steps {skip + 1}-{clock.steps} timed"
    if compile_step:
        note += (f"; OPA-flavour scenes; {graphs_compiled() - graphs} graphs compiled over the fit loop, "
                 f"{timed.graphs} while timed")
    else:
        note += f"; trace of steps {skip - 3}-{skip - 1}: fit_trace.json"
    variant = "MLE, compiled step, train.py on toy shards" if compile_step else "MLE, train.py on toy shards"
    return row("fit loop", variant, precision, str(args.batch_size), 1e3 / rate, rate * args.batch_size, "samples/s",
               note=note)


class GraphsWhileTimed(L.Callback):
    """Graphs torch.compile compiled after the first ``skip`` steps (the timed ones): recompiles."""

    def __init__(self, skip: int):
        self.skip, self.start, self.graphs = skip, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.skip and self.start is None:
            self.start = graphs_compiled()

    def on_train_end(self, trainer, pl_module) -> None:
        self.graphs = graphs_compiled() - self.start if self.start is not None else 0


def run(args, device: torch.device) -> dict:
    preset = "tiny" if args.quick else "paper"
    cuda = device.type == "cuda"
    config = LocationModelConfig.preset(preset, pretrained=False).to_dict()
    image_size = config["image_size"]
    budget = Budget(args.time_budget)
    rows: list[dict] = [matmul_peak(device, 512 if args.quick else 8192)]
    torch.manual_seed(0)
    host = make_batch(args.batch_size, image_size)
    bf16 = "bf16-mixed"
    largest_bf16 = None

    with tempfile.TemporaryDirectory() as tmp:
        mle = MLEModule(model_config=config, optim=OPTIM)
        reference = Path(tmp) / "mle.ckpt"
        save_model_checkpoint(mle.model, reference)
        trainee = Trainee(mle.to(device).train(), "mle")
        batch = trainee.prepare(host, device)
        for precision in PRECISIONS:
            if budget.allows(f"MLE step {precision}"):
                rows.append(time_steps(trainee, batch, precision, args.steps, device))
                print(f"MLE step {precision}: {rows[-1]['ms']:.1f} ms", file=sys.stderr, flush=True)
        if cuda and budget.allows("MLE step fp32 with TF32"):
            with tf32(True):
                rows.append(time_steps(trainee, batch, "fp32", args.steps, device, "TF32"))
        if cuda and budget.allows("MLE step with foreach AdamW"):
            rows.append(time_steps(Trainee(mle, "mle", fused=False), batch, bf16, args.steps, device,
                                   "foreach AdamW"))
        if budget.allows(f"largest MLE batch {bf16}"):
            rows.append(largest_batch(trainee, bf16, image_size, args.max_batch, device))
            largest_bf16 = int(rows[-1]["batch"]) or None
            print(f"largest MLE batch {bf16}: {rows[-1]['batch']}", file=sys.stderr, flush=True)
        model = mle.model.eval()
        for images in args.sample_images:
            if budget.allows(f"sampling {images} images"):
                rows += sampling_rows(model, images, args.boxes, args.repeats, device, bf16=cuda)
                print(f"sampling {images} images done", file=sys.stderr, flush=True)
        mle.train()
        del trainee, mle, model, batch
        free_memory(device)

        for one_pass in (False, True):
            if budget.allows(f"sync check, one_pass={one_pass}"):
                rows += sync_rows(config, str(reference), host, one_pass, device)
        sizes = sorted({*args.batches, *([largest_bf16] if largest_bf16 else [])})
        several = [several_boxes(host, seed) for seed in (1, 2, 3)]
        rows += path_rows(config, host, sizes, bf16, args.steps, device, EAGER_PATHS, budget, several)

        if budget.allows("DPO"):
            for one_pass in (False, True):
                dpo = DPOModule(optim=OPTIM, beta=0.1, reference=str(reference), one_pass=one_pass).to(device).train()
                dpo._reference()  # the frozen reference follows the policy's device
                trainee = Trainee(dpo, "dpo")
                batch = trainee.prepare(host, device)
                for precision in (PRECISIONS if not one_pass else (bf16,)):
                    if budget.allows(f"DPO step {precision}, one_pass={one_pass}"):
                        rows.append(time_steps(trainee, batch, precision, args.steps, device,
                                               "one pass" if one_pass else ""))
                        print(f"DPO step {precision}: {rows[-1]['ms']:.1f} ms", file=sys.stderr, flush=True)
                if not one_pass and budget.allows(f"largest DPO batch {bf16}"):
                    rows.append(largest_batch(trainee, bf16, image_size, args.max_batch, device))
                del trainee, dpo, batch
                free_memory(device)
        if budget.allows("train.py fit loop"):
            rows.append(fit_loop_row(preset, config, args, device, Path(tmp)))
            print(f"fit loop: {rows[-1]['ms']:.1f} ms per step", file=sys.stderr, flush=True)
        if args.compile:  # last: compiling takes a minute or more per shape
            rows += path_rows(config, host, sizes, bf16, args.steps, device, COMPILED_PATHS, budget, several)
            if budget.allows("train.py fit loop, compiled step"):
                rows.append(fit_loop_row(preset, config, args, device, Path(tmp), compile_step=True))

    if args.smoke:
        passed, wall, summary = smoke_gpu(args.quick, str(device), args.smoke_steps)
        rows.append(row("smoke-gpu", "scripts.smoke_gpu", "bf16-mixed", "-", 1e3 * wall,
                        note=("PASS" if passed else "FAIL") + f" in {wall:.0f} s: {summary}"))
    flops = training_flops_per_sample(LocationModelConfig.from_dict(config))
    add_mfu(rows, flops)
    failed = [f"{r['section']} ({r['variant']})" for r in rows if r["note"].startswith("FAIL")]
    return {"device": describe(device), "preset": preset, "flops_per_sample": flops, "settings": {
                "batch_size": args.batch_size, "batches": args.batches, "steps": args.steps, "boxes": args.boxes,
                "sample_images": args.sample_images, "repeats": args.repeats, "max_batch": args.max_batch,
                "workers": args.workers, "fit_steps": args.fit_steps, "compile": args.compile,
                "smoke": args.smoke, "time_budget_s": args.time_budget},
            "seconds": time.perf_counter() - budget.start, "skipped": budget.skipped, "failed": failed, "rows": rows}


def sync_rows(config: dict, reference: str, host: dict, one_pass: bool, device: torch.device) -> list[dict]:
    """`benchmarks.chip.sync_check` of the MLE and the DPO step (bf16-mixed) on one decoder path."""
    rows = []
    for objective in ("mle", "dpo"):
        torch.manual_seed(0)
        module = (MLEModule(model_config=config, optim=OPTIM, one_pass=one_pass) if objective == "mle"
                  else DPOModule(optim=OPTIM, beta=0.1, reference=reference, one_pass=one_pass)).to(device).train()
        if objective == "dpo":
            module._reference()
        trainee = Trainee(module, objective)
        _, note = sync_check(trainee, trainee.prepare(host, device), "bf16-mixed", device)
        name = objective.upper() + (", one pass" if one_pass else ", two passes")
        rows.append(row("sync check", name, "bf16-mixed", str(len(host["key"])), note=note))
        print(f"sync check {name}: {note}", file=sys.stderr, flush=True)
        del trainee, module
        free_memory(device)
    return rows


def describe(device: torch.device) -> dict:
    info = {"type": device.type, "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=props.total_memory / GIB, cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}", tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    d = result["device"]
    lines = [f"GPU check on {d['name']} ({d['type']}"
             + (f", {d['memory_gib']:.0f} GiB, CUDA {d['cuda']}" if d["type"] == "cuda" else "")
             + f"), torch {d['torch']}, `{result['preset']}` preset, random weights, "
               f"{result['seconds']:.0f} s in all.", "",
             "| section | variant | precision | batch | ms | rate | peak GiB | resident GiB | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        rate = "-" if r["rate"] is None else f"{r['rate']:.1f} {r['unit']}"
        lines.append(f"| {r['section']} | {r['variant']} | {r['precision']} | {r['batch']} | {_fmt(r['ms'], '.1f')} "
                     f"| {rate} | {_fmt(r['peak_gib'], '.2f')} | {_fmt(r['resident_gib'], '.2f')} | {r['note']} |")
    ratios = sampling_ratios(result["rows"], memory=d["type"] == "cuda")
    if ratios:
        lines += ["", "Sampling, cascade / copied cache: " + "; ".join(ratios)]
    lines += [line for line in (precision_ratios(result["rows"]), fit_ratio(result["rows"]),
                                path_ratios(result["rows"]), dpo_ratio(result["rows"])) if line]
    lines += ["", f"Model FLOPs per MLE training sample (genloc/flops.py): {result['flops_per_sample'] / 1e9:.2f} GFLOP"]
    if result["failed"]:
        lines += ["", "FAILED: " + ", ".join(result["failed"])]
    if result["skipped"]:
        lines += ["", f"Skipped (time budget {result['settings']['time_budget_s']:.0f} s): "
                  + ", ".join(result["skipped"])]
    return "\n".join(lines) + "\n"


def sampling_ratios(rows: list[dict], memory: bool) -> list[str]:
    """``"<batch>: <speed ratio>x boxes/s, <memory ratio>x less peak memory above resident"`` per batch;
    the memory ratio only with ``memory`` (a CUDA allocator peak: a CPU's RSS reuses freed pages)."""
    by_batch: dict[str, dict] = {}
    for r in rows:
        if r["section"] == "sampling" and r["precision"] == "fp32":
            by_batch.setdefault(r["batch"], {})[r["variant"]] = r
    out = []
    for shape, pair in by_batch.items():
        cascade, copied = pair.get("cascade"), pair.get("copied cache")
        if not cascade or not copied or cascade["rate"] is None:
            continue
        if copied["rate"] is None:
            out.append(f"{shape}: copied cache ran out of memory")
            continue
        text = f"{shape}: {cascade['rate'] / copied['rate']:.2f}x boxes/s"
        if memory:
            above = (copied["peak_gib"] - copied["resident_gib"]) / max(cascade["peak_gib"] - cascade["resident_gib"], 1e-9)
            text += f", {above:.1f}x less peak memory above resident"
        out.append(text)
    return out


def precision_ratios(rows: list[dict]) -> str:
    """``"Sampling, cascade bf16 / fp32: <batch>: <ratio>x boxes/s; ..."`` where both rows ran, and the
    same for graphed bf16 / eager bf16 and graphed bf16 / fp32."""
    rates = {(r["batch"], r["variant"], r["precision"]): r["rate"] for r in rows
             if r["section"] == "sampling" and r["rate"]}
    out = ""
    for title, top, bottom in (("cascade bf16 / fp32", ("cascade", "bf16"), ("cascade", "fp32")),
                               ("graphed bf16 / eager bf16", ("cascade graphed", "bf16"), ("cascade", "bf16")),
                               ("graphed bf16 / eager fp32", ("cascade graphed", "bf16"), ("cascade", "fp32"))):
        parts = [f"{shape}: {rates[(shape, *top)] / rate:.2f}x boxes/s" for (shape, *key), rate in rates.items()
                 if tuple(key) == bottom and (shape, *top) in rates]
        out += f"\nSampling, {title}: " + "; ".join(parts) if parts else ""
    return out


def fit_ratio(rows: list[dict]) -> str:
    """The fit loop's samples/s over the synthetic MLE step's at the same batch and precision."""
    for fit in (r for r in rows if r["section"] == "fit loop" and r["rate"]):
        step = next((r for r in rows if r["section"] == "train step" and r["variant"] == "MLE"
                     and r["precision"] == fit["precision"] and r["batch"] == fit["batch"] and r["rate"]), None)
        if step:
            return (f"\ntrain.py fit loop / synthetic MLE step ({fit['precision']}, batch {fit['batch']}): "
                    f"{fit['rate'] / step['rate']:.2f}")
    return ""


def path_ratios(rows: list[dict]) -> str:
    """``"MLE step bf16-mixed, two passes / one pass [/ compiled]: batch <b>: <x>x; ..."`` (ms ratios)."""
    ms = {(r["variant"], r["batch"]): r["ms"] for r in rows
          if r["section"] == "train step" and r["variant"].startswith("MLE, ") and r["ms"]}
    parts = []
    for (variant, size), two in ms.items():
        if variant != "MLE, two passes":
            continue
        found = [f"{two / ms[v, size]:.2f}x {v[5:]}" for v in ("MLE, one pass", "MLE, one pass, compiled",
                                                                "MLE, whole step, compiled") if (v, size) in ms]
        if found:
            parts.append(f"batch {size}: " + ", ".join(found))
    return ("\nMLE step, two passes / (one pass, compiled one pass, compiled whole step): " + "; ".join(parts)
            if parts else "")


def dpo_ratio(rows: list[dict]) -> str:
    """The DPO step over the MLE step (bf16-mixed, same batch), for the default and the one-pass path."""
    ms = {(r["variant"], r["batch"]): r["ms"] for r in rows
          if r["section"] == "train step" and r["precision"] == "bf16-mixed" and r["ms"]}
    parts = [f"{label} {ms[dpo, size] / ms[mle, size]:.2f}x at batch {size}"
             for label, dpo, mle in (("two passes", "DPO", "MLE"), ("one pass", "DPO, one pass", "MLE, one pass"))
             for size in sorted({b for _, b in ms}, key=int) if (dpo, size) in ms and (mle, size) in ms]
    return "\nDPO / MLE step (bf16-mixed): " + "; ".join(parts) if parts else ""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke test: tiny preset, small batches, no GPU needed")
    p.add_argument("--device", help="default: cuda (--quick: cpu)")
    p.add_argument("--out", default="results/gpu_check", help="folder for gpu_check.md and gpu_check.json")
    p.add_argument("--batch-size", type=int, help="training batch of the step timings (default 64, quick 4)")
    p.add_argument("--steps", type=int, help="timed steps per setting (default 10, quick 2)")
    p.add_argument("--boxes", type=int, default=100, help="boxes per image when sampling (default 100)")
    p.add_argument("--sample-images", type=int, nargs="+", help="sampling batch sizes (default 8 64, quick 2 4)")
    p.add_argument("--repeats", type=int, help="timed sampling calls per row (default 3, quick 1)")
    p.add_argument("--max-batch", type=int, help="largest training batch tried (default 4096, quick 16)")
    p.add_argument("--workers", type=int, help="loader workers of the fit-loop row (default 8, quick 0)")
    p.add_argument("--fit-steps", type=int, default=120, help="training steps of the fit-loop row (default 120)")
    p.add_argument("--batches", type=int, nargs="+",
                   help="batches of the decoder-path rows, besides the largest bf16 one (default 64 256, quick 4 8)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="time the MLE step with compile_decoder, compile time included (default: on CUDA)")
    p.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=True,
                   help="run scripts.smoke_gpu last, timed (quick: --device cpu --tiny; default on)")
    p.add_argument("--smoke-steps", type=int, default=100, help="training steps of the smoke part (default 100)")
    p.add_argument("--time-budget", type=float, default=300.0,
                   help="seconds after which remaining sections are skipped (default 300; the smoke part runs after)")
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, small in (("batch_size", 64, 4), ("steps", 10, 2), ("sample_images", [8, 64], [2, 4]),
                              ("batches", [64, 256], [4, 8]),
                              ("repeats", 3, 1), ("max_batch", 4096, 16)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    args.device = args.device or ("cpu" if quick else "cuda")
    args.workers = (0 if quick else 8) if args.workers is None else args.workers
    if args.compile is None:
        args.compile = args.device.startswith("cuda")
    numbers = [args.batch_size, args.steps, args.boxes, args.repeats, args.max_batch, args.fit_steps - 20,
               args.smoke_steps - 1, *args.sample_images, *args.batches]
    if min(numbers) < 1 or args.time_budget <= 0 or args.workers < 0:
        p.error("--batch-size, --batches, --steps, --boxes, --sample-images, --repeats and --max-batch must be >= 1, "
                "--fit-steps > 20, --smoke-steps >= 2, --workers >= 0, --time-budget > 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device is visible (torch.cuda.is_available() is False): run on a GPU machine, or use "
                "--quick for the CPU smoke test")
    return args


def select_device(name: str) -> torch.device:
    """``name`` as a device; a CUDA device gets its index (``"cuda"`` means the current one) and becomes
    the current device, since ``torch.cuda.set_device`` refuses a device without an index."""
    device = torch.device(name)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def main(argv=None) -> int:
    args = parse_args(argv)
    device = select_device(args.device)
    result = run(args, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    write_atomic(out / "gpu_check.json", json.dumps(result, indent=1))
    write_atomic(out / "gpu_check.md", table)
    print(table)
    print(f"wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'}")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
