"""The GPU check's parts that ask whether the training step uses the chip (docs/gpu.md, section 7):

- the MLE step's decoder paths side by side at several batches: the prefix pass plus the boxes' pass
  (default), one pass (``module.one_pass``) and one pass with ``compile_decoder`` (compile time and
  the number of graphs compiled, so a recompile inside the fit loop shows);
- the sync check: MLE and DPO steps under ``torch.cuda.set_sync_debug_mode("error")`` (on a CPU: the
  forward and backward under `HostReads`), a failure naming the line that synchronised;
- a ``torch.profiler`` trace of a few steps of ``train.py``'s fit loop (`TraceWindow`);
- ``make smoke-gpu`` as a timed part (a subprocess: its memory is its own).
"""
from __future__ import annotations

import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]


class HostReads:
    """Makes every read of a tensor's value into Python (``.item()``, ``.tolist()``, ``bool()``, ``int()``,
    ``float()``, ``index``) raise while active: on a GPU each of them waits for the device."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self):
        self.saved = {}

    def __enter__(self) -> "HostReads":
        for name in self.NAMES:
            self.saved[name] = getattr(torch.Tensor, name)

            def refuse(*args, _name=name, **kwargs):
                raise AssertionError(f"Tensor.{_name} read a value back to the host inside the training step")
            setattr(torch.Tensor, name, refuse)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)
        self.saved.clear()


@contextmanager
def cuda_syncs_fail():
    """Every host-device synchronisation in the block raises (CUDA's sync debug mode)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def project_frame(error: BaseException) -> str:
    """``file:line`` of the innermost frame of this repository (not of a library) in ``error``'s traceback."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if f.filename.startswith(str(ROOT)) and f.filename != __file__
              and "/.venv/" not in f.filename and "/site-packages/" not in f.filename]
    if not frames:
        return "a library frame"
    frame = frames[-1]
    return f"{Path(frame.filename).relative_to(ROOT)}:{frame.lineno}"


def sync_check(trainee, batch: dict, precision: str, device: torch.device) -> tuple[bool, str]:
    """One training step (after a warm-up step: text cache, optimiser state) with every sync an error:
    on CUDA the whole step, on a CPU the forward and backward (the CPU AdamW reads its step count;
    the fused CUDA one does not). Returns (passed, what happened)."""
    trainee.step(batch, precision)
    try:
        if device.type == "cuda":
            with cuda_syncs_fail():
                trainee.step(batch, precision)
        else:
            with HostReads():
                trainee.backward(batch, precision)
            trainee.update()
    except (RuntimeError, AssertionError) as error:
        return False, f"FAIL at {project_frame(error)}: {str(error).splitlines()[0][:160]}"
    return True, "PASS: no host-device synchronisation in the step"


def several_boxes(batch: dict, seed: int) -> dict:
    """``batch`` (a host batch) with 1-4 positive boxes per image (OPA-like) instead of one."""
    g = torch.Generator().manual_seed(seed)
    positives = []
    for _ in batch["key"]:
        count = int(torch.randint(1, 5, (1,), generator=g))
        lo = torch.rand(count, 2, generator=g) * 0.6
        positives.append(torch.cat([lo, lo + 0.05 + torch.rand(count, 2, generator=g) * 0.3], dim=1))
    return dict(batch, positives=positives)


def graphs_compiled() -> int:
    """Graphs torch.compile has compiled in this process so far (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class TraceWindow(L.Callback):
    """A ``torch.profiler`` trace of training steps ``first`` .. ``first + count - 1`` (untimed warm-up
    steps of the fit-loop row): ``fit_trace.json`` (chrome://tracing, Perfetto) and ``fit_profile.txt``
    (the operators by self time) in ``out``."""

    def __init__(self, first: int, count: int, out: Path):
        self.first, self.count, self.out, self.profiler = first, count, Path(out), None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.first and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if pl_module.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.profiler is not None and trainer.global_step >= self.first + self.count:
            self.stop(pl_module.device.type)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.profiler is not None:
            self.stop(pl_module.device.type)

    def stop(self, device_type: str) -> None:
        profiler, self.profiler = self.profiler, None
        profiler.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(self.out / "fit_trace.json"))
        key = "self_cuda_time_total" if device_type == "cuda" else "self_cpu_time_total"
        (self.out / "fit_profile.txt").write_text(profiler.key_averages().table(sort_by=key, row_limit=40))


def smoke_gpu(quick: bool, device: str, steps: int) -> tuple[bool, float, str]:
    """``python -m scripts.smoke_gpu`` (``--device cpu --tiny`` when ``quick``): passed, wall seconds,
    and its summary lines."""
    command = [sys.executable, "-m", "scripts.smoke_gpu", "--device", device]
    command += ["--tiny"] if quick else ["--steps", str(steps)]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL", "smoke-gpu:"))]
    return proc.returncode == 0, time.perf_counter() - start, "; ".join(" ".join(line.split()) for line in lines)
