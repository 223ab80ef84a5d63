"""Run bookkeeping never misleads (issue 15): resume from the newest checkpoint, one run per folder,
results and config.yaml never replaced by an empty or different run's, range-checked config values,
clear errors for init_from of another architecture and for a full disk; a run folder's name always
names what ran in it, and a run that starts over never shares its folder with the earlier one (issue 24)."""
import errno
import json
import os
import shutil
import threading

import pytest
import torch

from omegaconf import OmegaConf

import train as train_script
from configs.schema import CONFIG_DIR, ConfigError, load_config
from genloc import checkpoint, files
from lightning_modules.run_files import RunLock, newest_last_checkpoint
from tests.helpers.runs import tiny_run_overrides


def _args(data, log_root, steps=1, run_name="default", extra=()):
    return (["experiment=toy_pretrain", f"run_name={run_name}"] + tiny_run_overrides(data, log_root, steps=steps)
            + ["callbacks.tpr_fpr.every_n_val_epochs=0", "callbacks.sample_images.every_n_val_epochs=0"] + list(extra))


def _main(args, capsys):
    """Exit code and the error line (library warnings may share stderr; exactly one error line)."""
    code = train_script.main(args)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) <= 1, errors
    return code, "\n".join(errors)


def _step(path):
    return checkpoint.read_checkpoint(path)["global_step"]


@pytest.mark.slow
def test_moved_run_folder_resumes_from_its_newest_checkpoint(tiny_toy_data, tmp_path):
    data = tiny_toy_data / "toy-pipe"
    train_script.train(load_config(_args(data, tmp_path, steps=2, run_name="A")))
    shutil.move(tmp_path / "toy_pretrain" / "A", tmp_path / "toy_pretrain" / "B")
    for steps in (3, 4):
        result = train_script.train(load_config(_args(data, tmp_path, steps=steps, run_name="B")))
        assert result["trainer"].global_step == steps
    ckpts = tmp_path / "toy_pretrain" / "B" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("last*.ckpt")) == ["last.ckpt"]  # no stale last-v1 beside it
    assert _step(ckpts / "last.ckpt") == 4


def test_newest_last_checkpoint_follows_lightning_rule(tmp_path):
    for i, name in enumerate(["last.ckpt", "last-v1.ckpt", "last-v2.ckpt"]):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, ns=(10**18 + i, 10**18 + i))
    os.utime(tmp_path / "last.ckpt", ns=(2 * 10**18, 2 * 10**18))
    assert newest_last_checkpoint(tmp_path).name == "last.ckpt"
    assert newest_last_checkpoint(tmp_path / "none") is None


def test_finished_run_started_again_keeps_its_results(tiny_toy_data, tmp_path, capsys):
    args = _args(tiny_toy_data / "toy-pipe", tmp_path)
    assert _main(args, capsys)[0] == 0
    run = tmp_path / "toy_pretrain" / "default"
    before = json.loads((run / "metrics.json").read_text())
    assert before["trainer/global_step"] == 1 and "train/loss" in before
    assert _main(args, capsys)[0] == 0
    assert json.loads((run / "metrics.json").read_text()) == before


def test_a_run_folder_in_use_is_refused(tiny_toy_data, tmp_path, capsys):
    args = _args(tiny_toy_data / "toy-pipe", tmp_path)
    run = tmp_path / "toy_pretrain" / "default"
    with RunLock(run):
        code, err = _main(args, capsys)
    assert code == 2 and "in use by another run" in err and str(os.getpid()) in err and len(err.splitlines()) == 1
    assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()
    assert _main(args, capsys)[0] == 0  # released with the holder


def test_concurrent_saves_of_one_file_do_not_collide(tmp_path):
    errors = []

    def save(value):
        try:
            for _ in range(5):
                checkpoint.atomic_save({"value": torch.full((1000,), value)}, tmp_path / "last.ckpt")
        except Exception as err:  # noqa: BLE001 - the assertion below names it
            errors.append(err)

    threads = [threading.Thread(target=save, args=(v,)) for v in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(torch.load(tmp_path / "last.ckpt", weights_only=False)["value"].tolist())) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_resume_with_settings_it_would_ignore_is_refused(tiny_toy_data, tmp_path, capsys):
    data = tiny_toy_data / "toy-pipe"
    assert _main(_args(data, tmp_path), capsys)[0] == 0
    config = tmp_path / "toy_pretrain" / "default" / "config.yaml"
    saved = config.read_text()
    code, err = _main(_args(data, tmp_path, steps=2, extra=["optim.lr=0.5"]), capsys)
    assert code == 2 and "optim.lr" in err and "resume=false" in err and len(err.splitlines()) == 1, err
    assert config.read_text() == saved  # the record still describes the run
    assert _main(_args(data, tmp_path, steps=2), capsys)[0] == 0  # a longer run is a resume
    assert "max_steps: 2" in config.read_text()


@pytest.mark.parametrize("override, key", [
    ("data.batch_size=0", "data.batch_size"), ("optim.lr=-1", "optim.lr"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval"), ("data.num_workers=-1", "data.num_workers"),
    ("optim.betas=[0.9]", "optim.betas"), ("data.flip_prob=2", "data.flip_prob"),
    ("optim.warmup_steps=-5", "optim.warmup_steps"), ("trainer.max_steps=0", "trainer.max_steps"),
    ("callbacks.tpr_fpr.num_samples=0", "callbacks.tpr_fpr.num_samples"),
    ("callbacks.tpr_fpr.top_p=1.5", "callbacks.tpr_fpr.top_p"), ("data.eval_batch_size=0", "data.eval_batch_size"),
])
def test_out_of_range_values_are_one_line_errors_before_anything_is_built(override, key, tmp_path, capsys, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("something was built before the config error was reported")

    monkeypatch.setattr(train_script, "instantiate", no_build)
    code, err = _main([override, f"log_root={tmp_path}"], capsys)
    assert code == 2 and f"'{key}'" in err and "out of range" in err and len(err.splitlines()) == 1, err
    assert not tmp_path.joinpath("toy_pretrain").exists()


def test_init_from_another_architecture_is_a_one_line_error(tiny_toy_data, tmp_path, capsys):
    data = tiny_toy_data / "toy-pipe"
    assert _main(_args(data, tmp_path, run_name="small", extra=["model.num_bins=32"]), capsys)[0] == 0
    other = tmp_path / "toy_pretrain" / "small" / "checkpoints" / "last.ckpt"
    code, err = _main(_args(data, tmp_path, run_name="big", extra=[f"init_from={other}"]), capsys)
    assert code == 2 and "another architecture" in err and "num_bins" in err and len(err.splitlines()) == 1, err


def test_disk_full_while_saving_names_the_file_and_keeps_the_previous(tiny_toy_data, tmp_path, capsys, monkeypatch):
    data = tiny_toy_data / "toy-pipe"
    assert _main(_args(data, tmp_path), capsys)[0] == 0
    ckpts = tmp_path / "toy_pretrain" / "default" / "checkpoints"

    def full(f, data):
        if ".ckpt." not in f.name:  # config.yaml, metrics.json: the same writer
            return f.write(data)
        f.write(bytes(data)[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "write_bytes", full)
    code, err = _main(_args(data, tmp_path, steps=2), capsys)
    assert code == 2 and "disk full" in err and len(err.splitlines()) == 1, err
    assert _step(ckpts / "last.ckpt") == 1
    assert not list(ckpts.glob(".*partial"))


def test_leftover_of_a_killed_save_is_removed_at_the_next_start(tiny_toy_data, tmp_path, capsys):
    data = tiny_toy_data / "toy-pipe"
    assert _main(_args(data, tmp_path), capsys)[0] == 0
    ckpts = tmp_path / "toy_pretrain" / "default" / "checkpoints"
    (ckpts / ".last.ckpt.1234abcd.partial").write_bytes(b"torn")
    assert _main(_args(data, tmp_path, steps=2), capsys)[0] == 0
    assert not list(ckpts.glob(".*partial")) and _step(ckpts / "last.ckpt") == 2


@pytest.mark.parametrize("env, zero", [({}, True), ({"LOCAL_RANK": "1"}, False), ({"NODE_RANK": "1"}, False),
                                       ({"NODE_RANK": "0", "LOCAL_RANK": "0"}, True), ({"RANK": "3"}, False),
                                       ({"RANK": "0", "NODE_RANK": "1"}, True), ({"SLURM_PROCID": "2"}, False)])
def test_only_the_future_global_rank_zero_takes_the_run_lock(env, zero, monkeypatch):
    from lightning_modules.run_files import is_global_rank_zero

    for var in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert is_global_rank_zero() is zero


def test_plain_train_py_is_the_experiment_its_run_folder_names():
    plain, named = load_config([]), load_config(["experiment=toy_pretrain"])
    assert OmegaConf.to_container(plain) == OmegaConf.to_container(named)
    assert train_script.run_dir(plain) == train_script.run_dir(named)


def test_an_experiment_is_named_by_its_file_and_no_file_names_it_otherwise(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, configs, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    copy = configs / "experiment" / "faster.yaml"
    copy.write_text("optim:\n  lr: 3.0e-3\n")  # a copy of toy_pretrain with one thing changed
    cfg = load_config(["experiment=faster"], config_dir=configs)
    assert cfg.experiment == "faster" and cfg.optim.lr == 3.0e-3
    copy.write_text("experiment: toy_pretrain\noptim:\n  lr: 3.0e-3\n")
    with pytest.raises(ConfigError, match=r"faster\.yaml: key 'experiment' is not allowed"):
        load_config(["experiment=faster"], config_dir=configs)


def test_starting_over_moves_the_earlier_run_aside(tiny_toy_data, tmp_path, capsys, caplog):
    data = tiny_toy_data / "toy-pipe"
    run = tmp_path / "toy_pretrain" / "default"

    def events(folder):
        return list(folder.glob("events.out.tfevents.*"))

    assert _main(_args(data, tmp_path), capsys)[0] == 0
    first = {p.relative_to(run) for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert _main(_args(data, tmp_path, extra=["resume=false", "optim.lr=0.5"]), capsys)[0] == 0
    old = tmp_path / "toy_pretrain" / "default.old-1"
    assert {p.relative_to(old) for p in old.rglob("*") if p.is_file()} == first  # kept whole, lock excepted
    assert "lr: 0.5" not in (old / "config.yaml").read_text() and "lr: 0.5" in (run / "config.yaml").read_text()
    assert len(events(run)) == 1 and len(events(old)) == 1  # TensorBoard: two runs, one curve each
    assert any(str(old) in r.getMessage() for r in caplog.records if r.levelname == "WARNING")

    shutil.rmtree(run / "checkpoints")  # killed before its first checkpoint: nothing to resume
    assert _main(_args(data, tmp_path, extra=["optim.lr=0.5"]), capsys)[0] == 0
    assert (tmp_path / "toy_pretrain" / "default.old-2" / "config.yaml").is_file()
    assert len(events(run)) == 1 and (run / "checkpoints" / "last.ckpt").is_file()
