"""The `genloc` command: boxes for an object in a photo, and the object drawn into them, without
writing Python (docs/usage.md#the-genloc-command).

    genloc place --model runs/toy_model --image photo.jpg --category cup --n 4 --region left --out out/
    genloc insert --model owner/name --image photo.jpg --category cup --inpainter DIR --backend sd --out out/

`--model` takes a model folder, a Hub id or a checkpoint. Writes to --out, each file atomically:
`overlay.png` (the boxes outlined, labelled by index), for insert `edit_{i}.png` (box i inpainted), and
last `boxes.json` (pixel boxes of the photo, log-probabilities, the options; for insert each edit's
record). A bad argument is one line and exit code 2, by the checks insert.py shares (`check_arguments`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .arguments import text
from .inpainting import REGIONS, parse_region

# Boxes sampled for one category when --n is not given (insert.py and `genloc`).
DEFAULT_N = 4

# dest -> (test, allowed): the numbers of insert.py and `genloc`, checked before anything heavy loads
NUMBER_CHECKS = {
    "n": (lambda v: v >= 1, ">= 1"),
    "max_iou": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "steps": (lambda v: v >= 1, ">= 1"),
    "margin": (lambda v: v >= 0, ">= 0"),
    "dilate": (lambda v: v >= 0, ">= 0"),
    "feather": (lambda v: v >= 0, ">= 0"),
    "resolution": (lambda v: v >= 8, ">= 8"),
    "guidance": (lambda v: v >= 0, ">= 0"),
    "aspect_ratio": (lambda v: v > 0, "> 0"),
}


def add_inpainter_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    """The insertion back-end's options (insert.py and `genloc insert`)."""
    import torch

    from .inpainters import BACKENDS, CROP_MARGIN, DEFAULT_STEPS, MODES

    p.add_argument("--inpainter", type=text, required=required,
                   help="local diffusers pipeline folder of the --backend (e.g. a Stable Diffusion inpainting checkpoint)")
    p.add_argument("--backend", choices=BACKENDS, default="sd",
                   help="sd: AutoPipelineForInpainting (SD 1.5/2, SDXL, Kandinsky); flux-fill: FluxFillPipeline; "
                        "powerpaint: PowerPaint v1 object insertion; gligen: GLIGEN box inpainting (deprecated upstream)")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="crop: inpaint a context crop around the box at the back-end's resolution; whole: the whole "
                        "image; auto: crop when the box is smaller than the resolution")
    p.add_argument("--margin", type=float, default=CROP_MARGIN,
                   help="crop mode: context on each side, as a fraction of the box's long side")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="denoising steps")
    p.add_argument("--dilate", type=int, default=0, help="grow the mask by this many pixels")
    p.add_argument("--feather", type=int, default=0, help="soften the mask's inner edge over this many pixels")
    p.add_argument("--resolution", type=int, help="canvas long side (default: the back-end's native resolution)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the back-end's usual value)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Numbers, classes and folders checked before anything heavy is loaded: one line, exit code 2.
    Each check applies to the options the command has (None: not given)."""
    for dest, (ok, allowed) in NUMBER_CHECKS.items():
        value = getattr(args, dest, None)
        if value is not None and not ok(value):
            parser.error(f"--{dest.replace('_', '-')} must be {allowed}, got {value}")
    categories = args.category if isinstance(args.category, list) else [args.category]
    empty = [c for c in categories if not c.strip()]
    if empty:
        parser.error(f"--category must name an object class, got {empty[0]!r}")
    inpainter = getattr(args, "inpainter", None)
    if inpainter is not None and not Path(inpainter).is_dir():
        parser.error(f"--inpainter {inpainter}: no such folder; pass a local diffusers inpainting folder, or "
                     "leave --inpainter out to write boxes only")


def read_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """(the photo as 8-bit RGB, its normalised --region or None); notes on lossy conversions are printed."""
    from .images import to_rgb_image

    try:
        image, notes = to_rgb_image(args.image)
    except (OSError, ValueError) as err:
        parser.error(f"--image {args.image}: {err}")
    for note in notes:
        print(f"note: {note}")
    try:
        region = parse_region(args.region, image.size)
    except ValueError as err:
        parser.error(str(err))
    return image, region


def load_model(source: str, prog: str):
    """The location model of a checkpoint, model folder or Hub id; errors end the program in one line."""
    from .checkpoint import ModelSourceError
    from .hub import load_model as load

    try:
        return load(source)
    except ModelSourceError as err:
        raise SystemExit(f"{prog}: error: {err}") from None


def load_inpainter(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The --backend pipeline of --inpainter; a folder of another kind is one line, exit code 2."""
    from .inpainters import BackendFolderError, load_backend

    try:
        return load_backend(args.backend, args.inpainter, device=args.device, steps=args.steps,
                            guidance_scale=args.guidance, resolution=args.resolution)
    except (BackendFolderError, ValueError) as err:
        parser.error(str(err))


def draw_overlay(image, boxes: list):
    """All boxes outlined on a copy of `image`, each labelled with its index."""
    from .drawing import draw_boxes

    return draw_boxes(image, boxes, labels=[str(i) for i in range(len(boxes))])


def pixel_size(value: str) -> tuple[float, float]:
    """``W,H`` in pixels, both positive (argparse type)."""
    try:
        w, h = (float(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not W,H in pixels (e.g. 120,80)") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: width and height must be > 0")
    return w, h


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genloc", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--version", action="version", version=f"genloc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("place", "sample boxes for an object in a photo"),
                            ("insert", "sample boxes, then draw the object into each with an inpainting pipeline")):
        p = commands.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(command_parser=p)  # errors name the subcommand
        p.add_argument("--model", type=text, required=True, help="model folder, Hub id (owner/name) or checkpoint")
        p.add_argument("--image", type=text, required=True, help="background photo")
        p.add_argument("--category", required=True, help='object class, e.g. "cup"')
        p.add_argument("--n", type=int, default=DEFAULT_N, help=f"number of boxes (default {DEFAULT_N})")
        p.add_argument("--region", type=text, help=f"restrict boxes to {'|'.join(REGIONS)} or pixels x1,y1,x2,y2")
        p.add_argument("--size", type=pixel_size, help="box size W,H in pixels")
        p.add_argument("--aspect-ratio", type=float, help="box aspect ratio w/h in pixels")
        p.add_argument("--seed", type=int, default=0, help="box sampling seed; edit i uses seed + i")
        p.add_argument("--out", type=text, required=True, help="output folder")
        if name == "insert":
            add_inpainter_arguments(p, required=True)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command_parser
    check_arguments(command, args)
    image, _ = read_inputs(command, args)
    from .hub import is_model_source

    if not is_model_source(args.model):
        command.error(f"--model {args.model}: no such model folder or checkpoint, and not a Hub id (owner/name)")
    pipe = load_inpainter(command, args) if args.command == "insert" else None
    model = load_model(args.model, parser.prog)

    from .files import save_image, write_json
    from .placement import place

    try:
        result = place(model, image, args.category, n=args.n, region=args.region, size=args.size,
                       aspect_ratio=args.aspect_ratio, seed=args.seed)
    except ValueError as err:  # constraints no box of this model can meet
        command.error(str(err))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    boxes = result.boxes.tolist()
    records = [{"index": i, "box": box, "log_prob": float(lp)} for i, (box, lp) in enumerate(zip(boxes, result.log_probs))]
    for rec in records if pipe is not None else ():
        ins = pipe.insert(image, args.category, box=rec["box"], seed=args.seed + rec["index"], mode=args.mode,
                          margin=args.margin, dilate=args.dilate, feather=args.feather)
        save_image(out / f"edit_{rec['index']}.png", ins.image)
        rec.update(ins.record(), box=rec["box"], edit=f"edit_{rec['index']}.png")
    save_image(out / "overlay.png", draw_overlay(image, boxes))
    options = {k: v for k, v in vars(args).items() if k not in ("command", "command_parser", "out")}
    write_json(out / "boxes.json", {**options, "image_size": list(image.size), "genloc_version": __version__,
                                    "notes": result.notes, "boxes": records}, indent=2)
    print(f"wrote {len(records)} box(es){' and edit(s)' if pipe is not None else ''} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
