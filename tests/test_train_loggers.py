"""train.py's front door: `--help` lists the config groups and their choices, `--print-config` prints
the composed config, and the `logger` group chooses the logger without changing the run folder."""
import csv
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

import train as train_script
from configs.schema import CONFIG_DIR, GROUPS, load_config
from tests.helpers import ROOT
from tests.helpers.runs import tiny_run_overrides


def test_help_exits_zero_and_lists_every_group_with_its_choices():
    done = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    groups = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and list(p.glob("*.yaml")))
    assert set(groups) == {*GROUPS, "experiment"}  # every folder of configs/ is a group the help names
    for group in groups:
        row = next((line.split() for line in lines if line.split()[:1] == [group]), None)
        assert row is not None, f"--help does not list the group {group}"
        listed = {choice.strip(",*") for choice in row[1:]}
        assert listed == {p.stem for p in (CONFIG_DIR / group).glob("*.yaml")}, row
    assert "tensorboard*" in done.stdout and "key=value" in done.stdout.lower()


def test_print_config_prints_the_composed_config_and_builds_nothing(capsys, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("--print-config trained")

    monkeypatch.setattr(train_script, "train", no_training)
    assert train_script.main(["--print-config", "logger=csv", "optim.lr=0.25"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.logger._target_ == "callbacks.AppendingCSVLogger"
    assert printed == load_config(["logger=csv", "optim.lr=0.25"])
    assert train_script.main(["--print-config", "logger=nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "logger/nope.yaml" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("logger, package", [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_a_logger_without_its_package_is_one_line_before_training(logger, package, tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else find_spec(name, *a))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the missing package was reported")

    monkeypatch.setattr("lightning_modules.mle.MLEModule.__init__", no_model)
    assert load_config([f"logger={logger}"]).logger.save_dir  # composing and printing needs no package
    assert train_script.main([f"logger={logger}", f"log_root={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"pip install {package}" in err and "'logger'" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "toy_pretrain").exists()


def _files(run_dir):
    return {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}


def _run(data, log_root, steps, *extra):
    cfg = load_config(["experiment=toy_pretrain", *tiny_run_overrides(data, log_root, steps=steps), *extra])
    return train_script.train(cfg)


def test_csv_logger_writes_metrics_csv_in_the_same_run_folder_and_resumes(tiny_toy_data, tmp_path):
    """Image callbacks are on (every validation): with a logger that takes no images they draw nothing."""
    first = _run(tiny_toy_data / "toy-pipe", tmp_path, 2, "logger=csv")
    run = first["run_dir"]
    assert run == tmp_path / "toy_pretrain" / "default"
    files = _files(run)
    assert {"config.yaml", "metrics.json", "metrics.csv", "hparams.yaml", "checkpoints/last.ckpt"} <= files, files
    assert not any("tfevents" in name for name in files)
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["step"] for r in rows if r.get("train/loss")] == ["0", "1"]
    assert any(r.get("val/tpr@10") for r in rows)  # the TPR-FPR callback logs through any logger

    again = _run(tiny_toy_data / "toy-pipe", tmp_path, 3, "logger=csv")
    assert again["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    assert again["trainer"].global_step == 3
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["step"] for r in rows if r.get("train/loss")] == ["0", "1", "2"]  # appended, nothing lost


def test_default_logger_is_tensorboard_in_the_run_folder(tiny_toy_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert load_config([]).logger._target_ == "lightning.pytorch.loggers.TensorBoardLogger"
    result = _run(tiny_toy_data / "toy-pipe", tmp_path, 2)
    run = result["run_dir"]
    assert run == tmp_path / "toy_pretrain" / "default"
    files = _files(run)
    assert {"config.yaml", "metrics.json", "checkpoints/last.ckpt"} <= files
    assert any(name.startswith("events.out.tfevents") for name in files), files  # directly in the run folder
    assert "metrics.csv" not in files
    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    assert "train/loss" in events.Tags()["scalars"] and "val/samples" in events.Tags()["images"]
    again = _run(tiny_toy_data / "toy-pipe", tmp_path, 3, "logger=csv")  # a resume may change the logger
    assert again["resumed_from"] is not None and again["trainer"].global_step == 3
