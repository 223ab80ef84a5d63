"""Converters from raw OPA / FOPA / PIPE data into the shard format of SPEC §2.

Every converter validates each image and box through `ShardWriter` and returns the writers'
summaries (written, dropped with reasons, box problems); the CLIs in scripts/ print them.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .opa_labels import LabelledSample, read_fopa_pairs, read_opa_csv
from .shards import ShardWriter

__all__ = ["scan_opa_categories", "index_images", "write_labelled_samples", "convert_opa", "convert_fopa",
           "convert_pipe", "mask_box", "difference_box", "load_category_map", "clean_pipe_category"]

_IMG_EXT = (".jpg", ".jpeg", ".png")


def scan_opa_categories(foreground_dir) -> dict[str, str]:
    """fg_id -> category from OPA's ``foreground/<category>/<fg_id>.jpg`` (mask_* files skipped)."""
    out = {}
    for p in Path(foreground_dir).glob("*/*"):
        if p.suffix.lower() in _IMG_EXT and not p.name.startswith("mask_"):
            out[p.stem] = p.parent.name
    return out


def index_images(root) -> dict[str, Path]:
    """Image id -> path for every image under ``root`` (recursive). Ids are the file stems with
    leading zeros removed, so FOPA's ``bg/000000580029.jpg`` and OPA's ``580029.jpg`` both match."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.suffix.lower() in _IMG_EXT and not p.name.startswith("mask_"):
            out.setdefault(p.stem.lstrip("0") or "0", p)
    return out


def load_category_map(path) -> dict[str, str]:
    """fg_id -> category from a json object or a csv with columns ``fg_id,category``."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return {str(k): str(v) for k, v in json.loads(path.read_text()).items()}
    import csv

    with open(path, newline="") as f:
        return {str(r["fg_id"]).strip(): r["category"].strip() for r in csv.DictReader(f)}


def _split_of(bg_id: str, val_fraction: float) -> bool:
    """Deterministic hold-out by background id (a background never straddles train and val)."""
    h = int(hashlib.sha1(bg_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < val_fraction


def write_labelled_samples(samples: list[LabelledSample], images: dict[str, Path], out_dir, split: str,
                           num_shards: int = 16, source: str = "opa", val_fraction: float = 0.0,
                           val_split: str = "val", progress: bool = True) -> list[ShardWriter]:
    """Write pooled OPA samples (+ their background images) into ``split`` (and ``val_split``
    for a ``val_fraction`` of backgrounds). Returns the closed writers."""
    groups = {split: [s for s in samples if not (val_fraction and _split_of(s.bg_id, val_fraction))]}
    if val_fraction:
        groups[val_split] = [s for s in samples if _split_of(s.bg_id, val_fraction)]
    writers = []
    for name, items in groups.items():
        w = ShardWriter(out_dir, name, source=source, num_shards=max(1, min(num_shards, len(items))))
        try:
            for s in tqdm(items, desc=f"{source}/{name}", disable=not progress):
                path = images.get(s.bg_id.lstrip("0") or "0")
                if path is None:
                    w.drop("background image not found")
                    continue
                ann = {"category": s.category, "width": s.width, "height": s.height, "positives": s.positives,
                       "negatives": s.negatives, "source": source, "meta": {"bg_id": s.bg_id, **s.meta}}
                w.write(s.key, ann, image_bytes=path.read_bytes(), image_ext=path.suffix)
        except BaseException:
            w.abort()
            raise
        w.close()
        writers.append(w)
    return writers


def convert_opa(opa_root, out_dir, splits=("train", "test"), num_shards: int = 16, val_fraction: float = 0.0,
                progress: bool = True) -> list[ShardWriter]:
    """OPA release layout: ``{split}_set.csv``, ``background/<cat>/<bg_id>.jpg``,
    ``foreground/<cat>/<fg_id>.jpg`` -> one sample per (background, category)."""
    root = Path(opa_root)
    categories = scan_opa_categories(root / "foreground")
    if not categories:
        raise FileNotFoundError(f"no foreground images under {root / 'foreground'}: expected OPA's "
                                f"foreground/<category>/<fg_id>.jpg (categories come from these folder names)")
    images = index_images(root / "background")
    writers = []
    for split in splits:
        csv_path = root / f"{split}_set.csv"
        samples = read_opa_csv(csv_path, categories)
        writers += write_labelled_samples(samples, images, out_dir, split, num_shards, "opa",
                                          val_fraction if split == "train" else 0.0, progress=progress)
    return writers


def convert_fopa(labels, background_dir, out_dir, split: str, categories: dict[str, str] | None = None,
                 num_shards: int = 16, val_fraction: float = 0.0, progress: bool = True) -> list[ShardWriter]:
    """FOPA grouped labels (``*_data_pair.csv`` / ``*_pair_new.json``) + a background folder
    (any layout; ids matched on file stems) + optional fg_id -> category map."""
    samples = read_fopa_pairs(labels, categories)
    return write_labelled_samples(samples, index_images(background_dir), out_dir, split, num_shards, "opa",
                                  val_fraction, progress=progress)


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


def _load_mask_boxes(mask_paths, batch_rows: int, progress: bool) -> dict[tuple[str, str], tuple]:
    """First streamed pass over PIPE_Masks: (img_id, ann_id) -> (box, mask width, mask height)."""
    import pyarrow.parquet as pq

    boxes = {}
    for path in mask_paths:
        pf = pq.ParquetFile(path)
        bar = tqdm(total=pf.metadata.num_rows, desc=f"masks {Path(path).name}", disable=not progress)
        for rb in pf.iter_batches(batch_size=batch_rows, columns=["mask", "img_id", "ann_id"]):
            for cell, img_id, ann_id in zip(*(rb.column(c).to_pylist() for c in ("mask", "img_id", "ann_id"))):
                try:
                    m = np.asarray(Image.open(io.BytesIO(_image_bytes(cell))).convert("L"))
                except Exception:
                    continue  # unreadable mask: the sample falls back to the difference box
                box = mask_box(m)
                if box is not None:
                    boxes[(str(img_id), str(ann_id))] = (box, m.shape[1], m.shape[0])
            bar.update(rb.num_rows)
        bar.close()
    return boxes


def convert_pipe(parquet_paths, out_dir, split: str, mask_paths=(), diff_threshold: int = 30,
                 min_area: int = 64, max_per_shard: int = 2000, category_column: str = "Instruction_Class",
                 keep_target: bool = False, batch_rows: int = 64, limit: int | None = None,
                 progress: bool = True) -> ShardWriter:
    """PIPE parquet -> shards, streamed in pyarrow row batches (never a whole file in RAM).
    Background = ``source_img`` (object removed); positive = mask box from PIPE_Masks joined on
    (img_id, ann_id), else the thresholded |source - target| difference box."""
    import pyarrow.parquet as pq

    masks = _load_mask_boxes(list(mask_paths), batch_rows, progress) if mask_paths else {}
    w = ShardWriter(out_dir, split, source="pipe", max_per_shard=max_per_shard)
    stats = Counter()
    done = 0
    try:
        for path in parquet_paths:
            pf = pq.ParquetFile(path)
            cols = ["source_img", "target_img", category_column, "img_id", "ann_id"]
            missing = [c for c in cols if c not in pf.schema_arrow.names]
            if missing:
                raise KeyError(f"{path}: missing PIPE columns {missing} (has {pf.schema_arrow.names})")
            bar = tqdm(total=pf.metadata.num_rows, desc=f"pipe {Path(path).name}", disable=not progress)
            for rb in pf.iter_batches(batch_size=batch_rows, columns=cols):
                for src, tgt, cat, img_id, ann_id in zip(*(rb.column(c).to_pylist() for c in cols)):
                    if limit is not None and done >= limit:
                        break
                    done += 1
                    key = "pipe-" + re.sub(r"[^A-Za-z0-9_\-]", "_", f"{img_id}-{ann_id}")
                    src_b, tgt_b = _image_bytes(src), _image_bytes(tgt)
                    try:
                        src_img = Image.open(io.BytesIO(src_b))
                        src_img.load()
                        W, H = src_img.size
                    except Exception:
                        w.drop("unreadable source image")
                        continue
                    hit = masks.get((str(img_id), str(ann_id)))
                    if hit is not None:
                        (x1, y1, x2, y2), mw, mh = hit
                        sx, sy = W / mw, H / mh
                        box, how = [x1 * sx, y1 * sy, x2 * sx, y2 * sy], "mask"
                    else:
                        try:
                            tgt_img = Image.open(io.BytesIO(tgt_b)).convert("RGB")
                        except Exception:
                            w.drop("no mask and unreadable target image")
                            continue
                        if tgt_img.size != (W, H):
                            tgt_img = tgt_img.resize((W, H), Image.BILINEAR)
                        box = difference_box(np.asarray(src_img.convert("RGB")), np.asarray(tgt_img),
                                             diff_threshold, min_area)
                        how = "difference"
                        if box is None:
                            w.drop(f"no mask and difference area < {min_area} px")
                            continue
                    stats[how] += 1
                    ann = {"category": clean_pipe_category(cat), "width": W, "height": H, "positives": [box],
                           "negatives": [], "source": "pipe",
                           "meta": {"img_id": str(img_id), "ann_id": str(ann_id), "box_from": how,
                                    "instruction": str(cat)}}
                    extra = {"target.jpg": tgt_b} if keep_target and tgt_b else None
                    w.write(key, ann, image_bytes=src_b, image_ext=(src_img.format or "jpg"), extra=extra)
                bar.update(rb.num_rows)
                if limit is not None and done >= limit:
                    break
            bar.close()
    except BaseException:
        w.abort()
        raise
    w.close()
    w.box_sources = stats
    return w
