"""Constraint masks of the location model: which tokens may come next (pure PyTorch).

Validity masks are part of the model's distribution. At every step the logits of tokens that
cannot start or complete a valid box are set to -inf before the softmax: BOS/EOS never; ``x1``/``y1``
not the last bin (room for ``x2``/``y2``); ``x2 > x1``; ``y2 > y1``. With a region, bins whose centre
lies outside the region are also masked, and ``x1``/``y1`` must leave a bin for ``x2``/``y2`` inside
it. `box_log_probs` (training, scoring) and the sampler apply the same masks through
`ConstraintMasks.allowed_tokens`, so with temperature 1, no top-k/top-p and no region the sampler's
log-probability of a box equals ``box_log_probs(...).sum(-1)``.

Size and aspect-ratio control (`ExtentMask`) are masks of the same kind: a table of the allowed
(width, height) extents in bins, with two cumulative tables that let every step look ahead, so a
prefix the masks allow can always be completed (no step ever has nothing left to draw). A box's
width ``x2 - x1`` is allowed when its bin range ``[e - 1/2, e + 1/2] / num_bins`` meets the requested
range, so a returned box has the requested size or aspect ratio to within half a bin per side.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class ExtentMask:
    """Allowed box extents per image, in bins: ``pairs[b, w, h]`` is true when a box of image ``b``
    may be ``w`` bins wide (``x2 - x1``) and ``h`` bins tall (``y2 - y1``).

    ``fits[b, w, j]``: some allowed pair has width ``w`` and height <= ``j``; ``fits_any[b, i, j]``:
    some allowed pair has width <= ``i`` and height <= ``j``. ``owner[m]`` is the image of sequence
    ``m`` (the sampler decodes ``n`` sequences per image without copying the tables).
    """

    pairs: Tensor     # BoolTensor[B, num_bins, num_bins]
    fits: Tensor      # BoolTensor[B, num_bins, num_bins]
    fits_any: Tensor  # BoolTensor[B, num_bins, num_bins]
    owner: Tensor     # LongTensor[M]

    def repeat_interleave(self, n: int) -> "ExtentMask":
        return ExtentMask(self.pairs, self.fits, self.fits_any, self.owner.repeat_interleave(n))


class ConstraintMasks:
    """`LocationModel`'s mask methods (a mixin: reads ``self.cfg`` and ``self.tokenizer``)."""

    def region_bounds(self, region: Optional[Tensor], batch: int, device: torch.device) -> Tensor:
        """Allowed bin range per image, ``LongTensor[batch, 4]`` = (lo_x, lo_y, hi_x, hi_y) inclusive.

        Without a region every bin; with a normalised region ``x1,y1,x2,y2`` the bins whose centre
        ``(k + 0.5) / num_bins`` lies inside it.
        """
        nb = self.cfg.num_bins
        if region is None:
            # (0, 0, nb - 1, nb - 1) made on the device: no host-to-device copy inside a training step
            return torch.arange(4, device=device).div(2, rounding_mode="floor").mul(nb - 1).expand(batch, 4)
        region = torch.as_tensor(region, dtype=torch.float64, device=device)
        if region.shape == (4,):
            region = region.expand(batch, 4)
        if region.shape != (batch, 4):
            raise ValueError(f"region must have shape (4,) or ({batch}, 4), got {tuple(region.shape)}")
        if not torch.isfinite(region).all() or (region < 0).any() or (region > 1).any():
            raise ValueError(f"region must be normalised x1,y1,x2,y2 in [0, 1], got {region.tolist()}")
        lo = torch.ceil(region[:, :2] * nb - 0.5).clamp(0, nb - 1)
        hi = torch.floor(region[:, 2:] * nb - 0.5).clamp(0, nb - 1)
        too_small = (hi - lo < 1).any(-1)
        if too_small.any():
            i = int(too_small.nonzero()[0])
            raise ValueError(
                f"region {region[i].tolist()} holds fewer than 2 bin centres per axis at num_bins={nb}, "
                f"so no valid box fits inside it")
        return torch.cat([lo, hi], dim=-1).long()

    def extent_mask(self, size: Optional[Tensor], aspect_ratio: Optional[Tensor], batch: int,
                    device: torch.device) -> Optional[ExtentMask]:
        """`ExtentMask` of the allowed box sizes per image, or None when neither is constrained.

        ``size``: normalised ``(w_min, w_max, h_min, h_max)``, shape (4,) or (batch, 4) (``w_min ==
        w_max`` asks for one width; ``0, 1`` leaves an axis free). ``aspect_ratio``: ``(min, max)`` of
        the *normalised* ratio ``(x2 - x1) / (y2 - y1)``, shape (2,) or (batch, 2); a pixel ratio ``r``
        of a ``W x H`` image is ``r * H / W`` here. An extent ``e`` bins is allowed when its range
        ``[e - 1/2, e + 1/2]`` (in bins) meets the request, a pair when its range of ratios does.
        """
        if size is None and aspect_ratio is None:
            return None
        nb = self.cfg.num_bins
        e = torch.arange(nb, dtype=torch.float64, device=device)
        pairs = (e[:, None] >= 1) & (e[None, :] >= 1)
        pairs = pairs.expand(batch, nb, nb)
        if size is not None:
            size = _per_image(size, 4, batch, "size", device)
            if (size < 0).any() or (size[:, 0] > size[:, 1]).any() or (size[:, 2] > size[:, 3]).any():
                raise ValueError(f"size must be normalised (w_min, w_max, h_min, h_max) with min <= max, "
                                 f"got {size.tolist()}")
            width_ok = ((e + 0.5) / nb >= size[:, 0:1]) & ((e - 0.5) / nb <= size[:, 1:2])
            height_ok = ((e + 0.5) / nb >= size[:, 2:3]) & ((e - 0.5) / nb <= size[:, 3:4])
            pairs = pairs & width_ok[:, :, None] & height_ok[:, None, :]
        if aspect_ratio is not None:
            ratio = _per_image(aspect_ratio, 2, batch, "aspect_ratio", device)
            if (ratio[:, 0] < 0).any() or (ratio[:, 0] > ratio[:, 1]).any():
                raise ValueError(f"aspect_ratio must be a (min, max) >= 0 with min <= max, got {ratio.tolist()}")
            shortest = (e - 0.5).clamp(min=1e-9)  # extent 0 is excluded above
            lowest = (e[:, None] - 0.5) / (e[None, :] + 0.5)     # smallest w/h of a (w, h) bin pair
            highest = (e[:, None] + 0.5) / shortest[None, :]      # largest
            pairs = pairs & (lowest <= ratio[:, 1, None, None]) & (highest >= ratio[:, 0, None, None])
        empty = ~pairs.flatten(1).any(-1)
        if empty.any():
            i = int(empty.nonzero()[0])
            raise ValueError(
                f"no box size fits image {i}: size {None if size is None else size[i].tolist()} and aspect "
                f"ratio {None if aspect_ratio is None else ratio[i].tolist()} (normalised) leave no box of at "
                f"least one bin (1/{nb}) per side inside the image")
        fits = pairs.cumsum(dim=2) > 0
        return ExtentMask(pairs.contiguous(), fits, fits.cumsum(dim=1) > 0, torch.arange(batch, device=device))

    def check_extents_fit(self, bounds: Tensor, extents: Optional[ExtentMask]) -> None:
        """Raise ValueError when no allowed box size fits inside an image's region ``bounds`` ``[B, 4]``."""
        if extents is None:
            return
        room_x, room_y = bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1]
        ok = extents.fits_any[torch.arange(len(bounds), device=bounds.device), room_x, room_y]
        if not ok.all():
            i = int((~ok).nonzero()[0])
            raise ValueError(f"no box of the requested size / aspect ratio fits inside the region of image {i} "
                             f"({int(room_x[i])} x {int(room_y[i])} bins wide and tall at most)")

    def allowed_tokens(self, step: int, prev: Tensor, bounds: Tensor, extents: Optional[ExtentMask] = None) -> Tensor:
        """``BoolTensor[M, vocab]``: tokens allowed at ``step`` (0..3 = x1,y1,x2,y2).

        ``prev`` holds the ``step`` tokens already chosen ``[M, step]``; ``bounds`` is
        `region_bounds` per sequence ``[M, 4]``; ``extents`` (optional) restricts the box size, with
        ``extents.owner`` mapping the ``M`` sequences to its images.
        """
        if extents is not None:
            return self._allowed_with_extents(step, prev, bounds, extents)
        axis = step % 2
        if step < 2:  # x1 / y1: leave at least one bin for x2 / y2
            low, high = bounds[:, axis], bounds[:, 2 + axis] - 1
        else:         # x2 / y2: strictly after x1 / y1, inside the bounds
            low, high = prev[:, axis] + 1, bounds[:, 2 + axis]
        k = torch.arange(self.tokenizer.vocab_size, device=bounds.device)
        return (k >= low[:, None]) & (k <= high[:, None])

    def _allowed_with_extents(self, step: int, prev: Tensor, bounds: Tensor, extents: ExtentMask) -> Tensor:
        """`allowed_tokens` under size constraints: a token is allowed when some allowed extent pair
        still fits between it and the region's far edges (the look-ahead tables of `ExtentMask`)."""
        last = self.cfg.num_bins - 1
        k = torch.arange(self.tokenizer.vocab_size, device=bounds.device)[None]
        owner = extents.owner[:, None]
        lo_x, lo_y, hi_x, hi_y = (bounds[:, i:i + 1] for i in range(4))
        if step == 0:    # x1: room for some allowed width, with y1 at the region's top
            room = hi_x - k
            ok = (k >= lo_x) & (room >= 1)
            return ok & extents.fits_any[owner, room.clamp(0, last), hi_y - lo_y]
        if step == 1:    # y1: room for some allowed (width, height) right of x1 and below y1
            room = hi_y - k
            ok = (k >= lo_y) & (room >= 1)
            return ok & extents.fits_any[owner, hi_x - prev[:, 0:1], room.clamp(0, last)]
        if step == 2:    # x2: an allowed width that leaves room for one of its allowed heights
            width = k - prev[:, 0:1]
            ok = (width >= 1) & (k <= hi_x)
            return ok & extents.fits[owner, width.clamp(0, last), hi_y - prev[:, 1:2]]
        height = k - prev[:, 1:2]  # y2: an allowed height for the chosen width
        ok = (height >= 1) & (k <= hi_y)
        return ok & extents.pairs[owner, prev[:, 2:3] - prev[:, 0:1], height.clamp(0, last)]


def _per_image(value, width: int, batch: int, name: str, device: torch.device) -> Tensor:
    """A (width,) or (batch, width) constraint -> float64 ``[batch, width]``; NaN is an error."""
    value = torch.as_tensor(value, dtype=torch.float64, device=device)
    if value.shape == (width,):
        value = value.expand(batch, width)
    if value.shape != (batch, width):
        raise ValueError(f"{name} must have shape ({width},) or ({batch}, {width}), got {tuple(value.shape)}")
    if torch.isnan(value).any():
        raise ValueError(f"{name} holds NaN: {value.tolist()}")
    return value
