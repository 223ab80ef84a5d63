"""Stopping a run: SIGUSR1 (SLURM `--signal=SIGUSR1@90`, or `kill -USR1`) -> last.ckpt -> requeue -> stop;
SIGTERM (`docker stop`, Kubernetes, `timeout`, `scancel`) and SIGINT (Ctrl-C) -> last.ckpt -> stop, and
train.py exits non-zero (docs/multinode.md)."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger("genloc.train")

SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class Preemption(L.Callback):
    """The handler only records the signal; the checkpoint is written at the next training-step
    boundary (never mid optimiser step), after all ranks agreed on it (one all-reduce per step
    under DDP, so ranks that got the signal at different moments, or only one rank, still stop at
    the same step). It is the same `last.ckpt` a normal resume reads, so the same command (or the
    requeued job) continues exactly there. Only SIGUSR1 requeues a SLURM job (rank 0, `scontrol
    requeue $SLURM_JOB_ID`); SIGTERM and SIGINT stop for good. A second Ctrl-C interrupts at once.

    Lightning installs its own SIGTERM handler when fit starts (it ends the run with exit status 0
    and no checkpoint); the handlers are routed here again once training or the sanity check starts,
    before any DataLoader worker is forked.
    """

    def __init__(self, last_ckpt: Path):
        self.last_ckpt = Path(last_ckpt)
        self.signum = 0  # the signal that asked to stop (0: none)
        self.saved_at: int | None = None
        self._routing = False

    @property
    def requested(self) -> bool:
        return self.signum != 0

    @property
    def stopped_by(self) -> str | None:
        """Name of the signal that stopped the run at `saved_at` (None: not stopped)."""
        return signal.Signals(self.signum).name if self.saved_at is not None else None

    def request(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        self.signum = max(self.signum, int(signum))

    def agreed(self, trainer, device: torch.device) -> int:
        """The signal any rank was asked to stop by (the highest number when they differ; 0: none).
        A single process reads its own: a device tensor here would make every step wait for the GPU
        (`.item()` synchronises)."""
        if trainer.world_size == 1 or not torch.distributed.is_initialized():
            return self.signum
        flag = torch.tensor([float(self.signum)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def _route(self) -> None:
        if self._routing and threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                signal.signal(signum, self.request)

    @contextmanager
    def handling_signals(self):
        """Route SIGUSR1, SIGTERM and SIGINT to `request` for the duration (only possible in the
        main thread); the caller's handlers are back afterwards."""
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = {s: signal.getsignal(s) for s in SIGNALS} if in_main_thread else {}
        self._routing = in_main_thread
        self._route()
        try:
            yield self
        finally:
            self._routing = False
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._route()

    def on_train_start(self, trainer, pl_module) -> None:
        self._route()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.saved_at is not None or 0 < trainer.max_steps <= trainer.global_step:
            return  # already stopping, or the run ends with this step anyway (and counts as finished)
        signum = self.agreed(trainer, pl_module.device)
        if not signum:
            return
        self.signum = signum
        trainer.save_checkpoint(self.last_ckpt)
        self.saved_at = trainer.global_step
        name = signal.Signals(signum).name
        log.warning("%s: saved %s at step %d; stopping", name, self.last_ckpt, trainer.global_step)
        if signum == signal.SIGUSR1 and trainer.is_global_zero:
            requeue_slurm_job()
        trainer.should_stop = True


def requeue_slurm_job() -> None:
    """`scontrol requeue` this SLURM job (array tasks as JOB_TASK); no-op outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        log.warning("not a SLURM job: restart the same command to resume from last.ckpt")
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.error("could not requeue SLURM job %s (%s); resubmit it to resume", job, err)
        return
    if result.returncode:
        log.error("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
    else:
        log.warning("requeued SLURM job %s", job)
