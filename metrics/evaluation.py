"""The TPR-FPR evaluation as a library: `evaluate` scores a checkpoint, a predictions file or a
baseline against annotations and writes ``predictions.jsonl``, ``metrics.json`` and ``tpr_fpr.png``
(evaluate.py is its command line; the protocol is documented there)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from metrics.annotations import EvaluationError, annotation_kind, check_annotations, image_size_of, load_annotations, \
    size_groups
from metrics.predictions import annotation_keys, baseline_predictions, blind_scores, check_predictions, match_keys, \
    read_predictions, reported_ns, write_predictions
from metrics.ranking import ranking_metrics
from metrics.sampling import Sampling, evaluation_model, sample_boxes
from metrics.tpr_fpr import DEFAULT_NS, TPRFPR, result_curves
from genloc.boxes import normalise
from genloc.files import prepare_output_dir, write_json


def default_ns(num_samples: int) -> list[int]:
    """Curve points 10, 20, ..., N (just N when N < 10)."""
    return [n for n in range(10, num_samples + 1, 10)] or [num_samples]


def evaluate(annotations, out, *, split: str = "test", checkpoint=None, data=None, predictions=None, baseline: str | None = None,
             name: str | None = None, ns: list[int] | None = None, iou_threshold: float = 0.5,
             sampling: Sampling | None = None, train_split: str = "train", given_size: bool = False,
             allow_missing: bool = False, allow_incomplete: bool = False, progress: bool = True, rerank=None,
             keep: int | None = None) -> dict:
    """Score one method (exactly one of ``checkpoint``, ``predictions``, ``baseline``) on the
    annotations of ``split``; writes into ``out`` and returns the metrics.json document. A checkpoint
    or baseline draws ``sampling.num_samples`` boxes per sample (a checkpoint from the images of the
    shard folder ``data``, default: the annotations); ``ns`` defaults to `default_ns`. A shard with
    fewer samples than its split file records stops the evaluation unless ``allow_incomplete``: then
    the shortfall is scored around, printed and recorded (``incomplete_shards``).

    The ``ranking`` block (`metrics.ranking`) scores the labelled boxes with the checkpoint, the
    ``rerank`` model or the blind baseline's class box density; None for other methods. With
    ``rerank`` (a location model) each sample's predicted boxes are ordered by that model's score and
    the first ``keep`` kept before TPR-FPR (`metrics.scoring.rerank`; needs a shard folder)."""
    if sum(x is not None for x in (checkpoint, predictions, baseline)) != 1:
        raise EvaluationError("give exactly one of checkpoint, predictions, baseline")
    sampling = sampling or Sampling()
    ns = list(ns or default_ns(sampling.num_samples))
    out_dir = prepare_output_dir(out, "--out")  # before any sample is read, drawn or ranked
    t0 = time.perf_counter()
    shortfalls: list | None = [] if allow_incomplete else None
    samples, skipped, dropped = check_annotations(load_annotations(annotations, split, shortfalls),
                                                  Path(annotations).is_dir())
    if not samples:
        raise EvaluationError(f"no sample of {annotations} (split {split}) has valid labelled boxes: nothing to score")
    settings: dict = {"iou_threshold": iou_threshold, "annotations": str(annotations), "split": split,
                      "skipped_samples": dict(skipped), "dropped_boxes": dict(dropped)}
    settings["protocol"] = "given-size" if given_size else "free-size"
    if shortfalls:
        lost = sum(f["recorded"] - f["found"] for f in shortfalls)
        print(f"warning: scoring without {lost} sample(s) that split '{split}' records: {len(shortfalls)} damaged "
              f"shard(s), e.g. {shortfalls[0]['shard']} ({shortfalls[0]['found']} of {shortfalls[0]['recorded']})",
              file=sys.stderr)
        settings["incomplete_shards"] = shortfalls
    if given_size:
        settings["source_samples"] = len(samples)
        samples = size_groups(samples)
    if (rerank is not None) != (keep is not None) or (rerank is not None and predictions is None):
        raise EvaluationError("rerank needs predictions and keep (and keep needs rerank)")
    ranking, keys = None, None
    if checkpoint is not None:
        from metrics.scoring import split_ranking

        model = evaluation_model(checkpoint, sampling.device)
        preds, batch_size = sample_boxes(model, data or annotations, split, sampling, samples if given_size else None,
                                         progress)
        ranking = split_ranking(model, data or annotations, split, sampling, progress)
        label = name or Path(checkpoint).stem
        settings.update(mode="checkpoint", checkpoint=str(checkpoint), sampling={
            "num_samples": sampling.num_samples, "temperature": sampling.temperature, "top_k": sampling.top_k,
            "top_p": sampling.top_p, "seed": sampling.seed, "batch_size": batch_size, "bf16": sampling.bf16})
    elif predictions is not None:
        preds = read_predictions(predictions, None if rerank is not None else max(ns))
        label = name or Path(predictions).stem
        settings.update(mode="predictions", predictions=str(predictions))
        if rerank is not None:  # keys checked first: predictions of another split fail before re-ranking
            preds = annotation_keys(preds, samples)
            keys = match_keys(preds, samples, allow_missing, split)
            preds, ranking, settings["rerank"] = _reranked(preds, samples, rerank, keep, data or annotations, split,
                                                           sampling, progress)
    else:
        train = load_annotations(annotations, train_split) if baseline == "blind" else None
        preds = baseline_predictions(samples, baseline, sampling.num_samples, sampling.seed, train)
        label = name or baseline
        settings.update(mode="baseline", baseline=baseline,
                        sampling={"num_samples": sampling.num_samples, "seed": sampling.seed})
        if train is not None:
            settings["train_split"] = train_split
            ranking = ranking_metrics(blind_scores(samples, train))
    if keys is None:
        preds = annotation_keys(preds, samples)
        keys = match_keys(preds, samples, allow_missing, split)
    if predictions is not None:
        settings["prediction_check"] = check_predictions(preds, samples)
        ns = reported_ns(preds, samples, ns)
    else:
        write_predictions(out_dir / "predictions.jsonl", {s["key"]: preds[s["key"]] for s in samples})
    result = score(preds, samples, ns, iou_threshold, progress=progress)
    oracle = annotation_kind(annotations, split).plausible
    rates = None if oracle is None else plausible_rates(samples, preds, oracle)
    rate = None if rates is None else rates["all"]
    if rates is not None:
        settings["plausible_rate"] = rate
        settings["plausible_rate_per_class"] = {k: v for k, v in rates.items() if k != "all"}
    lengths = [len(preds[s["key"]]) for s in samples if s["key"] in preds]
    settings.update(keys=keys, boxes_per_sample={"min": min(lengths, default=0), "max": max(lengths, default=0)},
                    ranking=ranking, seconds=round(time.perf_counter() - t0, 3))
    doc = write_results(out_dir, result, ns, label, settings)
    n = max(ns)
    print(f"{label}: {result['num_samples']} samples, {result['num_positives']} positives, "
          f"{result['num_negatives']} negatives; @{n}: TPR {result[f'tpr@{n}']:.4f} FPR {result[f'fpr@{n}']:.4f} "
          f"(shared: {result[f'tpr_shared@{n}']:.4f} / {result[f'fpr_shared@{n}']:.4f}) "
          f"precision {result[f'precision@{n}']:.4f}" + (f" plausible {rate:.4f}" if rate is not None else ""))
    if ranking is not None:
        print(f"{label}: ranking of the labelled boxes: {ranking_line(ranking)}")
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'tpr_fpr.png'}")
    return doc


def ranking_line(ranking: dict) -> str:
    """``pair_acc 0.7123 (1234 pairs in 56 groups), rank_auc 0.6543`` (n/a where undefined)."""
    value = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    return (f"pair_acc {value(ranking['pair_acc'])} ({ranking['num_pairs']} pairs in {ranking['num_groups']} groups), "
            f"rank_auc {value(ranking['rank_auc'])}")


def _reranked(preds: dict, samples: list[dict], model, keep: int, data, split: str, sampling: Sampling,
              progress: bool) -> tuple[dict, dict, dict]:
    """Predictions re-ranked by ``model`` (`metrics.scoring.rerank`), the model's ranking block, and the settings."""
    from datamodules.shard_reader import is_url
    from metrics.scoring import rerank, split_ranking

    if not (is_url(data) or Path(data).is_dir()):
        raise EvaluationError(f"re-ranking scores boxes on their images: give the annotations as a shard folder, "
                              f"not {data}")
    scorer = evaluation_model(model, sampling.device)
    reranked, unscorable = rerank(scorer, data, split, annotation_keys(preds, samples), keep, sampling, progress)
    if unscorable:
        print(f"warning: {unscorable} proposals break the box rule and cannot be scored; they rank last",
              file=sys.stderr)
    settings = {"model": str(model), "keep": keep, "unscorable_proposals": unscorable}
    return reranked, split_ranking(scorer, data, split, sampling, progress), settings


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

    curves = result_curves(result, ns)
    doc = {"method": label, **extra, "ns": list(ns), "curves": curves, "metrics": result,
           "counts": {k: result[k] for k in ("num_samples", "num_positives", "num_negatives")}}
    write_json(out_dir / "metrics.json", doc)
    plt.close(plot_curves({label: curves}, out_dir / "tpr_fpr.png", title=label))
    return doc


def plot_results(files: list[str], out: Path, labels: list[str] | None) -> None:
    """Several metrics.json files as curves on one figure."""
    from metrics.plots import plot_curves

    import matplotlib.pyplot as plt

    if labels and len(labels) != len(files):
        raise EvaluationError(f"--labels has {len(labels)} names for {len(files)} --plot files")
    if out.suffix.lower() != ".png":
        out = out / "tpr_fpr.png"
    prepare_output_dir(out.parent, "--out")
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
    plt.close(plot_curves(curves, out))
    print(f"wrote {out}")

