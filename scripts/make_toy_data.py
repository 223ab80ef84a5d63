#!/usr/bin/env python
"""Write the toy-scene benchmark shards: OUT/toy-pipe/{train,val,test} and OUT/toy-opa/{train,val,test}.

Example: python -m scripts.make_toy_data --out data/toy --seed 0
Also prints the image-blind and uniform-random plausible rates on the test splits.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from datamodules.shards import iter_annotations
from datamodules.toy import CLASSES, blind_baseline_rate, uniform_random_rate, write_toy_dataset


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/toy", help="output folder (default: data/toy)")
    ap.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    ap.add_argument("--size", type=int, default=64, help="image width = height in pixels (default: 64)")
    ap.add_argument("--num-shards", type=int, default=8, help="shards per split (default: 8)")
    ap.add_argument("--pipe-train", type=int, default=4000)
    ap.add_argument("--opa-train", type=int, default=2000)
    ap.add_argument("--val", type=int, default=256, help="val samples per flavour (default: 256)")
    ap.add_argument("--test", type=int, default=256, help="test samples per flavour (default: 256)")
    ap.add_argument("--classes", default=",".join(CLASSES), help=f"comma list from {CLASSES}")
    ap.add_argument("--no-baselines", action="store_true", help="skip the baseline measurement")
    a = ap.parse_args(argv)
    classes = tuple(c for c in a.classes.split(",") if c)
    if unknown := set(classes) - set(CLASSES):
        ap.error(f"unknown classes {sorted(unknown)}; known: {CLASSES}")
    sizes = {"toy-pipe": {"train": a.pipe_train, "val": a.val, "test": a.test},
             "toy-opa": {"train": a.opa_train, "val": a.val, "test": a.test}}
    t = time.perf_counter()
    done = write_toy_dataset(a.out, a.seed, sizes, a.num_shards, (a.size, a.size), classes)
    for name, d in done.items():
        print(f"{name}: {d['samples']} samples in {d['seconds']} s")
    print(f"wrote {a.out} in {time.perf_counter() - t:.1f} s")
    if not a.no_baselines:
        for flavour in sizes:
            root = Path(a.out) / flavour
            train, test = list(iter_annotations(root, "train")), list(iter_annotations(root, "test"))
            print(f"{flavour} test plausible rate: image-blind (random train box of the class) "
                  f"{blind_baseline_rate(train, test):.3f}, uniform random box {uniform_random_rate(test):.4f}")


if __name__ == "__main__":
    main()
