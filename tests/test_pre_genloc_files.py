"""Files written before the model package was named genloc keep loading (tests/fixtures/pre_genloc/,
made at commit d040808): a checkpoint whose pickle names ``models.config.LocationModelConfig``, a
model folder, and a run's config.yaml with ``_target_: models.LocationModelConfig`` (resume)."""
import gzip
import json
import shutil
import sys
import tarfile

import pytest
import torch
from omegaconf import OmegaConf

from configs.schema import load_config
from genloc import GenLocModel, LocationModelConfig, place
from genloc.checkpoint import current_module, read_checkpoint
from genloc.hub import VERSION_KEY, load_model
from lightning_modules.run_files import config_changes_on_resume
from tests.helpers import FIXTURES, ROOT

OLD = FIXTURES / "pre_genloc"
EXPECTED = json.loads((OLD / "expected.json").read_text())


@pytest.fixture(scope="module")
def old_files(tmp_path_factory):
    """(checkpoint, model folder), unpacked."""
    tmp = tmp_path_factory.mktemp("pre_genloc")
    with gzip.open(OLD / "model.ckpt.gz") as src, open(tmp / "model.ckpt", "wb") as dst:
        shutil.copyfileobj(src, dst)
    with tarfile.open(OLD / "model_folder.tar.gz") as tar:
        tar.extractall(tmp, filter="data")
    return tmp / "model.ckpt", tmp / "model_folder"


def _same_boxes_as_before(model):
    got = place(model, ROOT / EXPECTED["image"], EXPECTED["category"], n=EXPECTED["n"], seed=EXPECTED["seed"])
    assert got.boxes.tolist() == EXPECTED["boxes"]
    torch.testing.assert_close(got.log_probs, torch.tensor(EXPECTED["log_probs"]))


def test_old_module_paths_map_to_genloc_and_nothing_else():
    assert current_module("models.config") == "genloc.config"
    assert current_module("models") == "genloc"
    for path in ("lightning_modules.MLEModule", "modelsx.config", "my.models.config", "genloc.hub"):
        assert current_module(path) == path


def test_checkpoint_written_before_the_rename_loads_and_places_the_same_boxes(old_files):
    checkpoint, _ = old_files
    saved = read_checkpoint(checkpoint)["hyper_parameters"]["config_object"]  # pickled as models.config....
    assert type(saved) is LocationModelConfig and saved.gpt2_n_embd == 32
    _same_boxes_as_before(load_model(checkpoint))
    assert "models" not in sys.modules  # mapped, not aliased


def test_model_folder_written_before_the_rename_loads_and_places_the_same_boxes(old_files):
    _, folder = old_files
    assert VERSION_KEY not in json.loads((folder / "config.json").read_text())  # written before it was recorded
    _same_boxes_as_before(GenLocModel.from_pretrained(folder))


def test_resuming_a_run_started_before_the_rename_sees_no_config_change():
    saved = OmegaConf.load(OLD / "run_config.yaml")
    assert saved.model._target_ == "models.LocationModelConfig"
    same = ["experiment=toy_pretrain", "trainer.max_steps=40", "trainer.val_check_interval=20",
            "log_root=/tmp/parity_pkg_base"]  # the command that wrote it (log_root as run_config.yaml records it)
    assert config_changes_on_resume(saved, load_config(same)) == []
    assert config_changes_on_resume(saved, load_config([*same, "model.num_bins=32"])) == [
        "model.num_bins: run None vs now 32"]  # a real change is still refused
