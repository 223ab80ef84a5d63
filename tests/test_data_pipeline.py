"""The shared WebDataset pipeline: DDP splits, fixed batch counts, epochs, resize/flip, pairs,
corrupt samples and error messages."""
import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import ShardDataModule
from datamodules.pipeline import EpochLoader, ShardStream
from datamodules.shard_format import ShardFormatError
from datamodules.shard_reader import iter_annotations
from datamodules.shard_writer import ShardWriter
from datamodules.toy import is_plausible, render_scene, write_toy_split
from tests.helpers.shards import record_checksums

BATCH = 4


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("toydata")
    write_toy_split(d, "toy-opa", "train", 64, seed=1, num_shards=8, progress=False)      # 8 shards x 8
    write_toy_split(d, "toy-opa", "uneven", 70, seed=1, num_shards=8, progress=False)     # 9,9,...,8,8
    write_toy_split(d, "toy-opa", "val", 30, seed=1, num_shards=4, progress=False)
    write_toy_split(d, "toy-opa", "wide", 40, seed=2, num_shards=4, size=(80, 48), progress=False)
    return d


def read_epoch(d, split, rank, epoch, world=2, workers=2, train=True, persistent=False, **kw):
    s = ShardStream(d, split, image_size=32, batch_size=BATCH, train=train, rank=rank, world_size=world,
                    num_workers=workers, seed=7, shuffle_buffer=16, **kw)
    s.set_epoch(epoch)
    return [b["key"] for b in EpochLoader(s, num_workers=workers, persistent_workers=persistent)]


def flat(batches):
    return [k for b in batches for k in b]


def test_two_ranks_two_workers_cover_split_once_same_batch_count(toy_dir):
    all_keys = {s["key"] for s in iter_annotations(toy_dir, "train")}
    e0 = [read_epoch(toy_dir, "train", r, 0) for r in (0, 1)]
    assert len(e0[0]) == len(e0[1]) == 64 // (2 * BATCH)
    k0, k1 = flat(e0[0]), flat(e0[1])
    assert not set(k0) & set(k1) and len(set(k0)) == len(k0)
    assert set(k0) | set(k1) == all_keys
    # same seed + epoch -> identical order; next epoch -> another order and another rank split
    assert read_epoch(toy_dir, "train", 0, 0) == e0[0]
    e1 = read_epoch(toy_dir, "train", 0, 1)
    assert e1 != e0[0] and set(flat(e1)) != set(k0)
    assert set(flat(e1)) | set(flat(read_epoch(toy_dir, "train", 1, 1))) == all_keys


def test_uneven_shards_give_every_rank_the_same_fixed_count(toy_dir):
    counts = [len(read_epoch(toy_dir, "uneven", r, 3, world=2, workers=2)) for r in (0, 1)]
    assert counts == [70 // (2 * BATCH)] * 2
    counts = [len(read_epoch(toy_dir, "uneven", r, 0, world=3, workers=1)) for r in range(3)]
    assert counts == [70 // (3 * BATCH)] * 3


def test_resampled_mode_keeps_fixed_count(toy_dir):
    counts = [len(read_epoch(toy_dir, "uneven", r, 0, resampled=True)) for r in (0, 1)]
    assert counts == [70 // (2 * BATCH)] * 2


def test_eval_reads_each_sample_exactly_once_over_ranks(toy_dir):
    keys = [flat(read_epoch(toy_dir, "val", r, 0, workers=2, train=False)) for r in (0, 1)]
    assert sorted(keys[0] + keys[1]) == sorted(s["key"] for s in iter_annotations(toy_dir, "val"))
    s = ShardStream(toy_dir, "val", image_size=32, batch_size=BATCH, train=False, rank=0, world_size=2, num_workers=2)
    assert len(s) == len(read_epoch(toy_dir, "val", 0, 0, workers=2, train=False))


def test_persistent_workers_follow_the_epoch(toy_dir):
    s = ShardStream(toy_dir, "train", image_size=32, batch_size=BATCH, train=True, rank=0, world_size=2,
                    num_workers=2, seed=7, shuffle_buffer=16)
    epoch = {"now": 0}
    loader = EpochLoader(s, epoch_fn=lambda: epoch["now"], num_workers=2, persistent_workers=True)
    first = [b["key"] for b in loader]
    epoch["now"] = 1
    second = [b["key"] for b in loader]
    assert first == read_epoch(toy_dir, "train", 0, 0) and second == read_epoch(toy_dir, "train", 0, 1)


def test_batch_dict_resize_and_flip_against_oracle(toy_dir):
    """80x48 scenes stretched to 32x32, flipped half the time: every positive stays plausible,
    every negative implausible, and the image matches the (mirrored) scene rendering."""
    dm = ShardDataModule(str(toy_dir), image_size=32, batch_size=BATCH, seed=3, shuffle_buffer=8, flip_prob=0.5,
                       train_split="wide", val_split=None)
    dm.setup("fit")  # no trainer: rank 0 of 1
    flips = 0
    for b in dm.train_dataloader():
        assert set(b) == {"image", "category", "size", "positives", "negatives", "key", "meta"}
        assert b["image"].shape == (BATCH, 3, 32, 32) and b["image"].dtype == torch.float32
        assert 0 <= b["image"].min() and b["image"].max() <= 1
        assert b["size"].dtype == torch.long and b["size"].tolist() == [[80, 48]] * BATCH
        for i in range(BATCH):
            scene, cat = b["meta"][i]["scene"], b["category"][i]
            assert scene["hflip"] == b["meta"][i]["hflip"]
            flips += scene["hflip"]
            assert is_plausible(scene, cat, b["positives"][i].numpy()).all()
            assert not is_plausible(scene, cat, b["negatives"][i].numpy()).any()
            ref = np.asarray(Image.fromarray(render_scene(scene)).resize((32, 32), Image.BILINEAR)) / 255.0
            assert np.abs(b["image"][i].permute(1, 2, 0).numpy() - ref).mean() < 0.03
    assert 0 < flips < 40


def test_pairs_redrawn_per_epoch_and_deterministic(toy_dir):
    dm = ShardDataModule(str(toy_dir), image_size=32, batch_size=BATCH, pairs=True, flip_prob=0.0,
                       shuffle_buffer=1, val_split=None, test_split=None)
    dm.setup("fit")

    def pairs(epoch):
        dm.set_epoch(epoch)
        out = {}
        for b in dm.train_dataloader():
            assert b["chosen"].shape == b["rejected"].shape == (BATCH, 4)
            for i, k in enumerate(b["key"]):
                assert any(torch.equal(b["chosen"][i], p) for p in b["positives"][i])
                assert any(torch.equal(b["rejected"][i], n) for n in b["negatives"][i])
                out[k] = (b["chosen"][i].tolist(), b["rejected"][i].tolist())
        return out

    p0, p0b, p1 = pairs(0), pairs(0), pairs(1)
    assert p0 == p0b
    common = set(p0) & set(p1)
    assert common and any(p0[k] != p1[k] for k in common)


def write_with_corruption(d):
    w = ShardWriter(d, "train", source="toy", num_shards=1)
    img = Image.new("RGB", (20, 10), (10, 200, 30))
    for i in range(6):
        w.write(f"good-{i}", {"category": "car", "positives": [[1, 1, 5, 5]], "negatives": []}, image=img)
    w.close()
    good = (d / "train-000000.tar").read_bytes()
    with tarfile.open(d / "train-000000.tar", "a") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        ok_json = json.dumps({"category": "car", "width": 20, "height": 10, "positives": [[1, 1, 5, 5]],
                              "negatives": []}).encode()
        buf = io.BytesIO()
        img.save(buf, format="JPEG")
        add("bad-jpeg.jpg", buf.getvalue()[:40])
        add("bad-jpeg.json", ok_json)
        add("bad-json.jpg", buf.getvalue())
        add("bad-json.json", b"{not json")
        add("bad-box.jpg", buf.getvalue())
        add("bad-box.json", ok_json.replace(b"[[1, 1, 5, 5]]", b"[[5, 1, 1, 5]]"))
    record_checksums(d / "train-000000.tar")  # the broken samples are what was converted
    return good


def test_corrupt_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    write_with_corruption(tmp_path)
    dm = ShardDataModule(str(tmp_path), image_size=16, batch_size=1, val_split="train", train_split=None)
    dm.setup("validate")
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        keys = [k for b in dm.val_dataloader() for k in b["key"]]
    assert sorted(keys) == [f"good-{i}" for i in range(6)]
    assert dm.num_skipped == {"train": 3}
    text = caplog.text
    assert "bad-jpeg" in text and "unreadable image" in text
    assert "bad-json" in text and "bad json" in text
    assert "bad-box" in text and "empty (needs x1 < x2 and y1 < y2): positive box" in text


def test_truncated_tar_is_reported_not_fatal(tmp_path, caplog):
    write_with_corruption(tmp_path)
    data = (tmp_path / "train-000000.tar").read_bytes()
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        torn = tar.getmember("good-3.jpg")
    (tmp_path / "train-000000.tar").write_bytes(data[: torn.offset_data + torn.size // 2])  # torn inside a sample
    # unchecked (verify="unchecked", or a split file without checksums): the samples before the tear are read
    s = ShardStream(tmp_path, "train", image_size=16, batch_size=1, train=False, verify="unchecked")
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        keys = [k for b in s for k in b["key"]]
    assert 0 < len(keys) < 6 and s.num_skipped >= 1 and "train-000000.tar" in caplog.text


def test_clear_errors(tmp_path, toy_dir):
    with pytest.raises(ShardFormatError, match=r"missing split file .*nope\.json.*Run a converter"):
        ShardStream(toy_dir, "nope", image_size=32, batch_size=2, train=True)
    with pytest.raises(ShardFormatError, match=r"4 shards for 2 rank\(s\) x 4 worker\(s\).*--num-shards 8"):
        ShardStream(toy_dir, "val", image_size=32, batch_size=2, train=True, world_size=2, num_workers=4)
    (tmp_path / "empty.json").write_text(json.dumps({"num_samples": 0, "num_shards": 0, "source": "toy"}))
    with pytest.raises(ShardFormatError, match=r"empty split: .*empty\.json"):
        ShardStream(tmp_path, "empty", image_size=32, batch_size=2, train=False)
    dm = ShardDataModule(str(tmp_path / "absent"))
    with pytest.raises(ShardFormatError, match="does not exist"):
        dm.setup("fit")


def test_interrupted_writer_leaves_nothing_that_looks_complete(tmp_path):
    img = Image.new("RGB", (8, 8))
    w = ShardWriter(tmp_path, "train", source="toy", num_shards=2)
    w.write("a", {"category": "x", "positives": [[0, 0, 4, 4]]}, image=img)
    w.close()
    assert (tmp_path / "train.json").exists()
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, "train", source="toy", num_shards=2) as w2:
            w2.write("b", {"category": "x", "positives": [[0, 0, 4, 4]]}, image=img)
            raise RuntimeError("boom")
    # the previous complete split is untouched and nothing of the failed one is left behind
    assert [s["key"] for s in iter_annotations(tmp_path, "train")] == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".convert.lock", "train-000000.tar", "train.json"]
