"""One-call placement on your own images (docs/design/placement.md#placement), pure PyTorch.

    result = place(model, "photo.jpg", "cup", n=10, region="left", size=(120, 80), seed=0)
    result.boxes      # FloatTensor[n, 4]: x1, y1, x2, y2 in photo.jpg's own pixels
    result.log_probs  # FloatTensor[n]: log-probability of each box under the masked model
    group = place_many(model, "photo.jpg", ["cup", "plate"])   # one box each, pairwise IoU <= 0

Images may be a path, a PIL image, a numpy array (H x W [x C], uint8 / uint16 / float in [0, 1]) or a
tensor (C x H x W, uint8 or float in [0, 1]) of any size and mode; a list of images is one batched
call. Every image is converted to 8-bit RGB by `to_rgb_image` (the one conversion of the framework:
the shard writer uses it too) and resized exactly as the training data were (PIL bilinear to the
model's square input); conversions that change values (alpha, CMYK, LAB, 16-bit, float) are reported
in ``notes`` and as a warning. Region, size and aspect ratio are masks during decoding
(`LocationModel.sample`), so the boxes' log-probabilities stay those of the masked model.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .boxes import looks_normalised, pixel_rect
from .images import ImageLike, to_rgb_image
from .inpainting import REGIONS
from .location_model import LocationModel

Range = Union[float, tuple[float, float], None]
# Most boxes drawn per image in one call (`place`'s n, `place_many`'s candidates): far above any use,
# far below a draw count whose boxes and decoder cache would exhaust memory.
MAX_DRAWS = 10_000
# (image, pixel box, category, seed) -> edited image of the same size
Inpainter = Callable[[Image.Image, list, str, int], Image.Image]


class NoValidSetError(RuntimeError):
    """`place_many` found no set of boxes meeting its constraints within its sampling budget."""


@dataclass
class Placement:
    """Boxes for one image, in that image's own pixels."""

    boxes: Tensor       # FloatTensor[k, 4] x1, y1, x2, y2 (bin centres, pixels)
    log_probs: Tensor   # FloatTensor[k]: each box's log-probability under the masked sampling distribution
    tokens: Tensor      # LongTensor[k, 4] coordinate ids
    counts: Tensor      # LongTensor[k]: how many of the n draws gave this box (1 each unless distinct)
    image_size: tuple[int, int]  # (width, height)
    notes: list[str] = field(default_factory=list)


@dataclass
class PlacementSet:
    """One box per object from `place_many`; ``image`` is the edited image when an inpainter ran."""

    boxes: Tensor       # FloatTensor[k, 4] pixels, object i's box in row i
    log_probs: Tensor   # FloatTensor[k]: each box's log-probability under the model (before the overlap rule)
    categories: list[str]
    image: Image.Image
    attempts: int       # sampling rounds used (1 = the first round gave a valid set)
    notes: list[str] = field(default_factory=list)


def model_input(model: LocationModel, images: Sequence[Image.Image]) -> Tensor:
    """RGB PIL images -> ``FloatTensor[B, 3, S, S]`` in [0, 1], resized as the datamodules do."""
    s = model.cfg.image_size
    arrays = [np.asarray(img.resize((s, s), Image.BILINEAR), dtype=np.float32) / 255.0 for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------ constraints
def normalised_region(region, size: tuple[int, int]) -> Optional[tuple[float, float, float, float]]:
    """None, a word (`left|right|top|bottom`) or pixels ``(x1, y1, x2, y2)`` / ``"x1,y1,x2,y2"`` -> normalised."""
    if region is None:
        return None
    if isinstance(region, str):
        if region in REGIONS:
            return REGIONS[region]
        try:
            region = [float(v) for v in region.split(",")]
        except ValueError:
            raise ValueError(f"region {region!r} is neither one of {sorted(REGIONS)} nor pixels x1,y1,x2,y2") from None
    try:
        values = [float(v) for v in region]
    except (TypeError, ValueError):
        raise ValueError(f"region {region!r} is neither one of {sorted(REGIONS)} nor pixels x1,y1,x2,y2") from None
    w, h = size
    if len(values) != 4 or not (0 <= values[0] < values[2] <= w and 0 <= values[1] < values[3] <= h):
        raise ValueError(f"region {region!r} is not a pixel box x1,y1,x2,y2 inside the {w}x{h} image")
    return (values[0] / w, values[1] / h, values[2] / w, values[3] / h)


def _range(value: Range, name: str) -> tuple[float, float]:
    try:
        if isinstance(value, (tuple, list)):
            if len(value) != 2:
                raise ValueError
            lo, hi = float(value[0]), float(value[1])
        else:
            lo = hi = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or a (min, max) pair, got {value!r}") from None
    if not (0 < lo <= hi and math.isfinite(lo)) or math.isnan(hi):
        raise ValueError(f"{name} must be positive with min <= max, got {value!r}")
    return lo, hi


def normalised_size(size, image_size: tuple[int, int], num_bins: int) -> Optional[tuple[float, float, float, float]]:
    """Pixel ``(w, h)`` -- each a number (exact), a ``(min, max)`` pair or None (free) -- -> normalised
    ``(w_min, w_max, h_min, h_max)``; sizes the model cannot draw (below half a bin, above the image) are errors."""
    if size is None:
        return None
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"size must be (width, height) in pixels, each a number, a (min, max) pair or None; "
                         f"got {size!r}")
    out = []
    for value, extent, axis in zip(size, image_size, ("width", "height")):
        if value is None:
            out += [0.0, 1.0]
            continue
        lo, hi = _range(value, f"size {axis}")
        bin_px = extent / num_bins
        if hi < 0.5 * bin_px or lo > (num_bins - 0.5) * bin_px:
            raise ValueError(f"size {axis} {value!r} px cannot be drawn in a {extent}-px {axis}: the model's boxes "
                             f"span 1 to {num_bins - 1} bins of {bin_px:.3g} px")
        out += [lo / extent, hi / extent]
    return tuple(out)


def normalised_aspect(aspect_ratio: Range, image_size: tuple[int, int]) -> Optional[tuple[float, float]]:
    """Pixel ``w / h`` (a number, or a ``(min, max)`` range) -> the ratio of normalised extents."""
    if aspect_ratio is None:
        return None
    lo, hi = _range(aspect_ratio, "aspect_ratio")
    w, h = image_size
    return lo * h / w, hi * h / w


# ------------------------------------------------------------------------------------------ place
def check_whole(value, name: str, minimum: Optional[int] = 1, optional: bool = False):
    """``value`` if it is a whole number >= ``minimum`` (any, for None; or None when ``optional``); else
    one line naming ``name``."""
    if value is None and optional:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (minimum is not None and value < minimum):
        allowed = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be a whole number{allowed}{' or None' if optional else ''}, got {value!r}")
    return value


def check_model(model) -> None:
    if not isinstance(model, LocationModel):
        raise TypeError(f"model must be a LocationModel (genloc.hub.load_model or GenLocModel.from_pretrained), "
                        f"got {type(model).__name__}")


def check_options(model, draws: tuple[str, int], temperature, top_k, top_p, seed, seed_optional: bool = True) -> None:
    """The settings `place` and `place_many` share (``draws``: the name and value of the draw count),
    checked before any image is read or model run."""
    from .sampling import check_filter_args

    check_model(model)
    check_whole(draws[1], draws[0])
    if draws[1] > MAX_DRAWS:
        raise ValueError(f"{draws[0]} must be at most {MAX_DRAWS} boxes per image, got {draws[1]}: for more, call "
                         "again with another seed")
    check_whole(seed, "seed", minimum=None, optional=seed_optional)
    check_filter_args(temperature, top_k, top_p)


def check_category(category) -> str:
    """A class name the prompt can be made from: a non-empty string (an empty one would prompt the
    model with "a photo of a " and place boxes for no object)."""
    if not isinstance(category, str):
        raise TypeError(f"category must be a class name (str), got {type(category).__name__} {category!r}")
    if not category.strip():
        raise ValueError(f"category must be a class name, got an empty string {category!r}")
    return category


def unknown_class_note(model, categories: Sequence[str]) -> Optional[str]:
    """A note when a class is not one of the model's training classes (``model.training_classes``,
    found by `genloc.hub.training_classes` when the model was loaded; None: unknown, no note): the
    boxes of an unseen class are the text encoder's guess, not something the model learnt."""
    known = getattr(model, "training_classes", None)
    unknown = sorted({c for c in categories if c not in known}) if known else []
    if not unknown:
        return None
    return (f"class {', '.join(map(repr, unknown))} is not one the model was trained on ({', '.join(known)}): "
            "its boxes are a guess for an unseen class")


def subpixel_note(boxes: Tensor, size: tuple[int, int]) -> Optional[str]:
    """A note when some pixel boxes are under one pixel wide or high (a tiny image: the model's bins
    are finer than its pixels); an inpainter paints at least one whole pixel for each."""
    small = int(((boxes[..., 2:] - boxes[..., :2]) < 1).any(-1).sum())
    if not small:
        return None
    return (f"{small} of {boxes.shape[-2]} boxes are under one pixel wide or high on the {size[0]}x{size[1]} image: "
            "an inpainter paints at least one whole pixel for each (place_many redraws such boxes)")


def _add_note(note: Optional[str], notes: list[str], stacklevel: int) -> None:
    if note is not None:
        warnings.warn(note, stacklevel=stacklevel + 1)
        notes.append(note)


def _note_unknown_classes(model, categories: list[str], notes: list[list[str]], stacklevel: int) -> None:
    """`unknown_class_note` warned once and kept in the notes of each image whose class it names."""
    note = unknown_class_note(model, categories)
    if note is not None:
        warnings.warn(note, stacklevel=stacklevel + 1)
        for category, image_notes in zip(categories, notes):
            if category not in model.training_classes:
                image_notes.append(note)


def place(model: LocationModel, image: Union[ImageLike, Sequence[ImageLike]], category: Union[str, Sequence[str]],
          n: int = 10, region=None, size=None, aspect_ratio: Range = None, temperature: float = 1.0,
          top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = 0,
          distinct: bool = False) -> Union[Placement, list[Placement]]:
    """Sample ``n`` boxes for ``category`` in ``image`` (one `Placement`), or in each image of a list
    (a list of `Placement`, one batched model call; ``category`` a name or one per image).

    ``region``: `left|right|top|bottom` or pixels ``(x1, y1, x2, y2)``; ``size``: pixel ``(w, h)``,
    each exact, a ``(min, max)`` range or None; ``aspect_ratio``: pixel ``w / h``, exact or
    ``(min, max)``. Exact sizes and ratios hold to within half a bin per box side. ``distinct``
    merges draws that gave the same box: each distinct box once, with its probability and the
    number of draws that gave it (``counts``), ranked by probability.
    """
    check_options(model, ("n", n), temperature, top_k, top_p, seed)
    if not isinstance(distinct, bool):
        raise TypeError(f"distinct must be True or False, got {distinct!r}")
    single, images = _image_list(image)
    categories = _categories(category, len(images))
    results = _sample(model, images, categories, n, [region] * len(images), [size] * len(images),
                      [aspect_ratio] * len(images), temperature, top_k, top_p, seed)
    for r in results:
        _add_note(subpixel_note(r.boxes, r.image_size), r.notes, stacklevel=2)
    _note_unknown_classes(model, categories, [r.notes for r in results], stacklevel=2)
    if distinct:
        results = [merge_identical(r) for r in results]
    return results[0] if single else results


def _image_list(image) -> tuple[bool, list]:
    """(whether one image was given, the images as a list); an empty list is an error."""
    single = not isinstance(image, (list, tuple))
    images = [image] if single else list(image)
    if not images:
        raise ValueError("image is an empty list: give an image or a list of images")
    return single, images


def _categories(category, count: int) -> list[str]:
    """One class name for every image, or one per image -> ``count`` checked names."""
    if isinstance(category, str):
        categories = [check_category(category)] * count
    elif isinstance(category, (list, tuple)):
        categories = [check_category(c) for c in category]
    else:
        raise TypeError(f"category must be a class name (str) or one per image, got {type(category).__name__}")
    if len(categories) != count:
        raise ValueError(f"{count} images but {len(categories)} categories")
    return categories


def _prepared(model, images, regions, sizes, aspects, stacklevel: int = 4) -> tuple:
    """Images -> (RGB PIL images, their notes, (w, h) sizes, normalised region / size / aspect
    constraints as `_stack`ed tensors or None); conversion notes are warned about."""
    converted = [to_rgb_image(img) for img in images]
    for _, notes in converted:
        for note in notes:
            warnings.warn(note, stacklevel=stacklevel)
    pil = [c[0] for c in converted]
    dims = [img.size for img in pil]
    nb = model.cfg.num_bins
    constraints = dict(
        region=_stack([normalised_region(r, d) for r, d in zip(regions, dims)], (0.0, 0.0, 1.0, 1.0)),
        size=_stack([normalised_size(s, d, nb) for s, d in zip(sizes, dims)], (0.0, 1.0, 0.0, 1.0)),
        aspect_ratio=_stack([normalised_aspect(a, d) for a, d in zip(aspects, dims)], (0.0, math.inf)))
    return pil, [c[1] for c in converted], dims, constraints


def _sample(model, images, categories, n, regions, sizes, aspects, temperature, top_k, top_p, seed) -> list[Placement]:
    """One batched `LocationModel.sample` over images (each with its own region / size / aspect ratio)."""
    pil, notes, dims, constraints = _prepared(model, images, regions, sizes, aspects)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    out = model.sample(
        model_input(model, pil).to(device), categories, n=n, temperature=temperature, top_k=top_k, top_p=top_p,
        generator=generator, image_sizes=torch.tensor(dims, device=device), **constraints)
    return [Placement(out.boxes[i].float().cpu(), out.log_probs[i].cpu(), out.tokens[i].cpu(),
                      torch.ones(n, dtype=torch.long), dims[i], notes[i]) for i in range(len(pil))]


def _stack(values: list, free: tuple) -> Optional[Tensor]:
    """Per-image constraints -> a ``[B, k]`` tensor (``free`` where an image has none), or None if none has any."""
    if all(v is None for v in values):
        return None
    return torch.tensor([free if v is None else v for v in values], dtype=torch.float64)


def merge_identical(result: Placement) -> Placement:
    """Identical token boxes merged: each distinct box once, with its log-probability and its count
    among the draws, ranked by probability (then count)."""
    unique, inverse, counts = torch.unique(result.tokens, dim=0, return_inverse=True, return_counts=True)
    first = torch.full((len(unique),), len(inverse), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(inverse)), reduce="amin")
    log_probs = result.log_probs[first]
    order = sorted(range(len(unique)), key=lambda i: (-float(log_probs[i]), -int(counts[i])))
    idx = first[order]
    return Placement(result.boxes[idx], result.log_probs[idx], result.tokens[idx], counts[order],
                     result.image_size, result.notes)


# ------------------------------------------------------------------------------------------ place_many
def token_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU ``[len(a), len(b)]`` of token boxes (exact integers; equal to the IoU of the decoded boxes
    in normalised or pixel coordinates, which only scale each axis), or of any integer boxes such as
    `painted_rects`."""
    a, b = a[:, None].double(), b[None].double()
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = iw * ih
    area = lambda t: (t[..., 2] - t[..., 0]) * (t[..., 3] - t[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def painted_rects(boxes: Tensor, size: tuple[int, int], dilate: int = 0) -> Tensor:
    """``LongTensor[k, 4]``: the pixel rectangle an inpainter paints for each pixel box
    (`genloc.boxes.pixel_rect`, every pixel the box touches), grown by ``dilate`` px and clipped to
    the image as `genloc.inpainting.box_mask` grows it."""
    w, h = size
    rects = torch.tensor([pixel_rect(b, size) for b in boxes.view(-1, 4).tolist()], dtype=torch.long).view(-1, 4)
    if dilate:
        rects = (rects + torch.tensor([-dilate, -dilate, dilate, dilate])).clamp(min=0)
        rects[:, 0::2], rects[:, 1::2] = rects[:, 0::2].clamp(max=w), rects[:, 1::2].clamp(max=h)
    return rects


def place_many(model: LocationModel, image: ImageLike, categories: Sequence[str], max_iou: float = 0.0,
               regions: Optional[Sequence] = None, sizes: Optional[Sequence] = None,
               aspect_ratios: Optional[Sequence] = None, inpainter: Optional[Inpainter] = None,
               candidates: int = 100, attempts: int = 10, temperature: float = 1.0, top_k: Optional[int] = None,
               top_p: Optional[float] = None, seed: int = 0, dilate: int = 0) -> PlacementSet:
    """One box per category, each drawn by the model, pairwise IoU <= ``max_iou`` (0: no overlap) both
    as boxes and as the pixels an inpainter paints for them (`painted_rects`; ``dilate``: the pixels
    each mask is grown by, as ``insert.py --dilate`` grows it).

    Objects are placed in order: object ``i`` takes the first of ``candidates`` draws at least one
    pixel wide and high whose IoU with every earlier box is within ``max_iou`` -- a draw from the
    model conditioned on not overlapping.
    ``regions`` / ``sizes`` / ``aspect_ratios`` give one constraint per object (None entries: free),
    as in `place`. With an ``inpainter`` (``(image, box, category, seed) -> image``) each object is
    drawn into the image before the next one is sampled on the edited image. A round in which some
    object has no valid draw starts over (from the original image); after ``attempts`` rounds
    `NoValidSetError` is raised -- overlapping boxes are never returned.
    """
    if isinstance(categories, str):  # list("car") would place 'c', 'a', 'r'
        raise TypeError(f"categories must be a list of class names, one per object, got the string {categories!r}; "
                        f"for one object write [{categories!r}]")
    if not isinstance(categories, (list, tuple)) or not categories:
        raise ValueError(f"categories must be a non-empty list of class names, got {categories!r}")
    categories = [check_category(c) for c in categories]
    k = len(categories)
    check_options(model, ("candidates", candidates), temperature, top_k, top_p, seed, seed_optional=False)
    check_whole(attempts, "attempts")
    check_whole(dilate, "dilate", minimum=0)
    if isinstance(max_iou, bool) or not isinstance(max_iou, numbers.Real) or not 0.0 <= max_iou <= 1.0:
        raise ValueError(f"max_iou must be a number in [0, 1], got {max_iou!r}")
    if inpainter is not None and not callable(inpainter):
        raise TypeError(f"inpainter must be a function (image, box, category, seed) -> image, got {inpainter!r}")
    per_object = {}
    for name, values in (("regions", regions), ("sizes", sizes), ("aspect_ratios", aspect_ratios)):
        if values is not None and not isinstance(values, (list, tuple)):
            raise TypeError(f"{name} must be a list with one entry per object (None = free), got {values!r}")
        values = [None] * k if values is None else list(values)
        if len(values) != k:
            raise ValueError(f"{name} has {len(values)} entries for {k} categories (one per object, None = free)")
        per_object[name] = values
    original, notes = to_rgb_image(image)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    _add_note(unknown_class_note(model, categories), notes, stacklevel=2)
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    for attempt in range(attempts):
        round_seed = seed + 1_000_003 * attempt
        if inpainter is None:  # the image never changes: all objects' candidates in one batched call
            draws = _sample(model, [original] * k, categories, candidates, per_object["regions"], per_object["sizes"],
                            per_object["aspect_ratios"], seed=round_seed, **options)
        current, chosen = original, []
        for i in range(k):
            if inpainter is not None:
                draw = _sample(model, [current], [categories[i]], candidates, [per_object["regions"][i]],
                               [per_object["sizes"][i]], [per_object["aspect_ratios"][i]], seed=round_seed + i,
                               **options)[0]
            else:
                draw = draws[i]
            ok = ((draw.boxes[:, 2:] - draw.boxes[:, :2]) >= 1).all(1)  # a smaller box would be painted larger
            if chosen:
                earlier = torch.stack([c.tokens for c in chosen])
                painted = painted_rects(torch.stack([c.boxes for c in chosen]), draw.image_size, dilate)
                ok &= (token_iou(draw.tokens, earlier) <= max_iou + 1e-12).all(1)
                ok &= (token_iou(painted_rects(draw.boxes, draw.image_size, dilate), painted) <= max_iou + 1e-12).all(1)
            if not ok.any():
                break
            j = int(ok.nonzero()[0])
            chosen.append(Placement(draw.boxes[j], draw.log_probs[j], draw.tokens[j], torch.tensor(1),
                                    draw.image_size))
            if inpainter is not None:
                current = inpainter(current, draw.boxes[j].tolist(), categories[i], seed + i)
                if not isinstance(current, Image.Image) or current.size != original.size:
                    raise TypeError("the inpainter must return a PIL image of the input's size")
        if len(chosen) == k:
            return PlacementSet(torch.stack([c.boxes for c in chosen]), torch.stack([c.log_probs for c in chosen]),
                                categories, current, attempt + 1, notes)
    raise NoValidSetError(
        f"no valid set for {categories} within {attempts} rounds of {candidates} draws per object: every round "
        f"had an object with no box of at least one pixel at IoU <= {max_iou} (boxes and painted pixels) from the "
        f"earlier ones (inside its region). Allow more "
        f"overlap (max_iou), give larger or separate regions, or raise candidates / attempts")


# ------------------------------------------------------------------------------------------ score
@dataclass
class BoxScores:
    """Given boxes of one image scored by `score`, in that image's own pixels."""

    boxes: Tensor          # FloatTensor[k, 4]: the boxes as given (x1, y1, x2, y2, pixels)
    tokens: Tensor         # LongTensor[k, 4]: each box's token box (the cell of boxes the model scores)
    log_probs: Tensor      # FloatTensor[k]: log-probability of the token box (-inf: outside the constraints)
    log_densities: Tensor  # FloatTensor[k]: log-density per pixel² of each corner (comparable across image sizes)
    image_size: tuple[int, int]  # (width, height)
    notes: list[str] = field(default_factory=list)


def score(model: LocationModel, image: Union[ImageLike, Sequence[ImageLike]], category: Union[str, Sequence[str]],
          boxes, *, region=None, size=None, aspect_ratio: Range = None) -> Union[BoxScores, list[BoxScores]]:
    """How likely the model finds each of ``boxes`` for ``category`` in ``image`` (one `BoxScores`),
    or in each image of a list (``boxes`` one ``[k_i, 4]`` per image, ``category`` a name or one per
    image; a list of `BoxScores`). Boxes are pixel ``x1, y1, x2, y2`` of the image as given.

    A box is quantised to its token box (`BoxTokenizer.encode_pixels`); ``log_probs`` is that token
    box's log-probability under the distribution `place` samples from (temperature 1): with
    ``region`` / ``size`` / ``aspect_ratio`` (as in `place`) the renormalised masked model, so a box
    `place` returned scores its ``log_probs`` and a box the constraints exclude scores -inf. A token
    box is the set of boxes whose two corners each fall in one cell of ``W/num_bins x H/num_bins``
    pixels; ``log_densities`` divides its probability by the two cells' areas (px² per corner), so
    scores of images of different sizes compare. One model call; each image's prefix goes through the
    decoder once however many boxes it has. A box outside its image or not a box (x2 <= x1, NaN, ...)
    is a ValueError naming its index.
    """
    check_model(model)
    single, images = _image_list(image)
    categories = _categories(category, len(images))
    per_image = [boxes] if single else list(boxes) if isinstance(boxes, (list, tuple)) else None
    if per_image is None or len(per_image) != len(images):
        raise ValueError(f"{len(images)} images need one [k, 4] array of pixel boxes each, got "
                         f"{len(per_image) if per_image is not None else type(boxes).__name__}")
    count = len(images)
    pil, notes, dims, constraints = _prepared(model, images, [region] * count, [size] * count,
                                              [aspect_ratio] * count, stacklevel=3)
    given, tokens = [], []
    for i, (b, dim) in enumerate(zip(per_image, dims)):
        where = "" if single else f"image {i}: "
        b = _pixel_boxes(b, where)
        suspect = np.flatnonzero(looks_normalised(b, dim)).tolist()
        if suspect:
            raise ValueError(f"{where}boxes at index {suspect[:5]}{' ...' if len(suspect) > 5 else ''} lie within "
                             f"[0, 1] on the {dim[0]}x{dim[1]} image: they look normalised; give pixel x1, y1, x2, y2 "
                             f"(genloc.boxes.denormalise(boxes, {tuple(dim)}))")
        try:
            tokens.append(model.tokenizer.encode_pixels(torch.from_numpy(b), torch.tensor(dim)))
        except ValueError as e:
            raise ValueError(f"{where}{e}") from None
        given.append(torch.from_numpy(b).float())
    _note_unknown_classes(model, categories, notes, stacklevel=2)
    device = next(model.parameters()).device
    owner = torch.cat([torch.full((len(t),), i, dtype=torch.long) for i, t in enumerate(tokens)])
    log_probs = model.score_tokens(model_input(model, pil).to(device), categories, torch.cat(tokens), owner,
                                   **constraints).cpu()
    nb = model.cfg.num_bins
    results, start = [], 0
    for i, (w, h) in enumerate(dims):
        lp = log_probs[start:start + len(tokens[i])]
        start += len(tokens[i])
        cell = math.log(w / nb) + math.log(h / nb)
        results.append(BoxScores(given[i], tokens[i], lp, lp - 2 * cell, dims[i], notes[i]))
    return results[0] if single else results


def _pixel_boxes(boxes, where: str) -> np.ndarray:
    """One image's boxes for `score` as float64 ``[k, 4]``; anything else is one line naming ``boxes``."""
    wanted = f"{where}boxes must be [k, 4] pixel x1, y1, x2, y2 (a list of 4-number lists, an array or a tensor)"
    if boxes is None or isinstance(boxes, (str, bytes)):
        raise TypeError(f"{wanted}, got {boxes!r}")
    try:
        b = np.asarray(boxes.detach().cpu() if isinstance(boxes, Tensor) else boxes, dtype=np.float64)
    except (TypeError, ValueError):
        try:
            lengths = sorted({len(row) for row in boxes})
        except TypeError:
            lengths = []
        got = (f"a ragged list (rows of {' and '.join(map(str, lengths))} numbers)" if len(lengths) > 1
               else "entries that are not numbers")
        raise ValueError(f"{wanted}, got {got}") from None
    b = b.reshape(0, 4) if b.size == 0 else b
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{wanted}, got shape {b.shape}")
    return b
