"""Train a GenLoc location model: `python train.py [experiment=NAME] [group=choice] [key=value ...]`
(`--help` lists the config groups, `--print-config` prints the composed config).

`train(cfg)` is a plain function (tests call it in-process): compose, build, fit, report; the config
builds every object (configs/schema.py). A run lives in `<log_root>/<experiment>/<run_name>` and
resumes from its `last.ckpt` exactly where it stopped; SIGUSR1 saves and requeues (SLURM), SIGTERM /
SIGINT save, print the resume command and exit 143 / 130 (docs/training.md, docs/multinode.md).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from omegaconf import DictConfig, OmegaConf  # noqa: E402

from configs.schema import (ConfigError, check_packages, instantiate, internal_args, load_config, locate,  # noqa: E402
                            model_config, usage)
from genloc.files import OutputError, prepare_output_dir, write_atomic  # noqa: E402

log = logging.getLogger("genloc.train")
def run_dir(cfg: DictConfig) -> Path:
    """Identical on every rank: nothing in it depends on time or process."""
    return Path(cfg.log_root) / cfg.experiment / cfg.run_name


def build_datamodule(cfg: DictConfig, module_cls: type):
    """The datamodule, with its data present (a data kind may write it, e.g. the toy scenes)."""
    image_size = cfg.module.image_size if getattr(module_cls, "owns_image_size", False) else model_config(cfg).image_size
    values = {"image_size": image_size, "pairs": getattr(module_cls, "trains_on_pairs", False), "seed": cfg.seed}
    datamodule = instantiate(cfg.data, **{k: values[k] for k in internal_args(locate(cfg.data._target_))})
    datamodule.prepare_data()
    missing = datamodule.missing_splits()
    if missing:
        raise ConfigError(f"config key 'data.data_dir': {missing} not found; write shards with the "
                          "scripts/convert_*.py tools and point data.data_dir at them")
    return datamodule


def build_module(cfg: DictConfig, module_cls: type):
    internal = {"optim": instantiate(cfg.optim).to_dict()}
    if "model_config" in internal_args(module_cls) and not module_cls.model_from_reference:
        internal["model_config"] = model_config(cfg).to_dict()
    return instantiate(cfg.module, **internal)


def build_callbacks(cfg: DictConfig, directory: Path, infrastructure: list) -> list:
    """Infrastructure first, then the callbacks group in its order (a progress bar only when shown)."""
    from lightning.pytorch.callbacks import ProgressBar

    values = {"dirpath": str(directory / "checkpoints"), "seed": cfg.seed}
    callbacks = list(infrastructure)
    for section in cfg.callbacks.values():
        target = locate(section._target_)
        if issubclass(target, ProgressBar) and cfg.trainer.enable_progress_bar is False:
            continue
        callbacks.append(instantiate(section, **{k: values[k] for k in internal_args(target)}))
    return callbacks


def build_trainer(cfg: DictConfig, directory: Path, callbacks: list):
    from callbacks.checkpointing import checkpoint_plugins
    from lightning_modules.process import register_strategies

    register_strategies()
    return instantiate(cfg.trainer, callbacks=callbacks, plugins=checkpoint_plugins(), logger=instantiate(cfg.logger),
                       default_root_dir=str(directory), max_epochs=-1, check_val_every_n_epoch=None)


def train(cfg: DictConfig, extra_callbacks: list = ()) -> dict:
    """Run one training stage; returns the final metrics and the objects a caller may inspect."""
    import lightning as L

    from lightning_modules.checkpoint import check_finished
    from lightning_modules.process import ignore_false_lightning_warnings, use_tf32
    from lightning_modules.run_files import RunLock, is_global_rank_zero

    check_packages(cfg)
    if cfg.init_from:  # before any work: the refusal is the one line
        check_finished(cfg.init_from, cfg.allow_unfinished)
    module_cls = locate(cfg.module._target_)
    prepare_output_dir(run_dir(cfg), "run folder (log_root/experiment/run_name)")  # before any work
    datamodule = build_datamodule(cfg, module_cls)
    L.seed_everything(cfg.seed, workers=True)
    use_tf32(cfg.tf32)
    directory = run_dir(cfg)
    with RunLock(directory, enabled=is_global_rank_zero()), warnings.catch_warnings():
        ignore_false_lightning_warnings()
        return _fit(cfg, module_cls, datamodule, directory, extra_callbacks)


def _fit(cfg: DictConfig, module_cls: type, datamodule, directory: Path, extra_callbacks) -> dict:
    from callbacks.preemption import Preemption
    from callbacks.reproducible import ReproducibleSteps
    from lightning_modules.checkpoint import check_resumable, load_model_weights
    from lightning_modules.run_files import (is_global_rank_zero, move_earlier_run_aside, newest_last_checkpoint,
                                             remove_stale_partials, write_metrics, write_status)
    from lightning_modules.mle import LocationLightningModule
    from genloc.checkpoint import read_checkpoint

    checkpoints = directory / "checkpoints"
    last = newest_last_checkpoint(checkpoints) if cfg.resume else None
    saved = read_checkpoint(last, location_model=False) if last else None  # a corrupt last.ckpt is an error, never a restart
    start_step = int(saved.get("global_step", 0)) if saved is not None else 0
    if saved is not None:
        check_config_unchanged(cfg, directory)
    if is_global_rank_zero():
        for stale in remove_stale_partials(checkpoints):
            log.warning("removed %s, left by a save that was killed", stale)
        earlier = move_earlier_run_aside(directory) if last is None else None
        if earlier is not None:
            log.warning("starting over in %s: the earlier run's files were moved to %s (kept; TensorBoard shows it "
                        "as a run of its own)", directory, earlier)

    module = build_module(cfg, module_cls)
    location = isinstance(module, LocationLightningModule)  # the classifier has no location model
    if saved is not None:  # nor is one of another model or module
        check_resumable(saved, last, module.model.cfg.to_dict() if location else None, module_cls)
        del saved
    elif cfg.init_from and not location:
        raise ConfigError("config key 'init_from': it starts a location model; the plausibility classifier "
                          "starts from module.weights")
    elif cfg.init_from:
        load_model_weights(module.model, cfg.init_from)
        log.info("initialised model weights from %s", cfg.init_from)
    preemption = Preemption(checkpoints / "last.ckpt")
    callbacks = build_callbacks(cfg, directory, [ReproducibleSteps(cfg.seed), preemption]) + list(extra_callbacks)
    trainer = build_trainer(cfg, directory, callbacks)
    if trainer.is_global_zero:
        write_atomic(directory / "config.yaml", OmegaConf.to_yaml(cfg))
        if cfg.trainer.max_steps < 0 or start_step < cfg.trainer.max_steps:  # a finished run stays finished
            write_status(directory, finished=False, global_step=start_step)
    with preemption.handling_signals():
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last else None)
    metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if v.numel() == 1}
    metrics.update({f"data/skipped_samples/{split}": float(n) for split, n in datamodule.num_skipped.items() if n})
    if trainer.is_global_zero:
        if not write_metrics(directory / "metrics.json", metrics, trainer.global_step):
            previous = directory / "metrics.json"
            metrics = json.loads(previous.read_text()) if previous.is_file() else {}
            log.warning("nothing left to train (step %d of %d): %s kept", trainer.global_step,
                        cfg.trainer.max_steps, previous)
        write_status(directory, finished=preemption.saved_at is None, global_step=trainer.global_step,
                     stopped_by=preemption.stopped_by)
    return {"metrics": metrics, "trainer": trainer, "module": module, "datamodule": datamodule,
            "run_dir": directory, "resumed_from": str(last) if last else None, "preempted_at": preemption.saved_at,
            "stopped_by": preemption.stopped_by}


def check_config_unchanged(cfg: DictConfig, directory: Path) -> None:
    """A resumed run continues the saved one: settings it would silently ignore are an error."""
    from lightning_modules.run_files import config_changes_on_resume

    saved = directory / "config.yaml"
    if not saved.is_file():
        return
    changes = config_changes_on_resume(OmegaConf.load(saved), cfg)
    if changes:
        raise ConfigError(f"resuming {directory} with other settings than it was trained with ({'; '.join(changes[:4])}); "
                          "a resumed run keeps its optimiser, schedule, model and data: use resume=false (this run is then "
                          f"moved to {directory.name}.old-<n>, kept) or another run_name")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("genloc").setLevel(logging.INFO)
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(usage())  # before the imports below: help needs no torch
        return 0
    from datamodules.shard_format import ShardFormatError
    from datamodules.shard_reader import StorageStalled
    from genloc.checkpoint import CheckpointError
    from genloc.pretrained import PretrainedWeightsError
    from lightning_modules.process import one_line

    try:
        cfg = load_config([arg for arg in argv if arg != "--print-config"])
        if "--print-config" in argv:
            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        result = train(cfg)
    except (ConfigError, CheckpointError, ShardFormatError, PretrainedWeightsError, OutputError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except StorageStalled as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    from lightning_modules.run_files import report

    return report(result, argv, cfg)


if __name__ == "__main__":
    sys.exit(main())
