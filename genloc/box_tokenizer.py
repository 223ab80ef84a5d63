"""Box <-> token quantisation shared by training, scoring and sampling.

A box is four normalised coordinates ``x1, y1, x2, y2`` in [0, 1]; each is quantised into one of
``num_bins`` equal bins and the four bin ids form the token sequence (in that order). The
coordinate vocabulary is shared by all four positions; BOS and EOS follow it.

Validity of a token box means ``bin(x2) > bin(x1)`` and ``bin(y2) > bin(y1)``, so its decoded box
(bin centres) has positive area. The location model masks its logits so that it only ever assigns
probability to valid token boxes (see ``genloc.location_model``).
"""
from __future__ import annotations

import torch

from .boxes import denormalise, normalise, validate_boxes


class BoxTokenizer:
    """Quantise normalised boxes into ``num_bins`` bins per coordinate.

    Ids ``0..num_bins-1`` are coordinates, ``bos = num_bins``, ``eos = num_bins + 1``,
    ``vocab_size = num_bins + 2``. Decoding returns bin centres ``(k + 0.5) / num_bins``, so the
    round-trip error is at most half a bin for every box at least one bin wide and tall.

    A valid box narrower (or shorter) than one bin can fall with both edges in the same bin. Its
    token box would then be degenerate, so ``encode`` nudges ``x2`` (``y2``) one bin to the right
    (down) -- or, when ``x1`` is already in the last bin, ``x1`` one bin to the left -- so that every
    valid box maps to a valid token box. Only such sub-bin boxes are affected.

    Boxes are checked with the one validity rule, `genloc.boxes.validate_boxes`: an invalid box is a
    ValueError naming it, and a box overhanging the image within the rule's tolerance is clamped.
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
        validate_boxes(boxes).raise_first("normalised box")
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
        sizes = _check_sizes(sizes)
        validate_boxes(boxes, sizes).raise_first("pixel box")
        return self.encode(normalise(boxes, sizes).clamp(0.0, 1.0))

    def decode_pixels(self, tokens: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """Token ids ``[..., 4]`` -> pixel boxes (bin centres) in images of ``sizes`` = (w, h)."""
        return denormalise(self.decode(tokens), _check_sizes(sizes))


def _check_sizes(sizes) -> torch.Tensor:
    """(w, h) image sizes ``[..., 2]``, checked."""
    sizes = torch.as_tensor(sizes)
    if sizes.shape[-1:] != (2,):
        raise ValueError(f"sizes must have shape [..., 2] of (width, height), got {tuple(sizes.shape)}")
    if (sizes <= 0).any():
        raise ValueError(f"image sizes must be positive, got {sizes.tolist()}")
    return sizes
