#!/usr/bin/env python
"""Convert a COCO-style detection / instance set (instances_*.json + image folder; LVIS and Objects365
use the same layout) into one split of shards (docs/data.md#your-own-data). Two modes, named in
{split}.json's "mode":

  --remove-objects INPAINTER  the PIPE recipe: each kept object is erased by the inpainting back-end
      (--backend, a local diffusers folder) inside its segmentation mask (its box without one) grown by
      --dilate px; the erased photo, stored as PNG, is a sample whose positive is the object's box.
      Objects touching another object are skipped. --check-clip drops samples whose erased box still
      looks like the class to CLIP (score above --check-threshold).
  --keep-objects  the photo as it is, one sample per (image, class), every box a positive. The objects
      are still visible: for evaluation or models that must find existing objects; train.py warns
      when it trains on such a split.

Every bad annotation is one line naming the file, entry and field, and is dropped and counted. An
interrupted run started again reuses the shards it finished. Example:
  python -m scripts.convert_coco --instances annotations/instances_val2017.json --images val2017 \\
      --out data/coco-removed --split train --remove-objects /models/sd-inpainting --classes cup,bottle
"""
from __future__ import annotations

import argparse

from genloc.arguments import number, text, whole
from scripts.convert_common import add_common_arguments, run

# The prompt the inpainter fills an erased region with.
REMOVAL_PROMPT = "empty background"


def removal_check(args):
    """``check(image, box, category) -> CLIP cosine`` of the erased box and the class, or None."""
    if not args.check_clip:
        return None
    import numpy as np
    import torch

    from metrics.inpainting import ForegroundCLIPScore

    clip = ForegroundCLIPScore(args.check_clip, args.check_clip_model, args.check_clip_config).to(args.device)

    def check(image, box, category) -> float:
        w, h = image.size
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        norm = torch.tensor([[box[0] / w, box[1] / h, box[2] / w, box[3] / h]])
        return clip.scores(pixels.to(args.device), norm, [category]).item()

    return check


def main(argv=None):
    import torch

    from genloc.inpainters import BACKENDS, DEFAULT_STEPS, MODES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=text, required=True, help="COCO-style instances json")
    ap.add_argument("--images", type=text, required=True, help="folder the json's file_name entries are under")
    ap.add_argument("--out", type=text, required=True, help="output folder for {split}-*.tar + {split}.json")
    ap.add_argument("--split", type=text, required=True)
    how = ap.add_mutually_exclusive_group(required=True)
    how.add_argument("--remove-objects", dest="inpainter", metavar="INPAINTER", type=text,
                     help="erase each object with this inpainting pipeline (local diffusers folder of --backend)")
    how.add_argument("--keep-objects", action="store_true", help="keep the photos as they are (objects visible)")
    ap.add_argument("--classes", type=text, help="comma list of class names to keep (default: all)")
    ap.add_argument("--min-area", type=number(0, 1), default=0.0, help="smallest box area, fraction of the image")
    ap.add_argument("--max-area", type=number(0, 1), default=1.0, help="largest box area, fraction of the image")
    ap.add_argument("--include-crowd", action="store_true", help="keep iscrowd objects (default: dropped, counted)")
    ap.add_argument("--max-objects", type=whole(1), help="skip images with more objects than this (crowd not counted)")
    ap.add_argument("--backend", choices=BACKENDS, default="sd", help="inpainting back-end of --remove-objects")
    ap.add_argument("--dilate", type=whole(0), default=8, help="grow each object's mask by this many pixels (default 8)")
    ap.add_argument("--mode", choices=MODES, default="auto", help="inpaint a crop around the object, the whole "
                    "image, or auto (crop when the object is smaller than the back-end's resolution)")
    ap.add_argument("--prompt", type=text, default=REMOVAL_PROMPT, help=f"inpainting prompt (default {REMOVAL_PROMPT!r})")
    ap.add_argument("--steps", type=whole(1), default=DEFAULT_STEPS, help="denoising steps")
    ap.add_argument("--resolution", type=whole(8), help="canvas long side (default: the back-end's native one)")
    ap.add_argument("--guidance", type=number(0), help="classifier-free guidance (default: the back-end's)")
    ap.add_argument("--seed", type=whole(0), default=0, help="base seed; each object's seed derives from it and its ids")
    ap.add_argument("--check-clip", type=text, metavar="WEIGHTS", help="local open_clip weights: drop samples whose "
                    "erased box still looks like the class")
    ap.add_argument("--check-clip-model", type=text, help="open_clip model name (default ViT-B-32)")
    ap.add_argument("--check-clip-config", type=text, help="open_clip model config json for models it does not ship")
    ap.add_argument("--check-threshold", type=float, default=0.25, help="CLIP cosine above which a removal failed "
                    "(default 0.25; each sample's meta keeps its removal_score to calibrate it)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-shards", type=int, default=16, help="shards at most (default 16)")
    add_common_arguments(ap)
    a = ap.parse_args(argv)
    if a.min_area > a.max_area:
        ap.error(f"--min-area {a.min_area} is above --max-area {a.max_area}")
    if a.keep_objects and a.check_clip:
        ap.error("--check-clip checks a removal: give it with --remove-objects, not --keep-objects")
    inpainter = None
    if a.inpainter:
        from genloc.cli.placing import load_inpainter

        inpainter = load_inpainter(ap, a, a.device)
        inpainter.prompt_template = a.prompt
    check = removal_check(a)
    classes = [c.strip() for c in a.classes.split(",") if c.strip()] if a.classes else None

    def convert():
        from datamodules.own_data import KEEP_OBJECTS, REMOVE_OBJECTS, convert_coco

        return convert_coco(a.instances, a.images, a.out, a.split, KEEP_OBJECTS if a.keep_objects else REMOVE_OBJECTS,
                            inpainter, classes, a.min_area, a.max_area, a.include_crowd, a.max_objects, a.dilate,
                            a.mode, a.seed, check, a.check_threshold,
                            inpainter_id=f"{a.backend}:{a.inpainter}:{a.steps}:{a.resolution}:{a.guidance}:{a.prompt}:"
                                         f"{a.check_clip}:{a.check_clip_model}",
                            num_shards=a.num_shards, progress=not a.no_progress, workers=a.workers)

    return run(ap, a, convert)


if __name__ == "__main__":
    main()
