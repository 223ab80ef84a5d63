"""Train a GenLoc location model: `python train.py [experiment=NAME] [group=choice] [key=value ...]`.

`train(cfg)` is a plain function (tests call it in-process); `main()` only parses argv. A run lives
in `<log_root>/<experiment>/<run_name>`: `config.yaml`, TensorBoard events, `checkpoints/last.ckpt`.
Fit resumes from `last.ckpt` whenever it exists (pass `resume=false` to start over).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from omegaconf import DictConfig, OmegaConf  # noqa: E402

from configs.schema import ConfigError, load_config, model_config  # noqa: E402
from lightning_modules.checkpoint import CheckpointError  # noqa: E402

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

    return MLEModule(model_config=model_config(cfg).to_dict(), optim=optim)


def build_callbacks(cfg: DictConfig, checkpoint_dir: Path) -> list:
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar

    from callbacks.sample_images import SampleImagesCallback
    from callbacks.tpr_fpr import TprFprCallback

    callbacks = [
        ModelCheckpoint(dirpath=checkpoint_dir, filename="step{step:07d}", auto_insert_metric_name=False,
                        save_last=True, save_top_k=-1, every_n_train_steps=cfg.trainer.val_check_interval),
        LearningRateMonitor(logging_interval="step"),
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
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    t = cfg.trainer
    logger = TensorBoardLogger(save_dir=cfg.log_root, name=cfg.experiment, version=cfg.run_name,
                               default_hp_metric=False)
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        precision=t.precision,
        max_steps=t.max_steps,
        max_epochs=-1,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        enable_progress_bar=t.enable_progress_bar,
        deterministic=t.deterministic,
        sync_batchnorm=t.sync_batchnorm,
        num_sanity_val_steps=t.num_sanity_val_steps,
        callbacks=build_callbacks(cfg, directory / "checkpoints") + list(extra_callbacks),
        logger=logger,
        default_root_dir=str(directory),
    )


def train(cfg: DictConfig, extra_callbacks: list = ()) -> dict:
    """Run one training stage; returns the final metrics and the objects a caller may inspect."""
    import lightning as L

    from lightning_modules.checkpoint import model_state_dict, read_checkpoint

    check_data(cfg)
    L.seed_everything(cfg.seed, workers=True)
    directory = run_dir(cfg)
    last = directory / "checkpoints" / "last.ckpt"
    resume_from = str(last) if cfg.resume and last.exists() else None
    if resume_from:
        read_checkpoint(last)  # a corrupt last.ckpt is an error, never a silent restart

    module = build_module(cfg)
    if cfg.init_from and not resume_from and cfg.stage == "mle":
        module.model.load_state_dict(model_state_dict(read_checkpoint(cfg.init_from)))
        log.info("initialised model weights from %s", cfg.init_from)
    datamodule = build_datamodule(cfg, module.model.cfg.image_size)
    trainer = build_trainer(cfg, directory, extra_callbacks)
    if trainer.is_global_zero:
        directory.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, directory / "config.yaml")
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if v.numel() == 1}
    if trainer.is_global_zero:
        (directory / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return {"metrics": metrics, "trainer": trainer, "module": module, "datamodule": datamodule,
            "run_dir": directory, "resumed_from": resume_from}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("genloc").setLevel(logging.INFO)
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        result = train(cfg)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics = result["metrics"]
    print(f"run dir: {result['run_dir']} (all metrics: metrics.json, TensorBoard: tensorboard --logdir {result['run_dir']})")
    for key in SUMMARY_KEYS:
        if key in metrics:
            print(f"  {key:<20} {metrics[key]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
