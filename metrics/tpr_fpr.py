"""TPR-FPR of sampled boxes against labelled positive/negative boxes (docs/design/evaluation.md#tpr-fpr).

For each sample N boxes are drawn once; the point for n uses the first n. A ground-truth box is
*hit* when one of those n boxes has IoU >= tau with it (IoU exactly tau is a hit). Reported per n:

- ``tpr@n`` = hit positives / all positives, ``fpr@n`` = hit negatives / all negatives (pooled
  over the dataset, separate denominators);
- ``tpr_shared@n`` / ``fpr_shared@n``: the same hits over all labelled boxes (shared denominator);
- ``precision@n``: among the first n sampled boxes whose best-IoU ground-truth box has IoU >= tau,
  the fraction whose best match is positive (a tie between the best positive and the best
  negative IoU counts as positive); boxes matching nothing are not counted.

Every ratio with a zero denominator is defined as 0 (no NaN), e.g. empty predictions give zeros.
Samples without positives still add their negatives to FPR. When a sample has fewer than n
predictions, all of them are used for point n. All states are sums, so ``compute()`` is exact
under DDP whatever the per-rank sample counts.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence
from torchmetrics import Metric

from genloc.boxes import pairwise_inter_union

__all__ = ["TPRFPR", "DEFAULT_NS", "result_curves"]

DEFAULT_NS = tuple(range(10, 101, 10))

BoxesLike = torch.Tensor | Sequence


def _as_boxes(boxes) -> torch.Tensor:
    t = torch.as_tensor(boxes, dtype=torch.float64) if not isinstance(boxes, torch.Tensor) else boxes.double()
    if t.numel() == 0:
        return t.reshape(0, 4)
    if t.ndim != 2 or t.shape[-1] != 4:
        raise ValueError(f"expected boxes of shape [k, 4], got {tuple(t.shape)}")
    return t


def _pad(boxes: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged ``[k_i, 4]`` boxes into ``[B, K, 4]`` plus a validity mask ``[B, K]``."""
    lengths = torch.tensor([len(b) for b in boxes], device=device)
    width = int(lengths.max()) if len(boxes) else 0
    if width == 0:
        return torch.zeros(len(boxes), 0, 4, dtype=torch.float64, device=device), torch.zeros(
            len(boxes), 0, dtype=torch.bool, device=device)
    padded = pad_sequence([b.to(device) for b in boxes], batch_first=True)
    valid = torch.arange(width, device=device)[None, :] < lengths[:, None]
    return padded, valid


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with 0/0 = 0."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


class TPRFPR(Metric):
    """Pooled hit counts per n for the TPR-FPR curve; see the module docstring for definitions.

    Args:
        ns: curve points (numbers of sampled boxes used), default 10, 20, ..., 100.
        iou_threshold: tau; a ground-truth box is hit at IoU >= tau.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, ns: Sequence[int] = DEFAULT_NS, iou_threshold: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        ns = [int(n) for n in ns]
        if not ns or any(n <= 0 for n in ns) or sorted(set(ns)) != ns:
            raise ValueError(f"ns must be strictly increasing positive integers, got {ns}")
        if not 0.0 < float(iou_threshold) <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        self.ns = ns
        self.iou_threshold = float(iou_threshold)
        k = len(ns)
        for name in ("hit_pos", "hit_neg", "matched", "matched_pos", "num_preds"):
            self.add_state(name, torch.zeros(k, dtype=torch.long), dist_reduce_fx="sum")
        for name in ("num_pos", "num_neg", "num_samples"):
            self.add_state(name, torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred_boxes: BoxesLike, positives: Sequence, negatives: Sequence) -> None:
        """Add one batch.

        Args:
            pred_boxes: ``[B, N, 4]`` tensor, or a list of ``[N_i, 4]`` (ragged), in the frame of the GT.
            positives / negatives: per-sample ``[k_i, 4]`` boxes (tensors or nested lists; k_i may be 0).
        """
        device = self.hit_pos.device
        preds_list = [_as_boxes(p) for p in pred_boxes]
        pos_list = [_as_boxes(p) for p in positives]
        neg_list = [_as_boxes(q) for q in negatives]
        if not len(preds_list) == len(pos_list) == len(neg_list):
            raise ValueError(f"batch sizes differ: {len(preds_list)} predictions, "
                             f"{len(pos_list)} positives, {len(neg_list)} negatives")
        if not preds_list:
            return
        preds, pred_valid = _pad(preds_list, device)                     # [B,N,4], [B,N]
        gts, gt_valid = _pad([torch.cat([p, q]) for p, q in zip(pos_list, neg_list)], device)  # [B,M,4]
        n_pos = torch.tensor([len(p) for p in pos_list], device=device)
        is_pos = torch.arange(gts.shape[1], device=device)[None, :] < n_pos[:, None]  # [B,M]
        is_neg = gt_valid & ~is_pos
        ns = torch.tensor(self.ns, device=device)
        num_n = preds.shape[1]

        inter, union = pairwise_inter_union(preds, gts)                   # [B,N,M]
        # inter >= tau * union rather than IoU >= tau: exact at the threshold
        hit = (inter >= self.iou_threshold * union) & (union > 0)
        hit &= pred_valid[:, :, None] & gt_valid[:, None, :]

        # A GT box is hit at n iff the first prediction hitting it has index < n.
        never = max(self.ns)                                              # no n counts this index
        if num_n:
            index = torch.arange(num_n, device=device)[None, :, None]
            first = torch.where(hit, index, never).amin(dim=1)            # [B,M]
        else:
            first = torch.full(is_pos.shape, never, dtype=torch.long, device=device)
        hit_at = (first[None] < ns[:, None, None]) & gt_valid[None]     # [K,B,M]
        self.hit_pos += (hit_at & is_pos[None]).sum(dim=(1, 2))
        self.hit_neg += (hit_at & is_neg[None]).sum(dim=(1, 2))

        # Matched-prediction precision: a prediction is matched iff its best IoU >= tau.
        if num_n:
            matched = hit.any(dim=2)                                      # [B,N]
            iou = inter / union.clamp(min=torch.finfo(union.dtype).tiny)
            best_pos = torch.where(is_pos[:, None, :], iou, -1.0).amax(dim=2)
            best_neg = torch.where(is_neg[:, None, :], iou, -1.0).amax(dim=2)
            matched_pos = matched & (best_pos >= best_neg)
            at = (ns.clamp(max=num_n) - 1)                                # first n predictions
            self.matched += matched.long().cumsum(dim=1)[:, at].sum(dim=0)
            self.matched_pos += matched_pos.long().cumsum(dim=1)[:, at].sum(dim=0)
            self.num_preds += pred_valid.long().cumsum(dim=1)[:, at].sum(dim=0)

        self.num_pos += int(n_pos.sum())
        self.num_neg += int(is_neg.sum())
        self.num_samples += len(preds_list)

    def compute(self) -> dict[str, torch.Tensor]:
        """Flat dict: rates per n (``tpr@n``, ``fpr@n``, ``tpr_shared@n``, ``fpr_shared@n``,
        ``precision@n``) and the raw counts behind them."""
        total = self.num_pos + self.num_neg
        rates = {
            "tpr": _ratio(self.hit_pos, self.num_pos),
            "fpr": _ratio(self.hit_neg, self.num_neg),
            "tpr_shared": _ratio(self.hit_pos, total),
            "fpr_shared": _ratio(self.hit_neg, total),
            "precision": _ratio(self.matched_pos, self.matched),
            "hit_positives": self.hit_pos,
            "hit_negatives": self.hit_neg,
            "matched_predictions": self.matched,
            "matched_positive_predictions": self.matched_pos,
            "num_predictions": self.num_preds,
        }
        out = {f"{name}@{n}": values[i] for name, values in rates.items() for i, n in enumerate(self.ns)}
        out.update(num_samples=self.num_samples, num_positives=self.num_pos, num_negatives=self.num_neg)
        return out


def result_curves(result: dict, ns: Sequence[int]) -> dict[str, list[float]]:
    """Turn a flat ``compute()`` dict into per-quantity lists over ``ns`` (for JSON files and plots)."""
    names = ("tpr", "fpr", "tpr_shared", "fpr_shared", "precision")
    return {"n": [int(n) for n in ns], **{k: [float(result[f"{k}@{n}"]) for n in ns] for k in names}}
