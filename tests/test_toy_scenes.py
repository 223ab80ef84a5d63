"""Toy scenes: determinism, oracle verdicts on generated boxes, baselines, speed."""
import time

import numpy as np
import pytest

from datamodules.shards import iter_annotations
from datamodules.toy import (CLASSES, blind_baseline_rate, blind_baseline_rates, flip_scene, generate_scene,
                             is_plausible, make_sample, plausible_rates, render_scene, sample_negative,
                             sample_positive, uniform_random_rate, write_toy_split)


def norm(s, field):
    return np.asarray(s[field], float).reshape(-1, 4) / [s["width"], s["height"], s["width"], s["height"]]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    t = time.perf_counter()
    write_toy_split(d / "toy-opa", "toy-opa", "train", 600, seed=3, num_shards=4, progress=False)
    write_toy_split(d / "toy-opa", "toy-opa", "test", 200, seed=3, num_shards=4, progress=False)
    write_toy_split(d / "toy-pipe", "toy-pipe", "train", 600, seed=3, num_shards=4, progress=False)
    elapsed = time.perf_counter() - t
    return d, elapsed


def test_generation_is_fast_and_deterministic(toy):
    _, elapsed = toy
    assert elapsed < 10, f"1400 toy samples took {elapsed:.1f} s"
    k1, img1, a1 = make_sample(5, 17, "toy-opa")
    k2, img2, a2 = make_sample(5, 17, "toy-opa")
    k3, img3, a3 = make_sample(6, 17, "toy-opa")
    assert k1 == k2 and a1 == a2 and np.array_equal(img1, img2)
    assert a1 != a3 and img1.shape == (64, 64, 3)


def test_every_positive_plausible_every_negative_implausible(toy):
    d, _ = toy
    n_pos = n_neg = 0
    for flavour in ("toy-opa", "toy-pipe"):
        for s in iter_annotations(d / flavour, "train"):
            scene = s["meta"]["scene"]
            assert is_plausible(scene, s["category"], norm(s, "positives")).all(), s["key"]
            assert not is_plausible(scene, s["category"], norm(s, "negatives")).any(), s["key"]
            n_pos, n_neg = n_pos + len(s["positives"]), n_neg + len(s["negatives"])
            if flavour == "toy-pipe":
                assert len(s["positives"]) == 1 and s["negatives"] == []
    assert n_pos > 1500 and n_neg > 1000


def test_negatives_are_near_misses():
    """Negatives stay close to a positive of the same scene (the DPO signal): median largest
    coordinate difference to the nearest positive below 0.2 of the image for every class."""
    dist = {}
    for i in range(200):
        _, _, s = make_sample(1, i, "toy-opa")
        p = norm(s, "positives")
        for n in norm(s, "negatives"):
            dist.setdefault(s["category"], []).append(np.abs(p - n).max(1).min())
    assert set(dist) == set(CLASSES)
    for c, v in dist.items():
        assert np.median(v) < 0.2, (c, np.median(v))


def test_oracle_rules_and_vectorisation():
    rng = np.random.default_rng(0)
    scene = generate_scene(11)
    scene["tables"] = [{"x1": 0.2, "x2": 0.6, "top": 0.7, "bottom": 0.9}]
    scene["horizon"] = 0.5
    car = [0.3, 0.8 - 0.15, 0.3 + 0.3, 0.8]              # d = 0.3 -> height 0.15, aspect 2
    assert is_plausible(scene, "car", car)
    assert not is_plausible(scene, "car", [0.3, 0.65 - 0.3, 0.6, 0.65 - 0.15])  # same box floating 0.15 up
    assert is_plausible(scene, "bird", [0.5, 0.40, 0.58, 0.45])
    assert not is_plausible(scene, "bird", [0.5, 0.47, 0.58, 0.52])             # dips under the horizon
    lamp = [0.3, 0.7 - 0.14, 0.36, 0.7]                    # 0.7 * table height 0.2
    assert is_plausible(scene, "lamp", lamp)
    assert not is_plausible(scene, "lamp", [0.58, 0.56, 0.64, 0.7])             # off the table edge
    boxes = np.stack([sample_positive(scene, c, rng) for c in ["car"] * 5])
    negs = np.stack([sample_negative(scene, "car", rng) for _ in range(5)])
    verdict = is_plausible(scene, "car", np.concatenate([boxes, negs]))
    assert verdict.tolist() == [True] * 5 + [False] * 5
    assert verdict.tolist() == [is_plausible(scene, "car", b) for b in np.concatenate([boxes, negs])]
    with pytest.raises(KeyError, match="unknown toy category"):
        is_plausible(scene, "giraffe", car)


def test_flip_scene_mirrors_rules_and_pixels():
    rng = np.random.default_rng(1)
    for seed in range(20):
        scene = generate_scene(seed)
        for c in [c for c in CLASSES if c != "lamp" or scene["tables"]]:
            b = sample_positive(scene, c, rng)
            fb = np.array([1 - b[2], b[1], 1 - b[0], b[3]])
            assert is_plausible(flip_scene(scene), c, fb)
        assert np.array_equal(render_scene(flip_scene(scene))[:, ::-1], render_scene(scene))


def test_horizon_varies_strongly():
    h = [generate_scene(s)["horizon"] for s in range(300)]
    assert min(h) < 0.33 and max(h) > 0.67


def test_blind_and_uniform_baselines(toy):
    d, _ = toy
    train = list(iter_annotations(d / "toy-opa", "train"))
    test = list(iter_annotations(d / "toy-opa", "test"))
    blind = blind_baseline_rate(train, test, n=50)
    per_class = blind_baseline_rates(train, test, n=50)
    assert per_class["all"] == blind and set(per_class) == {"all", *CLASSES}
    uniform = uniform_random_rate(test, n=50)
    assert 0.1 < blind <= 0.45, blind
    assert uniform < 0.1, uniform


def test_plausible_rates_per_class_count_each_class_boxes():
    samples = []
    for i in range(40):
        _, _, ann = make_sample(11, i, "toy-opa")
        samples.append(ann)
        if {"car", "bird"} <= {s["category"] for s in samples}:
            break
    car = next(s for s in samples if s["category"] == "car")
    bird = next(s for s in samples if s["category"] == "bird")
    # car: 2 positives (plausible); bird: 1 positive + 3 negatives (near misses, implausible)
    boxes = [norm(car, "positives")[:2], np.concatenate([norm(bird, "positives")[:1], norm(bird, "negatives")[:3]])]
    n_neg = len(boxes[1]) - 1
    rates = plausible_rates([car, bird], boxes)
    assert list(rates) == ["all", "car", "bird"]
    assert rates["car"] == 1.0 and rates["bird"] == pytest.approx(1 / (1 + n_neg))
    assert rates["all"] == pytest.approx(3 / (2 + 1 + n_neg))
