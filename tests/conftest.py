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


@pytest.fixture(scope="session")
def tiny_toy_data(tmp_path_factory):
    """A few toy scenes in both flavours (2 shards per split): enough for one-step runs."""
    from datamodules.toy import write_toy_dataset

    root = tmp_path_factory.mktemp("toy")
    sizes = {"toy-pipe": {"train": 32, "val": 8}, "toy-opa": {"train": 32, "val": 8}}
    write_toy_dataset(root, seed=0, sizes=sizes, num_shards=2, progress=False)
    return root
