#!/usr/bin/env python
"""Convert PIPE parquet files (Hugging Face paint-by-inpaint/PIPE) into shards, streaming.

Background = source_img (object removed); positive box = tight box of the PIPE_Masks mask joined
on (img_id, ann_id), else of the thresholded |source - target| difference. The split is staged and
swapped in only when complete: a failed run leaves the previous output as it was. Example:
  python -m scripts.convert_pipe --parquet PIPE/data/test-*.parquet --masks PIPE_Masks/data/test-*.parquet \\
      --out data/pipe --split test --workers 2
"""
from __future__ import annotations

import argparse

from genloc.arguments import text
from scripts.convert_common import add_common_arguments, run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parquet", type=text, nargs="+", required=True, help="PIPE parquet file(s)")
    ap.add_argument("--masks", nargs="*", default=[], help="PIPE_Masks parquet file(s) (optional)")
    ap.add_argument("--out", type=text, required=True)
    ap.add_argument("--split", type=text, required=True)
    ap.add_argument("--diff-threshold", type=int, default=30, help="|source-target| threshold, 0-255 (default 30)")
    ap.add_argument("--min-area", type=int, default=64, help="minimum changed pixels for a difference box")
    ap.add_argument("--max-per-shard", type=int, default=2000, help="input rows per shard (default 2000)")
    ap.add_argument("--category-column", type=text, default="Instruction_Class")
    ap.add_argument("--keep-target", action="store_true", help="also store target.jpg (image with the object)")
    ap.add_argument("--batch-rows", type=int, default=64, help="parquet rows read at a time")
    ap.add_argument("--limit", type=int, help="convert at most this many rows")
    add_common_arguments(ap)
    a = ap.parse_args(argv)
    if not 0 <= a.diff_threshold <= 255 or a.min_area < 0 or (a.limit is not None and a.limit < 1):
        ap.error("--diff-threshold must be in 0..255, --min-area >= 0 and --limit >= 1")

    def convert():
        from datamodules.convert import convert_pipe

        return convert_pipe(a.parquet, a.out, a.split, a.masks, a.diff_threshold, a.min_area, a.max_per_shard,
                            a.category_column, a.keep_target, a.batch_rows, a.limit, progress=not a.no_progress,
                            workers=a.workers)

    return run(ap, a, convert)


if __name__ == "__main__":
    main()
