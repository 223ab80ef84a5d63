"""The model side of the ranking metric and of re-ranking (docs/design/evaluation.md#ranking): a
location model's log-probability of given boxes (`LocationModel.score_tokens`: no sampling, one
prefix pass per image) for the labelled boxes and for any method's proposals of a shard split."""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from metrics.ranking import ranking_metrics
from metrics.sampling import MAX_SAMPLING_BATCH, Sampling, split_loader
from genloc.boxes import normalise, validate_boxes


def box_scores(model, images: torch.Tensor, categories, boxes: list[torch.Tensor]) -> list[torch.Tensor]:
    """Log-probabilities (float64, CPU) of normalised ``boxes[i]`` ``[k_i, 4]`` for image ``i``, in one call."""
    counts = [len(b) for b in boxes]
    tokens = model.tokenizer.encode(torch.cat(boxes)) if sum(counts) else torch.zeros(0, 4, dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(boxes)), torch.tensor(counts, dtype=torch.long))
    device = next(model.parameters()).device
    log_probs = model.score_tokens(images.to(device), list(categories), tokens, owner)
    return list(log_probs.double().cpu().split(counts))


def labelled_scores(model, batch: dict, take: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Scores of the labelled boxes of the first ``take`` samples of a loader batch: positives and
    negatives per sample (the groups of `metrics.ranking`)."""
    take = len(batch["category"]) if take is None else take
    pos, neg = batch["positives"][:take], batch["negatives"][:take]
    boxes = [torch.cat([p.reshape(-1, 4), q.reshape(-1, 4)]) for p, q in zip(pos, neg)]
    scores = box_scores(model, batch["image"][:take], batch["category"][:take], boxes)
    return [s[:len(p)] for s, p in zip(scores, pos)], [s[len(p):] for s, p in zip(scores, pos)]


def split_ranking(model, data, split: str, sampling: Sampling, progress: bool = True) -> dict:
    """`metrics.ranking.ranking_metrics` of the model's scores of every labelled box of ``data``/``split``."""
    groups = []
    loader = split_loader(data, split, model, sampling.batch_size or MAX_SAMPLING_BATCH, sampling)
    with torch.no_grad():
        for batch in tqdm(loader, desc="ranking", disable=not progress, leave=False):
            pos, neg = labelled_scores(model, batch)
            groups += zip(batch["category"], pos, neg)
    return ranking_metrics(groups)


def rerank(model, data, split: str, preds: dict[str, np.ndarray], keep: int, sampling: Sampling,
           progress: bool = True) -> tuple[dict[str, np.ndarray], int]:
    """Each sample's proposals (pixels) ordered by the model's score, highest first (ties keep the
    file's order), the first ``keep`` kept. Proposals the box rule rejects cannot be scored: they rank
    last. Returns the re-ranked proposals of the samples found in ``data``/``split`` and the number of
    unscorable proposals."""
    out: dict[str, np.ndarray] = {}
    unscorable = 0
    loader = split_loader(data, split, model, sampling.batch_size or MAX_SAMPLING_BATCH, sampling)
    with torch.no_grad():
        for batch in tqdm(loader, desc="re-ranking", disable=not progress, leave=False):
            rows = [i for i, key in enumerate(batch["key"]) if key in preds]
            if not rows:
                continue
            sizes = [tuple(batch["size"][i].tolist()) for i in rows]
            checks = [validate_boxes(preds[batch["key"][i]], size) for i, size in zip(rows, sizes)]
            boxes = [torch.from_numpy(normalise(c.clipped[c.valid], size)).float() for c, size in zip(checks, sizes)]
            scores = box_scores(model, batch["image"][rows], [batch["category"][i] for i in rows], boxes)
            for i, check, score in zip(rows, checks, scores):
                full = np.full(len(check.valid), -np.inf)
                full[check.valid] = score.numpy()
                unscorable += int((~check.valid).sum())
                out[batch["key"][i]] = check.boxes[np.argsort(-full, kind="stable")[:keep]]
    return out, unscorable
