"""Object insertion geometry: masks, feathering, context crops and paste-back (pure numpy / PIL).

Boxes here are *pixel* `x1,y1,x2,y2` of the input image: this is the edge of the framework where
pixels appear (docs/ARCHITECTURE.md). The back-ends in `genloc/inpainters/` use these helpers so
that every back-end, in every mode, changes only pixels inside the mask.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .boxes import pixel_rect
from .choices import REGIONS  # noqa: F401 (genloc.placement takes the region words from here)

PROMPT_TEMPLATE = "a photo of a {}"


def box_mask(box, size: tuple[int, int], dilate: int = 0) -> np.ndarray:
    """`bool[h, w]`: the box's pixel rectangle grown by `dilate` px (clipped to the image)."""
    w, h = size
    x0, y0, x1, y1 = pixel_rect(box, size)
    mask = np.zeros((h, w), bool)
    mask[max(y0 - dilate, 0):min(y1 + dilate, h), max(x0 - dilate, 0):min(x1 + dilate, w)] = True
    return mask


def grow_mask(mask: np.ndarray, dilate: int) -> np.ndarray:
    """Square dilation by `dilate` px (a free-form mask's counterpart of growing a box)."""
    if dilate <= 0:
        return mask
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, structure=np.ones((2 * dilate + 1, 2 * dilate + 1), bool))


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight pixel rectangle `[x0, x1) x [y0, y1)` of a non-empty boolean mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("the mask is empty: nothing to inpaint")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def feathered_alpha(mask: np.ndarray, feather: int = 0) -> np.ndarray:
    """Blend weights `float32[h, w]`, feathered *inside* the mask only: a mask pixel `d` px (chessboard)
    from the nearest non-mask pixel gets `min(1, d / (feather + 1))`; every pixel outside the mask
    gets exactly 0, so the paste-back never changes it. The image border is not a seam."""
    alpha = mask.astype(np.float32)
    if feather <= 0 or not mask.any():
        return alpha
    from scipy.ndimage import distance_transform_cdt

    h, w = mask.shape
    x0, y0, x1, y1 = mask_bbox(mask)
    # one ring of context (clipped at the image border, which therefore never counts as "outside")
    x0, y0, x1, y1 = max(x0 - 1, 0), max(y0 - 1, 0), min(x1 + 1, w), min(y1 + 1, h)
    sub = mask[y0:y1, x0:x1]
    if sub.all():
        return alpha
    dist = distance_transform_cdt(sub, metric="chessboard").astype(np.float32)
    alpha[y0:y1, x0:x1] = np.minimum(dist / (feather + 1.0), 1.0)
    return alpha


def context_rect(rect, size: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
    """Square context crop around pixel `rect`: side = its long side x (1 + 2 x margin), centred on it,
    moved inside the image (never cutting the rect) and clipped where the image is too small."""
    w, h = size
    x0, y0, x1, y1 = rect
    side = math.ceil(max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin))

    def span(lo, hi, limit):
        s = min(side, limit)
        start = int(round((lo + hi - s) / 2))
        start = min(max(start, 0), limit - s)
        return start, start + s

    cx0, cx1 = span(x0, x1, w)
    cy0, cy1 = span(y0, y1, h)
    return cx0, cy0, cx1, cy1


def working_size(size: tuple[int, int], resolution: int, multiple: int = 8) -> tuple[int, int]:
    """Pipeline canvas: long side `resolution`, aspect kept up to rounding to `multiple` (VAE stride)."""
    w, h = size
    scale = resolution / max(w, h)
    return tuple(max(multiple, int(round(v * scale / multiple)) * multiple) for v in (w, h))


def composite(original: Image.Image, generated: Image.Image, alpha: np.ndarray) -> Image.Image:
    """Alpha-blend `generated` over `original` (same size); pixels with alpha 0 are copied untouched."""
    orig = np.asarray(original.convert("RGB"))
    gen = np.asarray(generated.convert("RGB").resize(original.size, Image.BICUBIC))
    a = alpha[..., None]
    blend = np.rint(a * gen + (1.0 - a) * orig).clip(0, 255).astype(np.uint8)
    return Image.fromarray(np.where(a > 0, blend, orig))


def prompt_for(category: str, template: str = PROMPT_TEMPLATE) -> str:
    return template.format(category)
