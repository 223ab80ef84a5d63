"""The `genloc` command: boxes for objects in your photos, the objects drawn into them, scores of boxes
you give, and the demo page, without writing Python (docs/usage.md#the-genloc-command).

    genloc place --model runs/toy_model --image photos/ --category cup --out out/
    genloc place --model owner/name --image 'shots/*.jpg' --category cup plate --out out/
    genloc insert --model owner/name --image photo.jpg --category cup --inpainter DIR --out out/
    genloc score --model owner/name --image photo.jpg --category cup --box 10,20,120,90
    genloc demo --model owner/name

`--model` takes a model folder, a Hub id or a checkpoint. `--image` takes files, folders, glob
patterns and manifests (.jsonl / .csv with an `image` and an optional `categories` column). place and
insert write to --out one `boxes.jsonl` line per image (a rerun skips the images it lists) and each
image's overlay (and edits). A bad argument is one line and exit code 2, before any model loads.
"""
# Building these parsers imports no torch, so every --help answers at once; the commands' code is in
# genloc/cli/placing.py, scoring.py and genloc/demo.py, imported when one runs.
from __future__ import annotations

import argparse

from .. import __version__
from ..arguments import add_model_argument, number, text, whole
from ..choices import BACKENDS, CROP_MARGIN, DEFAULT_STEPS, MODES, REGIONS

# Boxes sampled for one category when --n is not given.
DEFAULT_N = 4
# The most boxes (or edits) --n asks for: more than a page of boxes is a sampling job for `genloc.place`.
MAX_N = 1000
# Images per location-model call.
DEFAULT_BATCH_SIZE = 8
DEVICE_HELP = "where the models run (default: cuda when present, else cpu)"


def pixel_size(value: str) -> tuple[float, float]:
    """``W,H`` in pixels, both positive (argparse type)."""
    try:
        w, h = (float(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not W,H in pixels (e.g. 120,80)") from None
    if not (w > 0 and h > 0):
        raise argparse.ArgumentTypeError(f"{value!r}: width and height must be > 0")
    return w, h


def pixel_box(value: str) -> list[float]:
    """``X1,Y1,X2,Y2`` in pixels (argparse type; whether it lies in the image is checked with the image)."""
    try:
        box = [float(v) for v in value.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise argparse.ArgumentTypeError(f"{value!r} is not X1,Y1,X2,Y2 in pixels (e.g. 10,20,120,90)")
    return box


def region(value: str) -> str:
    """A region word or pixels ``x1,y1,x2,y2`` (argparse type; whether it lies in a photo is checked with the photo)."""
    if value not in REGIONS:
        try:
            pixel_box(value)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"{value!r} is neither one of {'|'.join(REGIONS)} nor pixels "
                                             "x1,y1,x2,y2") from None
    return value


def add_input_arguments(p: argparse.ArgumentParser, command: str) -> None:
    """The model, images, categories and box constraints of place, insert and score."""
    add_model_argument(p, "location model: model folder, Hub id (owner/name) or checkpoint", required=True)
    p.add_argument("--image", type=text, action="extend", nargs="+", required=command != "score",
                   help="photos: files, folders, glob patterns ('shots/*.jpg') or a manifest (.jsonl or .csv with an "
                        "`image` column and an optional `categories` column); may repeat")
    p.add_argument("--category", type=text, action="extend", nargs="+",
                   help='object class, e.g. "cup"; several (or --category repeated): one object each, not overlapping '
                        "(a manifest's categories replace it for its images)")
    p.add_argument("--region", type=region, help=f"restrict boxes to {'|'.join(REGIONS)} or pixels x1,y1,x2,y2")
    p.add_argument("--size", type=pixel_size, help="box size W,H in pixels")
    p.add_argument("--aspect-ratio", type=number(0, above=True), help="box aspect ratio w/h in pixels")
    p.add_argument("--device", type=text, help=DEVICE_HELP)


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """How place and insert draw boxes (`genloc.place` / `genloc.place_many`)."""
    p.add_argument("--n", type=whole(1, MAX_N),
                   help=f"boxes per image for one category (default {DEFAULT_N}); several categories get one box each")
    p.add_argument("--max-iou", type=number(0, 1), default=0.0,
                   help="several categories: the largest IoU between two objects (default 0: disjoint)")
    p.add_argument("--temperature", type=number(0, above=True), default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--top-k", type=whole(1), help="sample among the k most likely tokens of each coordinate")
    p.add_argument("--top-p", type=number(0, 1, above=True), help="nucleus sampling: the smallest set of tokens "
                                                                  "holding this probability")
    p.add_argument("--seed", type=int, default=0, help="box sampling seed; edit i uses seed + i")
    p.add_argument("--batch-size", type=whole(1, 1024), default=DEFAULT_BATCH_SIZE,
                   help=f"photos per location-model call (default {DEFAULT_BATCH_SIZE}; insert draws one photo at a "
                        "time); a photo's boxes depend on its batch")
    p.add_argument("--out", type=text, required=True,
                   help="output folder: boxes.jsonl (one line per image; a rerun skips the images it lists), "
                        "NAME_overlay.png and, for insert, NAME_edit_I.png per image")


def add_inpainter_arguments(p: argparse.ArgumentParser) -> None:
    """The insertion back-end's options."""
    p.add_argument("--inpainter", type=text, required=True,
                   help="diffusers pipeline of the --backend: a local folder or a Hub id (owner/name), e.g. a Stable "
                        "Diffusion inpainting checkpoint")
    p.add_argument("--backend", choices=BACKENDS, default="sd",
                   help="sd: AutoPipelineForInpainting (SD 1.5/2, SDXL, Kandinsky); flux-fill: FluxFillPipeline; "
                        "powerpaint: PowerPaint v1 object insertion; gligen: GLIGEN box inpainting (deprecated upstream)")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="crop: inpaint a context crop around the box at the back-end's resolution; whole: the whole "
                        "image; auto: crop when the box is smaller than the resolution")
    p.add_argument("--margin", type=number(0), default=CROP_MARGIN,
                   help="crop mode: context on each side, as a fraction of the box's long side")
    p.add_argument("--steps", type=whole(1), default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    p.add_argument("--dilate", type=whole(0), default=0, help="grow the mask by this many pixels")
    p.add_argument("--feather", type=whole(0), default=0, help="soften the mask's inner edge over this many pixels")
    p.add_argument("--resolution", type=whole(8), help="canvas long side (default: the back-end's native resolution)")
    p.add_argument("--guidance", type=number(0), help="classifier-free guidance scale (default: the back-end's usual value)")


def add_command_arguments(p: argparse.ArgumentParser, command: str) -> None:
    """Everything `genloc COMMAND` takes (insert.py builds its parser with this too)."""
    if command == "demo":
        add_demo_arguments(p)
        return
    add_input_arguments(p, command)
    if command in ("place", "insert"):
        add_sampling_arguments(p)
    if command == "insert":
        add_inpainter_arguments(p)
    if command == "score":
        p.add_argument("--box", type=pixel_box, action="append",
                       help="a box to score, pixels X1,Y1,X2,Y2 (may repeat; needs one image and one category)")
        p.add_argument("--boxes", type=text, help="a boxes.jsonl of `genloc place` (or lines {image, boxes: [{box, "
                                                  "category}]}): score every box in it")
        p.add_argument("--out", type=text, help="also write the scores to this JSONL file")


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """The demo page's options (`genloc demo` and demo.py)."""
    p.add_argument("--model", type=text, help="location model: model folder, Hub id or checkpoint (default "
                                              "runs/toy_model in the current folder, which `make train` writes)")
    p.add_argument("--inpainter", type=text, help="diffusers inpainting pipeline of --backend: a local folder or a Hub "
                                                  "id (without it, Insert is off)")
    p.add_argument("--backend", choices=BACKENDS, default="sd", help="inpainting back-end (see genloc insert --help)")
    p.add_argument("--steps", type=whole(1), default=DEFAULT_STEPS, help="denoising steps")
    p.add_argument("--device", type=text, help=DEVICE_HELP)
    p.add_argument("--host", type=text, default="127.0.0.1", help="address to serve on (0.0.0.0 exposes the page to "
                                                                   "the network)")
    p.add_argument("--port", type=whole(1, 65535), default=7860)


COMMANDS = {
    "place": "sample boxes for objects in photos",
    "insert": "sample boxes, then draw the objects into them with an inpainting pipeline",
    "score": "how likely the model finds boxes you give",
    "demo": "the demo page in the browser (needs the [demo] extra)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genloc", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--version", action="version", version=f"genloc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        p = commands.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(command_parser=p)  # errors name the subcommand
        add_command_arguments(p, name)
    return parser
