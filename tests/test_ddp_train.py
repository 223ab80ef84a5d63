"""train.py under DDP on the CPU (gloo), as subprocesses (Lightning's launcher re-runs the command
for the other ranks): MLE then DPO with uneven shards on two ranks, and a simulated 2-node run (two
launches on 127.0.0.1 with NODE_RANK 0/1, the way torchrun or a scheduler starts nodes). Every
subprocess has a timeout, so a hang fails the test instead of blocking CI."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT
from tests.helpers.runs import FIT, assert_same_steps, quick_overrides, read_ranks, run_fit


@pytest.fixture(scope="module")
def uneven_toy(tmp_path_factory):
    """26 training samples in 3 shards (9, 9, 8): 26 // (2 ranks x 4) = 3 batches per rank and epoch."""
    from datamodules.toy import write_toy_split

    root = tmp_path_factory.mktemp("uneven")
    for flavour in ("toy-pipe", "toy-opa"):
        write_toy_split(root / flavour, flavour, "train", 26, seed=0, num_shards=3, progress=False)
        write_toy_split(root / flavour, flavour, "val", 8, seed=1, num_shards=2, progress=False)
    return root


@pytest.mark.slow
def test_mle_then_dpo_on_two_ranks_with_uneven_shards(uneven_toy, tmp_path):
    out = tmp_path / "mle"
    out.mkdir()
    mle = run_fit(quick_overrides(uneven_toy / "toy-pipe", tmp_path / "runs", steps=4, every=2)
                  + ["trainer=ddp_cpu"], {"GENLOC_TEST_OUT": str(out)}, timeout=420)
    assert mle.returncode == 0, mle.stderr[-3000:]
    assert_same_steps(read_ranks(out), 4)  # 4 steps cross the 3-batch epoch boundary
    reference = tmp_path / "runs" / "toy_pretrain" / "default" / "checkpoints" / "last.ckpt"
    assert torch.load(reference, weights_only=False)["global_step"] == 4

    out = tmp_path / "dpo"
    out.mkdir()
    dpo_args = quick_overrides(uneven_toy / "toy-opa", tmp_path / "runs", steps=4, every=2)
    dpo_args = [a for a in dpo_args if not a.startswith("experiment=")]
    dpo = run_fit(["experiment=toy_dpo", *dpo_args, "trainer=ddp_cpu", f"module.reference={reference}"],
                  {"GENLOC_TEST_OUT": str(out)}, timeout=420)
    assert dpo.returncode == 0, dpo.stderr[-3000:]
    assert_same_steps(read_ranks(out), 4)
    assert (tmp_path / "runs" / "toy_dpo" / "default" / "checkpoints" / "last.ckpt").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("signame, code", [("SIGUSR1", 0), ("SIGTERM", 143)])
def test_two_nodes_on_localhost_train_checkpoint_and_stop_together(uneven_toy, tmp_path, signame, code):
    """Node 0 and node 1 (one process each) form one gloo group through MASTER_ADDR/PORT; a SIGUSR1
    (pre-emption) or a SIGTERM reaching only node 0 during step 3 still stops both at step 3 with one
    checkpoint, and both exit alike (SIGTERM: 143)."""
    args = quick_overrides(uneven_toy / "toy-pipe", tmp_path / "runs", steps=6, every=2) + [
        "trainer=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "GENLOC_TEST_OUT": str(tmp_path), "GENLOC_TEST_SIGNAL_AT_STEP": "3",
           "GENLOC_TEST_SIGNAL_RANK": "0", "GENLOC_TEST_SIGNAL": signame}
    nodes = [subprocess.Popen([sys.executable, FIT, *args], cwd=ROOT, env={**env, "NODE_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=420) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == code, stderr[-3000:]
        assert json.loads(stdout.strip().splitlines()[-1])["preempted_at"] == 3
    ranks = read_ranks(tmp_path)
    assert [x["node_rank"] for x in ranks] == [0, 1]
    assert_same_steps(ranks, 3)
    ckpts = tmp_path / "runs" / "toy_pretrain" / "default" / "checkpoints"
    assert {p.name for p in ckpts.glob("*.ckpt")} == {"step0000002.ckpt", "last.ckpt"}
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 3
