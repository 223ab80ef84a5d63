"""Exact resume: a run SIGKILLed mid-epoch and restarted with the same command ends with the same
bits as an uninterrupted run (restart parity, as in Lightning's own loop tests), because the data
position within the epoch, the RNG draws and the text-feature cache do not depend on the restart."""
import signal

import pytest
import torch

from datamodules.pipeline import EpochLoader, ShardStream
from tests.helpers.runs import quick_overrides, run_fit

@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_continues_the_epoch_exactly(tiny_toy_data, num_workers):
    """After skipping n batches the stream yields exactly the uninterrupted epoch's batches n, n+1, ...
    (with workers too: worker w takes over the reader of batch n + w)."""
    stream = ShardStream(tiny_toy_data / "toy-pipe", "train", image_size=8, batch_size=3, train=True,
                         num_workers=num_workers, shuffle_buffer=5, seed=3)
    full = [b["key"] for b in EpochLoader(stream, epoch_fn=lambda: 1, num_workers=num_workers)]
    assert len(full) == len(stream) == 10
    for skip in (1, 4, 9):
        resumed = EpochLoader(stream, epoch_fn=lambda: 1, skip_fn=lambda: skip, num_workers=num_workers)
        assert [b["key"] for b in resumed] == full[skip:], skip
    assert [b["key"] for b in EpochLoader(stream, epoch_fn=lambda: 1, num_workers=num_workers)] == full


@pytest.mark.slow
def test_sigkill_mid_epoch_then_same_command_is_bit_exact(tiny_toy_data, tmp_path):
    """8 batches per epoch; run B is killed when step 6 starts (checkpoint of step 5 on disk), then
    rerun: it resumes at batch 5 of epoch 0 (an odd skip, 2 workers), crosses into epoch 1 and must
    end with every weight and optimiser tensor equal to run A's."""
    data = tiny_toy_data / "toy-pipe"
    common = quick_overrides(data, tmp_path, steps=10, every=5) + ["data.num_workers=2"]
    straight = run_fit(common + ["run_name=A"])
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = run_fit(common + ["run_name=B"], {"GENLOC_TEST_KILL_AT_STEP": "5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpt_dir = tmp_path / "toy_pretrain" / "B" / "checkpoints"
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["ShardDataModule"] == {"epoch": 0, "batches_done": 5}

    resumed = run_fit(common + ["run_name=B"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert '"resumed_from": "' in resumed.stdout and "last.ckpt" in resumed.stdout

    a = torch.load(tmp_path / "toy_pretrain" / "A" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 10
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differ = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differ, differ
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
