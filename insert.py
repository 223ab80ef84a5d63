"""Insert an object into a photo: sample plausible boxes with a trained location model, then let a
local diffusers inpainting pipeline draw the object inside each box.

    python insert.py --image photo.jpg --category cup --checkpoint runs/.../last.ckpt \
        --inpainter /models/sd-inpainting --n 4 --region left --out out/
    python insert.py --image photo.jpg --category cup plate --checkpoint runs/toy_model --inpainter DIR

Writes to --out: `edit_{i}.png` (only with an inpainter), `overlay.png` (all boxes drawn),
`edit_{i}.json` per box and `records.json` (all records), each written atomically. Pixels outside
each edit's `mask_box` are identical to the input. Without --inpainter the boxes, overlay and
records are still written.
`--checkpoint` takes a Lightning checkpoint, a model folder (scripts/export.py) or a Hub id.

Several categories place one object each (`genloc.placement.place_many`): pairwise IoU at most
`--max-iou`, inserted one after another, each box sampled on the image with the earlier objects
already drawn; `edit_{i}.png` is the image after objects 0..i and its record's metrics compare it
with the image before object i.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from genloc.arguments import text
from genloc.cli import DEFAULT_N, add_inpainter_arguments, check_arguments, draw_overlay, load_inpainter, load_model, read_inputs
from genloc.hub import is_model_source
from genloc.drawing import colour
from genloc.files import save_image, write_json
from genloc.inpainting import REGIONS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="insert.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=text, required=True, help="background photo")
    p.add_argument("--category", required=True, nargs="+", help='object class, e.g. "cup"; several: one object each')
    p.add_argument("--checkpoint", type=text, help="location model: Lightning checkpoint (train.py), model folder or Hub id")
    add_inpainter_arguments(p, required=False)
    p.add_argument("--n", type=int, help=f"number of boxes / edits for one category (default {DEFAULT_N})")
    p.add_argument("--max-iou", type=float, default=0.0, help="several categories: largest IoU between two objects")
    p.add_argument("--region", type=text, help=f"restrict boxes to {'|'.join(REGIONS)} or pixels x1,y1,x2,y2")
    p.add_argument("--out", type=text, default="insert_out", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="box sampling seed; edit i uses seed + i")
    p.add_argument("--clip-weights", type=text, help="local open_clip weights file: adds the foreground CLIP score")
    p.add_argument("--clip-model", type=text, help="open_clip model name (default ViT-B-32, or the --clip-config stem)")
    p.add_argument("--clip-config", type=text, help="open_clip model config JSON for models open_clip does not ship")
    return p


def sample_boxes(source: str, image: Image.Image, category: str, n: int, region: str | None, seed: int) -> torch.Tensor:
    """`n` boxes (pixels of `image`, `[n,4]`) from the location model, inside `region` (a word or
    pixels ``x1,y1,x2,y2``) if given: `genloc.place`, the one photo -> boxes path."""
    from genloc.placement import place

    return place(load_model(source, "insert.py"), image, category, n=n, region=region, seed=seed).boxes


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    image, region = read_inputs(parser, args)
    w, h = image.size
    if not is_model_source(args.checkpoint):
        parser.error(f"location model checkpoint {args.checkpoint or '(none given)'} not found: pass --checkpoint CKPT "
                     "(a train.py checkpoint or a model folder; `make train` makes both)")
    several = len(args.category) > 1
    if several and args.n is not None:
        parser.error("--n applies to one category; several categories get one box each")
    out = Path(args.out)
    pipe = None
    if args.inpainter:
        pipe = load_inpainter(parser, args)
    else:
        print("no --inpainter: wrote boxes, overlay and records only; pass --inpainter DIR, a local diffusers "
              "inpainting folder (e.g. a Stable Diffusion inpainting checkpoint saved with save_pretrained)")
    clip = None
    if pipe is not None and args.clip_weights:
        from metrics.inpainting import ForegroundCLIPScore

        clip = ForegroundCLIPScore(args.clip_weights, args.clip_model, args.clip_config).to(args.device)
    if several:
        return insert_several(args, image, pipe, clip, out)
    boxes = sample_boxes(args.checkpoint, image, args.category[0], args.n or DEFAULT_N, args.region, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    save_image(out / "overlay.png", draw_overlay(image, boxes.tolist()))

    records = []
    for i, box in enumerate(boxes.tolist()):
        rec = {
            "index": i, "image": str(args.image), "image_size": [w, h], "category": args.category[0],
            "region": args.region, "region_norm": None if region is None else list(region),
            "box": box, "box_norm": [box[0] / w, box[1] / h, box[2] / w, box[3] / h],
            "color": list(colour(i)), "checkpoint": str(args.checkpoint), "seed": args.seed + i,
            "edit": None, "prompt": None, "mask_box": None, "metrics": {},
        }
        if pipe is not None:
            from metrics.inpainting import background_ssim

            ins = pipe.insert(image, args.category[0], box=box, seed=args.seed + i, mode=args.mode, margin=args.margin,
                              dilate=args.dilate, feather=args.feather)
            save_image(out / f"edit_{i}.png", ins.image)
            box_norm = torch.tensor([rec["box_norm"]])
            rec.update(ins.record(), box=box, edit=f"edit_{i}.png", inpainter=str(args.inpainter), backend=args.backend,
                       steps=args.steps, dilate=args.dilate, feather=args.feather)
            rec["metrics"]["background_ssim"] = background_ssim(to_tensor(ins.image), to_tensor(image), box_norm).item()
            if clip is not None:
                rec["metrics"]["clip_score"] = clip.scores(to_tensor(ins.image), box_norm, [args.category[0]]).item()
        write_json(out / f"edit_{i}.json", rec, indent=2)
        records.append(rec)
    write_json(out / "records.json", records, indent=2)
    print(f"wrote {len(records)} record(s) to {out}")
    return 0


def insert_several(args, image: Image.Image, pipe, clip, out: Path) -> int:
    """One object per category via `place_many`, inserted one after another when a pipeline is given."""
    from metrics.inpainting import background_ssim
    from genloc.placement import NoValidSetError, place_many

    model = load_model(args.checkpoint, "insert.py")
    w, h = image.size
    insertions = []

    def inpaint(current: Image.Image, box, category: str, seed: int) -> Image.Image:
        ins = pipe.insert(current, category, box=box, seed=seed, mode=args.mode, margin=args.margin,
                          dilate=args.dilate, feather=args.feather)
        insertions.append((current, ins))
        return ins.image

    try:
        result = place_many(model, image, args.category, max_iou=args.max_iou,
                            regions=[args.region] * len(args.category),
                            inpainter=inpaint if pipe is not None else None, seed=args.seed, dilate=args.dilate)
    except NoValidSetError as err:
        print(f"insert.py: {err}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    boxes = result.boxes.tolist()
    save_image(out / "overlay.png", draw_overlay(image, boxes))
    done = insertions[-len(boxes):] if pipe is not None else [None] * len(boxes)  # the successful round's edits
    records = []
    for i, (box, category, step) in enumerate(zip(boxes, args.category, done)):
        rec = {"index": i, "image": str(args.image), "image_size": [w, h], "category": category, "region": args.region,
               "box": box, "box_norm": [box[0] / w, box[1] / h, box[2] / w, box[3] / h], "color": list(colour(i)),
               "checkpoint": str(args.checkpoint), "seed": args.seed + i, "log_prob": float(result.log_probs[i]),
               "max_iou": args.max_iou, "edit": None, "prompt": None, "mask_box": None, "metrics": {}}
        if step is not None:
            before, ins = step
            save_image(out / f"edit_{i}.png", ins.image)
            box_norm = torch.tensor([rec["box_norm"]])
            rec.update(ins.record(), box=box, edit=f"edit_{i}.png", inpainter=str(args.inpainter),
                       backend=args.backend, steps=args.steps, dilate=args.dilate, feather=args.feather)
            ssim = background_ssim(to_tensor(ins.image), to_tensor(before), box_norm)
            rec["metrics"]["background_ssim"] = ssim.item()
            if clip is not None:
                rec["metrics"]["clip_score"] = clip.scores(to_tensor(ins.image), box_norm, [category]).item()
        write_json(out / f"edit_{i}.json", rec, indent=2)
        records.append(rec)
    write_json(out / "records.json", records, indent=2)
    print(f"wrote {len(records)} object(s) to {out}" + ("" if pipe is not None else " (boxes only: no inpainter)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
