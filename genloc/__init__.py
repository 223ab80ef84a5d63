"""genloc: the GenLoc location model in pure PyTorch (no Lightning): tokenizer, config/presets, model
+ sampler, Hub-style model folders, the one-call placement API and insertion back-ends. Installable
on its own (`pip install`, pyproject.toml); the training code of the repository imports it.

Names are loaded on first use (PEP 562), so ``import genloc.images`` or ``import genloc.files``
does not load torch's model stack. `versions` is imported first: an installed release too old for
the APIs used fails here, with one line."""
import importlib

from . import versions  # noqa: F401

# The release; pyproject.toml reads it from here, and model folders record it (config.json).
__version__ = "0.1.0"

_EXPORTS = {
    "BoxTokenizer": "box_tokenizer", "LocationModelConfig": "config",
    "GenLocModel": "hub", "ModelFilesError": "hub", "ModelSourceError": "checkpoint", "load_model": "hub",
    "ExtentMask": "location_model", "LocationModel": "location_model", "SampleOutput": "location_model",
    "BoxScores": "placement", "NoValidSetError": "placement", "Placement": "placement", "PlacementSet": "placement", "place": "placement",
    "place_many": "placement", "score": "placement", "PretrainedWeightsError": "pretrained", "draw_tokens": "sampling",
    "filter_logits": "sampling",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'genloc' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
