"""The one way tools load a trained location model from a Lightning checkpoint (see docs/ARCHITECTURE.md)."""
from __future__ import annotations

from pathlib import Path

import torch

from models import LocationModel, LocationModelConfig


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


def load_location_model(path: str | Path) -> LocationModel:
    """Rebuild the LocationModel of a checkpoint, in eval mode, on the CPU."""
    ckpt = read_checkpoint(path)
    model = LocationModel(LocationModelConfig.from_dict(ckpt["hyper_parameters"]["model_config"]))
    try:
        model.load_state_dict(model_state_dict(ckpt))
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not match its model config: {str(err)[:500]}") from None
    return model.eval()
