"""The placement metrics of a split's predicted boxes (docs/design/evaluation.md#placement-metrics):
each sample's first ``boxes_per_sample`` boxes pasted as copy-paste composites, then Acc (the
classifier), FID against the split's positive composites, LPIPS diversity per sample; with an oracle
(toy scenes) also the oracle's plausible rate of the same boxes and how often the classifier agrees.
`classifier_agreement` measures the classifier itself against the labels of held-out composites.
Used by evaluate.py (``--classifier``, ``--inception-weights``, ``--lpips-weights``), the toy recipe
and `callbacks.placement.PlacementMetricsCallback`."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch.utils.data import DataLoader

from datamodules.composites import CompositeDataset, composite_input, foreground_of, index_samples
from datamodules.kinds import data_kind
from datamodules.shard_reader import read_split_info
from genloc.composite import composite
from metrics.placement import LPIPSDiversity, PlausibilityAccuracy, fid_metric

__all__ = ["BOXES_PER_SAMPLE", "PlacementScorer", "placement_scores", "placement_networks", "add_placement_scores", "classifier_agreement", "sample_composites"]

BOXES_PER_SAMPLE = 10  # GracoNet / TopNet: 10 composites per background-foreground pair


def sample_composites(sample, kind, boxes: np.ndarray):
    """(background uint8, composites uint8 ``[K, H, W, 3]``, masks bool ``[K, H, W]``) of pixel ``boxes``."""
    fg, mask = foreground_of(sample, kind)
    bg = sample.background()
    made = [composite(bg, fg, mask, b) for b in boxes]
    return bg, np.stack([m.image for m in made]), np.stack([m.mask for m in made])


def _images(array: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(255).to(device)


class PlacementScorer:
    """The metric states of one evaluation: `add` one sample's boxes, `compute` (collective under DDP:
    every rank calls it). A network left None leaves its metric out."""

    def __init__(self, kind, classifier=None, fid_features=None, lpips_distance=None, device="cpu"):
        self.kind, self.classifier, self.device = kind, classifier, device
        self.acc = PlausibilityAccuracy(classifier.hparams.threshold).to(device) if classifier is not None else None
        self.fid = fid_metric(fid_features).to(device) if fid_features is not None else None
        self.lpips = LPIPSDiversity(lpips_distance).to(device) if lpips_distance is not None else None
        self.per_class: dict[str, list] = defaultdict(lambda: [0, 0, 0, 0])  # judged, oracle plausible, agree, n

    @torch.no_grad()
    def add(self, sample, boxes: np.ndarray) -> None:
        """Score the pixel ``boxes`` ``[K, 4]`` of one shard sample (`datamodules.composites.ShardSample`)."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        if not len(boxes):
            return
        kind, device = self.kind, self.device
        _, images, masks = sample_composites(sample, kind, boxes)
        counts = self.per_class[sample.ann["category"]]
        counts[3] += len(boxes)
        verdict = None
        if self.acc is not None:
            size = self.classifier.hparams.image_size
            inputs = torch.stack([composite_input(i, m, size) for i, m in zip(images, masks)]).to(device)
            probabilities = self.classifier.probabilities(inputs)
            self.acc.update(probabilities)
            verdict = (probabilities >= self.acc.threshold).cpu().numpy()
            counts[0] += int(verdict.sum())
        if kind.plausible is not None:
            w, h = sample.ann["width"], sample.ann["height"]
            oracle = kind.plausible(sample.ann.get("meta") or {}, sample.ann["category"], boxes / [w, h, w, h])
            counts[1] += int(oracle.sum())
            if verdict is not None:
                counts[2] += int((oracle == verdict).sum())
        if self.fid is not None:
            self.fid.update(_images(images, device), real=False)
            if len(sample.ann["positives"]):
                real = sample_composites(sample, kind, np.asarray(sample.ann["positives"]))[1]
                self.fid.update(_images(real, device), real=True)
        if self.lpips is not None:
            self.lpips.update(_images(images, device))

    def compute(self) -> dict:
        totals = _summed(self.per_class)
        n = sum(c[3] for c in totals.values())
        out: dict = {"composites": n}
        if self.acc is not None:
            out["acc"] = float(self.acc.compute())
            out["acc_per_class"] = {c: v[0] / v[3] for c, v in totals.items() if v[3]}
        if self.kind.plausible is not None:
            out["oracle_plausible_rate"] = sum(c[1] for c in totals.values()) / max(n, 1)
            out["oracle_plausible_rate_per_class"] = {c: v[1] / v[3] for c, v in totals.items() if v[3]}
            if self.acc is not None:
                out["classifier_oracle_agreement"] = sum(c[2] for c in totals.values()) / max(n, 1)
        if self.fid is not None:
            out["fid"] = float(self.fid.compute())
        if self.lpips is not None:
            out["lpips"] = float(self.lpips.compute())
        return out


def placement_scores(data_dir, split: str, preds: dict[str, np.ndarray], classifier=None, fid_features=None,
                     lpips_distance=None, boxes_per_sample: int = BOXES_PER_SAMPLE, rank: int = 0, world_size: int = 1,
                     device="cpu") -> dict:
    """Acc / FID / LPIPS of ``preds`` (key -> pixel boxes) on ``split`` of the local shard folder ``data_dir``;
    a metric whose network is None is left out. Rank ``r`` of ``world_size`` takes samples ``r, r + w, ...``
    and the states are summed over ranks (call on every rank)."""
    kind = data_kind(read_split_info(data_dir, split).get("source"))
    scorer = PlacementScorer(kind, classifier, fid_features, lpips_distance, device)
    for s in [s for s in index_samples(data_dir, split) if s.key in preds][rank::world_size]:
        scorer.add(s, np.asarray(preds[s.key], np.float64).reshape(-1, 4)[:boxes_per_sample])
    return {"boxes_per_sample": boxes_per_sample, **scorer.compute()}


def _summed(per_class: dict) -> dict[str, list]:
    """Per-class counts summed over the ranks of a running process group (classes gathered by name)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return dict(sorted(per_class.items()))
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, dict(per_class))
    out: dict[str, list] = defaultdict(lambda: [0, 0, 0, 0])
    for part in gathered:
        for c, v in part.items():
            out[c] = [a + b for a, b in zip(out[c], v)]
    return dict(sorted(out.items()))


@torch.no_grad()
def classifier_agreement(classifier, data_dir, split: str, random_boxes: int = 1, seed: int = 0,
                         batch_size: int = 256, device="cpu") -> dict:
    """The classifier against the labels of ``split``'s composites (the oracle's, toy scenes): accuracy,
    and per class the accuracy, the share of implausible composites it passes ("fooled") and of
    plausible ones it rejects ("missed")."""
    data = CompositeDataset(data_dir, split, classifier.hparams.image_size, random_boxes, seed)
    threshold = classifier.hparams.threshold
    rows: dict[str, list] = defaultdict(lambda: [0, 0, 0, 0, 0])  # correct, n, fooled, negatives, missed
    for batch in DataLoader(data, batch_size=batch_size):
        verdict = (classifier.probabilities(batch["input"].to(device)) >= threshold).cpu()
        label = batch["label"] > 0.5
        for c, v, y in zip(batch["category"], verdict.tolist(), label.tolist()):
            r = rows[c]
            r[0] += v == y
            r[1] += 1
            r[2] += v and not y
            r[3] += not y
            r[4] += y and not v
    n = sum(r[1] for r in rows.values())
    per_class = {c: {"accuracy": r[0] / r[1], "fooled": r[2] / max(r[3], 1), "missed": r[4] / max(r[1] - r[3], 1),
                     "composites": r[1]} for c, r in sorted(rows.items())}
    return {"split": split, "composites": n, "accuracy": sum(r[0] for r in rows.values()) / max(n, 1),
            "plausible_share": 1 - sum(r[3] for r in rows.values()) / max(n, 1), "per_class": per_class}


def placement_networks(classifier=None, inception_weights=None, lpips_weights=None, device="cpu") -> dict:
    """The networks `placement_scores` takes: ``classifier`` as loaded (`lightning_modules.plausibility.
    load_classifier`, by the caller: metrics import no training code), the others from local files; built
    before any sampling so a missing file stops at once (`metrics.placement.MetricWeightsError`)."""
    from metrics.placement import InceptionFeatures, lpips_network

    return {"classifier": classifier,
            "fid_features": None if inception_weights is None else InceptionFeatures(inception_weights).to(device),
            "lpips_distance": None if lpips_weights is None else lpips_network(lpips_weights).to(device)}


def add_placement_scores(doc: dict, out_dir, data_dir, split: str, predictions, networks: dict,
                         boxes_per_sample: int = BOXES_PER_SAMPLE, device="cpu") -> dict:
    """``doc`` (an evaluation's metrics.json) with a ``placement`` block scored from the ``predictions``
    file, rewritten atomically in ``out_dir``; prints one line."""
    from pathlib import Path

    from genloc.files import write_json
    from metrics.predictions import read_predictions

    preds = read_predictions(predictions, boxes_per_sample)
    scores = placement_scores(data_dir, split, preds, boxes_per_sample=boxes_per_sample, device=device, **networks)
    doc = {**doc, "placement": scores}
    write_json(Path(out_dir) / "metrics.json", doc)
    shown = [f"{k} {scores[k]:.4f}" for k in ("acc", "oracle_plausible_rate", "fid", "lpips") if k in scores]
    print(f"{doc.get('method', 'method')}: placement metrics over {scores['composites']} composites "
          f"({boxes_per_sample} per sample): " + ", ".join(shown))
    return doc
