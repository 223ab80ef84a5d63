#!/usr/bin/env python
"""Converters: throughput with --workers 2 against 1 worker on real photos, and the peak memory of a
streamed PIPE conversion.

1. Throughput, measured side by side (1 and 2 workers alternate, best of --repeats each): an OPA
   release of real photos (scikit-image's sample photos as JPEG at their own 300-640 px size) through
   `convert_opa`, and a PIPE-format parquet (the same photos as source, an object pasted into the
   target, no masks: difference boxes) through `convert_pipe`.
2. Routes, measured side by side (alternating, best of --repeats, 1 worker each): rows per second of the
   OPA converter, the manifest converter (one row per sample of that OPA release: the same photos and
   boxes), the COCO converter with --keep-objects (the same photos, two polygon-masked objects each)
   and with --remove-objects through the tiny random SD inpainting pipeline at 2 steps (--remove-images
   photos: the converter's own work around an inpainter -- masks, paste-back, lossless storage -- not
   a real model's time).
3. Memory: PIPE-format parquets of --pipe-rows (default 10,000) rows and of a fifth of that, written a
   row group at a time, each converted by `python -m scripts.convert_pipe` in a child process; prints
   the file size, the child's resident memory after the imports and its peak during the conversion
   (streaming: the increase stays the same for the 5x larger file).

The last line is ``RESULT {json}`` for benchmarks/run_all.py. Example:
  python -m benchmarks.convert_speed
  python -m benchmarks.convert_speed --quick    # smaller inputs, for make bench
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def photos() -> list[np.ndarray]:
    from skimage import data as sk

    return [sk.astronaut(), sk.coffee(), sk.chelsea(), sk.rocket(), sk.immunohistochemistry()]


def jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def opa_release(root: Path, backgrounds: int) -> int:
    """OPA layout with ``backgrounds`` real-photo backgrounds and 2 categories each; returns the samples."""
    (root / "background" / "any").mkdir(parents=True)
    for cat in ("person", "car"):
        (root / "foreground" / cat).mkdir(parents=True)
    pics = photos()
    for b in range(backgrounds):
        (root / "background" / "any" / f"{b + 1}.jpg").write_bytes(jpeg(pics[b % len(pics)]))
    Image.fromarray(pics[0][:16, :16]).save(root / "foreground" / "person" / "1.jpg")
    Image.fromarray(pics[1][:16, :16]).save(root / "foreground" / "car" / "2.jpg")
    with open(root / "train_set.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fg_id", "bg_id", "position", "label"])
        for b in range(backgrounds):
            w.writerow([1, b + 1, "[20, 30, 60, 120]", 1])
            w.writerow([2, b + 1, "[100, 150, 120, 60]", b % 2])
    return 2 * backgrounds


def pipe_parquet(path: Path, rows: int, size=(384, 288), group: int = 250) -> None:
    """PIPE columns (source_img, target_img, Instruction_Class, img_id, ann_id), written a row group at a
    time: the writer never holds the file either. 40 distinct photo crops, each row its own ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    pics = photos()
    pairs = []
    for i in range(40):
        pic = pics[i % len(pics)]
        y, x = rng.integers(0, pic.shape[0] - size[1]), rng.integers(0, pic.shape[1] - size[0])
        src = pic[y:y + size[1], x:x + size[0]].copy()
        tgt = src.copy()
        oy, ox = rng.integers(0, size[1] - 60), rng.integers(0, size[0] - 60)
        tgt[oy:oy + 60, ox:ox + 60] = 255 - tgt[oy:oy + 60, ox:ox + 60]
        pairs.append(({"bytes": jpeg(src, 97), "path": None}, {"bytes": jpeg(tgt, 97), "path": None}))
    schema = None
    writer = None
    for start in range(0, rows, group):
        idx = range(start, min(start + group, rows))
        table = {"source_img": [pairs[i % 40][0] for i in idx], "target_img": [pairs[i % 40][1] for i in idx],
                 "Instruction_Class": ["Add a thing"] * len(idx), "img_id": [str(i) for i in idx],
                 "ann_id": ["1"] * len(idx)}
        t = pa.table(table, schema=schema)
        if writer is None:
            schema = t.schema
            writer = pq.ParquetWriter(path, schema)
        writer.write_table(t)
    writer.close()


def manifest_and_coco(root: Path, backgrounds: int) -> None:
    """``manifest.jsonl`` with the OPA release's samples (same photos, same boxes) and ``instances.json``
    with two polygon-masked objects per photo, apart from each other (every one can be erased)."""
    pics = photos()
    rows, images, annotations = [], [], []
    for b in range(backgrounds):
        name = f"{b + 1}.jpg"
        rows.append({"image": name, "category": "person", "positives": [[20, 30, 80, 150]]})
        rows.append({"image": name, "category": "car", "positives": [[100, 150, 220, 210]][: b % 2],
                     "negatives": [[100, 150, 220, 210]][: 1 - b % 2]})
        h, w = pics[b % len(pics)].shape[:2]
        images.append({"id": b + 1, "file_name": name, "width": w, "height": h})
        for k, (x, y) in enumerate(((20, 30), (160, 150))):
            poly = [x, y, x + 60, y, x + 70, y + 50, x + 30, y + 90, x, y + 60]
            annotations.append({"id": 2 * b + k + 1, "image_id": b + 1, "category_id": k + 1, "iscrowd": 0,
                                "bbox": [x, y, 71, 91], "area": 4000, "segmentation": [poly]})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": [
        {"id": 1, "name": "person"}, {"id": 2, "name": "car"}]}))


def routes(tmp: Path, backgrounds: int, remove_images: int, repeats: int) -> dict[str, tuple[int, float]]:
    """(rows, best seconds) per converter route, the routes alternating, 1 worker each."""
    from datamodules.convert import convert_opa
    from datamodules.own_data import KEEP_OBJECTS, REMOVE_OBJECTS, convert_coco, convert_manifest
    from genloc.inpainters import load_backend
    from genloc.testing import save_sd

    images = tmp / "OPA" / "background" / "any"
    manifest_and_coco(images, backgrounds)
    (images / "removal").mkdir()
    removal = json.loads((images / "instances.json").read_text())
    removal["images"] = removal["images"][:remove_images]
    removal["annotations"] = [a for a in removal["annotations"] if a["image_id"] <= remove_images]
    (images / "removal" / "instances.json").write_text(json.dumps(removal))
    inpainter = load_backend("sd", save_sd(tmp / "sd"), steps=2)
    runs = {
        "OPA": (2 * backgrounds, lambda: convert_opa(tmp / "OPA", tmp / "r-opa", ["train"], progress=False)),
        "manifest": (2 * backgrounds, lambda: convert_manifest(images / "manifest.jsonl", tmp / "r-man",
                                                                progress=False)),
        "COCO --keep-objects": (2 * backgrounds, lambda: convert_coco(images / "instances.json", images, tmp / "r-keep",
                                                                      "train", KEEP_OBJECTS, progress=False)),
        "COCO --remove-objects (tiny inpainter)": (
            2 * remove_images, lambda: convert_coco(images / "removal" / "instances.json", images, tmp / "r-rem",
                                                    "train", REMOVE_OBJECTS, inpainter, progress=False)),
    }
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, (_, convert) in runs.items():
            best[name] = min(best[name], timed(convert))
    return {name: (rows, best[name]) for name, (rows, _) in runs.items()}


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def side_by_side(convert, repeats: int) -> dict[int, float]:
    """Best wall time per worker count, the counts alternating so machine load hits both alike."""
    best = {1: float("inf"), 2: float("inf")}
    for _ in range(repeats):
        for workers in (1, 2):
            best[workers] = min(best[workers], timed(lambda: convert(workers)))
    return best


# In a child: the imports, then the peak-RSS mark of the process reset (Linux clear_refs 5), then the
# conversion; prints resident memory after the imports and the peak over the conversion alone.
RUNNER = """
import runpy, sys
import datamodules.convert, scripts.convert_pipe
def status(field):
    return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1])
rss = status('VmRSS:')
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')
sys.argv = {argv!r}
runpy.run_module('scripts.convert_pipe', run_name='__main__')
print('KIB', rss, status('VmHWM:'))
"""


def conversion_memory_mib(argv: list[str]) -> tuple[float, float]:
    """(resident MiB after the imports, peak resident MiB during the conversion) of a child process."""
    proc = subprocess.run([sys.executable, "-c", RUNNER.format(argv=argv)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    rss, peak = proc.stdout.split("KIB")[-1].split()
    return int(rss) / 1024, int(peak) / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backgrounds", type=int, default=1000, help="OPA backgrounds (2 samples each; default 1000)")
    ap.add_argument("--pipe-rows", type=int, default=10_000, help="rows of the PIPE parquet for the memory run")
    ap.add_argument("--speed-rows", type=int, default=1000, help="PIPE rows for the throughput run")
    ap.add_argument("--remove-images", type=int, default=40, help="photos of the --remove-objects route (2 objects each)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="300 backgrounds, 300 + 2000 PIPE rows, 20 removal photos, "
                    "2 repeats")
    ap.add_argument("--routes-only", action="store_true", help="only the side-by-side rows/s of the converter routes")
    a = ap.parse_args(argv)
    if a.quick:
        a.backgrounds, a.speed_rows, a.pipe_rows, a.remove_images, a.repeats = 300, 300, 2000, 20, 2
    from datamodules.convert import convert_opa, convert_pipe

    result = {"cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = opa_release(tmp / "OPA", a.backgrounds)
        timings = routes(tmp, a.backgrounds, a.remove_images, a.repeats)
        opa_rate = timings["OPA"][0] / timings["OPA"][1]
        for name, (rows, seconds) in timings.items():
            print(f"{name:<40} {rows:5d} rows  {rows / seconds:7.1f} rows/s  ({rows / seconds / opa_rate:.2f}x OPA)")
        result["routes"] = {name: {"rows": rows, "rows_per_s": rows / seconds} for name, (rows, seconds) in timings.items()}
        if a.routes_only:
            print("RESULT " + json.dumps(result))
            return 0
        opa = side_by_side(lambda w: convert_opa(tmp / "OPA", tmp / f"opa{w}", ["train"], num_shards=16,
                                                 progress=False, workers=w), a.repeats)
        same = all((tmp / "opa1" / p.name).read_bytes() == p.read_bytes() for p in (tmp / "opa2").glob("train*"))
        print(f"OPA  {n} samples   1 worker {n / opa[1]:7.1f} samples/s   2 workers {n / opa[2]:7.1f} samples/s   "
              f"ratio {opa[1] / opa[2]:.2f}x   same shards: {same}")
        pipe_parquet(tmp / "speed.parquet", a.speed_rows)
        pipe = side_by_side(lambda w: convert_pipe([tmp / "speed.parquet"], tmp / f"pipe{w}", "train",
                                                   max_per_shard=100, progress=False, workers=w), a.repeats)
        print(f"PIPE {a.speed_rows} rows    1 worker {a.speed_rows / pipe[1]:7.1f} rows/s      2 workers "
              f"{a.speed_rows / pipe[2]:7.1f} rows/s      ratio {pipe[1] / pipe[2]:.2f}x")
        result.update(opa_samples=n, opa_ratio=opa[1] / opa[2], opa_rate_1=n / opa[1], opa_rate_2=n / opa[2],
                      pipe_rows=a.speed_rows, pipe_ratio=pipe[1] / pipe[2], same_shards=same)

        memory = {}
        for rows in (a.pipe_rows // 5, a.pipe_rows):  # streaming: the increase must not grow with the file
            pipe_parquet(tmp / f"{rows}.parquet", rows)
            size_mib = (tmp / f"{rows}.parquet").stat().st_size / 2**20
            t = time.perf_counter()
            base, peak = conversion_memory_mib(["convert_pipe", "--parquet", str(tmp / f"{rows}.parquet"), "--out",
                                                str(tmp / f"big{rows}"), "--split", "train", "--no-progress"])
            seconds = time.perf_counter() - t
            written = json.loads((tmp / f"big{rows}" / "train.json").read_text())["num_samples"]
            print(f"PIPE {rows} rows, parquet {size_mib:.0f} MiB: {written} written in {seconds:.0f} s; resident after "
                  f"the imports {base:.0f} MiB, peak during the conversion {peak:.0f} MiB (+{peak - base:.0f} MiB)")
            memory[rows] = (size_mib, base, peak, written)
        size_mib, base, peak, written = memory[a.pipe_rows]
        small = memory[a.pipe_rows // 5]
        result.update(memory_rows=a.pipe_rows, parquet_mib=size_mib, peak_mib=peak, imports_mib=base,
                      memory_written=written, small_rows=a.pipe_rows // 5, small_increase_mib=small[2] - small[1])
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
