"""The training config: composed from the YAML groups in this folder, typed from the constructors it builds.

`load_config(["experiment=toy_finetune", "optim.lr=1e-4", "model=paper"])` composes, in order: the
base `train.yaml`, the chosen group files (the base's `defaults`, then the experiment's, then
command-line `group=name` choices), the experiment's deltas, then `key=value` overrides. The
experiment (the base's default one unless chosen) is named by its file name, which names the run folder.

Each group file names what it builds (`_target_: package.module.Name`) and holds that constructor's
real arguments. The typed schema of a section is derived from its target's signature: every
parameter is a key, typed by its annotation, with the default it has in code, so a new constructor
argument is reachable the moment it exists and has one default. The few arguments train.py passes
itself are listed in `INTERNAL`, each with the reason. An unknown key, a wrong type, an unset
mandatory value (`???`) or a value out of range is a `ConfigError` naming the key, raised before
anything heavy is built. `instantiate(section, **internal)` builds a section's object.

The `model` section is the exception: it builds `LocationModelConfig.preset(preset, **fields)`, so
its keys are `preset` plus every LocationModelConfig field, each None (= the preset's value) unless set.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import importlib
import importlib.util
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from genloc.config import ArgumentError, LocationModelConfig

CONFIG_DIR = Path(__file__).resolve().parent
GROUPS = ("model", "data", "module", "optim", "trainer", "callbacks", "logger")
PRIMITIVES = (bool, int, float, str)

# Constructor arguments a config does not hold, because train.py derives them from the run.
INTERNAL: dict[str, dict[str, str]] = {
    "datamodules.ShardDataModule": {
        "image_size": "the model's image size (model group)",
        "pairs": "the module's choice: DPO trains on (chosen, rejected) pairs",
        "seed": "the run's top-level `seed`",
    },
    "lightning_modules.MLEModule": {
        "model_config": "built from the model group",
        "optim": "built from the optim group",
    },
    "lightning_modules.DPOModule": {
        "model_config": "read from the reference checkpoint (the policy has the reference's architecture)",
        "optim": "built from the optim group",
    },
    "datamodules.composites.CompositeDataModule": {"image_size": "the classifier's image size (module.image_size)"},
    "lightning_modules.PlausibilityModule": {"optim": "built from the optim group"},
    "lightning.Trainer": {
        "callbacks": "the callbacks group plus the training infrastructure (train.py)",
        "plugins": "atomic checkpoint IO and SLURM handling (callbacks.checkpointing)",
        "logger": "built from the logger group",
        "default_root_dir": "the run dir",
        "max_epochs": "training length is trainer.max_steps",
        "check_val_every_n_epoch": "validation runs every val_check_interval steps, across epoch boundaries",
    },
    "callbacks.FinalCheckpoint": {"dirpath": "<run dir>/checkpoints"},
    "callbacks.TprFprCallback": {"seed": "the run's top-level `seed`"},
    "callbacks.SampleImagesCallback": {"seed": "the run's top-level `seed`"},
    "callbacks.InpaintingCallback": {"seed": "the run's top-level `seed`"},
    "callbacks.PlacementMetricsCallback": {"seed": "the run's top-level `seed`"},
}

def _at_least(low):
    return (lambda v: v >= low), f">= {low}"


def _optional_at_least(low):
    return (lambda v: v is None or v >= low), f"null or >= {low}"


def _between(low, high):
    return (lambda v: low <= v <= high), f"[{low}, {high}]"


# Arguments whose type alone admits nonsense, by constructor: (predicate, what is allowed).
# Checked in every section that builds the constructor, so a renamed callback entry is checked too.
RANGES: dict[str, dict[str, tuple[typing.Callable[[Any], bool], str]]] = {
    "datamodules.ShardDataModule": {
        "batch_size": _at_least(1), "num_workers": _at_least(0), "shuffle_buffer": _at_least(1),
        "flip_prob": _between(0.0, 1.0), "eval_batch_size": _optional_at_least(1),
        "prefetch_factor": _optional_at_least(1),
    },
    "lightning.Trainer": {
        "max_steps": _at_least(1),
        "val_check_interval": ((lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                               "a whole number of training steps >= 1 (validation runs across epochs)"),
        "log_every_n_steps": _optional_at_least(1), "accumulate_grad_batches": _at_least(1),
        "gradient_clip_val": _optional_at_least(0.0), "num_sanity_val_steps": _optional_at_least(-1),
    },
    "callbacks.TprFprCallback": {
        "every_n_val_epochs": _at_least(0), "num_samples": _at_least(1), "max_eval_samples": _optional_at_least(1),
        "iou_threshold": ((lambda v: 0 < v <= 1), "(0, 1]"),
    },
    "callbacks.SampleImagesCallback": {
        "every_n_val_epochs": _at_least(0), "num_images": _at_least(1), "boxes_per_image": _at_least(1),
    },
    "callbacks.InpaintingCallback": {"every_n_val_epochs": _at_least(0), "num_images": _at_least(1), "steps": _at_least(1)},
    "datamodules.composites.CompositeDataModule": {
        "batch_size": _at_least(1), "num_workers": _at_least(0), "random_boxes": _at_least(0),
        "val_random_boxes": _at_least(0),
    },
    "callbacks.PlacementMetricsCallback": {"every_n_val_epochs": _at_least(0), "boxes_per_image": _at_least(1),
                                           "max_eval_samples": _at_least(1), "temperature": ((lambda v: v > 0), "> 0")},
    "callbacks.FinalCheckpoint": {"save_top_k": _at_least(-1), "every_n_train_steps": _optional_at_least(0)},
}


# Constructors that check their own arguments, by the function that does it without building
# anything: called on a section's keys before anything is built, an `ArgumentError` names the key.
ARGUMENT_CHECKS = {
    "lightning_modules.AdamWCosine": "lightning_modules.optim.AdamWCosine",  # a plain dataclass
    "lightning_modules.MLEModule": "lightning_modules.mle.check_args",
    "lightning_modules.DPOModule": "lightning_modules.dpo.check_args",
    "callbacks.TprFprCallback": "genloc.sampling.check_filter_args",
    "lightning_modules.PlausibilityModule": "lightning_modules.plausibility.check_args",
}


# Packages a target needs beyond the train extra (pip name), checked before a run starts; composing and
# printing a config needs none of them.
PACKAGES = {
    "lightning.pytorch.loggers.MLFlowLogger": "mlflow",
    "lightning.pytorch.loggers.WandbLogger": "wandb",
}


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the key."""


def locate(path: str) -> Any:
    """The object named by a dotted path (`package.module.Name` or `package.module.Class.attribute`)."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"_target_ must be a dotted import path, got {path!r}")
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            break
        return obj
    raise ConfigError(f"_target_ '{path}' cannot be imported; it must name a class or function, "
                      "e.g. datamodules.ShardDataModule")


def internal_args(target: Any) -> dict[str, str]:
    """INTERNAL entries that apply to `target` (matched by object, so aliases of a path agree)."""
    out: dict[str, str] = {}
    for path, args in INTERNAL.items():
        try:
            obj = locate(path)
        except ConfigError:
            continue
        if obj is target or (isinstance(target, type) and isinstance(obj, type) and issubclass(target, obj)):
            out.update(args)
    return out


def _config_type(hint: Any) -> Any:
    """The OmegaConf-expressible type of an annotation: primitives, Optional/Union of primitives,
    lists of primitives; Literal by the type of its values; anything else is Any."""
    if hint in PRIMITIVES:
        return hint
    if hint is type(None):
        return type(None)
    if isinstance(hint, type) and issubclass(hint, Path):
        return str
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Literal:
        kinds = {type(a) for a in args}
        return kinds.pop() if len(kinds) == 1 and kinds <= set(PRIMITIVES) else Any
    if origin in (Union, types.UnionType):
        members = []
        for arg in args:
            kind = _config_type(arg)
            for member in (typing.get_args(kind) if typing.get_origin(kind) is Union else (kind,)):
                if member is Any:
                    return Any  # a container or unknown member: accept anything, the constructor checks
                if member not in members:
                    members.append(member)
        return Union[tuple(members)] if len(members) > 1 else members[0]
    if origin in (list, tuple, collections.abc.Sequence):
        inner = [_config_type(a) for a in args if a is not Ellipsis]
        if len(set(inner)) == 1 and inner[0] in PRIMITIVES:
            return list[inner[0]]
        return Any
    return Any


def _has_literal(hint: Any) -> bool:
    return typing.get_origin(hint) is typing.Literal or any(_has_literal(a) for a in typing.get_args(hint))


def _allowed(hint: Any, value: Any) -> bool:
    """Whether a config value fits an annotation that names exact choices (Literal)."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return any(_allowed(a, value) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint in PRIMITIVES:
        return isinstance(value, hint) and not (hint is not bool and isinstance(value, bool))
    return not isinstance(value, (str, int, float, bool)) or value is None  # a class: not expressible as a scalar


def _choices(hint: Any) -> list[str]:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return [repr(a) for a in typing.get_args(hint)]
    if origin in (Union, types.UnionType):
        return [c for a in typing.get_args(hint) for c in _choices(a)]
    if hint is type(None):
        return ["null"]
    return [f"any {hint.__name__}"] if hint in PRIMITIVES else []


def _default(value: Any) -> Any:
    """A signature default as a config value (tuples become lists)."""
    if isinstance(value, tuple):
        return list(value)
    return value


def section_schema(target_path: str) -> type:
    """A dataclass of every constructor argument of `target_path` (minus INTERNAL), typed and
    defaulted from its signature, plus `_target_`."""
    target = locate(target_path)
    function = target.__init__ if isinstance(target, type) else target
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # forward references a library cannot resolve: untyped, still reachable
        hints = {}
    internal = internal_args(target)
    factories = {f.name: f.default_factory for f in dataclasses.fields(target)
                 if f.default_factory is not dataclasses.MISSING} if dataclasses.is_dataclass(target) else {}
    fields = [("_target_", str, field(default=target_path))]
    for name, param in inspect.signature(target).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or name in internal:
            continue
        kind = _config_type(hints.get(name, Any))
        default = param.default if name not in factories else factories[name]()
        default = MISSING if default is param.empty else _default(default)
        if default is not MISSING and default is not None and not isinstance(default, (*PRIMITIVES, list, dict)):
            raise ConfigError(f"{target_path}: default of '{name}' ({default!r}) cannot be a config value; "
                              "list it in configs/schema.py INTERNAL")
        if isinstance(default, (list, dict)):
            spec = field(default_factory=lambda d=default: list(d) if isinstance(d, list) else dict(d))
        else:
            spec = field(default=default)
        if default is None and typing.get_origin(kind) is not Union and kind is not Any:
            kind = Optional[kind]
        fields.append((name, kind, spec))
    return dataclasses.make_dataclass(f"{getattr(target, '__name__', 'Target')}Section", fields)


def _model_schema() -> type:
    """Every LocationModelConfig field, optional (None = the preset's value), plus `preset`."""
    hints = typing.get_type_hints(LocationModelConfig)
    fields = [("_target_", str, field(default="genloc.LocationModelConfig")), ("preset", str, field(default="tiny"))]
    for f in dataclasses.fields(LocationModelConfig):
        kind = hints[f.name]
        kind = Optional[Any] if typing.get_origin(kind) in (dict, list, tuple) or kind in (dict, list) else Optional[kind]
        fields.append((f.name, kind, field(default=None)))
    return dataclasses.make_dataclass("ModelSection", fields)


@dataclass
class TrainConfig:
    experiment: str = MISSING     # the name of the experiment file composed (load_config)
    run_name: str = "default"
    log_root: str = "runs"
    seed: int = 0
    resume: bool = True            # fit resumes from <run_dir>/checkpoints/last.ckpt when it exists
    init_from: Optional[str] = None  # checkpoint whose model weights start this stage (any module)
    allow_unfinished: bool = False  # init_from may name a checkpoint of a run that did not finish
    tf32: bool = True  # on CUDA: fp32 matmuls and convolutions in TF32 (no effect on a CPU)
    model: Any = None
    data: Any = None
    module: Any = None
    optim: Any = None
    trainer: Any = None
    callbacks: Any = None
    logger: Any = None


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        choices = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"no config file {path.relative_to(path.parents[1])}; choose one of {choices}")
    return OmegaConf.load(path)


def _split_overrides(overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    """Separate `group=name` choices (and `experiment=name`) from `key=value` overrides."""
    choices, dotlist = {}, []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (python train.py --help lists them)")
        key, value = item.split("=", 1)
        if key in GROUPS or key == "experiment":
            choices[key] = value
        else:
            dotlist.append(item)
    return choices, dotlist


def _target_of(raw: DictConfig, key: str) -> str:
    node = OmegaConf.select(raw, key)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"config key '{key}': no _target_ (the group file must name what it builds)")
    return node["_target_"]


def _schema(raw: DictConfig) -> DictConfig:
    """The typed skeleton of a composed config: each section typed by the constructor it names."""
    schema = OmegaConf.structured(TrainConfig)
    for group in GROUPS:
        if group not in raw or raw[group] is None:
            raise ConfigError(f"config group '{group}' is not chosen (add it to the defaults of train.yaml)")
    schema.model = OmegaConf.structured(_model_schema())
    for group in ("data", "module", "optim", "trainer", "logger"):
        schema[group] = OmegaConf.structured(section_schema(_target_of(raw, group)))
    callbacks = OmegaConf.create({})
    for name in raw.callbacks:
        callbacks[name] = OmegaConf.structured(section_schema(_target_of(raw, f"callbacks.{name}")))
    schema.callbacks = callbacks
    return schema


def load_config(overrides: list[str] | None = None, config_dir: Path = CONFIG_DIR) -> DictConfig:
    """Compose and validate the training config; raises ConfigError naming the offending key."""
    choices, dotlist = _split_overrides(list(overrides or []))
    base = _read_yaml(config_dir / "train.yaml")
    defaults = dict(base.pop("defaults", {}))
    _check_no_experiment_key(base, config_dir / "train.yaml")
    default_experiment = defaults.pop("experiment", None)
    name = choices.pop("experiment", default_experiment)
    experiment = OmegaConf.create()
    if name is not None:
        path = config_dir / "experiment" / f"{name}.yaml"
        experiment = _read_yaml(path)
        _check_no_experiment_key(experiment, path)
        defaults.update(experiment.pop("defaults", {}))
        experiment.experiment = name
    defaults.update(choices)
    unknown_groups = set(defaults) - set(GROUPS)
    if unknown_groups:
        raise ConfigError(f"unknown config group(s) {sorted(unknown_groups)}; groups are {list(GROUPS)}")
    groups = OmegaConf.create({g: _read_yaml(config_dir / g / f"{name}.yaml") for g, name in defaults.items() if name})
    try:
        raw = OmegaConf.merge(base, groups, experiment, OmegaConf.from_dotlist(dotlist))
        for name in [n for n, entry in (raw.get("callbacks") or {}).items() if entry is None]:
            del raw.callbacks[name]  # `callbacks.NAME=null` switches a callback off
        cfg = OmegaConf.merge(_schema(raw), raw)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"mandatory value(s) not set: {', '.join(missing)} (pass them as key=value)")
    _validate(cfg)
    return cfg


def usage(config_dir: Path = CONFIG_DIR) -> str:
    """`python train.py --help`: the groups with their choices (read from the folder), the top-level
    keys with their defaults, and how to override."""
    defaults = dict(_read_yaml(config_dir / "train.yaml").get("defaults", {}))
    lines = ["usage: python train.py [--print-config] [experiment=NAME] [GROUP=CHOICE ...] [KEY=VALUE ...]", "",
             "Composes configs/train.yaml, the chosen group files, the experiment's deltas, then KEY=VALUE",
             "overrides, and trains in <log_root>/<experiment>/<run_name> (resuming from its last.ckpt).", "",
             "  --print-config  print the composed, validated config (every key, with its value) and exit",
             "  -h, --help      show this help and exit", "",
             "config groups (configs/GROUP/CHOICE.yaml; * marks the default):"]
    for group in (*GROUPS, "experiment"):
        choices = sorted(p.stem for p in (config_dir / group).glob("*.yaml"))
        lines.append(f"  {group:<11} " + ", ".join(c + "*" * (c == defaults.get(group)) for c in choices))
    top = [OmegaConf.to_yaml({f.name: f.default}).strip().replace(": ", "=", 1)
           for f in dataclasses.fields(TrainConfig) if f.name not in (*GROUPS, "experiment")]
    lines += ["", "top-level keys: " + " ".join(top),
              "section keys (each constructor argument of the section's _target_), for example:",
              "  optim.lr=1e-4 trainer.max_steps=500 data.batch_size=32 model.num_bins=128",
              "  callbacks.sample_images=null (switches a callback off) logger=csv",
              "every key with its value: python train.py --print-config [overrides]"]
    return "\n".join(lines)


def _check_no_experiment_key(raw: DictConfig, path: Path) -> None:
    """The run folder is named by the experiment file composed, so no file may name it otherwise."""
    if "experiment" in raw:
        raise ConfigError(f"{path}: key 'experiment' is not allowed; an experiment is named by its file name "
                          "(configs/experiment/NAME.yaml, chosen as experiment=NAME): remove the key")


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    reason = str(err).splitlines()[0]
    return f"config key '{key}': {reason}" if key else reason


def _validate(cfg: DictConfig) -> None:
    """Checks that need more than types: value ranges and that the model config itself is valid."""
    for key, section in sections(cfg):
        target = locate(section._target_)
        try:
            hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
        except Exception:
            hints = {}
        for name, hint in hints.items():
            if name in section and _has_literal(hint) and not _allowed(hint, section[name]):
                raise ConfigError(f"config key '{key}.{name}': {section[name]!r} is not allowed; choose one of "
                                  f"{', '.join(_choices(hint))}")
        for path, rules in RANGES.items():
            if not _builds(target, path):
                continue
            for name, (ok, allowed) in rules.items():
                value = section.get(name)
                if name in section and not OmegaConf.is_missing(section, name) and not ok(value):
                    raise ConfigError(f"config key '{key}.{name}': {value!r} is out of range; allowed: {allowed}")
        _check_arguments(key, section, target)
    try:
        model_config(cfg)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config key 'model': {err}") from None


def sections(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(key, section) of every object a composed config builds with `instantiate` (the model aside)."""
    out = [(g, cfg[g]) for g in ("data", "module", "optim", "trainer", "logger")]
    return out + [(f"callbacks.{name}", section) for name, section in cfg.callbacks.items()]


def check_packages(cfg: DictConfig) -> None:
    """Every package the chosen targets need (`PACKAGES`) is installed; else one line naming the install."""
    for key, section in sections(cfg):
        target = locate(section._target_)
        for path, package in PACKAGES.items():
            if _builds(target, path) and importlib.util.find_spec(package) is None:
                raise ConfigError(f"config key '{key}': {section._target_} needs the package {package}, which is not "
                                  f"installed: pip install {package}, or choose another {key} (python train.py --help lists them)")


def _builds(target: Any, path: str) -> bool:
    obj = locate(path)
    return target is obj or (isinstance(target, type) and isinstance(obj, type) and issubclass(target, obj))


def _check_arguments(key: str, section: DictConfig, target: Any) -> None:
    """The constructor's own argument check (`ARGUMENT_CHECKS`) on the section's values."""
    for path, check_path in ARGUMENT_CHECKS.items():
        if not _builds(target, path):
            continue
        check = locate(check_path)
        names = inspect.signature(check).parameters
        values = OmegaConf.to_container(section, resolve=True)
        try:
            check(**{name: value for name, value in values.items() if name in names})
        except ArgumentError as err:
            raise ConfigError(f"config key '{key}.{err.name}': {err.value!r} is out of range; "
                              f"allowed: {err.allowed}") from None
        except ValueError as err:  # a combination of keys, e.g. label_smoothing with loss_type=ipo
            raise ConfigError(f"config key '{key}': {err}") from None


def model_config(cfg: DictConfig) -> LocationModelConfig:
    """The LocationModelConfig a config describes: the preset with the non-null keys overriding it."""
    section = OmegaConf.to_container(cfg.model, resolve=True)
    section.pop("_target_")
    preset = section.pop("preset")
    return LocationModelConfig.preset(preset, **{k: v for k, v in section.items() if v is not None})


def instantiate(section: DictConfig, **internal: Any) -> Any:
    """Build the object a config section names, with its keys plus train.py's internal arguments."""
    kwargs = OmegaConf.to_container(section, resolve=True)
    target = locate(kwargs.pop("_target_"))
    return target(**kwargs, **internal)
