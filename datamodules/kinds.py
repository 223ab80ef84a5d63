"""Data kinds: how one kind of data plugs its own behaviour into generic code that never names it.

A shard folder says what it holds in its ``{split}.json`` "source" field (toy shards say "toy").
`data_kind` turns that name into a `DataKind`: the hooks the kind's own module defines, looked up in
`REGISTRY` (kind name -> module path, imported on first use; the module exposes ``DATA_KIND``). A
name without an entry (real data such as "opa" and "pipe") or None gets a `DataKind` without hooks,
and every caller then skips what the hook would have done.

Callers: the data pipeline mirrors a flipped sample's meta with ``flip_meta``; the TPR-FPR callback
and evaluate.py score sampled boxes with ``plausible``; train.py writes missing data with ``prepare``;
composites (`datamodules.composites`) take the object to paste from ``foreground`` when a shard holds none.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["DataKind", "REGISTRY", "data_kind"]

# Kind name -> module defining DATA_KIND. Imported lazily so generic code never imports a kind's module.
REGISTRY: dict[str, str] = {"toy": "datamodules.toy"}


@dataclass(frozen=True)
class DataKind:
    """The hooks of one kind of data; a hook left None means the kind has nothing to add there.

    prepare: ``(data_dir, seed)``: write the data when it is missing (generated data only).
    flip_meta: a sample's meta -> the meta of its horizontally flipped copy.
    plausible: ``(meta, category, boxes_norm [N, 4])`` -> bool ``[N]``: an oracle's verdict on boxes.
    foreground: ``(meta, category)`` -> (RGB uint8 ``[h, w, 3]``, bool mask ``[h, w]``): the object to
    paste for composites when the shard stores none (generated data draws its own).
    """

    name: str | None
    prepare: Callable[[str, int], None] | None = None
    flip_meta: Callable[[dict], dict] | None = None
    plausible: Callable[[dict, str, np.ndarray], np.ndarray] | None = None
    foreground: Callable[[dict, str], tuple[np.ndarray, np.ndarray]] | None = None


def data_kind(name: str | None) -> DataKind:
    """The `DataKind` registered for ``name``; one without hooks for None or an unregistered name."""
    module = REGISTRY.get(name) if name is not None else None
    if module is None:
        return DataKind(name)
    kind = getattr(importlib.import_module(module), "DATA_KIND", None)
    if not isinstance(kind, DataKind) or kind.name != name:
        raise TypeError(f"data kind {name!r}: module {module} must define DATA_KIND = DataKind(name={name!r}, ...) "
                        f"(found {kind!r}); fix that module or its entry in datamodules.kinds.REGISTRY")
    return kind
