"""The one way tools load a trained location model from a Lightning checkpoint (see docs/ARCHITECTURE.md)."""
from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from pathlib import Path

import torch

from models import LocationModel, LocationModelConfig
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

    Serialised in memory, written to a unique ``.<name>.<random>.partial`` in the same folder (two
    writers never share a temporary file), fsynced, then renamed over the target (``os.replace`` is
    atomic on POSIX): a crash or SIGKILL while saving leaves the previous ``last.ckpt`` intact. A
    failed write (disk full, ...) removes its temporary file and names the checkpoint; a SIGKILL
    leftover never ends in ``.ckpt`` and is removed at the next start under the run lock.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        with open(partial, "wb") as f:
            write_bytes(f, buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as err:
        Path(partial).unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise CheckpointError(f"disk full while saving {path} ({len(buffer.getbuffer()) / 2**20:.0f} MB); the previous "
                                  f"file is intact: free space on {path.parent} and run the same command to resume") from None
        raise
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def write_bytes(f, data) -> None:
    """The one write of a checkpoint's bytes (a seam for tests that crash mid-write)."""
    f.write(data)


# Fields that do not change what the weights mean: where they came from and how they train.
NON_ARCHITECTURE = ("vit_weights", "clip_weights", "gpt2_weights", "freeze_image_encoder", "freeze_text_encoder",
                    "gpt2_dropout", "compile_decoder")


def _config_differences(saved: dict, wanted: dict, ignore=()) -> list[str]:
    saved, wanted = (json.loads(json.dumps(dict(c), default=list)) for c in (saved, wanted))  # tuples == lists
    keys = sorted(k for k in set(saved) | set(wanted) if k not in ignore and saved.get(k) != wanted.get(k))
    return [f"{k}: checkpoint {saved.get(k)!r} vs config {wanted.get(k)!r}" for k in keys]


def saved_module(ckpt: dict) -> str:
    """Import path of the LightningModule that wrote a checkpoint (older files: told by their hparams)."""
    from lightning_modules.mle import MODULE_KEY

    if MODULE_KEY in ckpt:
        return ckpt[MODULE_KEY]
    return "lightning_modules.dpo.DPOModule" if "beta" in ckpt["hyper_parameters"] else "lightning_modules.mle.MLEModule"


def check_resumable(ckpt: dict, path: str | Path, model_config: dict, module_cls: type) -> None:
    """Refuse to resume a run from a checkpoint another config wrote (different model or module)."""
    from lightning_modules.mle import module_path

    differ = _config_differences(ckpt["hyper_parameters"]["model_config"], model_config)
    if differ:
        raise CheckpointError(f"checkpoint {path} was written with another model config ({', '.join(differ[:5])}); "
                              "resuming it would not be this run. Use another run_name, or resume=false to start over")
    saved, wanted = saved_module(ckpt), module_path(module_cls)
    if saved != wanted:
        raise CheckpointError(f"checkpoint {path} was written by {saved} but this run's module is {wanted}; "
                              "use another run_name (or init_from / module.reference to start from it)")


def load_model_weights(model: LocationModel, path: str | Path) -> None:
    """Start `model` from the LocationModel weights of checkpoint `path` (init_from): same architecture only."""
    ckpt = read_checkpoint(path)
    differ = _config_differences(ckpt["hyper_parameters"]["model_config"], model.cfg.to_dict(), NON_ARCHITECTURE)
    if differ:
        raise CheckpointError(f"init_from {path} holds another architecture ({', '.join(differ[:5])}); "
                              "set the model group to match it, or start from another checkpoint")
    try:
        model.load_state_dict(model_state_dict(ckpt))
    except RuntimeError as err:
        raise CheckpointError(f"init_from {path} does not fit this model: {str(err).splitlines()[0][:300]}") from None


def save_model_checkpoint(model: LocationModel, path: str | Path, **hyper_parameters) -> None:
    """Write ``model`` as the smallest checkpoint `read_checkpoint` and `load_location_model` accept
    (its config under ``hyper_parameters["model_config"]``, its weights under the ``model.`` prefix),
    atomically; extra ``hyper_parameters`` (e.g. a module's ``optim``) are stored beside the config.
    The one place outside Lightning that builds a checkpoint dict (tools, tests, benchmarks)."""
    if "model_config" in hyper_parameters:
        raise TypeError("save_model_checkpoint: model_config comes from the model; do not pass it")
    atomic_save({"hyper_parameters": {"model_config": model.cfg.to_dict(), **hyper_parameters},
                 "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
