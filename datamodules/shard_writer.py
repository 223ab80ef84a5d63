"""Writing shards (format: `datamodules.shard_format`): the atomic writer with validation.

Writing never destroys a complete split before its replacement is complete: a `ShardBuild` stages
every split one conversion writes in a hidden folder inside the output folder, and `commit` swaps
them in only when all of them are finished (each split's json last, so an interrupted swap leaves
a split without json, which readers report as unfinished). A failed or interrupted conversion
leaves the previous splits exactly as they were. Replacing a split also removes a split that was
held out from it and is not written again (its samples may now be in the replacement).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.shard_format import KEY_RE, ShardFormatError, decode_image, shard_name
from genloc.boxes import validate_boxes
from genloc.files import write_json
from genloc.images import to_rgb_image

_VERBATIM = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}   # PIL format -> member extension kept as is
_LOSSY = ("JPEG", "MPO", "WEBP")                          # re-encoded in the writer's image_format, else PNG


def _valid_boxes(boxes, width: int, height: int) -> tuple[list[list[float]], Counter]:
    """(valid boxes clipped to the image, Counter of problems) by the one rule of `genloc.boxes`."""
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


def _encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        image.save(buf, format="JPEG", quality=quality)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class SplitStats:
    """What was written into one split (by one writer, or merged over parallel workers)."""

    split: str
    source: str
    written: int = 0
    dropped: Counter = field(default_factory=Counter)     # dropped samples by reason
    notes: Counter = field(default_factory=Counter)       # dropped / clipped boxes and converted images of kept samples
    box_sources: Counter = field(default_factory=Counter)  # where positive boxes came from (PIPE: mask / difference)
    categories: set = field(default_factory=set)
    num_pair_samples: int = 0
    sizes: dict = field(default_factory=dict)             # shard index -> samples
    pair_sizes: dict = field(default_factory=dict)        # shard index -> samples with a positive and a negative

    def merge(self, other: "SplitStats") -> None:
        self.written += other.written
        self.num_pair_samples += other.num_pair_samples
        for mine, theirs in ((self.dropped, other.dropped), (self.notes, other.notes),
                             (self.box_sources, other.box_sources)):
            mine.update(theirs)
        self.categories |= other.categories
        self.sizes.update(other.sizes)
        self.pair_sizes.update(other.pair_sizes)

    def summary(self) -> str:
        lines = [f"{self.split}: written {self.written}, dropped {sum(self.dropped.values())}"]
        lines += [f"  dropped ({n}): {r}" for r, n in self.dropped.most_common()]
        lines += [f"  note ({n}): {r}" for r, n in self.notes.most_common()]
        return "\n".join(lines)


def _split_files(folder: Path, split: str) -> list[Path]:
    """Shards of ``split`` in ``folder``, including temporary names left by an interrupted writer."""
    pattern = re.compile(rf"{re.escape(split)}-\d{{6}}\.tar(\.tmp)?")
    return [p for p in folder.glob(f"{_glob_escape(split)}-*.tar*") if pattern.fullmatch(p.name)]


def _glob_escape(text: str) -> str:
    """``text`` matched literally by Path.glob."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def _read_json(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def file_sha256(path: Path) -> str:
    """The checksum `{split}.json` records per shard (checked by readers and `datamodules.verify`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class ShardBuild:
    """All splits one conversion writes: staged in ``out_dir/.build-<host>-<pid>-*`` and swapped in
    together by `commit`, so a failed conversion never touches the previous output.

    Use as a context manager (commit on success, discard on error) or call `commit` / `abort`.
    ``commit`` returns one line per split replaced, written or removed (for the summary).
    """

    def __init__(self, out_dir):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self._remove_dead_stages()
        self.stage = Path(tempfile.mkdtemp(prefix=f".build-{socket.gethostname()}-{os.getpid()}-", dir=self.out))
        self.infos: dict[str, dict] = {}
        self.messages: list[str] = []
        self.closed = False

    def _remove_dead_stages(self) -> None:
        """Stages of killed conversions on this host (their process is gone) are removed."""
        prefix = f".build-{socket.gethostname()}-"
        for stage in self.out.glob(f"{_glob_escape(prefix)}*"):
            pid = stage.name[len(prefix):].split("-", 1)[0]
            if not pid.isdigit():
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(stage, ignore_errors=True)
            except PermissionError:  # alive, another user's
                pass

    def writer(self, split: str, source: str, **kwargs) -> "ShardWriter":
        return ShardWriter(self.out, split, source, build=self, **kwargs)

    def finish_split(self, stats: SplitStats, held_out_from: str | None = None, mode: str | None = None) -> dict:
        """Write the staged ``{split}.json`` of finished shards (empty shards removed, the rest
        numbered in order). An empty split is an error naming why its samples were dropped.
        ``mode`` names how the samples were made (`datamodules.own_data`; train.py warns on one)."""
        split = stats.split
        if split in self.infos:
            raise ValueError(f"split {split!r} written twice in one conversion")
        if stats.written == 0:
            for i in stats.sizes:
                (self.stage / shard_name(split, i)).unlink(missing_ok=True)
            raise ShardFormatError(f"no valid sample written for split '{split}' in {self.out} "
                                   f"(dropped: {dict(stats.dropped)}); check the converter inputs")
        sizes, pair_sizes, checksums = [], [], []
        for i in sorted(stats.sizes):
            path = self.stage / shard_name(split, i)
            if stats.sizes[i] == 0:
                path.unlink(missing_ok=True)
                continue
            checksums.append(file_sha256(path))
            os.replace(path, self.stage / shard_name(split, len(sizes)))
            sizes.append(stats.sizes[i])
            pair_sizes.append(stats.pair_sizes.get(i, 0))
        info = {"num_samples": stats.written, "num_shards": len(sizes), "source": stats.source,
                "categories": sorted(stats.categories), "shard_sizes": sizes,
                "num_pair_samples": stats.num_pair_samples, "pair_shard_sizes": pair_sizes,
                "shard_sha256": checksums}
        if held_out_from is not None:
            info["held_out_from"] = held_out_from
        if mode is not None:
            info["mode"] = mode
        write_json(self.stage / f"{split}.json", info)
        self.infos[split] = info
        return info

    def commit(self) -> list[str]:
        """Swap every finished split into the output folder, then remove splits held out from a
        replaced split that this conversion did not write again."""
        if self.closed:
            raise RuntimeError("ShardBuild already committed or aborted")
        self.closed = True
        with _folder_lock(self.out):
            for split, info in self.infos.items():
                old = _read_json(self.out / f"{split}.json")
                (self.out / f"{split}.json").unlink(missing_ok=True)
                for p in _split_files(self.out, split):
                    p.unlink()
                for i in range(info["num_shards"]):
                    os.replace(self.stage / shard_name(split, i), self.out / shard_name(split, i))
                os.replace(self.stage / f"{split}.json", self.out / f"{split}.json")
                was = "" if old is None else f" (replaced {old.get('num_samples')} samples in {old.get('num_shards')} shards)"
                self.messages.append(f"wrote split '{split}': {info['num_samples']} samples in "
                                     f"{info['num_shards']} shards{was}")
            for path in sorted(self.out.glob("*.json")):
                split = path.name[:-len(".json")]
                old = _read_json(path)
                parent = None if old is None else old.get("held_out_from")
                if split in self.infos or parent not in self.infos:
                    continue
                path.unlink()
                for p in _split_files(self.out, split):
                    p.unlink()
                self.messages.append(f"removed split '{split}' ({old.get('num_samples')} samples): it was held out "
                                     f"from '{parent}', which this conversion replaced without holding it out again")
        shutil.rmtree(self.stage, ignore_errors=True)
        return self.messages

    def abort(self) -> None:
        """Discard everything staged; the output folder is left as it was."""
        self.closed = True
        shutil.rmtree(self.stage, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self.closed:
            self.commit()
        return False


class _folder_lock:
    """An exclusive lock on the output folder while splits are swapped (two conversions into one
    folder swap one after the other, never interleaved)."""

    def __init__(self, folder: Path):
        self.path = folder / ".convert.lock"

    def __enter__(self):
        self.file = open(self.path, "a")
        try:
            import fcntl

            fcntl.flock(self.file, fcntl.LOCK_EX)
        except ImportError:  # no advisory locks on this platform
            pass
        return self

    def __exit__(self, *exc):
        self.file.close()  # closing releases the lock
        return False


class ShardWriter:
    """Writes validated samples into ``{split}-NNNNNN.tar`` shards of a `ShardBuild`.

    ``num_shards`` given: samples go round robin into exactly that many shards (balanced shards
    make DDP splits even; all tars stay open). Otherwise a new shard starts every
    ``max_per_shard`` samples (streaming, unknown total). ``shard_index`` given: the writer fills
    that one shard only (one part of a parallel conversion; `close` returns its `SplitStats` and the
    caller merges the parts with `ShardBuild.finish_split`). Without ``build`` the writer has its
    own and swaps its split in at `close`. ``write`` returns None when the sample was written, else
    the reason it was dropped; ``dropped`` counts dropped samples by reason, ``notes`` the
    dropped/clipped boxes and converted images of kept samples. Members carry a fixed mtime, so the
    same input always gives the same bytes.
    """

    def __init__(self, out_dir, split: str, source: str, num_shards: int | None = None,
                 max_per_shard: int = 1000, image_format: str = "jpg", jpeg_quality: int = 95,
                 build: ShardBuild | None = None, shard_index: int | None = None,
                 held_out_from: str | None = None):
        if image_format not in ("jpg", "png"):
            raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
        if num_shards is not None and num_shards < 1:
            raise ValueError("num_shards must be >= 1")
        if max_per_shard < 1:
            raise ValueError("max_per_shard must be >= 1")
        if shard_index is not None and (build is None or num_shards is not None):
            raise ValueError("shard_index writes one part of a ShardBuild: give build and no num_shards")
        self._own_build = build is None
        self.build = ShardBuild(out_dir) if build is None else build
        self.split, self.held_out_from = split, held_out_from
        self.stats = SplitStats(split, source)
        self.num_shards, self.max_per_shard, self.shard_index = num_shards, max_per_shard, shard_index
        self.image_format, self.jpeg_quality = image_format, jpeg_quality
        self._keys: set[str] = set()
        self._tars: dict[int, tarfile.TarFile] = {}
        self._closed = False
        for i in range(num_shards or 0):
            self._open(i)

    # attributes of the stats, read by converters and tests
    written = property(lambda self: self.stats.written)
    dropped = property(lambda self: self.stats.dropped)
    notes = property(lambda self: self.stats.notes)
    categories = property(lambda self: self.stats.categories)
    num_pair_samples = property(lambda self: self.stats.num_pair_samples)

    def _tmp(self, i: int) -> Path:
        return self.build.stage / f"{shard_name(self.split, i)}.tmp"

    def _open(self, i: int) -> None:
        self._tars[i] = tarfile.open(self._tmp(i), "w")
        self.stats.sizes[i] = 0
        self.stats.pair_sizes[i] = 0

    def _target(self) -> int:
        if self.shard_index is not None:
            if not self._tars:
                self._open(self.shard_index)
            return self.shard_index
        if self.num_shards is not None:
            return self.written % self.num_shards
        last = len(self.stats.sizes) - 1
        if last < 0 or self.stats.sizes[last] >= self.max_per_shard:
            if last >= 0:  # finished shard: close now so few files stay open
                self._tars.pop(last).close()
            self._open(last + 1)
            last += 1
        return last

    @staticmethod
    def _add(tar, name: str, data: bytes):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        tar.addfile(info, io.BytesIO(data))

    def drop(self, reason: str) -> str:
        """Count a sample the converter itself rejected (e.g. unreadable source row)."""
        self.stats.dropped[reason] += 1
        return reason

    def _image(self, image, image_bytes: bytes | None) -> tuple[Image.Image, str, bytes]:
        """(RGB image, member extension, member bytes): verbatim when the plain RGB reading is exact."""
        if image_bytes is not None:
            dec = decode_image(image_bytes)
            if dec.format in _VERBATIM and not dec.notes:
                return dec.image, _VERBATIM[dec.format], image_bytes
            rgb, notes = dec.image, dec.notes or [f"{dec.format or 'unknown format'} {dec.mode} image re-encoded"]
            ext = self.image_format if dec.format in _LOSSY else "png"
        else:
            rgb, notes = to_rgb_image(image)
            ext = self.image_format
        for note in notes:
            self.stats.notes[f"image: {note}"] += 1
        return rgb, ext, _encode(rgb, ext, self.jpeg_quality)

    def write(self, key: str, ann: dict, image=None, image_bytes: bytes | None = None,
              extra: dict[str, bytes] | None = None) -> str | None:
        """Validate and write one sample. ``image`` is a PIL image / numpy array (any mode `to_rgb_image`
        takes; encoded here), or pass already-encoded ``image_bytes`` (stored verbatim when exact, see
        the module docstring). ``extra`` holds optional members (``target.jpg``, ``mask.png``).
        Keys: letters, digits, '-', '_' and '%' (make them with `safe_key`)."""
        if not KEY_RE.match(key or ""):
            return self.drop("bad key (allowed: letters, digits, '-', '_', '%'; make keys with shard_format.safe_key)")
        if key in self._keys:
            return self.drop("duplicate key")
        if image_bytes is None and image is None:
            return self.drop("no image")
        try:
            img, ext, data = self._image(image, image_bytes)
        except Exception as e:  # any decode failure means the sample is unusable
            return self.drop(f"unreadable image ({type(e).__name__})")
        width, height = img.size
        if ann.get("width") not in (None, width) or ann.get("height") not in (None, height):
            return self.drop("image size differs from annotation size")
        pos, p1 = _valid_boxes(ann.get("positives", []), width, height)
        neg, p2 = _valid_boxes(ann.get("negatives", []), width, height)
        self.stats.notes.update(p1)
        self.stats.notes.update(p2)
        if not pos and not neg:
            return self.drop("no valid box")
        category = str(ann.get("category", ""))
        record = {"category": category, "width": width, "height": height, "positives": pos,
                  "negatives": neg, "source": ann.get("source", self.stats.source), "meta": ann.get("meta", {})}
        payload = json.dumps(record, separators=(",", ":")).encode()
        i = self._target()
        tar = self._tars[i]
        self._add(tar, f"{key}.{ext}", data)
        self._add(tar, f"{key}.json", payload)
        for name, blob in (extra or {}).items():
            self._add(tar, f"{key}.{name}", blob)
        self._keys.add(key)
        s = self.stats
        s.sizes[i] += 1
        s.written += 1
        s.categories.add(category)
        s.num_pair_samples += bool(pos and neg)
        s.pair_sizes[i] += bool(pos and neg)
        return None

    def _finish_tars(self) -> None:
        for i, t in self._tars.items():
            t.close()
        self._tars = {}
        for i in self.stats.sizes:
            os.replace(self._tmp(i), self.build.stage / shard_name(self.split, i))

    def close(self) -> dict | SplitStats:
        """Finish the shards. A part (``shard_index``) returns its `SplitStats`; otherwise the split's
        info dict, after the split is swapped in when the writer owns its build."""
        if self._closed:
            raise RuntimeError("ShardWriter already closed")
        self._closed = True
        try:
            self._finish_tars()
            if self.shard_index is not None:
                return self.stats
            info = self.build.finish_split(self.stats, self.held_out_from)
        except BaseException:
            self.abort()
            raise
        if self._own_build:
            self.build.commit()
        return info

    def abort(self):
        """Remove this writer's temporary shards; the output folder keeps its previous split."""
        self._closed = True
        for t in self._tars.values():
            t.close()
        self._tars = {}
        for i in self.stats.sizes:
            self._tmp(i).unlink(missing_ok=True)
            (self.build.stage / shard_name(self.split, i)).unlink(missing_ok=True)
        if self._own_build:
            self.build.abort()

    def summary(self) -> str:
        return self.stats.summary()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False
