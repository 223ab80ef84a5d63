"""Checkpoint files of the location model, read and written without Lightning (see docs/ARCHITECTURE.md).

A checkpoint holds the model config under ``hyper_parameters["model_config"]`` and the weights under
the ``model.`` prefix of ``state_dict``: what Lightning writes for the training modules, and what
`save_model_checkpoint` writes for tools and tests. `genloc.hub.load_location_model` rebuilds the
model of one; the training side (resume checks, init_from) is in lightning_modules/checkpoint.py.

Files written before the package was named ``genloc`` name its modules ``models.*`` (a pickled
`LocationModelConfig` is ``models.config.LocationModelConfig``; a run's config.yaml has
``_target_: models.LocationModelConfig``). `current_module` maps such a path to today's, and
`read_checkpoint` unpickles through it. That is a rename at the one place old paths are read, not
a ``models`` package or a ``sys.modules["models"]`` alias: ``models`` is a name many projects use
for their own package, and an alias would shadow theirs in the whole process.
"""
from __future__ import annotations

import errno
import io
import pickle
import types
from pathlib import Path

import torch

from .files import write_atomic

# The package's name before it was installable; checkpoints and run configs of that time use it.
OLD_PACKAGE = "models"


def current_module(path: str) -> str:
    """A dotted module or class path with the old package name replaced: ``models.config`` -> ``genloc.config``."""
    head, dot, rest = path.partition(".")
    return f"{__package__}{dot}{rest}" if head == OLD_PACKAGE else path


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        return super().find_class(current_module(module), name)


# What torch.load needs of a pickle module, with the old class paths mapped to genloc's.
_PICKLE = types.SimpleNamespace(__name__=__name__, Unpickler=_Unpickler,
                                load=lambda file, **kwargs: _Unpickler(file, **kwargs).load())


class ModelSourceError(Exception):
    """A model reference (checkpoint, model folder or Hub id) that cannot be loaded: what
    `genloc.hub.load_model` raises, so a caller catches one class; the message names the cause."""


class CheckpointError(ModelSourceError, RuntimeError):
    """A checkpoint that is missing, unreadable or not a GenLoc checkpoint."""


def read_checkpoint(path: str | Path, location_model: bool = True) -> dict:
    """torch.load with errors that name the file and what to do; ``location_model=False`` also accepts
    a checkpoint of a module without a location model (the plausibility classifier)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (train a model first, or fix the path)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PICKLE)
    except Exception as err:  # truncated zip, pickle error, ...
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(err).__name__}: {err}); "
                              "delete it or point to another checkpoint") from None
    if (location_model and "model_config" not in ckpt.get("hyper_parameters", {})) or "state_dict" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a GenLoc checkpoint (no hyper_parameters.model_config)")
    return ckpt


def model_state_dict(ckpt: dict) -> dict[str, torch.Tensor]:
    """The LocationModel weights of a checkpoint (keys under the `model.` prefix, prefix removed)."""
    return {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


def atomic_save(checkpoint: dict, path: str | Path) -> None:
    """`torch.save` through the one atomic writer (`genloc.files.write_atomic`): a crash or SIGKILL
    while saving leaves the previous ``last.ckpt`` intact. A full disk is a `CheckpointError` that
    names the file; a SIGKILL leftover (``.partial``) is removed at the next start under the run lock."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    try:
        write_atomic(path, buffer.getbuffer())
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise CheckpointError(f"disk full while saving {path} ({len(buffer.getbuffer()) / 2**20:.0f} MB); the previous "
                                  f"file is intact: free space on {path.parent} and run the same command to resume") from None
        raise


def save_model_checkpoint(model, path: str | Path, **hyper_parameters) -> None:
    """Write ``model`` (a `LocationModel`) as the smallest checkpoint `read_checkpoint` and
    `genloc.hub.load_location_model` accept (its config under ``hyper_parameters["model_config"]``, its
    weights under the ``model.`` prefix), atomically; extra ``hyper_parameters`` (e.g. a module's
    ``optim``) are stored beside the config. The one place outside Lightning that builds a checkpoint
    dict (tools, tests, benchmarks)."""
    if "model_config" in hyper_parameters:
        raise TypeError("save_model_checkpoint: model_config comes from the model; do not pass it")
    atomic_save({"hyper_parameters": {"model_config": model.cfg.to_dict(), **hyper_parameters},
                 "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
