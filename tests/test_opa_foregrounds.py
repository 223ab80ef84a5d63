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


def test_opa_composite_set_converts_to_labelled_composites(tmp_path):
    """OPA's two real composites of fg 160915 on bg 580029: composite_0 a negative, composite_1 a positive."""
    import shutil

    from datamodules.convert import convert_opa_composites

    make_opa_release(tmp_path / "OPA")
    folder = tmp_path / "OPA" / "composite" / "test_set"
    folder.mkdir(parents=True)
    names = {0: "160915_580029_89_394_115_23_0.1802_0.jpg", 1: "160915_580029_465_122_115_23_0.1802_1.jpg"}
    for i, name in names.items():
        shutil.copy(OPA / "eval_opascore_examples" / f"composite_{i}.jpg", folder / name)
        shutil.copy(OPA / "eval_opascore_examples" / f"mask_{i}.jpg", folder / f"mask_{name}")
    report = convert_opa_composites(tmp_path / "OPA", tmp_path / "out", splits=("test",), progress=False)
    assert report["test"].written == 2
    by_label = {s.ann["meta"]["label"]: s for s in index_samples(tmp_path / "out", "test")}
    assert by_label[1].ann["positives"] == [[465, 122, 580, 145]] and by_label[1].ann["negatives"] == []
    assert by_label[0].ann["negatives"] == [[89, 394, 204, 417]] and by_label[1].ann["category"] == "airplane"
    data = CompositeDataset(tmp_path / "out", "test", image_size=64)
    assert sorted(y for _, _, y in data.items) == [0.0, 1.0]
    for i, (k, _, y) in enumerate(data.items):
        s = data.samples[k]
        mask = np.asarray(Image.open(OPA / "eval_opascore_examples" / f"mask_{int(y)}.jpg").convert("L")) > 127
        assert np.array_equal(s.image("composite_mask.png") > 127, mask)
        assert data[i]["input"][3].sum() > 0
    (folder / f"mask_{names[0]}").unlink()
    with pytest.raises(Exception, match="mask file mask_160915_580029_89"):
        convert_opa_composites(tmp_path / "OPA", tmp_path / "out2", splits=("test",), progress=False)
