"""Pre-emption: SIGUSR1 (what SLURM's `--signal=SIGUSR1@90` sends) -> last.ckpt at the next step
boundary -> `scontrol requeue $SLURM_JOB_ID` -> clean stop; the requeued command resumes there.
SLURM is faked: its environment variables and an `scontrol` on PATH that records its arguments."""
import json
import os

import pytest
import torch

from tests.helpers.runs import quick_overrides, run_fit


def fake_slurm(tmp_path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "genloc-test",
            "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
            "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}


@pytest.mark.slow
def test_sigusr1_checkpoints_requeues_and_the_requeued_run_resumes(tiny_toy_data, tmp_path):
    slurm = fake_slurm(tmp_path)
    # no periodic checkpoint before step 100: the only checkpoint is the pre-emption one
    overrides = quick_overrides(tiny_toy_data / "toy-pipe", tmp_path / "runs", steps=6, every=100)
    first = run_fit(overrides, {**slurm, "GENLOC_TEST_SIGNAL_AT_STEP": "3"})
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout.strip().splitlines()[-1])["preempted_at"] == 3
    assert "SLURM auto-requeueing enabled" not in first.stderr  # Lightning's in-handler save is off
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    run = tmp_path / "runs" / "toy_pretrain" / "default"
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 3 and saved["ShardDataModule"] == {"epoch": 0, "batches_done": 3}
    assert not list(run.glob("hpc_ckpt_*.ckpt")) and not list(run.rglob("*.partial"))

    requeued = run_fit(overrides, slurm)  # what SLURM runs again after the requeue: the same command
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    result = json.loads(requeued.stdout.strip().splitlines()[-1])
    assert result["resumed_from"].endswith("last.ckpt") and result["global_step"] == 6
    assert result["preempted_at"] is None
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]  # not requeued again


def test_crash_while_saving_keeps_the_previous_last_checkpoint(tiny_toy_data, tmp_path, monkeypatch):
    """Checkpoints are written to `.<name>.partial`, fsynced and renamed: dying halfway through
    writing step 2's last.ckpt leaves step 1's intact, and the same command resumes from it."""
    import genloc.checkpoint as checkpoint
    import genloc.files as files
    import train as train_script
    from configs.schema import load_config
    from tests.helpers.runs import tiny_run_overrides

    args = ["experiment=toy_pretrain"] + tiny_run_overrides(tiny_toy_data / "toy-pipe", tmp_path, steps=2) + [
        "callbacks.tpr_fpr.every_n_val_epochs=0", "callbacks.sample_images.every_n_val_epochs=0"]
    writes = []

    def dying_write(f, data):
        if ".ckpt." not in f.name:  # config.yaml, metrics.json: the same writer
            return f.write(data)
        writes.append(f.name)
        if len(writes) == 4:  # step 1: step0000001.ckpt, last.ckpt; step 2: step0000002.ckpt, last.ckpt
            f.write(bytes(data)[: len(data) // 2])
            raise OSError("simulated crash while writing")
        f.write(data)

    monkeypatch.setattr(files, "write_bytes", dying_write)
    with pytest.raises(OSError, match="simulated crash"):
        train_script.train(load_config(args))
    ckpts = tmp_path / "toy_pretrain" / "default" / "checkpoints"
    assert writes[-1].startswith(str(ckpts / ".last.ckpt.")) and writes[-1].endswith(".partial")
    assert checkpoint.read_checkpoint(ckpts / "last.ckpt")["global_step"] == 1  # the torn file never had the real name
    assert not list(ckpts.glob(".*.partial"))  # and the failed save removed it

    monkeypatch.setattr(files, "write_bytes", lambda f, data: f.write(data))
    again = train_script.train(load_config(args))
    assert again["resumed_from"].endswith("last.ckpt") and again["trainer"].global_step == 2
    assert checkpoint.read_checkpoint(ckpts / "last.ckpt")["global_step"] == 2
    assert not list(ckpts.glob(".*.partial"))


def _weights_and_optimiser(path):
    saved = torch.load(path, weights_only=False)
    return saved["global_step"], saved["state_dict"], saved["optimizer_states"][0]["state"]


@pytest.mark.slow
def test_sigterm_saves_exits_143_and_the_same_command_resumes_bit_exact(tiny_toy_data, tmp_path):
    """`docker stop` / `timeout` / Kubernetes: SIGTERM while step 3 runs (2 loader workers, no periodic
    checkpoint before step 100) -> last.ckpt of step 3, exit 143, one line with the resume command,
    status.json unfinished; the same command then ends with run A's bits."""
    common = quick_overrides(tiny_toy_data / "toy-pipe", tmp_path / "runs", steps=6, every=100) + ["data.num_workers=2"]
    straight = run_fit(common + ["run_name=A"])
    assert straight.returncode == 0, straight.stderr[-3000:]

    stopped = run_fit(common + ["run_name=B"], {"GENLOC_TEST_SIGNAL_AT_STEP": "3", "GENLOC_TEST_SIGNAL": "SIGTERM"})
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    run = tmp_path / "runs" / "toy_pretrain" / "B"
    line = [x for x in stopped.stderr.splitlines() if x.startswith("stopped by SIGTERM")]
    assert line == [f"stopped by SIGTERM at step 3 (not finished): {run / 'checkpoints' / 'last.ckpt'} saved; "
                    f"resume with: python train.py {' '.join(common + ['run_name=B'])}"], stopped.stderr[-3000:]
    assert json.loads((run / "status.json").read_text()) == {"finished": False, "global_step": 3,
                                                             "stopped_by": "SIGTERM"}
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 3 and saved["ShardDataModule"] == {"epoch": 0, "batches_done": 3}

    resumed = run_fit(common + ["run_name=B"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["resumed_from"].endswith("last.ckpt")
    assert json.loads((run / "status.json").read_text())["finished"] is True
    step_a, weights_a, optim_a = _weights_and_optimiser(tmp_path / "runs" / "toy_pretrain" / "A" / "checkpoints" / "last.ckpt")
    step_b, weights_b, optim_b = _weights_and_optimiser(run / "checkpoints" / "last.ckpt")
    assert step_a == step_b == 6 and weights_a.keys() == weights_b.keys()
    assert not [k for k in weights_a if not torch.equal(weights_a[k], weights_b[k])]
    for sa, sb in zip(optim_a.values(), optim_b.values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_sigint_stops_with_130_and_the_stopped_run_is_not_exported_or_started_from(tiny_toy_data, tmp_path, capsys):
    """Ctrl-C: a checkpoint at the step, exit 130; `scripts.export` and `init_from` refuse the
    unfinished run with one line naming the way out, and export it when told to."""
    import train as train_script
    from scripts import export

    common = quick_overrides(tiny_toy_data / "toy-pipe", tmp_path / "runs", steps=6, every=100)
    stopped = run_fit(common, {"GENLOC_TEST_SIGNAL_AT_STEP": "2", "GENLOC_TEST_SIGNAL": "SIGINT"})
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "stopped by SIGINT at step 2 (not finished)" in stopped.stderr
    last = tmp_path / "runs" / "toy_pretrain" / "default" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2

    assert export.main(["--model", str(last), "--out", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "did not finish (stopped by SIGINT at step 2" in err
    assert "--allow-unfinished" in err and not (tmp_path / "model").exists()
    assert export.main(["--model", str(last), "--out", str(tmp_path / "model"), "--allow-unfinished"]) == 0
    assert (tmp_path / "model" / "model.safetensors").is_file()
    capsys.readouterr()

    assert train_script.main(common + ["run_name=next", f"init_from={last}"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "did not finish" in err and "allow_unfinished=true" in err, err
