"""TPR-FPR evaluation (docs/design/evaluation.md#tpr-fpr) of a checkpoint, of any method's predictions file, or of a baseline.

    python evaluate.py --checkpoint runs/x/checkpoints/last.ckpt --data data/toy/toy-opa --split test
    python evaluate.py --checkpoint runs/toy_model --data data/toy/toy-opa --split val --given-size
    python evaluate.py --predictions preds.jsonl --annotations fopa_test_data_pair.csv
    python evaluate.py --baseline random_gt_size --annotations data/opa --split test
    python evaluate.py --baseline blind --data data/toy/toy-opa --split val
    python evaluate.py --plot ours/metrics.json random/metrics.json --out fig.png

Evaluation modes write ``predictions.jsonl`` (not in predictions mode), ``metrics.json`` and
``tpr_fpr.png`` into ``--out``. Predictions and annotations are pixel ``x1,y1,x2,y2`` boxes; keys
must match the annotation keys (shard ``__key__``, or ``opa-{bg}-{category}`` /
``opa-{bg}-fg{fg_id}`` for raw OPA / FOPA label files, see ``datamodules.opa_labels``; keys are
tar-safe, ``opa-1-traffic%20light``, and a prediction key written with the raw name is accepted).
Checkpoint mode scores the boxes it just wrote exactly as predictions mode would re-score them.
When the annotations are a shard folder whose kind has a plausibility oracle (``{split}.json``
"source", see ``datamodules.kinds``; the toy scenes have one), metrics.json also holds the oracle's
plausible rate of the scored boxes, overall and per class.
``--checkpoint`` also takes a model folder or a Hub id (``scripts/export.py``).
``--given-size`` (ours, docs/design/evaluation.md#given-size; the FOPA / TopNet / GracoNet setting): the labelled boxes of a
sample are split into groups of one foreground size (OPA: one group per foreground and scale;
pooled samples may hold several), and for each group N boxes of exactly that size (to within half
a bin; sizes are clamped to 1..num_bins-1 bins) are drawn, so the model only chooses where. Each
group is scored as its own sample (key ``{key}@{w}x{h}``); every labelled box still counts once.

Inputs are checked like training inputs, by the one box rule of `models.boxes`: a shard sample with
a broken labelled box is skipped and counted (as the training pipeline skips it), a broken box of a
label file is dropped and counted (as the converters drop it); a key found twice in a split is an
error naming both shards. Predicted boxes that break the rule (swapped corners, x/y/w/h order,
normalised coordinates, another image size) are scored as given -- they hit nothing -- with a
warning saying what they look like; when no predicted box is valid nothing is scored (exit 2).
Only the first max(--ns) boxes of each prediction line are kept. When some sample has fewer boxes
than max(--ns), the curve stops at the fewest any sample has (with a warning), so a point "@n"
always means n boxes per sample. Every error is one line and exit code 2.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tarfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from metrics.tpr_fpr import DEFAULT_NS, TPRFPR, result_curves
from models.boxes import PROBLEMS, denormalise, normalise, validate_boxes, xywh_to_xyxy, xyxy_to_xywh

BASELINES = ("random", "random_gt_size", "blind")


# Images per sampling call unless the memory budget allows fewer: one seeded generator runs over
# the whole pass, so a seed's boxes depend on the batch size; a fixed ceiling keeps results
# comparable across machines.
MAX_SAMPLING_BATCH = 32


class EvaluationError(RuntimeError):
    """Bad inputs; the message says what is wrong and how to fix it."""


# ----------------------------------------------------------------------------- annotations
def load_annotations(path, split: str = "test") -> list[dict]:
    """Annotation dicts ``{key, category, positives, negatives, width, height, meta}`` (pixel xyxy)
    from a shard folder (json only, no image decode), a raw OPA csv, or a FOPA pair csv/json."""
    from datamodules import opa_labels
    from datamodules.shards import ShardFormatError, is_url, iter_annotations

    if is_url(path) or Path(path).is_dir():
        try:
            samples = list(iter_annotations(path, split))
        except ShardFormatError as e:
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
    from datamodules.shards import open_binary, read_split_info

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
            size = (float(s["width"]), float(s["height"])) if known else _extent(boxes)
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


def _extent(boxes: np.ndarray) -> tuple[float, float]:
    """A frame holding every finite box (images of unknown size: only order and finiteness are checked)."""
    finite = boxes[np.isfinite(boxes).all(-1)]
    if not len(finite):
        return 1.0, 1.0
    return max(float(np.abs(finite[:, [0, 2]]).max()), 1.0), max(float(np.abs(finite[:, [1, 3]]).max()), 1.0)


def annotation_kind(path, split: str):
    """The `DataKind` of a shard folder's split (its ``{split}.json`` "source"); no hooks for label files."""
    from datamodules.kinds import data_kind
    from datamodules.shards import is_url, read_split_info

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


# ----------------------------------------------------------------------------- predictions
def read_predictions(path, max_boxes: int | None = None) -> dict[str, np.ndarray]:
    """``{"key", "boxes"}`` per JSONL line -> key -> float64 ``[N, 4]``; errors name the line. Read a
    line at a time, keeping only the first ``max_boxes`` boxes of each (the rest never count)."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"predictions file {path} not found")
    preds: dict[str, np.ndarray] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = str(rec["key"])
                boxes = np.asarray(rec["boxes"][:max_boxes], np.float64).reshape(-1, 4)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise EvaluationError(f"{path}:{lineno}: expected {{\"key\": str, \"boxes\": [[x1,y1,x2,y2], ...]}} "
                                      f"({type(e).__name__}: {e})") from None
            if not np.isfinite(boxes).all():
                raise EvaluationError(f"{path}:{lineno}: non-finite box coordinates for key {key!r}")
            if key in preds:
                raise EvaluationError(f"{path}:{lineno}: duplicate key {key!r}")
            preds[key] = boxes
    if not preds:
        raise EvaluationError(f"predictions file {path} holds no predictions")
    return preds


NORMALISED = "within [0, 1] in a larger image"


def check_predictions(preds: dict[str, np.ndarray], samples: list[dict]) -> dict:
    """Predicted boxes by the one box rule against their sample's image (and boxes that fit in
    [0, 1] of a larger image, which look normalised): a warning saying what the broken boxes look
    like, an error when none is usable. Returns the counts for metrics.json."""
    total, problems, suspects = 0, Counter(), Counter()
    for s in samples:
        boxes = preds.get(s["key"])
        if boxes is None or not len(boxes):
            continue
        w, h, known = image_size_of(s)
        size = (w, h) if known else _extent(np.concatenate([boxes, np.asarray(s["positives"] + s["negatives"],
                                                                               np.float64).reshape(-1, 4)]))
        check = validate_boxes(boxes, size)
        total += len(boxes)
        problems.update(check.counts())
        bad = ~check.valid
        tiny = check.valid & (boxes <= 1.0).all(-1) & (min(size) > 2)
        problems[NORMALISED] += int(tiny.sum())
        if tiny.any():
            suspects["normalised"] += int(tiny.sum())
        if bad.any() and validate_boxes(xywh_to_xyxy(boxes[bad]), size).valid.all():
            suspects["xywh"] += int(bad.sum())
        if bad.any() and validate_boxes(boxes[bad][:, [2, 3, 0, 1]], size).valid.all():
            suspects["swapped"] += int(bad.sum())
    if total == 0:
        raise EvaluationError("the predictions hold no box for any annotated sample: nothing to score")
    problems = +problems
    broken = sum(problems.values())
    if broken:
        hint = {"normalised": "they look normalised to [0, 1]: give pixel coordinates of the image",
                "xywh": "they look like x, y, width, height: give x1, y1, x2, y2",
                "swapped": "they look like x2, y2, x1, y1 (corners swapped): give x1, y1, x2, y2"}
        likely = [hint[k] for k, n in suspects.most_common() if n >= 0.5 * broken]
        if not likely and problems[PROBLEMS[2]] >= 0.5 * broken:
            likely = ["are they normalised, or xywh, or for another image size?"]
        detail = ", ".join(f"{n} {p}" for p, n in problems.most_common())
        message = (f"{100 * broken / total:.0f} % of the predicted boxes lie outside their image or are not boxes "
                   f"({detail}; of {total}): " + ("; ".join(likely) or "they count as misses"))
        if broken == total:
            raise EvaluationError(f"no predicted box is usable, nothing sensible to score: {message}")
        print(f"warning: {message}", file=sys.stderr)
    return {"boxes": total, "broken": dict(problems)}


def reported_ns(preds: dict[str, np.ndarray], samples: list[dict], ns: list[int]) -> list[int]:
    """The curve points every sample can honour: when some sample has fewer boxes than max(ns), the
    points stop at the fewest boxes any sample with boxes has (a warning says so)."""
    counts = [len(preds[s["key"]]) for s in samples if s["key"] in preds]
    fewest = min((c for c in counts if c), default=0)
    if fewest == 0:
        raise EvaluationError("no annotated sample has a predicted box: nothing to score")
    if fewest >= max(ns):
        return list(ns)
    short = sum(1 for c in counts if c < max(ns))
    kept = [n for n in ns if n < fewest] + [fewest]
    print(f"warning: {short} samples have fewer than {max(ns)} predicted boxes (fewest: {fewest}); the curve is "
          f"reported up to n = {fewest} (points {kept}); give every sample {max(ns)} boxes to score @{max(ns)}",
          file=sys.stderr)
    return kept


def write_predictions(path, preds: dict[str, np.ndarray]) -> None:
    with open(path, "w") as f:
        for key, boxes in preds.items():
            f.write(json.dumps({"key": key, "boxes": np.asarray(boxes, np.float64).tolist()}) + "\n")


def annotation_keys(preds: dict, samples: list[dict]) -> dict:
    """Prediction keys written with the raw category name (``opa-1-traffic light``) renamed to the
    tar-safe annotation key (``opa-1-traffic%20light``, `datamodules.shards.safe_key`) when only
    that one matches an annotation."""
    from datamodules.shards import safe_key

    keys = {s["key"] for s in samples}
    return {k if k in keys or safe_key(k) not in keys else safe_key(k): v for k, v in preds.items()}


def match_keys(preds: dict, samples: list[dict], allow_missing: bool) -> dict:
    """Check prediction keys against annotation keys; returns the key report for metrics.json."""
    ann_keys = {s["key"] for s in samples}
    missing = sorted(ann_keys - preds.keys())
    extra = sorted(preds.keys() - ann_keys)
    if missing and not allow_missing:
        raise EvaluationError(
            f"{len(missing)} of {len(ann_keys)} annotated samples have no predictions, e.g. {missing[:5]}; "
            f"{len(extra)} prediction keys match no annotation, e.g. {extra[:5]}. Fix the keys, or pass "
            "--allow-missing to score missing samples as empty predictions")
    if extra:
        print(f"warning: ignoring {len(extra)} prediction keys without annotations, e.g. {extra[:5]}", file=sys.stderr)
    if missing:
        print(f"warning: {len(missing)} annotated samples have no predictions (scored as empty), "
              f"e.g. {missing[:5]}", file=sys.stderr)
    return {"missing_keys": len(missing), "extra_keys": len(extra),
            "missing_examples": missing[:10], "extra_examples": extra[:10]}


# ----------------------------------------------------------------------------- baselines
def baseline_predictions(samples: list[dict], kind: str, n: int, seed: int,
                         train: list[dict] | None = None) -> dict[str, np.ndarray]:
    """Seeded baseline boxes in pixels: ``random`` = corners uniform in the image (sorted so
    x1<x2, y1<y2); ``random_gt_size`` = the size of a random labelled box of the sample (OPA's
    foreground size) at a uniformly random position inside the image; ``blind`` = image-blind:
    random positive boxes of the same class from the ``train`` samples, in normalised coordinates
    (so the box keeps its place relative to the image frame)."""
    if kind not in BASELINES:
        raise EvaluationError(f"unknown baseline {kind!r}; choose one of {BASELINES}")
    rng = np.random.default_rng(seed)
    pools = _positive_pools(train) if kind == "blind" else {}
    unknown = 0
    out = {}
    for s in samples:
        w, h, known = image_size_of(s)
        unknown += not known
        if kind == "random":
            xs = np.sort(rng.uniform(0, w, size=(n, 2)), axis=1)
            ys = np.sort(rng.uniform(0, h, size=(n, 2)), axis=1)
            boxes = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1)
        elif kind == "blind":
            if s["category"] not in pools:
                raise EvaluationError(f"sample {s['key']}: no training positive of class {s['category']!r} for the "
                                      f"blind baseline (training classes: {sorted(pools)})")
            pool = pools[s["category"]]
            boxes = denormalise(pool[rng.integers(len(pool), size=n)], (w, h))
        else:
            gt = np.asarray(s["positives"] + s["negatives"], np.float64).reshape(-1, 4)
            size = xyxy_to_xywh(gt)[:, 2:][rng.integers(len(gt), size=n)]
            size = np.minimum(size, [w, h])
            x1 = rng.uniform(0, 1, n) * (w - size[:, 0])
            y1 = rng.uniform(0, 1, n) * (h - size[:, 1])
            boxes = np.stack([x1, y1, x1 + size[:, 0], y1 + size[:, 1]], 1)
        out[s["key"]] = boxes
    if unknown:
        print(f"warning: {unknown} samples have no image size (FOPA labels); baseline boxes are drawn inside "
              "the extent of their labelled boxes instead of the whole image", file=sys.stderr)
    return out


def _positive_pools(train: list[dict] | None) -> dict[str, np.ndarray]:
    """Class -> normalised positive boxes ``[k, 4]`` of the training samples, in their order."""
    if not train:
        raise EvaluationError("the blind baseline needs training annotations (a shard folder with --train-split)")
    pools: dict[str, list] = {}
    for s in train:
        w, h, _ = image_size_of(s)
        pools.setdefault(s["category"], []).append(normalise(np.asarray(s["positives"], np.float64).reshape(-1, 4),
                                                             (w, h)))
    return {c: np.concatenate(p) for c, p in pools.items() if sum(map(len, p))}


# ----------------------------------------------------------------------------- checkpoint sampling
def size_groups(samples: list[dict]) -> list[dict]:
    """Each sample split by labelled box size (w, h): one sample per size with the positives and
    negatives of that size and ``given_size``; key ``{key}@{w}x{h}`` (see module docstring)."""
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


def given_sizes(groups: list[dict], sizes: torch.Tensor, owners: list[int], num_bins: int) -> torch.Tensor:
    """Normalised exact ``(w, w, h, h)`` per group row for `LocationModel.sample`, clamped to 1..num_bins-1 bins."""
    wh = torch.tensor([g["given_size"] for g in groups], dtype=torch.float64)
    norm = wh / sizes[owners].double().cpu()
    norm = norm.clamp(1.0 / num_bins, (num_bins - 1.0) / num_bins)
    return norm[:, [0, 0, 1, 1]]


def sample_checkpoint(args, groups: list[dict] | None = None) -> dict[str, np.ndarray]:
    """N boxes (pixels) per sample of ``--data/--split`` from the model's batched sampler, one
    seeded generator over the whole pass (same model, data and batch size -> same boxes). With
    ``groups`` (`size_groups`), N boxes of each group's size per group, keyed by group."""
    from datamodules import ShardDataModule
    from lightning_modules.checkpoint import CheckpointError
    from models.hub import ModelFilesError, load_model

    try:
        model = load_model(args.checkpoint, args.device)
    except (CheckpointError, ModelFilesError) as e:
        raise EvaluationError(str(e)) from None
    if args.batch_size is None:
        fits = model.sampling_batch_size(args.num_samples, args.sampling_memory * 2 ** 30)
        args.batch_size = min(MAX_SAMPLING_BATCH, fits)
        if fits < MAX_SAMPLING_BATCH:
            print(f"note: --sampling-memory {args.sampling_memory:g} GiB fits {fits} images per sampling call; the "
                  f"boxes drawn for a seed depend on this batch size (recorded in metrics.json)", file=sys.stderr)
    by_key: dict[str, list[dict]] = {}
    for g in groups or []:
        by_key.setdefault(g["source_key"], []).append(g)
    dm = ShardDataModule(args.data, image_size=model.cfg.image_size, batch_size=args.batch_size,
                         num_workers=args.num_workers, seed=args.seed, flip_prob=0.0, train_split=None,
                         val_split=None, test_split=args.split)
    dm.setup("test")
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    preds: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for batch in tqdm(dm.test_dataloader(), desc="sampling", disable=args.no_progress, leave=False):
            if groups is not None:
                _sample_groups(model, batch, by_key, args, generator, preds)
                continue
            out = model.sample(batch["image"].to(args.device), batch["category"], n=args.num_samples,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               generator=generator, image_sizes=batch["size"].to(args.device), bf16=args.bf16)
            for key, boxes in zip(batch["key"], out.boxes.double().cpu().numpy()):
                if key in preds:
                    raise EvaluationError(f"the {args.split} loader of {args.data} yielded key {key!r} twice")
                preds[key] = boxes
    return preds


def _sample_groups(model, batch: dict, by_key: dict, args, generator, preds: dict) -> None:
    """`LocationModel.sample` calls of at most ``args.batch_size`` size groups (rows) for a batch."""
    pairs = [(i, g) for i, key in enumerate(batch["key"]) for g in by_key.get(key, [])]
    for start in range(0, len(pairs), args.batch_size):
        owners, rows = map(list, zip(*pairs[start:start + args.batch_size]))
        _sample_group_rows(model, batch, owners, rows, args, generator, preds)


def _sample_group_rows(model, batch: dict, owners: list[int], rows: list[dict], args, generator, preds: dict) -> None:
    idx = torch.tensor(owners)
    out = model.sample(batch["image"][idx].to(args.device), [batch["category"][i] for i in owners],
                       n=args.num_samples, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       generator=generator, image_sizes=batch["size"][idx].to(args.device),
                       size=given_sizes(rows, batch["size"], owners, model.cfg.num_bins).to(args.device),
                       bf16=args.bf16)
    for g, boxes in zip(rows, out.boxes.double().cpu().numpy()):
        if g["key"] in preds:
            raise EvaluationError(f"the {args.split} loader of {args.data} yielded key {g['source_key']!r} twice")
        preds[g["key"]] = boxes


# ----------------------------------------------------------------------------- scoring
def score(preds: dict[str, np.ndarray], samples: list[dict], ns=DEFAULT_NS, iou_threshold: float = 0.5,
          chunk: int = 512, progress: bool = True) -> dict:
    """Run TPRFPR over all samples (missing predictions = none). Samples are sorted by box count
    so each padded chunk wastes little."""
    metric = TPRFPR(ns=ns, iou_threshold=iou_threshold)
    empty = np.zeros((0, 4))
    order = sorted(samples, key=lambda s: (len(s["positives"]) + len(s["negatives"]), len(preds.get(s["key"], empty))))
    for i in tqdm(range(0, len(order), chunk), desc="scoring", disable=not progress, leave=False):
        part = order[i:i + chunk]
        metric.update([torch.from_numpy(preds.get(s["key"], empty)) for s in part],
                      [s["positives"] for s in part], [s["negatives"] for s in part])
    return {k: v.item() for k, v in metric.compute().items()}


def plausible_rates(samples: list[dict], preds: dict[str, np.ndarray], oracle) -> dict[str, float]:
    """Fraction of predicted boxes the data kind's ``oracle(meta, category, boxes_norm)`` accepts:
    ``{"all": rate, <class>: rate of that class's boxes, ...}`` (classes sorted by name)."""
    hits: dict[str, int] = {}
    total: dict[str, int] = {}
    for s in samples:
        if s["key"] not in preds:
            continue
        w, h, _ = image_size_of(s)
        verdict = np.asarray(oracle(s.get("meta") or {}, s["category"], normalise(preds[s["key"]], (w, h))))
        hits[s["category"]] = hits.get(s["category"], 0) + int(verdict.sum())
        total[s["category"]] = total.get(s["category"], 0) + len(verdict)
    rates = {"all": sum(hits.values()) / max(sum(total.values()), 1)}
    rates.update({c: hits[c] / max(total[c], 1) for c in sorted(total)})
    return rates


def write_results(out_dir: Path, result: dict, ns, label: str, extra: dict) -> dict:
    """metrics.json (both TPR/FPR variants, precision, counts, settings) and tpr_fpr.png."""
    from metrics.plots import plot_curves

    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    curves = result_curves(result, ns)
    doc = {"method": label, **extra, "ns": list(ns), "curves": curves, "metrics": result,
           "counts": {k: result[k] for k in ("num_samples", "num_positives", "num_negatives")}}
    (out_dir / "metrics.json").write_text(json.dumps(doc, indent=1))
    plt.close(plot_curves({label: curves}, out_dir / "tpr_fpr.png", title=label))
    return doc


def plot_results(files: list[str], out: Path, labels: list[str] | None) -> None:
    """Several metrics.json files as curves on one figure."""
    from metrics.plots import plot_curves

    import matplotlib.pyplot as plt

    if labels and len(labels) != len(files):
        raise EvaluationError(f"--labels has {len(labels)} names for {len(files)} --plot files")
    curves = {}
    for i, f in enumerate(files):
        try:
            doc = json.loads(Path(f).read_text())
            curve = doc["curves"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise EvaluationError(f"{f}: not a metrics.json written by evaluate.py ({type(e).__name__}: {e})") from None
        label = labels[i] if labels else doc.get("method", Path(f).parent.name)
        if label in curves:
            label = f"{label} ({f})"
        curves[label] = curve
    if out.suffix.lower() != ".png":
        out = out / "tpr_fpr.png"
    plt.close(plot_curves(curves, out))
    print(f"wrote {out}")


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--checkpoint", help="location model to sample boxes from: a Lightning checkpoint, a model "
                                           "folder (scripts/export.py) or a Hub id")
    mode.add_argument("--predictions", help="JSONL predictions {key, boxes (pixels)} of any method")
    mode.add_argument("--baseline", choices=BASELINES, help="built-in seeded baseline (blind: random training "
                      "positives of the same class, from --train-split of the shard folder)")
    mode.add_argument("--plot", nargs="+", metavar="METRICS_JSON", help="draw several result files on one plot")
    p.add_argument("--data", help="shard folder or URL (https://, s3://, gs://, ..., pipe:...{}; checkpoint mode; "
                                  "also accepted as --annotations)")
    p.add_argument("--annotations", help="shard folder, raw OPA csv, or FOPA *_data_pair.csv / *_pair_new.json")
    p.add_argument("--split", default="test", help="shard split (default: test)")
    p.add_argument("--train-split", default="train", help="shard split the blind baseline draws from (default: train)")
    p.add_argument("--out", default="results/eval", help="output folder (a .png path for --plot)")
    p.add_argument("--name", help="method name in metrics.json and legends")
    p.add_argument("--labels", nargs="+", help="legend names for --plot (default: each file's method)")
    p.add_argument("--num-samples", type=int, default=100, help="boxes drawn per sample, N (default 100)")
    p.add_argument("--ns", type=int, nargs="+", help="curve points (default 10 20 ... N)")
    p.add_argument("--iou-threshold", type=float, default=0.5, help="tau; IoU >= tau is a hit (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per sampling call (default: {MAX_SAMPLING_BATCH}, fewer when --sampling-memory "
                        "allows fewer); the boxes drawn for a seed depend on it, so it is recorded")
    p.add_argument("--sampling-memory", type=float, default=4.0, metavar="GIB",
                   help="memory budget of one sampling call in GiB, sizes the batch when --batch-size is not "
                        "given (default 4)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="decode in bf16 autocast (a GPU speed option; docs/gpu.md)")
    p.add_argument("--allow-missing", action="store_true", help="score annotated samples without predictions as empty")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--given-size", action="store_true",
                   help="(with --checkpoint) draw boxes of each labelled foreground size: the model only picks where")
    args = p.parse_args(argv)
    checks = (("--num-samples", args.num_samples, args.num_samples >= 1, ">= 1"),
              ("--temperature", args.temperature, math.isfinite(args.temperature) and args.temperature > 0, "> 0"),
              ("--top-k", args.top_k, args.top_k is None or args.top_k >= 1, ">= 1"),
              ("--top-p", args.top_p, args.top_p is None or 0 < args.top_p <= 1, "in (0, 1]"),
              ("--iou-threshold", args.iou_threshold, 0 < args.iou_threshold <= 1, "in (0, 1]"),
              ("--batch-size", args.batch_size, args.batch_size is None or args.batch_size >= 1, ">= 1"),
              ("--sampling-memory", args.sampling_memory, args.sampling_memory > 0, "> 0 GiB"),
              ("--num-workers", args.num_workers, args.num_workers >= 0, ">= 0"))
    for flag, value, ok, allowed in checks:
        if not ok:
            p.error(f"{flag} must be {allowed}, got {value}")
    if args.ns and (min(args.ns) < 1 or sorted(set(args.ns)) != args.ns):
        p.error(f"--ns must be increasing whole numbers >= 1, got {args.ns}")
    args.ns = args.ns or [n for n in range(10, args.num_samples + 1, 10)] or [args.num_samples]
    if max(args.ns) > args.num_samples:
        p.error(f"--ns goes up to {max(args.ns)} but --num-samples is {args.num_samples}")
    if args.given_size and not args.checkpoint:
        p.error("--given-size needs --checkpoint (it constrains the model's sampler)")
    if args.checkpoint and not (args.data or args.annotations):
        p.error("--checkpoint needs --data (shard folder)")
    if (args.predictions or args.baseline) and not (args.annotations or args.data):
        p.error("--predictions/--baseline need --annotations (shard folder or OPA/FOPA label file)")
    from datamodules.shards import is_url

    if args.baseline == "blind" and not (is_url(args.annotations or args.data)
                                         or Path(args.annotations or args.data).is_dir()):
        p.error("--baseline blind draws training boxes from --train-split of a shard folder: give --data/--annotations "
                "as a shard folder")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.plot:
        plot_results(args.plot, Path(args.out), args.labels)
        return None
    out_dir = Path(args.out)
    t0 = time.perf_counter()
    ann_path = args.annotations or args.data
    samples, skipped, dropped = check_annotations(load_annotations(ann_path, args.split), Path(ann_path).is_dir())
    if not samples:
        raise EvaluationError(f"no sample of {ann_path} (split {args.split}) has valid labelled boxes: nothing to score")
    settings: dict = {"iou_threshold": args.iou_threshold, "annotations": str(ann_path), "split": args.split,
                      "skipped_samples": dict(skipped), "dropped_boxes": dict(dropped)}
    settings["protocol"] = "given-size" if args.given_size else "free-size"
    if args.given_size:
        settings["source_samples"] = len(samples)
        samples = size_groups(samples)
    if args.checkpoint:
        preds = sample_checkpoint(args, samples if args.given_size else None)
        label = args.name or Path(args.checkpoint).stem
        settings.update(mode="checkpoint", checkpoint=str(args.checkpoint), sampling={
            "num_samples": args.num_samples, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "seed": args.seed, "batch_size": args.batch_size})
    elif args.predictions:
        preds = read_predictions(args.predictions, max(args.ns))
        label = args.name or Path(args.predictions).stem
        settings.update(mode="predictions", predictions=str(args.predictions))
    else:
        train = load_annotations(ann_path, args.train_split) if args.baseline == "blind" else None
        preds = baseline_predictions(samples, args.baseline, args.num_samples, args.seed, train)
        label = args.name or args.baseline
        settings.update(mode="baseline", baseline=args.baseline,
                        sampling={"num_samples": args.num_samples, "seed": args.seed})
        if train is not None:
            settings["train_split"] = args.train_split
    preds = annotation_keys(preds, samples)
    keys = match_keys(preds, samples, args.allow_missing)
    if args.predictions is not None:
        settings["prediction_check"] = check_predictions(preds, samples)
        args.ns = reported_ns(preds, samples, args.ns)
    if args.predictions is None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_predictions(out_dir / "predictions.jsonl", {s["key"]: preds[s["key"]] for s in samples})
    result = score(preds, samples, args.ns, args.iou_threshold, progress=not args.no_progress)
    oracle = annotation_kind(ann_path, args.split).plausible
    rates = None if oracle is None else plausible_rates(samples, preds, oracle)
    rate = None if rates is None else rates["all"]
    if rates is not None:
        settings["plausible_rate"] = rate
        settings["plausible_rate_per_class"] = {k: v for k, v in rates.items() if k != "all"}
    lengths = [len(preds[s["key"]]) for s in samples if s["key"] in preds]
    settings.update(keys=keys, boxes_per_sample={"min": min(lengths, default=0), "max": max(lengths, default=0)},
                    seconds=round(time.perf_counter() - t0, 3))
    doc = write_results(out_dir, result, args.ns, label, settings)
    n = max(args.ns)
    print(f"{label}: {result['num_samples']} samples, {result['num_positives']} positives, "
          f"{result['num_negatives']} negatives; @{n}: TPR {result[f'tpr@{n}']:.4f} FPR {result[f'fpr@{n}']:.4f} "
          f"(shared: {result[f'tpr_shared@{n}']:.4f} / {result[f'fpr_shared@{n}']:.4f}) "
          f"precision {result[f'precision@{n}']:.4f}" + (f" plausible {rate:.4f}" if rate is not None else ""))
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'tpr_fpr.png'}")
    return doc


if __name__ == "__main__":
    try:
        main()
    except EvaluationError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(2)
