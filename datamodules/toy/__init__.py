"""The built-in toy world (docs/design/toy_benchmark.md): seeded scenes with a crisp plausibility oracle (`scenes`), their
shards, the CLI that writes them (``python -m`` on this package) and a feature probe (`probe`).

Generic code reaches the toy world only through `DATA_KIND`, registered under "toy" in
`datamodules.kinds` (toy shards say ``"source": "toy"``): the oracle scores sampled boxes, the meta
flip keeps ``meta["scene"]`` in step with a mirrored image, and ``prepare`` writes missing data.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..kinds import DataKind
from .scenes import (CLASSES, DEFAULT_SIZES, flip_scene, generate_scene, is_plausible, make_sample, render_scene,
                     sample_negative, sample_positive, write_toy_dataset, write_toy_split)
from .sprites import sprite

__all__ = ["DATA_KIND", "CLASSES", "DEFAULT_SIZES", "flip_scene", "generate_scene", "is_plausible", "make_sample",
           "render_scene", "sample_negative", "sample_positive", "sprite", "write_toy_dataset", "write_toy_split"]

log = logging.getLogger("datamodules")


def prepare(data_dir, seed: int) -> None:
    """Write both toy flavours next to ``data_dir`` when it is a missing ``.../toy-pipe`` or ``.../toy-opa``
    folder (seconds); any other folder name is left alone, so the caller reports it missing."""
    data_dir = Path(data_dir)
    if data_dir.name not in DEFAULT_SIZES:
        return
    root = data_dir.parent
    wanted = [root / flavour / f"{split}.json" for flavour, splits in DEFAULT_SIZES.items() for split in splits]
    if all(path.is_file() for path in wanted):
        return
    log.warning("toy data missing under %s: generating it (seed %d)", root, seed)
    write_toy_dataset(root, seed=seed)


def flip_meta(meta: dict) -> dict:
    """Meta of the mirrored sample: its scene gets the flip flag the oracle and renderer read."""
    if not isinstance(meta.get("scene"), dict):
        return meta
    return {**meta, "scene": flip_scene(meta["scene"])}


def plausible(meta: dict, category: str, boxes_norm: np.ndarray) -> np.ndarray:
    """The oracle's verdict on normalised boxes ``[N, 4]`` in the sample's scene -> bool ``[N]``."""
    return is_plausible(meta["scene"], category, np.asarray(boxes_norm, dtype=np.float64).reshape(-1, 4))


def foreground(meta: dict, category: str) -> tuple[np.ndarray, np.ndarray]:
    """The class's flat sprite for the sample's scene (`sprites`; its own generator, so scenes never change)."""
    return sprite(meta["scene"]["seed"], category)


DATA_KIND = DataKind(name="toy", prepare=prepare, flip_meta=flip_meta, plausible=plausible, foreground=foreground)
