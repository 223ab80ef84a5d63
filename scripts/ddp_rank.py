"""One rank of `make smoke-gpu`'s DDP part (scripts/smoke_gpu.py): train.py's `train()` with the given
overrides. With ``GENLOC_SMOKE_PREEMPT_AT=k`` global rank 0 sends itself SIGUSR1 (as SLURM does before a
job's time runs out) while step k runs, so every rank saves last.ckpt at step k and stops; the same
command then resumes the run. Prints one JSON line: the global step, the world size, where it resumed
from and the step it was pre-empted at.

    GENLOC_SMOKE_PREEMPT_AT=2 NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python -m scripts.ddp_rank key=value ...
"""
from __future__ import annotations

import json
import os
import signal
import sys

import lightning as L

import train as train_script
from configs.schema import load_config

PREEMPT_AT = "GENLOC_SMOKE_PREEMPT_AT"


class PreemptAt(L.Callback):
    """SIGUSR1 to this process on global rank 0 while step ``step`` runs."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 0 and trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGUSR1)


def main(argv: list[str]) -> int:
    at = os.environ.get(PREEMPT_AT)
    result = train_script.train(load_config(argv), extra_callbacks=[PreemptAt(int(at))] if at else [])
    trainer = result["trainer"]
    print(json.dumps({"global_step": trainer.global_step, "world_size": trainer.world_size,
                      "resumed_from": result["resumed_from"], "preempted_at": result["preempted_at"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
