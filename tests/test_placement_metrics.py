"""Composites, toy sprites, labelled composite data, the plausibility classifier and the field's
placement metrics (Acc, FID, LPIPS diversity) against hand computations with tiny random networks."""
import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from datamodules.composites import CompositeDataset, composite_input
from datamodules.kinds import data_kind
from datamodules.toy import generate_scene, make_sample, render_scene, sprite
from genloc.composite import composite
from metrics.placement import (LPIPSDiversity, MetricWeightsError, PlausibilityAccuracy, fid_metric, lpips_network,
                               InceptionFeatures)


def test_composite_pastes_the_scaled_foreground_inside_the_box_only():
    bg = np.full((6, 8, 3), 10, np.uint8)
    fg = np.zeros((2, 2, 3), np.uint8)
    fg[..., 0] = [[200, 201], [202, 203]]
    mask = np.array([[1, 0], [1, 1]], bool)
    out = composite(bg, fg, mask, (2, 1, 6, 5))  # box 4x4: each foreground pixel becomes 2x2
    expected_mask = np.zeros((6, 8), bool)
    expected_mask[1:3, 2:4] = True
    expected_mask[3:5, 2:6] = True
    assert np.array_equal(out.mask, expected_mask)
    assert np.all(out.image[~out.mask] == 10)  # every pixel outside the pasted mask is the background's
    assert out.image[1, 2, 0] == 200 and out.image[4, 5, 0] == 203 and out.image[1, 5, 0] == 10
    assert np.all(bg == 10)  # the background array itself is untouched


def test_composite_uses_the_one_rasterisation_rule_for_fractional_boxes():
    bg = np.zeros((4, 4, 3), np.uint8)
    fg = np.full((3, 3, 3), 255, np.uint8)
    out = composite(bg, fg, np.ones((3, 3), bool), (0.5, 0.5, 2.2, 1.9))  # touches x 0..2, y 0..1
    assert out.mask.sum() == 6 and out.mask[:2, :3].all()
    with pytest.raises(ValueError, match="mask"):
        composite(bg, fg, np.ones((2, 3), bool), (0, 0, 2, 2))


def test_toy_sprites_are_seeded_per_scene_and_leave_the_scenes_alone():
    key, img, ann = make_sample(3, 5, "toy-opa")
    seed = ann["meta"]["scene"]["seed"]
    a_img, a_mask = sprite(seed, "car")
    b_img, b_mask = sprite(seed, "car")
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert a_mask.any() and not a_mask.all() and a_img.shape[1] == 2 * a_img.shape[0]
    assert not np.array_equal(sprite(seed + 1, "car")[0], a_img)
    assert sprite(seed, "person")[0].shape[1] < sprite(seed, "person")[0].shape[0]
    # drawing sprites consumes nothing of a scene's streams: the sample and its image are the same
    key2, img2, ann2 = make_sample(3, 5, "toy-opa")
    assert (key2, ann2) == (key, ann) and np.array_equal(img2, img)
    assert np.array_equal(render_scene(generate_scene(seed)), render_scene(generate_scene(seed)))
    fg, mask = data_kind("toy").foreground(ann["meta"], ann["category"])
    assert np.array_equal(fg, sprite(seed, ann["category"])[0])
    with pytest.raises(KeyError, match="no toy sprite"):
        sprite(seed, "dog")


def test_composite_dataset_labels_every_box_by_the_oracle(tiny_toy_data):
    data = CompositeDataset(tiny_toy_data / "toy-opa", "train", image_size=32, random_boxes=2, seed=0)
    oracle = data_kind("toy").plausible
    n_boxes = sum(len(s.ann["positives"]) + len(s.ann["negatives"]) + 2 for s in data.samples)
    assert len(data) == n_boxes
    labels = np.array([y for _, _, y in data.items])
    assert 0 < labels.mean() < 1
    for i, box, label in data.items[:20]:
        s = data.samples[i]
        assert label == float(oracle(s.ann["meta"], s.ann["category"], box[None])[0])
    item = data[0]
    assert item["input"].shape == (4, 32, 32) and 0 < item["input"][3].max() <= 1  # the mask channel
    assert torch.equal(data[0]["input"], item["input"])


def test_composite_input_stacks_rgb_and_mask():
    img = np.zeros((4, 4, 3), np.uint8)
    img[..., 1] = 255
    mask = np.zeros((4, 4), bool)
    mask[:2] = True
    x = composite_input(img, mask, 4)
    assert x.shape == (4, 4, 4)
    assert torch.all(x[1] == 1) and torch.all(x[0] == 0)
    assert torch.all(x[3, :2] == 1) and torch.all(x[3, 2:] == 0)


def test_plausibility_accuracy_is_the_share_judged_plausible():
    metric = PlausibilityAccuracy(threshold=0.6)
    metric.update(torch.tensor([0.9, 0.6, 0.1]))
    metric.update(torch.tensor([0.59, 0.7]))
    assert metric.compute().item() == pytest.approx(3 / 5)  # 0.9, 0.6 (at the threshold) and 0.7


class _TinyFeatures(nn.Module):
    """A random linear map of 4x4 pooled images: 6 features."""

    num_features = 6

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(48, 6)

    def forward(self, x):
        return self.proj(nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1)).double()


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_equals_the_hand_frechet_distance_of_the_features():
    g = torch.Generator().manual_seed(1)
    real = torch.rand(40, 3, 16, 16, generator=g)
    fake = (torch.rand(30, 3, 16, 16, generator=g) * 0.7 + 0.2)
    feats = _TinyFeatures()
    fid = fid_metric(feats)
    fid.update(real[:20], real=True)
    fid.update(real[20:], real=True)
    fid.update(fake, real=False)
    with torch.no_grad():
        expected = _frechet(feats(real).numpy(), feats(fake).numpy())
    assert fid.compute().item() == pytest.approx(expected, rel=1e-3)
    fid.reset()  # the real statistics stay (reset_real_features=False)
    fid.update(fake, real=False)
    assert fid.compute().item() == pytest.approx(expected, rel=1e-3)


class _TinyDistance(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, a, b):
        return (self.conv(a) - self.conv(b)).pow(2).mean(dim=(1, 2, 3))


def test_lpips_diversity_is_the_mean_over_groups_of_the_mean_pair_distance():
    g = torch.Generator().manual_seed(2)
    groups = [torch.rand(k, 3, 8, 8, generator=g) for k in (3, 4, 1)]
    dist = _TinyDistance()
    metric = LPIPSDiversity(dist)
    for group in groups:
        metric.update(group)
    means = []
    with torch.no_grad():
        for group in groups[:2]:  # a group of one composite has no pair
            pairs = [dist(group[i:i + 1], group[j:j + 1]).item() for i in range(len(group))
                     for j in range(i + 1, len(group))]
            means.append(np.mean(pairs))
    assert metric.compute().item() == pytest.approx(np.mean(means), rel=1e-6)


def test_metric_networks_without_local_weights_fail_at_once_naming_the_download(tmp_path):
    for build, flag, url in ((InceptionFeatures, "--inception-weights", "inception_v3_google"),
                             (lpips_network, "--lpips-weights", "alexnet-owt")):
        with pytest.raises(MetricWeightsError) as err:
            build(tmp_path / "missing.pth")
        message = str(err.value)
        assert "\n" not in message and flag in message and url in message and "missing.pth" in message


def test_lpips_network_reads_a_local_alexnet_file(tmp_path):
    from torchvision.models import alexnet

    torch.manual_seed(0)
    path = tmp_path / "alexnet.pth"
    torch.save(alexnet(weights=None).state_dict(), path)
    distance = lpips_network(path)
    a = torch.rand(2, 3, 64, 64)
    d = distance(a, a.flip(-1))
    assert d.shape == (2,) and torch.all(d > 0) and torch.all(distance(a, a) == 0)
    torch.save({"classifier.1.weight": torch.zeros(1)}, path)
    with pytest.raises(MetricWeightsError, match="not torchvision's AlexNet"):
        lpips_network(path)


@pytest.fixture(scope="module")
def tiny_classifier(tiny_toy_data, tmp_path_factory):
    """A 2-step toy_plausibility run (32-pixel composites) whose last.ckpt is the classifier."""
    import train as train_script
    from configs.schema import load_config

    log_root = tmp_path_factory.mktemp("runs")
    cfg = load_config(["experiment=toy_plausibility", f"data.data_dir={tiny_toy_data / 'toy-opa'}",
                       f"log_root={log_root}", "trainer.max_steps=2", "trainer.val_check_interval=2",
                       "trainer.enable_progress_bar=false", "data.batch_size=8", "module.image_size=32",
                       "optim.warmup_steps=1"])
    result = train_script.train(cfg)
    assert {"val/accuracy", "val/roc_auc"} <= set(result["metrics"])
    return result["run_dir"] / "checkpoints" / "last.ckpt"


def test_evaluate_reports_acc_beside_the_oracle_on_the_same_composites(tiny_toy_data, tiny_classifier, tmp_path):
    import json

    import evaluate
    from datamodules.composites import index_samples
    from lightning_modules.plausibility import load_classifier
    from metrics.predictions import read_predictions

    data = tiny_toy_data / "toy-opa"
    doc = evaluate.main(["--baseline", "random", "--data", str(data), "--split", "val", "--num-samples", "10",
                         "--classifier", str(tiny_classifier), "--out", str(tmp_path), "--no-progress",
                         "--composites-per-sample", "10"])
    placement = json.loads((tmp_path / "metrics.json").read_text())["placement"]
    assert placement == doc["placement"] and placement["composites"] == 8 * 10
    # the oracle's rate of the same boxes is evaluate's own plausible rate (all 10 boxes are pasted)
    assert placement["oracle_plausible_rate"] == pytest.approx(doc["plausible_rate"])
    # Acc by hand: paste each box, run the classifier, count probabilities >= its threshold
    classifier = load_classifier(tiny_classifier)
    preds = read_predictions(tmp_path / "predictions.jsonl")
    kind = data_kind("toy")
    judged = []
    for s in index_samples(data, "val"):
        fg, mask = kind.foreground(s.ann["meta"], s.ann["category"])
        for box in preds[s.key]:
            made = composite(s.background(), fg, mask, box)
            x = composite_input(made.image, made.mask, 32)[None]
            judged.append(bool(torch.sigmoid(classifier(x))[0] >= 0.5))
    assert placement["acc"] == pytest.approx(np.mean(judged))


def test_evaluate_without_metric_weights_stops_before_sampling(tiny_toy_data, tmp_path, capsys):
    import subprocess
    import sys

    from tests.helpers import ROOT

    run = subprocess.run([sys.executable, "evaluate.py", "--baseline", "random", "--data", str(tiny_toy_data / "toy-opa"),
                          "--split", "val", "--inception-weights", str(tmp_path / "inception.pth"), "--out",
                          str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "inception.pth" in lines[0] and "inception_v3_google" in lines[0]
    assert not (tmp_path / "out").exists()


def test_classifier_agreement_counts_fooled_and_missed_per_class(tiny_toy_data, tiny_classifier):
    from lightning_modules.plausibility import load_classifier
    from metrics.placement_scores import classifier_agreement

    classifier = load_classifier(tiny_classifier)
    report = classifier_agreement(classifier, tiny_toy_data / "toy-opa", "val", random_boxes=1, seed=5)
    data = CompositeDataset(tiny_toy_data / "toy-opa", "val", 32, 1, 5)
    verdicts = np.array([bool(classifier.probabilities(data[i]["input"][None])[0] >= 0.5) for i in range(len(data))])
    labels = np.array([y > 0.5 for _, _, y in data.items])
    assert report["composites"] == len(data)
    assert report["accuracy"] == pytest.approx(np.mean(verdicts == labels))
    cats = np.array([data.samples[i].ann["category"] for i, _, _ in data.items])
    for c, row in report["per_class"].items():
        neg = (cats == c) & ~labels
        assert row["fooled"] == pytest.approx(verdicts[neg].mean() if neg.any() else 0.0)


def _two_rank_scores(rank, data, split, preds, ckpt, port, out):
    import torch.distributed as dist

    from lightning_modules.plausibility import load_classifier
    from metrics.placement_scores import placement_scores

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        scores = placement_scores(data, split, preds, classifier=load_classifier(ckpt), fid_features=_TinyFeatures(),
                                  lpips_distance=_TinyDistance(), boxes_per_sample=5, rank=rank, world_size=2)
        torch.save(scores, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_values_of_one_process(tiny_toy_data, tiny_classifier, tmp_path):
    import socket

    import torch.multiprocessing as mp

    from lightning_modules.plausibility import load_classifier
    from metrics.placement_scores import placement_scores
    from metrics.predictions import baseline_predictions
    from metrics.annotations import load_annotations

    data = tiny_toy_data / "toy-opa"
    preds = baseline_predictions(load_annotations(data, "val"), "random", 5, seed=3)
    single = placement_scores(data, "val", preds, classifier=load_classifier(tiny_classifier),
                              fid_features=_TinyFeatures(), lpips_distance=_TinyDistance(), boxes_per_sample=5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_scores, args=(data, "val", preds, tiny_classifier, port, tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["composites"] == single["composites"] == 8 * 5
    for key in ("acc", "oracle_plausible_rate", "classifier_oracle_agreement", "lpips"):
        assert ranks[0][key] == pytest.approx(single[key], rel=1e-9), key
    assert ranks[0]["acc_per_class"] == pytest.approx(single["acc_per_class"])
    assert ranks[0]["fid"] == pytest.approx(single["fid"], rel=1e-4)


def test_placement_callback_logs_acc_and_the_oracle_rate_of_the_same_boxes(tiny_toy_data, tiny_classifier, tmp_path):
    import train as train_script
    from configs.schema import load_config
    from tests.helpers.runs import tiny_run_overrides

    cfg = load_config(["experiment=toy_pretrain"] + tiny_run_overrides(tiny_toy_data / "toy-opa", tmp_path) + [
        f"callbacks.placement.classifier={tiny_classifier}", "callbacks.placement.boxes_per_image=4",
        "callbacks.placement.max_eval_samples=4", "callbacks.tpr_fpr.every_n_val_epochs=0"])
    metrics = train_script.train(cfg)["metrics"]
    assert 0 <= metrics["val/placement_acc"] <= 1 and 0 <= metrics["val/placement_oracle_rate"] <= 1
    assert "val/fid" not in metrics  # no Inception weights given: that metric is left out


def test_placement_callback_without_the_classifier_file_stops_before_training(tmp_path):
    from configs.schema import load_config
    from genloc.checkpoint import CheckpointError
    import train as train_script

    cfg = load_config(["experiment=toy_finetune", f"log_root={tmp_path}",
                       f"callbacks.placement.classifier={tmp_path / 'none.ckpt'}"])
    with pytest.raises(CheckpointError, match="none.ckpt"):
        train_script.build_callbacks(cfg, tmp_path, [])


def test_classifier_run_resumes_and_refuses_a_location_module(tiny_toy_data, tmp_path):
    import train as train_script
    from configs.schema import load_config
    from genloc.checkpoint import CheckpointError

    base = ["experiment=toy_plausibility", f"data.data_dir={tiny_toy_data / 'toy-opa'}", f"log_root={tmp_path}",
            "trainer.val_check_interval=1", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
            "data.batch_size=4", "module.image_size=32", "optim.warmup_steps=1"]
    train_script.train(load_config(base + ["trainer.max_steps=1"]))
    result = train_script.train(load_config(base + ["trainer.max_steps=2"]))
    assert result["resumed_from"] is not None and result["trainer"].global_step == 2
    # a location model stage pointed at the classifier's run folder is refused, naming both modules
    ckpt = result["run_dir"] / "checkpoints" / "last.ckpt"
    from lightning_modules.checkpoint import check_resumable
    from genloc.checkpoint import read_checkpoint
    from lightning_modules import MLEModule

    with pytest.raises(CheckpointError, match="PlausibilityModule but this run's module is lightning_modules.MLEModule"):
        check_resumable(read_checkpoint(ckpt, location_model=False), ckpt, {"preset": "tiny"}, MLEModule)
