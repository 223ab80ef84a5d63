"""Insertion back-ends behind one interface, and the instruction-editor baselines (docs/design/placement.md#insertion-back-ends).

    from genloc.inpainters import load_backend
    inpainter = load_backend("sd", "/models/sd-inpainting", device="cuda", steps=30)
    ins = inpainter.insert(image, "cup", box=(x1, y1, x2, y2), seed=0)   # mode="auto": crop small boxes
    ins.image                                                             # pixels outside the mask unchanged

A folder is local or a Hub id (fetched into the hub cache; offline, only a cached one); a wrong folder
fails at once naming the folder and the layout each back-end expects.
"""
from __future__ import annotations

import warnings

from genloc.choices import BACKENDS
from genloc.inpainters.backends import FluxFillInpainter, GLIGENInpainter, SDInpainter
from genloc.inpainters.base import (CROP_MARGIN, DEFAULT_STEPS, MODES, BackendFolderError, Inpainter, Insertion)
from genloc.inpainters.editors import DiffRegion, Edit, InstructEditor, changed_region
from genloc.inpainters.powerpaint import PowerPaintInpainter

_BACKENDS = {cls.name: cls for cls in (SDInpainter, FluxFillInpainter, PowerPaintInpainter, GLIGENInpainter)}
_EDITORS = {cls.name: cls for cls in (InstructEditor,)}
if tuple(_BACKENDS) != BACKENDS:  # the names --help lists (genloc.choices) are the adapters' names
    raise ImportError(f"genloc.choices.BACKENDS {BACKENDS} does not match the adapters {tuple(_BACKENDS)}")
EDITORS = tuple(_EDITORS)


def load_backend(name: str, folder, *, device="cpu", dtype=None, **options) -> Inpainter:
    """Load back-end `name` from local `folder`; `options` go to the adapter (steps, guidance_scale,
    resolution, prompt_template, and back-end specific ones such as powerpaint's tradeoff)."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown back-end {name!r}: choose one of {', '.join(BACKENDS)}")
    cls = _BACKENDS[name]
    if cls.deprecated:
        warnings.warn(f"back-end {name}: {cls.deprecated}", FutureWarning, stacklevel=2)
    return cls.load(folder, device=device, dtype=dtype, **options)


def load_editor(name: str, folder, *, device="cpu", dtype=None, **options) -> InstructEditor:
    """Load instruction editor `name` (one of `EDITORS`) from local `folder`."""
    if name not in _EDITORS:
        raise ValueError(f"unknown editor {name!r}: choose one of {', '.join(EDITORS)}")
    return _EDITORS[name].load(folder, device=device, dtype=dtype, **options)


__all__ = ["BACKENDS", "EDITORS", "MODES", "CROP_MARGIN", "DEFAULT_STEPS", "BackendFolderError", "Inpainter",
           "Insertion", "Edit", "DiffRegion", "InstructEditor", "changed_region", "load_backend", "load_editor",
           "SDInpainter", "FluxFillInpainter", "PowerPaintInpainter", "GLIGENInpainter"]
