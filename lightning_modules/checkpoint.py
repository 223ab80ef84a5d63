"""The one way tools load a trained location model from a Lightning checkpoint (see docs/ARCHITECTURE.md)."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

from models import LocationModelConfig
from models.hub import GenLocModel, ModelFilesError, model_from_state_dict


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not a GenLoc checkpoint."""


def read_checkpoint(path: str | Path) -> dict:
    """torch.load with errors that name the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (train a model first, or fix the path)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, pickle error, ...
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(err).__name__}: {err}); "
                              "delete it or point to another checkpoint") from None
    if "model_config" not in ckpt.get("hyper_parameters", {}) or "state_dict" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a GenLoc checkpoint (no hyper_parameters.model_config)")
    return ckpt


def model_state_dict(ckpt: dict) -> dict[str, torch.Tensor]:
    """The LocationModel weights of a checkpoint (keys under the `model.` prefix, prefix removed)."""
    return {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


def load_location_model(path: str | Path) -> GenLocModel:
    """Rebuild the LocationModel of a checkpoint, in eval mode, on the CPU; every weight comes from
    the checkpoint (no pretrained weights are fetched, see `models.hub.model_from_state_dict`)."""
    ckpt = read_checkpoint(path)
    try:
        return model_from_state_dict(LocationModelConfig.from_dict(ckpt["hyper_parameters"]["model_config"]),
                                     model_state_dict(ckpt), f"checkpoint {path}")
    except ModelFilesError as err:
        raise CheckpointError(str(err)) from None


def atomic_save(checkpoint: dict, path: str | Path) -> None:
    """Write a checkpoint so that its final name never holds a half-written file.

    Serialised in memory, written to ``.<name>.partial`` in the same folder, fsynced, then renamed
    over the target (``os.replace`` is atomic on POSIX): a crash or SIGKILL while saving leaves the
    previous ``last.ckpt`` intact. ``.partial`` does not end in ``.ckpt``, so nothing takes a
    leftover for a checkpoint, and the next save overwrites it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as f:
        write_bytes(f, buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def write_bytes(f, data) -> None:
    """The one write of a checkpoint's bytes (a seam for tests that crash mid-write)."""
    f.write(data)


def check_resumable(ckpt: dict, path: str | Path, model_config: dict, stage: str) -> None:
    """Refuse to resume a run from a checkpoint another config wrote (different model or stage)."""
    saved, model_config = (json.loads(json.dumps(dict(c), default=list))  # tuples and lists compare equal
                           for c in (ckpt["hyper_parameters"]["model_config"], model_config))
    differ = sorted(k for k in set(saved) | set(model_config) if saved.get(k) != model_config.get(k))
    if differ:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {model_config.get(k)!r}" for k in differ[:5])
        raise CheckpointError(f"checkpoint {path} was written with another model config ({details}); resuming it "
                              "would not be this run. Use another run_name, or resume=false to start over")
    saved_stage = "dpo" if "beta" in ckpt["hyper_parameters"] else "mle"
    if saved_stage != stage:
        raise CheckpointError(f"checkpoint {path} is a {saved_stage} checkpoint but this run is stage={stage}; "
                              "use another run_name (or init_from / dpo.reference to start from it)")
