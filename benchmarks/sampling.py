"""Boxes/s of the KV-cached, prefix-shared sampler vs the naive uncached decode, side by side.

Both decode the same prefixes (image/text encoding is shared and excluded) for ``--boxes`` boxes
per image over a batch of images, for the `tiny` and `paper` presets with random weights.

    .venv/bin/python -m benchmarks.sampling            # tiny: 8 images, paper: 2 (1 on CPU) x 100 boxes
    .venv/bin/python -m benchmarks.sampling --quick    # seconds: fewer images, 10 paper boxes
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from models import LocationModel, LocationModelConfig  # noqa: E402
from tests.reference_decode import naive_reference_decode  # noqa: E402


def _timed(fn, device: torch.device, repeats: int, warmup: bool = True) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls, after an optional warm-up call."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(preset: str, images: int, boxes: int, device: torch.device, repeats: int) -> dict:
    torch.manual_seed(0)
    cfg = LocationModelConfig.preset(preset, vit_weights=None, clip_weights=None, gpt2_weights=None)
    model = LocationModel(cfg).to(device).eval()
    pixels = torch.rand(images, 3, cfg.image_size, cfg.image_size, device=device)
    with torch.no_grad():
        prefix = model.build_prefix(model.encode_images(pixels), model.encode_texts(["dog"] * images))
    bounds = model.region_bounds(None, images, device)

    def cached():
        with torch.no_grad():
            model._decode_cached(prefix, boxes, bounds, 1.0, None, None, None)

    def naive():
        naive_reference_decode(model, prefix, boxes)

    t_cached = _timed(cached, device, repeats)
    t_naive = _timed(naive, device, 1, warmup=False)  # seconds to minutes per call; start-up cost is noise
    total = images * boxes
    return dict(preset=preset, images=images, boxes=boxes, cached=total / t_cached, naive=total / t_naive,
                ratio=t_naive / t_cached)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small batches (1 paper image x 10 boxes), about a minute on 2 CPU cores")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (on a shared 2-core machine 2 threads stall each other ~10x)")
    parser.add_argument("--boxes", type=int, default=100, help="boxes per image")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    if args.quick:
        runs = [("tiny", 2, args.boxes), ("paper", 1, 10)]
    else:
        runs = [("tiny", 8, args.boxes), ("paper", 1 if cpu else 8, args.boxes)]
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'preset':<7}{'images':>7}{'boxes/img':>10}{'cached boxes/s':>16}{'naive boxes/s':>15}{'speed-up':>10}")
    for preset, images, boxes in runs:
        r = bench(preset, images, boxes, device, args.repeats)
        print(f"{r['preset']:<7}{r['images']:>7}{r['boxes']:>10}{r['cached']:>16.0f}{r['naive']:>15.1f}"
              f"{r['ratio']:>9.1f}x", flush=True)


if __name__ == "__main__":
    main()
