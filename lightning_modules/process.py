"""Process-wide settings a training run makes (train.py): TF32 on CUDA, the ``ddp_gloo`` strategy name,
the Lightning warnings that are wrong for this setup, and errors cut to their own line."""
from __future__ import annotations

import warnings

import torch


def use_tf32(enabled: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA (bf16-mixed runs keep their fp32
    parts exact enough); a machine without CUDA is left untouched, so CPU results cannot change."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def register_strategies() -> None:
    """``trainer.strategy=ddp_gloo``: DDP over gloo on any accelerator. NCCL refuses two ranks on one
    GPU; gloo lets two ranks share it, so the DDP code paths run on CUDA tensors where only one GPU is at
    hand (`make smoke-gpu`'s DDP part, docs/gpu.md)."""
    from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

    if "ddp_gloo" not in StrategyRegistry:
        StrategyRegistry.register("ddp_gloo", DDPStrategy, description="DDP over the gloo process group",
                                  process_group_backend="gloo")


def ignore_false_lightning_warnings() -> None:
    """Call inside `warnings.catch_warnings()`, so the caller's filters are back once it returns."""
    # Lightning only knows stateful DataLoaders; ours restore the position through the datamodule's
    # state_dict, so its "dataloader is not resumable" warning on a mid-epoch resume is wrong here.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # Each loader worker is configured for its own shards, so the length Lightning doubts is exact;
    # the frozen encoders are in eval mode on purpose.
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # The run folder holds this run's own checkpoints by design (resumed from, locked against others).
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
    # The modules encode and check token boxes on the host before a batch moves (on_before_batch_transfer);
    # the datamodule has no such hook, so the module's is the one meant.
    warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer` in `LightningModule`")


def one_line(err: Exception) -> str:
    """The error's own message; one a DataLoader worker raised comes back wrapped in the worker's
    traceback ("Caught X in DataLoader worker process N ..."), whose last line holds it."""
    text = str(err).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text
