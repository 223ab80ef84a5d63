"""The config builds the objects: every constructor argument is a key (or deliberately internal),
with the default it has in code, and the config's objects are what train.py builds."""
import dataclasses
import inspect

import pytest
from omegaconf import OmegaConf

from configs.schema import (CONFIG_DIR, INTERNAL, ConfigError, instantiate, internal_args, load_config, locate,
                            section_schema)

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
GROUP_FILES = sorted(p for p in CONFIG_DIR.glob("*/*.yaml") if p.parent.name != "experiment")


def _sections(cfg):
    """(key, section) of every object a composed config builds."""
    for group in ("data", "module", "optim", "trainer", "logger"):
        yield group, cfg[group]
    for name, section in cfg.callbacks.items():
        yield f"callbacks.{name}", section


def _all_configs():
    """Every experiment and every group file, each composed once."""
    configs = [load_config([f"experiment={name}", "data.data_dir=x", "module.reference=x"])
               if "dpo" in name else load_config([f"experiment={name}", "data.data_dir=x"]) for name in EXPERIMENTS]
    for path in GROUP_FILES:
        extra = {"dpo": ["module.beta=0.1", "module.reference=x"], "opa": ["data.data_dir=x"],
                 "pipe": ["data.data_dir=x"]}.get(path.stem, [])
        configs.append(load_config([f"{path.parent.name}={path.stem}"] + extra))
    return configs


CONFIGS = _all_configs()


def test_every_constructor_argument_is_a_key_or_deliberately_internal():
    checked = 0
    for cfg in CONFIGS:
        for key, section in _sections(cfg):
            target = locate(section._target_)
            internal = internal_args(target)
            for name, param in inspect.signature(target).parameters.items():
                if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                    continue
                assert name in section.keys() or name in internal, f"{key}: argument '{name}' of {section._target_} unreachable"
                assert not (name in section.keys() and name in internal), f"{key}.{name} is both a key and internal"
                checked += 1
    assert checked > 100  # trainer, callbacks, data, modules, optim of every config


def test_internal_list_is_short_explained_and_current():
    for path, args in INTERNAL.items():
        target = locate(path)
        params = inspect.signature(target).parameters
        for name, why in args.items():
            assert name in params, f"INTERNAL lists '{name}' but {path} has no such argument"
            assert len(why) > 10, f"INTERNAL {path}.{name} needs a reason"
    assert sum(len(v) for v in INTERNAL.values()) <= 20


def test_schema_defaults_are_the_constructor_defaults():
    for cfg in CONFIGS:
        for key, section in _sections(cfg):
            target = locate(section._target_)
            schema = OmegaConf.structured(section_schema(section._target_))
            fields = {f.name: f for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else {}
            for name, param in inspect.signature(target).parameters.items():
                if name not in schema.keys():
                    continue
                if name in fields and fields[name].default_factory is not dataclasses.MISSING:
                    expected = fields[name].default_factory()
                else:
                    expected = param.default
                got = OmegaConf.to_container(schema)[name] if name in schema else None
                if expected is inspect.Parameter.empty:
                    assert OmegaConf.is_missing(schema, name), f"{key}.{name}: mandatory in code, not in the schema"
                else:
                    expected = list(expected) if isinstance(expected, tuple) else expected
                    assert got == expected, f"{key}.{name}: schema default {got!r} != constructor default {expected!r}"


def test_group_files_do_not_restate_constructor_defaults():
    """A group file holds choices: a value equal to the code's default would be a second home for it."""
    for path in GROUP_FILES:
        raw = OmegaConf.load(path)
        entries = raw.items() if path.parent.name == "callbacks" else [(path.parent.name, raw)]
        for key, section in entries:
            if "_target_" not in section or section._target_ == "genloc.LocationModelConfig":
                continue
            schema = OmegaConf.structured(section_schema(section._target_))
            for name in section:
                if name == "_target_" or OmegaConf.is_interpolation(section, name) or OmegaConf.is_missing(section, name):
                    continue
                value = section[name]
                assert name in schema.keys(), f"{path.name}: {key}.{name} is not an argument of {section._target_}"
                if not OmegaConf.is_missing(schema, name):
                    assert schema[name] != value, f"{path.name}: {key}.{name}={value!r} restates the code default"


def test_new_constructor_argument_is_reachable_with_its_default(monkeypatch):
    from datamodules import ShardDataModule

    original = ShardDataModule.__init__

    def extended(self, *args, brand_new_option: int = 7, **kwargs):
        original(self, *args, **kwargs)

    signature = inspect.signature(original)
    new = inspect.Parameter("brand_new_option", inspect.Parameter.KEYWORD_ONLY, default=7, annotation=int)
    extended.__signature__ = signature.replace(parameters=[*signature.parameters.values(), new])
    monkeypatch.setattr(ShardDataModule, "__init__", extended)
    assert load_config([]).data.brand_new_option == 7
    assert load_config(["data.brand_new_option=3"]).data.brand_new_option == 3
    with pytest.raises(ConfigError, match="data.brand_new_option"):
        load_config(["data.brand_new_option=seven"])


def test_instantiate_builds_what_the_section_names():
    cfg = load_config(["optim.lr=0.5"])
    optim = instantiate(cfg.optim)
    assert type(optim).__name__ == "AdamWCosine" and optim.lr == 0.5 and optim.betas == [0.9, 0.95]


@pytest.mark.parametrize("override, needle", [
    ("data._target_=nowhere.Nothing", "nowhere.Nothing"),
    ("callbacks.tpr_fpr.num_samples=x", "callbacks.tpr_fpr.num_samples"),
    ("trainer.max_stepz=3", "trainer.max_stepz"),
    ("stage=dpo", "stage"),
])
def test_bad_keys_name_themselves(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config([override])


def test_callback_can_be_switched_off():
    cfg = load_config(["callbacks.inpainting=null"])
    assert "inpainting" not in cfg.callbacks and "tpr_fpr" in cfg.callbacks


def test_module_choice_sets_pairs_and_model_source():
    from lightning_modules import DPOModule, MLEModule

    assert locate(load_config([]).module._target_) is MLEModule
    assert locate(load_config(["experiment=toy_dpo"]).module._target_) is DPOModule
    assert DPOModule.trains_on_pairs and not MLEModule.trains_on_pairs


@pytest.mark.parametrize("override, ok", [("trainer.precision=bf17", False), ("trainer.precision=bf16-mixed", True),
                                          ("trainer.deterministic=maybe", False), ("trainer.deterministic=warn", True),
                                          ("callbacks.lr_monitor.logging_interval=week", False)])
def test_literal_choices_of_a_constructor_are_checked(override, ok):
    if ok:
        load_config([override])
    else:
        with pytest.raises(ConfigError, match=r"not allowed; choose one of"):
            load_config([override])
