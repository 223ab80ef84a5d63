"""The one shard format: names, the ``{split}.json`` index and sample encoding. Writing is in
`datamodules.shard_writer`, reading (local folders and URLs) in `datamodules.shard_reader`.

Layout of a split folder: ``{split}-000000.tar ...`` plus ``{split}.json`` holding
``num_samples, num_shards, source, categories`` (and, ours, ``shard_sizes``, ``num_pair_samples``
and ``pair_shard_sizes`` (samples with >=1 positive and >=1 negative) so loaders know exact
per-shard counts without reading the tars; ``held_out_from`` names the split a held-out split
was taken from; ``mode`` how a split of the user's own data was made, see `datamodules.own_data`).
A sample is ``{key}.json`` (category, width, height, pixel ``x1, y1, x2, y2`` positives /
negatives, source, meta) and ``{key}.jpg`` or ``{key}.png``.

Images are stored verbatim only when their plain 8-bit RGB reading is exact (JPEG / PNG in RGB, L,
1 or palette mode); any other mode (16-bit, alpha, CMYK, LAB, float ...) is converted once by
`genloc.images.to_rgb_image` -- the conversion the placement API uses -- and re-encoded, with a
note per kind of change in the summary, so every reader decodes the same values.
"""
from __future__ import annotations

import io
import re
import string
from typing import NamedTuple

from PIL import Image

from genloc.images import to_rgb_image

KEY_RE = re.compile(r"^[A-Za-z0-9_%\-]+$")
_KEY_CHARS = frozenset(string.ascii_letters + string.digits + "_-")


class ShardFormatError(RuntimeError):
    """A split folder that cannot be read; the message names the path and the fix."""


def safe_key(text) -> str:
    """A sample key every tar reader, webdataset (which splits member names at the first dot) and file
    system accepts, from any text: letters, digits, '-' and '_' stay, every other character becomes
    ``%XX`` per UTF-8 byte. Injective, so two names never share a key (``traffic light`` ->
    ``traffic%20light``, ``a/b`` -> ``a%2Fb``)."""
    return "".join(c if c in _KEY_CHARS else "".join(f"%{b:02X}" for b in c.encode()) for c in str(text))


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


class Decoded(NamedTuple):
    image: Image.Image   # 8-bit RGB
    notes: list[str]     # value-changing conversions (empty: the plain RGB reading is exact)
    format: str          # PIL's format name of the encoded bytes ("JPEG", "PNG", ...)
    mode: str            # the mode the bytes decode to


def decode_image(data: bytes) -> Decoded:
    """Decode fully (PIL is lazy, so a truncated file fails here, not later in a worker) and convert
    with `to_rgb_image`, the one conversion of the framework."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        image, notes = to_rgb_image(img)
        return Decoded(image, notes, img.format or "", img.mode)


class SplitInfo(dict):
    """The parsed ``{split}.json`` plus ``paths`` (the shard files or URLs, in index order)."""

    @property
    def paths(self) -> list[str]:
        return self["paths"]
