"""OPA shards keep each sample's foreground and mask (optional members) for copy-paste composites;
shards without them still read. Real pixels: the airplane of OPA's composite_1 (fg 160915) and its mask."""
import numpy as np
import pytest
from PIL import Image

from datamodules.composites import CompositeDataset, index_samples
from datamodules.convert import convert_opa
from datamodules.pipeline import ShardStream
from datamodules.shard_format import ShardFormatError
from tests.test_data_opa import OPA, make_opa_release

BOX = (465, 122, 580, 145)  # the airplane's box in composite_1 (FOPA centre (522, 133), 115x23)


def _release_with_real_masks(root):
    make_opa_release(root)
    mask = Image.open(OPA / "eval_opascore_examples" / "mask_1.jpg").convert("L").crop(BOX)
    paths = sorted((root / "foreground" / "airplane").glob("mask_*.jpg"))
    for p in paths:
        mask.save(p)
    return np.asarray(Image.open(paths[0]).convert("L")) > 127  # as stored (JPEG), thresholded


def test_opa_converter_keeps_the_foreground_and_its_binary_mask(tmp_path):
    real_mask = _release_with_real_masks(tmp_path / "OPA")
    convert_opa(tmp_path / "OPA", tmp_path / "out", progress=False)
    (s,) = index_samples(tmp_path / "out", "test")
    assert {"fg.jpg", "fgmask.png"} <= set(s.members) and s.ann["meta"]["foreground_id"] in s.ann["meta"]["fg_ids"]
    assert s.read("fg.jpg") == (tmp_path / "OPA" / "foreground" / "airplane" /
                                f"{s.ann['meta']['foreground_id']}.jpg").read_bytes()  # verbatim
    mask = s.image("fgmask.png")
    assert set(np.unique(mask)) <= {0, 255} and np.array_equal(mask > 127, real_mask)
    # labelled composites: the OPA positive and negative pasted with the real airplane, labels 1 and 0
    data = CompositeDataset(tmp_path / "out", "test", image_size=64)
    assert sorted(y for _, _, y in data.items) == [0.0, 1.0]
    item = data[0]
    assert item["input"].shape == (4, 64, 64) and item["input"][3].sum() > 0
    # the location pipeline reads the same shards as before
    batch = next(iter(ShardStream(tmp_path / "out", "test", image_size=32, batch_size=1, train=False)))
    assert batch["key"] == ["opa-580029-airplane"] and len(batch["positives"][0]) == 1


def test_shards_without_foregrounds_still_read_and_composites_say_what_is_missing(tmp_path):
    make_opa_release(tmp_path / "OPA")
    for p in (tmp_path / "OPA" / "foreground" / "airplane").glob("mask_*.jpg"):
        p.unlink()  # no mask files: no foreground members (an older conversion looks the same)
    convert_opa(tmp_path / "OPA", tmp_path / "out", progress=False)
    (s,) = index_samples(tmp_path / "out", "test")
    assert not {"fg.jpg", "fgmask.png"} & set(s.members) and "foreground_id" not in s.ann["meta"]
    batch = next(iter(ShardStream(tmp_path / "out", "test", image_size=32, batch_size=1, train=False)))
    assert batch["key"] == ["opa-580029-airplane"]
    data = CompositeDataset(tmp_path / "out", "test", image_size=32)
    with pytest.raises(ShardFormatError, match="opa-580029-airplane: no foreground"):
        data[0]
