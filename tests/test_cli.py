"""The `genloc` command (genloc/cli/) on real photos with a tiny model folder and a tiny diffusers
pipeline: a folder of photos with two classes gives one boxes.jsonl line of disjoint boxes per photo
and a rerun skips them; several classes, manifests, globs, sampling filters, insert, score; a bad
argument is one line and exit code 2 before any model loads."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from genloc.cli import main
from genloc.inpainting import box_mask
from genloc.testing import save_tiny_model, save_tiny_sd_inpainter
from tests.helpers import FIXTURES

PHOTO = FIXTURES / "libcom" / "controllable_composition" / "background" / "000000049931.png"
PHOTOS = [PHOTO, FIXTURES / "libcom" / "controllable_composition" / "background" / "000000460450.png",
          FIXTURES / "opa_sample" / "reconstructed" / "580029_background_reconstructed.png"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return save_tiny_sd_inpainter(tmp_path_factory.mktemp("sd"))


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in PHOTOS:
        shutil.copy(photo, folder / photo.name)
    (folder / "notes.txt").write_text("not a photo: skipped by the folder expansion")
    return folder


def lines(out):
    return [json.loads(line) for line in (out / "boxes.jsonl").read_text().splitlines()]


def check_line(out, line, n):
    """Boxes inside the photo, an overlay of the photo's size that differs from the photo."""
    w, h = Image.open(line["image"]).size
    assert line["image_size"] == [w, h] and len(line["boxes"]) == n
    for rec in line["boxes"]:
        x1, y1, x2, y2 = rec["box"]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, rec
        assert rec["log_prob"] < 0
    overlay = Image.open(out / line["overlay"])
    assert overlay.size == (w, h)
    assert not np.array_equal(np.asarray(overlay.convert("RGB")), np.asarray(Image.open(line["image"]).convert("RGB")))


def test_a_folder_of_three_photos_with_two_classes_then_a_rerun_skips_all(model_dir, photos, tmp_path, capsys):
    """The issue's acceptance: one boxes.jsonl, three lines of two disjoint boxes, the overlays; a rerun skips all."""
    out = tmp_path / "out"
    argv = ["place", "--model", str(model_dir), "--image", str(photos), "--category", "person", "car", "--out", str(out)]
    assert main(argv) == 0
    done = lines(out)
    assert sorted(line["image"] for line in done) == sorted(str(photos / p.name) for p in PHOTOS)
    for line in done:
        check_line(out, line, 2)
        assert [b["category"] for b in line["boxes"]] == ["person", "car"]
        (x1, y1, x2, y2), (u1, v1, u2, v2) = (b["box"] for b in line["boxes"])
        assert min(x2, u2) <= max(x1, u1) or min(y2, v2) <= max(y1, v1), line  # disjoint
    assert sorted(p.name for p in out.iterdir()) == sorted(["boxes.jsonl", *(f"{p.stem}_overlay.png" for p in PHOTOS)])
    before = (out / "boxes.jsonl").read_bytes()
    capsys.readouterr()
    assert main(argv) == 0
    assert "3 of 3 photo(s) already in" in capsys.readouterr().out
    assert (out / "boxes.jsonl").read_bytes() == before


def test_a_crash_mid_line_is_not_counted_and_unlisted_files_go(model_dir, photos, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["place", "--model", str(model_dir), "--image", str(photos), "--category", "cup", "--n", "3",
            "--batch-size", "2", "--out", str(out)]
    assert main(argv) == 0
    first = lines(out)
    keep = (out / "boxes.jsonl").read_text().splitlines(keepends=True)
    (out / "boxes.jsonl").write_text(keep[0] + keep[1][:40])  # a crash while the second line was appended
    assert main(argv) == 0
    again = lines(out)
    assert len(again) == 3 and again[0] == first[0] and {line["image"] for line in again} == {line["image"] for line in first}
    # an edit-like file of a photo the file does not list (an unfinished insert) is removed, listed ones kept
    (out / "stray_edit_0.png").write_bytes(b"")
    capsys.readouterr()
    assert main(argv) == 0
    assert not (out / "stray_edit_0.png").exists() and "removed 1 file(s)" in capsys.readouterr().err
    assert all((out / line["overlay"]).is_file() for line in again)


def test_a_rerun_with_other_settings_is_refused(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["place", "--model", str(model_dir), "--image", str(PHOTO), "--category", "cup", "--out", str(out)]
    assert main(base) == 0
    before = (out / "boxes.jsonl").read_bytes()
    with pytest.raises(SystemExit) as exc:
        main([*base, "--n", "7"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and "written with other settings (n: 4 there, 7 now)" in err[-1], err
    assert (out / "boxes.jsonl").read_bytes() == before


def test_a_folder_of_the_former_layout_is_refused_and_kept(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "records.json").write_text("[]")
    (out / "edit_0.png").write_bytes(b"an earlier edit")
    with pytest.raises(SystemExit) as exc:
        main(["place", "--model", str(model_dir), "--image", str(PHOTO), "--category", "cup", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and "holds the files of an earlier layout (edit_0.png, records.json)" in err[-1], err
    assert sorted(p.name for p in out.iterdir()) == ["edit_0.png", "records.json"]


def test_manifest_glob_sampling_filters_and_region(model_dir, tmp_path):
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"image,categories\n{PHOTOS[0]},cup\n{PHOTOS[1]},person;dog\n")
    out = tmp_path / "out"
    assert main(["place", "--model", str(model_dir), "--image", str(manifest), str(PHOTOS[2].parent / "*.png"),
                 "--n", "5", "--region", "right", "--top-k", "3", "--top-p", "0.9", "--temperature", "0.7",
                 "--category", "bird", "--out", str(out)]) == 0
    done = {line["image"]: line for line in lines(out)}
    assert done[str(PHOTOS[0])]["categories"] == ["cup"] and len(done[str(PHOTOS[0])]["boxes"]) == 5
    assert [b["category"] for b in done[str(PHOTOS[1])]["boxes"]] == ["person", "dog"]
    assert done[str(PHOTOS[2])]["categories"] == ["bird"]
    for line in done.values():
        w = line["image_size"][0]
        assert all(b["box"][0] >= w / 2 - w / 64 for b in line["boxes"])  # right half, to within a bin
        assert line["options"]["top_k"] == 3 and line["options"]["top_p"] == 0.9


def test_top_k_one_gives_the_most_likely_box_every_time(model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["place", "--model", str(model_dir), "--image", str(PHOTO), "--category", "cup", "--n", "4",
                 "--top-k", "1", "--out", str(out)]) == 0
    boxes = [b["box"] for b in lines(out)[0]["boxes"]]
    assert all(b == boxes[0] for b in boxes)


def test_insert_draws_each_object_inside_its_box_only(model_dir, sd_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["insert", "--model", str(model_dir), "--image", str(PHOTO), "--category", "cup", "--n", "2",
                 "--inpainter", str(sd_dir), "--steps", "2", "--device", "cpu", "--out", str(out)]) == 0
    line, = lines(out)
    check_line(out, line, 2)
    before = np.asarray(Image.open(PHOTO).convert("RGB"))
    for rec in line["boxes"]:
        edit = np.asarray(Image.open(out / rec["edit"]))
        outside = ~box_mask(rec["mask_box"], (before.shape[1], before.shape[0]))
        assert np.array_equal(edit[outside], before[outside]) and not np.array_equal(edit, before)
        assert rec["edit"] == f"{PHOTO.stem}_edit_{rec['index']}.png" and rec["metrics"] == {}


def test_insert_several_objects_one_after_another(model_dir, sd_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["insert", "--model", str(model_dir), "--image", str(PHOTO), "--category", "cup", "plate",
                 "--inpainter", str(sd_dir), "--steps", "2", "--device", "cpu", "--out", str(out)]) == 0
    line, = lines(out)
    first, second = (np.asarray(Image.open(out / rec["edit"])) for rec in line["boxes"])
    outside = ~box_mask(line["boxes"][1]["mask_box"], (first.shape[1], first.shape[0]))
    assert np.array_equal(second[outside], first[outside])  # edit 1 is edit 0 with object 1 drawn in


def test_score_boxes_from_the_command_line_and_from_a_boxes_file(model_dir, tmp_path, capsys):
    from genloc import load_model, score

    out = tmp_path / "out"
    assert main(["place", "--model", str(model_dir), "--image", str(PHOTO), "--category", "cup", "--n", "2",
                 "--out", str(out)]) == 0
    placed, = lines(out)
    capsys.readouterr()
    assert main(["score", "--model", str(model_dir), "--boxes", str(out / "boxes.jsonl"),
                 "--out", str(tmp_path / "scores.jsonl")]) == 0
    scored, = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert [b["log_prob"] for b in scored["boxes"]] == pytest.approx([b["log_prob"] for b in placed["boxes"]], abs=1e-4)
    assert json.loads((tmp_path / "scores.jsonl").read_text()) == scored
    assert main(["score", "--model", str(model_dir), "--image", str(PHOTO), "--category", "cup",
                 "--box", "10,20,200,300", "--box", "300,100,500,400"]) == 0
    printed = json.loads(capsys.readouterr().out)
    direct = score(load_model(model_dir), str(PHOTO), "cup", [[10, 20, 200, 300], [300, 100, 500, 400]])
    assert [b["log_prob"] for b in printed["boxes"]] == pytest.approx(direct.log_probs.tolist())


def test_an_unreadable_photo_is_one_line_and_the_others_are_done(model_dir, photos, tmp_path, capsys):
    (photos / "broken.jpg").write_bytes(b"not a picture")
    out = tmp_path / "out"
    assert main(["place", "--model", str(model_dir), "--image", str(photos), "--category", "cup",
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"genloc place: --image {photos / 'broken.jpg'}: " in err and "1 photo(s) not done" in err
    assert len(lines(out)) == 3


def test_a_pixel_region_outside_one_photo_fails_that_photo_only(model_dir, photos, tmp_path, capsys):
    """The 640 px photo holds x up to 600; the two 512 px ones do not: they are the ones not done."""
    out = tmp_path / "out"
    assert main(["place", "--model", str(model_dir), "--image", str(photos), "--category", "cup",
                 "--region", "520,10,600,100", "--out", str(out)]) == 1
    done, = lines(out)
    assert Image.open(done["image"]).size[0] >= 600 and all(b["box"][0] >= 520 - 10 for b in done["boxes"])
    err = capsys.readouterr().err
    assert err.count("is not a pixel box x1,y1,x2,y2 inside the 512x512 image") == 2 and "2 photo(s) not done" in err


@pytest.mark.parametrize("argv, says", [
    (["place", "--n", "0"], "argument --n: must be a whole number in [1, 1000], got '0'"),
    (["place", "--n", "5000"], "argument --n: must be a whole number in [1, 1000]"),
    (["place", "--n", "2", "--category", "cup", "plate"], "--n applies to one category"),
    (["place", "--aspect-ratio", "0"], "argument --aspect-ratio: must be a number in (0, inf]"),
    (["place", "--top-p", "1.5"], "argument --top-p: must be a number in (0, 1]"),
    (["place", "--temperature", "0"], "argument --temperature: must be a number in (0, inf]"),
    (["place", "--size", "10"], "argument --size: '10' is not W,H"),
    (["place", "--size", "10,-5"], "argument --size: '10,-5': width and height must be > 0"),
    (["place", "--category", " "], "argument --category: must not be empty"),
    (["place", "--region", "middle"], "argument --region: 'middle' is neither one of"),
    (["place", "--image", "no/such.png"], "--image no/such.png: no such file, folder or pattern"),
    (["place", "--image", "nothing/*.png"], "--image nothing/*.png: the pattern matches no photo"),
    (["place", "--device", "gpu"], "--device gpu: "),
    (["place", "--model", "no/such/folder"], "--model no/such/folder not found: no such model folder"),
    (["insert", "--inpainter", "no-such-folder"], "--inpainter no-such-folder: no such folder, and not a Hub id"),
    (["insert", "--steps", "0", "--inpainter", "."], "argument --steps: must be a whole number >= 1"),
    (["insert"], "the following arguments are required: --inpainter"),
    (["score", "--box", "1,2,3"], "argument --box: '1,2,3' is not X1,Y1,X2,Y2"),
    (["score"], "give the boxes to score: --box X1,Y1,X2,Y2 (repeatable) or --boxes FILE"),
    (["score", "--box", "1,2,3,4", "--category", "cup", "plate"], "--box scores boxes of one photo for one class"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, says, model_dir, tmp_path, capsys, monkeypatch):
    import genloc.hub

    monkeypatch.setattr(genloc.hub, "load_model", lambda *a, **k: pytest.fail("the model loaded before the checks"))
    out = tmp_path / "out"
    base = {"--model": str(model_dir), "--image": str(PHOTO), "--category": "cup", "--out": str(out)}
    given = dict(zip(argv[1::2], argv[2::2]))
    args = [argv[0], *[x for k, v in base.items() if k not in given for x in (k, v)], *argv[1:]]
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1].startswith(f"genloc {argv[0]}: error: {says}"), err
    assert not out.exists()


def test_an_out_that_is_a_file_is_one_line_before_the_model_loads(model_dir, tmp_path, capsys, monkeypatch):
    import genloc.hub

    monkeypatch.setattr(genloc.hub, "load_model", lambda *a, **k: pytest.fail("the model loaded before --out"))
    out = tmp_path / "taken"
    out.write_text("a file")
    with pytest.raises(SystemExit) as exc:
        main(["place", "--model", str(model_dir), "--image", str(PHOTO), "--category", "cup", "--out", str(out)])
    assert exc.value.code == 2 and f"--out {out}: is an existing file" in capsys.readouterr().err


def test_progress_without_tqdm_is_a_line_per_step(monkeypatch, capsys):
    import sys

    from genloc.cli.progress import Progress

    monkeypatch.setitem(sys.modules, "tqdm", None)  # the base install: no tqdm
    bar = Progress(2, "place")
    bar.update()
    bar.update()
    bar.close()
    assert capsys.readouterr().err.splitlines() == ["place: 1/2", "place: 2/2"]


def test_inpainter_takes_a_cached_hub_id_and_says_how_to_get_one_that_is_not(model_dir, sd_dir, tmp_path, monkeypatch,
                                                                             capsys):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-sd"
    shutil.copytree(sd_dir, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["insert", "--model", str(model_dir), "--image", str(PHOTO), "--category", "cup", "--n", "1", "--steps", "2"]
    assert main([*argv, "--inpainter", "someone/tiny-sd", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / f"{PHOTO.stem}_edit_0.png").is_file()
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--inpainter", "someone/not-cached", "--out", str(tmp_path / "other")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and "'someone/not-cached' is not a local folder and not in the hub cache, and " \
        "HF_HUB_OFFLINE=1 forbids downloading it" in err[-1], err


def test_genloc_demo_starts_from_the_package_and_a_bad_model_is_one_line(tmp_path, capsys, monkeypatch):
    from genloc import demo

    served = {}
    monkeypatch.setattr(demo, "build_app", lambda backends, out_root: type("App", (), {
        "launch": lambda self, **kw: served.update(kw, model=backends.model)})())
    monkeypatch.chdir(tmp_path)  # no runs/toy_model here: the page opens with a note instead of a model
    assert main(["demo", "--port", "7999", "--device", "cpu"]) == 0
    assert served["server_port"] == 7999 and served["model"] is None
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--model", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1].startswith(f"genloc demo: error: --model {tmp_path / 'none'}"), err


def test_a_full_disk_mid_run_is_one_line_and_the_photos_done_stay_done(model_dir, photos, tmp_path, capsys,
                                                                       monkeypatch):
    import errno

    import genloc.files

    real, calls = genloc.files.write_bytes, []

    def full_after_one(f, data):
        calls.append(data)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)

    monkeypatch.setattr(genloc.files, "write_bytes", full_after_one)
    out = tmp_path / "out"
    argv = ["place", "--model", str(model_dir), "--image", str(photos), "--category", "cup", "--batch-size", "1",
            "--out", str(out)]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and "boxes.jsonl: could not append a line (the disk is full" in err[-1], err
    assert len(lines(out)) == 1
    monkeypatch.setattr(genloc.files, "write_bytes", real)
    assert main(argv) == 0 and len(lines(out)) == 3
