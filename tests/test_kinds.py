"""Data kinds: the registry, and the generic pipeline applying a kind's hooks only when the shard
folder's "source" names that kind. The toy hooks themselves: tests/test_toy_scenes.py."""
import pytest
import torch
from PIL import Image

from datamodules import kinds
from datamodules.kinds import DataKind, data_kind
from datamodules.pipeline import ShardStream
from datamodules.shard_writer import ShardWriter


def test_registry_lookup():
    import datamodules.toy as toy

    assert data_kind("toy") is toy.DATA_KIND and data_kind("toy").plausible is not None
    for name in (None, "opa", "pipe", "something else"):
        kind = data_kind(name)
        assert kind == DataKind(name) and kind.prepare is kind.flip_meta is kind.plausible is None


def test_registered_module_without_data_kind_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(kinds.REGISTRY, "broken", "json")       # a module without DATA_KIND
    with pytest.raises(TypeError, match=r"data kind 'broken': module json must define DATA_KIND"):
        data_kind("broken")


def _scene_folder(d, source):
    """Two samples whose meta holds a scene description, in a folder whose split says `source`."""
    w = ShardWriter(d, "train", source=source, num_shards=1)
    for i in range(2):
        w.write(f"s-{i}", {"category": "car", "positives": [[2, 1, 8, 5]], "negatives": [],
                           "meta": {"scene": {"hflip": False, "seed": i}}}, image=Image.new("RGB", (20, 10)))
    w.close()


@pytest.mark.parametrize("source, scene_flipped", [("toy", True), ("opa", False)])
def test_pipeline_flips_meta_only_through_the_kind_hook(tmp_path, source, scene_flipped):
    _scene_folder(tmp_path, source)
    stream = ShardStream(tmp_path, "train", image_size=8, batch_size=2, train=True, flip_prob=1.0, shuffle_buffer=0)
    assert stream.kind == data_kind(source)
    (batch,) = list(stream)
    for meta, boxes in zip(batch["meta"], batch["positives"]):
        assert meta["hflip"] is True                                               # the sample was mirrored
        assert torch.allclose(boxes, torch.tensor([[1 - 8 / 20, 0.1, 1 - 2 / 20, 0.5]]))
        assert meta["scene"]["hflip"] is scene_flipped
