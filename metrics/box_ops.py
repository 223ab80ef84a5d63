"""Vectorised box geometry for ``x1,y1,x2,y2`` boxes in any consistent frame (pixels or normalised).

Computed in float64 so pixel areas stay exact and the threshold test ``inter >= tau * union``
(used instead of ``inter / union >= tau``) gives IoU exactly equal to tau as a hit.
"""
from __future__ import annotations

import torch

__all__ = ["box_area", "pairwise_inter_union", "pairwise_iou", "iou_at_least"]


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of ``[..., 4]`` boxes; inverted boxes have area 0."""
    boxes = boxes.double()
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def pairwise_inter_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union areas of every pair: ``a[..., N, 4]`` x ``b[..., M, 4]`` -> ``[..., N, M]``."""
    a, b = a.double(), b.double()
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
    return inter, union


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every pair, ``[..., N, M]``; 0 where the union is empty (two degenerate boxes)."""
    inter, union = pairwise_inter_union(a, b)
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))


def iou_at_least(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Boolean ``[..., N, M]``: IoU >= tau, tested as ``inter >= tau * union`` (exact at the threshold)."""
    inter, union = pairwise_inter_union(a, b)
    return (inter >= tau * union) & (union > 0)
