"""What a converter records is checked when shards are read: per-shard sample counts and checksums
in ``{split}.json``; evaluation stops on a damaged shard unless told to score around it (and then
says so in metrics.json); `python -m datamodules.verify` checks a whole folder."""
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile

import pytest

from datamodules.shard_reader import iter_annotations
from metrics.annotations import EvaluationError, load_annotations
from metrics.evaluation import evaluate
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from datamodules.toy import write_toy_split

    root = tmp_path_factory.mktemp("integrity") / "toy-opa"
    write_toy_split(root, "toy-opa", "val", 12, seed=1, num_shards=2, progress=False)
    return root


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def _cut_in_the_middle(folder) -> int:
    """Zero the tar header of the third sample of shard 0 (bytes damaged in the middle, length kept):
    the tar reads as a shorter valid archive. Returns the samples left readable in that shard."""
    shard = folder / "val-000000.tar"
    with tarfile.open(shard) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".json")]
    data = bytearray(shard.read_bytes())
    data[members[2].offset: members[2].offset + 512] = bytes(512)
    shard.write_bytes(bytes(data))
    return 2


def test_the_split_file_records_each_shards_checksum(folder):
    info = json.loads((folder / "val.json").read_text())
    assert info["shard_sha256"] == [hashlib.sha256((folder / f"val-00000{i}.tar").read_bytes()).hexdigest()
                                    for i in range(2)]


def test_a_shard_damaged_in_the_middle_stops_the_evaluation_and_names_the_shard(folder, tmp_path):
    broken = _copy(folder, tmp_path)
    recorded = json.loads((broken / "val.json").read_text())["shard_sizes"][0]
    left = _cut_in_the_middle(broken)
    with pytest.raises(EvaluationError, match=rf"val-000000\.tar holds {left} samples but val\.json records {recorded}"):
        load_annotations(broken, "val")
    proc = subprocess.run([sys.executable, "evaluate.py", "--baseline", "random", "--annotations", str(broken),
                           "--split", "val", "--out", str(tmp_path / "out"), "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "val-000000.tar" in proc.stderr and not (tmp_path / "out" / "metrics.json").exists()


def test_scoring_around_a_damaged_shard_is_explicit_and_recorded(folder, tmp_path, capsys):
    broken = _copy(folder, tmp_path)
    info = json.loads((broken / "val.json").read_text())
    left = _cut_in_the_middle(broken)
    doc = evaluate(broken, tmp_path / "out", split="val", baseline="random", allow_incomplete=True, progress=False)
    lost = info["shard_sizes"][0] - left
    assert doc["metrics"]["num_samples"] == info["num_samples"] - lost
    assert doc["incomplete_shards"] == [{"shard": str(broken / "val-000000.tar"), "found": left,
                                         "recorded": info["shard_sizes"][0], "checksum_ok": False}]
    assert f"scoring without {lost} sample(s)" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["incomplete_shards"] == doc["incomplete_shards"]


def test_a_shard_garbled_without_losing_samples_fails_its_checksum(folder, tmp_path):
    broken = _copy(folder, tmp_path)
    shard = broken / "val-000001.tar"
    with tarfile.open(shard) as tar:
        image = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    data = bytearray(shard.read_bytes())
    data[image.offset_data + 100] ^= 0xFF  # one flipped byte inside a picture: the tar still reads whole
    shard.write_bytes(bytes(data))
    mismatches = []
    assert len(list(iter_annotations(broken, "val", mismatches))) == 12  # every sample still reads
    assert [m["checksum_ok"] for m in mismatches] == [False]
    with pytest.raises(EvaluationError, match=r"val-000001\.tar does not match its checksum in val\.json"):
        evaluate(broken, tmp_path / "out", split="val", baseline="random", allow_incomplete=True, progress=False)


def test_verify_checks_every_shard_of_a_folder(folder, tmp_path):
    def verify(*argv):
        return subprocess.run([sys.executable, "-m", "datamodules.verify", *argv], capture_output=True, text=True,
                              cwd=ROOT, timeout=300)

    ok = verify(str(folder))
    assert ok.returncode == 0 and ok.stdout.strip() == "ok  val: 12 samples, every shard intact", ok.stdout
    broken = _copy(folder, tmp_path)
    _cut_in_the_middle(broken)
    bad = verify(str(broken))
    assert bad.returncode == 1 and bad.stdout.startswith("DAMAGED  val: ") and "val-000000.tar holds 2" in bad.stdout
    assert verify(str(tmp_path / "nowhere")).returncode == 2


def _truncate(folder) -> None:
    shard = folder / "val-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _garble(folder) -> None:
    shard = folder / "val-000000.tar"
    shard.write_bytes(bytes(range(256)) * (shard.stat().st_size // 256))


@pytest.mark.parametrize("damage", [_cut_in_the_middle, _truncate, _garble])
@pytest.mark.parametrize("train", [False, True])
def test_the_training_pipeline_counts_every_sample_a_damaged_shard_lost(folder, tmp_path, damage, train, caplog):
    """Read, the samples a shard lost are counted one by one against {split}.json (not one per
    error, and not zero for a shard that reads as a shorter valid tar)."""
    from datamodules.pipeline import ShardStream

    broken = _copy(folder, tmp_path)
    damage(broken)
    stream = ShardStream(broken, "val", image_size=16, batch_size=4, train=train, shuffle_buffer=1)
    with caplog.at_level("WARNING", logger="datamodules"):
        keys = [k for batch in stream for k in batch["key"]]
    if train:  # the epoch's three batches need more than one pass over the ten or fewer samples left
        passes = stream.num_skipped // (12 - len(set(keys)))
        assert passes >= 1 and stream.num_skipped == passes * (12 - len(set(keys)))
    else:
        assert stream.num_skipped == 12 - len(keys) > 0
    assert "val-000000.tar holds" in caplog.text and "val.json records 6" in caplog.text
