"""PIPE converter on a tiny parquet built from real photos with a pasted object."""
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data as skdata

from datamodules.convert import clean_pipe_category, convert_pipe
from datamodules.shard_reader import iter_annotations, read_split_info

BOX = (150, 120, 230, 180)  # where the object is pasted into the astronaut photo (x1, y1, x2, y2)


def png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpg(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pipe_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    bg = skdata.astronaut()[::2, ::2].copy()                    # 256x256 real photo: the background
    cat = np.asarray(Image.fromarray(skdata.chelsea()).resize((BOX[2] - BOX[0], BOX[3] - BOX[1])))
    tgt = bg.copy()
    tgt[BOX[1]:BOX[3], BOX[0]:BOX[2]] = cat                    # the image WITH the object
    coffee = skdata.coffee()[::2, ::2].copy()                  # 200x300, no change between source and target
    rows = {
        "source_img": [{"bytes": png(bg), "path": None}, {"bytes": png(bg), "path": None},
                       {"bytes": jpg(coffee), "path": None}, {"bytes": b"not an image", "path": None}],
        "target_img": [{"bytes": png(tgt), "path": None}, {"bytes": png(tgt), "path": None},
                       {"bytes": jpg(coffee), "path": None}, {"bytes": png(tgt), "path": None}],
        "Instruction_Class": ["Add a cat", "Add a cat", "add the cup", "Add a dog"],
        "img_id": ["1001", "1002", "1003", "1004"],
        "ann_id": ["7", "8", "9", "10"],
    }
    pq.write_table(pa.table(rows), d / "pipe.parquet", row_group_size=2)
    mask = np.zeros((512, 512), np.uint8)                       # masks come at another resolution
    mask[BOX[1] * 2:BOX[3] * 2, BOX[0] * 2:BOX[2] * 2] = 255
    pq.write_table(pa.table({"mask": [{"bytes": png(mask), "path": None}], "target_img_dataset": ["COCO"],
                             "img_id": ["1001"], "ann_id": ["7"]}), d / "masks.parquet")
    return d


def test_pipe_mask_and_difference_boxes(pipe_files, tmp_path):
    w = convert_pipe([pipe_files / "pipe.parquet"], tmp_path, "train", mask_paths=[pipe_files / "masks.parquet"],
                     batch_rows=1, progress=False)["train"]
    assert w.written == 2
    assert w.dropped == {"no mask and difference area < 64 px": 1, "unreadable source image": 1}
    assert dict(w.box_sources) == {"mask": 1, "difference": 1}
    got = {s["key"]: s for s in iter_annotations(tmp_path, "train")}
    assert set(got) == {"pipe-1001-7", "pipe-1002-8"}
    m, d = got["pipe-1001-7"], got["pipe-1002-8"]
    assert m["positives"] == [list(map(float, BOX))] and m["meta"]["box_from"] == "mask"
    assert np.abs(np.array(d["positives"][0]) - BOX).max() <= 1 and d["meta"]["box_from"] == "difference"
    assert m["category"] == "cat" and m["negatives"] == [] and (m["width"], m["height"]) == (256, 256)
    assert read_split_info(tmp_path, "train")["source"] == "pipe"


def test_pipe_min_area_and_threshold_drop_everything_without_masks(pipe_files, tmp_path):
    """80x60 = 4800 changed pixels: min_area 4801 (or threshold 255) leaves nothing -> a clear
    error naming the reasons, and no split json, so nothing looks converted."""
    from datamodules.shard_format import ShardFormatError
    for kw in ({"min_area": 80 * 60 + 1}, {"diff_threshold": 255}):
        with pytest.raises(ShardFormatError, match="difference area"):
            convert_pipe([pipe_files / "pipe.parquet"], tmp_path, "train", progress=False, **kw)
        assert not (tmp_path / "train.json").exists() and not list(tmp_path.glob("**/*.tar*"))
    w = convert_pipe([pipe_files / "pipe.parquet"], tmp_path, "train", min_area=80 * 60 - 400, progress=False)["train"]
    assert w.written == 2


def test_clean_pipe_category():
    assert clean_pipe_category("Add a dog") == "dog"
    assert clean_pipe_category("insert an old car.") == "old car"
    assert clean_pipe_category("umbrella") == "umbrella"
