"""`python tests/scripts/fit.py key=value ...` (repository root on PYTHONPATH, as tests/conftest.py sets it):
train.py's `train()` plus test probes (subprocess tests).

Lightning's DDP launcher re-runs this same command for the other ranks, so every probe is set by
environment variables, which the child ranks inherit:
- GENLOC_TEST_OUT: folder for `rank{global_rank}.json` (steps, batches and sample keys this rank trained).
- GENLOC_TEST_KILL_AT_STEP=k: SIGKILL this process when step k+1 starts (checkpoint of step k on disk).
- GENLOC_TEST_SIGNAL_AT_STEP=k: send this process GENLOC_TEST_SIGNAL (default SIGUSR1) while step k
  runs (only on global rank GENLOC_TEST_SIGNAL_RANK when that is set).

The exit status is train.py's (`train.report`).
"""
import json
import os
import signal
import sys
from pathlib import Path

import lightning as L

import train as train_script
from configs.schema import load_config


class Probe(L.Callback):
    def __init__(self):
        self.keys, self.kill_at, self.signal_at = [], os.environ.get("GENLOC_TEST_KILL_AT_STEP"), os.environ.get(
            "GENLOC_TEST_SIGNAL_AT_STEP")
        self.signal = signal.Signals[os.environ.get("GENLOC_TEST_SIGNAL", "SIGUSR1")]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.kill_at is not None and trainer.global_step == int(self.kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        rank = os.environ.get("GENLOC_TEST_SIGNAL_RANK")
        if (self.signal_at is not None and trainer.global_step == int(self.signal_at) - 1
                and (rank is None or int(rank) == trainer.global_rank)):
            os.kill(os.getpid(), self.signal)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.keys.append(list(batch["key"]))

    def on_train_end(self, trainer, pl_module):
        out = os.environ.get("GENLOC_TEST_OUT")
        if out:
            Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(
                {"rank": trainer.global_rank, "world": trainer.world_size, "global_step": trainer.global_step,
                 "batches": len(self.keys), "keys": self.keys, "node_rank": trainer.node_rank}))


if __name__ == "__main__":
    from lightning_modules.run_files import report

    cfg = load_config(sys.argv[1:])
    result = train_script.train(cfg, extra_callbacks=[Probe()])
    status = report(result, sys.argv[1:], cfg)
    print(json.dumps({"resumed_from": result["resumed_from"], "preempted_at": result["preempted_at"],
                      "global_step": result["trainer"].global_step}))
    sys.exit(status)
