"""Box geometry in one place: conversions, normalisation, flips, pixel rectangles, IoU, validation.

Boxes are ``x1,y1,x2,y2`` unless a function name says otherwise, with the last dimension holding
the four coordinates (``[..., 4]``). Conversions accept torch tensors or anything numpy reads and
return the same kind (a tensor stays a tensor on its device and dtype; other inputs come back as
float64 numpy arrays; the FOPA integer rule always returns numpy). An image size is
``(width, height)``, or a ``[..., 2]`` tensor of them.

The validity rule (``validate_boxes``) is the only one in the framework; converters, the data
pipeline and the tokenizer all call it, so a box means the same thing at every stage:

    A box is valid when its four coordinates are finite, ``x1 < x2`` and ``y1 < y2``, and it lies
    inside the image grown by ``TOLERANCE`` of the image's width on the left and right and of its
    height above and below. A valid box is clipped to the image and must keep a positive area.

The tolerance is a fraction of the image side, so the rule reads the same in pixels and in
normalised coordinates (the unit image): normalising a box never changes its verdict.

IoU is computed in float64 so pixel areas stay exact, and the threshold test ``inter >= tau *
union`` (rather than ``inter / union >= tau``) counts IoU exactly equal to tau as a hit.
"""
from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["TOLERANCE", "PROBLEMS", "BoxCheck", "validate_boxes", "xywh_to_xyxy", "xyxy_to_xywh",
           "cxcywh_to_xyxy", "xyxy_to_cxcywh", "fopa_centre_to_xyxy", "xyxy_to_fopa_centre", "normalise",
           "denormalise", "hflip", "pixel_rect", "pixel_rects", "box_area", "pairwise_inter_union",
           "pairwise_iou", "iou_at_least", "looks_normalised"]

# Allowed overhang, as a fraction of the image side: absorbs the rounding of labelled pixel boxes and
# float slack of computed boxes, while a pixel box mistaken for a normalised one is far outside.
TOLERANCE = 0.01

# Problem codes of `validate_boxes` (code 0 is a valid box; code k names PROBLEMS[k - 1]).
PROBLEMS = ("not finite (NaN or infinite coordinate)", "empty (needs x1 < x2 and y1 < y2)", "outside the image",
            "empty after clipping to the image")


def _split(boxes):
    """The four coordinates of ``[..., 4]`` boxes as a tensor or float64 array, plus a stacker."""
    if isinstance(boxes, torch.Tensor):
        return boxes, lambda cols: torch.stack(cols, dim=-1)
    return np.asarray(boxes, dtype=np.float64), lambda cols: np.stack(cols, axis=-1)


def _whwh(size, like):
    """``(w, h)`` or a ``[..., 2]`` tensor of sizes -> ``(w, h, w, h)`` broadcastable against ``like``."""
    if isinstance(like, torch.Tensor):
        size = torch.as_tensor(size, device=like.device)
        dtype = like.dtype if like.is_floating_point() else torch.float32
        return torch.cat([size, size], dim=-1).to(dtype)
    size = np.asarray(size, dtype=np.float64)
    return np.concatenate([size, size], axis=-1)


# ----------------------------------------------------------------------------- conversions
def xywh_to_xyxy(boxes):
    """Top-left corner plus width and height (OPA's ``position``) -> corners."""
    b, stack = _split(boxes)
    return stack([b[..., 0], b[..., 1], b[..., 0] + b[..., 2], b[..., 1] + b[..., 3]])


def xyxy_to_xywh(boxes):
    """Corners -> top-left corner plus width and height."""
    b, stack = _split(boxes)
    return stack([b[..., 0], b[..., 1], b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]])


def cxcywh_to_xyxy(boxes):
    """Centre plus width and height -> corners (float: the centre is exactly mid-box)."""
    b, stack = _split(boxes)
    return stack([b[..., 0] - b[..., 2] / 2, b[..., 1] - b[..., 3] / 2,
                  b[..., 0] + b[..., 2] / 2, b[..., 1] + b[..., 3] / 2])


def xyxy_to_cxcywh(boxes):
    """Corners -> centre plus width and height."""
    b, stack = _split(boxes)
    return stack([(b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2,
                  b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]])


def fopa_centre_to_xyxy(boxes):
    """FOPA's integer centre rule: ``cx, cy, w, h`` -> top-left ``(cx - w//2, cy - h//2)``, size ``w x h``.

    FOPA stores the centre OPA computed from its top-left corner with integer halving, so this is
    the exact inverse of `xyxy_to_fopa_centre` on integer pixel boxes (coordinates truncate to int)."""
    b = np.trunc(np.asarray(boxes, dtype=np.float64))
    x1 = b[..., 0] - np.floor_divide(b[..., 2], 2)
    y1 = b[..., 1] - np.floor_divide(b[..., 3], 2)
    return np.stack([x1, y1, x1 + b[..., 2], y1 + b[..., 3]], axis=-1)


def xyxy_to_fopa_centre(boxes):
    """Integer pixel corners -> FOPA's ``cx, cy, w, h`` with ``cx = x1 + w//2``, ``cy = y1 + h//2``."""
    b = np.trunc(np.asarray(boxes, dtype=np.float64))
    w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    return np.stack([b[..., 0] + np.floor_divide(w, 2), b[..., 1] + np.floor_divide(h, 2), w, h], axis=-1)


def normalise(boxes, size):
    """Pixel boxes of an image of ``size`` -> coordinates in [0, 1] of that image (same dtype)."""
    b, _ = _split(boxes)
    return b / _whwh(size, b)


def denormalise(boxes, size):
    """Normalised boxes -> pixel boxes of an image of ``size`` (same dtype)."""
    b, _ = _split(boxes)
    return b * _whwh(size, b)


def hflip(boxes, width=1):
    """Boxes of the horizontally mirrored image: ``x1' = width - x2``, ``x2' = width - x1``
    (``width`` 1 for normalised boxes)."""
    b, stack = _split(boxes)
    return stack([width - b[..., 2], b[..., 1], width - b[..., 0], b[..., 3]])


# ----------------------------------------------------------------------------- pixel rectangles
def pixel_rect(box, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Integer pixel rectangle ``[x0, x1) x [y0, y1)`` covering a float pixel box, clipped and non-empty.

    The one rasterisation rule of masks, crops and the background metric, so they agree on which
    pixels belong to a box: every pixel the box touches, at least one pixel."""
    w, h = size
    x1, y1, x2, y2 = (float(v) for v in box)
    x0 = min(max(int(np.floor(x1)), 0), w - 1)
    y0 = min(max(int(np.floor(y1)), 0), h - 1)
    return x0, y0, min(max(int(np.ceil(x2)), x0 + 1), w), min(max(int(np.ceil(y2)), y0 + 1), h)


def pixel_rects(boxes_norm: torch.Tensor, size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """`pixel_rect` of each normalised box ``[B, 4]`` in an image of ``size`` (scaled in float64)."""
    return [pixel_rect(b, size) for b in denormalise(boxes_norm.detach().cpu().double(), size)]


# ----------------------------------------------------------------------------- areas and IoU
def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of ``[..., 4]`` boxes (float64); inverted boxes have area 0."""
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


# ----------------------------------------------------------------------------- validation
class BoxCheck(NamedTuple):
    """Verdicts of `validate_boxes` on ``[..., 4]`` boxes (float64 numpy arrays): the boxes as given,
    the boxes clipped to the image, the image extent per coordinate, and one problem code per box
    (``[...]``, 0 = valid, k = ``PROBLEMS[k - 1]``)."""

    boxes: np.ndarray
    clipped: np.ndarray
    extent: np.ndarray
    problem: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        return self.problem == 0

    def counts(self) -> Counter:
        """Number of invalid boxes per problem text."""
        return Counter(PROBLEMS[k - 1] for k in self.problem.ravel().tolist() if k)

    def raise_first(self, what: str = "box", error: type[Exception] = ValueError) -> None:
        """Raise ``error`` naming the first invalid box (index, coordinates, problem) and the count."""
        bad = ~self.valid
        if not bad.any():
            return
        idx = tuple(int(i[0]) for i in np.nonzero(bad)) if bad.ndim else ()
        w, h = self.extent[idx][:2].tolist()
        extent = "[0, 1] (normalised)" if w == h == 1 else f"the {w:g}x{h:g} image"
        raise error(f"{PROBLEMS[int(self.problem[idx]) - 1]}: {what} at index {idx} = {self.boxes[idx].tolist()}; "
                    f"a box needs x1 < x2, y1 < y2 and must lie in {extent} up to {TOLERANCE:.0%} of the side; "
                    f"{int(bad.sum())} bad box(es) in total")


def validate_boxes(boxes, size=None) -> BoxCheck:
    """Apply the validity rule of this module's docstring to ``[..., 4]`` boxes.

    ``size``: the image ``(width, height)`` (or ``[..., 2]`` sizes broadcastable against the boxes)
    for pixel boxes; None for normalised boxes. Returns a `BoxCheck`; the caller decides whether a
    bad box is an error (`BoxCheck.raise_first`) or dropped and counted (`BoxCheck.counts`).
    Computed in float64 numpy: cheap enough to run on every decoded sample.
    """
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().cpu().numpy()
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0 and b.shape[-1:] != (4,):
        b = b.reshape(0, 4)
    if b.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape [..., 4] (x1, y1, x2, y2), got {b.shape}")
    if isinstance(size, torch.Tensor):
        size = size.detach().cpu().numpy()
    hi = np.broadcast_to(np.ones(4) if size is None else _whwh(size, b), b.shape)
    if (hi <= 0).any():
        raise ValueError(f"image sizes must be positive, got {np.asarray(size).tolist()}")
    slack = TOLERANCE * hi
    clipped = np.minimum(np.maximum(b, 0.0), hi)
    rules = (  # NaN coordinates compare False everywhere below; the first rule names them
        ~np.isfinite(b).all(-1),
        (b[..., 2] <= b[..., 0]) | (b[..., 3] <= b[..., 1]),
        ((b < -slack) | (b > hi + slack)).any(-1),
        (clipped[..., 2] <= clipped[..., 0]) | (clipped[..., 3] <= clipped[..., 1]),
    )
    problem = np.zeros(b.shape[:-1], dtype=np.int64)
    for code, broken in reversed(list(enumerate(rules, 1))):  # the first rule a box breaks names it
        problem[broken] = code
    return BoxCheck(b, clipped, hi, problem)


def looks_normalised(boxes, size) -> np.ndarray:
    """``bool [...]``: pixel boxes whose four coordinates all lie in [0, 1] of an image more than two
    pixels on each side -- the mark of normalised boxes given where pixels are expected (a real pixel
    box there would sit inside the top-left pixel). The one rule for evaluate.py's predictions and
    `genloc.score`'s boxes."""
    b = np.asarray(boxes, dtype=np.float64)
    return (b <= 1.0).all(-1) & (min(float(v) for v in size) > 2)
