"""Your own data in (docs/data.md#your-own-data): the manifest converter and the COCO-style converter
(--remove-objects with a tiny random inpainter, --keep-objects), on real photos of tests/fixtures."""
import io
import json
import tarfile
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datamodules.own_data as own
from datamodules.convert import ConversionError
from datamodules.shard_reader import iter_annotations, read_split_info
from datamodules.verify import main as verify_main
from genloc.inpainting import grow_mask

FIXTURES = Path(__file__).parent / "fixtures"
MANIFEST = FIXTURES / "own_data" / "manifest.jsonl"
INSTANCES = FIXTURES / "own_data" / "instances_fixture.json"


def samples(folder, split) -> dict:
    return {s["key"]: s for s in iter_annotations(folder, split)}


def stored_image(folder, split, key) -> np.ndarray:
    for tar_path in sorted(Path(folder).glob(f"{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            for name in tar.getnames():
                if name.split(".", 1)[0] == key and not name.endswith(".json"):
                    return np.asarray(Image.open(io.BytesIO(tar.extractfile(name).read())).convert("RGB"))
    raise KeyError(key)


def shard_bytes(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.suffix in (".tar", ".json")}


# ---------------------------------------------------------------------------------------------
# manifest

def test_manifest_of_real_photos_converts_with_its_boxes(tmp_path):
    report = own.convert_manifest(MANIFEST, tmp_path, FIXTURES, progress=False)
    assert (report["train"].written, report["val"].written) == (2, 1)
    assert sum(report["train"].dropped.values()) == 0
    assert read_split_info(tmp_path, "train")["mode"] == own.MANIFEST
    rows = [json.loads(line) for line in MANIFEST.read_text().splitlines()]
    got = {s["meta"]["row"]: s for split in ("train", "val") for s in samples(tmp_path, split).values()}
    for number, row in enumerate(rows, 1):
        assert got[number]["category"] == row["category"]
        assert got[number]["positives"] == [[float(v) for v in b] for b in row["positives"]]
        assert got[number]["negatives"] == [[float(v) for v in b] for b in row["negatives"]]
    assert verify_main([str(tmp_path)]) == 0


@pytest.mark.parametrize("box_format, convert", [
    ("xywh", lambda b: [b[0], b[1], b[2] - b[0], b[3] - b[1]]),
    ("cxcywh", lambda b: [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]]),
])
def test_csv_manifest_in_other_box_formats_gives_the_same_boxes(tmp_path, box_format, convert):
    import csv

    rows = [json.loads(line) for line in MANIFEST.read_text().splitlines()]
    with open(tmp_path / "rows.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "category", "positives", "negatives", "split"])
        w.writeheader()
        for r in rows:
            w.writerow({"image": r["image"], "category": r["category"], "split": r.get("split", ""),
                        "positives": json.dumps([convert(b) for b in r["positives"]]),
                        "negatives": json.dumps([convert(b) for b in r["negatives"]])})
    own.convert_manifest(MANIFEST, tmp_path / "jsonl", FIXTURES, progress=False)
    own.convert_manifest(tmp_path / "rows.csv", tmp_path / "csv", FIXTURES, box_format=box_format, progress=False)
    for split in ("train", "val"):
        a, b = samples(tmp_path / "jsonl", split), samples(tmp_path / "csv", split)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key]["positives"], b[key]["positives"])
            np.testing.assert_allclose(a[key]["negatives"], b[key]["negatives"])


def test_every_bad_manifest_row_is_one_line_naming_file_row_and_field(tmp_path):
    good = json.loads(MANIFEST.read_text().splitlines()[0])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    lines = [
        json.dumps(good),                                                        # 1 kept
        "{not json",                                                             # 2
        json.dumps([1, 2]),                                                      # 3 not an object
        json.dumps({**good, "positive": [[1, 2, 3, 4]]}),                        # 4 unknown field (typo)
        json.dumps({**good, "image": ""}),                                       # 5
        json.dumps({**good, "image": "x.png", "category": " "}),                 # 6
        json.dumps({**good, "image": "y.png", "split": "a/b"}),                  # 7
        json.dumps({**good, "image": "z.png", "positives": [[1, 2, 3]]}),        # 8
        json.dumps({**good, "image": "w.png", "positives": [], "negatives": []}),  # 9
        json.dumps(good),                                                        # 10 repeats row 1
        json.dumps({**good, "image": "missing.png"}),                            # 11
        json.dumps({**good, "image": "broken.png"}),                             # 12
        json.dumps({**good, "category": "dog", "positives": [[300, 10, 200, 50], [20, 330, 170, 470]]}),  # 13
    ]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    import shutil

    shutil.copytree(FIXTURES / "libcom", tmp_path / "libcom")
    report = own.convert_manifest(tmp_path / "rows.jsonl", tmp_path / "out", tmp_path, progress=False)
    text = report.summary().splitlines()
    expected = {2: "'-'", 3: "'-'", 4: "'positive'", 5: "'image'", 6: "'category'", 7: "'split'", 8: "'positives'",
                9: "'positives'", 10: "'image'", 11: "'image'", 12: "'image'", 13: "'positives' box 0"}
    for row, field in expected.items():
        hits = [t for t in text if t.startswith(f"rows.jsonl row {row}, field {field}")]
        assert len(hits) == 1, (row, field, text)
    assert report["train"].written == 2  # rows 1 and 13 (its bad box dropped, its good one kept)
    assert sum(report["train"].dropped.values()) == 11
    assert report["train"].notes["box: empty (needs x1 < x2 and y1 < y2)"] == 1
    assert samples(tmp_path / "out", "train").keys() == {f"own-{own.safe_key(good['image'])}-cat",
                                                         f"own-{own.safe_key(good['image'])}-dog"}


def test_manifest_file_errors_are_one_line_and_exit_2(tmp_path, capsys):
    from scripts.convert_manifest import main

    (tmp_path / "rows.csv").write_text("img,category\nx.png,cup\n")
    with pytest.raises(SystemExit) as e:
        main(["--manifest", str(tmp_path / "rows.csv"), "--images", str(FIXTURES), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "rows.csv" in err and "'image'" in err and not (tmp_path / "o" / "train.json").exists()
    with pytest.raises(ConversionError, match="rows.txt: expected a .jsonl or .csv"):
        (tmp_path / "rows.txt").write_text("x")
        own.convert_manifest(tmp_path / "rows.txt", tmp_path / "o", FIXTURES)


def test_manifest_output_is_the_same_for_any_number_of_workers(tmp_path):
    own.convert_manifest(MANIFEST, tmp_path / "w1", FIXTURES, progress=False, workers=1)
    own.convert_manifest(MANIFEST, tmp_path / "w2", FIXTURES, progress=False, workers=2)
    assert shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w2")


def test_interrupted_manifest_conversion_resumes_with_the_finished_shards(tmp_path, monkeypatch):
    own.convert_manifest(MANIFEST, tmp_path / "whole", FIXTURES, progress=False)
    real = own._write_manifest_shard
    calls, interrupt = [], [True]

    def interrupted(build, split, index, payload):
        calls.append((split, index))
        if len(calls) == 2 and interrupt:
            interrupt.clear()
            raise KeyboardInterrupt
        return real(build, split, index, payload)

    monkeypatch.setattr(own, "_write_manifest_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        own.convert_manifest(MANIFEST, tmp_path / "out", FIXTURES, progress=False)
    assert not (tmp_path / "out" / "train.json").exists()
    calls.clear()
    report = own.convert_manifest(MANIFEST, tmp_path / "out", FIXTURES, progress=False)
    assert calls == [("train", 1), ("val", 0)]  # ("train", 0) was finished before the interruption
    assert "resumed: 1 of 3 shards reused from an interrupted run" in report.summary()
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "whole")
    assert not list((tmp_path / "out").glob(".resume-*"))


# ---------------------------------------------------------------------------------------------
# COCO-style

def polygon_mask(annotation, size):
    return own.coco_mask(annotation["segmentation"], size)


@pytest.fixture(scope="module")
def tiny_inpainter(tmp_path_factory):
    from genloc.inpainters import load_backend
    from genloc.testing import save_sd

    folder = save_sd(tmp_path_factory.mktemp("sd"))
    inpainter = load_backend("sd", folder, steps=2)
    inpainter.prompt_template = "empty background"
    return inpainter


@pytest.fixture(scope="module")
def removed(tiny_inpainter, tmp_path_factory):
    out = tmp_path_factory.mktemp("removed")
    report = own.convert_coco(INSTANCES, FIXTURES, out, "train", own.REMOVE_OBJECTS, tiny_inpainter, dilate=6,
                              progress=False)
    return out, report


def test_removal_changes_only_the_dilated_mask_and_keeps_the_box(removed):
    out, report = removed
    coco = json.loads(INSTANCES.read_text())
    anns = {a["id"]: a for a in coco["annotations"]}
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    got = samples(out, "train")
    assert {s["meta"]["ann_id"] for s in got.values()} == {1, 4}  # the cat, the person at the left edge
    assert read_split_info(out, "train")["mode"] == own.REMOVE_OBJECTS
    for key, s in got.items():
        ann = anns[s["meta"]["ann_id"]]
        x, y, w, h = ann["bbox"]
        assert s["positives"] == [[x, y, x + w, y + h]]
        photo = np.asarray(Image.open(FIXTURES / files[ann["image_id"]]).convert("RGB"))
        erased = stored_image(out, "train", key)
        region = grow_mask(polygon_mask(ann, (photo.shape[1], photo.shape[0])), 6)
        assert np.array_equal(erased[~region], photo[~region])   # bit-identical outside the dilated mask
        assert not np.array_equal(erased[region], photo[region])  # and repainted inside
    assert verify_main([str(out)]) == 0


def test_objects_touching_another_are_skipped_and_counted(removed):
    _, report = removed
    # the man holds the frisbee: erasing either would cut into the other, so both are skipped
    assert report["train"].dropped == {"object: overlaps another object (skipped)": 2}
    assert report["train"].box_sources == {"mask": 2}


def test_removal_check_drops_what_still_looks_like_the_class(tiny_inpainter, tmp_path):
    from scripts.convert_coco import removal_check
    from genloc.testing import save_tiny_open_clip

    config, weights = save_tiny_open_clip(tmp_path / "clip")
    check = removal_check(Namespace(check_clip=str(weights), check_clip_model=None, check_clip_config=str(config),
                                    device="cpu"))
    first = own.convert_coco(INSTANCES, FIXTURES, tmp_path / "a", "train", own.REMOVE_OBJECTS, tiny_inpainter,
                             dilate=6, check=check, check_threshold=1.0, progress=False)
    scores = sorted(s["meta"]["removal_score"] for s in samples(tmp_path / "a", "train").values())
    assert first["train"].written == 2 and scores[0] < scores[1]
    second = own.convert_coco(INSTANCES, FIXTURES, tmp_path / "b", "train", own.REMOVE_OBJECTS, tiny_inpainter,
                              dilate=6, check=check, check_threshold=sum(scores) / 2, progress=False)
    assert second["train"].written == 1
    reason = [r for r in second["train"].dropped if r.startswith("changed")]
    assert len(reason) == 1 and second["train"].dropped[reason[0]] == 1
    kept = next(iter(samples(tmp_path / "b", "train").values()))
    assert kept["meta"]["removal_score"] == scores[0]


def test_interrupted_removal_resumes_without_erasing_again(tiny_inpainter, removed, tmp_path, monkeypatch):
    real = own._write_coco_shard
    calls, interrupt = [], [True]

    def interrupted(build, split, index, payload):
        calls.append(index)
        if len(calls) == 2 and interrupt:
            interrupt.clear()
            raise KeyboardInterrupt
        return real(build, split, index, payload)

    monkeypatch.setattr(own, "_write_coco_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        own.convert_coco(INSTANCES, FIXTURES, tmp_path, "train", own.REMOVE_OBJECTS, tiny_inpainter, dilate=6,
                         progress=False)
    calls.clear()
    report = own.convert_coco(INSTANCES, FIXTURES, tmp_path, "train", own.REMOVE_OBJECTS, tiny_inpainter, dilate=6,
                              progress=False)
    assert calls == [1] and "resumed: 1 of 2 shards" in report.summary()
    assert report["train"].dropped == removed[1]["train"].dropped
    assert shard_bytes(tmp_path) == shard_bytes(removed[0])
    # another dilation is another conversion: nothing reused
    calls.clear()
    own.convert_coco(INSTANCES, FIXTURES, tmp_path, "train", own.REMOVE_OBJECTS, tiny_inpainter, dilate=2,
                     progress=False)
    assert calls == [0, 1]


def test_keep_objects_pools_each_class_and_train_warns(tmp_path):
    report = own.convert_coco(INSTANCES, FIXTURES, tmp_path, "train", own.KEEP_OBJECTS, progress=False)
    assert own.KEEP_OBJECTS_NOTE in report.summary().splitlines()
    assert read_split_info(tmp_path, "train")["mode"] == own.KEEP_OBJECTS
    got = samples(tmp_path, "train")
    assert sorted(got) == ["coco-460450-frisbee", "coco-460450-person", "coco-49931-cat"]
    assert len(got["coco-460450-person"]["positives"]) == 2
    photo = np.asarray(Image.open(FIXTURES / "libcom/controllable_composition/background/000000049931.png")
                       .convert("RGB"))
    assert np.array_equal(stored_image(tmp_path, "train", "coco-49931-cat"), photo)
    assert verify_main([str(tmp_path)]) == 0

    from datamodules import ShardDataModule

    dm = ShardDataModule(str(tmp_path), val_split=None, test_split=None)
    with pytest.warns(UserWarning, match="written with --keep-objects") as warned:
        dm.setup("fit")
    assert len(warned) == 1 and "\n" not in str(warned[0].message)


def test_removal_split_gives_no_keep_objects_warning(removed, recwarn):
    from datamodules import ShardDataModule

    ShardDataModule(str(removed[0]), val_split=None, test_split=None).setup("fit")
    assert not [w for w in recwarn if "keep-objects" in str(w.message)]


def write_instances(path, annotations, images=None):
    coco = json.loads(INSTANCES.read_text())
    coco["annotations"] = annotations
    if images is not None:
        coco["images"] = images
    path.write_text(json.dumps(coco))
    return path


def test_bad_annotations_are_one_line_each_and_counted(tmp_path):
    coco = json.loads(INSTANCES.read_text())
    cat = coco["annotations"][0]
    anns = [cat, {**cat, "id": 9, "image_id": 7}, {**cat, "id": 10, "category_id": 99},
            {**cat, "id": 11, "bbox": [1, 2, 3]}, {**cat, "id": 12, "bbox": [400, 400, 300, 300]}, "text"]
    images = coco["images"] + [{"id": 5, "file_name": "x.png"}]
    report = own.convert_coco(write_instances(tmp_path / "i.json", anns, images), FIXTURES, tmp_path / "out",
                              "val", own.KEEP_OBJECTS, progress=False)
    text = report.summary().splitlines()
    for where, field in ((1, "image_id"), (2, "category_id"), (3, "bbox"), (4, "bbox"), (5, "-")):
        assert sum(t.startswith(f"i.json annotations[{where}], field '{field}'") for t in text) == 1, (where, text)
    assert sum(t.startswith("i.json images[2]:") for t in text) == 1
    assert report["val"].written == 1 and sum(report["val"].dropped.values()) == 6


def test_filters_classes_area_crowd_and_objects_per_image(tmp_path):
    coco = json.loads(INSTANCES.read_text())
    anns = coco["annotations"]
    write_instances(tmp_path / "crowd.json", [anns[0], {**anns[1], "iscrowd": 1}, *anns[2:]])

    def run(path=INSTANCES, **kw):
        return own.convert_coco(path, FIXTURES, tmp_path / "out", "val", own.KEEP_OBJECTS, progress=False, **kw)["val"]

    assert run(classes={"cat"}).categories == {"cat"}
    frisbee_area = anns[2]["bbox"][2] * anns[2]["bbox"][3] / 512 ** 2
    assert "frisbee" not in run(min_area=frisbee_area * 1.01).categories
    assert run(max_area=frisbee_area * 1.01).categories == {"frisbee"}
    stats = run(max_objects=2)
    assert stats.categories == {"cat"} and stats.dropped == {"image: more than 2 objects": 3}
    assert run(tmp_path / "crowd.json").dropped == {"object: iscrowd": 1}
    assert run(tmp_path / "crowd.json", include_crowd=True).dropped == {}
    with pytest.raises(ConversionError, match=r"--classes \['dgo'\]"):
        run(classes={"dgo"})
    with pytest.raises(ConversionError, match="remove-objects needs an inpainter"):
        own.convert_coco(INSTANCES, FIXTURES, tmp_path / "out", "val", own.REMOVE_OBJECTS)


def rle_string(counts) -> str:
    """COCO's compressed RLE text (the inverse of its decoder: 5-bit groups, deltas after the second)."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr(c + 48 + (0x20 if more else 0)))
    return "".join(out)


def test_rle_masks_decode_in_column_major_order():
    mask = np.zeros((4, 3), bool)   # h 4, w 3
    mask[1:3, 1] = True
    mask[0, 2] = True
    counts = [5, 2, 1, 1, 3]        # column-major runs: 0 x5, 1 x2, 0 x1, 1 x1, 0 x3
    assert np.array_equal(own.decode_rle({"size": [4, 3], "counts": counts}), mask)
    assert np.array_equal(own.decode_rle({"size": [4, 3], "counts": rle_string(counts)}), mask)
    big = np.random.default_rng(0).random((40, 30)) > 0.7
    flat = big.T.ravel()
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    runs = ([0] if flat[0] else []) + runs
    assert np.array_equal(own.decode_rle({"size": [40, 30], "counts": rle_string(runs)}), big)
    with pytest.raises(ValueError, match="not 4x3"):
        own.decode_rle({"size": [4, 3], "counts": [5, 2]})


# ---------------------------------------------------------------------------------------------
# each route's output trains (and the manifest's evaluates) with no code written

def train_two_steps(data_dir, log_root, *extra) -> int:
    import train as train_script
    from tests.helpers.runs import tiny_run_overrides

    return train_script.main(["data=opa", "data.persistent_workers=false", "data.pin_memory=false", *extra]
                             + tiny_run_overrides(data_dir, log_root, steps=2))


@pytest.mark.slow
def test_manifest_of_three_photos_converts_verifies_trains_and_evaluates(tmp_path, capsys):
    from evaluate import main as evaluate_main
    from scripts.convert_manifest import main as convert_main

    data = tmp_path / "mine"
    convert_main(["--manifest", str(MANIFEST), "--images", str(FIXTURES), "--out", str(data), "--no-progress"])
    assert verify_main([str(data)]) == 0
    assert train_two_steps(data, tmp_path / "runs") == 0
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    evaluate_main(["--model", str(ckpt), "--data", str(data), "--split", "val", "--out", str(tmp_path / "eval"),
                   "--num-samples", "10", "--ns", "5", "10", "--no-progress"])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    text = json.dumps(metrics)
    assert '"fpr' in text.lower() and '"tpr' in text.lower(), metrics.keys()


@pytest.mark.slow
@pytest.mark.parametrize("route", ["remove", "keep"])
def test_coco_routes_train_two_steps(route, removed, tmp_path, capsys):
    if route == "remove":
        assert train_two_steps(removed[0], tmp_path / "runs", "data.val_split=train") == 0
    else:
        data = tmp_path / "kept"
        own.convert_coco(INSTANCES, FIXTURES, data, "train", own.KEEP_OBJECTS, progress=False)
        with pytest.warns(UserWarning, match="written with --keep-objects"):
            assert train_two_steps(data, tmp_path / "runs", "data.val_split=train") == 0
    assert next((tmp_path / "runs").rglob("last.ckpt")).is_file()


@pytest.mark.parametrize("dilate", [0, 1, 5])
def test_growing_a_mask_in_its_window_equals_growing_it_whole(dilate):
    rng = np.random.default_rng(dilate)
    for _ in range(5):
        mask = np.zeros((40, 50), bool)
        y, x = rng.integers(0, 40), rng.integers(0, 50)
        mask[y:y + rng.integers(1, 8), x:x + rng.integers(1, 8)] = rng.random() > 0.0
        mask &= rng.random(mask.shape) > 0.3
        mask[y, x] = True
        assert np.array_equal(own._grown(mask, dilate), grow_mask(mask, dilate))


@pytest.mark.parametrize("args, needle", [
    (["--remove-objects", "/nonexistent/sd"], "/nonexistent/sd"),
    (["--keep-objects", "--check-clip", "w.pt"], "--check-clip"),
    (["--keep-objects", "--min-area", "0.5", "--max-area", "0.1"], "--min-area"),
    (["--keep-objects", "--classes", "dgo"], "dgo"),
    (["--keep-objects", "--remove-objects", "x"], "not allowed with argument"),
])
def test_coco_command_line_errors_are_one_line_and_exit_2(args, needle, tmp_path, capsys):
    from scripts.convert_coco import main

    with pytest.raises(SystemExit) as e:
        main(["--instances", str(INSTANCES), "--images", str(FIXTURES), "--out", str(tmp_path / "o"), "--split", "t",
              "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and needle in err, err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    assert not (tmp_path / "o" / "t.json").exists()


def test_manifest_rows_may_name_urls_and_a_file_of_bad_rows_is_one_line(tmp_path):
    rows = [json.loads(line) for line in MANIFEST.read_text().splitlines()]
    rows[0]["image"] = (FIXTURES / rows[0]["image"]).as_uri()
    rows[1]["image"] = "nosuchprotocol://x/y.png"
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = own.convert_manifest(tmp_path / "rows.jsonl", tmp_path / "out", FIXTURES, progress=False)
    assert report["train"].written == 1 and report["train"].dropped == {"image not found or unreadable": 1}
    assert sum(line.startswith("rows.jsonl row 2, field 'image'") for line in report.summary().splitlines()) == 1
    (tmp_path / "bad.jsonl").write_text("{\n[]\n")
    with pytest.raises(ConversionError) as e:
        own.convert_manifest(tmp_path / "bad.jsonl", tmp_path / "out", FIXTURES, progress=False)
    assert "\n" not in str(e.value) and "all 2 rows are bad, the first: bad.jsonl row 1" in str(e.value)
