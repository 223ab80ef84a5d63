"""The one shard format (SPEC §2): atomic writer, validation, split info and annotation-only reader.

Layout of a split folder: ``{split}-000000.tar ...`` plus ``{split}.json`` holding
``num_samples, num_shards, source, categories`` (and, ours, ``shard_sizes``, ``num_pair_samples``
and ``pair_shard_sizes`` (samples with >=1 positive and >=1 negative) so loaders know exact
per-shard counts without reading the tars).
The json is written last and shards are renamed from temporary names only when complete, so an
interrupted conversion never looks complete.
Readers (`read_split_info`, `iter_annotations`, the pipeline through `open_binary`) also take a URL
for the folder: anything fsspec opens (``https://``, ``s3://``, ``gs://``, ``file://``, ``memory://``)
or a ``pipe:`` command with ``{}`` for the file name (docs/multinode.md).
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from models.boxes import validate_boxes

__all__ = ["ShardWriter", "SplitInfo", "read_split_info", "shard_paths", "iter_annotations",
           "ShardFormatError", "decode_image", "is_url", "member", "open_binary", "split_file_exists"]

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


class ShardFormatError(RuntimeError):
    """A split folder that cannot be read; the message names the path and the fix."""


def _valid_boxes(boxes, width: int, height: int) -> tuple[list[list[float]], Counter]:
    """(valid boxes clipped to the image, Counter of problems) by the one rule of `models.boxes`."""
    parsed, problems = [], Counter()
    for b in boxes:
        try:
            x1, y1, x2, y2 = (float(v) for v in b)
        except (TypeError, ValueError):
            problems["box: not 4 numbers"] += 1
            continue
        parsed.append([x1, y1, x2, y2])
    check = validate_boxes(np.asarray(parsed, dtype=np.float64).reshape(-1, 4), (width, height))
    problems.update({f"box: {what}": n for what, n in check.counts().items()})
    kept = check.valid & (check.clipped != check.boxes).any(-1)
    if kept.any():
        problems["box: clipped to image (kept)"] += int(kept.sum())
    return check.clipped[check.valid].tolist(), problems


def decode_image(data: bytes) -> Image.Image:
    """Decode fully (PIL is lazy) so a truncated file fails here, not later in a worker."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def _encode(image, fmt: str, quality: int) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    if fmt == "jpg":
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


class ShardWriter:
    """Writes validated samples into ``{split}-NNNNNN.tar`` shards atomically.

    ``num_shards`` given: samples go round robin into exactly that many shards (balanced shards
    make DDP splits even; all tars stay open). Otherwise a new shard starts every
    ``max_per_shard`` samples (streaming, unknown total). ``write`` returns None when the sample
    was written, else the reason it was dropped; ``dropped`` counts dropped samples by reason,
    ``notes`` the dropped/clipped boxes and re-encoded images of kept samples.
    """

    def __init__(self, out_dir, split: str, source: str, num_shards: int | None = None,
                 max_per_shard: int = 1000, image_format: str = "jpg", jpeg_quality: int = 95):
        if image_format not in ("jpg", "png"):
            raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split, self.source = split, source
        self.num_shards, self.max_per_shard = num_shards, max_per_shard
        self.image_format, self.jpeg_quality = image_format, jpeg_quality
        self.written = 0
        self.dropped: Counter = Counter()
        self.notes: Counter = Counter()
        self.categories: set[str] = set()
        self.num_pair_samples = 0
        self._keys: set[str] = set()
        self._tars: list[tarfile.TarFile | None] = []
        self._sizes: list[int] = []
        self._pair_sizes: list[int] = []
        self._closed = False
        # A stale json would make a half-written split look complete: remove it first.
        (self.dir / f"{split}.json").unlink(missing_ok=True)
        for old in self.dir.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar*"):
            old.unlink()
        if num_shards is not None:
            if num_shards < 1:
                raise ValueError("num_shards must be >= 1")
            for _ in range(num_shards):
                self._open_new()

    def _tmp(self, i: int) -> Path:
        return self.dir / f"{self.split}-{i:06d}.tar.tmp"

    def _open_new(self):
        i = len(self._tars)
        self._tars.append(tarfile.open(self._tmp(i), "w"))
        self._sizes.append(0)
        self._pair_sizes.append(0)

    def _target(self) -> int:
        if self.num_shards is not None:
            return self.written % self.num_shards
        if not self._tars or self._sizes[-1] >= self.max_per_shard:
            if self._tars:  # finished shard: close now so few files stay open
                self._tars[-1].close()
                self._tars[-1] = None
            self._open_new()
        return len(self._tars) - 1

    @staticmethod
    def _add(tar, name: str, data: bytes, mtime: float):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), mtime, 0o644
        tar.addfile(info, io.BytesIO(data))

    def drop(self, reason: str) -> str:
        """Count a sample the converter itself rejected (e.g. unreadable source row)."""
        self.dropped[reason] += 1
        return reason

    def write(self, key: str, ann: dict, image=None, image_bytes: bytes | None = None,
              image_ext: str | None = None, extra: dict[str, bytes] | None = None) -> str | None:
        """Validate and write one sample. ``image`` is a PIL image / HxWx3 uint8 array (encoded
        here), or pass already-encoded ``image_bytes`` with ``image_ext`` ('jpg'/'png'), stored
        verbatim after a full decode check. ``extra`` holds optional members (``target.jpg``, ``mask.png``)."""
        if not _KEY_RE.match(key or ""):
            return self.drop("bad key (allowed: letters, digits, '-', '_'; no dots)")
        if key in self._keys:
            return self.drop("duplicate key")
        try:
            if image_bytes is not None:
                img = decode_image(image_bytes)
                ext = (image_ext or "jpg").lower().lstrip(".")
                ext = "jpg" if ext == "jpeg" else ext
                if ext in ("jpg", "png"):
                    data = image_bytes
                else:  # e.g. webp: store re-encoded so every reader can decode it
                    self.notes[f"image: re-encoded from {ext}"] += 1
                    ext, data = self.image_format, _encode(img, self.image_format, self.jpeg_quality)
            elif image is not None:
                img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
                img = img.convert("RGB")
                ext, data = self.image_format, _encode(img, self.image_format, self.jpeg_quality)
            else:
                return self.drop("no image")
        except Exception as e:  # any decode failure means the sample is unusable
            return self.drop(f"unreadable image ({type(e).__name__})")
        width, height = img.size
        if ann.get("width") not in (None, width) or ann.get("height") not in (None, height):
            return self.drop("image size differs from annotation size")
        pos, p1 = _valid_boxes(ann.get("positives", []), width, height)
        neg, p2 = _valid_boxes(ann.get("negatives", []), width, height)
        self.notes.update(p1)
        self.notes.update(p2)
        if not pos and not neg:
            return self.drop("no valid box")
        category = str(ann.get("category", ""))
        record = {"category": category, "width": width, "height": height, "positives": pos,
                  "negatives": neg, "source": ann.get("source", self.source), "meta": ann.get("meta", {})}
        payload = json.dumps(record, separators=(",", ":")).encode()
        i = self._target()
        tar, now = self._tars[i], time.time()
        self._add(tar, f"{key}.{ext}", data, now)
        self._add(tar, f"{key}.json", payload, now)
        for name, blob in (extra or {}).items():
            self._add(tar, f"{key}.{name}", blob, now)
        self._sizes[i] += 1
        self._keys.add(key)
        self.written += 1
        self.categories.add(category)
        self.num_pair_samples += bool(pos and neg)
        self._pair_sizes[i] += bool(pos and neg)
        return None

    def close(self) -> dict:
        """Finish: rename complete shards, then write ``{split}.json`` last. Returns the info dict."""
        if self._closed:
            raise RuntimeError("ShardWriter already closed")
        self._closed = True
        for t in self._tars:
            if t is not None:
                t.close()
        if self.written == 0:
            self.abort()
            raise ShardFormatError(f"no valid sample written for split '{self.split}' in {self.dir} "
                                   f"(dropped: {dict(self.dropped)}); check the converter inputs")
        for i in range(len(self._tars)):
            os.replace(self._tmp(i), self.dir / f"{self.split}-{i:06d}.tar")
        info = {"num_samples": self.written, "num_shards": len(self._tars), "source": self.source,
                "categories": sorted(self.categories), "shard_sizes": self._sizes,
                "num_pair_samples": self.num_pair_samples, "pair_shard_sizes": self._pair_sizes}
        tmp = self.dir / f"{self.split}.json.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, self.dir / f"{self.split}.json")
        return info

    def abort(self):
        """Remove temporary shards (the split then has no json, so it never looks complete)."""
        self._closed = True
        for i, t in enumerate(self._tars):
            if t is not None:
                t.close()
            self._tmp(i).unlink(missing_ok=True)

    def summary(self) -> str:
        lines = [f"{self.split}: written {self.written}, dropped {sum(self.dropped.values())}"]
        lines += [f"  dropped ({n}): {r}" for r, n in self.dropped.most_common()]
        lines += [f"  note ({n}): {r}" for r, n in self.notes.most_common()]
        return "\n".join(lines)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


class SplitInfo(dict):
    """The parsed ``{split}.json`` plus ``paths`` (the shard files or URLs, in index order)."""

    @property
    def paths(self) -> list[str]:
        return self["paths"]


# ------------------------------------------------------------------ locations: folders and URLs
def is_url(data_dir) -> bool:
    """A location read through fsspec (``scheme://...``: http(s), s3, gs, file, memory, ...) or a
    shell command (``pipe:...``) rather than a local folder."""
    text = str(data_dir)
    return text.startswith("pipe:") or "://" in text


def member(data_dir, name: str) -> str:
    """The location of file ``name`` of a shard folder: a path, ``URL/name``, or for ``pipe:``
    the command with ``name`` put where its ``{}`` is (``pipe:aws s3 cp s3://bucket/opa/{} -``)."""
    text = str(data_dir)
    if text.startswith("pipe:"):
        if "{}" not in text:
            raise ShardFormatError(f"data folder {text!r} is a pipe: command without a {{}} where the file name "
                                   f"goes; write e.g. 'pipe:aws s3 cp s3://bucket/opa/{{}} -'")
        return text.replace("{}", name)
    if "://" in text:
        return text.rstrip("/") + "/" + name
    return str(Path(text) / name)


def _filesystem(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def open_binary(location: str):
    """A readable binary stream of a local path, an fsspec URL (http(s) streamed in one request) or a
    ``pipe:`` command (webdataset's pipe: a failing command raises IOError while it is read)."""
    if location.startswith("pipe:"):
        import webdataset as wds

        return wds.gopen(location, "rb")
    if "://" not in location:
        return open(location, "rb")
    fs, path = _filesystem(location)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    streamed = {"block_size": 0} if {"http", "https"} & set(protocols) else {}  # one GET, no range requests
    return fs.open(path, "rb", **streamed)


def _read_bytes(location: str) -> bytes:
    """All bytes of a URL or pipe: command; FileNotFoundError when there is nothing at the URL."""
    if location.startswith("pipe:"):
        proc = subprocess.run(location[5:], shell=True, capture_output=True)
        if proc.returncode:
            raise OSError(f"command exited with status {proc.returncode}: {proc.stderr.decode(errors='replace')[-300:]}")
        return proc.stdout
    fs, path = _filesystem(location)
    return fs.cat_file(path)


def _unreadable(location: str, error: Exception) -> ShardFormatError:
    return ShardFormatError(
        f"cannot read {location} ({type(error).__name__}: {error}); check the address, the network and the "
        f"credentials (docs/multinode.md: shards in object storage)")


def split_file_exists(data_dir, split: str) -> bool:
    """Whether ``{split}.json`` is there. For a URL it is fetched (it is small): False when there is
    nothing at the URL, ShardFormatError when the location cannot be read at all (host unreachable,
    no permission, a missing fsspec back-end such as s3fs)."""
    location = member(data_dir, f"{split}.json")
    if not is_url(data_dir):
        return os.path.isfile(location)
    try:
        _read_bytes(location)
    except FileNotFoundError:
        return False
    except Exception as e:
        raise _unreadable(location, e) from None
    return True


def _missing_shards(data_dir, paths: list[str]) -> list[str]:
    """Shards that are not there: local files checked one by one; fsspec URLs from one listing of
    the folder, then one existence check for each shard the listing did not show; pipe: commands
    cannot be checked before they run (a failing one is a counted skip when it is read)."""
    if not is_url(data_dir):
        return [p for p in paths if not os.path.isfile(p)]
    if str(data_dir).startswith("pipe:"):
        return []
    fs, folder = _filesystem(str(data_dir).rstrip("/"))
    try:
        listed = {name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(folder, detail=False)}
    except Exception:  # servers without folder listings: check each shard below
        listed = set()
    unlisted = [p for p in paths if p.rsplit("/", 1)[-1] not in listed]
    return [p for p in unlisted if not fs.exists(_filesystem(p)[1])]


def read_split_info(data_dir, split: str) -> SplitInfo:
    """Read and check ``{split}.json`` of a local folder or a URL (`is_url`); errors name the
    location and how to fix it."""
    path = member(data_dir, f"{split}.json")
    if not is_url(data_dir):
        if not os.path.isfile(path):
            hint = "" if Path(data_dir).is_dir() else f" (the folder {data_dir} does not exist)"
            raise ShardFormatError(_missing_split_message(path, hint, split))
        raw = Path(path).read_bytes()
    else:
        try:
            raw = _read_bytes(path)
        except FileNotFoundError:
            raise ShardFormatError(_missing_split_message(path, " (nothing at that URL)", split)) from None
        except Exception as e:
            raise _unreadable(path, e) from None
    try:
        info = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardFormatError(f"{path} is not valid json ({e}); re-run the conversion") from e
    n, s = int(info.get("num_samples", 0)), int(info.get("num_shards", 0))
    if n <= 0 or s <= 0:
        raise ShardFormatError(f"empty split: {path} says num_samples={n}, num_shards={s}; "
                               f"re-run the conversion or pick another split")
    paths = [member(data_dir, f"{split}-{i:06d}.tar") for i in range(s)]
    missing = _missing_shards(data_dir, paths)
    if missing:
        raise ShardFormatError(f"{path} lists {s} shards but {len(missing)} are missing, e.g. {missing[0]}; "
                               f"re-run the conversion")
    if "shard_sizes" in info and (len(info["shard_sizes"]) != s or sum(info["shard_sizes"]) != n):
        raise ShardFormatError(f"{path}: shard_sizes do not add up to num_samples/num_shards; re-run the conversion")
    info["paths"] = paths
    return SplitInfo(info)


def _missing_split_message(path: str, hint: str, split: str) -> str:
    return (f"missing split file {path}{hint}: the split '{split}' was never converted or its conversion "
            f"did not finish. Run a converter (scripts/convert_*.py; toy scenes: the toy package's CLI, see "
            f"datamodules/README.md) or point data_dir at the folder holding {split}.json.")


def shard_paths(data_dir, split: str) -> list[str]:
    return read_split_info(data_dir, split).paths


def iter_annotations(data_dir, split: str):
    """Yield annotation-only samples (json; no image decode): dicts with ``key`` plus the json
    fields (category, width, height, positives, negatives, source, meta) in pixel xyxy. Shards are
    read as streams, so a URL is read once, front to back."""
    for p in read_split_info(data_dir, split).paths:
        with open_binary(p) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member_info in tar:
                if member_info.isfile() and member_info.name.endswith(".json"):
                    key = os.path.basename(member_info.name).split(".", 1)[0]
                    yield {"key": key, **json.loads(tar.extractfile(member_info).read())}
