"""Shard content is checked where it is read (issue 30): training and validation hash each shard as
it streams (local folder, file:// and http:// alike) and compare with `{split}.json`; a shard that
differs (a flipped byte inside an image, a sibling shard of the same split copied over it, a shard of
another conversion) is dropped whole, its samples counted as skipped and one warning names the shard
and both hashes; `data.verify=strict` stops instead; checking never changes the order of samples."""
import hashlib
import json
import logging
import shutil
import tarfile

import pytest

import train as train_script
from datamodules.pipeline import EpochLoader, ShardStream
from datamodules.shard_format import ShardFormatError
from tests.helpers.runs import tiny_run_overrides
from tests.test_shards_url import ShardServer


def _write(root, seed, split="val", n=12, shards=3, flavour="toy-opa"):
    from datamodules.toy import write_toy_split

    write_toy_split(root, flavour, split, n, seed=seed, num_shards=shards, progress=False)
    return root


def flip_a_byte_inside_an_image(shard):
    with tarfile.open(shard) as tar:
        image = next(m for m in tar.getmembers() if m.name.endswith((".jpg", ".png")))
    data = bytearray(shard.read_bytes())
    data[image.offset_data + image.size // 2] ^= 0x10
    shard.write_bytes(bytes(data))


def damage(folder, case, tmp_path, split="val"):
    """Damage shard 0 of ``split`` in ``folder`` the way ``case`` says."""
    first = folder / f"{split}-000000.tar"
    if case == "flipped byte":
        flip_a_byte_inside_an_image(first)
    elif case == "sibling shard":
        shutil.copy(folder / f"{split}-000001.tar", first)
    else:  # the same shard of another conversion (other seed)
        other = _write(tmp_path / "other", seed=7, split=split)
        shutil.copy(other / f"{split}-000000.tar", first)
    return first


def _keys(data_dir, split="val", train=False, workers=0, **kwargs):
    stream = ShardStream(data_dir, split, image_size=16, batch_size=4, train=train, shuffle_buffer=8, seed=2,
                         num_workers=workers, **kwargs)
    return [k for b in EpochLoader(stream, epoch_fn=lambda: 1, num_workers=workers) for k in b["key"]], stream


def _shard_keys(shard):
    with tarfile.open(shard) as tar:
        return {name.split(".", 1)[0] for name in tar.getnames()}


@pytest.mark.parametrize("where", ["local", "file", "http"])
@pytest.mark.parametrize("case", ["flipped byte", "sibling shard", "other conversion"])
def test_a_shard_that_differs_from_its_checksum_is_dropped_counted_and_named(tmp_path, caplog, case, where):
    folder = _write(tmp_path / "data" / "toy-opa", seed=1)
    intact, _ = _keys(folder)
    info = json.loads((folder / "val.json").read_text())
    lost = _shard_keys(folder / "val-000000.tar")
    shard = damage(folder, case, tmp_path)
    read_hash = hashlib.sha256(shard.read_bytes()).hexdigest()
    with ShardServer(tmp_path / "data") as base, caplog.at_level(logging.WARNING, "datamodules"):
        data_dir = {"local": folder, "file": f"file://{folder}", "http": f"{base}/toy-opa"}[where]
        keys, stream = _keys(data_dir)
    assert keys == [k for k in intact if k not in lost]  # the other shards, in their order
    assert stream.num_skipped == info["shard_sizes"][0]
    warnings = [r.getMessage() for r in caplog.records if "does not match its sha256" in r.getMessage()]
    assert len(warnings) == 1 and "val-000000.tar" in warnings[0], caplog.text
    assert read_hash in warnings[0] and info["shard_sha256"][0] in warnings[0]


def test_strict_verification_stops_at_the_first_mismatch(tmp_path):
    folder = _write(tmp_path / "toy-opa", seed=1)
    damage(folder, "flipped byte", tmp_path)
    with pytest.raises(ShardFormatError, match=r"val-000000\.tar does not match its sha256 in val\.json .*data\.verify"):
        _keys(folder, verify="strict")
    assert len(_keys(folder, verify="unchecked")[0]) == 12  # unchecked: the damaged image is read as if intact


@pytest.mark.parametrize("workers", [0, 2])
def test_checking_keeps_the_order_of_training_samples(tmp_path, workers):
    folder = _write(tmp_path / "toy-opa", seed=1, split="train", n=24, shards=4)
    checked = _keys(folder, "train", train=True, workers=workers)[0]
    assert checked == _keys(folder, "train", train=True, workers=workers, verify="unchecked")[0]
    assert len(checked) == 24


def test_training_on_a_flipped_byte_counts_the_loss_and_strict_stops_with_one_line(tmp_path, capsys, caplog):
    data = _write(tmp_path / "toy-pipe", seed=0, split="train", n=16, shards=2, flavour="toy-pipe")
    _write(data, seed=1, split="val", n=8, shards=2, flavour="toy-pipe")
    shard = damage(data, "flipped byte", tmp_path, split="train")
    recorded = json.loads((data / "train.json").read_text())["shard_sizes"][0]
    args = ["experiment=toy_pretrain", "callbacks.tpr_fpr.every_n_val_epochs=0",
            "callbacks.sample_images.every_n_val_epochs=0"] + tiny_run_overrides(data, tmp_path / "runs", steps=2)
    with caplog.at_level(logging.WARNING, "datamodules"):
        assert train_script.main(args) == 0
    metrics = json.loads((tmp_path / "runs" / "toy_pretrain" / "default" / "metrics.json").read_text())
    assert metrics["data/skipped_samples/train"] >= recorded and str(shard) in caplog.text
    capsys.readouterr()

    assert train_script.main(args + ["run_name=strict", "data.verify=strict", "data.num_workers=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {shard} does not match its sha256 in train.json"), err
