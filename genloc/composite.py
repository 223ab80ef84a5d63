"""Copy-paste composites, as the object-placement field makes them (OPA, GracoNet, TopNet, FOPA):
the foreground image and its mask scaled into a box and pasted onto the background.

Pure numpy / PIL. Boxes are pixel ``x1,y1,x2,y2`` of the background; the box covers the pixels
`genloc.boxes.pixel_rect` gives (the one rasterisation rule), so every pixel outside that
rectangle is the background's own, untouched. The foreground is stretched to the rectangle (the
field's boxes already have the foreground's aspect ratio); RGB is resized bilinearly and the mask
with nearest neighbours, so a binary mask stays binary and the paste is hard (no blending), as in
OPA's composites.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image

from .boxes import pixel_rect

__all__ = ["Composite", "composite", "composite_many"]


class Composite(NamedTuple):
    image: np.ndarray  # uint8 [H, W, 3]: the background with the foreground pasted into the box
    mask: np.ndarray   # bool [H, W]: the pixels the foreground covers (inside the box only)


def _as_mask(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m.max(axis=2)
    return m > 127 if m.dtype == np.uint8 else m.astype(bool)


def composite(background: np.ndarray, foreground: np.ndarray, mask: np.ndarray, box) -> Composite:
    """Paste ``foreground`` (uint8 ``[h, w, 3]``) where ``mask`` (bool, or uint8 > 127, ``[h, w]``) is
    set, scaled into the pixel ``box`` of ``background`` (uint8 ``[H, W, 3]``)."""
    bg = np.asarray(background)
    fg = np.asarray(foreground)
    if bg.ndim != 3 or bg.shape[2] != 3 or fg.ndim != 3 or fg.shape[2] != 3:
        raise ValueError(f"background and foreground must be RGB [h, w, 3] arrays, got {bg.shape} and {fg.shape}")
    m = _as_mask(mask)
    if m.shape != fg.shape[:2]:
        raise ValueError(f"mask {m.shape} does not match the foreground {fg.shape[:2]}")
    H, W = bg.shape[:2]
    x0, y0, x1, y1 = pixel_rect(box, (W, H))
    size = (x1 - x0, y1 - y0)
    fg_scaled = np.asarray(Image.fromarray(fg.astype(np.uint8)).resize(size, Image.BILINEAR))
    m_scaled = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
    image = bg.astype(np.uint8, copy=True)
    region = image[y0:y1, x0:x1]
    region[m_scaled] = fg_scaled[m_scaled]
    out_mask = np.zeros((H, W), bool)
    out_mask[y0:y1, x0:x1] = m_scaled
    return Composite(image, out_mask)


def composite_many(background: np.ndarray, foreground: np.ndarray, mask: np.ndarray, boxes) -> list[Composite]:
    """`composite` for each pixel box of ``boxes`` ``[N, 4]`` (one background, one foreground)."""
    return [composite(background, foreground, mask, b) for b in np.asarray(boxes, dtype=np.float64).reshape(-1, 4)]
