"""Checkpoint writing: atomic files, and a `last.ckpt` that always holds the final step."""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from genloc.checkpoint import atomic_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Every local checkpoint (last.ckpt included) goes through `atomic_save`: never half-written."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)


def checkpoint_plugins() -> list:
    """Atomic checkpoint IO; under SLURM our own SIGUSR1 handling (callbacks.preemption) replaces
    Lightning's auto-requeue, which saves an `hpc_ckpt_*.ckpt` from inside the signal handler,
    possibly mid-step."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


class FinalCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` also holds the final step when max_steps is not a multiple
    of the checkpoint interval (Lightning saves `last` at train end only when nothing was saved).

    Public hooks only: `on_save_checkpoint` sees every checkpoint the trainer writes, so the step
    of the newest one is known without reading ModelCheckpoint's internals.
    """

    saved_step: int | None = None  # global step of the newest checkpoint written

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.saved_step = trainer.global_step
        return super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer, pl_module) -> None:
        # replaces ModelCheckpoint's own rule, which would also re-save `last` after a pre-emption
        # save, when the epoch counter has already moved on
        if self.save_last and self.dirpath and self.saved_step != trainer.global_step:
            trainer.save_checkpoint(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
