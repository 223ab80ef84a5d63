#!/usr/bin/env python
"""Convert your own boxes into shards: a manifest of rows (image path or URL, class, positive boxes,
negative boxes, split), one sample per row (docs/data.md#your-own-data).

A ``.jsonl`` row: {"image": "shelf/001.jpg", "category": "cup", "positives": [[x1, y1, x2, y2], ...],
"negatives": [[...]], "split": "val"}; a ``.csv`` has the same columns, boxes as json lists. Boxes are
pixels x1,y1,x2,y2 (--box-format xywh or cxcywh for the others); image paths are relative to --images
(default: the manifest's folder). Every bad row is one line naming the file, row and field, and is
dropped and counted. All splits are swapped in together; an interrupted run started again reuses
the shards it finished. Example:
  python -m scripts.convert_manifest --manifest rows.jsonl --images photos/ --out data/mine --workers 2
"""
from __future__ import annotations

import argparse

from genloc.arguments import text
from scripts.convert_common import add_common_arguments, run


def main(argv=None):
    from datamodules.own_data import BOX_FORMATS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", type=text, required=True, help="rows.jsonl or rows.csv")
    ap.add_argument("--images", type=text, help="folder the image paths are relative to (default: the manifest's)")
    ap.add_argument("--out", type=text, required=True, help="output folder for {split}-*.tar + {split}.json")
    ap.add_argument("--box-format", choices=tuple(BOX_FORMATS), default="xyxy",
                    help="xyxy: x1,y1,x2,y2; xywh: x,y,width,height; cxcywh: centre x,y,width,height (pixels)")
    ap.add_argument("--split", type=text, default="train", help="split of rows that name none (default train)")
    ap.add_argument("--num-shards", type=int, default=16, help="shards per split at most (default 16)")
    add_common_arguments(ap)
    a = ap.parse_args(argv)

    def convert():
        from datamodules.own_data import convert_manifest

        return convert_manifest(a.manifest, a.out, a.images, a.box_format, a.split, a.num_shards,
                                progress=not a.no_progress, workers=a.workers)

    return run(ap, a, convert)


if __name__ == "__main__":
    main()
