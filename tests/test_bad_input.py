"""Bad input survey: each case gives a clear message (train.py: exit 2 and one line) or a counted,
logged skip; never a hang or a crash deep in a worker. Cases already covered elsewhere are named:
- truncated tar shard (reader level): tests/test_data_pipeline.py::test_truncated_tar_is_reported_not_fatal
- missing/empty split, fewer shards than readers (ShardStream): tests/test_data_pipeline.py::test_clear_errors
- unknown toy category in the oracle: tests/test_toy_scenes.py (KeyError naming it)
- wrong config types: tests/test_train.py::test_bad_config_exits_nonzero_with_one_line_before_building
Here they are exercised end to end (datamodule or train.py), together with the rest."""
import io
import json
import logging
import math
import shutil
import tarfile

import pytest
import torch

import train as train_script
from configs.schema import load_config
from datamodules import ShardDataModule
from datamodules.pipeline import decode_sample
from genloc.checkpoint import CheckpointError, save_model_checkpoint
from genloc import LocationModel, LocationModelConfig
from tests.helpers.runs import tiny_run_overrides
from tests.helpers.shards import record_checksums


def rewrite_sample(shard, edit) -> str:
    """Rewrite one tar shard with `edit(name, data) -> data` applied to its first sample's members, as
    a conversion that wrote the bad sample would have (its checksum recorded)."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    first = members[0][0].split(".")[0]
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            if name.split(".")[0] == first:
                data = edit(name, data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    record_checksums(shard)
    return first


def edit_json(change):
    def edit(name, data):
        if not name.endswith(".json"):
            return data
        ann = json.loads(data)
        change(ann)
        return json.dumps(ann).encode()  # json writes NaN as the literal NaN, which json.loads reads back
    return edit


CORRUPTIONS = {
    "corrupt_jpeg": (lambda name, data: data[:60] if name.endswith(".jpg") else data, "unreadable image"),
    "box_outside_image": (edit_json(lambda a: a.update(positives=[[0, 0, a["width"] + 40, a["height"]]])),
                          "outside the"),
    "zero_area_box": (edit_json(lambda a: a.update(positives=[[10, 10, 10, 30]])),
                      "empty (needs x1 < x2 and y1 < y2): positive box"),
    "nan_in_json": (edit_json(lambda a: a.update(positives=[[math.nan, 1, 5, 5]])),
                    "not finite (NaN or infinite coordinate): positive box"),
}


@pytest.fixture
def toy_copy(tiny_toy_data, tmp_path):
    shutil.copytree(tiny_toy_data / "toy-pipe", tmp_path / "toy-pipe")
    return tmp_path / "toy-pipe"


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_bad_sample_is_skipped_counted_and_named(case, toy_copy, caplog):
    edit, reason = CORRUPTIONS[case]
    key = rewrite_sample(toy_copy / "val-000000.tar", edit)
    dm = ShardDataModule(str(toy_copy), image_size=16, batch_size=4, train_split=None)
    dm.setup("validate")
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        keys = [k for batch in dm.val_dataloader() for k in batch["key"]]
    assert len(keys) == 7 and key not in keys
    assert dm.num_skipped == {"val": 1}
    assert key in caplog.text and reason in caplog.text, caplog.text


def test_truncated_tar_and_bad_samples_in_a_training_run_are_skipped(toy_copy, tmp_path):
    """The training stream (fixed batch count, worker process) survives a truncated shard and a bad
    sample: the run finishes and the skips are counted."""
    rewrite_sample(toy_copy / "train-000000.tar", CORRUPTIONS["nan_in_json"][0])
    for shard in toy_copy.glob("train-*.tar"):  # ~8 of 16 samples each are left: 12 are needed
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])
    # unchecked reading (data.verify=unchecked, or shards of a conversion without checksums): the samples before
    # each tear are read; checked reading drops torn shards whole (tests/test_shard_checksums.py)
    cfg = load_config(["experiment=toy_pretrain", "data.num_workers=1", "data.verify=unchecked"]
                      + tiny_run_overrides(toy_copy, tmp_path, steps=3)[:-1] + ["trainer.val_check_interval=3"])
    result = train_script.train(cfg)
    assert result["trainer"].global_step == 3
    assert result["datamodule"].num_skipped["train"] >= 2  # both torn shards, counted in the worker
    recorded = json.loads((result["run_dir"] / "metrics.json").read_text())
    assert recorded["data/skipped_samples/train"] == result["datamodule"].num_skipped["train"]


def test_unknown_category():
    """OPA/PIPE: any category string is valid (the CLIP text encoder reads free text); toy data: the
    oracle refuses a category it has no rule for, naming it (tests/test_toy_scenes.py)."""
    from datamodules.toy import is_plausible

    buf = io.BytesIO()
    from PIL import Image
    Image.new("RGB", (20, 10)).save(buf, format="JPEG")
    ann = {"category": "okapi wearing a hat", "width": 20, "height": 10, "positives": [[1, 1, 5, 5]]}
    sample = decode_sample({"__key__": "k", "json": json.dumps(ann).encode(), "jpg": buf.getvalue()}, 16)
    feats = LocationModel(LocationModelConfig.preset("tiny")).encode_texts([sample["category"]])
    assert torch.isfinite(feats).all()
    scene = {"horizon": 0.5, "tables": []}
    with pytest.raises(KeyError, match="unknown toy category 'okapi wearing a hat'.*car"):
        is_plausible(scene, sample["category"], [0.1, 0.6, 0.3, 0.7])


def run_main(args, capsys) -> tuple[int, str]:
    code = train_script.main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def test_empty_split_is_a_one_line_error(tmp_path, capsys):
    data = tmp_path / "empty"
    data.mkdir()
    for split in ("train", "val"):
        (data / f"{split}.json").write_text(json.dumps({"num_samples": 0, "num_shards": 0, "source": "toy"}))
    code, err = run_main(tiny_run_overrides(data, tmp_path / "runs"), capsys)
    assert code == 2 and "empty split" in err and "train_split" in err, err
    assert len(err.splitlines()) == 1


def test_fewer_shards_than_ranks_times_workers_is_a_one_line_error(tiny_toy_data, tmp_path, capsys):
    args = tiny_run_overrides(tiny_toy_data / "toy-pipe", tmp_path) + ["data.num_workers=3"]
    code, err = run_main(args, capsys)
    assert code == 2 and "2 shards for 1 rank(s) x 3 worker(s)" in err and "--num-shards 3" in err, err


def test_missing_weights_offline_names_the_key(tiny_toy_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = tiny_run_overrides(tiny_toy_data / "toy-pipe", tmp_path) + ["model.vit_weights=/nonexistent/vit.pth"]
    code, err = run_main(args, capsys)
    assert code == 2 and "vit_weights" in err and "/nonexistent/vit.pth" in err, err


@pytest.mark.parametrize("override, key", [("data.batch_size=four", "data.batch_size"),
                                           ("trainer.num_nodes=1.5", "trainer.num_nodes"),
                                           ("trainer.deterministic=maybe", "trainer.deterministic")])
def test_wrong_config_type_names_the_key(override, key, tmp_path, capsys):
    code, err = run_main([override, f"log_root={tmp_path}"], capsys)
    assert code == 2 and key in err and len(err.splitlines()) == 1, err


def write_fake_last(run_dir, model_config: dict, **hparams) -> None:
    model = LocationModel(LocationModelConfig.from_dict(model_config))
    save_model_checkpoint(model, run_dir / "checkpoints" / "last.ckpt", **hparams)


def test_incompatible_last_checkpoint_is_an_error_not_a_restart(tiny_toy_data, tmp_path, capsys):
    """A last.ckpt of another model config (or another stage) under the run dir stops the run with
    the differing keys named; a corrupt one is tests/test_train.py::test_corrupt_last_checkpoint_is_an_error_not_a_restart."""
    args = ["experiment=toy_pretrain"] + tiny_run_overrides(tiny_toy_data / "toy-pipe", tmp_path)
    cfg = load_config(args)
    other = train_script.model_config(load_config(args + ["model.num_bins=32"])).to_dict()
    write_fake_last(train_script.run_dir(cfg), other)
    code, err = run_main(args, capsys)
    assert code == 2 and "another model config" in err and "num_bins: checkpoint 32 vs config 64" in err, err

    same = train_script.model_config(cfg).to_dict()
    shutil.rmtree(train_script.run_dir(cfg))
    write_fake_last(train_script.run_dir(cfg), same, beta=0.1)
    with pytest.raises(CheckpointError, match=r"written by lightning_modules\.DPOModule.*module is lightning_modules\.MLEModule"):
        train_script.train(cfg)


@pytest.mark.parametrize("recorded, resumes", [
    ("lightning_modules.MLEModule", True), ("lightning_modules.mle.MLEModule", True),  # today's and the old spelling
    ("lightning_modules.dpo.DPOModule", False), ("lightning_modules.DPOModule", False)])
def test_a_checkpoint_names_its_module_in_the_config_spelling_and_old_spellings_still_resume(recorded, resumes, tmp_path):
    from lightning_modules import DPOModule, MLEModule
    from lightning_modules.checkpoint import check_resumable
    from lightning_modules.mle import MODULE_KEY, module_path

    assert (module_path(MLEModule), module_path(DPOModule)) == ("lightning_modules.MLEModule", "lightning_modules.DPOModule")
    assert load_config([]).module._target_ == module_path(MLEModule)  # the config's spelling is the recorded one
    model_config = LocationModelConfig.preset("tiny").to_dict()
    ckpt = {"hyper_parameters": {"model_config": model_config}, "state_dict": {}, MODULE_KEY: recorded}
    if resumes:
        check_resumable(ckpt, tmp_path / "last.ckpt", model_config, MLEModule)
    else:
        with pytest.raises(CheckpointError, match=r"written by lightning_modules\.DPOModule but this run's module is "
                                                  r"lightning_modules\.MLEModule"):
            check_resumable(ckpt, tmp_path / "last.ckpt", model_config, MLEModule)
