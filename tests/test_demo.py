"""The demo page's plain functions (no browser, no Gradio): Place on a real photo, regions, the heat
map, Insert with a tiny random pipeline, the training classes of a model, and every error as one
message (bad image, unknown class, no model, no inpainter, out of memory)."""
import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from genloc import demo
from genloc import GenLocModel, LocationModelConfig
from genloc.boxes import pixel_rect
from genloc.hub import model_card
from genloc.testing import save_sd
from tests.helpers import FIXTURES, ROOT

PHOTO = FIXTURES / "opa_sample" / "eval_opascore_examples" / "composite_1.jpg"   # 640 x 427


@pytest.fixture(scope="module")
def backends():
    torch.manual_seed(0)
    model = GenLocModel(LocationModelConfig.preset("tiny", relative_extents=True)).eval()
    return demo.Backends(model=model, model_note="tiny", source="tiny")


@pytest.fixture(scope="module")
def inpainter(tmp_path_factory):
    from genloc.inpainters import load_backend

    return load_backend("sd", save_sd(tmp_path_factory.mktemp("sd") / "sd"), steps=2)


def _rect_mask(box, size):
    x0, y0, x1, y1 = pixel_rect(box, size)
    mask = np.zeros(size[::-1], bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_place_draws_n_boxes_per_category_inside_the_photo_and_nothing_outside_them(backends):
    placed = demo.place_boxes(backends, str(PHOTO), "person, car", n=5, temperature=1.0, seed=3)
    w, h = placed.image.size
    assert (w, h) == (640, 427) and placed.boxes_image.size == placed.heat_image.size == (w, h)
    assert [r["category"] for r in placed.records] == ["person"] * 5 + ["car"] * 5
    assert [r["index"] for r in placed.records] == list(range(10))
    for cat in ("person", "car"):
        probs = [r["log_prob"] for r in placed.records if r["category"] == cat]
        assert probs == sorted(probs, reverse=True)  # most probable first
    for r in placed.records:
        x1, y1, x2, y2 = r["box"]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert r["prob"] == pytest.approx(np.exp(r["log_prob"]))
    original = np.asarray(placed.image)
    changed = (np.asarray(placed.boxes_image) != original).any(-1)
    inside = np.logical_or.reduce([_rect_mask(r["box"], (w, h)) for r in placed.records])
    assert changed.any() and not changed[~inside].any()
    doc = json.loads(json.dumps(placed.doc))  # the JSON download holds the same boxes
    assert doc["boxes"] == placed.records and doc["n"] == 5 and doc["categories"] == ["person", "car"]
    again = demo.place_boxes(backends, str(PHOTO), "person, car", n=5, temperature=1.0, seed=3)
    assert again.records == placed.records  # seeded


def test_regions_from_words_pixels_and_two_clicks_hold_every_box(backends):
    placed = demo.place_boxes(backends, str(PHOTO), "person", 8, 1.0, "left", seed=0)
    assert all(r["box"][2] <= 320 + 1e-6 for r in placed.records)
    first, box = demo.corner_click(None, 400.0, 300.0)
    assert box is None and first == [400.0, 300.0]
    first, box = demo.corner_click(first, 100.0, 50.0)
    assert first is None and box == "100,50,400,300"
    placed = demo.place_boxes(backends, str(PHOTO), "person", 8, 1.0, demo.PIXEL_BOX, box, seed=0)
    for x1, y1, x2, y2 in (r["box"] for r in placed.records):
        assert 100 - 1e-6 <= x1 and 50 - 1e-6 <= y1 and x2 <= 400 + 1e-6 and y2 <= 300 + 1e-6
    assert placed.doc["region"] == [100.0, 50.0, 400.0, 300.0]


def test_a_typed_region_box_is_used_or_the_page_says_why_not(backends):
    """The Region menu left at "anywhere" does not drop a typed box; a word in the menu wins, and
    the notes the page shows say the typed box is not used and how to use it."""
    for choice in (demo.ANYWHERE, None):
        placed = demo.place_boxes(backends, str(PHOTO), "person", 8, 1.0, choice, " 100, 50, 400, 300 ", seed=0)
        assert placed.doc["region"] == [100.0, 50.0, 400.0, 300.0] and placed.notes == []
        for x1, y1, x2, y2 in (r["box"] for r in placed.records):
            assert 100 - 1e-6 <= x1 and 50 - 1e-6 <= y1 and x2 <= 400 + 1e-6 and y2 <= 300 + 1e-6
    placed = demo.place_boxes(backends, str(PHOTO), "person", 8, 1.0, "right", "100,50,400,300", seed=0)
    assert placed.doc["region"] == "right" and all(r["box"][0] >= 320 - 1e-6 for r in placed.records)
    assert placed.notes == ["The typed region box 100,50,400,300 is not used: Region is 'right'. Choose "
                            "'pixel box' to use the box, or clear it."]
    with pytest.raises(demo.DemoError, match="not x1,y1,x2,y2 pixels inside"):  # a typed box is checked, not dropped
        demo.place_boxes(backends, str(PHOTO), "person", 8, 1.0, demo.ANYWHERE, "100,50,4000,300")


def test_score_gives_the_models_probability_of_the_marked_box_and_its_rank_among_draws(backends):
    """Score: the log-probability `genloc.score` gives the box, per category; its percentile is the
    share of the model's own draws that are less likely, so the model's most likely draw ranks at the
    top and a box the model never draws near the bottom; the marked box is drawn, nothing else."""
    from genloc import place, score

    photo = Image.open(PHOTO).convert("RGB")
    draws = place(backends.model, photo, "person", n=demo.SCORE_DRAWS, seed=5)
    top = draws.boxes[draws.log_probs.argmax()].tolist()
    text = ",".join(f"{v:.0f}" for v in top)
    scored = demo.score_box(backends, str(PHOTO), "person, car", text, seed=5)
    box = [float(v) for v in text.split(",")]
    assert [r["category"] for r in scored.records] == ["person", "car"]
    for r in scored.records:
        expected = score(backends.model, photo, r["category"], [box])
        assert r["box"] == box and r["log_prob"] == pytest.approx(float(expected.log_probs[0]), abs=1e-5)  # float32
        assert r["log_density"] == pytest.approx(float(expected.log_densities[0]), abs=1e-5)
        assert r["prob"] == pytest.approx(np.exp(r["log_prob"]))
        assert 0.0 <= r["percentile"] <= 100.0
    person = demo.score_box(backends, str(PHOTO), "person", text, seed=5).records[0]  # the draws of `draws`
    below = float((draws.log_probs.double() < person["log_prob"] - 1e-5).double().mean())
    assert person["percentile"] >= 100 * below and person["percentile"] > 95  # the model's likeliest kind of box
    thin = demo.score_box(backends, str(PHOTO), "person", "0,0,4,420", seed=5).records[0]
    assert thin["log_prob"] < person["log_prob"] and thin["percentile"] < person["percentile"]
    changed = (np.asarray(scored.boxes_image) != np.asarray(photo)).any(-1)
    assert changed.any() and not changed[~_rect_mask(box, photo.size)].any()
    message = demo.score_message(scored)
    assert message.startswith("Score of the box") and "| person |" in message and "| car |" in message


@pytest.mark.parametrize("box, says", [("", "No box to score"), ("10,10,700,100", "not x1,y1,x2,y2 pixels inside"),
                                       ("10,10,20", "not x1,y1,x2,y2 pixels inside")])
def test_score_without_a_valid_box_is_one_message(backends, box, says):
    with pytest.raises(demo.DemoError, match=says):
        demo.score_box(backends, str(PHOTO), "person", box)


def test_heat_map_is_bright_where_the_centres_are_and_outlines_the_region():
    photo = Image.new("RGB", (200, 100), (128, 128, 128))
    centres = np.array([[150.0, 25.0]] * 50)
    heat = np.asarray(demo.heat_map(photo, centres), dtype=float).sum(-1)
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert abs(x - 150) <= 4 and abs(y - 25) <= 4 and heat.max() > 2 * heat[75, 50]
    assert heat[75, 50] == 3 * round(128 * 0.6)  # no centre near: the greyed photo, no colour
    outlined = np.asarray(demo.heat_map(photo, centres, (10, 20, 60, 80)))
    assert (outlined[50, 10] == 255).all() and (outlined[50, 35] == np.asarray(demo.heat_map(photo, centres))[50, 35]).all()


def test_insert_changes_only_the_chosen_box_and_all_inserts_every_box(backends, inpainter):
    with_inpainter = demo.Backends(model=backends.model, inpainter=inpainter, source="tiny")
    placed = demo.place_boxes(with_inpainter, str(PHOTO), "person, car", 2, 1.0, seed=1)
    original = np.asarray(placed.image)
    one = demo.insert_boxes(with_inpainter, placed, "1", seed=0)
    box = _rect_mask(placed.records[1]["box"], placed.image.size)
    after = np.asarray(one.after)
    assert (after[~box] == original[~box]).all() and (after[box] != original[box]).any()
    assert one.before is placed.image and one.doc["inserted"][0]["index"] == 1
    assert one.doc["inserted"][0]["insertion"]["prompt"] == "a photo of a person"
    every = demo.insert_boxes(with_inpainter, placed, demo.ALL, seed=0)
    assert [r["category"] for r in every.records] == ["person", "person", "car", "car"]
    union = np.logical_or.reduce([_rect_mask(r["box"], placed.image.size) for r in placed.records])
    assert (np.asarray(every.after)[~union] == original[~union]).all()


def test_errors_are_one_message_saying_what_to_do(backends, tmp_path):
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(demo.DemoError, match="Cannot read the photo photo.png.*Upload a PNG"):
        demo.place_boxes(backends, str(bad), "person", 5, 1.0)
    with pytest.raises(demo.DemoError, match="No photo"):
        demo.place_boxes(backends, None, "person", 5, 1.0)
    with pytest.raises(demo.DemoError, match="No category"):
        demo.place_boxes(backends, str(PHOTO), " , ", 5, 1.0)
    known = demo.Backends(model=backends.model, classes=["car", "person"], source="tiny")
    with pytest.raises(demo.DemoError, match="Unknown class 'zebra' for this model: it was trained on car, person"):
        demo.place_boxes(known, str(PHOTO), "car, zebra", 5, 1.0)
    with pytest.raises(demo.DemoError, match="not x1,y1,x2,y2 pixels inside the 640x427 photo"):
        demo.place_boxes(backends, str(PHOTO), "person", 5, 1.0, demo.PIXEL_BOX, "10,10,700,50")
    for n, seed, says in ((None, 0, "n must be a whole number"), (5, None, "Seed must be a whole number, got None"),
                          (5, 1.5, "Seed must be a whole number")):  # a cleared or fractional number box
        with pytest.raises(demo.DemoError, match=says):
            demo.place_boxes(backends, str(PHOTO), "person", n, 1.0, seed=seed)
    with pytest.raises(demo.DemoError, match="n must be between"):
        demo.place_boxes(backends, str(PHOTO), "person", 0, 1.0)
    with pytest.raises(demo.DemoError, match="Temperature must be positive"):
        demo.place_boxes(backends, str(PHOTO), "person", 5, 0.0)
    no_model = demo.Backends(model_note="No location model at `runs/toy_model`: run `make train`")
    with pytest.raises(demo.DemoError, match="make train"):
        demo.place_boxes(no_model, str(PHOTO), "person", 5, 1.0)
    placed = demo.place_boxes(backends, str(PHOTO), "person", 2, 1.0)
    with pytest.raises(demo.DemoError, match="press Place first"):
        demo.insert_boxes(demo.Backends(inpainter=object()), None, "0")
    for choice in ("7", "-1", None):
        with pytest.raises(demo.DemoError, match="not one of the placed boxes"):
            demo.insert_boxes(demo.Backends(inpainter=object()), placed, choice)


def test_error_messages_never_show_a_stack_trace(capsys):
    assert demo.error_message(demo.DemoError("No photo.")) == "**Error:** No photo."
    oom = demo.error_message(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert oom.startswith("**Error: out of memory.**") and "Lower n" in oom
    assert demo.error_message(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate: out of memory"))\
        .startswith("**Error: out of memory.**")
    try:
        {}["missing"]
    except KeyError as err:
        text = demo.error_message(err)
    assert text.startswith("**Error:** unexpected KeyError") and "Traceback" not in text and "\n" not in text
    assert "Traceback" in capsys.readouterr().err  # the details go to the server's log


def test_training_classes_come_from_the_data_the_card_names(tmp_path, monkeypatch):
    from genloc.hub import training_classes

    data = tmp_path / "data" / "toy-opa"
    data.mkdir(parents=True)
    (data / "train.json").write_text(json.dumps({"categories": ["person", "car"]}))
    (data / "val.json").write_text(json.dumps({"categories": ["bird"]}))
    folder = tmp_path / "model"
    folder.mkdir()
    cfg = LocationModelConfig.preset("tiny")
    run = {"stages": [{"experiment": "toy_finetune", "objective": "MLE", "data": "data/toy-opa", "steps": 2}]}
    (folder / "README.md").write_text(model_card(cfg, "model", run))
    monkeypatch.chdir(tmp_path)  # the card's data folders are relative to where training ran
    assert training_classes(str(folder)) == ["bird", "car", "person"]
    monkeypatch.chdir(ROOT)
    assert training_classes(str(folder)) is None  # the data is not on this machine: open vocabulary
    # relative to the repository root (the demo's root), from anywhere
    assert training_classes(str(folder), roots=(tmp_path,)) == ["bird", "car", "person"]
    assert training_classes("owner/name") is None
    checkpoint = tmp_path / "runs" / "toy_finetune" / "default" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")  # only its run's config.yaml is read
    (checkpoint.parent.parent / "config.yaml").write_text(f"data:\n  data_dir: {data}\n")
    assert training_classes(str(checkpoint)) == ["bird", "car", "person"]


def test_default_model_missing_is_a_note_and_a_bad_source_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "ROOT", tmp_path)  # a repository without runs/toy_model
    loaded = demo.load_backends(None, None, "sd", "cpu", 2)
    assert loaded.model is None and "make train" in loaded.model_note and "--model" in loaded.model_note
    with pytest.raises(demo.DemoError, match="Insert is off. Restart with `--inpainter DIR --backend"):
        demo.insert_boxes(loaded, None, "0")
    torch.manual_seed(0)
    GenLocModel(LocationModelConfig.preset("tiny")).save_pretrained(tmp_path / "model")
    with pytest.raises(demo.DemoError, match=r"--inpainter .*none: sd back-end: folder .* does not exist"):
        demo.load_backends(str(tmp_path / "model"), str(tmp_path / "none"), "sd", "cpu", 2)
    for args, expected in ((["--model", str(tmp_path / "none")], "--model"),
                           (["--steps", "0"], "argument --steps: must be a whole number >= 1")):
        with pytest.raises(SystemExit) as exit_:
            demo.main(args)
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and expected in err.splitlines()[-1] and "Traceback" not in err


def test_a_port_in_use_is_one_line_naming_port_before_the_model_loads(monkeypatch, capsys):
    monkeypatch.setattr(demo, "load_backends", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exit_:
            demo.main(["--port", str(port)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "Traceback" not in err and "GRADIO_SERVER_PORT" not in err
    assert f": error: --port {port}: cannot serve on 127.0.0.1:{port}" in err.splitlines()[-1]
    assert "choose another --port" in err
