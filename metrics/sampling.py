"""Boxes for every sample of a shard split, drawn by a location model's batched sampler: the model
side of the TPR-FPR evaluation (free size, or given size: `metrics.annotations.size_groups`)."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from metrics.annotations import EvaluationError
from metrics.options import MAX_SAMPLING_BATCH, Sampling, default_device  # noqa: F401 (their home is metrics.options)

def given_sizes(groups: list[dict], sizes: torch.Tensor, owners: list[int], num_bins: int) -> torch.Tensor:
    """Normalised exact ``(w, w, h, h)`` per group row for `LocationModel.sample`, clamped to 1..num_bins-1 bins."""
    wh = torch.tensor([g["given_size"] for g in groups], dtype=torch.float64)
    norm = wh / sizes[owners].double().cpu()
    norm = norm.clamp(1.0 / num_bins, (num_bins - 1.0) / num_bins)
    return norm[:, [0, 0, 1, 1]]


def sampling_batch_size(model, sampling: Sampling) -> int:
    """``sampling.batch_size``, or the most images per call the memory budget fits, at most `MAX_SAMPLING_BATCH`."""
    if sampling.batch_size is not None:
        return sampling.batch_size
    fits = model.sampling_batch_size(sampling.num_samples, sampling.sampling_memory * 2 ** 30)
    if fits < MAX_SAMPLING_BATCH:
        print(f"note: --sampling-memory {sampling.sampling_memory:g} GiB fits {fits} images per sampling call; the "
              f"boxes drawn for a seed depend on this batch size (recorded in metrics.json)", file=sys.stderr)
    return min(MAX_SAMPLING_BATCH, fits)


def evaluation_model(checkpoint, device: str):
    """The location model of a checkpoint, model folder or Hub id (a loaded model is returned as it is);
    unreadable ones are an `EvaluationError`."""
    if isinstance(checkpoint, torch.nn.Module):
        return checkpoint
    from genloc.checkpoint import ModelSourceError
    from genloc.hub import load_model

    try:
        return load_model(checkpoint, device)
    except ModelSourceError as e:
        raise EvaluationError(str(e)) from None


def split_loader(data, split: str, model, batch_size: int, sampling: Sampling):
    """The evaluation loader of ``data``/``split`` at the model's input size: no flips, shard order."""
    from datamodules import ShardDataModule

    dm = ShardDataModule(data, image_size=model.cfg.image_size, batch_size=batch_size,
                         num_workers=sampling.num_workers, seed=sampling.seed, flip_prob=0.0, train_split=None,
                         val_split=None, test_split=split)
    dm.setup("test")
    return dm.test_dataloader()


def sample_boxes(checkpoint, data, split: str, sampling: Sampling, groups: list[dict] | None = None,
                 progress: bool = True) -> tuple[dict[str, np.ndarray], int]:
    """N boxes (pixels) per sample of ``data``/``split`` from the model's batched sampler, one seeded
    generator over the whole pass (same model, data and batch size -> same boxes). With ``groups``
    (`size_groups`), N boxes of each group's size per group, keyed by group. Returns the boxes and
    the batch size used (the boxes of a seed depend on it)."""
    model = evaluation_model(checkpoint, sampling.device)
    batch_size = sampling_batch_size(model, sampling)
    by_key: dict[str, list[dict]] = {}
    for g in groups or []:
        by_key.setdefault(g["source_key"], []).append(g)
    draw = _Draw(model, sampling, torch.Generator(device=sampling.device).manual_seed(sampling.seed),
                 f"the {split} loader of {data}")
    preds: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for batch in tqdm(split_loader(data, split, model, batch_size, sampling), desc="sampling",
                          disable=not progress, leave=False):
            if groups is None:
                draw(batch, list(range(len(batch["key"]))), None, preds)
                continue
            pairs = [(i, g) for i, key in enumerate(batch["key"]) for g in by_key.get(key, [])]
            for start in range(0, len(pairs), batch_size):
                owners, rows = map(list, zip(*pairs[start:start + batch_size]))
                draw(batch, owners, rows, preds)
    return preds, batch_size


@dataclass
class _Draw:
    """One `LocationModel.sample` call for some rows of a batch (``rows``: size groups, or None: free size)."""
    model: object
    sampling: Sampling
    generator: torch.Generator
    source: str

    def __call__(self, batch: dict, owners: list[int], rows: list[dict] | None, preds: dict) -> None:
        s, device = self.sampling, self.sampling.device
        idx = torch.tensor(owners)
        size = None if rows is None else given_sizes(rows, batch["size"], owners, self.model.cfg.num_bins).to(device)
        out = self.model.sample(batch["image"][idx].to(device), [batch["category"][i] for i in owners],
                                n=s.num_samples, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                generator=self.generator, image_sizes=batch["size"][idx].to(device), size=size,
                                bf16=s.bf16)
        keys = [batch["key"][i] for i in owners] if rows is None else [g["key"] for g in rows]
        for i, (key, boxes) in enumerate(zip(keys, out.boxes.double().cpu().numpy())):
            if key in preds:
                twice = key if rows is None else rows[i]["source_key"]
                raise EvaluationError(f"{self.source} yielded key {twice!r} twice")
            preds[key] = boxes
