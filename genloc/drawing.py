"""The one box drawer and colour table of the applications (insert.py, the demo, compare_insertion's grid).

Boxes are outlined inside their pixel rectangle (`genloc.inpainting.pixel_rect`, the pixels an
inpainter would edit) and labels sit in a tag clipped to the box: nothing is drawn outside the
boxes, so every other pixel is the photo's.
"""
from __future__ import annotations

from typing import Optional, Sequence

from PIL import Image, ImageDraw

from .inpainting import pixel_rect

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 128, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255), (255, 128, 0)]


def colour(i: int) -> tuple[int, int, int]:
    """Box ``i``'s colour (the table repeats)."""
    return COLOURS[i % len(COLOURS)]


def draw_boxes(image: Image.Image, boxes: Sequence[Sequence[float]], colours: Optional[Sequence] = None,
               labels: Optional[Sequence[str]] = None, width: Optional[int] = None) -> Image.Image:
    """A copy of ``image`` with each pixel box ``(x1, y1, x2, y2)`` outlined inward in its colour
    (default: `colour(i)`), labelled ``labels[i]`` if given; ``width`` defaults to the image's long side / 250."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    width = width or max(2, round(max(image.size) / 250))
    for i, box in enumerate(boxes):
        x0, y0, x1, y1 = pixel_rect(box, image.size)
        fill = tuple(colours[i]) if colours is not None else colour(i)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=fill, width=width)
        if labels is not None:
            tag = Image.new("RGB", (8 + 7 * len(labels[i]), 14), fill)
            ImageDraw.Draw(tag).text((3, 1), labels[i], fill=(0, 0, 0))
            fit = tag.crop((0, 0, max(0, min(tag.width, x1 - x0)), max(0, min(tag.height, y1 - y0))))
            if fit.width and fit.height:
                out.paste(fit, (x0, y0))
    return out
