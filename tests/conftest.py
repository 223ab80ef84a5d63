"""Test-wide settings: offline hubs, and the repository root on the PYTHONPATH of every subprocess a
test starts (pytest itself gets it from pyproject's `pythonpath`), so scripts import the project."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(scope="session")
def tiny_toy_data(tmp_path_factory):
    """A few toy scenes in both flavours (2 shards per split): enough for one-step runs."""
    from datamodules.toy import write_toy_dataset

    root = tmp_path_factory.mktemp("toy")
    sizes = {"toy-pipe": {"train": 32, "val": 8}, "toy-opa": {"train": 32, "val": 8}}
    write_toy_dataset(root, seed=0, sizes=sizes, num_shards=2, progress=False)
    return root


def tiny_run_overrides(data_dir, log_root, steps: int = 1) -> list[str]:
    """Overrides that shrink any experiment to a CPU run of `steps` training steps on tiny data."""
    return [
        "model=tiny", "trainer=cpu", f"data.data_dir={data_dir}", f"log_root={log_root}",
        f"trainer.max_steps={steps}", "trainer.val_check_interval=1", "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "data.batch_size=4", "data.num_workers=0",
        "data.shuffle_buffer=8", "callbacks.tpr_fpr.num_samples=10", "callbacks.tpr_fpr.max_eval_samples=4",
        "callbacks.sample_images.num_images=2", "optim.warmup_steps=1",
    ]
