"""evaluate.py checks its inputs like training does: broken labelled boxes skipped (shards) or dropped
(label files) and counted, duplicate keys and unreadable shards are one-line errors, predictions in
the wrong convention get a warning that says what they look like (or exit 2 when nothing can be
scored), "@n" only when every sample has n boxes, and bad arguments fail before any model loads."""
import io
import json
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

import evaluate
from metrics.annotations import EvaluationError, check_annotations, load_annotations
from metrics.predictions import read_predictions
from datamodules import ShardDataModule
from datamodules.shard_writer import ShardWriter
from tests.helpers import ROOT

W, H = 64, 48
BOXES = [[4, 6, 20, 30], [30, 10, 50, 40], [10, 20, 60, 44], [1, 1, 9, 9]]


@pytest.fixture
def shards(tmp_path):
    """8 samples of real photos in 2 shards; sample i has one positive BOXES[i % 4] and one negative."""
    photo = Image.fromarray(skdata.chelsea()).resize((W, H))
    out = tmp_path / "shards"
    with ShardWriter(out, "test", source="opa", num_shards=2) as w:
        for i in range(8):
            pos = BOXES[i % 4]
            neg = BOXES[(i + 1) % 4]
            assert w.write(f"s{i}", {"category": "cat", "positives": [pos], "negatives": [neg]}, image=photo) is None
    return out


def write_preds(path, boxes_by_key: dict):
    path.write_text("".join(json.dumps({"key": k, "boxes": np.asarray(b).tolist()}) + "\n"
                            for k, b in boxes_by_key.items()))
    return path


def perfect(n=100):
    """Each sample's positive first, then boxes far from everything labelled (valid, never a hit)."""
    filler = [[50, 40, 52, 42]]
    return {f"s{i}": [BOXES[i % 4]] + filler * (n - 1) for i in range(8)}


def run(args, tmp_path):
    return evaluate.main([*args, "--out", str(tmp_path / "res"), "--no-progress"])


# ------------------------------------------------------------------------------------------ predictions
def test_correct_predictions_score_without_a_warning(shards, tmp_path, capsys):
    doc = run(["--predictions", str(write_preds(tmp_path / "p.jsonl", perfect())), "--annotations", str(shards)],
              tmp_path)
    assert doc["metrics"]["tpr@100"] == 1.0 and doc["metrics"]["fpr@100"] == 0.0
    assert "warning" not in capsys.readouterr().err and doc["prediction_check"]["broken"] == {}


@pytest.mark.parametrize("convert, says", [
    (lambda b: [b[2], b[3], b[0], b[1]], "x2, y2, x1, y1 (corners swapped)"),
    (lambda b: [b[0] / W, b[1] / H, b[2] / W, b[3] / H], "normalised to [0, 1]"),
])
def test_predictions_in_another_convention_are_an_error_that_says_which(shards, tmp_path, convert, says):
    preds = {k: [convert(b) for b in boxes] for k, boxes in perfect().items()}
    with pytest.raises(EvaluationError, match="nothing sensible to score") as exc:
        run(["--predictions", str(write_preds(tmp_path / "p.jsonl", preds)), "--annotations", str(shards)], tmp_path)
    assert says in str(exc.value)


def test_xywh_predictions_are_named(shards, tmp_path):
    preds = {f"s{i}": [[30, 20, 8, 6]] * 100 for i in range(8)}       # x2 < x1 as corners, fine as x, y, w, h
    with pytest.raises(EvaluationError, match="x, y, width, height"):
        run(["--predictions", str(write_preds(tmp_path / "p.jsonl", preds)), "--annotations", str(shards)], tmp_path)


def test_mostly_outside_predictions_warn_with_the_share_and_still_score(shards, tmp_path, capsys):
    preds = perfect()
    for i in range(8):                                                  # 87 of 100 boxes pushed far outside
        preds[f"s{i}"] = preds[f"s{i}"][:13] + [[500, 500, 520, 520]] * 87
    doc = run(["--predictions", str(write_preds(tmp_path / "p.jsonl", preds)), "--annotations", str(shards)], tmp_path)
    err = capsys.readouterr().err
    assert "warning: 87 % of the predicted boxes lie outside their image" in err
    assert "are they normalised, or xywh" in err
    assert doc["metrics"]["tpr@100"] == 1.0 and doc["prediction_check"]["broken"] == {"outside the image": 696}


def test_fewer_boxes_than_n_are_reported_at_the_fewest(shards, tmp_path, capsys):
    preds = perfect(100)
    preds["s3"] = preds["s3"][:30]
    doc = run(["--predictions", str(write_preds(tmp_path / "p.jsonl", preds)), "--annotations", str(shards)], tmp_path)
    captured = capsys.readouterr()
    assert doc["ns"] == [10, 20, 30] and "tpr@100" not in doc["metrics"] and "tpr@30" in doc["metrics"]
    assert "@30:" in captured.out and "@100" not in captured.out
    assert "1 samples have fewer than 100 predicted boxes (fewest: 30)" in captured.err
    preds = {k: b[:25] for k, b in perfect().items()}
    doc = run(["--predictions", str(write_preds(tmp_path / "q.jsonl", preds)), "--annotations", str(shards)], tmp_path)
    assert doc["ns"] == [10, 20, 25] and doc["metrics"]["tpr@25"] == 1.0


def test_only_the_first_n_boxes_of_a_line_are_kept(shards, tmp_path):
    many = {k: b + [[0, 0, 64, 48]] * 100_000 for k, b in perfect(10).items()}   # 10^5 extra boxes per key
    path = write_preds(tmp_path / "many.jsonl", many)
    assert all(b.shape == (10, 4) for b in read_predictions(path, 10).values())
    doc = run(["--predictions", str(path), "--annotations", str(shards), "--ns", "5", "10", "--num-samples", "10"],
              tmp_path)
    again = run(["--predictions", str(write_preds(tmp_path / "few.jsonl", perfect(10))), "--annotations", str(shards),
                 "--ns", "5", "10", "--num-samples", "10"], tmp_path)
    assert doc["metrics"] == again["metrics"]


def test_prediction_keys_with_raw_category_names_match(tmp_path):
    from datamodules.opa_labels import read_opa_csv

    labels = tmp_path / "test_set.csv"
    labels.write_text('fg_id,bg_id,position,label,category,width,height\n'
                      '1,7,"[4, 6, 16, 24]",1,traffic light,64,48\n')
    (sample,) = read_opa_csv(labels)
    assert sample.key == "opa-7-traffic%20light"
    preds = write_preds(tmp_path / "p.jsonl", {"opa-7-traffic light": [[4, 6, 20, 30]] * 10})
    doc = run(["--predictions", str(preds), "--annotations", str(labels), "--ns", "10", "--num-samples", "10"],
              tmp_path)
    assert doc["keys"]["missing_keys"] == 0 and doc["metrics"]["tpr@10"] == 1.0


# ------------------------------------------------------------------------------------------ annotations
def rewrite_json(shard, key, change):
    """Rewrite one sample's json as another tool might: the split file records the new shard's
    checksum, as that tool's converter would, so the bad content itself is what is tested."""
    from datamodules.shard_writer import file_sha256

    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            if name == f"{key}.json":
                ann = json.loads(data)
                change(ann)
                data = json.dumps(ann).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    split, index = shard.stem.rsplit("-", 1)
    split_file = shard.parent / f"{split}.json"
    recorded = json.loads(split_file.read_text())
    recorded["shard_sha256"][int(index)] = file_sha256(shard)
    split_file.write_text(json.dumps(recorded))


def test_a_swapped_ground_truth_box_in_a_shard_is_skipped_like_training_does(shards, tmp_path, capsys):
    rewrite_json(shards / "test-000000.tar", "s0", lambda a: a.update(positives=[[20, 30, 4, 6]]))
    doc = run(["--predictions", str(write_preds(tmp_path / "p.jsonl", perfect())), "--annotations", str(shards)],
              tmp_path)
    assert doc["metrics"]["num_samples"] == 7 and doc["metrics"]["tpr@100"] == 1.0   # no positive that can never be hit
    assert doc["skipped_samples"] == {"positive box: empty (needs x1 < x2 and y1 < y2)": 1}
    assert "key 's0'" in capsys.readouterr().err
    dm = ShardDataModule(str(shards), image_size=16, batch_size=4, train_split=None, val_split="test")
    dm.setup("validate")
    assert len([k for b in dm.val_dataloader() for k in b["key"]]) == 7 and dm.num_skipped == {"test": 1}


def test_broken_boxes_of_a_label_file_are_dropped_and_counted(tmp_path):
    labels = tmp_path / "test_set.csv"
    labels.write_text('fg_id,bg_id,position,label,width,height\n'
                      '1,7,"[4, 6, 16, 24]",1,64,48\n'
                      '1,7,"[4, 6, -16, 24]",1,64,48\n'         # negative width
                      '1,7,"[600, 6, 16, 24]",0,64,48\n'        # outside the 64x48 image
                      '1,7,"[50, 40, 14.5, 8.4]",0,64,48\n')   # overhangs by < 1 %: clipped to [50, 40, 64, 48]
    samples, skipped, dropped = check_annotations(load_annotations(labels), from_shards=False)
    assert not skipped and dropped == {"positive box: empty (needs x1 < x2 and y1 < y2)": 1,
                                       "negative box: outside the image": 1}
    assert samples[0]["positives"] == [[4, 6, 20, 30]] and samples[0]["negatives"] == [[50, 40, 64, 48]]


def test_a_key_in_two_shards_is_an_error_naming_both(shards, tmp_path):
    with tarfile.open(shards / "test-000000.tar") as tar:
        copied = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.name.startswith("s0.")]
    with tarfile.open(shards / "test-000001.tar", "a") as tar:
        for member, data in copied:
            tar.addfile(member, io.BytesIO(data))
    with pytest.raises(EvaluationError) as exc:
        load_annotations(shards, "test")
    message = str(exc.value)
    assert "'s0'" in message and "test-000000.tar" in message and "test-000001.tar" in message


def test_truncated_shard_and_bad_split_file_are_one_line_errors(shards, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    data = (broken / "test-000001.tar").read_bytes()
    with tarfile.open(broken / "test-000001.tar") as tar:
        torn = tar.getmember("s3.jpg")
    (broken / "test-000001.tar").write_bytes(data[: torn.offset_data + torn.size // 2])
    with pytest.raises(EvaluationError, match=r"test-000001\.tar: unreadable .*re-run the conversion"):
        load_annotations(broken, "test")
    for content in ("[]", '{"num_samples": "many", "num_shards": 2}', '"test"'):
        (broken / "test.json").write_text(content)
        with pytest.raises(EvaluationError, match=r"test\.json is not a split file"):
            load_annotations(broken, "test")


def test_exit_code_2_and_one_line_from_the_command(shards, tmp_path):
    preds = {k: [[b[0] / W, b[1] / H, b[2] / W, b[3] / H] for b in boxes] for k, boxes in perfect().items()}
    proc = subprocess.run([sys.executable, "evaluate.py", "--predictions", str(write_preds(tmp_path / "p.jsonl", preds)),
                           "--annotations", str(shards), "--out", str(tmp_path / "o"), "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "normalised" in proc.stderr and not (tmp_path / "o" / "metrics.json").exists()


@pytest.mark.parametrize("flag, value", [("--temperature", "0"), ("--temperature", "nan"), ("--top-k", "0"),
                                         ("--num-samples", "0"), ("--top-p", "0"), ("--top-p", "1.5"),
                                         ("--iou-threshold", "0"), ("--batch-size", "0"), ("--num-workers", "-1"),
                                         ("--ns", "0")])
def test_bad_sampling_arguments_fail_before_the_checkpoint_is_loaded(flag, value, tmp_path, capsys, monkeypatch):
    import genloc.hub

    monkeypatch.setattr(genloc.hub, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--model", str(tmp_path / "model.ckpt"), "--data", str(tmp_path), flag, value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.strip().splitlines()[-1].startswith(f"evaluate.py: error: {flag} must be")
