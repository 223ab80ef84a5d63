"""A flat foreground sprite per toy class, so toy scenes have copy-paste composites
(`genloc.composite`): car, person, bird and lamp as a few filled shapes on a square canvas.

The colours come from a generator of their own, derived from the scene's seed and the class
(`SPRITE_STREAM` keeps it apart from every stream `scenes` draws from), so drawing a sprite never
changes a scene, its image or its boxes. The canvas has the class's rule aspect ratio (the
toy rules' width/height: car 2.0, person 0.4, bird 1.75, lamp 0.55), so a plausible box stretches
it little.
"""
from __future__ import annotations

import numpy as np

__all__ = ["SPRITE_STREAM", "sprite"]

SPRITE_STREAM = 7  # the last seed word of a sprite's generator; scenes use (seed) and (seed, split, index, flavour)
_ASPECT = {"car": 2.0, "person": 0.4, "bird": 1.75, "lamp": 0.55}
_HEIGHT = 32


def _ellipse(X, Y, cx, cy, rx, ry):
    return ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 <= 1


def _rect(X, Y, x0, y0, x1, y1):
    return (X >= x0) & (X <= x1) & (Y >= y0) & (Y <= y1)


def _parts(category: str, X, Y):
    """(mask, colour index) of each shape, in normalised canvas coordinates; later parts are on top."""
    if category == "car":
        return [(_rect(X, Y, 0.02, 0.4, 0.98, 0.8), 0), (_rect(X, Y, 0.22, 0.08, 0.72, 0.45), 0),
                (_rect(X, Y, 0.3, 0.15, 0.64, 0.4), 1), (_ellipse(X, Y, 0.24, 0.82, 0.1, 0.18), 2),
                (_ellipse(X, Y, 0.76, 0.82, 0.1, 0.18), 2)]
    if category == "person":
        return [(_ellipse(X, Y, 0.5, 0.09, 0.32, 0.09), 1), (_rect(X, Y, 0.1, 0.19, 0.9, 0.6), 0),
                (_rect(X, Y, 0.15, 0.6, 0.45, 1.0), 2), (_rect(X, Y, 0.55, 0.6, 0.85, 1.0), 2)]
    if category == "bird":
        return [(_ellipse(X, Y, 0.5, 0.6, 0.32, 0.25), 0), (_ellipse(X, Y, 0.82, 0.45, 0.14, 0.17), 0),
                (((Y - 0.55) < -0.9 * np.abs(X - 0.45)) & (Y > 0.02), 1), (_rect(X, Y, 0.94, 0.4, 1.0, 0.5), 2)]
    if category == "lamp":
        return [(_rect(X, Y, 0.2, 0.9, 0.8, 1.0), 2), (_rect(X, Y, 0.44, 0.35, 0.56, 0.92), 2),
                ((Y >= 0.02) & (Y <= 0.38) & (np.abs(X - 0.5) <= 0.15 + 0.9 * Y), 0)]
    raise KeyError(f"no toy sprite for category {category!r}; known: {sorted(_ASPECT)}")


def sprite(scene_seed: int, category: str, height: int = _HEIGHT) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 ``[h, w, 3]``, bool mask ``[h, w]``) of ``category``'s sprite; deterministic in the scene's
    seed and the class, from a generator no scene draws from."""
    if category not in _ASPECT:
        raise KeyError(f"no toy sprite for category {category!r}; known: {sorted(_ASPECT)}")
    rng = np.random.default_rng([int(scene_seed), sum(map(ord, category)), SPRITE_STREAM])
    width = max(2, round(height * _ASPECT[category]))
    ys = (np.arange(height) + 0.5) / height
    xs = (np.arange(width) + 0.5) / width
    X, Y = np.meshgrid(xs, ys)
    colours = rng.integers(0, 256, size=(3, 3))
    image = np.zeros((height, width, 3), np.uint8)
    mask = np.zeros((height, width), bool)
    for part, colour in _parts(category, X, Y):
        image[part] = colours[colour]
        mask |= part
    return image, mask
