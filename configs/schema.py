"""Typed training config and its composition from the YAML groups in this folder.

`load_config(["experiment=toy_finetune", "optim.lr=1e-4", "model=paper"])` composes, in order:
the base `train.yaml`, the experiment's group choices, command-line group choices (`group=name`),
the chosen group files, the experiment's deltas, then `key=value` overrides. The result is merged
into the dataclass schema below, so an unknown key or a value of the wrong type is a
`ConfigError` naming the key, raised before anything heavy is built.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from models.config import LocationModelConfig

CONFIG_DIR = Path(__file__).resolve().parent
GROUPS = ("model", "data", "optim", "trainer", "callbacks", "dpo")


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the key."""


def _model_schema() -> type:
    """Every LocationModelConfig field, optional (None = the preset's value), plus `preset`."""
    hints = typing.get_type_hints(LocationModelConfig)
    fields = [("preset", str, field(default="tiny"))]
    for f in dataclasses.fields(LocationModelConfig):
        kind = hints[f.name]
        kind = Optional[Any] if typing.get_origin(kind) in (dict, list, tuple) or kind in (dict, list) else Optional[kind]
        fields.append((f.name, kind, field(default=None)))
    return dataclasses.make_dataclass("ModelSection", fields)


ModelSection = _model_schema()


@dataclass
class DataSection:
    kind: str = "toy"  # toy | opa | pipe
    data_dir: str = MISSING
    batch_size: int = 64
    num_workers: int = 1
    shuffle_buffer: int = 1000
    flip_prob: float = 0.5
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"


@dataclass
class OptimSection:
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1


@dataclass
class TrainerSection:
    """Passed to lightning.Trainer as keyword arguments: every field must be a Trainer argument."""
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: Optional[str] = None
    max_steps: int = 1000
    val_check_interval: Optional[int] = 250
    limit_val_batches: Optional[float] = None
    log_every_n_steps: int = 10
    gradient_clip_val: Optional[float] = 1.0
    accumulate_grad_batches: int = 1
    enable_progress_bar: bool = True
    deterministic: bool = False
    sync_batchnorm: bool = False
    num_sanity_val_steps: int = 0


@dataclass
class TprFprSection:
    every_n_val_epochs: int = 1
    num_samples: int = 100
    max_eval_samples: int = 256


@dataclass
class SampleImagesSection:
    every_n_val_epochs: int = 1
    num_images: int = 8
    boxes_per_image: int = 8


@dataclass
class InpaintingSection:
    every_n_val_epochs: int = 0  # 0: off; needs a local diffusers inpainting folder in `inpainter`
    inpainter: Optional[str] = None
    backend: str = "sd"  # sd | gligen
    num_images: int = 4
    steps: int = 8
    resolution: int = 256
    guidance_scale: float = 7.5
    dilate: int = 0
    feather: int = 0
    clip_weights: Optional[str] = None  # local open_clip weights for the foreground CLIP score
    clip_model: Optional[str] = None


@dataclass
class CallbacksSection:
    tpr_fpr: TprFprSection = field(default_factory=TprFprSection)
    sample_images: SampleImagesSection = field(default_factory=SampleImagesSection)
    inpainting: InpaintingSection = field(default_factory=InpaintingSection)


@dataclass
class MLESection:
    label_sigma_bins: float = 0.0  # Gaussian target width in bins for the training loss; 0 = plain NLL


@dataclass
class DPOSection:
    beta: float = MISSING
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference: str = MISSING
    precompute_reference: bool = False
    sft_weight: float = 0.0  # weight of the chosen box's per-token NLL added to the DPO loss (RPO)


@dataclass
class TrainConfig:
    experiment: str = "toy_pretrain"
    run_name: str = "default"
    log_root: str = "runs"
    seed: int = 0
    stage: str = "mle"
    resume: bool = True
    init_from: Optional[str] = None
    model: Any = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    mle: MLESection = field(default_factory=MLESection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    callbacks: CallbacksSection = field(default_factory=CallbacksSection)
    dpo: Optional[DPOSection] = None


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        choices = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"no config file {path.relative_to(CONFIG_DIR)}; choose one of {choices}")
    return OmegaConf.load(path)


def _split_overrides(overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    """Separate `group=name` choices (and `experiment=name`) from `key=value` overrides."""
    choices, dotlist = {}, []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        if key in GROUPS or key == "experiment":
            choices[key] = value
        else:
            dotlist.append(item)
    return choices, dotlist


def load_config(overrides: list[str] | None = None, config_dir: Path = CONFIG_DIR) -> DictConfig:
    """Compose and validate the training config; raises ConfigError naming the offending key."""
    choices, dotlist = _split_overrides(list(overrides or []))
    base = _read_yaml(config_dir / "train.yaml")
    defaults = dict(base.pop("defaults", {}))
    experiment = OmegaConf.create()
    if "experiment" in choices:
        experiment = _read_yaml(config_dir / "experiment" / f"{choices.pop('experiment')}.yaml")
        defaults.update(experiment.pop("defaults", {}))
    defaults.update(choices)
    unknown_groups = set(defaults) - set(GROUPS)
    if unknown_groups:
        raise ConfigError(f"unknown config group(s) {sorted(unknown_groups)}; groups are {list(GROUPS)}")
    groups = OmegaConf.create({g: _read_yaml(config_dir / g / f"{name}.yaml") for g, name in defaults.items() if name})
    try:
        cli = OmegaConf.from_dotlist(dotlist)
        schema = OmegaConf.structured(TrainConfig)
        if "dpo" in groups:
            schema.dpo = OmegaConf.structured(DPOSection)
        cfg = OmegaConf.merge(schema, groups, base, experiment, cli)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"mandatory value(s) not set: {', '.join(missing)} (pass them as key=value)")
    _validate(cfg)
    return cfg


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    reason = str(err).splitlines()[0]
    return f"config key '{key}': {reason}" if key else reason


def _validate(cfg: DictConfig) -> None:
    """Checks that need more than types: choices and that the model config itself is valid."""
    if cfg.stage not in ("mle", "dpo"):
        raise ConfigError(f"config key 'stage': must be 'mle' or 'dpo', got '{cfg.stage}'")
    if cfg.stage == "dpo" and cfg.dpo is None:
        raise ConfigError("config key 'dpo': stage=dpo needs the dpo group (dpo=default)")
    if cfg.data.kind not in ("toy", "opa", "pipe"):
        raise ConfigError(f"config key 'data.kind': must be toy, opa or pipe, got '{cfg.data.kind}'")
    try:
        model_config(cfg)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config key 'model': {err}") from None


def model_config(cfg: DictConfig) -> LocationModelConfig:
    """The LocationModelConfig a config describes: the preset with the non-null keys overriding it."""
    section = OmegaConf.to_container(cfg.model, resolve=True)
    preset = section.pop("preset")
    return LocationModelConfig.preset(preset, **{k: v for k, v in section.items() if v is not None})
