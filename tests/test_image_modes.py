"""Every image mode PIL opens reaches the model with the right values -- through the shard writer and
the training pipeline, and through the placement API / insert.py (`to_rgb_image`, the one
conversion) -- checked against reference conversions written here from the definitions (palette
lookup, alpha over white, 16-bit / 257, PIL's CMYK formula, BT.601 YCbCr, CIELAB D50 -> sRGB)."""
import colorsys
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms
from skimage import color
from skimage import data as skdata

from datamodules.pipeline import decode_sample
from datamodules.shard_format import decode_image
from datamodules.shard_writer import ShardWriter
from genloc.images import to_rgb_image

SIZE = 32
BASE = np.asarray(Image.fromarray(skdata.astronaut()).resize((SIZE, SIZE), Image.BILINEAR))  # a real photo
GRAY = np.asarray(Image.fromarray(BASE).convert("L"))
ALPHA = np.tile(np.linspace(0, 255, SIZE).round().astype(np.uint8), (SIZE, 1))  # transparent -> opaque


def rgb3(gray):
    return np.repeat(gray[..., None], 3, axis=-1)


def over_white(rgb, alpha):
    a = alpha[..., None].astype(np.float64) / 255
    return np.rint(rgb * a + 255 * (1 - a)).astype(np.uint8)


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """PIL's LAB bytes (L * 255 / 100, signed a, b) -> sRGB: CIELAB (D50) -> XYZ -> Bradford to D65."""
    lab_f = np.stack([lab[..., 0] / 255 * 100, lab[..., 1].view(np.int8), lab[..., 2].view(np.int8)], -1).astype(float)
    bradford = np.array([[0.9555766, -0.0230393, 0.0631636], [-0.0282895, 1.0099416, 0.0210077],
                         [0.0122982, -0.0204830, 1.3299098]])
    return color.xyz2rgb(color.lab2xyz(lab_f, illuminant="D50") @ bradford.T) * 255


def file_cases() -> dict:
    """mode -> (encoded bytes, reference 8-bit RGB, tolerance, note expected in the summary or None)."""
    out = {"RGB png": (encode(Image.fromarray(BASE), "PNG"), BASE, 0, None),
           "L png": (encode(Image.fromarray(GRAY), "PNG"), rgb3(GRAY), 0, None),
           "1 png": (encode(Image.fromarray(GRAY > 128), "PNG"), rgb3((GRAY > 128) * np.uint8(255)), 0, None)}
    pal = Image.fromarray(BASE).quantize(16)
    idx = np.asarray(pal)
    palette = np.asarray(pal.getpalette()[:48], np.uint8).reshape(16, 3)
    out["P png"] = (encode(pal, "PNG"), palette[idx], 0, None)
    transparent = pal.copy()
    transparent.info["transparency"] = int(idx[0, 0])
    buf = io.BytesIO()
    transparent.save(buf, format="PNG", transparency=int(idx[0, 0]))
    out["P+transparency png"] = (buf.getvalue(), np.where((idx == idx[0, 0])[..., None], 255, palette[idx]).astype(np.uint8),
                                 0, "transparent pixels composited over white")
    out["LA png"] = (encode(Image.fromarray(np.stack([GRAY, ALPHA], -1), "LA"), "PNG"), over_white(rgb3(GRAY), ALPHA), 0,
                     "composited over white")
    pa = pal.convert("PA")
    pa.putalpha(Image.fromarray(ALPHA))
    out["PA tiff"] = (encode(pa, "TIFF"), over_white(palette[idx], ALPHA), 0, "composited over white")
    out["RGBA png"] = (encode(Image.fromarray(np.dstack([BASE, ALPHA]), "RGBA"), "PNG"), over_white(BASE, ALPHA), 0,
                       "composited over white")
    for fmt in ("JPEG", "TIFF"):
        data = encode(Image.fromarray(BASE).convert("CMYK"), fmt)
        cmyk = np.asarray(Image.open(io.BytesIO(data))).astype(np.float64)     # the values the file holds
        ref = np.rint((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255).astype(np.uint8)
        out[f"CMYK {fmt.lower()}"] = (data, ref, 0, "CMYK image converted")
    sixteen = GRAY.astype(np.uint16) * 257 + np.random.default_rng(0).integers(0, 200, GRAY.shape).astype(np.uint16)
    ref16 = rgb3(np.rint(sixteen / 257).astype(np.uint8))
    out["I;16 png"] = (encode(Image.fromarray(sixteen), "PNG"), ref16, 0, "16-bit")
    out["I tiff (16-bit values)"] = (encode(Image.fromarray(sixteen.astype(np.int32)), "TIFF"), ref16, 0, "16-bit")
    out["I tiff (8-bit values)"] = (encode(Image.fromarray(GRAY.astype(np.int32)), "TIFF"), rgb3(GRAY), 0, "as 8-bit")
    out["F tiff [0, 1]"] = (encode(Image.fromarray(GRAY.astype(np.float32) / 255), "TIFF"), rgb3(GRAY), 0, "[0, 1]")
    out["F tiff 0..255"] = (encode(Image.fromarray(GRAY.astype(np.float32) + 0.25), "TIFF"), rgb3(GRAY), 0, "up to 255")
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    lab = ImageCms.applyTransform(Image.fromarray(BASE), to_lab)
    out["LAB tiff"] = (encode(lab, "TIFF"), lab_to_srgb(np.asarray(lab)), 1.5, "LAB image converted to sRGB")
    return out


CASES = file_cases()


def close_enough(got: np.ndarray, ref: np.ndarray, tolerance: float) -> bool:
    diff = np.abs(got.astype(np.float64) - ref)
    return diff.max() == 0 if tolerance == 0 else diff.mean() <= tolerance


@pytest.mark.parametrize("name", sorted(CASES))
def test_placement_path_matches_the_reference(name, tmp_path):
    data, ref, tolerance, note = CASES[name]
    path = tmp_path / "image"
    path.write_bytes(data)
    img, notes = to_rgb_image(path)
    assert img.mode == "RGB" and img.size == (SIZE, SIZE)
    assert close_enough(np.asarray(img), ref, tolerance), (name, np.abs(np.asarray(img) - ref.astype(float)).max())
    assert (note is None) == (not notes) and (note is None or note in " ".join(notes)), (name, notes)


def test_shard_path_matches_the_reference_and_stores_exact_images_verbatim(tmp_path):
    """Written through the shard writer, read by the training pipeline (image_size = the image's own, so
    resizing is the identity): the values the model gets equal the reference."""
    w = ShardWriter(tmp_path, "train", source="test", num_shards=1, image_format="png")
    keys = {}
    for i, (name, (data, _, _, _)) in enumerate(sorted(CASES.items())):
        keys[f"s{i}"] = name
        assert w.write(f"s{i}", {"category": "x", "positives": [[1, 1, 10, 10]]}, image_bytes=data) is None, name
    w.close()
    members = {}
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            members.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
    for key, name in keys.items():
        data, ref, tolerance, note = CASES[name]
        sample = decode_sample(members[key], SIZE)
        got = np.rint(sample["image"].permute(1, 2, 0).numpy() * 255)
        assert close_enough(got, ref, tolerance), (name, np.abs(got - ref).max())
        stored = members[key].get("png", members[key].get("jpg"))
        assert (stored == data) == (note is None), name     # exact modes verbatim, others converted once
    summary = w.summary()
    for name, (_, _, _, note) in CASES.items():
        if note is not None:
            assert note in summary, (name, summary)


def test_sixteen_bit_png_is_not_near_white(tmp_path):
    data, ref, _, _ = CASES["I;16 png"]
    naive = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert naive.mean() > 240 > ref.mean() + 100 and abs(ref.mean() - GRAY.mean()) < 1  # PIL clips 16-bit to white
    w = ShardWriter(tmp_path, "train", source="test", num_shards=1)
    assert w.write("a", {"category": "x", "positives": [[1, 1, 10, 10]]}, image_bytes=data) is None
    assert w.write("b", {"category": "x", "positives": [[1, 1, 10, 10]]}, image=np.asarray(Image.open(io.BytesIO(data)))) is None
    w.close()
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        images = [np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
                  for m in tar if not m.name.endswith(".json")]
    assert len(images) == 2 and all(abs(im.mean() - ref.mean()) < 2 for im in images)   # jpg: lossy, not white
    assert "16-bit" in w.summary()


def test_in_memory_modes_match_the_reference():
    rng = np.random.default_rng(1)
    ycc = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    ref = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                    y + 1.772 * (cb - 128)], -1).clip(0, 255)
    got = np.asarray(to_rgb_image(Image.frombytes("YCbCr", (8, 8), ycc.tobytes()))[0]).astype(np.float64)
    assert np.abs(got - ref).max() <= 1
    hsv = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    ref = np.array([[colorsys.hsv_to_rgb(*(p / 255)) for p in row] for row in hsv]) * 255
    got = np.asarray(to_rgb_image(Image.frombytes("HSV", (8, 8), hsv.tobytes()))[0]).astype(np.float64)
    assert np.abs(got - ref).max() <= 1


def test_decode_image_reports_format_mode_and_notes():
    dec = decode_image(CASES["RGBA png"][0])
    assert (dec.format, dec.mode, dec.image.mode) == ("PNG", "RGBA", "RGB") and dec.notes
    with pytest.raises(Exception):
        decode_image(CASES["RGB png"][0][:200])                 # truncated: fails at once, not in a worker
    assert json.dumps(decode_image(CASES["L png"][0]).notes) == "[]"


def test_training_pipeline_reads_a_sixteen_bit_shard_image_with_its_values():
    """Shards from other tools may hold 16-bit PNGs: the pipeline converts them like the writer does."""
    values = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257)  # 0..65535 ramp
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")
    ann = {"category": "cup", "width": 16, "height": 16, "positives": [[1, 1, 8, 8]], "negatives": []}
    sample = {"__key__": "k", "png": buf.getvalue(), "json": json.dumps(ann).encode()}
    image = decode_sample(sample, 16)["image"]
    expected = torch.from_numpy(np.round(values / 257.0).astype(np.float32) / 255.0)
    torch.testing.assert_close(image[0], expected, atol=1 / 255, rtol=0)
    assert float(image.mean()) < 0.6  # a plain convert("RGB") clips the ramp to near-white
