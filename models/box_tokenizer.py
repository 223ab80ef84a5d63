"""Box <-> token quantisation shared by training, scoring and sampling.

A box is four normalised coordinates ``x1, y1, x2, y2`` in [0, 1]; each is quantised into one of
``num_bins`` equal bins and the four bin ids form the token sequence (in that order). The
coordinate vocabulary is shared by all four positions; BOS and EOS follow it.

Validity of a token box means ``bin(x2) > bin(x1)`` and ``bin(y2) > bin(y1)``, so its decoded box
(bin centres) has positive area. The location model masks its logits so that it only ever assigns
probability to valid token boxes (see ``models.location_model``).
"""
from __future__ import annotations

import torch

# Float slack for boxes computed by resizing/rounding (e.g. 1.0000001); anything further out is an error.
_EPS = 1e-5


class BoxTokenizer:
    """Quantise normalised boxes into ``num_bins`` bins per coordinate.

    Ids ``0..num_bins-1`` are coordinates, ``bos = num_bins``, ``eos = num_bins + 1``,
    ``vocab_size = num_bins + 2``. Decoding returns bin centres ``(k + 0.5) / num_bins``, so the
    round-trip error is at most half a bin for every box at least one bin wide and tall.

    A valid box narrower (or shorter) than one bin can fall with both edges in the same bin. Its
    token box would then be degenerate, so ``encode`` nudges ``x2`` (``y2``) one bin to the right
    (down) -- or, when ``x1`` is already in the last bin, ``x1`` one bin to the left -- so that every
    valid box maps to a valid token box. Only such sub-bin boxes are affected.
    """

    def __init__(self, num_bins: int):
        if not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")
        self.num_bins = num_bins
        self.bos = num_bins
        self.eos = num_bins + 1
        self.vocab_size = num_bins + 2

    def __repr__(self) -> str:
        return f"BoxTokenizer(num_bins={self.num_bins})"

    # ------------------------------------------------------------------ normalised boxes
    def encode(self, boxes_norm: torch.Tensor) -> torch.Tensor:
        """``FloatTensor[..., 4]`` normalised boxes -> ``LongTensor[..., 4]`` coordinate ids."""
        boxes = torch.as_tensor(boxes_norm)
        if not boxes.is_floating_point():
            boxes = boxes.float()
        _check_boxes(boxes, lo=0.0, hi=torch.ones_like(boxes), unit="normalised")
        nb = self.num_bins
        ids = torch.floor(boxes.clamp(0.0, 1.0) * nb).long().clamp_(0, nb - 1)
        for lo_i, hi_i in ((0, 2), (1, 3)):
            same = ids[..., hi_i] <= ids[..., lo_i]
            at_edge = ids[..., lo_i] == nb - 1
            ids[..., hi_i] = torch.where(same & ~at_edge, ids[..., lo_i] + 1, ids[..., hi_i])
            ids[..., lo_i] = torch.where(same & at_edge, ids[..., lo_i] - 1, ids[..., lo_i])
        return ids

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """``LongTensor[..., 4]`` coordinate ids -> normalised bin-centre boxes (float32)."""
        tokens = torch.as_tensor(tokens)
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.num_bins):
            raise ValueError(
                f"token ids must be coordinate ids in [0, {self.num_bins}); got range "
                f"[{int(tokens.min())}, {int(tokens.max())}] (BOS/EOS cannot be decoded)"
            )
        return (tokens.float() + 0.5) / self.num_bins

    # ------------------------------------------------------------------ pixel boxes
    def encode_pixels(self, boxes_px: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """Pixel boxes ``[..., 4]`` in images of ``sizes`` ``[..., 2]`` = (w, h) -> token ids."""
        boxes = torch.as_tensor(boxes_px).float()
        wh = _whwh(sizes, boxes)
        _check_boxes(boxes, lo=0.0, hi=wh, unit="pixel")
        return self.encode((boxes / wh).clamp(0.0, 1.0))

    def decode_pixels(self, tokens: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """Token ids ``[..., 4]`` -> pixel boxes (bin centres) in images of ``sizes`` = (w, h)."""
        boxes = self.decode(tokens)
        return boxes * _whwh(sizes, boxes)


def _whwh(sizes: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(w, h) sizes -> (w, h, w, h) broadcastable against ``like[..., 4]``."""
    sizes = torch.as_tensor(sizes, device=like.device).float()
    if sizes.shape[-1:] != (2,):
        raise ValueError(f"sizes must have shape [..., 2] of (width, height), got {tuple(sizes.shape)}")
    if (sizes <= 0).any():
        raise ValueError(f"image sizes must be positive, got {sizes.tolist()}")
    return torch.cat([sizes, sizes], dim=-1)


def _check_boxes(boxes: torch.Tensor, lo: float, hi: torch.Tensor, unit: str) -> None:
    """Raise ValueError naming the first NaN, degenerate or out-of-image box."""
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape [..., 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    if boxes.numel() == 0:
        return
    hi = torch.broadcast_to(torch.as_tensor(hi, device=boxes.device), boxes.shape)
    slack = _EPS * hi
    problems = (
        ("NaN or infinite coordinate", ~torch.isfinite(boxes).all(-1)),
        ("degenerate box (needs x2 > x1 and y2 > y1)",
         (boxes[..., 2] <= boxes[..., 0]) | (boxes[..., 3] <= boxes[..., 1])),
        ("box outside the image", ((boxes < lo - slack) | (boxes > hi + slack)).any(-1)),
    )
    for what, bad in problems:
        if bad.any():
            idx = tuple(int(i) for i in bad.nonzero()[0])
            extent = "[0, 1]" if unit == "normalised" else f"[0, {hi[idx].tolist()}] (w, h, w, h)"
            raise ValueError(
                f"{what}: {unit} box at index {idx} = {boxes[idx].tolist()} "
                f"(coordinates must lie in {extent}); {int(bad.sum())} bad box(es) in total"
            )
