#!/usr/bin/env python
"""Convert FOPA/TopNet grouped OPA labels (*_data_pair.csv or *_pair_new.json) into shards.

Box top-left = (cx - w//2, cy - h//2). Without --categories (fg_id -> category, json object or
csv with fg_id,category) samples are pooled per (background, foreground) with category "".
Example:
  python -m scripts.convert_fopa --labels test_data_pair.csv --backgrounds /data/OPA/background \\
      --categories fg_categories.json --out data/opa --split test
"""
from __future__ import annotations

import argparse

from datamodules.convert import convert_fopa, load_category_map


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", required=True, help="*_data_pair.csv or *_pair_new.json")
    ap.add_argument("--backgrounds", required=True, help="folder searched recursively for <bg_id>.jpg "
                                                         "(leading zeros ignored)")
    ap.add_argument("--categories", help="fg_id -> category map (.json object or .csv with fg_id,category)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", required=True, help="split name to write, e.g. train or test")
    ap.add_argument("--num-shards", type=int, default=16)
    ap.add_argument("--val-fraction", type=float, default=0.0, help="hold out backgrounds as split 'val'")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    cats = load_category_map(a.categories) if a.categories else None
    for w in convert_fopa(a.labels, a.backgrounds, a.out, a.split, cats, a.num_shards, a.val_fraction,
                          progress=not a.no_progress):
        print(w.summary())


if __name__ == "__main__":
    main()
