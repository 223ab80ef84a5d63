"""Toy scenes: determinism, oracle verdicts on generated boxes, and the toy data kind's hooks.
Baseline plausible rates on toy data: tests/test_evaluate.py."""
import numpy as np
import pytest

from datamodules.shard_reader import iter_annotations
from datamodules.toy import (CLASSES, DEFAULT_SIZES, flip_scene, generate_scene, is_plausible, make_sample,
                             render_scene, sample_negative, sample_positive, write_toy_split)


def norm(s, field):
    return np.asarray(s[field], float).reshape(-1, 4) / [s["width"], s["height"], s["width"], s["height"]]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    write_toy_split(d / "toy-opa", "toy-opa", "train", 600, seed=3, num_shards=4, progress=False)
    write_toy_split(d / "toy-opa", "toy-opa", "test", 200, seed=3, num_shards=4, progress=False)
    write_toy_split(d / "toy-pipe", "toy-pipe", "train", 600, seed=3, num_shards=4, progress=False)
    return d


def test_generation_is_deterministic():
    k1, img1, a1 = make_sample(5, 17, "toy-opa")
    k2, img2, a2 = make_sample(5, 17, "toy-opa")
    k3, img3, a3 = make_sample(6, 17, "toy-opa")
    assert k1 == k2 and a1 == a2 and np.array_equal(img1, img2)
    assert a1 != a3 and img1.shape == (64, 64, 3)


def test_every_positive_plausible_every_negative_implausible(toy):
    d = toy
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


def test_toy_kind_hooks(tmp_path, monkeypatch):
    """The hooks generic code reaches the toy world through: flip, oracle and on-demand data."""
    from datamodules.kinds import data_kind

    kind = data_kind("toy")
    _, _, ann = make_sample(2, 0, "toy-opa")
    meta, cat = ann["meta"], ann["category"]
    flipped = kind.flip_meta(meta)
    assert flipped["scene"] == flip_scene(meta["scene"]) and not meta["scene"]["hflip"]   # input untouched
    assert kind.flip_meta(flipped)["scene"] == meta["scene"] and kind.flip_meta({"x": 1}) == {"x": 1}
    boxes = np.concatenate([norm(ann, "positives"), norm(ann, "negatives")])
    verdict = kind.plausible(meta, cat, boxes)
    assert verdict.dtype == bool and verdict.tolist() == is_plausible(meta["scene"], cat, boxes).tolist()
    mirrored = np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], 1)
    assert kind.plausible(flipped, cat, mirrored).tolist() == verdict.tolist()

    for flavour in DEFAULT_SIZES:
        monkeypatch.setitem(DEFAULT_SIZES, flavour, {"train": 3, "val": 2})
    kind.prepare(str(tmp_path / "elsewhere"), 0)              # not a toy folder name: left alone
    assert not (tmp_path / "elsewhere").exists()
    kind.prepare(str(tmp_path / "toy" / "toy-opa"), 4)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json"))
    assert written == [f"toy/{f}/{s}.json" for f in ("toy-opa", "toy-pipe") for s in ("train", "val")]
    keys = [s["key"] for s in iter_annotations(tmp_path / "toy" / "toy-opa", "train")]
    assert sorted(keys) == sorted(make_sample(4, i, "toy-opa")[0] for i in range(3))   # seeded by `seed`
    before = (tmp_path / "toy" / "toy-opa" / "train.json").stat().st_mtime_ns
    kind.prepare(str(tmp_path / "toy" / "toy-pipe"), 4)       # already there: nothing rewritten
    assert (tmp_path / "toy" / "toy-opa" / "train.json").stat().st_mtime_ns == before


def test_cli_writes_the_requested_splits_only(tmp_path):
    from datamodules.toy.__main__ import main

    done = main(["--out", str(tmp_path), "--pipe-train", "0", "--opa-train", "3", "--val", "2", "--test", "0",
                 "--num-shards", "1", "--seed", "2"])
    assert set(done) == {"toy-pipe/val", "toy-opa/train", "toy-opa/val"}
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json")) == [
        "toy-opa/train.json", "toy-opa/val.json", "toy-pipe/val.json"]
    for bad in (["--classes", "car,giraffe"], ["--val", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--out", str(tmp_path / "x")] + bad)
        assert exit_info.value.code == 2
