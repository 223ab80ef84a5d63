"""Tiny training runs for tests: overrides that shrink any experiment to a few CPU steps, and
`tests/scripts/fit.py` run as a subprocess (resume, preemption and DDP tests read what it writes)."""
import json
import os
import subprocess
import sys

from tests.helpers import ROOT


def tiny_run_overrides(data_dir, log_root, steps: int = 1) -> list[str]:
    """Overrides that shrink any experiment to a CPU run of `steps` training steps on tiny data."""
    return [
        "model=tiny", "trainer=cpu", f"data.data_dir={data_dir}", f"log_root={log_root}",
        f"trainer.max_steps={steps}", "trainer.val_check_interval=1", "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "data.batch_size=4", "data.num_workers=0",
        "data.shuffle_buffer=8", "callbacks.tpr_fpr.num_samples=10", "callbacks.tpr_fpr.max_eval_samples=4",
        "callbacks.sample_images.num_images=2", "optim.warmup_steps=1",
    ]


FIT = str(ROOT / "tests" / "scripts" / "fit.py")


def quick_overrides(data_dir, log_root, steps: int, every: int) -> list[str]:
    """The tiny recipe with checkpoints (and one-batch validations) every `every` steps, no sampling callbacks."""
    return ["experiment=toy_pretrain"] + tiny_run_overrides(data_dir, log_root, steps=steps) + [
        f"trainer.val_check_interval={every}", "callbacks.tpr_fpr.every_n_val_epochs=0",
        "callbacks.sample_images.every_n_val_epochs=0"]


def run_fit(overrides, env_extra=None, timeout=240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, FIT, *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_ranks(out, n=2) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


def assert_same_steps(ranks, steps):
    """Same step and batch count on both ranks, full batches, different data (with uneven shards
    the rank with fewer samples walks its shards again, so the sets may overlap: tests/test_data_ddp.py
    checks disjointness on even shards)."""
    assert [(x["rank"], x["world"]) for x in ranks] == [(0, 2), (1, 2)]
    assert [x["global_step"] for x in ranks] == [steps, steps]
    assert [x["batches"] for x in ranks] == [steps, steps]
    assert all(len(batch) == 4 for x in ranks for batch in x["keys"])
    assert ranks[0]["keys"][0] != ranks[1]["keys"][0]
