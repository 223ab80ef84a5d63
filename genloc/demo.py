"""GenLoc demo page (Gradio): place objects in your own photos and insert them, in the browser.

    genloc demo --model owner/name                          # the installed command (the [demo] extra)
    python demo.py                                          # in a clone: the toy model of `make train`
    python demo.py --model runs/toy_model --inpainter /models/sd-inpainting --backend sd --port 7860

Upload a photo (or pick a bundled example), type one or several categories (comma-separated), choose
n, temperature and an optional region (a positional word, or a pixel box: type it or click two
corners on the photo), press Place: the sampled boxes are drawn with their probabilities beside a
heat map of where the model puts box centres. Pick a box (or all), press Insert: the inpainting
back-end draws the object(s), shown before/after; the edit and a JSON of boxes and scores download.
Mark any box (two clicks, or type it as the region box) and press Score: how likely the model finds
it for each category, as a probability, a density per pixel² and a percentile among the model's own
draws.
Served on 127.0.0.1 unless --host says otherwise.

The app's logic lives in plain functions (`place_boxes`, `insert_boxes`, ...), tested directly;
`build_app` only lays out the page and turns errors into messages in it.
"""

import math
import re
import socket
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .choices import BACKENDS, REGIONS
from .drawing import colour, draw_boxes
from .files import save_image, write_json
from .inpainting import pixel_rect

# The folder the default model, a run's relative data folders and the example photos are looked up
# in: None for the current folder (`genloc demo`); demo.py sets the repository root.
ROOT: Path | None = None
DEFAULT_MODEL = "runs/toy_model"  # in ROOT: `make train` writes it
# Real photos shipped with the repository's tests (licences in tests/fixtures/PROVENANCE.md), when ROOT has them.
EXAMPLES = [Path("tests/fixtures/libcom/controllable_composition/background") / name
            for name in ("000000460450.png", "000000049931.png")] + \
           [Path("tests/fixtures/opa_sample/reconstructed/580029_background_reconstructed.png")]


def root() -> Path:
    return ROOT or Path.cwd()


def examples() -> list[Path]:
    return [root() / p for p in EXAMPLES if (root() / p).is_file()]
ANYWHERE = "anywhere"
PIXEL_BOX = "pixel box"
REGION_CHOICES = [ANYWHERE, *REGIONS, PIXEL_BOX]
ALL = "all"
# Extra draws per category for the heat map: the centres of this many boxes estimate the model's
# distribution far better than the n boxes shown.
HEAT_DRAWS = 256
HEAT_GRID = 64  # heat map cells along the image's long side
# Boxes the model draws per category to rank a scored box among (its percentile).
SCORE_DRAWS = 1000


class DemoError(ValueError):
    """A problem the page reports as a message (bad image, unknown class, missing model ...)."""


# ------------------------------------------------------------------------------------------ loading
@dataclass
class Backends:
    """What the page runs on, and the line it shows about each."""

    model: object = None          # a LocationModel, or None
    model_note: str = ""
    classes: list | None = None   # the classes the model was trained on, when its run says so
    inpainter: object = None      # a genloc.inpainters.Inpainter, or None
    inpainter_note: str = ""
    source: str = DEFAULT_MODEL


def load_backends(model: str | None, inpainter: str | None, backend: str, device: str, steps: int) -> Backends:
    """Load the location model and the inpainter. Missing defaults become notes shown in the page;
    a source given explicitly that cannot be loaded raises DemoError (the CLI exits 2 with it)."""
    from .checkpoint import ModelSourceError
    from .hub import load_model, training_classes
    from .inpainters import BackendFolderError, load_backend

    out = Backends(source=model or DEFAULT_MODEL)
    if model is None and not (root() / DEFAULT_MODEL).exists():
        out.model_note = (f"No location model at `{DEFAULT_MODEL}`: run `make train` (it trains the toy model and "
                          f"exports it there), or restart with `--model FOLDER | HUB_ID | CHECKPOINT`.")
    else:
        try:
            out.model = load_model(model or root() / DEFAULT_MODEL, device=device)
        except (ModelSourceError, OSError) as err:
            raise DemoError(f"--model {out.source}: {err}") from None
        # relative data folders: from where the demo runs, else its root (where make train ran)
        out.classes = out.model.training_classes = training_classes(model or str(root() / DEFAULT_MODEL),
                                                                    roots=(root(),))
        cfg = out.model.cfg
        known = f"trained on: {', '.join(out.classes)}" if out.classes else "open vocabulary (its training classes are unknown here)"
        out.model_note = f"Location model `{out.source}` ({cfg.image_size} px, {cfg.num_bins} bins; {known})."
    if inpainter is None:
        out.inpainter_note = ("No inpainter: Insert is off. Restart with `--inpainter DIR --backend "
                              f"{'|'.join(BACKENDS)}`, DIR a local diffusers inpainting folder (e.g. Stable Diffusion "
                              "inpainting saved with `save_pretrained`).")
    else:
        try:
            out.inpainter = load_backend(backend, inpainter, device=device, steps=steps)
        except (BackendFolderError, ValueError) as err:
            raise DemoError(f"--inpainter {inpainter}: {err}") from None
        out.inpainter_note = f"Inpainter `{inpainter}` (back-end `{backend}`, {steps} steps)."
    return out


# ------------------------------------------------------------------------------------------ inputs
def read_image(image) -> tuple[Image.Image, list[str]]:
    """The uploaded photo (a path or PIL image) as 8-bit RGB, with notes on lossy conversions."""
    from .images import to_rgb_image

    if image is None:
        raise DemoError("No photo: upload one or pick an example.")
    try:
        return to_rgb_image(image)
    except (OSError, ValueError, TypeError) as err:
        name = Path(image).name if isinstance(image, (str, Path)) else type(image).__name__
        raise DemoError(f"Cannot read the photo {name}: {err}. Upload a PNG, JPEG or WebP image.") from None


def parse_categories(text: str, classes: list[str] | None) -> list[str]:
    """Comma-separated class names; with known training classes, any other name is an error."""
    names = [c.strip() for c in (text or "").split(",") if c.strip()]
    if not names:
        raise DemoError("No category: type a class name such as `person`, or several separated by commas.")
    if classes is not None:
        unknown = [c for c in names if c not in classes]
        if unknown:
            raise DemoError(f"Unknown class {', '.join(repr(c) for c in unknown)} for this model: it was trained on "
                            f"{', '.join(classes)}. Type one of those.")
    return names


def parse_region(choice: str, pixels: str, size: tuple[int, int]):
    """The region `place` takes: None, a positional word or a pixel box inside the image. A typed
    box is used unless the menu names a word (`region_note` then says why it is not)."""
    from .placement import normalised_region

    typed = bool((pixels or "").strip())
    if choice in (None, "", ANYWHERE) and not typed:
        return None
    if choice not in (None, "", ANYWHERE, PIXEL_BOX):
        if choice not in REGIONS:
            raise DemoError(f"Unknown region {choice!r}: choose one of {', '.join(REGION_CHOICES)}.")
        return choice
    values = re.split(r"[,\s]+", (pixels or "").strip())
    try:
        box = tuple(float(v) for v in values)
        normalised_region(box, size)
    except ValueError:
        raise DemoError(f"Region box {pixels!r} is not x1,y1,x2,y2 pixels inside the {size[0]}x{size[1]} photo: "
                        "type it, or click two corners on the photo.") from None
    return box


def region_note(choice: str, pixels: str) -> str | None:
    """What the page says about a typed region box that the menu overrides, or None."""
    if (pixels or "").strip() and choice in REGIONS:
        return (f"The typed region box {pixels.strip()} is not used: Region is '{choice}'. Choose "
                f"'{PIXEL_BOX}' to use the box, or clear it.")
    return None


def whole_number(value, name: str) -> int:
    """A page field that must hold a whole number (a cleared number box gives None)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not number.is_integer():
        raise DemoError(f"{name} must be a whole number, got {value!r}.")
    return int(number)


def corner_click(first: list | None, x: float, y: float) -> tuple[list | None, str | None]:
    """Two clicks on the photo make a region box: (the pending first corner, the box text once complete)."""
    if first is None:
        return [x, y], None
    x1, x2 = sorted((first[0], x))
    y1, y2 = sorted((first[1], y))
    if x2 - x1 < 1 or y2 - y1 < 1:
        return [x, y], None  # a repeated click starts over
    return None, f"{x1:.0f},{y1:.0f},{x2:.0f},{y2:.0f}"


# ------------------------------------------------------------------------------------------ place
@dataclass
class Placed:
    """What Place produced; kept in the page's state for Insert."""

    image: Image.Image            # the photo, RGB
    boxes_image: Image.Image      # the photo with the boxes drawn
    heat_image: Image.Image       # box-centre density over the photo
    records: list[dict]           # one per box: index, category, box (pixels), box_norm, log_prob, prob, color
    doc: dict                     # the JSON document (settings + records)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def place_boxes(backends: Backends, image, categories: str, n: int, temperature: float, region_choice: str = ANYWHERE,
                region_pixels: str = "", seed: int = 0) -> Placed:
    """Sample ``n`` boxes per category (one batched model call, plus the heat map's draws); each
    category's boxes are listed most probable first."""
    from .placement import place
    from .sampling import check_filter_args

    if backends.model is None:
        raise DemoError(backends.model_note)
    start = time.perf_counter()
    photo, notes = read_image(image)
    names = parse_categories(categories, backends.classes)
    n, seed = whole_number(n, "n"), whole_number(seed, "Seed")
    if not 1 <= n <= HEAT_DRAWS:
        raise DemoError(f"n must be between 1 and {HEAT_DRAWS}, got {n}.")
    try:
        check_filter_args(float(temperature))
    except (TypeError, ValueError):
        raise DemoError(f"Temperature must be positive (a finite number), got {temperature}.") from None
    region = parse_region(region_choice, region_pixels, photo.size)
    note = region_note(region_choice, region_pixels)
    if note:
        notes = [*notes, note]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # conversion notes are shown in the page instead
        results = place(backends.model, [photo] * len(names), names, n=max(n, HEAT_DRAWS), region=region,
                        temperature=float(temperature), seed=seed)
    w, h = photo.size
    records, centres = [], []
    for name, result in zip(names, results):
        boxes = result.boxes.double()
        centres.append(torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1))
        drawn = sorted(zip(boxes[:n].tolist(), result.log_probs[:n].tolist()), key=lambda d: -d[1])
        for box, log_prob in drawn:  # most probable first
            i = len(records)
            records.append({"index": i, "category": name, "box": box,
                            "box_norm": [box[0] / w, box[1] / h, box[2] / w, box[3] / h],
                            "log_prob": log_prob, "prob": math.exp(log_prob), "color": list(colour(i))})
    doc = {"image_size": [w, h], "model": backends.source, "categories": names, "n": n,
           "temperature": float(temperature), "region": list(region) if isinstance(region, tuple) else region,
           "seed": seed, "boxes": records, "notes": notes}
    heat = heat_map(photo, torch.cat(centres).numpy(), region_box(region, photo.size))
    return Placed(photo, draw_records(photo, records), heat, records, doc, notes, time.perf_counter() - start)


def region_box(region, size: tuple[int, int]):
    """A region as `parse_region` gives it (None, a word or a pixel box) -> pixel box, or None."""
    if region is None:
        return None
    if isinstance(region, str):
        x1, y1, x2, y2 = REGIONS[region]
        return x1 * size[0], y1 * size[1], x2 * size[0], y2 * size[1]
    return region


def draw_records(photo: Image.Image, records: list[dict]) -> Image.Image:
    """Each box with its index, class and probability (`genloc.drawing.draw_boxes`)."""
    return draw_boxes(photo, [rec["box"] for rec in records], [rec["color"] for rec in records],
                      [f"{rec['index']} {rec['category']} {rec['prob']:.1e}" for rec in records])


def heat_map(photo: Image.Image, centres: np.ndarray, region=None) -> Image.Image:
    """Density of box centres (pixels, ``[N, 2]``), smoothed, as a colour map over the greyed photo;
    the region (a pixel box), if any, outlined in white."""
    from matplotlib import colormaps
    from scipy.ndimage import gaussian_filter

    w, h = photo.size
    scale = HEAT_GRID / max(w, h)
    gw, gh = max(1, round(w * scale)), max(1, round(h * scale))
    hist, _, _ = np.histogram2d(centres[:, 1], centres[:, 0], bins=(gh, gw), range=((0, h), (0, w)))
    density = gaussian_filter(hist, sigma=1.0, mode="constant")
    density = density / density.max() if density.max() > 0 else density
    heat = Image.fromarray((density * 255).astype(np.uint8), "L").resize((w, h), Image.BILINEAR)
    d = np.asarray(heat, dtype=np.float32)[..., None] / 255.0
    colour = colormaps["inferno"](d[..., 0])[..., :3] * 255.0
    grey = np.asarray(photo.convert("L").convert("RGB"), dtype=np.float32) * 0.6
    alpha = np.clip(d * 1.5, 0, 0.85)
    out = Image.fromarray(np.rint(grey * (1 - alpha) + colour * alpha).astype(np.uint8), "RGB")
    if region is not None:
        x0, y0, x1, y1 = pixel_rect(region, photo.size)
        ImageDraw.Draw(out).rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 255, 255), width=2)
    return out


# ------------------------------------------------------------------------------------------ insert
@dataclass
class Inserted:
    before: Image.Image
    after: Image.Image
    records: list[dict]   # the inserted boxes, each with the back-end's record of the edit
    doc: dict             # Place's document plus the insertions
    seconds: float = 0.0


def insert_boxes(backends: Backends, placed: Placed | None, choice: str, seed: int = 0) -> Inserted:
    """Draw the object of the chosen box (or of every box, one after another) with the inpainter."""
    if backends.inpainter is None:
        raise DemoError(backends.inpainter_note)
    if placed is None:
        raise DemoError("Nothing placed yet: press Place first, then pick a box.")
    if choice == ALL:
        chosen = placed.records
    elif str(choice).isdigit() and int(choice) < len(placed.records):
        chosen = [placed.records[int(choice)]]
    else:
        raise DemoError(f"Box {choice!r} is not one of the placed boxes: pick one from the list.")
    seed = whole_number(seed, "Seed")
    start = time.perf_counter()
    current, done = placed.image, []
    for step, rec in enumerate(chosen):
        ins = backends.inpainter.insert(current, rec["category"], box=rec["box"], seed=seed + step, mode="auto")
        current = ins.image
        done.append({**rec, "insertion": ins.record()})
    doc = {**placed.doc, "inserted": done}
    return Inserted(placed.image, current, done, doc, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------ score
@dataclass
class Scored:
    """What Score produced: the marked box on the photo and one record per category."""

    boxes_image: Image.Image      # the photo with the scored box drawn
    records: list[dict]           # category, box, log_prob, prob, log_density, percentile
    seconds: float = 0.0


def score_box(backends: Backends, image, categories: str, box_text: str, seed: int = 0) -> Scored:
    """The model's probability of the marked box (pixels ``x1,y1,x2,y2``) for each category
    (`genloc.score`, no constraints), and its percentile among `SCORE_DRAWS` boxes the model draws
    for that category: the share of draws the model finds less likely (ties count half)."""
    from .placement import place, score

    if backends.model is None:
        raise DemoError(backends.model_note)
    start = time.perf_counter()
    photo, _ = read_image(image)
    names = parse_categories(categories, backends.classes)
    seed = whole_number(seed, "Seed")
    if not (box_text or "").strip():
        raise DemoError("No box to score: click two corners on the photo, or type x1,y1,x2,y2 in the region box.")
    box = parse_region(PIXEL_BOX, box_text, photo.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # conversion notes: Place shows them
        try:
            scored = score(backends.model, [photo] * len(names), names, [[box]] * len(names))
        except ValueError as err:  # a box too thin to be a box of this model
            raise DemoError(f"Cannot score the box {box_text.strip()}: {err}") from None
        drawn = place(backends.model, [photo] * len(names), names, n=SCORE_DRAWS, seed=seed)
    records = []
    for name, one, draws in zip(names, scored, drawn):
        log_prob = float(one.log_probs[0])
        others = draws.log_probs.double()
        tied = torch.isclose(others, torch.tensor(log_prob, dtype=torch.float64), rtol=0.0, atol=1e-5)
        share = float(((others < log_prob) & ~tied).double().mean() + 0.5 * tied.double().mean())
        records.append({"category": name, "box": list(box), "log_prob": log_prob, "prob": math.exp(log_prob),
                        "log_density": float(one.log_densities[0]), "percentile": 100.0 * share})
    drawn_box = draw_boxes(photo, [box], labels=["scored"])
    return Scored(drawn_box, records, time.perf_counter() - start)


def score_message(scored: Scored) -> str:
    """The page's table of a Score result."""
    rows = [f"| {r['category']} | {r['prob']:.2e} | {r['log_prob']:.3f} | {r['log_density']:.2f} | "
            f"{r['percentile']:.1f} |" for r in scored.records]
    return (f"Score of the box {', '.join(f'{v:.0f}' for v in scored.records[0]['box'])} in {scored.seconds:.2f} s "
            f"(percentile: share of {SCORE_DRAWS} boxes the model draws for the class that it finds less likely).\n\n"
            "| class | probability | log-probability | log-density per px² | percentile |\n|---|---|---|---|---|\n"
            + "\n".join(rows))


# ------------------------------------------------------------------------------------------ files
def save_json(folder: Path, name: str, doc: dict) -> str:
    """Downloads are written atomically (`genloc.files`): never half written."""
    write_json(folder / name, doc, indent=2)
    return str(folder / name)


def save_png(folder: Path, name: str, image: Image.Image) -> str:
    save_image(folder / name, image)
    return str(folder / name)


def error_message(err: BaseException) -> str:
    """The one line the page shows for an error (the traceback of unexpected ones goes to the server log)."""
    if isinstance(err, DemoError):
        return f"**Error:** {err}"
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower():
        return ("**Error: out of memory.** Lower n or the number of categories, use a smaller photo, or run the "
                "demo with `--device cpu`.")
    traceback.print_exception(err, file=sys.stderr)
    return f"**Error:** unexpected {type(err).__name__}: {str(err)[:300]} (details in the server's log)."


# ------------------------------------------------------------------------------------------ page
def build_app(backends: Backends, out_root: Path):
    """The page: inputs and Place on the left, results on the right, Insert below. Thin: every
    callback calls one plain function and turns its errors into the message line."""
    import gradio as gr

    def on_place(image, categories, n, temperature, region_choice, region_pixels, seed):
        try:
            placed = place_boxes(backends, image, categories, n, temperature, region_choice, region_pixels, seed)
        except Exception as err:  # noqa: BLE001 -- every error becomes a message in the page
            return None, None, None, gr.Dropdown(choices=[], value=None), None, error_message(err), None, None
        folder = Path(tempfile.mkdtemp(prefix="place-", dir=out_root))
        boxes_json = save_json(folder, "boxes.json", placed.doc)
        choices = [(f"{r['index']}: {r['category']} (p={r['prob']:.1e})", str(r["index"])) for r in placed.records]
        notes = "".join(f"\n\nNote: {note}" for note in placed.notes)
        message = (f"{len(placed.records)} boxes for {', '.join(placed.doc['categories'])} in "
                   f"{placed.seconds:.2f} s.{notes}")
        return (placed.boxes_image, placed.heat_image, boxes_json,
                gr.Dropdown(choices=[(f"{ALL} boxes", ALL), *choices], value=choices[0][1]), placed, message, None, None)

    def on_insert(placed, choice, seed):
        try:
            inserted = insert_boxes(backends, placed, choice, seed)
        except Exception as err:  # noqa: BLE001
            return None, None, None, error_message(err)
        folder = Path(tempfile.mkdtemp(prefix="insert-", dir=out_root))
        edit = save_png(folder, "edit.png", inserted.after)
        doc = save_json(folder, "edit.json", inserted.doc)
        return ((inserted.before, inserted.after), edit, doc,
                f"Inserted {len(inserted.records)} object(s) in {inserted.seconds:.2f} s.")

    def on_score(image, categories, region_pixels, seed):
        try:
            scored = score_box(backends, image, categories, region_pixels, seed)
        except Exception as err:  # noqa: BLE001
            return None, error_message(err)
        return scored.boxes_image, score_message(scored)

    def on_click(first, evt: gr.SelectData):
        first, box = corner_click(first, float(evt.index[0]), float(evt.index[1]))
        if box is None:
            return first, gr.skip(), gr.skip(), "First corner set: click the opposite corner."
        return first, box, PIXEL_BOX, f"Region box {box}."

    with gr.Blocks(title="GenLoc demo", analytics_enabled=False) as app:  # the page never calls home
        gr.Markdown("# GenLoc: where could the object go?\n" + backends.model_note + "  \n" + backends.inpainter_note,
                    elem_id="status")
        placed_state, corner_state = gr.State(None), gr.State(None)
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", image_mode=None, label="Photo (click two corners for a region box)",
                                 sources=["upload", "clipboard"], elem_id="photo")
                tolerate_unreadable_uploads(image)
                if examples():
                    gr.Examples([[str(p)] for p in examples()], inputs=[image], label="Examples (real photos)")
            with gr.Column():
                categories = gr.Textbox(label="Categories (comma-separated)", value="person", elem_id="categories")
                n = gr.Slider(1, 50, value=10, step=1, label="n boxes per category", elem_id="n")
                temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature", elem_id="temperature")
                with gr.Row():
                    region_choice = gr.Dropdown(REGION_CHOICES, value=ANYWHERE, label="Region", elem_id="region")
                    region_pixels = gr.Textbox(label="Region box x1,y1,x2,y2 (pixels)", elem_id="region-pixels")
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                with gr.Row():
                    place_button = gr.Button("Place", variant="primary", elem_id="place")
                    score_button = gr.Button("Score the region box", elem_id="score")
        message = gr.Markdown("", elem_id="message")
        with gr.Row():
            boxes_image = gr.Image(label="Sampled boxes (index, class, probability)", format="png", interactive=False,
                                   elem_id="boxes")
            heat_image = gr.Image(label="Where the box centres fall", format="png", interactive=False, elem_id="heat")
        with gr.Row():
            boxes_file = gr.File(label="Boxes and scores (JSON)", interactive=False, elem_id="boxes-json")
            with gr.Column():
                box_choice = gr.Dropdown([], label="Box to insert", elem_id="box-choice")
                insert_button = gr.Button("Insert", variant="primary", elem_id="insert")
        slider = gr.ImageSlider(label="Before / after", format="png", type="pil", interactive=False, elem_id="slider")
        with gr.Row():
            edit_file = gr.File(label="The edit (PNG)", interactive=False, elem_id="edit-png")
            edit_json = gr.File(label="Boxes, scores and edit record (JSON)", interactive=False, elem_id="edit-json")

        place_button.click(on_place, [image, categories, n, temperature, region_choice, region_pixels, seed],
                           [boxes_image, heat_image, boxes_file, box_choice, placed_state, message, slider, edit_file])
        score_button.click(on_score, [image, categories, region_pixels, seed], [boxes_image, message])
        insert_button.click(on_insert, [placed_state, box_choice, seed], [slider, edit_file, edit_json, message])
        image.select(on_click, [corner_state], [corner_state, region_pixels, region_choice, message])
        region_pixels.input(lambda text: PIXEL_BOX if text.strip() else gr.skip(), [region_pixels], [region_choice])
    return app


def tolerate_unreadable_uploads(image) -> None:
    """Gradio opens an upload with PIL before any callback runs; an unreadable file would end there in
    its generic error. Pass the file's path on instead, so Place reports what is wrong with it."""
    original = image.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except OSError:  # PIL's UnidentifiedImageError and truncated files
            return None if payload is None or payload.path is None else str(payload.path)

    image.preprocess = preprocess


# ------------------------------------------------------------------------------------------ CLI
def build_parser():
    import argparse

    from .cli.parsers import add_demo_arguments

    p = argparse.ArgumentParser(prog="genloc demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_demo_arguments(p)
    return p


def check_port(host: str, port: int) -> None:
    """Bind ``host:port`` once before anything loads, so a port in use is one line naming ``--port``
    (Gradio's own error names an environment variable and comes after the model has loaded)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise DemoError(f"--host {host}: not an address of this machine ({err.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind(address)
        except OSError as err:
            raise DemoError(f"--port {port}: cannot serve on {host}:{port} ({err.strerror}): another program uses "
                            "it; choose another --port") from None


def main(argv=None) -> int:
    parser = build_parser()
    return run(parser, parser.parse_args(argv))


def run(parser, args) -> int:
    """Load what the page runs on (a bad source is one line, exit code 2) and serve it until stopped."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        parser.error("gradio is not installed: pip install 'genloc[demo]' (in a clone: `make demo`, which does it)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        check_port(args.host, args.port)
        backends = load_backends(args.model, args.inpainter, args.backend, device, args.steps)
    except DemoError as err:
        parser.error(str(err))
    out_root = Path(tempfile.mkdtemp(prefix="genloc-demo-"))
    app = build_app(backends, out_root)
    print(f"GenLoc demo on http://{args.host}:{args.port}", flush=True)
    app.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(out_root), *map(str, examples())],
               show_error=True, footer_links=[], quiet=True)
    return 0
