"""Training steps that depend only on (weights, optimiser, batch, seed), so resumed == uninterrupted."""
from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


class ReproducibleSteps(L.Callback):
    """Makes every training step a function of (weights, optimiser, batch, seed) only, so a run
    restarted from a checkpoint continues bit for bit like the uninterrupted one:

    - torch/numpy/python RNGs are reseeded before each training batch from (seed, epoch, batch,
      rank): dropout draws the same masks whatever validation, callbacks or loader start-up
      consumed from the global RNGs in between; checkpoints need no RNG state.
    - the frozen text tower's per-category feature cache is filled one category at a time:
      encoded in a batch, a category's features depend (in the last bits) on which other
      categories shared that first batch, which differs between a resumed and a straight run.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)

    def step_seed(self, epoch: int, batch_idx: int, rank: int) -> int:
        return random.Random(f"{self.seed}-{epoch}-{batch_idx}-{rank}").getrandbits(63)

    @staticmethod
    def _warm_text_cache(model, categories) -> None:
        if getattr(model, "cached_categories", None) is not None and model.cfg.freeze_text_encoder:  # location models
            for category in dict.fromkeys(categories):
                if category not in model.cached_categories:  # a cached one would launch a stack kernel for nothing
                    model.encode_texts([category])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        step_seed = self.step_seed(trainer.current_epoch, batch_idx, trainer.global_rank)
        torch.manual_seed(step_seed)
        np.random.seed(step_seed % 2**32)
        random.seed(step_seed)
        self._warm_text_cache(pl_module.model, batch["category"])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._warm_text_cache(pl_module.model, batch["category"])
