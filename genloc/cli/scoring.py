"""`genloc score`: how likely the model finds boxes you give (`genloc.score`), from --box on the command
line (one photo, one category) or from a boxes.jsonl of `genloc place` (each box with its own
category). Prints one JSON line per photo and category; --out writes the same lines to a file."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..files import OutputError, prepare_output_dir, read_jsonl, write_jsonl
from .inputs import Photo, expand_images
from .placing import load_model, read_images, resolve_device


def requests(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[tuple[str, str, list]]:
    """(image, category, pixel boxes) to score, checked before the model loads."""
    if (args.box is None) == (args.boxes is None):
        parser.error("give the boxes to score: --box X1,Y1,X2,Y2 (repeatable) or --boxes FILE, not both")
    if args.box is not None:
        if not args.image:
            parser.error("--box needs --image (the photo the boxes are in)")
        try:
            photos = expand_images(args.image)
        except ValueError as err:
            parser.error(str(err))
        if len(photos) != 1 or not args.category or len(args.category) != 1:
            parser.error("--box scores boxes of one photo for one class: give one --image and one --category "
                         "(for many, use --boxes FILE)")
        return [(photos[0].image, args.category[0], args.box)]
    if args.image:
        parser.error("--boxes FILE names its photos: leave --image out")
    path = Path(args.boxes)
    found = {}
    try:
        for lineno, rec in read_jsonl(path):
            image = rec.get("image")
            if not isinstance(image, str) or not isinstance(rec.get("boxes"), list):
                raise ValueError(f"{path}:{lineno}: expected {{image, boxes: [{{box, category}}, ...]}}")
            if not Path(image).is_file() and (path.parent / image).is_file():
                image = str(path.parent / image)
            for b in rec["boxes"]:
                box, category = (b.get("box"), b.get("category")) if isinstance(b, dict) else (b, None)
                category = category or (args.category[0] if args.category else None)
                if category is None:
                    raise ValueError(f"{path}:{lineno}: a box without a category: give --category")
                found.setdefault((image, category), []).append(box)
    except OSError as err:
        parser.error(f"--boxes {path}: {err.strerror or err}")
    except ValueError as err:
        parser.error(f"--boxes {err}")
    return [(image, category, boxes) for (image, category), boxes in found.items()]


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from ..hub import is_model_source
    from ..placement import score

    todo = requests(parser, args)
    if not is_model_source(args.model):
        parser.error(f"--model {args.model} not found: no such model folder or checkpoint, and not a Hub id "
                     "(owner/name)")
    device = resolve_device(parser, args.device)
    if args.out is not None:
        try:
            prepare_output_dir(Path(args.out).parent, "--out")
        except OutputError as err:
            parser.error(str(err))
    model = load_model(parser, args.model, device)
    lines, failed = [], 0
    for image_path, category, boxes in todo:
        image, = read_images([Photo(image_path)], parser.prog, lambda line: print(line, file=sys.stderr))
        if image is None:
            failed += 1
            continue
        try:
            result = score(model, image, category, boxes, region=args.region, size=args.size,
                           aspect_ratio=args.aspect_ratio)
        except ValueError as err:  # a box outside the photo, or not a box
            print(f"{parser.prog}: {image_path}: {err}", file=sys.stderr)
            failed += 1
            continue
        line = {"image": image_path, "category": category, "image_size": list(image.size),
                "boxes": [{"box": box, "log_prob": float(lp), "log_density": float(ld)}
                          for box, lp, ld in zip(boxes, result.log_probs, result.log_densities)]}
        print(json.dumps(line))
        lines.append(line)
    if args.out is not None:
        write_jsonl(args.out, lines)
    return 1 if failed else 0
