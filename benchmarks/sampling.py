"""Boxes/s of the sampler's two KV-cached decoders and of the naive uncached decode, side by side.

- cascade: `LocationModel.sample`'s default: each image's prefix + BOS through GPT-2 once, its
  keys/values kept once and attended to in place by the image's boxes;
- copied cache: ``sample(cascade=False)``, the earlier decoder: the same prefix cache copied for
  each box;
- naive: `genloc.testing.naive_reference_decode`, the whole sequence re-run every step for every box.

All decode the same prefixes (image/text encoding is shared and excluded) for ``--boxes`` boxes per
image over a batch of images, `tiny` and `paper` presets with random weights. Cascade and copied
cache alternate call by call (medians), so machine load hits both alike. The naive decode costs
the same per box at any box count, so it is timed once on ``--naive-boxes`` boxes per image.

    python -m benchmarks.sampling            # tiny: 8 images, paper: 1 (8 on GPU) x 100 boxes
    python -m benchmarks.sampling --quick    # about a minute: tiny 2 images, naive paper on 10 boxes
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from genloc.testing import naive_reference_decode  # noqa: E402
from genloc import LocationModel, LocationModelConfig  # noqa: E402


def _seconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def alternating_medians(fns: dict, device: torch.device, repeats: int) -> dict:
    """Median wall seconds of each of ``fns`` after one warm-up call each, the calls interleaved."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_seconds(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def bench(preset: str, images: int, boxes: int, naive_boxes: int, device: torch.device, repeats: int) -> dict:
    torch.manual_seed(0)
    cfg = LocationModelConfig.preset(preset, pretrained=False)
    model = LocationModel(cfg).to(device).eval()
    pixels = torch.rand(images, 3, cfg.image_size, cfg.image_size, device=device)
    with torch.no_grad():
        prefix = model.build_prefix(model.encode_images(pixels), model.encode_texts(["dog"] * images))
    bounds = model.region_bounds(None, images, device)

    def decoder(method):
        def run():
            with torch.no_grad():
                method(prefix, boxes, bounds, 1.0, None, None, None)
        return run

    t = alternating_medians({"cascade": decoder(model._decode_cascade), "copied": decoder(model._decode_cached)},
                            device, repeats)
    t_naive = _seconds(lambda: naive_reference_decode(model, prefix, naive_boxes), device)
    total = images * boxes
    return dict(preset=preset, images=images, boxes=boxes, naive_boxes=naive_boxes, cascade=total / t["cascade"],
                copied=total / t["copied"], naive=images * naive_boxes / t_naive)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny 2 images, naive paper decode on 10 boxes per image")
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
        runs = [("tiny", 2, args.boxes, args.boxes), ("paper", 1, args.boxes, 10)]
    else:
        runs = [("tiny", 8, args.boxes, args.boxes), ("paper", 1 if cpu else 8, args.boxes, args.boxes)]
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'preset':<7}{'images':>7}{'boxes/img':>10}{'cascade boxes/s':>17}{'copied boxes/s':>16}"
          f"{'naive boxes/s':>15}{'cascade/copied':>16}{'cascade/naive':>15}")
    results = []
    for preset, images, boxes, naive_boxes in runs:
        r = bench(preset, images, boxes, naive_boxes, device, args.repeats)
        results.append(r)
        note = "" if naive_boxes == boxes else f"   (naive timed on {naive_boxes} boxes/img)"
        print(f"{r['preset']:<7}{r['images']:>7}{r['boxes']:>10}{r['cascade']:>17.0f}{r['copied']:>16.0f}"
              f"{r['naive']:>15.1f}{r['cascade'] / r['copied']:>15.2f}x{r['cascade'] / r['naive']:>14.1f}x{note}",
              flush=True)
    print("RESULT " + json.dumps({"rows": results}))


if __name__ == "__main__":
    main()
