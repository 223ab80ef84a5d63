"""`genloc.testing` is public and light: importable on the base install (diffusers only inside the
pipeline builders), and what it builds loads through the ordinary code paths."""
import subprocess
import sys

import torch

from genloc import GenLocModel, place
from genloc.testing import save_tiny_model
from tests.helpers import ROOT

WITHOUT_DIFFUSERS = """
import sys
sys.modules["diffusers"] = None  # as on a base install: importing it raises ImportError
import genloc.testing as t
assert "diffusers" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
t.save_tiny_model(sys.argv[1])
try:
    t.save_sd(sys.argv[1] + "-sd")
except ImportError:
    print("NO DIFFUSERS")
"""


def test_genloc_testing_needs_no_diffusers_until_a_pipeline_is_built(tmp_path):
    done = subprocess.run([sys.executable, "-c", WITHOUT_DIFFUSERS, str(tmp_path / "m")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(ROOT),
                                                                             "HF_HUB_OFFLINE": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "NO DIFFUSERS"
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_save_tiny_model_writes_a_folder_that_loads_and_places(tmp_path):
    folder = save_tiny_model(tmp_path / "m", seed=3, num_bins=32)
    model = GenLocModel.from_pretrained(folder)
    assert model.cfg.num_bins == 32
    again = GenLocModel.from_pretrained(save_tiny_model(tmp_path / "n", seed=3, num_bins=32))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))  # seeded
    boxes = place(model, torch.rand(3, 60, 90), "cup", n=3, seed=0).boxes
    assert boxes.shape == (3, 4) and bool(((boxes[:, 2:] > boxes[:, :2]) & (boxes[:, 2:] <= torch.tensor([90, 60]))).all())
