"""scripts/toy_place_many.py (README's several-objects report) runs end to end on toy shards."""
import torch

from genloc.checkpoint import save_model_checkpoint
from genloc import LocationModel, LocationModelConfig
from scripts import toy_place_many


def test_report_counts_every_scene_and_place_many_never_overlaps(tiny_toy_data, tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.ckpt"
    save_model_checkpoint(LocationModel(LocationModelConfig.preset("tiny")).eval(), ckpt)
    code = toy_place_many.main(["--model", str(ckpt), "--data", str(tiny_toy_data / "toy-opa"), "--split", "val",
                                "--limit", "3", "--candidates", "20"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("3 scenes of")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:6]] for line in out.splitlines()
            if line.startswith("| place_many") or line.startswith("| independent")}
    assert set(rows) == {"place_many", "independent"}
    no_set = float(rows["place_many"][3])
    assert float(rows["place_many"][1]) == 1.0 - no_set  # every returned set is pairwise apart


def test_folder_without_an_oracle_is_a_clear_error(tmp_path, capsys):
    assert toy_place_many.main(["--model", str(tmp_path / "none"), "--data", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err
