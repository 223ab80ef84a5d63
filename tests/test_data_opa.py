"""OPA/FOPA label readers and converters on the real OPA sample (background 580029)."""
import csv
import json
import shutil
from collections import defaultdict

import pytest
from PIL import Image

from datamodules.convert import convert_fopa, convert_opa
from datamodules.opa_labels import read_fopa_pairs, read_opa_csv
from datamodules.shard_reader import iter_annotations, read_split_info
from tests.helpers import FIXTURES

OPA = FIXTURES / "opa_sample"
FOPA_ROWS = OPA / "annotations_original" / "fopa_test_data_pair__bg580029_rows.csv"
RAW_ROWS = OPA / "annotations_original" / "smartplace_smoke_100__bg580029_rows.csv"
BG = OPA / "reconstructed" / "580029_background_reconstructed.png"
AIRPLANES = {"157189": "airplane", "159573": "airplane", "160915": "airplane"}


def xyxy(b):
    x, y, w, h = b
    return [x, y, x + w, y + h]


def groups():
    with open(OPA / "sample_groups.csv", newline="") as f:
        return list(csv.DictReader(f))


def expected_by(keyfn):
    out = defaultdict(lambda: {"pos": [], "neg": []})
    for g in groups():
        out[keyfn(g)]["pos"] += [xyxy(b) for b in json.loads(g["pos_boxes_xywh"])]
        out[keyfn(g)]["neg"] += [xyxy(b) for b in json.loads(g["neg_boxes_xywh"])]
    return out


def test_read_fopa_pools_per_foreground_without_categories():
    samples = read_fopa_pairs(FOPA_ROWS)
    exp = expected_by(lambda g: f"opa-{g['bg_id']}-fg{g['fg_id']}")
    assert {s.key for s in samples} == set(exp)
    for s in samples:
        assert s.category == "" and s.bg_id == "580029"
        assert sorted(s.positives) == sorted(exp[s.key]["pos"]), s.key
        assert sorted(s.negatives) == sorted(exp[s.key]["neg"]), s.key
    assert sum(len(s.positives) for s in samples) == 133
    assert sum(len(s.negatives) for s in samples) == 143


def test_read_fopa_with_categories_pools_per_category_and_json_matches_csv(tmp_path):
    samples = read_fopa_pairs(FOPA_ROWS, AIRPLANES)
    air = next(s for s in samples if s.key == "opa-580029-airplane")
    g = [g for g in groups() if g["fg_id"] in AIRPLANES]
    assert len(air.positives) == sum(int(x["n_pos"]) for x in g)
    assert len(air.negatives) == sum(int(x["n_neg"]) for x in g)
    assert [445, 257, 560, 280] in air.positives      # fg 160915, centre (502, 268), 115x23
    assert [89, 394, 204, 417] in air.negatives       # fg 160915, centre (146, 405)
    assert [246, 133, 432, 182] in air.negatives      # fg 159573, centre (339, 157), 186x49
    # the *_pair_new.json flavour of the same rows reads identically
    with open(FOPA_ROWS, newline="") as f:
        rows = [{**r, "newWidth": int(r["newWidth"]), "newHeight": int(r["newHeight"]),
                 "pos_label": json.loads(r["pos_label"]), "neg_label": json.loads(r["neg_label"])}
                for r in csv.DictReader(f)]
    (tmp_path / "pair_new.json").write_text(json.dumps(rows))
    again = read_fopa_pairs(tmp_path / "pair_new.json", AIRPLANES)
    assert [(s.key, s.positives, s.negatives) for s in again] == [(s.key, s.positives, s.negatives) for s in samples]


def test_read_opa_csv_raw_rows():
    samples = {s.key: s for s in read_opa_csv(RAW_ROWS, AIRPLANES)}
    assert set(samples) == {"opa-580029-airplane"}
    s = samples["opa-580029-airplane"]
    assert s.positives == [[445, 257, 560, 280]]      # "[445, 257, 115, 23]", label 1
    assert s.negatives == [[246, 133, 432, 182]]      # "[246, 133, 186, 49]", label 0
    assert (s.width, s.height) == (640, 427)
    assert s.meta["positive_fg_ids"] == ["160915"] and s.meta["negative_fg_ids"] == ["159573"]


def make_opa_release(root):
    """A tiny OPA release layout from the real files: background, foreground crops, train/test csv."""
    (root / "background" / "airplane").mkdir(parents=True)
    Image.open(BG).convert("RGB").save(root / "background" / "airplane" / "580029.jpg", quality=95)
    comp = Image.open(OPA / "eval_opascore_examples" / "composite_1.jpg")
    (root / "foreground" / "airplane").mkdir(parents=True)
    for fg in AIRPLANES:  # real pixels of the airplane in composite_1; only the folder name matters
        comp.crop((465, 122, 580, 145)).save(root / "foreground" / "airplane" / f"{fg}.jpg")
        comp.crop((465, 122, 580, 145)).convert("L").save(root / "foreground" / "airplane" / f"mask_{fg}.jpg")
    for split in ("train", "test"):
        shutil.copy(RAW_ROWS, root / f"{split}_set.csv")


def test_convert_opa_release(tmp_path):
    make_opa_release(tmp_path / "OPA")
    report = convert_opa(tmp_path / "OPA", tmp_path / "out", progress=False)
    assert [s.written for s in report.splits] == [1, 1]
    info = read_split_info(tmp_path / "out", "test")
    assert info["num_samples"] == 1 and info["categories"] == ["airplane"] and info["source"] == "opa"
    (s,) = list(iter_annotations(tmp_path / "out", "test"))
    assert s["key"] == "opa-580029-airplane" and (s["width"], s["height"]) == (640, 427)
    assert s["positives"] == [[445, 257, 560, 280]] and s["negatives"] == [[246, 133, 432, 182]]


def test_convert_fopa_counts_match_sample_groups(tmp_path):
    (tmp_path / "bg").mkdir()
    shutil.copy(BG, tmp_path / "bg" / "000000580029.png")  # FOPA's zero-padded naming
    (w,) = convert_fopa(FOPA_ROWS, tmp_path / "bg", tmp_path / "out", "test", AIRPLANES, num_shards=4,
                        progress=False).splits
    assert sum(w.dropped.values()) == 0
    exp = expected_by(lambda g: "opa-580029-airplane" if g["fg_id"] in AIRPLANES else f"opa-580029-fg{g['fg_id']}")
    got = {s["key"]: s for s in iter_annotations(tmp_path / "out", "test")}
    assert set(got) == set(exp) and read_split_info(tmp_path / "out", "test")["num_shards"] == 4
    for k, s in got.items():
        assert len(s["positives"]) == len(exp[k]["pos"]) and len(s["negatives"]) == len(exp[k]["neg"]), k
        assert sorted(s["positives"]) == sorted(exp[k]["pos"])
    assert got["opa-580029-airplane"]["category"] == "airplane"
    assert [445, 257, 560, 280] in got["opa-580029-airplane"]["positives"]


def test_converter_reports_missing_background_and_bad_boxes(tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text('fg_id,bg_id,position,scale,label\n'
                    '1,580029,"[600, 400, 100, 50]",0.2,1\n'     # far outside the 640x427 image
                    '1,580029,"[10, 10, 20, 20]",0.2,0\n'
                    '2,999,"[10, 10, 20, 20]",0.2,1\n')          # background not available
    (tmp_path / "bg").mkdir()
    shutil.copy(BG, tmp_path / "bg" / "580029.png")
    from datamodules.convert import index_images, write_labelled_samples
    (w,) = write_labelled_samples(read_opa_csv(rows), index_images(tmp_path / "bg"), tmp_path / "out", "test",
                                  progress=False)
    assert w.written == 1 and w.dropped == {"background image not found": 1}
    assert w.notes["box: outside the image"] == 1
    (s,) = list(iter_annotations(tmp_path / "out", "test"))
    assert s["positives"] == [] and s["negatives"] == [[10, 10, 30, 30]]
    assert "background image not found" in w.summary()


def test_fopa_reader_speed_is_linear():
    """14,587 training rows must read in ~1 s: here 57 rows x 100 stand in for them."""
    import time
    t = time.perf_counter()
    for _ in range(100):
        read_fopa_pairs(FOPA_ROWS)
    assert time.perf_counter() - t < 3.0


def test_missing_label_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        read_fopa_pairs(tmp_path / "missing.csv")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        read_opa_csv(tmp_path / "missing.csv")
