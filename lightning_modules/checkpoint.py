"""Checkpoints on the training side: resume checks and init_from. Reading and writing checkpoint
files is `genloc.checkpoint` (no Lightning); rebuilding a model from one is `genloc.hub.load_location_model`."""
from __future__ import annotations

import json
from pathlib import Path

from lightning_modules.mle import MODULE_KEY, OLD_MODULE_PATHS, module_path
from lightning_modules.run_files import unfinished_run
from genloc.checkpoint import CheckpointError, model_state_dict, read_checkpoint
from genloc.location_model import LocationModel


# Fields that do not change what the weights mean: where they came from and how they train.
NON_ARCHITECTURE = ("vit_weights", "clip_weights", "gpt2_weights", "freeze_image_encoder", "freeze_text_encoder",
                    "gpt2_dropout", "compile_decoder")


def _config_differences(saved: dict, wanted: dict, ignore=()) -> list[str]:
    saved, wanted = (json.loads(json.dumps(dict(c), default=list)) for c in (saved, wanted))  # tuples == lists
    keys = sorted(k for k in set(saved) | set(wanted) if k not in ignore and saved.get(k) != wanted.get(k))
    return [f"{k}: checkpoint {saved.get(k)!r} vs config {wanted.get(k)!r}" for k in keys]


def saved_module(ckpt: dict) -> str:
    """Class path (`module_path`) of the LightningModule that wrote a checkpoint; older files: their
    old spelling of it (`OLD_MODULE_PATHS`), or, with none recorded, told by their hparams."""
    if MODULE_KEY in ckpt:
        return OLD_MODULE_PATHS.get(ckpt[MODULE_KEY], ckpt[MODULE_KEY])
    return "lightning_modules.DPOModule" if "beta" in ckpt["hyper_parameters"] else "lightning_modules.MLEModule"


def check_resumable(ckpt: dict, path: str | Path, model_config: dict | None, module_cls: type) -> None:
    """Refuse to resume a run from a checkpoint another config wrote (different model or module);
    ``model_config`` None: the module has no location model (the classifier), only the module is compared."""
    saved, wanted = saved_module(ckpt), module_path(module_cls)
    if saved != wanted:
        raise CheckpointError(f"checkpoint {path} was written by {saved} but this run's module is {wanted}; "
                              "use another run_name (or init_from / module.reference to start from it)")
    saved_config = ckpt["hyper_parameters"].get("model_config")
    differ = [] if model_config is None and saved_config is None else _config_differences(saved_config or {},
                                                                                         model_config or {})
    if differ:
        raise CheckpointError(f"checkpoint {path} was written with another model config ({', '.join(differ[:5])}); "
                              "resuming it would not be this run. Use another run_name, or resume=false to start over")


def check_finished(path: str | Path, allow_unfinished: bool = False) -> None:
    """init_from only starts from a run that finished, unless `allow_unfinished` (a stopped run's
    weights are half-trained); train.py asks before any work, so the refusal is its only line."""
    why = unfinished_run(Path(path))
    if why and not allow_unfinished:
        raise CheckpointError(f"init_from {path}: {why}; resume that run to its end first (the same train.py "
                              "command), or set allow_unfinished=true to start from it anyway")


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
