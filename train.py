"""Train a GenLoc location model: `python train.py [experiment=NAME] [group=choice] [key=value ...]`.

`train(cfg)` is a plain function (tests call it in-process): compose, build, fit, report. The
config builds every object (configs/schema.py); the training infrastructure lives in callbacks/
(checkpointing, reproducible steps, pre-emption). A run lives in `<log_root>/<experiment>/<run_name>`:
`config.yaml`, TensorBoard events, `metrics.json`, `checkpoints/last.ckpt`. Fit resumes from
`last.ckpt` whenever it exists and continues exactly where the checkpoint was taken; a run that
starts over (`resume=false`, or no checkpoint yet) first moves an earlier run's files to
`<run_dir>.old-<n>`. SIGUSR1 (SLURM's `--signal=SIGUSR1@90`) saves `last.ckpt` at the next step
boundary, requeues a SLURM job and stops; SIGTERM and SIGINT save it the same way, stop and exit
with 143 / 130, printing the command that resumes the run. `status.json` records whether the run
finished (docs/multinode.md).
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from omegaconf import DictConfig, OmegaConf  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402

from configs.schema import ConfigError, instantiate, internal_args, load_config, locate, model_config  # noqa: E402
from datamodules.shard_format import ShardFormatError  # noqa: E402
from datamodules.shard_reader import StorageStalled  # noqa: E402
from genloc.checkpoint import CheckpointError  # noqa: E402
from genloc.files import OutputError, prepare_output_dir, write_atomic  # noqa: E402
from lightning_modules.run_files import (RunLock, config_changes_on_resume, is_global_rank_zero,  # noqa: E402
                                         move_earlier_run_aside, newest_last_checkpoint, remove_stale_partials,
                                         write_metrics, write_status)
from genloc.pretrained import PretrainedWeightsError  # noqa: E402

log = logging.getLogger("genloc.train")
SUMMARY_KEYS = ("train/loss", "val/loss", "val/token_acc", "val/plausible_rate", "val/tpr@100", "val/fpr@100",
                "rewards/accuracies", "rewards/margins")


def run_dir(cfg: DictConfig) -> Path:
    """Identical on every rank: nothing in it depends on time or process."""
    return Path(cfg.log_root) / cfg.experiment / cfg.run_name


def build_datamodule(cfg: DictConfig, module_cls: type):
    """The datamodule, with its data present (a data kind may write it, e.g. the toy scenes)."""
    datamodule = instantiate(cfg.data, image_size=model_config(cfg).image_size,
                             pairs=module_cls.trains_on_pairs, seed=cfg.seed)
    datamodule.prepare_data()
    missing = datamodule.missing_splits()
    if missing:
        raise ConfigError(f"config key 'data.data_dir': {missing} not found; write shards with the "
                          "scripts/convert_*.py tools and point data.data_dir at them")
    return datamodule


def build_module(cfg: DictConfig, module_cls: type):
    internal = {"optim": instantiate(cfg.optim).to_dict()}
    if not module_cls.model_from_reference:
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
    from lightning.pytorch.loggers import TensorBoardLogger

    from callbacks.checkpointing import checkpoint_plugins

    logger = TensorBoardLogger(save_dir=cfg.log_root, name=cfg.experiment, version=cfg.run_name,
                               default_hp_metric=False)
    return instantiate(cfg.trainer, callbacks=callbacks, plugins=checkpoint_plugins(), logger=logger,
                       default_root_dir=str(directory), max_epochs=-1, check_val_every_n_epoch=None)


def train(cfg: DictConfig, extra_callbacks: list = ()) -> dict:
    """Run one training stage; returns the final metrics and the objects a caller may inspect."""
    module_cls = locate(cfg.module._target_)
    prepare_output_dir(run_dir(cfg), "run folder (log_root/experiment/run_name)")  # before any work
    datamodule = build_datamodule(cfg, module_cls)
    L.seed_everything(cfg.seed, workers=True)
    use_tf32(cfg.tf32)
    directory = run_dir(cfg)
    with RunLock(directory, enabled=is_global_rank_zero()), warnings.catch_warnings():
        ignore_false_lightning_warnings()
        return _fit(cfg, module_cls, datamodule, directory, extra_callbacks)


def ignore_false_lightning_warnings() -> None:
    """Lightning warnings that are wrong for this setup; set inside `train`'s `catch_warnings`, so
    the caller's filters are back once it returns."""
    # Lightning only knows stateful DataLoaders; ours restore the position through the datamodule's
    # state_dict, so its "dataloader is not resumable" warning on a mid-epoch resume is wrong here.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # Each loader worker is configured for its own shards, so the length Lightning doubts is exact;
    # the frozen encoders are in eval mode on purpose.
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # The run folder holds this run's own checkpoints by design (resumed from, locked against others).
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")


def use_tf32(enabled: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA (bf16-mixed runs keep their fp32
    parts exact enough); a machine without CUDA is left untouched, so CPU results cannot change."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def _fit(cfg: DictConfig, module_cls: type, datamodule, directory: Path, extra_callbacks) -> dict:
    from callbacks.preemption import Preemption
    from callbacks.reproducible import ReproducibleSteps
    from lightning_modules.checkpoint import check_resumable, load_model_weights
    from genloc.checkpoint import read_checkpoint

    checkpoints = directory / "checkpoints"
    last = newest_last_checkpoint(checkpoints) if cfg.resume else None
    saved = read_checkpoint(last) if last else None  # a corrupt last.ckpt is an error, never a restart
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
    if saved is not None:  # nor is one of another model or module
        check_resumable(saved, last, module.model.cfg.to_dict(), module_cls)
        del saved
    elif cfg.init_from:
        load_model_weights(module.model, cfg.init_from, allow_unfinished=cfg.allow_unfinished)
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
    try:
        cfg = load_config(argv)
        result = train(cfg)
    except (ConfigError, CheckpointError, ShardFormatError, PretrainedWeightsError, OutputError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except StorageStalled as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    return report(result, argv)


def one_line(err: Exception) -> str:
    """The error's own message; one a DataLoader worker raised comes back wrapped in the worker's
    traceback ("Caught X in DataLoader worker process N ..."), whose last line holds it."""
    text = str(err).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def report(result: dict, argv: list[str]) -> int:
    """Print how the run ended; the exit status: 0 when it finished or was pre-empted by SIGUSR1 (the
    requeued job continues it), 128 + the signal number when SIGTERM (143) or SIGINT (130) stopped it."""
    ckpt = result["run_dir"] / "checkpoints" / "last.ckpt"
    stopped_by = result["stopped_by"]
    if stopped_by == "SIGUSR1":
        print(f"pre-empted at step {result['preempted_at']}: {ckpt} saved; "
              "run the same command (or let SLURM requeue it) to resume")
    elif stopped_by is not None:
        print(f"stopped by {stopped_by} at step {result['preempted_at']} (not finished): {ckpt} saved; resume with: "
              f"python train.py {shlex.join(argv)}", file=sys.stderr)
        return 128 + signal.Signals[stopped_by].value
    metrics = result["metrics"]
    print(f"run dir: {result['run_dir']} (all metrics: metrics.json, TensorBoard: tensorboard --logdir {result['run_dir']})")
    for key in SUMMARY_KEYS:
        if key in metrics:
            print(f"  {key:<20} {metrics[key]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
