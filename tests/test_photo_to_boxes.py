"""One photo -> boxes path: the genloc command (and insert.py), compare_insertion and the demo all sample through
`genloc.place`, so the model sees a photo exactly as it saw the training images (PIL bilinear to
its square input, `genloc.placement.model_input`) and the same seed gives the same boxes."""
import csv

import pytest
import torch

from genloc import demo
from tests.helpers import FIXTURES
from genloc.checkpoint import save_model_checkpoint
from genloc.hub import load_model
from genloc.images import to_rgb_image
from genloc.location_model import LocationModel
from genloc.placement import model_input, place
from scripts import compare_insertion

PHOTO = FIXTURES / "opa_sample/reconstructed/580029_background_reconstructed.png"  # 640x427, real


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    from genloc import GenLocModel, LocationModelConfig

    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = GenLocModel(LocationModelConfig.preset("tiny"))
    save_model_checkpoint(model, root / "tiny.ckpt")
    model.save_pretrained(root / "folder")
    return root


@pytest.fixture
def seen(monkeypatch):
    """The image tensors every `LocationModel.sample` call receives."""
    calls = []
    original = LocationModel.sample

    def recording(self, images, *args, **kwargs):
        calls.append(images.detach().clone())
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(LocationModel, "sample", recording)
    return calls


def _training_view(model, photo):
    return model_input(model, [to_rgb_image(photo)[0]])


def test_the_genloc_command_samples_through_place(model_files, seen, tmp_path):
    """`genloc place` (and `genloc insert` / insert.py, which share its code) sees the training view."""
    import json

    from genloc.cli import main

    assert main(["place", "--model", str(model_files / "tiny.ckpt"), "--image", str(PHOTO), "--category", "cat",
                 "--n", "5", "--region", "right", "--seed", "3", "--out", str(tmp_path / "out")]) == 0
    boxes = [b["box"] for b in json.loads((tmp_path / "out" / "boxes.jsonl").read_text())["boxes"]]
    model = load_model(model_files / "tiny.ckpt")
    assert torch.equal(seen[0], _training_view(model, PHOTO))
    assert boxes == place(model, PHOTO, "cat", n=5, region="right", seed=3).boxes.tolist()


@pytest.mark.parametrize("source", ["tiny.ckpt", "folder"])
def test_compare_insertion_samples_through_place_from_any_model_source(source, model_files, seen, tmp_path):
    """Was: its own resize (BICUBIC, unlike training's BILINEAR) and checkpoints only."""
    (tmp_path / "photo.png").write_bytes(PHOTO.read_bytes())
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "category"], ["photo.png", "airplane"]])
    args = compare_insertion.build_parser().parse_args(
        ["--images", str(tmp_path), "--model", str(model_files / source), "--out", str(tmp_path / "out"),
         "--methods", "x=sd:unused", "--seed", "7"])
    samples = compare_insertion.read_samples(tmp_path, "test")
    boxes = compare_insertion.genloc_boxes(args, samples)
    model = load_model(model_files / "tiny.ckpt")
    assert torch.equal(seen[0], _training_view(model, PHOTO))
    expected = place(model, PHOTO, "airplane", n=1, seed=compare_insertion.sample_seed(7, "photo")).boxes[0]
    assert boxes == {"photo": [float(v) for v in expected]}


def test_demo_samples_through_place(model_files, seen):
    model = load_model(model_files / "folder")
    placed = demo.place_boxes(demo.Backends(model=model), str(PHOTO), "cat", 3, 1.0, seed=4)
    assert torch.equal(seen[0], _training_view(model, PHOTO))
    drawn = place(model, PHOTO, "cat", n=demo.HEAT_DRAWS, seed=4)
    expected = sorted(zip(drawn.boxes[:3].double().tolist(), drawn.log_probs[:3].tolist()), key=lambda d: -d[1])
    assert [r["box"] for r in placed.records] == [box for box, _ in expected]
