#!/usr/bin/env python
"""`scripts.compare_insertion` on 2 ranks (torchrun, gloo, CPU) against 1 process, side by side.

Real photos (scikit-image's samples, resized), one box per photo from a predictions file, a tiny
random SD inpainting pipeline and a tiny open_clip: every photo is edited, then scored by background
SSIM (float64, the heavy part on a CPU) and foreground CLIP. Each variant starts from an empty output
folder and is timed end to end (interpreter start, imports, pipeline loading, merge); the variants
alternate and the median of --repeats runs each is reported. One torch thread per process, so 2 ranks
on 2 free cores can approach 2x; what the start-up costs take off that shrinks as the edits grow.

The last line is ``RESULT {json}`` for benchmarks/run_all.py. Example:
  python -m benchmarks.insertion_ranks
  python -m benchmarks.insertion_ranks --quick    # fewer photos, for make bench
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = {"astronaut": "person", "coffee": "cup", "chelsea": "cat", "rocket": "car", "camera": "person",
          "coins": "coin", "moon": "bird"}


def inputs(root: Path, num_images: int, side: int) -> list[str]:
    """pairs.csv of `num_images` photos (`side` px long side), their boxes, and the tiny models: the
    arguments every variant shares."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from genloc.testing import save_tiny_open_clip
    from genloc.testing import save_sd

    (root / "photos").mkdir()
    rows, lines = ["image,category"], []
    names = list(PHOTOS)
    for i in range(num_images):
        name = names[i % len(names)]
        image = Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")
        image = image.resize((side, side * 3 // 4), Image.BICUBIC)
        image.save(root / "photos" / f"{i:03d}.png")
        rows.append(f"{i:03d}.png,{PHOTOS[name]}")
        x = side // 8 + (i % 4) * side // 8
        lines.append(json.dumps({"key": f"{i:03d}", "boxes": [[x, side // 6, x + side // 3, side // 2]]}))
    (root / "photos" / "pairs.csv").write_text("\n".join(rows) + "\n")
    (root / "boxes.jsonl").write_text("\n".join(lines) + "\n")
    clip_cfg, clip_weights = save_tiny_open_clip(root / "clip")
    return ["--images", str(root / "photos"), "--boxes", str(root / "boxes.jsonl"), "--device", "cpu",
            "--clip-weights", str(clip_weights), "--clip-config", str(clip_cfg),
            "--methods", f"sd=sd:{save_sd(root / 'sd')}"]


def timed(command: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all its processes)."""
    cpu = lambda: (lambda r: r.ru_utime + r.ru_stime)(resource.getrusage(resource.RUSAGE_CHILDREN))  # noqa: E731
    start, start_cpu = time.perf_counter(), cpu()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command[:6])} ... exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return time.perf_counter() - start, cpu() - start_cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24, help="photos edited per run")
    parser.add_argument("--side", type=int, default=384, help="long side of the photos in pixels")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps")
    parser.add_argument("--resolution", type=int, default=128, help="inpainting canvas long side (the tiny "
                        "pipeline's native 64 px makes an edit too cheap to outweigh the start-up)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant (median reported)")
    parser.add_argument("--quick", action="store_true", help="12 photos, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 12, 2
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    times, cpu = {"one": [], "two": []}, {"one": [], "two": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shared = inputs(root, args.images, args.side) + ["--steps", str(args.steps), "--resolution", str(args.resolution)]
        script = ["-m", "scripts.compare_insertion", *shared]
        launch = {"one": [sys.executable, *script],
                  "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script]}
        for r in range(args.repeats):
            for variant in ("one", "two") if r % 2 == 0 else ("two", "one"):
                seconds, cpu_seconds = timed(launch[variant] + ["--out", str(root / f"{variant}{r}")], env)
                times[variant].append(seconds)
                cpu[variant].append(cpu_seconds)
                print(f"{variant} rank(s), run {r}: {seconds:.1f} s, {cpu_seconds:.1f} CPU s", file=sys.stderr,
                      flush=True)
    one, two = statistics.median(times["one"]), statistics.median(times["two"])
    cpu_one, cpu_two = statistics.median(cpu["one"]), statistics.median(cpu["two"])
    print(f"compare_insertion on {args.images} photos ({args.side} px, {args.steps} steps, {args.resolution} px canvas): "
          f"1 process {one:.1f} s, "
          f"2 ranks {two:.1f} s, 2 ranks / 1 = {two / one:.2f} ({one / two:.2f}x faster); CPU s of all processes: "
          f"{cpu_one:.1f} and {cpu_two:.1f}")
    print("RESULT " + json.dumps({"images": args.images, "side": args.side, "steps": args.steps,
                                  "resolution": args.resolution, "one": one, "two": two,
                                  "cpu_one": cpu_one, "cpu_two": cpu_two,
                                  "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
