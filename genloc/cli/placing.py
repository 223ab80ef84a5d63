"""`genloc place` and `genloc insert` over many photos (docs/usage.md#the-genloc-command): one category
gives ``--n`` boxes per photo (`genloc.place`, a batch of photos per model call); several give one
box each, not overlapping (`genloc.place_many`). Every photo done is one line of ``OUT/boxes.jsonl``,
appended and fsynced after its overlay and edits are written, so a rerun skips it and a crash never
counts a half-done photo; files of an unfinished photo (not listed in ``boxes.jsonl``) are removed
before work starts."""
from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

from .. import __version__
from ..files import OutputError, append_jsonl, complete_jsonl, prepare_output_dir
from .parsers import DEFAULT_N
from .inputs import Photo, expand_images
from .progress import Progress

BOXES_FILE = "boxes.jsonl"
# Options that change what a photo's line holds: a rerun into the same --out must repeat them.
SAMPLING_OPTIONS = ("model", "category", "n", "max_iou", "region", "size", "aspect_ratio", "temperature", "top_k",
                    "top_p", "seed", "batch_size")
# What insert.py and `genloc` wrote before boxes.jsonl: kept, never mixed with a new run's files.
FORMER_LAYOUT = re.compile(r"records\.json|boxes\.json|overlay\.png|edit_\d+\.(png|json)")
INSERT_OPTIONS = ("inpainter", "backend", "mode", "margin", "steps", "dilate", "feather", "resolution", "guidance")


def resolve_device(parser: argparse.ArgumentParser, device):
    """--device, or cuda when present, else cpu; a device torch cannot use is one line, exit code 2."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        parser.error(f"--device {device}: {err}")
    if kind == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: no CUDA device is visible (torch.cuda.is_available() is False); "
                     "leave --device out to run on the CPU")
    return device


def check_sources(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Photo]:
    """The photos and their categories, the model and the pipeline named, before anything loads."""
    from ..hub import is_model_source

    try:
        photos = expand_images(args.image)
    except ValueError as err:
        parser.error(str(err))
    for photo in photos:
        photo.categories = photo.categories or args.category
        if not photo.categories:
            parser.error(f"--category: {photo.image} has no class to place; give --category (or a manifest's "
                         "`categories` column)")
    if getattr(args, "n", None) is not None and len(args.category or []) > 1:
        parser.error("--n applies to one category; several categories get one box each")
    if not is_model_source(args.model):
        parser.error(f"--model {args.model} not found: no such model folder or checkpoint, and not a Hub id "
                     "(owner/name)")
    inpainter = getattr(args, "inpainter", None)
    if inpainter is not None and not is_model_source(inpainter):
        parser.error(f"--inpainter {inpainter}: no such folder, and not a Hub id (owner/name); pass a diffusers "
                     "inpainting pipeline, or use `genloc place` to write boxes only")
    return photos


def prepare_out(parser: argparse.ArgumentParser, args: argparse.Namespace, options: dict):
    """--out checked and made; (the lines already done, keyed by image). A used folder must have been
    written with the same options; files no line lists (an unfinished photo's) are removed."""
    try:
        out = prepare_output_dir(args.out)
        done = complete_jsonl(out / BOXES_FILE)
    except (OutputError, ValueError) as err:
        parser.error(str(err))
    for rec in done[:1]:
        changed = [k for k in options if rec.get("options", {}).get(k) != options[k]]
        if changed:
            parser.error(f"--out {out}: its {BOXES_FILE} was written with other settings ("
                         + ", ".join(f"{k}: {rec.get('options', {}).get(k)!r} there, {options[k]!r} now" for k in changed)
                         + "); repeat them to resume, or choose another --out")
    former = sorted(p.name for p in out.iterdir() if FORMER_LAYOUT.fullmatch(p.name))
    if former:
        parser.error(f"--out {out}: holds the files of an earlier layout ({', '.join(former[:3])}"
                     f"{', ...' if len(former) > 3 else ''}) that {BOXES_FILE} would not list: choose another --out, "
                     "or move them away")
    listed = {name for rec in done for name in [rec.get("overlay"), *(b.get("edit") for b in rec.get("boxes", []))]}
    stale = sorted(p for pattern in ("*_overlay.png", "*_edit_*.png") for p in out.glob(pattern)
                   if p.name not in listed)
    for path in stale:
        path.unlink()
    if stale:
        print(f"removed {len(stale)} file(s) of an unfinished run that {BOXES_FILE} does not list "
              f"({', '.join(p.name for p in stale[:3])}{', ...' if len(stale) > 3 else ''})", file=sys.stderr)
    return out, {rec.get("image"): rec for rec in done}


def file_names(photos: list[Photo], done: dict) -> dict[str, str]:
    """A file-name stem per photo: its own stem, or stem_<hash of its path> when another photo shares it."""
    taken = {}
    for image in [*done, *(p.image for p in photos)]:
        taken.setdefault(Path(image).stem, set()).add(image)
    return {p.image: Path(p.image).stem if len(taken[Path(p.image).stem]) == 1
            else f"{Path(p.image).stem}_{hashlib.sha1(p.image.encode()).hexdigest()[:8]}" for p in photos}


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, measure=None) -> int:
    """Place (or insert, with ``args.inpainter``) into every photo not yet in boxes.jsonl. ``measure``
    (``(before, after, box, category) -> dict``) adds an edit's metrics to its record (insert.py)."""
    insert = getattr(args, "inpainter", None) is not None
    photos = check_sources(parser, args)
    keys = SAMPLING_OPTIONS + (INSERT_OPTIONS if insert else ())
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if k in keys}
    options.update(n=args.n or DEFAULT_N, **getattr(measure, "options", {}))
    device = resolve_device(parser, args.device)
    out, done = prepare_out(parser, args, options)
    todo = [p for p in photos if p.image not in done]
    if len(todo) < len(photos):
        print(f"{len(photos) - len(todo)} of {len(photos)} photo(s) already in {out / BOXES_FILE}: skipped")
    if not todo:
        return 0
    model = load_model(parser, args.model, device)
    pipe = load_inpainter(parser, args, device) if insert else None
    names = file_names(todo, done)
    bar = Progress(len(todo), "insert" if insert else "place")
    single = [p for p in todo if len(p.categories) == 1]
    # one category: a batch of photos per model call (one photo at a time when inpainting follows)
    step = 1 if insert else args.batch_size
    batches = [single[i:i + step] for i in range(0, len(single), step)] + [[p] for p in todo if len(p.categories) > 1]
    try:
        failed, written = place_all(batches, model, args, pipe, measure, out, names, options, parser.prog, bar)
    except OutputError as err:  # a full disk mid-run: the photos done so far stay done
        bar.close()
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    bar.close()
    print(f"wrote {written} photo(s) to {out / BOXES_FILE}" + (" with edits" if insert else ""))
    if failed:
        print(f"{parser.prog}: {failed} photo(s) not done (see above); fix them and rerun: the done ones are skipped",
              file=sys.stderr)
        return 1
    return 0


def place_all(batches, model, args, pipe, measure, out: Path, names: dict, options: dict, prog: str, bar):
    """Every batch placed and its lines appended; (photos failed, photos written)."""
    failed = written = 0
    for batch in batches:
        images = read_images(batch, prog, bar.write)
        ready = [(p, img) for p, img in zip(batch, images) if img is not None]
        failed += len(batch) - len(ready)
        if ready:
            try:
                lines = place_batch(model, ready, args, pipe, measure, out, names)
            except ValueError:  # a constraint some photo cannot meet (a pixel region outside it): photo by photo
                lines = [line for pair in ready for line in place_alone(model, pair, args, pipe, measure, out, names)]
            for line in lines:
                if line.get("error"):
                    bar.write(f"{prog}: {line['image']}: {line['error']}")
                    failed += 1
                    continue
                append_jsonl(out / BOXES_FILE, {**line, "options": options, "genloc_version": __version__})
                written += 1
        bar.update(len(batch))
    return failed, written


def read_images(photos: list[Photo], prog: str, say) -> list:
    """Each photo as 8-bit RGB, or None (its problem said in one line: the other photos go on)."""
    from ..images import to_rgb_image

    images = []
    for photo in photos:
        try:
            image, notes = to_rgb_image(photo.image)
        except (OSError, ValueError) as err:
            say(f"{prog}: --image {photo.image}: {err}")
            image, notes = None, []
        for note in notes:
            say(f"note: {photo.image}: {note}")
        images.append(image)
    return images


def load_model(parser: argparse.ArgumentParser, source: str, device: str):
    """The location model of a checkpoint, model folder or Hub id; errors end the program in one line."""
    from ..checkpoint import ModelSourceError
    from ..hub import load_model as load

    try:
        return load(source, device=device)
    except ModelSourceError as err:
        raise SystemExit(f"{parser.prog}: error: {err}") from None


def load_inpainter(parser: argparse.ArgumentParser, args: argparse.Namespace, device: str):
    """The --backend pipeline of --inpainter, its per-step progress bar on; a folder of another kind is
    one line, exit code 2."""
    from ..inpainters import BackendFolderError, load_backend

    try:
        inpainter = load_backend(args.backend, args.inpainter, device=device, steps=args.steps,
                                 guidance_scale=args.guidance, resolution=args.resolution)
    except (BackendFolderError, ValueError) as err:
        parser.error(str(err))
    inpainter.pipe.set_progress_bar_config(disable=False, desc="denoising", leave=False, file=sys.stderr)
    return inpainter


def overlay(image, boxes: list, categories: list[str]):
    """All boxes outlined on a copy of ``image``, each labelled with its index (and class, when several)."""
    from ..drawing import draw_boxes

    labels = [str(i) if len(set(categories)) == 1 else f"{i} {c}" for i, c in enumerate(categories)]
    return draw_boxes(image, boxes, labels=labels)


def place_batch(model, ready: list, args, pipe, measure, out: Path, names: dict) -> list[dict]:
    """The boxes.jsonl line of each (photo, image) of a batch, its overlay and edits written."""
    from ..files import save_image
    from ..placement import NoValidSetError, place, place_many

    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    constraints = dict(size=args.size, aspect_ratio=args.aspect_ratio)
    lines = []
    if len(ready[0][0].categories) == 1:
        results = place(model, [img for _, img in ready], [p.categories[0] for p, _ in ready], n=args.n or DEFAULT_N,
                        region=args.region, **constraints, **sampling)
        placed = [(p, img, r.boxes.tolist(), r.log_probs.tolist(), r.notes, None) for (p, img), r in zip(ready, results)]
    else:
        (photo, image), = ready
        k = len(photo.categories)
        edits = []  # (image before, insertion) of every object drawn, failed rounds too
        try:
            result = place_many(model, image, photo.categories, max_iou=args.max_iou, regions=[args.region] * k,
                                sizes=[args.size] * k, aspect_ratios=[args.aspect_ratio] * k, **sampling,
                                dilate=getattr(args, "dilate", 0),
                                inpainter=None if pipe is None else inpaint_into(pipe, args, edits))
        except NoValidSetError as err:
            return [{"image": photo.image, "error": str(err)}]
        placed = [(photo, image, result.boxes.tolist(), result.log_probs.tolist(), result.notes, edits[-k:])]
    for photo, image, boxes, log_probs, notes, edits in placed:
        name = names[photo.image]
        categories = photo.categories if len(photo.categories) > 1 else photo.categories * len(boxes)
        records = [{"index": i, "category": c, "box": box, "log_prob": lp}
                   for i, (box, lp, c) in enumerate(zip(boxes, log_probs, categories))]
        if pipe is not None:
            # one category: each box drawn into the photo; several: edit i is the photo after objects 0..i
            for rec in records:
                if edits is None:
                    before, ins = image, pipe.insert(image, rec["category"], box=rec["box"], seed=args.seed + rec["index"],
                                                     mode=args.mode, margin=args.margin, dilate=args.dilate,
                                                     feather=args.feather)
                else:
                    before, ins = edits[rec["index"]]
                rec.update(ins.record(), box=rec["box"], edit=f"{name}_edit_{rec['index']}.png",
                           metrics=measure(before, ins.image, rec["box"], rec["category"]) if measure else {})
                save_image(out / rec["edit"], ins.image)
        save_image(out / f"{name}_overlay.png", overlay(image, boxes, categories))
        lines.append({"image": photo.image, "image_size": list(image.size), "categories": photo.categories,
                      "overlay": f"{name}_overlay.png", "notes": notes, "boxes": records})
    return lines


def place_alone(model, pair: tuple, args, pipe, measure, out: Path, names: dict) -> list[dict]:
    """`place_batch` of one photo; a constraint it cannot meet is its line's error."""
    try:
        return place_batch(model, [pair], args, pipe, measure, out, names)
    except ValueError as err:
        return [{"image": pair[0].image, "error": str(err)}]


def inpaint_into(pipe, args, edits: list):
    """`place_many`'s inpainter: each object drawn into the current image; ``edits`` keeps (before, insertion)."""
    def inpaint(current, box, category: str, seed: int):
        ins = pipe.insert(current, category, box=box, seed=seed, mode=args.mode, margin=args.margin,
                          dilate=args.dilate, feather=args.feather)
        edits.append((current, ins))
        return ins.image

    return inpaint
