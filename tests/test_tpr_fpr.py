"""TPR-FPR metric on hand-built cases with known answers, plus a brute-force cross-check."""
import math

import pytest
import torch

from metrics.tpr_fpr import TPRFPR, result_curves
from genloc.boxes import iou_at_least, pairwise_iou
from tests.helpers.batches import tiny_module

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
    """Loop reference of the definitions in docs/design/evaluation.md#tpr-fpr."""
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


# ----------------------------------------------------------------------------- callback
def _loader(batches):
    from torch.utils.data import DataLoader

    return DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


def _toy_loader(data_root, batch_size=3):
    """The toy-opa val loader of the shard pipeline: its dataset carries the toy data kind (from the
    split's "source"), whose oracle gives the callback its plausible rate."""
    from datamodules.pipeline import EpochLoader, ShardStream

    stream = ShardStream(data_root / "toy-opa", "val", image_size=64, batch_size=batch_size, train=False)
    return EpochLoader(stream)


def _trainer(tmp_path, callback, **kw):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    return L.Trainer(accelerator="cpu", devices=1, logger=TensorBoardLogger(tmp_path, name="tb"),
                     callbacks=[callback], enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, **kw)


def test_callback_logs_seeded_metrics_equal_to_direct_scoring(tmp_path, tiny_toy_data):
    from callbacks.tpr_fpr import TprFprCallback
    from datamodules.toy import is_plausible

    loader = _toy_loader(tiny_toy_data)
    batches = list(loader)
    module = tiny_module()
    cb = TprFprCallback(num_samples=20, seed=3)
    first = _trainer(tmp_path, cb).validate(module, dataloaders=loader, verbose=False)[0]
    again = _trainer(tmp_path, cb).validate(module, dataloaders=loader, verbose=False)[0]
    assert first == again                                             # seeded: same weights -> same numbers
    assert {"val/tpr@10", "val/fpr@20", "val/tpr_shared@20", "val/precision@10", "val/plausible_rate"} <= set(first)

    # The same sampler calls scored directly give the logged numbers.
    g = torch.Generator().manual_seed(3)
    metric, ok, total = TPRFPR(ns=(10, 20)), 0, 0
    for b in batches:
        boxes = module.model.sample(b["image"], b["category"], n=20, generator=g).boxes_norm
        metric.update(boxes, b["positives"], b["negatives"])
        for m, c, bx in zip(b["meta"], b["category"], boxes):
            v = is_plausible(m["scene"], c, bx.double().numpy())
            ok, total = ok + int(v.sum()), total + len(v)
    ref = metric.compute()
    for k in ("tpr@10", "fpr@20", "tpr_shared@20", "fpr_shared@10", "precision@20"):
        assert first[f"val/{k}"] == pytest.approx(float(ref[k]), abs=1e-6)
    assert first["val/plausible_rate"] == pytest.approx(ok / total)
    assert first["val/tpr_fpr_num_samples"] == 8

    # Data without an oracle (a plain loader of the same batches): the same TPR-FPR, no plausible rate.
    plain = _trainer(tmp_path, cb).validate(module, dataloaders=_loader(batches), verbose=False)[0]
    assert "val/plausible_rate" not in plain and plain["val/tpr@20"] == first["val/tpr@20"]


def test_callback_scores_at_fit_end_and_respects_sample_cap(tmp_path, tiny_toy_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from callbacks.tpr_fpr import TprFprCallback

    val_loader = _toy_loader(tiny_toy_data)
    batches = list(val_loader)
    cb = TprFprCallback(every_n_val_epochs=2, num_samples=10, max_eval_samples=4, seed=0)
    trainer = _trainer(tmp_path, cb, max_steps=2, val_check_interval=1, check_val_every_n_epoch=None,
                       limit_val_batches=2, num_sanity_val_steps=1, log_every_n_steps=1)
    trainer.fit(tiny_module(), train_dataloaders=_loader(batches[:1]), val_dataloaders=val_loader)
    # validation ran twice (steps 1, 2; the sanity check does not count): the 2nd run is scored, so
    # fit end adds nothing
    events = EventAccumulator(str(tmp_path / "tb" / "version_0")).Reload()
    assert len(events.Scalars("val/tpr@10")) == 1 and cb.schedule.runs == 2
    assert [e.value for e in events.Scalars("val/tpr_fpr_num_samples")] == [4]   # capped at 4 of 6 read
    assert "val/tpr_fpr" in events.Tags()["images"]

    # every 3rd run: never reached in 2 runs -> fit end scores the final weights
    cb3 = TprFprCallback(every_n_val_epochs=3, num_samples=10, seed=0)
    trainer = _trainer(tmp_path / "b", cb3, max_steps=2, val_check_interval=1, check_val_every_n_epoch=None,
                       num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(tiny_module(), train_dataloaders=_loader(batches[:1]), val_dataloaders=val_loader)
    events = EventAccumulator(str(tmp_path / "b" / "tb" / "version_0")).Reload()
    assert cb3.schedule.runs == 2
    assert [(e.step, e.value) for e in events.Scalars("val/tpr_fpr_num_samples")] == [(2, 8)]
    assert len(events.Scalars("val/plausible_rate")) == 1
