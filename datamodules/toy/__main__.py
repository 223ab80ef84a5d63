"""Write the toy-scene shards: OUT/toy-pipe/{train,val,test} and OUT/toy-opa/{train,val,test}.

    python -m datamodules.toy --out data/toy --seed 0
    python -m datamodules.toy --out /tmp/toy --pipe-train 0 --opa-train 512 --val 16 --test 0

The image-blind and uniform-random baselines of the written data come from evaluate.py, e.g.
``python evaluate.py --baseline blind --data data/toy/toy-opa --split test`` (plausible rate included).
"""
from __future__ import annotations

import argparse
import time

from genloc.arguments import text, whole

from .scenes import CLASSES, write_toy_dataset


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m datamodules.toy", description=__doc__.splitlines()[0],
                                 epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=text, default="data/toy", help="output folder (default: data/toy)")
    ap.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    ap.add_argument("--size", type=whole(4), default=64, help="image width = height in pixels (default: 64)")
    ap.add_argument("--num-shards", type=whole(1), default=8, help="shards per split (default: 8)")
    ap.add_argument("--pipe-train", type=int, default=4000, help="toy-pipe train samples (0 skips a split)")
    ap.add_argument("--opa-train", type=int, default=2000, help="toy-opa train samples")
    ap.add_argument("--val", type=int, default=256, help="val samples per flavour (default: 256)")
    ap.add_argument("--test", type=int, default=256, help="test samples per flavour (default: 256)")
    ap.add_argument("--classes", default=",".join(CLASSES), help=f"comma list from {CLASSES}")
    a = ap.parse_args(argv)
    classes = tuple(c for c in a.classes.split(",") if c)
    if not classes:
        ap.error(f"--classes names no class; give a comma list from {CLASSES}")
    if unknown := set(classes) - set(CLASSES):
        ap.error(f"unknown classes {sorted(unknown)}; known: {CLASSES}")
    counts = {"toy-pipe": {"train": a.pipe_train, "val": a.val, "test": a.test},
              "toy-opa": {"train": a.opa_train, "val": a.val, "test": a.test}}
    if any(n < 0 for splits in counts.values() for n in splits.values()):
        ap.error("sample counts must be >= 0 (0 skips the split)")
    sizes = {flavour: {split: n for split, n in splits.items() if n} for flavour, splits in counts.items()}
    sizes = {flavour: splits for flavour, splits in sizes.items() if splits}
    t = time.perf_counter()
    done = write_toy_dataset(a.out, a.seed, sizes, a.num_shards, (a.size, a.size), classes)
    for name, d in done.items():
        print(f"{name}: {d['samples']} samples in {d['seconds']} s")
    print(f"wrote {a.out} in {time.perf_counter() - t:.1f} s")
    return done


if __name__ == "__main__":
    main()
