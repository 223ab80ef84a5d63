"""Pre-emption: SIGUSR1 (SLURM `--signal=SIGUSR1@90`, or `kill -USR1`) -> last.ckpt -> requeue -> stop."""
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


class Preemption(L.Callback):
    """The handler only raises a flag; the checkpoint is written at the next training-step boundary
    (never mid optimiser step), after all ranks agreed on the flag (one all-reduce per step under
    DDP, so ranks that got the signal at different moments still stop at the same step). It is
    the same `last.ckpt` a normal resume reads, so the requeued job continues exactly there.
    Rank 0 then runs `scontrol requeue $SLURM_JOB_ID` when inside a SLURM job.
    """

    def __init__(self, last_ckpt: Path):
        self.last_ckpt = Path(last_ckpt)
        self.requested = False
        self.saved_at: int | None = None

    def request(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, trainer, device: torch.device) -> bool:
        """Whether any rank was asked to stop. A single process reads its own flag: a device tensor
        here would make every step wait for the GPU (`.item()` synchronises)."""
        if trainer.world_size == 1 or not torch.distributed.is_initialized():
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    @contextmanager
    def handling_sigusr1(self):
        """Route SIGUSR1 to `request` for the duration (only possible in the main thread)."""
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGUSR1, self.request) if in_main_thread else None
        try:
            yield self
        finally:
            if in_main_thread:
                signal.signal(signal.SIGUSR1, previous)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self.agreed(trainer, pl_module.device) or self.saved_at is not None:
            return
        self.requested = True
        trainer.save_checkpoint(self.last_ckpt)
        self.saved_at = trainer.global_step
        log.warning("pre-empted: saved %s at step %d; stopping", self.last_ckpt, trainer.global_step)
        if trainer.is_global_zero:
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
