"""What `--image` names, as a list of photos: files, folders, glob patterns and manifests (a .jsonl or
.csv with an ``image`` column, relative to the manifest's folder, and an optional ``categories``
column: a JSON list, or names separated by ``;`` in a CSV). Nothing here reads a photo's pixels."""
from __future__ import annotations

import csv
import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..files import read_jsonl

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
MANIFEST_SUFFIXES = (".jsonl", ".csv")


@dataclass
class Photo:
    image: str                          # the path, as given (a manifest's rows: joined to its folder)
    categories: Optional[list] = None   # a manifest row's classes; None: the command's --category


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def expand_images(values: list[str]) -> list[Photo]:
    """The photos ``values`` name, in order, each once; ValueError (one line naming the value) for a
    name that matches no photo."""
    photos, seen = [], set()
    for value in values:
        for photo in _expand(value):
            if photo.image not in seen:
                seen.add(photo.image)
                photos.append(photo)
    return photos


def _expand(value: str) -> list[Photo]:
    path = Path(value).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if is_image(p))
        if not found:
            raise ValueError(f"--image {value}: the folder holds no photo ({', '.join(IMAGE_SUFFIXES)})")
        return [Photo(str(p)) for p in found]
    if path.is_file():
        return read_manifest(path) if path.suffix.lower() in MANIFEST_SUFFIXES else [Photo(str(path))]
    if glob.has_magic(value):
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        found = [p for p in found if is_image(p)]
        if not found:
            raise ValueError(f"--image {value}: the pattern matches no photo")
        return [Photo(str(p)) for p in found]
    raise ValueError(f"--image {value}: no such file, folder or pattern")


def read_manifest(path: Path) -> list[Photo]:
    """The rows of a .jsonl or .csv manifest; a row without an existing image is an error naming ``path:row``."""
    if path.suffix.lower() == ".jsonl":
        rows = list(read_jsonl(path))
    else:
        with open(path, newline="") as f:
            rows = list(enumerate(csv.DictReader(f), 2))  # row 1 is the header
    photos = []
    for line, row in rows:
        where = f"--image {path}:{line}"
        image = row.get("image")
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"{where}: no `image` (each row names a photo, relative to the manifest's folder)")
        file = (path.parent / Path(image).expanduser())
        if not file.is_file():
            raise ValueError(f"{where}: {file} is not a file")
        categories = row.get("categories")
        if isinstance(categories, str):
            categories = [c.strip() for c in categories.split(";") if c.strip()]
        if categories is not None and (not isinstance(categories, list) or not categories
                                       or not all(isinstance(c, str) and c.strip() for c in categories)):
            raise ValueError(f"{where}: `categories` must be a non-empty list of class names, got {categories!r}")
        photos.append(Photo(str(file), categories or None))
    if not photos:
        raise ValueError(f"--image {path}: the manifest has no rows")
    return photos
