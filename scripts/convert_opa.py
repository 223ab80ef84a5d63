#!/usr/bin/env python
"""Convert the OPA release (train_set.csv / test_set.csv, background/, foreground/) into shards.

One sample per (background, category) with every labelled box pooled; category = the folder name
of foreground/<category>/<fg_id>.jpg. All splits are written into a hidden staging folder and
swapped in together only when every one is complete: a failed run leaves the previous output as
it was; a 'val' split held out from 'train' by an earlier run is removed when 'train' is rewritten
without --val-fraction. With --composites it converts OPA's labelled composite set instead
(composite/{split}_set/: one sample per composite, for the plausibility classifier). Examples:
  python -m scripts.convert_opa --opa-root /data/OPA --out data/opa --val-fraction 0.05 --workers 2
  python -m scripts.convert_opa --opa-root /data/OPA --out data/opa-composites --composites
"""
from __future__ import annotations

import argparse

from genloc.arguments import text
from scripts.convert_common import add_common_arguments, run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--opa-root", type=text, required=True, help="folder with {train,test}_set.csv, background/, foreground/")
    ap.add_argument("--out", type=text, required=True, help="output folder for {split}-*.tar + {split}.json")
    ap.add_argument("--splits", default="train,test", help="comma list of csv prefixes (default: train,test)")
    ap.add_argument("--num-shards", type=int, default=16, help="shards per split (>= ranks x workers; default 16)")
    ap.add_argument("--val-fraction", type=float, default=0.0,
                    help="hold out this fraction of training backgrounds as split 'val' (default 0)")
    ap.add_argument("--composites", action="store_true",
                    help="convert composite/{split}_set/ (labelled composites + masks) instead of the placement labels")
    add_common_arguments(ap)
    a = ap.parse_args(argv)
    splits = [s for s in a.splits.split(",") if s]
    if not splits:
        ap.error("--splits names no split")

    if a.composites and a.val_fraction:
        ap.error("--val-fraction applies to the placement labels, not to --composites")

    def convert():
        from datamodules.convert import convert_opa, convert_opa_composites

        if a.composites:
            return convert_opa_composites(a.opa_root, a.out, splits, a.num_shards, progress=not a.no_progress,
                                          workers=a.workers)
        return convert_opa(a.opa_root, a.out, splits, a.num_shards, a.val_fraction, progress=not a.no_progress,
                           workers=a.workers)

    return run(ap, a, convert)


if __name__ == "__main__":
    main()
