"""TEMPORARY stand-in (lead's tree) for the helper's kinds.py: same API."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

KINDS = {"toy": "datamodules.toy"}


@dataclass(frozen=True)
class DataKind:
    name: str | None
    prepare: Callable[[str, int], None] | None = None
    flip_meta: Callable[[dict], dict] | None = None
    plausible: Callable[[dict, str, np.ndarray], np.ndarray] | None = None


def data_kind(name: str | None) -> DataKind:
    if name not in KINDS:
        return DataKind(name)
    if name == "toy":
        from pathlib import Path
        toy = importlib.import_module(KINDS[name])

        def prepare(data_dir, seed):
            d = Path(data_dir)
            if d.name in ("toy-pipe", "toy-opa"):
                toy.write_toy_dataset(d.parent, seed=seed)
        return DataKind("toy", prepare=prepare)
    return DataKind(name)
