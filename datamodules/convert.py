"""Converters from raw OPA / FOPA / PIPE data into the shard format of docs/design/shards.md.

Every converter validates each image and box through `ShardWriter`, stages all the splits it writes
in one `ShardBuild` (the previous output stays intact until every split is complete) and returns a
`ConversionReport`: per split written / dropped with reasons / box and image notes, plus what the
swap replaced or removed; the CLIs in scripts/ print it.

``workers`` > 1 runs a process pool over units of work: each unit is one output shard (OPA / FOPA:
every ``num_shards``-th sample; PIPE: a range of ``max_per_shard`` input rows) written by one
process, so the output does not depend on the number of workers (same shards, same bytes).
Bad inputs (missing folders or columns, malformed label rows) raise `ConversionError` or
`opa_labels.LabelFileError` with one line naming the file, line or column and what to do.
"""
from __future__ import annotations

import gc
import hashlib
import io
import json
import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from genloc.images import to_rgb_image

from .opa_labels import LabelledSample, read_fopa_pairs, read_opa_csv
from .shard_format import safe_key
from .shard_writer import ShardBuild, ShardWriter, SplitStats

__all__ = ["ConversionError", "ConversionReport", "scan_opa_categories", "scan_opa_foregrounds", "convert_opa_composites", "index_images", "write_labelled_samples",
           "convert_opa", "convert_fopa", "convert_pipe", "mask_box", "difference_box", "load_category_map",
           "clean_pipe_category"]

_IMG_EXT = (".jpg", ".jpeg", ".png")


class ConversionError(ValueError):
    """Unusable converter input; the message names the file / folder / column and the fix."""


@dataclass
class ConversionReport:
    """What one conversion wrote: one `SplitStats` per split, and the swap's messages."""

    splits: list[SplitStats]
    messages: list[str] = field(default_factory=list)

    def __getitem__(self, split: str) -> SplitStats:
        return next(s for s in self.splits if s.split == split)

    def summary(self) -> str:
        lines = [s.summary() for s in self.splits]
        lines += [f"  positive box from: {dict(s.box_sources)}" for s in self.splits if s.box_sources]
        return "\n".join(lines + self.messages)


def _run_units(fn, units: list[tuple], workers: int, desc: str, progress: bool, weights=None) -> list:
    """``fn(*unit)`` for every unit, in a pool of ``workers`` processes when > 1; results in unit
    order. Forked workers inherit the imported modules (no second start-up)."""
    weights = weights or [1] * len(units)
    bar = tqdm(total=sum(weights), desc=desc, disable=not progress)
    try:
        if workers <= 1:
            results = []
            for unit, weight in zip(units, weights):
                results.append(fn(*unit))
                bar.update(weight)
            return results
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        gc.freeze()  # forked children would otherwise copy every inherited object their collector touches
        pool = ProcessPoolExecutor(min(workers, len(units)) or 1, mp_context=context)
        try:
            futures = {pool.submit(fn, *unit): weight for unit, weight in zip(units, weights)}
            for done in as_completed(futures):
                done.result()  # the first failure stops the conversion
                bar.update(futures[done])
            return [f.result() for f in futures]
        finally:
            pool.shutdown(cancel_futures=True)
            gc.unfreeze()
    finally:
        bar.close()


def _check_workers(workers: int) -> None:
    if not isinstance(workers, int) or workers < 1:
        raise ConversionError(f"workers must be a whole number >= 1, got {workers!r}")


# ---------------------------------------------------------------------------------------------
# OPA / FOPA

def scan_opa_categories(foreground_dir) -> dict[str, str]:
    """fg_id -> category from OPA's ``foreground/<category>/<fg_id>.jpg`` (mask_* files skipped)."""
    out = {}
    for p in Path(foreground_dir).glob("*/*"):
        if p.suffix.lower() in _IMG_EXT and not p.name.startswith("mask_"):
            out[p.stem] = p.parent.name
    return out


def scan_opa_foregrounds(foreground_dir) -> dict[str, tuple[Path, Path]]:
    """fg_id -> (image, mask) paths from OPA's ``foreground/<category>/<fg_id>.jpg`` and ``mask_<fg_id>.jpg``
    (foregrounds without a mask file are left out)."""
    out = {}
    for p in sorted(Path(foreground_dir).glob("*/*")):
        if p.suffix.lower() in _IMG_EXT and not p.name.startswith("mask_"):
            mask = next((m for m in (p.with_name(f"mask_{p.stem}{e}") for e in _IMG_EXT) if m.is_file()), None)
            if mask is not None:
                out[p.stem] = (p, mask)
    return out


def _foreground_members(fg: tuple[Path, Path]) -> dict[str, bytes]:
    """The optional ``fg.<ext>`` (verbatim) and ``fgmask.png`` (binary: > 127) members of a sample."""
    image, mask = fg
    with Image.open(mask) as m:
        binary = (np.asarray(m.convert("L")) > 127).astype(np.uint8) * 255
    buffer = io.BytesIO()
    Image.fromarray(binary).save(buffer, format="PNG")
    ext = "png" if image.suffix.lower() == ".png" else "jpg"
    return {f"fg.{ext}": image.read_bytes(), "fgmask.png": buffer.getvalue()}


def index_images(root, what: str = "background folder") -> dict[str, Path]:
    """Image id -> path for every image under ``root`` (recursive). Ids are the file stems with
    leading zeros removed, so FOPA's ``bg/000000580029.jpg`` and OPA's ``580029.jpg`` both match.
    A missing folder or one without images is an error (a typo must not look like missing images)."""
    root = Path(root)
    if not root.is_dir():
        raise ConversionError(f"{what} {root} does not exist; check the path")
    out = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in _IMG_EXT and not p.name.startswith("mask_"):
            out.setdefault(p.stem.lstrip("0") or "0", p)
    if not out:
        raise ConversionError(f"{what} {root} holds no {'/'.join(_IMG_EXT)} images; check the path")
    return out


def load_category_map(path) -> dict[str, str]:
    """fg_id -> category from a json object or a csv with columns ``fg_id,category``."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"category map {path} not found")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise ConversionError(f"{path}: not valid json ({e})") from None
        if not isinstance(data, dict):
            raise ConversionError(f"{path}: expected a json object {{fg_id: category}}, got {type(data).__name__}")
        return {str(k): str(v) for k, v in data.items()}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("fg_id", "category") if c not in (reader.fieldnames or [])]
        if missing:
            raise ConversionError(f"{path}: missing column(s) {missing} (header: {reader.fieldnames}); "
                                  f"expected a csv with columns fg_id,category")
        return {str(r["fg_id"]).strip(): (r["category"] or "").strip() for r in reader}


def _split_of(bg_id: str, val_fraction: float) -> bool:
    """Deterministic hold-out by background id (a background never straddles train and val)."""
    h = int(hashlib.sha1(bg_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < val_fraction


def _write_labelled_shard(build: ShardBuild, split: str, index: int, items: list, source: str) -> SplitStats:
    """One shard of pooled OPA samples; ``items`` are (sample, background path or None, foreground
    (image, mask) paths or None)."""
    w = ShardWriter(build.out, split, source, build=build, shard_index=index)
    try:
        for s, path, fg in items:
            if path is None:
                w.drop("background image not found")
                continue
            try:
                data = path.read_bytes()
            except OSError as e:
                w.drop(f"unreadable background file ({type(e).__name__})")
                continue
            meta = {"bg_id": s.bg_id, **s.meta}
            extra = None
            if fg is not None:
                try:
                    extra = _foreground_members(fg[1:])
                    meta["foreground_id"] = fg[0]
                except (OSError, ValueError):
                    w.stats.notes["foreground: unreadable file, sample kept without it"] += 1
            ann = {"category": s.category, "width": s.width, "height": s.height, "positives": s.positives,
                   "negatives": s.negatives, "source": source, "meta": meta}
            w.write(s.key, ann, image_bytes=data, extra=extra)
    except BaseException:
        w.abort()
        raise
    return w.close()


def _first_foreground(sample: LabelledSample, foregrounds: dict | None) -> tuple | None:
    """(fg_id, image path, mask path) of the sample's first foreground with both files, or None."""
    for fg_id in sample.meta.get("fg_ids", []) if foregrounds else []:
        if fg_id in foregrounds:
            return (fg_id, *foregrounds[fg_id])
    return None


def write_labelled_samples(samples: list[LabelledSample], images: dict[str, Path], out_dir, split: str,
                           num_shards: int = 16, source: str = "opa", val_fraction: float = 0.0,
                           val_split: str = "val", progress: bool = True, workers: int = 1,
                           build: ShardBuild | None = None,
                           foregrounds: dict[str, tuple[Path, Path]] | None = None) -> list[SplitStats]:
    """Write pooled OPA samples (+ their background images) into ``split`` (and ``val_split`` for a
    ``val_fraction`` of backgrounds, recorded as held out from ``split``). Shard ``j`` of ``n`` holds
    samples ``j, j + n, ...`` of the input order. Without ``build`` the splits are swapped in here.
    ``foregrounds`` (fg_id -> image, mask) adds each sample's first foreground that has both as the
    optional ``fg.jpg`` + ``fgmask.png`` members (``meta.foreground_id``), for copy-paste composites."""
    _check_workers(workers)
    if not 0.0 <= val_fraction < 1.0:
        raise ConversionError(f"val_fraction must be in [0, 1), got {val_fraction}")
    own = build is None
    build = ShardBuild(out_dir) if own else build
    try:
        groups = {split: [s for s in samples if not (val_fraction and _split_of(s.bg_id, val_fraction))]}
        if val_fraction:
            groups[val_split] = [s for s in samples if _split_of(s.bg_id, val_fraction)]
        out = []
        for name, items in groups.items():
            n = max(1, min(num_shards, len(items)))
            pairs = [(s, images.get(s.bg_id.lstrip("0") or "0"), _first_foreground(s, foregrounds)) for s in items]
            units = [(build, name, j, pairs[j::n], source) for j in range(n)]
            parts = _run_units(_write_labelled_shard, units, workers, f"{source}/{name}", progress,
                               [len(u[3]) for u in units])
            stats = SplitStats(name, source)
            for part in parts:
                stats.merge(part)
            build.finish_split(stats, held_out_from=split if name == val_split and name != split else None)
            out.append(stats)
        if own:
            build.commit()
    except BaseException:
        build.abort()
        raise
    return out


def convert_opa(opa_root, out_dir, splits=("train", "test"), num_shards: int = 16, val_fraction: float = 0.0,
                progress: bool = True, workers: int = 1) -> ConversionReport:
    """OPA release layout: ``{split}_set.csv``, ``background/<cat>/<bg_id>.jpg``,
    ``foreground/<cat>/<fg_id>.jpg`` (+ ``mask_<fg_id>.jpg``) -> one sample per (background, category),
    with its first foreground and mask as optional members (`write_labelled_samples`). The hold-out
    ``val`` comes from ``train``; every split is swapped in together at the end."""
    root = Path(opa_root)
    if not root.is_dir():
        raise ConversionError(f"OPA folder {root} does not exist; check --opa-root")
    categories = scan_opa_categories(root / "foreground")
    if not categories:
        raise ConversionError(f"no foreground images under {root / 'foreground'}: expected OPA's "
                              f"foreground/<category>/<fg_id>.jpg (categories come from these folder names)")
    images = index_images(root / "background")
    foregrounds = scan_opa_foregrounds(root / "foreground")
    samples = {split: read_opa_csv(root / f"{split}_set.csv", categories) for split in splits}  # all checked first
    with ShardBuild(out_dir) as build:
        stats = []
        for split in splits:
            stats += write_labelled_samples(samples[split], images, out_dir, split, num_shards, "opa",
                                            val_fraction if split == "train" else 0.0, progress=progress,
                                            workers=workers, build=build, foregrounds=foregrounds)
        return ConversionReport(stats, build.commit())


_COMPOSITE_NAME = re.compile(r"^(?P<fg>\d+)_(?P<bg>\d+)_(?P<x>\d+)_(?P<y>\d+)_(?P<w>\d+)_(?P<h>\d+)_"
                             r"(?P<scale>[0-9.]+)_(?P<label>[01])$")


def _write_composite_shard(build: ShardBuild, split: str, index: int, items: list, categories: dict) -> SplitStats:
    """One shard of OPA's labelled composites; ``items`` are (composite path, its mask path)."""
    w = ShardWriter(build.out, split, "opa-composites", build=build, shard_index=index)
    try:
        for path, mask in items:
            m = _COMPOSITE_NAME.match(path.stem)
            x, y, bw, bh = (int(m[k]) for k in ("x", "y", "w", "h"))
            try:
                extra = {"composite_mask.png": _foreground_members((path, mask))["fgmask.png"]}
                data = path.read_bytes()
            except (OSError, ValueError) as e:
                w.drop(f"unreadable composite or mask file ({type(e).__name__})")
                continue
            box = [[x, y, x + bw, y + bh]]
            label = int(m["label"])
            ann = {"category": categories.get(m["fg"], ""), "positives": box if label else [],
                   "negatives": [] if label else box, "source": "opa-composites",
                   "meta": {"fg_id": m["fg"], "bg_id": m["bg"], "scale": float(m["scale"]), "label": label}}
            w.write(safe_key(f"opac-{path.stem}"), ann, image_bytes=data, extra=extra)
    except BaseException:
        w.abort()
        raise
    return w.close()


def convert_opa_composites(opa_root, out_dir, splits=("train", "test"), num_shards: int = 16, progress: bool = True,
                           workers: int = 1) -> ConversionReport:
    """OPA's labelled composite set (what SimOPA is trained on): ``composite/{split}_set/`` files named
    ``{fg_id}_{bg_id}_{x}_{y}_{w}_{h}_{scale}_{label}.jpg`` with ``mask_<same name>.jpg`` -> one sample per
    composite: the composite image, its box as the positive (label 1) or negative (label 0), the binary
    composite mask as ``composite_mask.png``. Categories come from ``foreground/<category>/``."""
    root = Path(opa_root)
    if not root.is_dir():
        raise ConversionError(f"OPA folder {root} does not exist; check --opa-root")
    categories = scan_opa_categories(root / "foreground")
    found = {}
    for split in splits:
        folder = root / "composite" / f"{split}_set"
        if not folder.is_dir():
            raise ConversionError(f"no folder {folder}: expected OPA's composite/{split}_set/ of labelled composites")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMG_EXT and _COMPOSITE_NAME.match(p.stem))
        pairs = [(p, p.with_name(f"mask_{p.name}")) for p in files]
        missing = [m for _, m in pairs if not m.is_file()]
        if not pairs or missing:
            raise ConversionError(f"{folder}: " + (f"mask file {missing[0].name} missing" if missing else
                                  "no composite named {fg_id}_{bg_id}_{x}_{y}_{w}_{h}_{scale}_{label}.jpg"))
        found[split] = pairs
    with ShardBuild(out_dir) as build:
        stats = []
        for split, pairs in found.items():
            n = max(1, min(num_shards, len(pairs)))
            units = [(build, split, j, pairs[j::n], categories) for j in range(n)]
            parts = _run_units(_write_composite_shard, units, workers, f"opa-composites/{split}", progress,
                               [len(u[3]) for u in units])
            split_stats = SplitStats(split, "opa-composites")
            for part in parts:
                split_stats.merge(part)
            build.finish_split(split_stats)
            stats.append(split_stats)
        return ConversionReport(stats, build.commit())


def convert_fopa(labels, background_dir, out_dir, split: str, categories: dict[str, str] | None = None,
                 num_shards: int = 16, val_fraction: float = 0.0, progress: bool = True,
                 workers: int = 1) -> ConversionReport:
    """FOPA grouped labels (``*_data_pair.csv`` / ``*_pair_new.json``) + a background folder
    (any layout; ids matched on file stems) + optional fg_id -> category map."""
    samples = read_fopa_pairs(labels, categories)
    images = index_images(background_dir)
    with ShardBuild(out_dir) as build:
        stats = write_labelled_samples(samples, images, out_dir, split, num_shards, "opa", val_fraction,
                                       progress=progress, workers=workers, build=build)
        return ConversionReport(stats, build.commit())


# ---------------------------------------------------------------------------------------------
# PIPE

def mask_box(mask: np.ndarray, threshold: int = 127):
    """Tight pixel box (x1,y1,x2,y2; x2/y2 exclusive) of mask > threshold, or None when empty."""
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m.max(axis=2)
    ys, xs = np.nonzero(m > threshold)
    if len(xs) == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def difference_box(source: np.ndarray, target: np.ndarray, threshold: int = 30, min_area: int = 64):
    """Box of the pixels where |source - target| (max over channels) > threshold, after a 3x3
    opening that removes compression speckle; None when fewer than ``min_area`` pixels change."""
    from scipy import ndimage

    diff = np.abs(source.astype(np.int16) - target.astype(np.int16)).max(axis=2) > threshold
    diff = ndimage.binary_opening(diff, structure=np.ones((3, 3), bool))
    if int(diff.sum()) < min_area:
        return None
    return mask_box(diff.astype(np.uint8), 0)


_ADD_PREFIX = re.compile(r"^\s*(please\s+)?(add|insert|put|place|include)\s+(an?|the|some|one)?\s*", re.I)


def clean_pipe_category(text: str) -> str:
    """'Add a dog' -> 'dog' (PIPE's class instructions are templated on the object class)."""
    return _ADD_PREFIX.sub("", str(text)).strip().rstrip(".!").strip().lower()


def _image_bytes(cell):
    """HF parquet image cells are {'bytes':..., 'path':...} structs; raw bytes are accepted too."""
    if isinstance(cell, dict):
        return cell.get("bytes")
    return cell


def _parquet(path, columns: list[str], what: str):
    """An open ``pyarrow.parquet.ParquetFile`` holding ``columns``; one-line errors otherwise."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{what} parquet {path} not found")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ConversionError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    names = pf.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise ConversionError(f"{path}: missing {what} column(s) {missing} (the file has {names}); "
                              f"is it a {what} parquet?" + (" The class column is set by --category-column."
                                                             if what == "PIPE" else ""))
    return pf


def _row_ranges(pf, start: int, stop: int):
    """(row groups overlapping rows [start, stop) of the file, row index of the first of them)."""
    groups, first, offset = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    return groups, first or 0


def _iter_rows(path, columns: list[str], start: int, stop: int, batch_rows: int):
    """(row index, values...) for rows [start, stop) of one parquet file, streamed in batches."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    groups, row = _row_ranges(pf, start, stop)
    if not groups:
        return
    for rb in pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
        values = [rb.column(c).to_pylist() for c in columns]
        for i in range(rb.num_rows):
            if start <= row < stop:
                yield (row, *(v[i] for v in values))
            row += 1
        if row >= stop:
            return


def _mask_boxes(path, start: int, stop: int, batch_rows: int) -> dict[tuple[str, str], tuple]:
    """(img_id, ann_id) -> (box, mask width, mask height) for rows [start, stop) of a PIPE_Masks file."""
    boxes = {}
    for _, cell, img_id, ann_id in _iter_rows(path, ["mask", "img_id", "ann_id"], start, stop, batch_rows):
        try:
            m = np.asarray(Image.open(io.BytesIO(_image_bytes(cell))).convert("L"))
        except Exception:
            continue  # unreadable mask: the sample falls back to the difference box
        box = mask_box(m)
        if box is not None:
            boxes[(str(img_id), str(ann_id))] = (box, m.shape[1], m.shape[0])
    return boxes


def _pipe_key(img_id, ann_id) -> str:
    return "pipe-" + safe_key(f"{img_id}-{ann_id}")


def _write_pipe_shard(build: ShardBuild, split: str, index: int, segments: list, masks: dict, skip: set,
                      options: dict) -> SplitStats:
    """One PIPE shard from ``segments`` [(file, global index of the file's first row, first row, stop
    row)]; ``masks``: the mask boxes of its rows; ``skip``: global row indices whose key repeats an
    earlier row (dropped as duplicates)."""
    w = ShardWriter(build.out, split, "pipe", build=build, shard_index=index)
    cols = ["source_img", "target_img", options["category_column"], "img_id", "ann_id"]
    try:
        for path, offset, start, stop in segments:
            for row, src, tgt, cat, img_id, ann_id in _iter_rows(path, cols, start, stop, options["batch_rows"]):
                if offset + row in skip:
                    w.drop("duplicate key")
                    continue
                _pipe_sample(w, src, tgt, cat, img_id, ann_id, masks, options)
    except BaseException:
        w.abort()
        raise
    return w.close()


def _pipe_sample(w: ShardWriter, src, tgt, cat, img_id, ann_id, masks: dict, options: dict) -> None:
    src_b, tgt_b = _image_bytes(src), _image_bytes(tgt)
    try:
        src_img = Image.open(io.BytesIO(src_b))
        src_img.load()
        W, H = src_img.size
    except Exception:
        w.drop("unreadable source image")
        return
    hit = masks.get((str(img_id), str(ann_id)))
    if hit is not None:
        (x1, y1, x2, y2), mw, mh = hit
        sx, sy = W / mw, H / mh
        box, how = [x1 * sx, y1 * sy, x2 * sx, y2 * sy], "mask"
    else:
        try:
            tgt_img = Image.open(io.BytesIO(tgt_b))
            tgt_img.load()
            tgt_rgb = to_rgb_image(tgt_img)[0]
        except Exception:
            w.drop("no mask and unreadable target image")
            return
        if tgt_rgb.size != (W, H):
            tgt_rgb = tgt_rgb.resize((W, H), Image.BILINEAR)
        box = difference_box(np.asarray(to_rgb_image(src_img)[0]), np.asarray(tgt_rgb), options["diff_threshold"],
                             options["min_area"])
        how = "difference"
        if box is None:
            w.drop(f"no mask and difference area < {options['min_area']} px")
            return
    ann = {"category": clean_pipe_category(cat), "width": W, "height": H, "positives": [box], "negatives": [],
           "source": "pipe", "meta": {"img_id": str(img_id), "ann_id": str(ann_id), "box_from": how,
                                      "instruction": str(cat)}}
    extra = {"target.jpg": tgt_b} if options["keep_target"] and tgt_b else None
    if w.write(_pipe_key(img_id, ann_id), ann, image_bytes=src_b, extra=extra) is None:
        w.stats.box_sources[how] += 1


def convert_pipe(parquet_paths, out_dir, split: str, mask_paths=(), diff_threshold: int = 30,
                 min_area: int = 64, max_per_shard: int = 2000, category_column: str = "Instruction_Class",
                 keep_target: bool = False, batch_rows: int = 64, limit: int | None = None,
                 progress: bool = True, workers: int = 1) -> ConversionReport:
    """PIPE parquet -> shards, streamed in pyarrow row batches (never a whole file in RAM).
    Background = ``source_img`` (object removed); positive = mask box from PIPE_Masks joined on
    (img_id, ann_id), else the thresholded |source - target| difference box. Shard ``k`` holds input
    rows ``[k * max_per_shard, (k + 1) * max_per_shard)`` (over the files in order) minus dropped rows;
    a key seen before (same img_id, ann_id) is dropped as a duplicate."""
    _check_workers(workers)
    if max_per_shard < 1 or batch_rows < 1 or (limit is not None and limit < 0):
        raise ConversionError(f"max_per_shard and batch_rows must be >= 1 and limit >= 0, got "
                              f"{max_per_shard}, {batch_rows}, {limit}")
    cols = ["source_img", "target_img", category_column, "img_id", "ann_id"]
    files = [(path, _parquet(path, cols, "PIPE")) for path in parquet_paths]
    mask_files = [(path, _parquet(path, ["mask", "img_id", "ann_id"], "PIPE_Masks")) for path in mask_paths]
    masks = {}
    if mask_files:
        units = [(path, 0, pf.metadata.num_rows, batch_rows) for path, pf in mask_files]
        for part in _run_units(_mask_boxes, units, workers, "masks", progress, [u[2] for u in units]):
            masks.update(part)
    # first pass over the id columns only: global row numbers, duplicate keys, each shard's masks
    total, seen, file_rows = 0, set(), []
    skip: dict[int, set] = {}
    shard_masks: dict[int, dict] = {}
    for path, pf in files:
        n = pf.metadata.num_rows if limit is None else max(0, min(pf.metadata.num_rows, limit - total))
        for row, img_id, ann_id in _iter_rows(path, ["img_id", "ann_id"], 0, n, 4096):
            k = (total + row) // max_per_shard
            digest = hashlib.blake2b(_pipe_key(img_id, ann_id).encode(), digest_size=8).digest()
            if digest in seen:
                skip.setdefault(k, set()).add(total + row)
            seen.add(digest)
            hit = masks.get((str(img_id), str(ann_id)))
            if hit is not None:
                shard_masks.setdefault(k, {})[(str(img_id), str(ann_id))] = hit
        file_rows.append((path, total, n))
        total += n
    del seen, masks
    units = []
    for k in range(-(-total // max_per_shard)):
        lo, hi = k * max_per_shard, min((k + 1) * max_per_shard, total)
        segments = [(path, offset, max(lo - offset, 0), min(hi - offset, n))
                    for path, offset, n in file_rows if offset < hi and offset + n > lo]
        units.append((split, k, segments, shard_masks.pop(k, {}), skip.pop(k, set())))
    options = {"diff_threshold": diff_threshold, "min_area": min_area, "category_column": category_column,
               "keep_target": keep_target, "batch_rows": batch_rows}
    with ShardBuild(out_dir) as build:
        units = [(build, *u, options) for u in units]
        stats = SplitStats(split, "pipe")
        for part in _run_units(_write_pipe_shard, units, workers, f"pipe/{split}", progress,
                               [sum(s[3] - s[2] for s in u[3]) for u in units]):
            stats.merge(part)
        build.finish_split(stats)
        return ConversionReport([stats], build.commit())
