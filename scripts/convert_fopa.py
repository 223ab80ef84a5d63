#!/usr/bin/env python
"""Convert FOPA/TopNet grouped OPA labels (*_data_pair.csv or *_pair_new.json) into shards.

Box top-left = (cx - w//2, cy - h//2). Without --categories (fg_id -> category, json object or
csv with fg_id,category) samples are pooled per (background, foreground) with category "".
The split (and 'val' with --val-fraction) is staged and swapped in only when complete: a failed
run leaves the previous output as it was. Example:
  python -m scripts.convert_fopa --labels test_data_pair.csv --backgrounds /data/OPA/background \\
      --categories fg_categories.json --out data/opa --split test
"""
from __future__ import annotations

import argparse

from genloc.arguments import text
from scripts.convert_common import add_common_arguments, run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=text, required=True, help="*_data_pair.csv or *_pair_new.json")
    ap.add_argument("--backgrounds", type=text, required=True, help="folder searched recursively for <bg_id>.jpg "
                                                         "(leading zeros ignored)")
    ap.add_argument("--categories", help="fg_id -> category map (.json object or .csv with fg_id,category)")
    ap.add_argument("--out", type=text, required=True)
    ap.add_argument("--split", type=text, required=True, help="split name to write, e.g. train or test")
    ap.add_argument("--num-shards", type=int, default=16)
    ap.add_argument("--val-fraction", type=float, default=0.0, help="hold out backgrounds as split 'val'")
    add_common_arguments(ap)
    a = ap.parse_args(argv)

    def convert():
        from datamodules.convert import convert_fopa, load_category_map

        cats = load_category_map(a.categories) if a.categories else None
        return convert_fopa(a.labels, a.backgrounds, a.out, a.split, cats, a.num_shards, a.val_fraction,
                            progress=not a.no_progress, workers=a.workers)

    return run(ap, a, convert)


if __name__ == "__main__":
    main()
