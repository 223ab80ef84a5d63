"""train.py end to end: every experiment config runs, bad configs fail early, resume continues."""
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train as train_script
from configs.schema import CONFIG_DIR, ConfigError, load_config
from tests.helpers.runs import tiny_run_overrides

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


@pytest.fixture(scope="session")
def tiny_mle_checkpoint(tiny_toy_data, tmp_path_factory):
    """A 2-step toy MLE run whose last.ckpt serves as init_from / DPO reference."""
    log_root = tmp_path_factory.mktemp("runs")
    cfg = load_config(["experiment=toy_pretrain"] + tiny_run_overrides(tiny_toy_data / "toy-pipe", log_root, steps=2))
    result = train_script.train(cfg)
    return result["run_dir"] / "checkpoints" / "last.ckpt"


def experiment_overrides(name, data_root, log_root, ckpt) -> list[str]:
    flavour = "toy-pipe" if "pretrain" in name else "toy-opa"
    if "plausibility" in name:  # the classifier: composites, no location model or its callbacks
        return [f"experiment={name}", f"data.data_dir={data_root / flavour}", f"log_root={log_root}",
                "trainer.max_steps=1", "trainer.val_check_interval=1", "trainer.limit_val_batches=1",
                "trainer.enable_progress_bar=false", "data.batch_size=4", "module.image_size=32",
                "optim.warmup_steps=1", "data.val_split=val", "data.num_workers=0"]
    overrides = [f"experiment={name}"] + tiny_run_overrides(data_root / flavour, log_root)
    cfg_text = (CONFIG_DIR / "experiment" / f"{name}.yaml").read_text()
    if "dpo" in cfg_text:
        overrides.append(f"module.reference={ckpt}")
    if "init_from" in cfg_text:
        overrides.append(f"init_from={ckpt}")
    return overrides


def test_experiment_list_is_complete():
    assert {"toy_pretrain", "toy_finetune", "pipe_pretrain", "opa_finetune"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_trains_and_validates_one_step(name, tiny_toy_data, tiny_mle_checkpoint, tmp_path):
    cfg = load_config(experiment_overrides(name, tiny_toy_data, tmp_path, tiny_mle_checkpoint))
    assert cfg.experiment == name
    result = train_script.train(cfg)
    assert result["trainer"].global_step == 1
    assert torch.isfinite(torch.tensor(result["metrics"]["train/loss"]))
    assert any(key.startswith("val/") for key in result["metrics"]), result["metrics"].keys()
    assert (result["run_dir"] / "checkpoints" / "last.ckpt").is_file()


def test_init_from_loads_previous_stage_weights(tiny_toy_data, tiny_mle_checkpoint, tmp_path):
    from genloc.checkpoint import model_state_dict, read_checkpoint

    cfg = load_config(["experiment=toy_finetune", f"init_from={tiny_mle_checkpoint}", "optim.lr=0.0"]
                      + tiny_run_overrides(tiny_toy_data / "toy-opa", tmp_path))
    result = train_script.train(cfg)
    expected = model_state_dict(read_checkpoint(tiny_mle_checkpoint))
    got = result["module"].model.state_dict()
    # lr 0: one step leaves the initial weights, which must be the previous stage's
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("override, needle", [
    ("optim.lrr=1", "optim.lrr"),
    ("trainer.max_steps=many", "trainer.max_steps"),
    ("data.data_dir=/nonexistent/shards", "data.data_dir"),
    ("model.num_bins=1", "num_bins"),
    ("model=nonexistent", "model/nonexistent.yaml"),
])
def test_bad_config_exits_nonzero_with_one_line_before_building(override, needle, tmp_path, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the config error was reported")

    monkeypatch.setattr("lightning_modules.mle.MLEModule.__init__", no_model)
    code = train_script.main([override, f"log_root={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert needle in err and len(err.splitlines()) == 1, err


def test_mandatory_values_are_reported_before_training():
    with pytest.raises(ConfigError, match=r"module\.beta.*module\.reference|module\.reference.*module\.beta"):
        load_config(["module=dpo"])


class _RecordStart(L.Callback):
    def on_train_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        steps = {int(s["step"]) for s in optimizer.state.values() if "step" in s}
        self.seen = {"global_step": trainer.global_step, "epoch": trainer.current_epoch, "adam_steps": steps,
                     "lr": optimizer.param_groups[0]["lr"],
                     "sched_step": trainer.lr_scheduler_configs[0].scheduler.last_epoch}


@pytest.mark.slow
def test_resume_continues_from_last_checkpoint(tiny_toy_data, tmp_path):
    base = ["experiment=toy_pretrain"] + tiny_run_overrides(tiny_toy_data / "toy-pipe", tmp_path, steps=3)
    first = train_script.train(load_config(base + ["optim.warmup_steps=10"]))
    assert first["resumed_from"] is None
    saved = torch.load(first["run_dir"] / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 3

    probe = _RecordStart()
    again = base[:-1] + ["trainer.max_steps=5", "optim.warmup_steps=10"]
    cfg = load_config(again)
    second = train_script.train(cfg, extra_callbacks=[probe])
    assert second["resumed_from"].endswith("last.ckpt")
    assert probe.seen["global_step"] == 3
    assert probe.seen["adam_steps"] == {3}
    assert probe.seen["sched_step"] == 3
    assert probe.seen["lr"] == pytest.approx(cfg.optim.lr * 4 / 10)  # warmup position of step 3 restored
    assert probe.seen["epoch"] == saved["epoch"]
    assert second["trainer"].global_step == 5

    run = second["run_dir"]
    assert (run / "config.yaml").is_file()
    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    assert "train/loss" in events.Tags()["scalars"]
    assert "val/samples" in events.Tags()["images"]
    names = {p.name for p in (run / "checkpoints").glob("*.ckpt")}
    assert {"last.ckpt", "step0000005.ckpt"} <= names, names


def test_last_checkpoint_holds_the_final_step(tiny_toy_data, tmp_path):
    overrides = tiny_run_overrides(tiny_toy_data / "toy-pipe", tmp_path, steps=3) + ["trainer.val_check_interval=2"]
    result = train_script.train(load_config(["experiment=toy_pretrain"] + overrides))
    saved = torch.load(result["run_dir"] / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 3


def test_resume_false_starts_over(tiny_toy_data, tmp_path):
    base = ["experiment=toy_pretrain"] + tiny_run_overrides(tiny_toy_data / "toy-pipe", tmp_path, steps=1)
    train_script.train(load_config(base))
    fresh = train_script.train(load_config(base + ["resume=false"]))
    assert fresh["resumed_from"] is None and fresh["trainer"].global_step == 1


def test_corrupt_last_checkpoint_is_an_error_not_a_restart(tiny_toy_data, tmp_path):
    from genloc.checkpoint import CheckpointError

    base = ["experiment=toy_pretrain"] + tiny_run_overrides(tiny_toy_data / "toy-pipe", tmp_path, steps=1)
    first = train_script.train(load_config(base))
    last = Path(first["run_dir"]) / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="last.ckpt"):
        train_script.train(load_config(base))


def test_train_leaves_the_callers_warning_filters_as_they_were(tiny_toy_data, tmp_path):
    import warnings

    before = list(warnings.filters)
    train_script.train(load_config(["experiment=toy_pretrain"] + tiny_run_overrides(tiny_toy_data / "toy-pipe", tmp_path)))
    assert warnings.filters == before  # the Lightning warnings it silences are silenced inside train() only


def test_stage_configs_find_the_previous_stage_under_log_root(tmp_path):
    """No experiment hard-codes `runs/`: init_from / module.reference follow log_root."""
    cfg = load_config(["experiment=opa_finetune", f"log_root={tmp_path}", "data.data_dir=x"])
    assert cfg.init_from == f"{tmp_path}/pipe_pretrain/default/checkpoints/last.ckpt"
    for path in (CONFIG_DIR / "experiment").glob("*.yaml"):
        assert "runs/" not in path.read_text(), path
