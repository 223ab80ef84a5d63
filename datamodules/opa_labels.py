"""Readers for OPA placement labels (raw OPA csv and FOPA grouped pairs) -> pooled samples.

One `LabelledSample` is one (background, category) evaluation/training unit with every labelled
box of that pair pooled, boxes in background pixels ``x1,y1,x2,y2``. When the category of a
foreground is unknown (FOPA files carry no category; pass an fg_id -> category map to fix that),
boxes are pooled per (background, foreground id) instead: key ``opa-{bg_id}-fg{fg_id}`` and
category ``""``. Duplicate boxes are kept (each labelled box counts once in TPR/FPR).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.boxes import fopa_centre_to_xyxy, xywh_to_xyxy

__all__ = ["LabelledSample", "read_fopa_pairs", "read_opa_csv"]


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
        key = f"opa-{bg_id}-{cat}" if cat else f"opa-{bg_id}-fg{fg_id}"
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


def _fopa_rows(path: Path):
    if path.suffix.lower() == ".json":
        with open(path) as f:
            yield from json.load(f)
        return
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            row["pos_label"] = json.loads(row["pos_label"] or "[]")
            row["neg_label"] = json.loads(row["neg_label"] or "[]")
            yield row


def read_fopa_pairs(path, categories: dict[str, str] | None = None) -> list[LabelledSample]:
    """Read FOPA/TopNet grouped labels (``*_data_pair.csv`` or ``*_pair_new.json``).

    ``categories`` maps OPA fg id (``annID``) -> category; without it samples are pooled per
    (background, foreground). Image size is unknown here (width/height None).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FOPA label file not found: {path}")
    pool = _Pool(categories)
    for i, row in enumerate(_fopa_rows(path)):
        try:
            w, h = int(row["newWidth"]), int(row["newHeight"])
            group = {"row": i, "fg_src_img_id": str(row["imgID"]), "scale": float(row["scale"]), "w": w, "h": h}
            pos = _fopa_boxes(row["pos_label"], w, h)
            neg = _fopa_boxes(row["neg_label"], w, h)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise ValueError(f"{path}: malformed FOPA row {i}: {e!r}") from e
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
        for i, row in enumerate(csv.DictReader(f)):
            try:
                x, y, w, h = json.loads(row["position"])
                label = int(float(row["label"]))
            except (KeyError, ValueError, TypeError) as e:
                raise ValueError(f"{path}: malformed OPA row {i}: {e!r}") from e
            cat = None if categories else (row.get("category") or row.get("foreground_category") or None)
            width = row.get("width") or None
            height = row.get("height") or None
            pool.add(row["bg_id"], row["fg_id"], [xywh_to_xyxy([x, y, w, h]).tolist()], label,
                     width=width, height=height, category=cat)
    return pool.result()
