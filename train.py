"""Train a GenLoc location model: `python train.py [experiment=NAME] [group=choice] [key=value ...]`.

`train(cfg)` is a plain function (tests call it in-process); `main()` only parses argv. A run lives
in `<log_root>/<experiment>/<run_name>`: `config.yaml`, TensorBoard events, `checkpoints/last.ckpt`.
Fit resumes from `last.ckpt` whenever it exists (pass `resume=false` to start over); a resumed
run continues exactly where the checkpoint was taken (see `ReproducibleSteps` and the datamodule's
`state_dict`). SIGUSR1 (SLURM's `--signal=SIGUSR1@90`) saves `last.ckpt` at the next step
boundary, requeues a SLURM job and stops (see `Preemption`, docs/multinode.md).
"""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from omegaconf import DictConfig, OmegaConf  # noqa: E402

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.io import TorchCheckpointIO  # noqa: E402

from configs.schema import ConfigError, load_config, model_config  # noqa: E402
from datamodules.shards import ShardFormatError  # noqa: E402
from lightning_modules.checkpoint import CheckpointError, atomic_save  # noqa: E402
from models.pretrained import PretrainedWeightsError  # noqa: E402

log = logging.getLogger("genloc.train")
SUMMARY_KEYS = ("train/loss", "val/loss", "val/token_acc", "val/plausible_rate", "val/tpr@100", "val/fpr@100",
                "rewards/accuracies", "rewards/margins")


def run_dir(cfg: DictConfig) -> Path:
    """Identical on every rank: nothing in it depends on time or process."""
    return Path(cfg.log_root) / cfg.experiment / cfg.run_name


def check_data(cfg: DictConfig) -> None:
    """Fail before any model is built when the data is not there (toy data is generated on demand)."""
    data_dir = Path(cfg.data.data_dir)
    needed = [data_dir / f"{split}.json" for split in (cfg.data.train_split, cfg.data.val_split)]
    if all(p.is_file() for p in needed):
        return
    if cfg.data.kind == "toy" and data_dir.name in ("toy-pipe", "toy-opa"):
        from datamodules.toy import write_toy_dataset

        root = data_dir.parent
        log.warning("toy data missing under %s: generating it (seed %d)", root, cfg.seed)
        write_toy_dataset(root, seed=cfg.seed)
        if all(p.is_file() for p in needed):
            return
    missing = [str(p) for p in needed if not p.is_file()]
    raise ConfigError(f"config key 'data.data_dir': {missing} not found; write shards with the "
                      f"scripts/convert_*.py tools (or make_toy_data.py) and point data.data_dir at them")


def build_datamodule(cfg: DictConfig, image_size: int):
    from datamodules import OPADataModule, PIPEDataModule, ToyDataModule

    cls = {"toy": ToyDataModule, "opa": OPADataModule, "pipe": PIPEDataModule}[cfg.data.kind]
    return cls(
        data_dir=cfg.data.data_dir,
        image_size=image_size,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        flip_prob=cfg.data.flip_prob,
        train_split=cfg.data.train_split,
        val_split=cfg.data.val_split,
        test_split=cfg.data.test_split,
        pairs=cfg.stage == "dpo",
    )


def build_module(cfg: DictConfig):
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    if cfg.stage == "dpo":
        from lightning_modules.dpo import DPOModule

        dpo = OmegaConf.to_container(cfg.dpo, resolve=True)
        return DPOModule(optim=optim, **dpo)
    from lightning_modules.mle import MLEModule

    return MLEModule(model_config=model_config(cfg).to_dict(), optim=optim,
                     label_sigma_bins=cfg.mle.label_sigma_bins)


class ReproducibleSteps(L.Callback):
    """Makes every training step a function of (weights, optimiser, batch, seed) only, so a run
    restarted from a checkpoint continues bit for bit like the uninterrupted one:

    - torch/numpy/python RNGs are reseeded before each training batch from (seed, epoch, batch,
      rank): dropout (GPT-2's is on) draws the same masks whatever validation, callbacks or loader
      start-up consumed from the global RNGs in between; checkpoints need no RNG state.
    - the frozen text tower's per-category feature cache is filled one category at a time:
      encoded in a batch, a category's features depend (in the last bits) on which other
      categories shared that first batch, which differs between a resumed and a straight run.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)

    @staticmethod
    def _warm_text_cache(model, categories) -> None:
        if model.cfg.freeze_text_encoder:
            for category in dict.fromkeys(categories):
                model.encode_texts([category])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        key = f"{self.seed}-{trainer.current_epoch}-{batch_idx}-{trainer.global_rank}"
        step_seed = random.Random(key).getrandbits(63)
        torch.manual_seed(step_seed)
        np.random.seed(step_seed % 2**32)
        random.seed(step_seed)
        self._warm_text_cache(pl_module.model, batch["category"])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._warm_text_cache(pl_module.model, batch["category"])


class Preemption(L.Callback):
    """SIGUSR1 (SLURM `--signal=SIGUSR1@90`, or `kill -USR1`) -> `last.ckpt` -> requeue -> stop.

    The handler only raises a flag; the checkpoint is written at the next training-step boundary
    (never mid optimiser step), after all ranks agreed on the flag (one all-reduce per step under
    DDP, so ranks that got the signal at different moments still stop at the same step). It is
    the same `last.ckpt` a normal resume reads, so the requeued job continues exactly there.
    Rank 0 then runs `scontrol requeue $SLURM_JOB_ID` when inside a SLURM job.
    """

    def __init__(self, last_ckpt: Path):
        self.last_ckpt = Path(last_ckpt)
        self.requested = False
        self.saved_at: int | None = None

    def request(self, signum, frame) -> None:
        self.requested = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        flag = torch.tensor([float(self.requested)], device=pl_module.device)
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if not flag.item() or self.saved_at is not None:
            return
        self.requested = True
        trainer.save_checkpoint(self.last_ckpt)
        self.saved_at = trainer.global_step
        log.warning("pre-empted: saved %s at step %d; stopping", self.last_ckpt, trainer.global_step)
        if trainer.is_global_zero:
            requeue_slurm_job()
        trainer.should_stop = True


def requeue_slurm_job() -> None:
    """`scontrol requeue` this SLURM job (array tasks as JOB_TASK); no-op outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        log.warning("not a SLURM job: restart the same command to resume from last.ckpt")
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.error("could not requeue SLURM job %s (%s); resubmit it to resume", job, err)
        return
    if result.returncode:
        log.error("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
    else:
        log.warning("requeued SLURM job %s", job)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Every checkpoint (last.ckpt included) goes through `atomic_save`: never half-written."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)


def build_plugins() -> list:
    """Atomic checkpoint IO; under SLURM our own SIGUSR1 handling replaces Lightning's auto-requeue
    (which saves an `hpc_ckpt_*.ckpt` from inside the signal handler, possibly mid-step)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


class FinalCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` also holds the final step when max_steps is not a multiple
    of the checkpoint interval (Lightning only saves `last` at train end if nothing was saved)."""

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def build_callbacks(cfg: DictConfig, checkpoint_dir: Path) -> list:
    from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar

    from callbacks.sample_images import SampleImagesCallback
    from callbacks.tpr_fpr import TprFprCallback

    callbacks = [
        FinalCheckpoint(dirpath=checkpoint_dir, filename="step{step:07d}", auto_insert_metric_name=False,
                        save_last=True, save_top_k=-1, every_n_train_steps=cfg.trainer.val_check_interval),
        LearningRateMonitor(logging_interval="step"),
        ReproducibleSteps(cfg.seed),
        Preemption(checkpoint_dir / "last.ckpt"),
        SampleImagesCallback(**cfg.callbacks.sample_images),
        TprFprCallback(every_n_val_epochs=cfg.callbacks.tpr_fpr.every_n_val_epochs,
                       num_samples=cfg.callbacks.tpr_fpr.num_samples,
                       max_eval_samples=cfg.callbacks.tpr_fpr.max_eval_samples,
                       seed=cfg.seed),
    ]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    if cfg.callbacks.inpainting.every_n_val_epochs:
        from callbacks.inpainting import InpaintingCallback

        callbacks.append(InpaintingCallback(**cfg.callbacks.inpainting, seed=cfg.seed))
    return callbacks


def build_trainer(cfg: DictConfig, directory: Path, extra_callbacks: list = ()):
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(save_dir=cfg.log_root, name=cfg.experiment, version=cfg.run_name,
                               default_hp_metric=False)
    # every key of the `trainer` group is a Trainer argument (configs/schema.py: TrainerSection);
    # validation runs every val_check_interval steps across epoch boundaries
    return L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        max_epochs=-1,
        check_val_every_n_epoch=None,
        callbacks=build_callbacks(cfg, directory / "checkpoints") + list(extra_callbacks),
        plugins=build_plugins(),
        logger=logger,
        default_root_dir=str(directory),
    )


def train(cfg: DictConfig, extra_callbacks: list = ()) -> dict:
    """Run one training stage; returns the final metrics and the objects a caller may inspect."""
    from lightning_modules.checkpoint import check_resumable, model_state_dict, read_checkpoint

    check_data(cfg)
    L.seed_everything(cfg.seed, workers=True)
    # Lightning only knows stateful DataLoaders; ours restore the position through the datamodule's
    # state_dict, so its "dataloader is not resumable" warning on a mid-epoch resume is wrong here.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # Each loader worker is configured for its own shards, so the length Lightning doubts is exact;
    # the frozen encoders are in eval mode on purpose.
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    directory = run_dir(cfg)
    last = directory / "checkpoints" / "last.ckpt"
    resume_from = str(last) if cfg.resume and last.exists() else None
    saved_hparams = None
    if resume_from:  # a corrupt last.ckpt is an error, never a silent restart
        saved_hparams = {"hyper_parameters": read_checkpoint(last)["hyper_parameters"]}

    module = build_module(cfg)
    if saved_hparams:  # nor is one of another model or stage
        check_resumable(saved_hparams, last, module.model.cfg.to_dict(), cfg.stage)
    if cfg.init_from and not resume_from and cfg.stage == "mle":
        module.model.load_state_dict(model_state_dict(read_checkpoint(cfg.init_from)))
        log.info("initialised model weights from %s", cfg.init_from)
    datamodule = build_datamodule(cfg, module.model.cfg.image_size)
    trainer = build_trainer(cfg, directory, extra_callbacks)
    if trainer.is_global_zero:
        directory.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, directory / "config.yaml")
    preemption = next(c for c in trainer.callbacks if isinstance(c, Preemption))
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGUSR1, preemption.request) if in_main_thread else None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGUSR1, previous)
    metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if v.numel() == 1}
    if trainer.is_global_zero:
        (directory / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return {"metrics": metrics, "trainer": trainer, "module": module, "datamodule": datamodule,
            "run_dir": directory, "resumed_from": resume_from, "preempted_at": preemption.saved_at}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("genloc").setLevel(logging.INFO)
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        result = train(cfg)
    except (ConfigError, CheckpointError, ShardFormatError, PretrainedWeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result["preempted_at"] is not None:
        print(f"pre-empted at step {result['preempted_at']}: {result['run_dir']}/checkpoints/last.ckpt saved; "
              "run the same command (or let SLURM requeue it) to resume")
    metrics = result["metrics"]
    print(f"run dir: {result['run_dir']} (all metrics: metrics.json, TensorBoard: tensorboard --logdir {result['run_dir']})")
    for key in SUMMARY_KEYS:
        if key in metrics:
            print(f"  {key:<20} {metrics[key]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
