"""Ground truth for the TPR-FPR evaluation: labelled boxes from a shard folder (or URL), a raw OPA
csv or a FOPA pair file, checked by the one box rule of `genloc.boxes` as training checks them.

Annotation dicts are ``{key, category, positives, negatives, width, height, meta}`` with pixel
``x1, y1, x2, y2`` boxes; keys are the shard ``__key__`` or ``opa-{bg}-{category}`` /
``opa-{bg}-fg{fg_id}`` for label files (see ``datamodules.opa_labels``).
"""
from __future__ import annotations

import csv
import json
import sys
import tarfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from genloc.boxes import validate_boxes


class EvaluationError(RuntimeError):
    """Bad inputs; the message says what is wrong and how to fix it."""


# ----------------------------------------------------------------------------- annotations
def load_annotations(path, split: str = "test", shortfalls: list | None = None) -> list[dict]:
    """Annotation dicts ``{key, category, positives, negatives, width, height, meta}`` (pixel xyxy)
    from a shard folder (json only, no image decode), a raw OPA csv, or a FOPA pair csv/json. A
    shard holding other than the samples its split file records is an error; with a ``shortfalls``
    list, a shard holding fewer is recorded there instead."""
    from datamodules import opa_labels
    from datamodules.shard_format import ShardFormatError
    from datamodules.shard_reader import StorageStalled, is_url, iter_annotations, mismatch_message

    if is_url(path) or Path(path).is_dir():
        try:
            mismatches: list[dict] = []
            samples = list(iter_annotations(path, split, mismatches))
        except (ShardFormatError, StorageStalled) as e:
            raise EvaluationError(str(e)) from None
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            raise EvaluationError(f"{_broken_shard(path, split)}: unreadable ({type(e).__name__}: {e}); the shard is "
                                  f"truncated or corrupt: re-run the conversion of split '{split}'") from None
        first: dict[str, str] = {}
        for s in samples:
            shard = s.pop("shard")
            if s["key"] in first:
                where = f"twice in {shard}" if first[s["key"]] == shard else f"in {first[s['key']]} and in {shard}"
                raise EvaluationError(f"key {s['key']!r} appears {where}: keys must be unique in split '{split}' "
                                      "(a stale or copied shard?); re-run the conversion")
            first[s["key"]] = shard
        for m in mismatches:  # after the key check: a copied shard names both places first
            if shortfalls is None or m["found"] >= m["recorded"]:
                raise EvaluationError(mismatch_message(m, split))
            shortfalls.append(m)
        return samples
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"annotations {path} not found (give a shard folder, an OPA csv or a FOPA label file)")
    if path.suffix.lower() == ".json":
        samples = _read_labels(opa_labels.read_fopa_pairs, path)
    elif path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if "pos_label" in header:
            samples = _read_labels(opa_labels.read_fopa_pairs, path)
        elif "position" in header:
            samples = _read_labels(opa_labels.read_opa_csv, path)
        else:
            raise EvaluationError(f"{path}: unknown csv columns {header[:8]}; expected a FOPA pair csv "
                                  "(pos_label, neg_label) or a raw OPA csv (position, label)")
    else:
        raise EvaluationError(f"{path}: unsupported annotation file (use a shard folder, .csv or FOPA .json)")
    return [asdict(s) for s in samples]


def _broken_shard(path: Path, split: str) -> str:
    """The first shard of a split that cannot be read to the end (for the error message)."""
    from datamodules.shard_reader import open_binary, read_split_info

    for shard in read_split_info(path, split).paths:
        try:
            with open_binary(shard) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".json"):
                        json.loads(tar.extractfile(member).read())
        except (tarfile.TarError, OSError, EOFError, ValueError):
            return shard
    return str(path)


def check_annotations(samples: list[dict], from_shards: bool) -> tuple[list[dict], Counter, Counter]:
    """Labelled boxes by the one box rule (image size known; else only order and finiteness), valid
    boxes clipped to the image. Returns (kept samples, skipped samples by reason, dropped boxes by
    reason): shard samples with a broken box are skipped (the training pipeline skips them), broken
    boxes of label files are dropped (the converters drop them)."""
    kept, skipped, dropped = [], Counter(), Counter()
    examples: dict[str, str] = {}
    for s in samples:
        checked, problems = {}, Counter()
        known = bool(s.get("width") and s.get("height"))
        for field in ("positives", "negatives"):
            what = f"{field[:-1]} box"
            try:
                boxes = np.asarray(s.get(field) or [], np.float64).reshape(-1, 4)
            except (TypeError, ValueError):
                problems[f"{what}: not a list of [x1, y1, x2, y2]"] += 1
                continue
            size = (float(s["width"]), float(s["height"])) if known else box_extent(boxes)
            check = validate_boxes(boxes, size)
            problems.update({f"{what}: {p}": n for p, n in check.counts().items()})
            checked[field] = (check.clipped if known else check.boxes)[check.valid].tolist()
        if problems and from_shards:
            reason = problems.most_common(1)[0][0]
            skipped[reason] += 1
            examples.setdefault(reason, s["key"])
            continue
        dropped.update(problems)
        kept.append({**s, **checked})
    for reasons, what in ((skipped, "skipped samples whose labelled box breaks the box rule (training skips them)"),
                          (dropped, "dropped labelled boxes that break the box rule (the converters drop them)")):
        if reasons:
            detail = "; ".join(f"{n} x {r}" + (f" (e.g. key {examples[r]!r})" if r in examples else "")
                               for r, n in reasons.most_common(3))
            print(f"warning: {what}: {detail}", file=sys.stderr)
    return kept, skipped, dropped


def box_extent(boxes: np.ndarray) -> tuple[float, float]:
    """A frame holding every finite box (images of unknown size: only order and finiteness are checked)."""
    finite = boxes[np.isfinite(boxes).all(-1)]
    if not len(finite):
        return 1.0, 1.0
    return max(float(np.abs(finite[:, [0, 2]]).max()), 1.0), max(float(np.abs(finite[:, [1, 3]]).max()), 1.0)


def annotation_kind(path, split: str):
    """The `DataKind` of a shard folder's split (its ``{split}.json`` "source"); no hooks for label files."""
    from datamodules.kinds import data_kind
    from datamodules.shard_reader import is_url, read_split_info

    shards = is_url(path) or Path(path).is_dir()
    return data_kind(read_split_info(path, split).get("source") if shards else None)


def _read_labels(reader, path):
    try:
        return reader(path)
    except ValueError as e:     # malformed rows: the reader's message names file and row
        raise EvaluationError(str(e)) from None


def image_size_of(sample: dict) -> tuple[float, float, bool]:
    """(width, height, known). FOPA files carry no image size: fall back to the extent of the
    labelled boxes (a lower bound of the image), flagged as unknown."""
    if sample.get("width") and sample.get("height"):
        return float(sample["width"]), float(sample["height"]), True
    boxes = np.asarray(sample["positives"] + sample["negatives"], np.float64).reshape(-1, 4)
    return float(boxes[:, 2].max()), float(boxes[:, 3].max()), False


def size_groups(samples: list[dict]) -> list[dict]:
    """Each sample split by labelled box size (w, h): one sample per size with the positives and
    negatives of that size and ``given_size``; key ``{key}@{w}x{h}`` (the given-size protocol, docs in evaluate.py)."""
    groups = []
    for s in samples:
        by_size: dict[tuple, dict] = {}
        for field in ("positives", "negatives"):
            for box in s[field]:
                wh = (round(box[2] - box[0], 6), round(box[3] - box[1], 6))
                group = by_size.setdefault(wh, {**s, "key": f"{s['key']}@{wh[0]:g}x{wh[1]:g}", "positives": [],
                                                "negatives": [], "given_size": wh, "source_key": s["key"]})
                group[field].append(box)
        groups.extend(by_size.values())
    return groups

