"""Toy scenes (docs/design/toy_benchmark.md): seeded generator of small RGB scenes with a crisp plausibility oracle.

A scene has a horizon (sky above, ground below; its height varies 0.3-0.7 of the image) and
0-2 tables standing on the ground. Rules, all in normalised coordinates (so resizing never
changes a verdict; ``d`` = distance of the box bottom below the horizon):

- ``car``: bottom at least 0.04 below the horizon, height = 0.5*d, width/height = 2.0.
- ``person``: bottom at least 0.04 below the horizon, height = 1.0*d, width/height = 0.4.
- ``bird``: small (width 0.04-0.12, width/height 1-2.5), entirely in the sky, flying low:
  bottom between 0.18 and 0.02 above the horizon.
- ``lamp``: bottom on a table top (within 0.025), inside the table's x extent (0.01 slack),
  height = 0.7 * table height, width/height 0.35-0.8.

"=" means within a relative tolerance of 25% (30% for lamps) plus 0.02 absolute (more than one
bin of a 64-bin tokenizer). Because the horizon and tables move, a box copied from another scene
is rarely plausible (evaluate.py's image-blind baseline). Positives are drawn well inside the
tolerances; negatives (toy-opa) are near misses just outside them: floating/sunk cars and people,
wrong scale, birds dipping under the horizon or flying too high, lamps off the table edge or
floating. The scene description travels in the sample's ``meta["scene"]``; when the pipeline
mirrors the image, the toy kind's ``flip_meta`` hook toggles ``scene["hflip"]`` and the oracle
mirrors the scene accordingly.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from genloc.boxes import denormalise

__all__ = ["CLASSES", "generate_scene", "render_scene", "is_plausible", "flip_scene", "sample_positive",
           "sample_negative", "make_sample", "write_toy_split", "write_toy_dataset", "DEFAULT_SIZES"]

CLASSES = ("car", "person", "bird", "lamp")
_GROUND = {"car": (0.5, 2.0), "person": (1.0, 0.4)}  # class -> (height per unit depth, aspect w/h)
_REL, _ABS, _EPS = 0.25, 0.02, 1e-6
_MIN_DEPTH = 0.04
_BIRD_W, _BIRD_AR, _BIRD_BAND = (0.04, 0.12), (1.0, 2.5), (0.02, 0.18)
_LAMP_TOP_TOL, _LAMP_X_SLACK, _LAMP_K, _LAMP_REL, _LAMP_AR = 0.025, 0.01, 0.7, 0.30, (0.35, 0.8)
DEFAULT_SIZES = {"toy-pipe": {"train": 4000, "val": 256, "test": 256},
                 "toy-opa": {"train": 2000, "val": 256, "test": 256}}
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def _rng(*seed_parts) -> np.random.Generator:
    return np.random.default_rng([int(p) for p in seed_parts])


def generate_scene(seed: int, width: int = 64, height: int = 64, rng: np.random.Generator | None = None) -> dict:
    """A json-able scene description (normalised geometry + colours); deterministic in ``seed``."""
    r = rng if rng is not None else _rng(seed)
    horizon = float(r.uniform(0.3, 0.7))
    tables = []
    n_tables = int(r.choice([0, 1, 1, 2], p=[0.25, 0.25, 0.25, 0.25]))
    for _ in range(n_tables):
        for _try in range(10):
            bottom = float(r.uniform(min(horizon + 0.18, 0.95), 0.97))
            th = 0.5 * (bottom - horizon)
            tw = min(float(r.uniform(1.3, 2.2)) * th, 0.6)
            x1 = float(r.uniform(0.02, 0.98 - tw))
            t = {"x1": x1, "x2": x1 + tw, "top": bottom - th, "bottom": bottom}
            if all(t["x2"] + 0.03 < o["x1"] or o["x2"] + 0.03 < t["x1"] for o in tables):
                tables.append(t)
                break
    clouds = [[float(r.uniform(0, 1)), float(r.uniform(0.03, horizon - 0.05)), float(r.uniform(0.05, 0.15)),
               float(r.uniform(0.02, 0.05))] for _ in range(int(r.integers(0, 3)))]
    sky = [int(r.integers(70, 160)), int(r.integers(130, 210)), int(r.integers(190, 256))]
    ground = [int(r.integers(50, 150)), int(r.integers(90, 170)), int(r.integers(20, 90))]
    wood = [int(r.integers(110, 170)), int(r.integers(60, 100)), int(r.integers(20, 60))]
    return {"seed": int(seed), "w": int(width), "h": int(height), "horizon": horizon, "tables": tables,
            "clouds": clouds, "sky": sky, "ground": ground, "wood": wood, "hflip": False}


def flip_scene(scene: dict) -> dict:
    """The scene of the horizontally mirrored image: geometry stays stored in the original frame,
    the ``hflip`` flag says the image (and the boxes checked against it) are mirrored."""
    return {**scene, "hflip": not scene.get("hflip", False)}


def _oriented(scene: dict) -> dict:
    """Geometry in the frame of the (possibly mirrored) image the boxes refer to."""
    if not scene.get("hflip", False):
        return scene
    s = dict(scene, hflip=False)
    s["tables"] = [{**t, "x1": 1.0 - t["x2"], "x2": 1.0 - t["x1"]} for t in scene["tables"]]
    s["clouds"] = [[1.0 - c[0], *c[1:]] for c in scene.get("clouds", [])]
    return s


def render_scene(scene: dict) -> np.ndarray:
    """RGB uint8 array HxWx3 of the scene (sky gradient, clouds, ground, tables, mild noise)."""
    if scene.get("hflip", False):
        return np.ascontiguousarray(render_scene(flip_scene(scene))[:, ::-1])
    W, H = scene["w"], scene["h"]
    ys = (np.arange(H) + 0.5) / H
    xs = (np.arange(W) + 0.5) / W
    sky, ground, wood = (np.array(scene[k], np.float32) for k in ("sky", "ground", "wood"))
    hz = scene["horizon"]
    t = np.clip(ys / hz, 0, 1)[:, None, None]
    sky_rows = sky * (0.8 + 0.2 * t) + 255 * 0.1 * t  # lighter towards the horizon
    depth = np.clip((ys - hz) / (1 - hz), 0, 1)[:, None, None]
    ground_rows = ground * (0.75 + 0.35 * depth)
    img = np.where(ys[:, None, None] < hz, sky_rows, ground_rows) * np.ones((1, W, 1), np.float32)
    X, Y = np.meshgrid(xs, ys)
    for cx, cy, rx, ry in scene.get("clouds", []):
        m = ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 <= 1
        img[m & (Y < hz)] = 0.3 * img[m & (Y < hz)] + 0.7 * 245
    for tb in scene["tables"]:
        thick = max(2.0 / H, 0.15 * (tb["bottom"] - tb["top"]))
        leg = max(1.5 / W, 0.06 * (tb["x2"] - tb["x1"]))
        top = (X >= tb["x1"]) & (X <= tb["x2"]) & (Y >= tb["top"]) & (Y <= tb["top"] + thick)
        legs = (Y >= tb["top"]) & (Y <= tb["bottom"]) & (
            ((X >= tb["x1"] + 0.02) & (X <= tb["x1"] + 0.02 + leg)) | ((X <= tb["x2"] - 0.02) & (X >= tb["x2"] - 0.02 - leg)))
        img[legs] = wood * 0.8
        img[top] = wood
    noise = np.random.default_rng(scene["seed"]).normal(0, 4, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _within(value, target, rel):
    return np.abs(value - target) <= rel * target + _ABS + _EPS


def is_plausible(scene: dict, category: str, boxes):
    """Oracle: does a normalised ``x1,y1,x2,y2`` box (shape (4,) -> bool, or (N,4) -> bool array)
    follow the rule of ``category`` in ``scene``? Unknown categories raise KeyError."""
    b = np.asarray(boxes, dtype=np.float64)
    single = b.ndim == 1
    b = b.reshape(-1, 4)
    s = _oriented(scene)
    x1, y1, x2, y2 = b.T
    w, h = x2 - x1, y2 - y1
    inside = (x1 >= -_EPS) & (y1 >= -_EPS) & (x2 <= 1 + _EPS) & (y2 <= 1 + _EPS) & (w > 0) & (h > 0)
    hz = s["horizon"]
    safe_h = np.where(h > 0, h, 1.0)
    if category in _GROUND:
        k, ar = _GROUND[category]
        d = y2 - hz
        ok = (d >= _MIN_DEPTH - _EPS) & _within(h, k * d, _REL) & _within(w / safe_h, ar, _REL)
    elif category == "bird":
        gap = hz - y2
        ok = ((gap >= _BIRD_BAND[0] - _EPS) & (gap <= _BIRD_BAND[1] + _EPS)
              & (w >= _BIRD_W[0] - _EPS) & (w <= _BIRD_W[1] + _EPS)
              & (w / safe_h >= _BIRD_AR[0] - _EPS) & (w / safe_h <= _BIRD_AR[1] + _EPS))
    elif category == "lamp":
        ok = np.zeros(len(b), bool)
        for t in s["tables"]:
            th = t["bottom"] - t["top"]
            ok |= ((np.abs(y2 - t["top"]) <= _LAMP_TOP_TOL + _EPS)
                   & (x1 >= t["x1"] - _LAMP_X_SLACK - _EPS) & (x2 <= t["x2"] + _LAMP_X_SLACK + _EPS)
                   & _within(h, _LAMP_K * th, _LAMP_REL)
                   & (w / safe_h >= _LAMP_AR[0] - _EPS) & (w / safe_h <= _LAMP_AR[1] + _EPS))
    else:
        raise KeyError(f"unknown toy category {category!r}; known: {CLASSES}")
    ok = ok & inside
    return bool(ok[0]) if single else ok


def allowed_classes(scene: dict, classes=CLASSES) -> list[str]:
    """Classes that have a plausible placement in this scene (lamps need a table)."""
    return [c for c in classes if c != "lamp" or scene["tables"]]


def _box_from_bottom(cx, y2, w, h):
    return np.array([cx - w / 2, y2 - h, cx + w / 2, y2])


def sample_positive(scene: dict, category: str, rng: np.random.Generator) -> np.ndarray:
    """A plausible normalised box drawn well inside the rule's tolerances."""
    s = _oriented(scene)
    hz = s["horizon"]
    for _ in range(100):
        if category in _GROUND:
            k, ar = _GROUND[category]
            d = rng.uniform(0.1, 0.99 - hz)
            h = k * d * rng.uniform(0.9, 1.1)
            w = h * ar * rng.uniform(0.9, 1.1)
            box = _box_from_bottom(rng.uniform(w / 2, 1 - w / 2), hz + d, w, h) if w < 1 else None
        elif category == "bird":
            w = rng.uniform(0.05, 0.11)
            h = w / rng.uniform(1.2, 2.3)
            box = _box_from_bottom(rng.uniform(w / 2, 1 - w / 2), hz - rng.uniform(0.035, 0.165), w, h)
        elif category == "lamp":
            if not s["tables"]:
                raise ValueError("lamp needs a table in the scene")
            t = s["tables"][rng.integers(len(s["tables"]))]
            h = _LAMP_K * (t["bottom"] - t["top"]) * rng.uniform(0.88, 1.12)
            w = h * rng.uniform(0.42, 0.72)
            box = _box_from_bottom(rng.uniform(t["x1"] + w / 2, t["x2"] - w / 2), t["top"] + rng.uniform(-0.01, 0.01), w, h)
        else:
            raise KeyError(f"unknown toy category {category!r}")
        if box is not None and is_plausible(scene, category, box):
            return box
    raise RuntimeError(f"could not draw a plausible {category} in scene {scene['seed']}")


def _scaled(box, s):
    """Scale around the bottom centre (keeps the contact point)."""
    cx, y2 = (box[0] + box[2]) / 2, box[3]
    return _box_from_bottom(cx, y2, (box[2] - box[0]) * s, (box[3] - box[1]) * s)


def _moved(box, dx=0.0, dy=0.0):
    return box + np.array([dx, dy, dx, dy])


def sample_negative(scene: dict, category: str, rng: np.random.Generator, positive=None) -> np.ndarray:
    """A near miss: a plausible box perturbed just outside one rule (floating, sunk, wrong scale,
    bird dipping under the horizon or too high, lamp off the table edge or floating)."""
    s = _oriented(scene)
    hz = s["horizon"]
    for _ in range(200):
        p = positive if positive is not None else sample_positive(scene, category, rng)
        w, h = p[2] - p[0], p[3] - p[1]
        kind = rng.integers(3)
        if category in _GROUND:
            k = _GROUND[category][0]
            if kind == 2:
                box = _scaled(p, rng.choice([rng.uniform(0.5, 0.62), rng.uniform(1.45, 1.7)]))
            else:  # floating (box too tall for its contact point) or sunk (too short)
                ratio = rng.uniform(1.5, 1.9) if kind == 0 else rng.uniform(0.5, 0.62)
                box = _moved(p, dy=hz + h / (k * ratio) - p[3])
        elif category == "bird":
            if kind == 0:  # dipping under the horizon
                box = _moved(p, dy=hz + rng.uniform(0.2, 0.7) * h - p[3])
            elif kind == 1:  # too high in the sky
                box = _moved(p, dy=hz - rng.uniform(0.23, 0.32) - p[3])
            else:  # too big
                box = _scaled(p, rng.uniform(1.5, 2.0))
        else:  # lamp
            tables = [t for t in s["tables"] if t["top"] - 0.03 <= p[3] <= t["top"] + 0.03]
            t = tables[0] if tables else s["tables"][0]
            if kind == 0:  # overhanging the table edge by 35-70% of its width
                over = rng.uniform(0.35, 0.7) * w + _LAMP_X_SLACK
                box = _moved(p, dx=(t["x2"] + over - p[2]) if rng.random() < 0.5 else (t["x1"] - over - p[0]))
            elif kind == 1:  # floating above the table
                box = _moved(p, dy=-rng.uniform(0.05, 0.09))
            else:
                box = _scaled(p, rng.choice([rng.uniform(0.45, 0.55), rng.uniform(1.55, 1.9)]))
        inside = box[0] >= 0 and box[1] >= 0 and box[2] <= 1 and box[3] <= 1 and box[2] > box[0] and box[3] > box[1]
        if inside and not is_plausible(scene, category, box):
            return box
        positive = None
    raise RuntimeError(f"could not draw a near-miss {category} in scene {scene['seed']}")


def make_sample(seed: int, index: int, flavour: str, size=(64, 64), classes=CLASSES, split_id: int = 0):
    """One toy sample: (key, rgb array, annotation json with pixel boxes). Deterministic in its args."""
    if flavour not in ("toy-pipe", "toy-opa"):
        raise ValueError(f"flavour must be 'toy-pipe' or 'toy-opa', got {flavour!r}")
    r = _rng(seed, split_id, index, 1 if flavour == "toy-opa" else 0)
    W, H = size
    scene = generate_scene(int(r.integers(2**31)), W, H, rng=r)
    cats = allowed_classes(scene, classes)
    cat = cats[int(r.integers(len(cats)))]
    if flavour == "toy-pipe":
        pos, neg = [sample_positive(scene, cat, r)], []
    else:
        pos = [sample_positive(scene, cat, r) for _ in range(int(r.integers(2, 5)))]
        neg = [sample_negative(scene, cat, r, pos[i % len(pos)] if r.random() < 0.7 else None)
               for i in range(int(r.integers(2, 5)))]
    px = lambda bs: [[round(v, 3) for v in denormalise(b, (W, H)).tolist()] for b in bs]  # noqa: E731
    ann = {"category": cat, "width": W, "height": H, "positives": px(pos), "negatives": px(neg),
           "source": "toy", "meta": {"scene": scene, "flavour": flavour}}
    key = f"{flavour}-s{seed}-{['train', 'val', 'test'][split_id] if split_id < 3 else split_id}-{index:06d}"
    return key, render_scene(scene), ann


def write_toy_split(out_dir, flavour: str, split: str, num_samples: int, seed: int = 0, num_shards: int = 8,
                    size=(64, 64), classes=CLASSES, progress: bool = True) -> dict:
    """Write ``{split}-*.tar`` + ``{split}.json`` of one toy flavour into ``out_dir``."""
    from tqdm import tqdm

    from ..shard_writer import ShardWriter

    split_id = _SPLIT_IDS.get(split, 3 + sum(map(ord, split)))
    w = ShardWriter(out_dir, split, source="toy", num_shards=min(num_shards, num_samples))
    try:
        for i in tqdm(range(num_samples), desc=f"{flavour}/{split}", disable=not progress, leave=False):
            key, img, ann = make_sample(seed, i, flavour, size, classes, split_id)
            reason = w.write(key, ann, image=img)
            if reason is not None:
                raise RuntimeError(f"toy sample {key} rejected by the shard writer: {reason}")
    except BaseException:
        w.abort()
        raise
    return w.close()


def write_toy_dataset(out, seed: int = 0, sizes: dict | None = None, num_shards: int = 8, size=(64, 64),
                      classes=CLASSES, progress: bool = True) -> dict:
    """Write ``out/toy-pipe/{train,val,test}`` and ``out/toy-opa/{train,val,test}``; returns counts."""
    sizes = sizes or DEFAULT_SIZES
    out, done = Path(out), {}
    for flavour, splits in sizes.items():
        for split, n in splits.items():
            t = time.perf_counter()
            write_toy_split(out / flavour, flavour, split, n, seed, num_shards, size, classes, progress)
            done[f"{flavour}/{split}"] = {"samples": n, "seconds": round(time.perf_counter() - t, 2)}
    return done
