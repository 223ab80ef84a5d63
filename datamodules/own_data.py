"""Converters for a user's own data (docs/data.md#your-own-data): a manifest of boxes the user already
has, and COCO-style instance sets (``instances_*.json`` + an image folder; LVIS and Objects365 use the
same layout), either as they are or with every kept object erased by an inpainting back-end (the PIPE
recipe).

The same guarantees as `datamodules.convert`: every box goes through `ShardWriter` (the one validity
rule), drops are counted by reason, all splits are staged and swapped in together, ``workers`` > 1 runs
one output shard per process with the same bytes for any count. Every bad row or annotation is one
line in the report naming the file, the row (or ``annotations[i]``) and the field. ``{split}.json``
names how the split was made in ``mode`` (`MANIFEST`, `KEEP_OBJECTS`, `REMOVE_OBJECTS`).

Resume: each finished output shard is also kept in ``out/.resume-<fingerprint>/`` with its counts,
under a digest of its own inputs (rows, image file sizes and times, options); a run interrupted
part-way and started again reuses every shard whose inputs are unchanged and redoes the rest. The
folder is removed once the conversion is swapped in.

The models (inpainter, removal check) are built by the entry point and handed in: this module imports
no model code. Workers are forked, so they share what the parent loaded.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from genloc.boxes import PROBLEMS, cxcywh_to_xyxy, validate_boxes, xywh_to_xyxy
from genloc.files import write_json

from .convert import ConversionError, ConversionReport, _check_workers, _run_units
from .shard_format import KEY_RE, decode_image, safe_key, shard_name
from .shard_writer import ShardBuild, ShardWriter, SplitStats

__all__ = ["MANIFEST", "KEEP_OBJECTS", "REMOVE_OBJECTS", "BOX_FORMATS", "KEEP_OBJECTS_NOTE", "convert_manifest",
           "convert_coco", "coco_mask", "decode_rle"]

MANIFEST, KEEP_OBJECTS, REMOVE_OBJECTS = "manifest", "keep-objects", "remove-objects"
BOX_FORMATS = {"xyxy": lambda b: b, "xywh": xywh_to_xyxy, "cxcywh": cxcywh_to_xyxy}
KEEP_OBJECTS_NOTE = ("keep-objects: every object is still visible in its photo, so this data is for evaluation "
                     "or for models that must find existing objects, not for training a placement model")
MANIFEST_FIELDS = ("image", "category", "positives", "negatives", "split")
_CHANGED = "changed"  # the removal check's drop reason prefix


# ---------------------------------------------------------------------------------------------
# resume

def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _file_stamp(path) -> list:
    """(size, mtime) of a local file, None when it is missing: a changed image changes its unit."""
    try:
        st = os.stat(path)
    except OSError:
        return [str(path), None]
    return [str(path), st.st_size, st.st_mtime_ns]


def _stats_record(stats: SplitStats, lines: list[str]) -> dict:
    return {"split": stats.split, "source": stats.source, "written": stats.written, "dropped": stats.dropped,
            "notes": stats.notes, "box_sources": stats.box_sources, "categories": sorted(stats.categories),
            "num_pair_samples": stats.num_pair_samples, "sizes": list(stats.sizes.items()),
            "pair_sizes": list(stats.pair_sizes.items()), "lines": lines}


def _stats_from(rec: dict) -> tuple[SplitStats, list[str]]:
    stats = SplitStats(rec["split"], rec["source"], rec["written"], Counter(rec["dropped"]), Counter(rec["notes"]),
                       Counter(rec["box_sources"]), set(rec["categories"]), rec["num_pair_samples"],
                       {int(i): n for i, n in rec["sizes"]}, {int(i): n for i, n in rec["pair_sizes"]})
    return stats, rec["lines"]


class _Resume:
    """Finished shards of an interrupted conversion, kept until the conversion is swapped in."""

    def __init__(self, out: Path, fingerprint: str):
        self.dir = Path(out) / f".resume-{fingerprint[:16]}"
        self.reused = 0

    def load(self, build: ShardBuild, split: str, index: int, key: str):
        """(stats, lines) of a kept shard with the same inputs, its tar placed in the build; else None."""
        record = self.dir / f"{split}-{index:06d}.json"
        try:
            rec = json.loads(record.read_text())
        except (OSError, ValueError):
            return None
        if rec.get("key") != key:
            return None
        stats, lines = _stats_from(rec)
        tar = self.dir / shard_name(split, index)
        if stats.sizes:  # a shard whose every sample was dropped has no tar
            if not tar.is_file():
                return None
            _link(tar, build.stage / shard_name(split, index))
        self.reused += 1
        return stats, lines

    def save(self, build: ShardBuild, split: str, index: int, key: str, stats: SplitStats, lines: list[str]):
        self.dir.mkdir(exist_ok=True)
        staged = build.stage / shard_name(split, index)
        if staged.is_file():
            _link(staged, self.dir / f"{shard_name(split, index)}.tmp")
            os.replace(self.dir / f"{shard_name(split, index)}.tmp", self.dir / shard_name(split, index))
        write_json(self.dir / f"{split}-{index:06d}.json", {"key": key, **_stats_record(stats, lines)})

    def message(self, total: int) -> list[str]:
        return [f"resumed: {self.reused} of {total} shards reused from an interrupted run"] if self.reused else []

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _link(source: Path, target: Path) -> None:
    """A second name for a finished shard (no copy: shards are never changed once written)."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, target)


def _run_resumable(build: ShardBuild, resume: _Resume, units: list[tuple], fn, workers: int, desc: str,
                   progress: bool) -> tuple[dict[str, SplitStats], list[str]]:
    """Run ``fn(build, split, index, payload)`` -> (stats, lines) for every unit ``(split, index, key,
    payload, weight)`` not kept by ``resume``; merged stats per split (in unit order) and all lines."""
    results = {}
    todo = []
    for split, index, key, payload, weight in units:
        kept = resume.load(build, split, index, key)
        if kept is None:
            todo.append(((build, split, index, payload), weight, (split, index, key)))
        else:
            results[(split, index)] = kept
    done = _run_units(_resumable_unit, [(fn, resume, key, args) for args, _, key in todo], workers, desc, progress,
                      [w for _, w, _ in todo])
    for (_, _, (split, index, _)), result in zip(todo, done):
        results[(split, index)] = result
    merged: dict[str, SplitStats] = {}
    lines: list[str] = []
    for split, index, *_ in units:
        stats, unit_lines = results[(split, index)]
        merged.setdefault(split, SplitStats(split, stats.source)).merge(stats)
        lines += unit_lines
    return merged, lines


def _resumable_unit(fn, resume: _Resume, key: tuple, args: tuple):
    build, split, index, _ = args
    stats, lines = fn(*args)
    resume.save(build, split, index, key[2], stats, lines)
    return stats, lines


def _finish(build: ShardBuild, resume: _Resume, merged: dict[str, SplitStats], mode: str, lines: list[str],
            units: int) -> ConversionReport:
    for stats in merged.values():
        build.finish_split(stats, mode=mode)
    messages = build.commit()
    resume.remove()
    notes = [KEEP_OBJECTS_NOTE] if mode == KEEP_OBJECTS else []
    return ConversionReport(list(merged.values()), lines + notes + resume.message(units) + messages)


def _box_lines(where: str, field: str, boxes: np.ndarray, size: tuple[int, int]) -> list[str]:
    """One line per box the one rule drops (the writer drops and counts the same boxes)."""
    check = validate_boxes(boxes.reshape(-1, 4), size)
    return [f"{where}, field '{field}' box {i} {boxes[i].tolist()}: {PROBLEMS[k - 1]} in the {size[0]}x{size[1]} "
            f"image; box dropped" for i, k in enumerate(check.problem.tolist()) if k]


def _read_image_bytes(location: str, root: Path) -> bytes:
    """Bytes of a path (relative to ``root``) or of a URL fsspec can read."""
    if "://" in location:
        import fsspec

        with fsspec.open(location, "rb") as f:
            return f.read()
    return (root / location).read_bytes()


# ---------------------------------------------------------------------------------------------
# manifest

@dataclass
class _Row:
    line: int
    image: str
    category: str
    positives: np.ndarray
    negatives: np.ndarray
    split: str
    key: str


def _parse_boxes(value, box_format: str) -> np.ndarray:
    """``[[a, b, c, d], ...]`` or one ``[a, b, c, d]`` (or json text of either) -> xyxy ``[n, 4]``."""
    if value is None or value == "":
        return np.zeros((0, 4))
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"not a json list of boxes: {value!r}") from None
    if not isinstance(value, list):
        raise ValueError(f"expected a list of boxes [[x1, y1, x2, y2], ...], got {type(value).__name__}")
    if value and not isinstance(value[0], list):
        value = [value]
    for i, box in enumerate(value):
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                for v in box)):
            raise ValueError(f"box {i} is not 4 numbers: {box!r}")
    return np.asarray(BOX_FORMATS[box_format](np.asarray(value, dtype=np.float64).reshape(-1, 4)), dtype=np.float64)


def _manifest_records(path: Path):
    """(row number, dict) for each data row of a ``.jsonl`` or ``.csv`` manifest; a broken file is an error."""
    if not path.is_file():
        raise ConversionError(f"manifest {path} not found; check --manifest")
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in ("image", "category") if c not in header]
            unknown = [c for c in header if c not in MANIFEST_FIELDS]
            if missing or unknown:
                raise ConversionError(f"{path}: header {header} lacks {missing} / has unknown column(s) {unknown}; "
                                      f"columns: {', '.join(MANIFEST_FIELDS)} (image and category required)")
            rows = [(reader.line_num, dict(r)) for r in reader]
        return rows
    if path.suffix.lower() != ".jsonl":
        raise ConversionError(f"manifest {path}: expected a .jsonl or .csv file")
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                rec = f"not a json line ({e})"
            rows.append((number, rec))
    return rows


def _manifest_rows(path: Path, box_format: str, default_split: str) -> tuple[list[_Row], Counter, list[str]]:
    """Parsed rows, drops by reason and one line per bad row (file, row, field)."""
    rows, dropped, lines, seen = [], Counter(), [], {}
    records = _manifest_records(path)
    if not records:
        raise ConversionError(f"manifest {path} has no rows")
    for number, rec in records:
        where = f"{path.name} row {number}"

        def bad(field, problem, reason):
            dropped[reason] += 1
            lines.append(f"{where}, field '{field}': {problem}; row dropped")

        if not isinstance(rec, dict):
            bad("-", rec if isinstance(rec, str) else f"expected a json object, got {type(rec).__name__}",
                "row: not a json object")
            continue
        unknown = [k for k in rec if k not in MANIFEST_FIELDS]
        if unknown:
            bad(unknown[0], f"unknown field (fields: {', '.join(MANIFEST_FIELDS)})", "row: unknown field")
            continue
        image, category = rec.get("image"), rec.get("category")
        split = rec.get("split") or default_split
        if not isinstance(image, str) or not image.strip():
            bad("image", f"expected an image path or URL, got {image!r}", "row: no image")
            continue
        if not isinstance(category, str) or not category.strip():
            bad("category", f"expected an object class, got {category!r}", "row: no category")
            continue
        if not isinstance(split, str) or not KEY_RE.match(split) or "%" in split:
            bad("split", f"expected a split name of letters, digits, '-' or '_', got {split!r}", "row: bad split")
            continue
        boxes = {}
        for field in ("positives", "negatives"):
            try:
                boxes[field] = _parse_boxes(rec.get(field), box_format)
            except ValueError as e:
                bad(field, str(e), f"row: {field} not boxes")
                break
        else:
            if not len(boxes["positives"]) and not len(boxes["negatives"]):
                bad("positives", "no positive and no negative box", "row: no box")
                continue
            key = f"own-{safe_key(image.strip())}-{safe_key(category.strip())}"
            if key in seen:
                bad("image", f"{image!r} with category {category!r} is also row {seen[key]}; put all boxes of one "
                    f"image and class in one row", "row: image and category repeated")
                continue
            seen[key] = number
            rows.append(_Row(number, image.strip(), category.strip(), boxes["positives"], boxes["negatives"], split,
                             key))
    return rows, dropped, lines


def _write_manifest_shard(build: ShardBuild, split: str, index: int, payload) -> tuple[SplitStats, list[str]]:
    rows, root, name = payload
    w = ShardWriter(build.out, split, MANIFEST, build=build, shard_index=index)
    lines = []
    try:
        for row in rows:
            where = f"{name} row {row.line}"
            try:
                data = _read_image_bytes(row.image, root)
            except Exception as e:  # a missing file, an unreachable URL, an unknown protocol
                w.drop("image not found or unreadable")
                lines.append(f"{where}, field 'image': {row.image} cannot be read under {root} ({type(e).__name__}); "
                             f"row dropped")
                continue
            try:
                with Image.open(io.BytesIO(data)) as header:  # the size only; the writer decodes the image
                    size = header.size
            except Exception:  # not an image: the writer drops it below and names why
                size = None
            for field in ("positives", "negatives"):
                lines += _box_lines(where, field, getattr(row, field), size) if size else []
            ann = {"category": row.category, "positives": row.positives.tolist(), "negatives": row.negatives.tolist(),
                   "meta": {"image": row.image, "row": row.line}}
            reason = w.write(row.key, ann, image_bytes=data)
            if reason is not None:
                lines.append(f"{where}, field 'image': {reason} ({row.image}); row dropped")
    except BaseException:
        w.abort()
        raise
    return w.close(), lines


def convert_manifest(manifest, out_dir, images_root=None, box_format: str = "xyxy", split: str = "train",
                     num_shards: int = 16, progress: bool = True, workers: int = 1) -> ConversionReport:
    """Rows of (image path or URL, category, positive boxes, negative boxes, split) -> shards, one sample
    per row, in the row's ``split`` (else ``split``). Boxes are pixels in ``box_format``; image paths
    are relative to ``images_root`` (default: the manifest's folder). Shard ``j`` of a split holds its
    rows ``j, j + n, ...``."""
    _check_workers(workers)
    if box_format not in BOX_FORMATS:
        raise ConversionError(f"box format {box_format!r}: choose one of {', '.join(BOX_FORMATS)}")
    path = Path(manifest)
    root = Path(images_root) if images_root is not None else path.parent
    if not root.is_dir():
        raise ConversionError(f"image folder {root} does not exist; check --images")
    rows, dropped, lines = _manifest_rows(path, box_format, split)
    by_split: dict[str, list[_Row]] = defaultdict(list)
    for row in rows:
        by_split[row.split].append(row)
    if not by_split:
        raise ConversionError(f"manifest {path}: all {len(lines)} rows are bad, the first: {lines[0]}")
    options = [box_format, num_shards, str(root.resolve())]
    resume = _Resume(out_dir, _digest("manifest", str(path.resolve()), options))
    units = []
    for name in sorted(by_split):
        items = by_split[name]
        n = max(1, min(num_shards, len(items)))
        for j in range(n):
            part = items[j::n]
            key = _digest(options, [(r.line, r.image, r.category, r.positives.tolist(), r.negatives.tolist(),
                                     r.key) for r in part],
                          [_file_stamp(root / r.image) for r in part if "://" not in r.image])
            units.append((name, j, key, (part, root, path.name), len(part)))
    with ShardBuild(out_dir) as build:
        merged, unit_lines = _run_resumable(build, resume, units, _write_manifest_shard, workers, "manifest",
                                            progress)
        first = merged[min(merged)]
        first.dropped.update(dropped)  # rows dropped while reading count in the first split
        return _finish(build, resume, merged, MANIFEST, lines + unit_lines, len(units))


# ---------------------------------------------------------------------------------------------
# COCO-style instance sets

def decode_rle(rle: dict) -> np.ndarray:
    """``bool[h, w]`` of a COCO run-length encoding: ``counts`` a list (uncompressed) or COCO's
    compressed string; runs alternate 0 / 1 from 0 in column-major order."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, str):  # COCO's 6-bit variable-length code, each count after the second a delta
        values, p = [], 0
        while p < len(counts):
            x, k, more = 0, 0, True
            while more:
                c = ord(counts[p]) - 48
                x |= (c & 0x1F) << (5 * k)
                more = bool(c & 0x20)
                p += 1
                k += 1
                if not more and c & 0x10:
                    x |= -1 << (5 * k)
            if len(values) > 2:
                x += values[-2]
            values.append(x)
        counts = values
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any() or counts.sum() != h * w:
        raise ValueError(f"run lengths sum to {int(counts.sum())}, not {h}x{w}")
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    return flat.reshape(w, h).T


def coco_mask(segmentation, size: tuple[int, int]) -> np.ndarray | None:
    """``bool[h, w]`` of a COCO segmentation (polygons in pixels, or RLE); None when there is none."""
    w, h = size
    if not segmentation:
        return None
    if isinstance(segmentation, dict):
        mask = decode_rle(segmentation)
        if mask.shape != (h, w):
            raise ValueError(f"mask size {mask.shape[1]}x{mask.shape[0]} is not the image's {w}x{h}")
        return mask
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in segmentation:
        points = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if len(points) < 3 or not np.isfinite(points).all():
            raise ValueError("a polygon needs at least 3 finite x, y points")
        draw.polygon([tuple(p) for p in points.tolist()], fill=1, outline=1)
    mask = np.asarray(canvas, dtype=bool)
    return mask if mask.any() else None


@dataclass
class _Object:
    index: int          # position in the file's annotations list
    id: int
    category: str
    box: list           # pixels x1, y1, x2, y2
    crowd: bool
    segmentation: object


@dataclass
class _CocoImage:
    id: int
    file_name: str
    width: int
    height: int
    objects: list       # every usable annotation of the image (crowd and filtered-out classes too)
    kept: list          # the ones that pass the filters


def _coco_index(path: Path, classes, min_area: float, max_area: float, include_crowd: bool, max_objects):
    """Images with their objects, drops by reason and one line per bad annotation."""
    if not path.is_file():
        raise ConversionError(f"instances file {path} not found; check --instances")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: not valid json ({e})") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k) if isinstance(data, dict)
                                                                                    else None, list)]
    if missing:
        raise ConversionError(f"{path}: lacks the list(s) {missing}; expected a COCO instances file "
                              f"{{images, annotations, categories}}")
    names = {}
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or "id" not in c or not str(c.get("name", "")).strip():
            raise ConversionError(f"{path}: categories[{i}] needs an id and a name, got {c!r}")
        names[c["id"]] = str(c["name"]).strip()
    unknown = sorted(set(classes or ()) - set(names.values()))
    if unknown:
        raise ConversionError(f"--classes {unknown} not in {path} (it has {len(names)} classes, e.g. "
                              f"{sorted(names.values())[:10]})")
    images, dropped, lines = {}, Counter(), []
    for i, im in enumerate(data["images"]):
        try:
            iid, fname, w, h = im["id"], str(im["file_name"]), int(im["width"]), int(im["height"])
            if w <= 0 or h <= 0:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            dropped["image entry: no id, file_name, width or height"] += 1
            lines.append(f"{path.name} images[{i}]: needs id, file_name and positive width and height, got {im!r}; "
                         f"image dropped")
            continue
        if iid in images:
            dropped["image entry: id repeated"] += 1
            lines.append(f"{path.name} images[{i}]: id {iid!r} is given twice; the later entry dropped")
            continue
        images[iid] = _CocoImage(iid, fname, w, h, [], [])
    for i, a in enumerate(data["annotations"]):
        where = f"{path.name} annotations[{i}]"

        def bad(field, problem, reason):
            dropped[reason] += 1
            lines.append(f"{where}, field '{field}': {problem}; object dropped")

        if not isinstance(a, dict):
            bad("-", f"expected an object, got {a!r}", "annotation: not an object")
            continue
        image = images.get(a.get("image_id"))
        if image is None:
            bad("image_id", f"{a.get('image_id')!r} names no entry of images", "annotation: unknown image_id")
            continue
        if a.get("category_id") not in names:
            bad("category_id", f"{a.get('category_id')!r} names no entry of categories",
                "annotation: unknown category_id")
            continue
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            bad("bbox", f"expected 4 numbers x, y, width, height, got {bbox!r}", "annotation: bbox not 4 numbers")
            continue
        box = np.asarray(xywh_to_xyxy(np.asarray(bbox, dtype=np.float64)))
        check = validate_boxes(box, (image.width, image.height))
        if not check.valid:
            bad("bbox", f"{bbox} as x1,y1,x2,y2 {box.tolist()}: {PROBLEMS[int(check.problem) - 1]} in the "
                f"{image.width}x{image.height} image", f"box: {PROBLEMS[int(check.problem) - 1]}")
            continue
        image.objects.append(_Object(i, a.get("id", i), names[a["category_id"]], check.clipped.tolist(),
                                     bool(a.get("iscrowd", 0)), a.get("segmentation")))
    for image in images.values():
        visible = [o for o in image.objects if not o.crowd]
        if max_objects is not None and len(visible) > max_objects:
            dropped[f"image: more than {max_objects} objects"] += len(visible)
            continue
        for o in image.objects:
            x1, y1, x2, y2 = o.box
            area = (x2 - x1) * (y2 - y1) / (image.width * image.height)
            if classes and o.category not in classes:
                continue  # not asked for: not a drop
            if o.crowd and not include_crowd:
                dropped["object: iscrowd"] += 1
            elif not min_area <= area <= max_area:
                dropped["object: box area outside [min_area, max_area]"] += 1
            else:
                image.kept.append(o)
    return [images[k] for k in sorted(images, key=lambda k: (isinstance(k, str), k)) if images[k].kept], dropped, lines


def _object_region(o: _Object, size: tuple[int, int]) -> tuple[np.ndarray, str]:
    """(mask, where it came from): the segmentation, else the box's pixel rectangle."""
    from genloc.inpainting import box_mask

    try:
        mask = coco_mask(o.segmentation, size)
    except (ValueError, TypeError, KeyError):
        return box_mask(o.box, size), "box (segmentation unreadable)"
    if mask is not None:
        return mask, "mask"
    return box_mask(o.box, size), "box"


# The models a removal conversion uses, set by `convert_coco` before the workers fork (never pickled).
_MODELS: dict = {}


def _write_coco_shard(build: ShardBuild, split: str, index: int, payload) -> tuple[SplitStats, list[str]]:
    images, root, name, opts = payload
    remove = opts["mode"] == REMOVE_OBJECTS
    w = ShardWriter(build.out, split, "coco", build=build, shard_index=index, image_format="png" if remove else "jpg")
    lines = []
    try:
        for image in images:
            where = f"{name} images id {image.id} ({image.file_name})"
            try:
                data = _read_image_bytes(image.file_name, root)
                if remove:
                    photo = decode_image(data).image
                    size = photo.size
                else:  # the size only: the writer decodes the photo it stores
                    with Image.open(io.BytesIO(data)) as header:
                        size = header.size
            except Exception as e:  # missing or undecodable: the image's objects are dropped
                w.stats.dropped["image not found or unreadable"] += len(image.kept)
                lines.append(f"{where}: cannot be read under {root} ({type(e).__name__}); its {len(image.kept)} "
                             f"object(s) dropped")
                continue
            if size != (image.width, image.height):
                w.stats.dropped["image size differs from annotation size"] += len(image.kept)
                lines.append(f"{where}: the file is {size[0]}x{size[1]}, the json says "
                             f"{image.width}x{image.height}; its object(s) dropped")
                continue
            if remove:
                _remove_objects(w, image, photo, opts, where, lines)
            else:
                _keep_objects(w, image, data, where, lines)
    except BaseException:
        w.abort()
        raise
    return w.close(), lines


def _keep_objects(w: ShardWriter, image: _CocoImage, data: bytes, where: str, lines: list[str]) -> None:
    by_class: dict[str, list] = defaultdict(list)
    for o in image.kept:
        by_class[o.category].append(o)
    for category in sorted(by_class):
        objects = by_class[category]
        ann = {"category": category, "width": image.width, "height": image.height,
               "positives": [o.box for o in objects], "negatives": [],
               "meta": {"image_id": image.id, "file_name": image.file_name, "ann_ids": [o.id for o in objects],
                        "mode": KEEP_OBJECTS}}
        reason = w.write(f"coco-{safe_key(image.id)}-{safe_key(category)}", ann, image_bytes=data)
        if reason is not None:
            lines.append(f"{where}, class {category!r}: {reason}; sample dropped")


def _grown(mask: np.ndarray, dilate: int) -> np.ndarray:
    """`genloc.inpainting.grow_mask` computed on the window the growth can reach (the same mask, fast)."""
    from genloc.inpainting import grow_mask, mask_bbox

    if dilate <= 0:
        return mask
    h, w = mask.shape
    x0, y0, x1, y1 = mask_bbox(mask)
    x0, y0, x1, y1 = max(x0 - dilate, 0), max(y0 - dilate, 0), min(x1 + dilate, w), min(y1 + dilate, h)
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = grow_mask(mask[y0:y1, x0:x1], dilate)
    return out


def _remove_objects(w: ShardWriter, image: _CocoImage, photo: Image.Image, opts: dict, where: str,
                    lines: list[str]) -> None:
    size = photo.size
    regions = {o.index: _object_region(o, size) for o in image.objects}
    inpainter, check = _MODELS["inpainter"], _MODELS.get("check")
    for o in image.kept:
        mask, origin = regions[o.index]
        grown = _grown(mask, opts["dilate"])
        if any((grown & regions[other.index][0]).any() for other in image.objects if other is not o):
            w.drop("object: overlaps another object (skipped)")
            continue
        seed = int.from_bytes(hashlib.sha256(f"{opts['seed']}-{image.id}-{o.id}".encode()).digest()[:4], "big")
        erased = inpainter.insert(photo, o.category, mask=grown, seed=seed, mode=opts["inpaint_mode"]).image
        meta = {"image_id": image.id, "file_name": image.file_name, "ann_id": o.id, "mode": REMOVE_OBJECTS,
                "erased": origin, "dilate": opts["dilate"], "seed": seed}
        if check is not None:
            score = float(check(erased, o.box, o.category))
            meta["removal_score"] = score
            if score > opts["check_threshold"]:
                w.drop(f"{_CHANGED}: the erased region still looks like the object (score > "
                       f"{opts['check_threshold']:g})")
                continue
        ann = {"category": o.category, "width": size[0], "height": size[1], "positives": [o.box], "negatives": [],
               "meta": meta}
        reason = w.write(f"coco-{safe_key(image.id)}-{safe_key(o.id)}", ann, image=erased)
        if reason is None:
            w.stats.box_sources[origin] += 1
        else:
            lines.append(f"{where}, annotation id {o.id}: {reason}; sample dropped")


def convert_coco(instances, images_root, out_dir, split: str, mode: str = REMOVE_OBJECTS, inpainter=None,
                 classes=None, min_area: float = 0.0, max_area: float = 1.0, include_crowd: bool = False,
                 max_objects: int | None = None, dilate: int = 8, inpaint_mode: str = "auto", seed: int = 0,
                 check: Callable | None = None, check_threshold: float = 0.25, inpainter_id: str = "",
                 num_shards: int = 16, progress: bool = True, workers: int = 1) -> ConversionReport:
    """A COCO-style instances file + image folder -> one split of shards.

    ``mode`` `REMOVE_OBJECTS` (the PIPE recipe): every kept object is erased by ``inpainter`` (an
    `genloc.inpainters.Inpainter`) inside its segmentation mask (its box without one) grown by
    ``dilate`` px; the erased image, stored as PNG, is a sample whose positive is the object's box.
    An object whose grown region touches another object of the image (any class, crowd too) is
    skipped: erasing it would cut into the other, and erasing both would judge each one's place with
    the other gone. ``check(image, box, category) -> score`` (optional): a sample scoring above
    ``check_threshold`` still shows the object and is dropped. ``inpainter_id`` names the back-end
    for resume (a different back-end redoes every shard).
    ``mode`` `KEEP_OBJECTS`: the photo as it is, one sample per (image, class), every box a positive.
    Filters: ``classes`` (names), box area as a fraction of the image in [min_area, max_area],
    crowd objects unless ``include_crowd``, images with more than ``max_objects`` objects.
    Shard ``j`` holds images ``j, j + n, ...`` in id order."""
    _check_workers(workers)
    if mode not in (REMOVE_OBJECTS, KEEP_OBJECTS):
        raise ConversionError(f"mode must be {REMOVE_OBJECTS!r} or {KEEP_OBJECTS!r}, got {mode!r}")
    if mode == REMOVE_OBJECTS and inpainter is None:
        raise ConversionError("remove-objects needs an inpainter (--remove-objects INPAINTER)")
    if not 0.0 <= min_area <= max_area <= 1.0:
        raise ConversionError(f"box area bounds must satisfy 0 <= min_area <= max_area <= 1 (fractions of the "
                              f"image), got {min_area}, {max_area}")
    if dilate < 0 or (max_objects is not None and max_objects < 1):
        raise ConversionError(f"dilate must be >= 0 and max_objects >= 1, got {dilate}, {max_objects}")
    path, root = Path(instances), Path(images_root)
    if not root.is_dir():
        raise ConversionError(f"image folder {root} does not exist; check --images")
    images, dropped, lines = _coco_index(path, set(classes or ()), min_area, max_area, include_crowd, max_objects)
    if not images:
        raise ConversionError(f"{path}: no object left after the filters (dropped: {dict(dropped)})"
                              + (f"; the first bad entry: {lines[0]}" if lines else ""))
    opts = {"mode": mode, "dilate": dilate, "inpaint_mode": inpaint_mode, "seed": seed,
            "check_threshold": check_threshold if check is not None else None}
    options = [opts, num_shards, str(root.resolve()), inpainter_id if mode == REMOVE_OBJECTS else None,
               sorted(classes or ()), min_area, max_area, include_crowd, max_objects]
    resume = _Resume(out_dir, _digest("coco", str(path.resolve()), split, options))
    n = max(1, min(num_shards, len(images)))
    units = []
    for j in range(n):
        part = images[j::n]
        key = _digest(options, [(im.id, im.file_name, [(o.id, o.category, o.box, o.crowd, o.segmentation)
                                                       for o in im.objects], [o.id for o in im.kept]) for im in part],
                      [_file_stamp(root / im.file_name) for im in part])
        units.append((split, j, key, (part, root, path.name, opts), sum(len(im.kept) for im in part)))
    _MODELS.update(inpainter=inpainter, check=check)
    try:
        with ShardBuild(out_dir) as build:
            merged, unit_lines = _run_resumable(build, resume, units, _write_coco_shard, workers, f"coco/{split}",
                                                progress)
            merged[split].dropped.update(dropped)
            return _finish(build, resume, merged, mode, lines + unit_lines, len(units))
    finally:
        _MODELS.clear()
