"""Predicted boxes for the TPR-FPR evaluation: the JSONL predictions file of any method (read,
written, checked against the annotations) and the seeded baselines (uniform, given-size,
image-blind). Predictions map an annotation key to float64 pixel ``x1, y1, x2, y2`` boxes ``[N, 4]``.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np

from metrics.annotations import EvaluationError, box_extent, image_size_of
from metrics.options import BASELINES
from genloc.files import read_jsonl, write_jsonl
from genloc.boxes import PROBLEMS, denormalise, looks_normalised, normalise, validate_boxes, xywh_to_xyxy, \
    xyxy_to_xywh



def read_predictions(path, max_boxes: int | None = None) -> dict[str, np.ndarray]:
    """``{"key", "boxes"}`` per JSONL line -> key -> float64 ``[N, 4]``; errors name the line. Read a
    line at a time, keeping only the first ``max_boxes`` boxes of each (the rest never count)."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"predictions file {path} not found")
    preds: dict[str, np.ndarray] = {}
    try:
        for lineno, rec in read_jsonl(path):
            try:
                key = str(rec["key"])
                boxes = np.asarray(rec["boxes"][:max_boxes], np.float64).reshape(-1, 4)
            except (KeyError, TypeError, ValueError) as e:
                raise EvaluationError(f"{path}:{lineno}: expected {{\"key\": str, \"boxes\": [[x1,y1,x2,y2], ...]}} "
                                      f"({type(e).__name__}: {e})") from None
            if not np.isfinite(boxes).all():
                raise EvaluationError(f"{path}:{lineno}: non-finite box coordinates for key {key!r}")
            if key in preds:
                raise EvaluationError(f"{path}:{lineno}: duplicate key {key!r}")
            preds[key] = boxes
    except ValueError as e:  # a line that is not a JSON object (read_jsonl names path:line)
        raise EvaluationError(f"{e}; expected {{\"key\": str, \"boxes\": [[x1,y1,x2,y2], ...]}} per line") from None
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
        size = (w, h) if known else box_extent(np.concatenate([boxes, np.asarray(s["positives"] + s["negatives"],
                                                                               np.float64).reshape(-1, 4)]))
        check = validate_boxes(boxes, size)
        total += len(boxes)
        problems.update(check.counts())
        bad = ~check.valid
        tiny = check.valid & looks_normalised(boxes, size)
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
    write_jsonl(path, ({"key": key, "boxes": np.asarray(boxes, np.float64).tolist()} for key, boxes in preds.items()))


def annotation_keys(preds: dict, samples: list[dict]) -> dict:
    """Prediction keys written with the raw category name (``opa-1-traffic light``) renamed to the
    tar-safe annotation key (``opa-1-traffic%20light``, `datamodules.shard_format.safe_key`) when only
    that one matches an annotation."""
    from datamodules.shard_format import safe_key

    keys = {s["key"] for s in samples}
    return {k if k in keys or safe_key(k) not in keys else safe_key(k): v for k, v in preds.items()}


def match_keys(preds: dict, samples: list[dict], allow_missing: bool, split: str | None = None) -> dict:
    """Check prediction keys against annotation keys (``split``: the annotations' split, named in the
    error when no key matches); returns the key report for metrics.json."""
    ann_keys = {s["key"] for s in samples}
    missing = sorted(ann_keys - preds.keys())
    extra = sorted(preds.keys() - ann_keys)
    if preds and not preds.keys() & ann_keys:
        where = f"split '{split}'" if split else "the annotations"
        raise EvaluationError(
            f"none of the {len(preds)} prediction keys match the {len(ann_keys)} keys of {where} (predictions "
            f"e.g. {extra[:3]}, {where} e.g. {missing[:3]}): are the predictions for another split or data set?")
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
            pool = _pool_of(pools, s)
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


def _pool_of(pools: dict[str, np.ndarray], sample: dict) -> np.ndarray:
    if sample["category"] not in pools:
        raise EvaluationError(f"sample {sample['key']}: no training positive of class {sample['category']!r} for the "
                              f"blind baseline (training classes: {sorted(pools)})")
    return pools[sample["category"]]


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



def blind_scores(samples: list[dict], train: list[dict]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The image-blind baseline as a scorer: each labelled box scored by the log-density of its class's
    training positives (normalised ``x1, y1, x2, y2``), a Gaussian kernel density with Scott's
    bandwidth per coordinate. Returns the ``(category, positive scores, negative scores)`` groups of
    `metrics.ranking.ranking_metrics`."""
    pools = _positive_pools(train)
    groups = []
    for s in samples:
        pool = _pool_of(pools, s)
        w, h, _ = image_size_of(s)
        scores = [_kde_log_density(pool, normalise(np.asarray(s[kind], np.float64).reshape(-1, 4),
                                                                   (w, h))) for kind in ("positives", "negatives")]
        groups.append((s["category"], *scores))
    return groups


def _kde_log_density(pool: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Log-density at ``boxes`` ``[m, 4]`` of a Gaussian KDE over ``pool`` ``[k, 4]`` (Scott's rule
    ``sigma * k^(-1/8)`` per coordinate; at least 1/256 of the side, so a single box still has width)."""
    k, d = pool.shape
    bandwidth = np.maximum(pool.std(axis=0) * k ** (-1.0 / (d + 4)), 1.0 / 256)
    z = (boxes[:, None, :] - pool[None]) / bandwidth                      # [m, k, 4]
    log_kernel = -0.5 * (z ** 2).sum(-1) - np.log(bandwidth).sum() - 0.5 * d * np.log(2 * np.pi)
    top = log_kernel.max(axis=1, keepdims=True)
    return top[:, 0] + np.log(np.exp(log_kernel - top).sum(axis=1)) - np.log(k)
