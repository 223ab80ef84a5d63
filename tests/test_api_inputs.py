"""Inputs of `place`, `place_many` and `score` that used to pass silently or fail in numpy: boxes
that look normalised, ragged or missing box lists, classes outside the model's training data,
sub-pixel boxes on tiny images and an unbounded draw count -- each one line naming the argument,
or a note and a warning (docs/reliability.md)."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from genloc import GenLocModel, LocationModelConfig, place, place_many, score
from genloc.boxes import looks_normalised
from genloc.hub import load_model, model_card
from genloc.placement import MAX_DRAWS
from tests.test_place import PHOTOS


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GenLocModel(LocationModelConfig.preset("tiny")).eval()


def _photo() -> Image.Image:
    return Image.open(PHOTOS[1]).convert("RGB")  # 640 x 427


def test_normalised_looking_boxes_are_refused_by_score_with_the_reason(model):
    photo = _photo()
    with pytest.raises(ValueError, match=r"index \[0, 1\] lie within \[0, 1\] on the 640x427 image: they look "
                                         r"normalised; give pixel"):
        score(model, photo, "cup", [[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.9, 0.8]])
    with pytest.raises(ValueError, match=r"image 1: boxes at index \[0\] .*look normalised"):
        score(model, [photo, photo], "cup", [[[10, 10, 50, 50]], [[0.1, 0.2, 0.5, 0.6]]])
    # the same boxes in pixels score, and a tiny image (where [0, 1] is most of it) is not suspected
    ok = score(model, photo, "cup", [[64, 85.4, 320, 256.2]])
    assert torch.isfinite(ok.log_probs).all()
    assert torch.isfinite(score(model, photo.resize((2, 2)), "cup", [[0, 0, 1, 1]]).log_probs).all()


def test_score_and_evaluate_share_one_normalised_rule():
    boxes = np.array([[0.1, 0.2, 0.5, 0.6], [0.1, 0.2, 5, 6]])
    assert looks_normalised(boxes, (640, 427)).tolist() == [True, False]
    assert looks_normalised(boxes, (2, 640)).tolist() == [False, False]


@pytest.mark.parametrize("boxes, error, says", [
    ([[1, 2, 30, 40], [1, 2, 30]], ValueError, r"boxes must be \[k, 4\] .*got a ragged list \(rows of 3 and 4 numbers\)"),
    (None, TypeError, r"boxes must be \[k, 4\] .*got None"),
    ("10,10,50,50", TypeError, r"boxes must be \[k, 4\] .*got '10,10,50,50'"),
    ([["a", 1, 2, 3]], ValueError, r"boxes must be \[k, 4\] .*got entries that are not numbers"),
    ([[1, 2, 3, 4, 5]], ValueError, r"boxes must be \[k, 4\] .*got shape \(1, 5\)"),
])
def test_bad_box_lists_are_one_line_naming_boxes(model, boxes, error, says):
    with pytest.raises(error, match=says) as exc:
        score(model, _photo(), "cup", boxes)
    assert "inhomogeneous" not in str(exc.value) and "\n" not in str(exc.value)


def test_tiny_image_boxes_get_the_sub_pixel_note(model):
    with pytest.warns(UserWarning, match=r"boxes are under one pixel wide or high on the 1x1 image"):
        result = place(model, Image.new("RGB", (1, 1), (90, 120, 30)), "cup", n=4)
    assert any("under one pixel" in note for note in result.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a photo's boxes span many pixels: no note
        assert place(model, _photo(), "cup", n=4).notes == []


def test_draw_counts_have_an_upper_bound(model, monkeypatch):
    monkeypatch.setattr(model, "sample", lambda *a, **k: pytest.fail("the model sampled before the check"))
    with pytest.raises(ValueError, match=f"n must be at most {MAX_DRAWS} boxes per image, got 1000000000"):
        place(model, _photo(), "cup", n=10 ** 9)
    with pytest.raises(ValueError, match=f"candidates must be at most {MAX_DRAWS}"):
        place_many(model, _photo(), ["cup"], candidates=MAX_DRAWS + 1)


@pytest.fixture
def model_folder(tmp_path, model, monkeypatch):
    """A model folder whose card names a shard folder of classes car and person (docs: model folders)."""
    data = tmp_path / "data" / "shards"
    data.mkdir(parents=True)
    (data / "train.json").write_text(json.dumps({"categories": ["person", "car"]}))
    folder = tmp_path / "model"
    run = {"stages": [{"experiment": "toy_finetune", "objective": "MLE", "data": "data/shards", "steps": 2}]}
    model.save_pretrained(folder)
    (folder / "README.md").write_text(model_card(model.cfg, "model", run))
    monkeypatch.chdir(tmp_path)
    return folder


def test_a_class_the_model_never_saw_is_a_warning_naming_the_known_ones(model_folder):
    loaded = load_model(model_folder)
    assert loaded.training_classes == ["car", "person"]
    says = r"class 'dog' is not one the model was trained on \(car, person\)"
    with pytest.warns(UserWarning, match=says):
        result = place(loaded, _photo(), "dog", n=2)
    assert any("'dog'" in note for note in result.notes)
    with pytest.warns(UserWarning, match=says):
        scored = score(loaded, [_photo(), _photo()], ["car", "dog"], [[[10, 10, 50, 50]], [[10, 10, 50, 50]]])
    assert scored[0].notes == [] and any("'dog'" in note for note in scored[1].notes)
    with pytest.warns(UserWarning, match=says):
        group = place_many(loaded, _photo(), ["car", "dog"], candidates=20)
    assert any("'dog'" in note for note in group.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known classes: no note
        assert place(loaded, _photo(), "car", n=2).notes == []
