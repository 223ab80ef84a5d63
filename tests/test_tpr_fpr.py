"""TPR-FPR metric on hand-built cases with known answers, plus a brute-force cross-check."""
import math

import pytest
import torch

from metrics.box_ops import iou_at_least, pairwise_iou
from metrics.tpr_fpr import TPRFPR, result_curves

# Two samples, boxes in pixels; positives and negatives of a sample overlap with IoU < 0.5.
POS = [torch.tensor([[0., 0., 10., 10.], [20., 20., 40., 30.]]), torch.tensor([[5., 5., 15., 25.]])]
NEG = [torch.tensor([[50., 50., 60., 60.]]), torch.tensor([[30., 0., 40., 10.], [0., 30., 10., 40.]])]


def _compute(preds, pos=POS, neg=NEG, **kw):
    m = TPRFPR(**kw)
    m.update(preds, pos, neg)
    return {k: float(v) for k, v in m.compute().items()}


def _repeat_to(boxes, n=100):
    return boxes.repeat(math.ceil(n / len(boxes)), 1)[:n]


def test_predictions_equal_to_positives_give_tpr_one_fpr_zero():
    preds = torch.stack([_repeat_to(p) for p in POS])            # [2,100,4]
    r = _compute(preds)
    for n in range(10, 101, 10):
        assert r[f"tpr@{n}"] == 1.0 and r[f"fpr@{n}"] == 0.0
        assert r[f"precision@{n}"] == 1.0
        # shared denominator: 3 hit positives over 3 + 3 labelled boxes
        assert r[f"tpr_shared@{n}"] == 0.5 and r[f"fpr_shared@{n}"] == 0.0
    assert (r["num_positives"], r["num_negatives"], r["num_samples"]) == (3, 3, 2)


def test_predictions_equal_to_negatives_give_fpr_one():
    preds = torch.stack([_repeat_to(q) for q in NEG])
    r = _compute(preds)
    assert r["fpr@10"] == 1.0 and r["tpr@10"] == 0.0 and r["precision@10"] == 0.0
    assert r["matched_predictions@10"] == 20 and r["matched_positive_predictions@10"] == 0


def test_first_n_predictions_only():
    # Sample 0 hits its 1st positive with prediction 0 and its 2nd only with prediction 2.
    far = [90., 90., 95., 95.]
    preds = [torch.tensor([POS[0][0].tolist(), far, POS[0][1].tolist()]), torch.tensor([far])]
    r = _compute(preds, ns=(1, 2, 3))
    assert [r[f"hit_positives@{n}"] for n in (1, 2, 3)] == [1, 1, 2]
    assert r["tpr@1"] == pytest.approx(1 / 3) and r["tpr@3"] == pytest.approx(2 / 3)
    # ragged predictions: sample 1 has 1 box, so point n counts min(n, 1) of them
    assert [r[f"num_predictions@{n}"] for n in (1, 2, 3)] == [2, 3, 4]


@pytest.mark.parametrize("gt,pred", [
    ([0., 0., 2., 1.], [0., 0., 1., 1.]),                   # pixels: inter 1, union 2
    ([0.25, 0.25, 0.75, 0.5], [0.25, 0.25, 0.5, 0.5]),      # normalised: inter 1/16, union 1/8
])
def test_iou_exactly_at_threshold_counts(gt, pred):
    assert float(pairwise_iou(torch.tensor([pred]), torch.tensor([gt]))) == 0.5
    r = _compute(torch.tensor([[pred]]), [torch.tensor([gt])], [torch.zeros(0, 4)], ns=(1,))
    assert r["tpr@1"] == 1.0 and r["precision@1"] == 1.0
    # a hair below the threshold is not a hit, and a stricter tau rejects it
    below = list(pred)
    below[2] -= 1e-6
    assert _compute(torch.tensor([[below]]), [torch.tensor([gt])], [torch.zeros(0, 4)], ns=(1,))["tpr@1"] == 0.0
    assert _compute(torch.tensor([[pred]]), [torch.tensor([gt])], [torch.zeros(0, 4)], ns=(1,),
                    iou_threshold=0.6)["tpr@1"] == 0.0


def test_empty_predictions_give_zeros_not_nan():
    r = _compute(torch.zeros(2, 0, 4))
    assert all(v == 0.0 for k, v in r.items() if "@" in k), r
    assert r["num_positives"] == 3
    # a metric that never saw a sample also reports zeros
    with pytest.warns(UserWarning, match="before the ``update``"):
        r0 = {k: float(v) for k, v in TPRFPR().compute().items()}
    assert all(v == 0.0 and not math.isnan(v) for v in r0.values())


def test_sample_without_positives_counts_for_fpr():
    pos = [torch.zeros(0, 4), torch.tensor([[0., 0., 10., 10.]])]
    neg = [torch.tensor([[0., 0., 10., 10.], [20., 0., 30., 10.]]), torch.zeros(0, 4)]
    preds = torch.tensor([[[0., 0., 10., 10.]], [[50., 50., 60., 60.]]])
    r = _compute(preds, pos, neg, ns=(1,))
    assert r["fpr@1"] == 0.5          # 1 of the 2 negatives, both from the positive-free sample
    assert r["tpr@1"] == 0.0 and r["num_negatives"] == 2 and r["num_positives"] == 1
    assert r["fpr_shared@1"] == pytest.approx(1 / 3)


def test_matched_prediction_precision_hand_case():
    pos = [torch.tensor([[0., 0., 10., 10.]])]
    neg = [torch.tensor([[4., 0., 14., 10.]])]       # IoU with the positive = 60/140 < 0.5
    preds = torch.tensor([[
        [0., 0., 10., 10.],     # matches the positive (IoU 1)
        [50., 50., 60., 60.],   # matches nothing: not counted
        [4., 0., 14., 10.],     # matches the negative
        [3., 0., 13., 10.],     # IoU 70/130 = 0.54 with the positive, 90/110 = 0.82 with the negative
    ]])
    r = _compute(preds, pos, neg, ns=(1, 2, 3, 4))
    assert [r[f"precision@{n}"] for n in (1, 2, 3, 4)] == pytest.approx([1.0, 1.0, 1 / 2, 1 / 3])
    assert [r[f"matched_predictions@{n}"] for n in (1, 2, 3, 4)] == [1, 1, 2, 3]
    assert r["tpr@4"] == 1.0 and r["fpr@2"] == 0.0 and r["fpr@3"] == 1.0


def _brute_force(preds, pos, neg, ns, tau):
    """Loop reference of the SPEC §4 definitions."""
    hp, hn, m, mp = [0] * len(ns), [0] * len(ns), [0] * len(ns), [0] * len(ns)
    for p, P, Q in zip(preds, pos, neg):
        for i, n in enumerate(ns):
            sub = p[:n]
            for g in P:
                hp[i] += any(bool(iou_at_least(b[None], g[None], tau)) for b in sub)
            for g in Q:
                hn[i] += any(bool(iou_at_least(b[None], g[None], tau)) for b in sub)
            for b in sub:
                ip = [float(pairwise_iou(b[None], g[None])) for g in P]
                iq = [float(pairwise_iou(b[None], g[None])) for g in Q]
                best = max(ip + iq, default=0.0)
                if best >= tau:
                    m[i] += 1
                    mp[i] += max(ip, default=-1) >= max(iq, default=-1)
    return hp, hn, m, mp


def test_vectorised_matches_brute_force_on_random_ragged_batches():
    g = torch.Generator().manual_seed(0)

    def boxes(k):
        xy = torch.randint(0, 4, (k, 2), generator=g).float()
        wh = torch.randint(1, 3, (k, 2), generator=g).float()
        return torch.cat([xy, xy + wh], 1)

    preds = [boxes(int(torch.randint(0, 30, (1,), generator=g))) for _ in range(7)]
    pos = [boxes(int(torch.randint(0, 4, (1,), generator=g))) for _ in range(7)]
    neg = [boxes(int(torch.randint(0, 5, (1,), generator=g))) for _ in range(7)]
    ns, tau = (1, 5, 15, 30), 0.5
    m = TPRFPR(ns=ns, iou_threshold=tau)
    m.update(preds[:3], pos[:3], neg[:3])
    m.update(preds[3:], pos[3:], neg[3:])
    r = m.compute()
    hp, hn, mt, mp = _brute_force(preds, pos, neg, ns, tau)
    assert [int(r[f"hit_positives@{n}"]) for n in ns] == hp
    assert [int(r[f"hit_negatives@{n}"]) for n in ns] == hn
    assert [int(r[f"matched_predictions@{n}"]) for n in ns] == mt
    assert [int(r[f"matched_positive_predictions@{n}"]) for n in ns] == mp
    assert sum(hp) > 0 and sum(hn) > 0 and sum(mt) > sum(mp) > 0   # the case is not trivial
    curves = result_curves(r, ns)
    assert curves["n"] == list(ns) and len(curves["fpr_shared"]) == len(ns)


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError):
        TPRFPR(ns=(20, 10))
    with pytest.raises(ValueError):
        TPRFPR(iou_threshold=0.0)
    with pytest.raises(ValueError, match="batch sizes differ"):
        TPRFPR().update(torch.zeros(2, 3, 4), POS, NEG[:1])


def test_plot_curves_writes_png(tmp_path):
    from metrics.plots import figure_to_array, plot_curves

    curve = {"n": [10, 20], "tpr": [0.1, 0.2], "fpr": [0.05, 0.1], "tpr_shared": [0.03, 0.06],
             "fpr_shared": [0.04, 0.08], "precision": [0.5, 0.5]}
    fig = plot_curves({"a": curve, "b": curve}, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
    image = figure_to_array(fig)
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8"
