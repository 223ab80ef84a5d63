"""The optimiser of every stage: AdamW with linear warmup, then cosine decay to a floor."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from genloc.config import ArgumentError


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def fused_kernel_available(params) -> bool:
    """Whether torch's fused AdamW is used for these parameters: only on CUDA, so CPU runs keep the
    default implementation's numbers."""
    return all(p.is_cuda for p in params)


@dataclass
class AdamWCosine:
    """AdamW (no weight decay on biases and norms) and its per-step LR schedule.

    ``fused``: torch's single-kernel AdamW when every trained parameter is on a CUDA device (one
    launch per step instead of several per parameter); elsewhere the default implementation runs,
    so CPU results do not depend on it.
    """

    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    fused: bool = True

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, allowed: str) -> None:
            if not ok:
                raise ArgumentError(key, getattr(self, key), allowed)

        need(self.lr >= 0, "lr", ">= 0")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "two values in [0, 1)")
        need(self.warmup_steps >= 0, "warmup_steps", ">= 0")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "[0, 1]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def build(self, named_parameters, total_steps: int, allow_fused: bool = True) -> dict:
        """Lightning's `configure_optimizers` answer for these parameters over `total_steps` steps;
        ``allow_fused=False`` keeps the unfused AdamW whatever ``fused`` says."""
        decay, no_decay = [], []
        for name, param in named_parameters:
            if param.requires_grad:
                (no_decay if param.ndim < 2 or "ln" in name or "norm" in name else decay).append(param)
        trained = decay + no_decay
        on_cuda = self.fused and allow_fused and trained and fused_kernel_available(trained)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            betas=tuple(self.betas),
            **({"fused": True} if on_cuda else {}),
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.warmup_steps, total_steps, self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
