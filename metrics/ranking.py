"""Ranking metrics of box scores against labelled boxes (docs/design/evaluation.md#ranking): how well
a score (the model's log-probability, or any other) puts positive boxes above negative ones. No
sampling and no IoU threshold are involved.

A *group* is one labelled sample (a background with one foreground): its positive and negative
boxes, scored. Reported, pooled over all groups and per class:

- ``pair_acc``: over every (positive, negative) pair of the same group, the fraction where the
  positive scores higher; a tie counts 1/2. Pairs are pooled (a group with more pairs weighs more).
- ``rank_auc``: ROC-AUC of the scores over all labelled boxes (positives against negatives of any
  group), the Mann-Whitney statistic with ties counted 1/2 (what ``sklearn``'s ``roc_auc_score``
  computes).

A metric with no pair to count is None (not 0.5, not NaN). NaN scores are an error; -inf (a box of
probability 0) is a valid score, tied with other -inf.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torchmetrics import Metric

__all__ = ["pair_wins", "ranking_metrics", "RankingMetric"]


def _scores(values, what: str) -> np.ndarray:
    a = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64).ravel()
    if np.isnan(a).any():
        raise ValueError(f"{what} scores hold NaN at index {int(np.flatnonzero(np.isnan(a))[0])}")
    return a


def pair_wins(pos, neg) -> float:
    """Over all ``len(pos) * len(neg)`` pairs: the number where the positive scores higher, plus half
    the number of ties (sort-based, O((P + N) log N))."""
    pos, neg = _scores(pos, "positive"), np.sort(_scores(neg, "negative"))
    below = np.searchsorted(neg, pos, side="left")
    not_above = np.searchsorted(neg, pos, side="right")
    return float(below.sum() + 0.5 * (not_above - below).sum())


def _ratio(wins: float, pairs: int) -> float | None:
    return wins / pairs if pairs else None


def ranking_metrics(groups: Iterable[tuple[str, Sequence, Sequence]]) -> dict:
    """``groups``: ``(category, positive scores, negative scores)`` per labelled sample. Returns
    ``pair_acc``, ``rank_auc`` and the counts behind them (``num_groups``: groups with both kinds,
    ``num_pairs``, ``num_positives``, ``num_negatives``), pooled and under ``per_class`` (sorted)."""
    by_class: dict[str, dict] = {}
    for category, pos, neg in groups:
        pos, neg = _scores(pos, "positive"), _scores(neg, "negative")
        c = by_class.setdefault(category, {"pos": [], "neg": [], "wins": 0.0, "pairs": 0, "groups": 0})
        c["pos"].append(pos)
        c["neg"].append(neg)
        if len(pos) and len(neg):
            c["wins"] += pair_wins(pos, neg)
            c["pairs"] += len(pos) * len(neg)
            c["groups"] += 1

    def summary(parts: list[dict]) -> dict:
        pos = np.concatenate([p for c in parts for p in c["pos"]] or [np.zeros(0)])
        neg = np.concatenate([q for c in parts for q in c["neg"]] or [np.zeros(0)])
        wins, pairs = sum(c["wins"] for c in parts), sum(c["pairs"] for c in parts)
        return {"pair_acc": _ratio(wins, pairs), "rank_auc": _ratio(pair_wins(pos, neg), len(pos) * len(neg)),
                "num_groups": sum(c["groups"] for c in parts), "num_pairs": pairs,
                "num_positives": len(pos), "num_negatives": len(neg)}

    result = summary(list(by_class.values()))
    result["per_class"] = {name: summary([by_class[name]]) for name in sorted(by_class)}
    return result


class RankingMetric(Metric):
    """Pooled ``pair_acc`` and ``rank_auc`` (see the module docstring) over batches and DDP ranks:
    pair counts are sums, the scores for the AUC are gathered from every rank at ``compute()``."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("wins", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pairs", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("pos", [], dist_reduce_fx="cat")
        self.add_state("neg", [], dist_reduce_fx="cat")

    def update(self, positives: Sequence[torch.Tensor], negatives: Sequence[torch.Tensor]) -> None:
        """Scores of one batch's groups: ``positives[i]`` / ``negatives[i]`` ``[k_i]`` of sample ``i``."""
        if len(positives) != len(negatives):
            raise ValueError(f"{len(positives)} positive and {len(negatives)} negative score lists")
        for pos, neg in zip(positives, negatives):
            self.wins += pair_wins(pos, neg)
            self.pairs += len(pos) * len(neg)
            self.pos.append(torch.as_tensor(pos, dtype=torch.float64, device=self.wins.device).reshape(-1))
            self.neg.append(torch.as_tensor(neg, dtype=torch.float64, device=self.wins.device).reshape(-1))

    def compute(self) -> dict[str, float | None]:
        def cat(state) -> torch.Tensor:
            if isinstance(state, torch.Tensor):  # gathered across ranks
                return state
            return torch.cat(state) if state else torch.zeros(0, dtype=torch.float64)

        pos, neg = cat(self.pos), cat(self.neg)
        return {"pair_acc": _ratio(float(self.wins), int(self.pairs)),
                "rank_auc": _ratio(pair_wins(pos, neg), len(pos) * len(neg))}
