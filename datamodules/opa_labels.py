"""Readers for OPA placement labels (raw OPA csv and FOPA grouped pairs) -> pooled samples.

One `LabelledSample` is one (background, category) evaluation/training unit with every labelled
box of that pair pooled, boxes in background pixels ``x1,y1,x2,y2``. When the category of a
foreground is unknown (FOPA files carry no category; pass an fg_id -> category map to fix that),
boxes are pooled per (background, foreground id) instead: key ``opa-{bg_id}-fg{fg_id}`` and
category ``""``. Keys are made tar-safe by `datamodules.shard_format.safe_key` (any category name works:
``opa-1-traffic light`` -> ``opa-1-traffic%20light``). Duplicate boxes are kept (each labelled box
counts once in TPR/FPR). A malformed file raises `LabelFileError` naming the file, the line (csv:
the file's own line number, header = line 1; json: the entry index) and the column.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from genloc.boxes import fopa_centre_to_xyxy, xywh_to_xyxy

from .shard_format import safe_key

__all__ = ["LabelledSample", "LabelFileError", "read_fopa_pairs", "read_opa_csv"]

OPA_COLUMNS = ("fg_id", "bg_id", "position", "label")
FOPA_COLUMNS = ("imgID", "annID", "scID", "scale", "newWidth", "newHeight", "pos_label", "neg_label")


class LabelFileError(ValueError):
    """A label file that cannot be read; the message names the file, line and column and the fix."""


@dataclass
class LabelledSample:
    """One (background, category) sample; boxes in pixels xyxy."""

    key: str
    bg_id: str
    category: str
    positives: list[list[float]]
    negatives: list[list[float]]
    width: int | None = None
    height: int | None = None
    meta: dict = field(default_factory=dict)


def _fopa_boxes(centres, w: int, h: int) -> list[list[float]]:
    """FOPA's ``[[cx, cy], ...]`` of one foreground size -> pixel xyxy boxes (the FOPA centre rule)."""
    c = np.asarray([[p[0], p[1]] for p in centres], dtype=np.float64).reshape(-1, 2)
    size = np.broadcast_to(np.array([w, h], np.float64), c.shape)
    return fopa_centre_to_xyxy(np.concatenate([c, size], axis=-1)).tolist()


class _Pool:
    """Accumulates boxes per sample key, preserving first-appearance order."""

    def __init__(self, categories: dict[str, str] | None):
        self.categories = {str(k): v for k, v in (categories or {}).items()}
        self.samples: dict[str, LabelledSample] = {}

    def add(self, bg_id, fg_id, boxes, label: int, width=None, height=None, category=None, extra=None):
        bg_id, fg_id = str(bg_id).strip(), str(fg_id).strip()
        cat = category or self.categories.get(fg_id, "")
        key = safe_key(f"opa-{bg_id}-{cat}" if cat else f"opa-{bg_id}-fg{fg_id}")
        s = self.samples.get(key)
        if s is None:
            s = LabelledSample(key, bg_id, cat, [], [], None, None,
                               {"fg_ids": [], "positive_fg_ids": [], "negative_fg_ids": []})
            self.samples[key] = s
        if fg_id not in s.meta["fg_ids"]:
            s.meta["fg_ids"].append(fg_id)
        if s.width is None and width is not None and height is not None:
            s.width, s.height = int(width), int(height)
        target, ids = (s.positives, s.meta["positive_fg_ids"]) if label else (s.negatives, s.meta["negative_fg_ids"])
        target.extend(boxes)
        ids.extend([fg_id] * len(boxes))
        if extra:
            s.meta.setdefault("groups", []).append(extra)

    def result(self) -> list[LabelledSample]:
        return list(self.samples.values())


def _missing_columns(path: Path, header, required) -> None:
    missing = [c for c in required if c not in (header or [])]
    if missing:
        raise LabelFileError(f"{path}: missing column(s) {missing} (the header has {list(header or [])}); "
                             f"expected columns {', '.join(required)}")


def _fopa_rows(path: Path):
    """(where, row) with ``where`` = "line N" (csv) or "entry N" (json)."""
    if path.suffix.lower() == ".json":
        try:
            with open(path) as f:
                rows = json.load(f)
        except ValueError as e:
            raise LabelFileError(f"{path}: not valid json ({e})") from None
        if not isinstance(rows, list):
            raise LabelFileError(f"{path}: expected a json list of FOPA rows, got {type(rows).__name__}")
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise LabelFileError(f"{path}: entry {i} is {type(row).__name__}, expected an object with "
                                     f"{', '.join(FOPA_COLUMNS)}")
            _missing_columns(path, list(row), FOPA_COLUMNS)
            yield f"entry {i}", row
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        _missing_columns(path, reader.fieldnames, FOPA_COLUMNS)
        for row in reader:
            where = f"line {reader.line_num}"
            for column in ("pos_label", "neg_label"):
                try:
                    row[column] = json.loads(row[column] or "[]")
                except ValueError:
                    raise LabelFileError(f"{path}: {where}, column {column}: {row[column]!r} is not a json list "
                                         "of [cx, cy] centres; fix or remove the row") from None
            yield where, row


def _field(path: Path, where: str, row: dict, column: str, parse):
    """``parse(row[column])``, or a `LabelFileError` naming file, line and column."""
    try:
        return parse(row[column])
    except (ValueError, TypeError, IndexError) as e:
        raise LabelFileError(f"{path}: {where}, column {column}: {row[column]!r} is malformed "
                             f"({type(e).__name__}: {e}); fix or remove the row") from None


def read_fopa_pairs(path, categories: dict[str, str] | None = None) -> list[LabelledSample]:
    """Read FOPA/TopNet grouped labels (``*_data_pair.csv`` or ``*_pair_new.json``).

    ``categories`` maps OPA fg id (``annID``) -> category; without it samples are pooled per
    (background, foreground). Image size is unknown here (width/height None).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FOPA label file not found: {path}")
    pool = _Pool(categories)
    for i, (where, row) in enumerate(_fopa_rows(path)):
        def field(column, parse):
            return _field(path, where, row, column, parse)

        w, h = field("newWidth", int), field("newHeight", int)
        group = {"row": i, "fg_src_img_id": str(row["imgID"]), "scale": field("scale", float), "w": w, "h": h}
        pos = field("pos_label", lambda centres: _fopa_boxes(centres, w, h))
        neg = field("neg_label", lambda centres: _fopa_boxes(centres, w, h))
        pool.add(row["scID"], row["annID"], pos, 1, extra=group)
        pool.add(row["scID"], row["annID"], neg, 0)
    return pool.result()


def read_opa_csv(path, categories: dict[str, str] | None = None) -> list[LabelledSample]:
    """Read a raw OPA ``train_set.csv`` / ``test_set.csv`` (one labelled composite per row).

    Needs columns ``fg_id, bg_id, position ("[x, y, w, h]"), label``; extra columns are ignored.
    The category comes from ``categories`` (fg id -> name, e.g. from ``foreground/<category>/``),
    else from a ``category``/``foreground_category`` column when present, else per-foreground pooling.
    Optional ``width``/``height`` columns give the background size.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"OPA csv not found: {path}")
    pool = _Pool(categories)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        _missing_columns(path, reader.fieldnames, OPA_COLUMNS)
        for row in reader:
            where = f"{path}: line {reader.line_num}"
            try:
                position = json.loads(row["position"])
                x, y, w, h = (float(v) for v in position)
            except (ValueError, TypeError):
                raise LabelFileError(f"{where}, column position: {row['position']!r} is not [x, y, w, h] (4 numbers "
                                     "in pixels); fix or remove the row") from None
            try:
                label = int(float(row["label"]))
            except (ValueError, TypeError):
                label = None
            if label not in (0, 1):
                raise LabelFileError(f"{where}, column label: {row['label']!r} is not 0 or 1; fix or remove the row")
            cat = None if categories else (row.get("category") or row.get("foreground_category") or None)
            try:
                width = int(row["width"]) if row.get("width") else None
                height = int(row["height"]) if row.get("height") else None
            except ValueError:
                raise LabelFileError(f"{where}, columns width/height: {row.get('width')!r} x {row.get('height')!r} "
                                     "are not whole numbers of pixels") from None
            pool.add(row["bg_id"], row["fg_id"], [xywh_to_xyxy([x, y, w, h]).tolist()], label,
                     width=width, height=height, category=cat)
    return pool.result()
