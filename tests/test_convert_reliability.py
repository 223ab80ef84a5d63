"""Converters never destroy good data and never drop real names: a failed re-conversion leaves the
previous complete output as it was, a held-out split does not outlive the split it was taken from,
every category name becomes a tar-safe key, bad label rows are one-line errors naming the file
line, and --workers N gives the same shards as one worker."""
import csv
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data as skdata

from datamodules.convert import ConversionError, convert_fopa, convert_opa, convert_pipe
from datamodules.opa_labels import LabelFileError, read_fopa_pairs, read_opa_csv
from datamodules.shard_format import safe_key
from datamodules.shard_reader import iter_annotations, read_split_info
from datamodules.shard_writer import ShardBuild, ShardWriter
from scripts import convert_fopa as fopa_cli
from scripts import convert_opa as opa_cli
from scripts import convert_pipe as pipe_cli
from tests.helpers import ROOT

PHOTOS = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket(), skdata.immunohistochemistry()]
# real-world names: spaces, unicode, punctuation, a dot, a percent sign, a slash-like name
CATEGORIES = ["traffic light", "café crème", "hot-dog", "50% off", "a.b", "pot_plant", "人", "o'clock"]


def photo(i: int, size=(64, 48)) -> Image.Image:
    return Image.fromarray(PHOTOS[i % len(PHOTOS)]).resize(size)


def make_opa_release(root, n_backgrounds: int = 10, categories=CATEGORIES):
    """An OPA release layout: background/<cat>/<bg>.jpg, foreground/<cat>/<fg>.jpg, {train,test}_set.csv."""
    (root / "background" / "any").mkdir(parents=True)
    for b in range(n_backgrounds):
        photo(b).save(root / "background" / "any" / f"{b + 1}.jpg", quality=90)
    for f, cat in enumerate(categories):
        (root / "foreground" / cat).mkdir(parents=True)
        photo(f, (8, 8)).save(root / "foreground" / cat / f"{100 + f}.jpg")
    for split, backgrounds in (("train", range(n_backgrounds)), ("test", range(2))):
        with open(root / f"{split}_set.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["fg_id", "bg_id", "position", "label"])
            for b in backgrounds:
                for f in range(len(categories)):
                    w.writerow([100 + f, b + 1, json.dumps([2 + f, 3, 10, 12]), (b + f) % 2])
    return root


def files(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes), hidden ones included."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def shard_files(folder) -> dict[str, bytes]:
    return {k: v for k, v in files(folder).items() if not k.startswith(".")}


def run_cli(module, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    err = capsys.readouterr().err.strip()
    return exc.value.code, err


@pytest.fixture
def opa(tmp_path):
    return make_opa_release(tmp_path / "OPA")


# ------------------------------------------------------------------------------------------ re-conversion
def test_fopa_typo_or_unusable_backgrounds_keep_the_previous_split(opa, tmp_path, capsys):
    labels = tmp_path / "pairs.csv"
    with open(labels, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["imgID", "annID", "scID", "scale", "newWidth", "newHeight", "pos_label", "neg_label"])
        for b in range(4):
            w.writerow([7, 100 + b, b + 1, 0.2, 10, 12, "[[20, 20]]", "[[40, 30]]"])
    out = tmp_path / "out"
    fopa_cli.main(["--labels", str(labels), "--backgrounds", str(opa / "background"), "--out", str(out),
                   "--split", "test", "--num-shards", "2", "--no-progress"])
    before = shard_files(out)
    assert read_split_info(out, "test")["num_samples"] == 4
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    photo(0).save(tmp_path / "other" / "999.jpg")             # images, but none of these backgrounds
    for backgrounds, says in ((tmp_path / "backgroundz", "does not exist"), (tmp_path / "empty", "holds no"),
                              (tmp_path / "other", "no valid sample written for split 'test'")):
        code, err = run_cli(fopa_cli, ["--labels", str(labels), "--backgrounds", str(backgrounds), "--out", str(out),
                                       "--split", "test", "--no-progress"], capsys)
        assert code == 2 and says in err and "unchanged" in err and len(err.splitlines()) == 1, err
        assert shard_files(out) == before                       # byte for byte
        assert not [p for p in out.iterdir() if p.name.startswith(".build")]


def pipe_parquet(path, n: int, start: int = 0, corrupt=(), duplicate=()):
    """A PIPE-format parquet of real photos with an object pasted into the target image."""
    src, tgt, ids = [], [], []
    for i in range(start, start + n):
        bg = np.asarray(photo(i, (48, 40)))
        obj = bg.copy()
        obj[10:30, 8 + i % 10:28 + i % 10] = np.asarray(photo(i + 1, (20, 20)))
        for images, arr in ((src, bg), (tgt, obj)):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            images.append({"bytes": b"garbage" if i in corrupt and images is src else buf.getvalue(), "path": None})
        ids.append(str(i - 1 if i in duplicate else i))
    table = pa.table({"source_img": src, "target_img": tgt, "Instruction_Class": [f"Add a {CATEGORIES[i % 8]}"
                                                                                   for i in range(start, start + n)],
                      "img_id": ids, "ann_id": ["1"] * n})
    pq.write_table(table, path, row_group_size=3)
    return path


def test_pipe_bad_input_file_keeps_the_previous_split(tmp_path, capsys):
    good = pipe_parquet(tmp_path / "good.parquet", 6)
    out = tmp_path / "out"
    pipe_cli.main(["--parquet", str(good), "--out", str(out), "--split", "train", "--no-progress"])
    before = shard_files(out)
    (tmp_path / "notes.parquet").write_text("not a parquet file")
    pq.write_table(pa.table({"img_id": ["1"], "ann_id": ["2"]}), tmp_path / "ids.parquet")
    cases = ((tmp_path / "missing.parquet", "not found"), (tmp_path / "notes.parquet", "not a readable parquet"),
             (tmp_path / "ids.parquet", "missing PIPE column(s) ['source_img', 'target_img', 'Instruction_Class']"))
    for bad, says in cases:
        code, err = run_cli(pipe_cli, ["--parquet", str(good), str(bad), "--out", str(out), "--split", "train",
                                       "--no-progress"], capsys)
        assert code == 2 and says in err and str(bad) in err and len(err.splitlines()) == 1, err
        assert shard_files(out) == before
    code, err = run_cli(pipe_cli, ["--parquet", str(good), "--masks", str(good), "--out", str(out), "--split",
                                   "train", "--no-progress"], capsys)
    assert code == 2 and "missing PIPE_Masks column(s) ['mask']" in err
    code, err = run_cli(pipe_cli, ["--parquet", str(good), "--category-column", "Class", "--out", str(out),
                                   "--split", "train", "--no-progress"], capsys)
    assert code == 2 and "['Class']" in err and "--category-column" in err
    assert shard_files(out) == before


def test_a_crash_or_interrupt_mid_conversion_keeps_the_previous_output(opa, tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert_opa(opa, out, progress=False)
    before = files(out)
    real_write = ShardWriter.write

    def failing(self, key, *args, **kwargs):
        if key.startswith("opa-3-"):
            raise KeyboardInterrupt                              # Ctrl-C in the middle of a split
        return real_write(self, key, *args, **kwargs)

    monkeypatch.setattr(ShardWriter, "write", failing)
    for workers in (1, 2):
        with pytest.raises(BaseException) as exc:
            convert_opa(opa, out, val_fraction=0.3, progress=False, workers=workers)
        assert exc.type is KeyboardInterrupt
        after = files(out)
        assert after == before, sorted(set(after) ^ set(before))


def test_killed_conversions_leave_no_staging_folder_behind(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket
    dead = out / f".build-{socket.gethostname()}-{proc.stdout.strip()}-x1"
    alive = out / f".build-{socket.gethostname()}-{os.getpid()}-x2"
    for stage in (dead, alive):
        (stage / "sub").mkdir(parents=True)
    with ShardBuild(out) as build:
        w = build.writer("train", "test", num_shards=1)
        w.write("a", {"category": "x", "positives": [[0, 0, 4, 4]]}, image=photo(0, (8, 8)))
        w.close()
    assert not dead.exists() and alive.exists()                   # a running conversion's stage is kept
    assert read_split_info(out, "train")["num_samples"] == 1 and not build.stage.exists()


def test_two_conversions_into_one_folder_at_once_leave_one_complete_output(opa, tmp_path):
    import multiprocessing

    out = tmp_path / "out"
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=convert_opa, args=(opa, out), kwargs={"num_shards": n, "progress": False})
             for n in (2, 3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    for split in ("train", "test"):
        info = read_split_info(out, split)                       # json and shards of one conversion
        assert len(list(iter_annotations(out, split))) == info["num_samples"]
        assert len(list(out.glob(f"{split}-*"))) == info["num_shards"]
    assert not [p for p in out.iterdir() if p.name.startswith(".build")]


# ------------------------------------------------------------------------------------------ stale splits
def test_held_out_split_is_removed_when_its_parent_is_rewritten_without_it(opa, tmp_path, capsys):
    out = tmp_path / "out"
    first = opa_cli.main(["--opa-root", str(opa), "--out", str(out), "--val-fraction", "0.3", "--num-shards", "2",
                          "--no-progress"])
    val = {s["key"] for s in iter_annotations(out, "val")}
    assert val and read_split_info(out, "val")["held_out_from"] == "train"
    assert [s.split for s in first.splits] == ["train", "val", "test"]
    test_before = shard_files(out)

    # only test rewritten: train is untouched, so its held-out val stays
    opa_cli.main(["--opa-root", str(opa), "--out", str(out), "--splits", "test", "--num-shards", "2", "--no-progress"])
    assert (out / "val.json").exists()
    assert {k: v for k, v in shard_files(out).items() if k.startswith(("train", "val"))} == {
        k: v for k, v in test_before.items() if k.startswith(("train", "val"))}

    report = opa_cli.main(["--opa-root", str(opa), "--out", str(out), "--num-shards", "2", "--no-progress"])
    printed = capsys.readouterr().out
    assert "removed split 'val'" in printed and "held out from 'train'" in printed
    assert any("removed split 'val'" in m for m in report.messages)
    assert not (out / "val.json").exists() and not list(out.glob("val-*"))
    train = {s["key"] for s in iter_annotations(out, "train")}
    assert val <= train                                            # the old val samples are training samples now


def test_a_split_not_held_out_from_the_rewritten_one_is_kept(opa, tmp_path):
    out = tmp_path / "out"
    samples = read_opa_csv(opa / "test_set.csv", {str(100 + f): c for f, c in enumerate(CATEGORIES)})
    from datamodules.convert import index_images, write_labelled_samples

    write_labelled_samples(samples, index_images(opa / "background"), out, "val", progress=False)
    assert "held_out_from" not in read_split_info(out, "val")
    convert_opa(opa, out, progress=False)
    assert read_split_info(out, "val")["num_samples"] == len(samples)


def test_fewer_shards_on_rewrite_leave_no_old_shard_behind(opa, tmp_path):
    out = tmp_path / "out"
    convert_opa(opa, out, num_shards=8, progress=False)
    (out / "train-000009.tar.tmp").write_bytes(b"left by an old, killed writer")
    convert_opa(opa, out, num_shards=2, progress=False)
    assert sorted(p.name for p in out.glob("train-*")) == ["train-000000.tar", "train-000001.tar"]


# ------------------------------------------------------------------------------------------ names
def test_every_category_name_is_converted_to_a_safe_unique_key(opa, tmp_path):
    out = tmp_path / "out"
    report = convert_opa(opa, out, progress=False)
    assert sum(report["train"].dropped.values()) == 0, report.summary()
    got = list(iter_annotations(out, "train"))
    assert {s["category"] for s in got} == set(CATEGORIES)
    assert len({s["key"] for s in got}) == len(got) == 10 * len(CATEGORIES)
    assert all(re.fullmatch(r"[A-Za-z0-9_%-]+", s["key"]) for s in got)
    by_key = {s["key"]: s["category"] for s in got}
    assert by_key["opa-1-traffic%20light"] == "traffic light" and by_key["opa-1-a%2Eb"] == "a.b"
    assert by_key["opa-1-%E4%BA%BA"] == "人" and by_key["opa-1-50%25%20off"] == "50% off"
    # the training pipeline reads them back with their names
    from datamodules import ShardDataModule

    dm = ShardDataModule(str(out), image_size=16, batch_size=8, train_split=None, val_split="test")
    dm.setup("validate")
    seen = {c for batch in dm.val_dataloader() for c in batch["category"]}
    assert seen == set(CATEGORIES) and dm.num_skipped == {"test": 0}


def test_safe_key_is_injective_and_keeps_plain_keys():
    names = ["a b", "a_b", "a%20b", "a/b", "a.b", "a-b", "A B", "ä", "a\nb", ""]
    assert len({safe_key(n) for n in names}) == len(names)
    assert safe_key("opa-580029-airplane") == "opa-580029-airplane"
    assert all(re.fullmatch(r"[A-Za-z0-9_%-]*", safe_key(n)) for n in names)


def test_fopa_category_map_with_any_names(opa, tmp_path):
    labels = tmp_path / "pairs.json"
    rows = [{"imgID": 1, "annID": a, "scID": 1, "scale": 0.3, "newWidth": 9, "newHeight": 7,
             "pos_label": [[20, 20]], "neg_label": []} for a in (1, 2, 3)]
    labels.write_text(json.dumps(rows))
    cats = {"1": "cup/mug", "2": "cup mug", "3": "cup_mug"}
    (stats,) = convert_fopa(labels, opa / "background", tmp_path / "out", "test", cats, progress=False).splits
    keys = {s["key"]: s["category"] for s in iter_annotations(tmp_path / "out", "test")}
    assert stats.written == 3 and keys == {"opa-1-cup%2Fmug": "cup/mug", "opa-1-cup%20mug": "cup mug",
                                           "opa-1-cup_mug": "cup_mug"}


# ------------------------------------------------------------------------------------------ label files
def write_rows(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


OPA_HEADER = ["fg_id", "bg_id", "position", "label"]


@pytest.mark.parametrize("bad_row, says", [
    (["9", "1", "[1, 2, 3]", "1"], "line 4, column position: '[1, 2, 3]' is not [x, y, w, h]"),
    (["9", "1", "left", "1"], "line 4, column position: 'left'"),
    (["9", "1", "[1, 2, 3, 4]", "yes"], "line 4, column label: 'yes' is not 0 or 1"),
    (["9", "1", "[1, 2, 3, 4]", "2"], "line 4, column label: '2' is not 0 or 1"),
])
def test_bad_opa_rows_name_the_file_line_and_column(tmp_path, bad_row, says):
    # line 1 header, lines 2-3 good rows (one spans a quoted newline-free field), line 4 bad
    path = write_rows(tmp_path / "train_set.csv", OPA_HEADER,
                      [["1", "1", "[1, 2, 3, 4]", "1"], ["2", "1", "[1, 2, 3, 4]", "0"], bad_row])
    with pytest.raises(LabelFileError) as exc:
        read_opa_csv(path)
    assert str(exc.value).startswith(f"{path}: {says}"), str(exc.value)


def test_missing_columns_and_malformed_fopa_rows_are_one_line_errors(tmp_path, opa, capsys):
    no_pos = write_rows(tmp_path / "train_set.csv", ["fg_id", "bg_id", "label"], [["1", "1", "1"]])
    with pytest.raises(LabelFileError, match=r"missing column\(s\) \['position'\]"):
        read_opa_csv(no_pos)
    header = ["imgID", "annID", "scID", "scale", "newWidth", "newHeight", "pos_label", "neg_label"]
    fopa = write_rows(tmp_path / "pairs.csv", header, [[1, 2, 1, 0.2, 9, 7, "[[1, 2]]", "[]"],
                                                       [1, 2, 1, 0.2, 9, 7, "[[1, 2", "[]"]])
    with pytest.raises(LabelFileError, match=r"pairs\.csv: line 3, column pos_label"):
        read_fopa_pairs(fopa)
    fopa = write_rows(tmp_path / "pairs.csv", header, [[1, 2, 1, 0.2, "nine", 7, "[[1, 2]]", "[]"]])
    with pytest.raises(LabelFileError, match=r"line 2, column newWidth: 'nine'"):
        read_fopa_pairs(fopa)
    (tmp_path / "pairs.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(LabelFileError, match="expected a json list"):
        read_fopa_pairs(tmp_path / "pairs.json")
    (tmp_path / "pairs.json").write_text(json.dumps([{"imgID": 1}]))
    with pytest.raises(LabelFileError, match=r"missing column\(s\) \['annID'"):
        read_fopa_pairs(tmp_path / "pairs.json")
    # through the command: exit 2, one line, nothing written
    code, err = run_cli(fopa_cli, ["--labels", str(fopa), "--backgrounds", str(opa / "background"), "--out",
                                   str(tmp_path / "out"), "--split", "test", "--no-progress"], capsys)
    assert code == 2 and "line 2, column newWidth" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    (opa / "train_set.csv").write_text((opa / "train_set.csv").read_text().replace('"[2, 3, 10, 12]"', '"[2, 3]"', 1))
    code, err = run_cli(opa_cli, ["--opa-root", str(opa), "--out", str(tmp_path / "o2"), "--no-progress"], capsys)
    assert code == 2 and "train_set.csv: line 2, column position" in err


def test_converter_arguments_are_checked_before_any_work(opa, tmp_path, capsys):
    for argv, says in ((["--workers", "0"], "--workers must be >= 1"), (["--num-shards", "0"], "--num-shards"),
                       (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1)")):
        code, err = run_cli(opa_cli, ["--opa-root", str(opa), "--out", str(tmp_path / "o"), *argv], capsys)
        assert code == 2 and says in err
    code, err = run_cli(opa_cli, ["--opa-root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "does not exist" in err
    with pytest.raises(ConversionError, match="workers"):
        convert_pipe([], tmp_path / "o", "train", workers=0)


# ------------------------------------------------------------------------------------------ workers
def test_two_workers_write_exactly_what_one_worker_writes(opa, tmp_path):
    one = convert_opa(opa, tmp_path / "one", num_shards=3, val_fraction=0.3, progress=False, workers=1)
    two = convert_opa(opa, tmp_path / "two", num_shards=3, val_fraction=0.3, progress=False, workers=2)
    assert shard_files(tmp_path / "one") == shard_files(tmp_path / "two")      # same shards, same bytes
    assert one.summary() == two.summary()

    parquet = [pipe_parquet(tmp_path / "a.parquet", 7, corrupt={2}), pipe_parquet(tmp_path / "b.parquet", 6, start=7,
                                                                                  duplicate={9})]
    pipe = {w: convert_pipe(parquet, tmp_path / f"pipe{w}", "train", max_per_shard=4, batch_rows=2, progress=False,
                            workers=w) for w in (1, 2)}
    assert shard_files(tmp_path / "pipe1") == shard_files(tmp_path / "pipe2")
    stats = pipe[2]["train"]
    assert stats.summary() == pipe[1]["train"].summary() and stats.box_sources == pipe[1]["train"].box_sources
    assert stats.written == 11 and stats.dropped == {"unreadable source image": 1, "duplicate key": 1}
    info = read_split_info(tmp_path / "pipe2", "train")
    assert info["num_shards"] == 4 and info["shard_sizes"] == [3, 4, 3, 1]          # rows 0-3, 4-7, 8-11, 12
    keys = [s["key"] for s in iter_annotations(tmp_path / "pipe2", "train")]
    assert keys == [f"pipe-{i}-1" for i in range(13) if i not in (2, 9)]


def test_pipe_limit_and_row_ranges_across_files(tmp_path):
    parquet = [pipe_parquet(tmp_path / "a.parquet", 5), pipe_parquet(tmp_path / "b.parquet", 5, start=5)]
    report = convert_pipe(parquet, tmp_path / "out", "train", max_per_shard=3, limit=7, progress=False, workers=2)
    keys = [s["key"] for s in iter_annotations(tmp_path / "out", "train")]
    assert keys == [f"pipe-{i}-1" for i in range(7)] and report["train"].written == 7
    assert read_split_info(tmp_path / "out", "train")["shard_sizes"] == [3, 3, 1]


def test_convert_cli_runs_as_a_module(opa, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scripts.convert_opa", "--opa-root", str(opa), "--out",
                           str(tmp_path / "o"), "--splits", "test", "--workers", "2", "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "test: written 16, dropped 0" in proc.stdout and "wrote split 'test'" in proc.stdout
