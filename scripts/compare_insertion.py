"""The paper's insertion comparison in one command: GenLoc boxes + each inpainting back-end, and
instruction editors, scored alike by background SSIM and foreground CLIP score (docs/design/evaluation.md#inpainting-metrics).

    python -m scripts.compare_insertion --images photos/ --model runs/opa_dpo/default/checkpoints/last.ckpt \
        --methods genloc+powerpaint=powerpaint:/models/powerpaint-v1 genloc+sd=sd:/models/sd-inpainting \
                  instructpix2pix=instruct-pix2pix:/models/instruct-pix2pix \
        --clip-weights /models/open_clip_vit_b32.bin --out results/insertion

--images: a folder with `pairs.csv` (columns `image,category`, image paths relative to the folder)
or a shard split folder holding `{split}.json` (e.g. `data/opa`, `--split test`).
--methods: `NAME=KIND:FOLDER`; KIND is an inpainting back-end (the object goes into the GenLoc box
sampled for the image: one box per image, shared by all back-ends) or an instruction editor
(prompt "add a {category}"; its inserted region is the cleaned difference map).

Writes to --out: `edits/{method}/{key}.png` + `.json` + `.scores.json` (finished edits and scores
are never redone: rerun the same command to resume or to add methods), `boxes.json`, `settings.json`,
`results.json` and `results.md` (per method: background SSIM and foreground CLIP, mean and 95 %
t-interval, plus every edit's scores) and `grid.png` (rows: images, columns: input and methods; the
scored box drawn in red). Every file is written atomically.

Across ranks (GPUs of one or several machines, or CPU processes): `torchrun --nproc_per_node N -m
scripts.compare_insertion ...` with the same arguments. Image `i` is boxed, edited and scored by rank
`i % N`; rank zero then writes boxes.json, results.json, results.md and grid.png, the same files one
process writes. The edits are per image, so a rerun with any number of ranks resumes.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
import tarfile
import zlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from genloc.arguments import add_model_argument, number, text, whole
from genloc.drawing import draw_boxes
from genloc.files import OutputError, prepare_output_dir, read_jsonl, save_image, write_atomic, write_json
from genloc.inpainters import BACKENDS, CROP_MARGIN, DEFAULT_STEPS, EDITORS, MODES, BackendFolderError, load_backend, load_editor
from metrics.ranks import gather_to_rank_zero, rank_indices

_NAME_RE = re.compile(r"^[A-Za-z0-9_.+\-]+$")


class UsageError(ValueError):
    """Bad command-line input; main turns it into one line and exit status 2."""


@dataclass
class Sample:
    key: str
    category: str
    source: str  # file path, or "tar:member" for shards
    _load: object

    def image(self) -> Image.Image:
        return self._load().convert("RGB")


@dataclass(frozen=True)
class Method:
    name: str
    kind: str
    folder: str

    @property
    def is_editor(self) -> bool:
        return self.kind in EDITORS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=text, required=True, help="folder with pairs.csv (image,category) or a shard split folder")
    p.add_argument("--split", type=text, default="test", help="shard split to read when --images is a shard folder")
    p.add_argument("--methods", nargs="+", required=True, metavar="NAME=KIND:FOLDER",
                   help=f"KIND: a back-end ({', '.join(BACKENDS)}) or an editor ({', '.join(EDITORS)})")
    add_model_argument(p, "GenLoc location model (checkpoint, model folder or Hub id): one box per image for the "
                          "back-ends, sampled by genloc.place")
    p.add_argument("--boxes", type=text, help="instead of --model: a predictions JSONL ({key, boxes: [[x1,y1,x2,y2], ...]}, "
                                   "pixels; the first box of each key is used)")
    p.add_argument("--out", type=text, required=True, help="output folder (rerun the same command to resume)")
    p.add_argument("--limit", type=whole(1), help="use only the first N samples")
    p.add_argument("--seed", type=int, default=0, help="base seed: each image's box and noise seed derive from it and its key")
    p.add_argument("--steps", type=whole(1), default=DEFAULT_STEPS, help="denoising steps (all methods)")
    p.add_argument("--mode", choices=MODES, default="auto", help="back-ends: crop / whole-image inpainting")
    p.add_argument("--margin", type=number(0), default=CROP_MARGIN, help="back-ends, crop mode: context per side / box long side")
    p.add_argument("--resolution", type=whole(8), help="canvas long side (default: each model's native resolution)")
    p.add_argument("--clip-weights", type=text, help="local open_clip weights file for the foreground CLIP score")
    p.add_argument("--clip-model", type=text, help="open_clip model name (default ViT-B-32, or the --clip-config stem)")
    p.add_argument("--clip-config", type=text, help="open_clip model config JSON for models open_clip does not ship")
    p.add_argument("--grid-rows", type=whole(1), default=6, help="images (rows) in grid.png")
    p.add_argument("--grid-cell", type=whole(8), default=192, help="cell side of grid.png in pixels")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


# --- inputs -------------------------------------------------------------------------------------
def parse_methods(specs: list[str]) -> list[Method]:
    methods = []
    for spec in specs:
        name, sep, rest = spec.partition("=")
        kind, sep2, folder = rest.partition(":")
        if not (sep and sep2 and name and folder):
            raise UsageError(f"--methods {spec!r}: expected NAME=KIND:FOLDER, e.g. genloc+sd=sd:/models/sd-inpainting")
        if not _NAME_RE.match(name):
            raise UsageError(f"--methods {spec!r}: the name may hold only letters, digits and _ . + - (it names a folder)")
        if kind not in BACKENDS + EDITORS:
            raise UsageError(f"--methods {spec!r}: unknown kind {kind!r}; back-ends: {', '.join(BACKENDS)}; "
                             f"editors: {', '.join(EDITORS)}")
        methods.append(Method(name, kind, folder))
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise UsageError(f"--methods: duplicate method names in {names}")
    return methods


def read_samples(images: Path, split: str) -> list[Sample]:
    """(key, category, image) from `pairs.csv` or from the tars of a shard split."""
    if (images / "pairs.csv").is_file():
        return _pairs_samples(images)
    if (images / f"{split}.json").is_file():
        from datamodules.shard_format import ShardFormatError

        try:
            return _shard_samples(images, split)
        except ShardFormatError as err:
            raise UsageError(str(err)) from None
    raise UsageError(f"--images {images}: found neither {images / 'pairs.csv'} (columns image,category) nor a shard "
                     f"split {images / (split + '.json')}; make one of them or fix the path/--split")


def _pairs_samples(folder: Path) -> list[Sample]:
    path = folder / "pairs.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"image", "category"} <= set(rows[0]):
        raise UsageError(f"{path}: needs a header with columns image,category and at least one row")
    samples, seen = [], set()
    for i, row in enumerate(rows, start=2):
        image = folder / row["image"]
        if not image.is_file():
            raise UsageError(f"{path} line {i}: image {image} not found")
        if not row["category"].strip():
            raise UsageError(f"{path} line {i}: empty category for {row['image']}")
        key = re.sub(r"[^A-Za-z0-9_\-]", "_", Path(row["image"]).with_suffix("").as_posix())
        if key in seen:
            raise UsageError(f"{path} line {i}: {row['image']} gives the key {key!r} a second time; rename the file")
        seen.add(key)
        samples.append(Sample(key, row["category"].strip(), str(image), lambda p=image: Image.open(p)))
    return samples


def _shard_samples(folder: Path, split: str) -> list[Sample]:
    from datamodules.shard_reader import read_split_info

    samples, skipped = [], 0
    for tar_path in read_split_info(folder, split).paths:
        tar = tarfile.open(tar_path, "r")
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        for name, member in members.items():
            if not name.endswith(".json"):
                continue
            key = os.path.basename(name).split(".", 1)[0]
            image = next((members[n] for n in (f"{name[:-5]}.jpg", f"{name[:-5]}.png") if n in members), None)
            ann = json.loads(tar.extractfile(member).read())
            if image is None or not str(ann.get("category", "")).strip():
                skipped += 1  # no picture or no class: nothing to insert
                continue
            samples.append(Sample(key, str(ann["category"]), f"{tar_path}:{image.name}",
                                  lambda t=tar, m=image: Image.open(t.extractfile(m))))
    if skipped:
        print(f"{folder} {split}: skipped {skipped} sample(s) without an image or a category")
    return sorted(samples, key=lambda s: s.key)


def sample_seed(seed: int, key: str) -> int:
    """Per-image seed independent of order and of which other images are processed."""
    return zlib.crc32(f"{seed}:{key}".encode()) & 0x7FFFFFFF


def genloc_boxes(args, samples: list[Sample], share: list[Sample] | None = None) -> dict[str, list[float]]:
    """One pixel box per image of `share` (a rank's part; default all `samples`): sampled by the location
    model, or the first box of a predictions file (which must hold a box for every one of `samples`)."""
    share = samples if share is None else share
    if args.boxes:
        found = {}
        for n, rec in _jsonl_records(args.boxes):
            try:
                box = [float(v) for v in rec["boxes"][0]] if rec.get("boxes") else None
                key = str(rec["key"])
            except (ValueError, KeyError, TypeError, IndexError):
                raise UsageError(f"--boxes {args.boxes} line {n}: not a {{\"key\", \"boxes\": [[x1,y1,x2,y2], ...]}} "
                                 "JSON record (evaluate.py's predictions format)") from None
            if box is not None:
                if len(box) != 4 or not box[0] < box[2] or not box[1] < box[3]:
                    raise UsageError(f"--boxes {args.boxes} line {n}: {box} is not a pixel box x1,y1,x2,y2 with x1<x2, y1<y2")
                found[key] = box
        missing = [s.key for s in samples if s.key not in found]
        if missing:
            raise UsageError(f"--boxes {args.boxes}: no box for {len(missing)} sample(s), e.g. {missing[0]!r}")
        return {s.key: found[s.key] for s in share}
    from genloc.checkpoint import ModelSourceError
    from genloc.hub import load_model
    from genloc.placement import place

    try:
        model = load_model(args.model)
    except ModelSourceError as err:
        raise UsageError(f"--model {args.model}: {err}") from None
    boxes = {}
    for s in tqdm(share, desc="GenLoc boxes", disable=None):
        placed = place(model, s.image(), s.category, n=1, seed=sample_seed(args.seed, s.key))
        boxes[s.key] = [float(v) for v in placed.boxes[0]]
    return boxes


def _jsonl_records(path: str):
    """`genloc.files.read_jsonl`, with a missing file or a line that is not JSON as a UsageError."""
    try:
        yield from read_jsonl(path)
    except (OSError, ValueError) as err:
        raise UsageError(f"--boxes {err}" if isinstance(err, ValueError) else f"--boxes {path}: {err.strerror}") from None


# --- ranks --------------------------------------------------------------------------------------
# How long a rank waits at a barrier for the slowest one: a rerun may find one rank's share done and
# another's untouched, so it is the time of a whole share, not of a few edits.
RANK_TIMEOUT = timedelta(days=2)


@dataclass(frozen=True)
class Ranks:
    """This process's place among those torchrun started (`WORLD_SIZE`, `RANK`, ...; one process
    without). Image `i` is edited and scored by rank `i % world` (`metrics.ranks`); every edit and its
    scores are files of their own, so a rerun, with any number of ranks, redoes only what is missing.
    Rank zero merges them into the files one process writes. The ranks talk over gloo (barriers and
    the boxes: small objects) whatever the device the models run on."""

    rank: int = 0
    world: int = 1

    @classmethod
    def start(cls, args) -> Ranks:
        """Join torchrun's process group; on GPUs each rank takes the device of its `LOCAL_RANK`."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=RANK_TIMEOUT)
        if args.device == "cuda":
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        return cls(dist.get_rank(), world)

    def share(self, samples: list[Sample]) -> list[Sample]:
        return [samples[i] for i in rank_indices(len(samples), self.rank, self.world)]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def write_boxes(self, path: Path, samples: list[Sample], boxes: dict) -> None:
        """Rank zero writes every rank's boxes, in the samples' order (collective)."""
        parts = gather_to_rank_zero(boxes)
        if parts is not None:
            merged = {k: v for part in parts for k, v in part.items()}
            write_json(path, {s.key: merged[s.key] for s in samples})

    def merge(self) -> bool:
        """Wait until every rank's edits and scores are written; True on the rank that merges them."""
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()
        return self.rank == 0


# --- running ------------------------------------------------------------------------------------
def method_settings(args, method: Method) -> dict:
    common = {"kind": method.kind, "folder": method.folder, "steps": args.steps, "resolution": args.resolution,
              "seed": args.seed}
    if method.is_editor:
        return common
    return {**common, "mode": args.mode, "margin": args.margin, "boxes": args.boxes or args.model}


def check_settings(out: Path, settings: dict, write: bool = True) -> None:
    """Resuming with other settings would mix edits made differently: refuse, naming the method. Only
    a method that has made edits is bound to its settings: a run that failed before editing (a wrong
    --model, say) leaves nothing that blocks the corrected command. Every rank checks; rank zero
    writes (after its own check passed, so a rank reading either version reaches the same verdict)."""
    path = out / "settings.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    for name, now in settings.items():
        made_edits = any((out / "edits" / name).glob("*.json"))
        if name in old and old[name] != now and made_edits:
            changed = sorted(k for k in now if old[name].get(k) != now[k])
            raise UsageError(f"{out}: method {name!r} was run with other settings ({', '.join(changed)}); "
                             "use another --out or another method name")
    if write:
        write_json(path, {**old, **settings})


def run_method(args, method: Method, samples: list[Sample], boxes: dict, out: Path) -> None:
    folder = out / "edits" / method.name
    folder.mkdir(parents=True, exist_ok=True)
    todo = [s for s in samples if not (folder / f"{s.key}.json").is_file()]
    if not todo:
        print(f"{method.name}: all {len(samples)} edits already done")
        return
    options = dict(device=args.device, steps=args.steps, resolution=args.resolution)
    try:
        model = (load_editor if method.is_editor else load_backend)(method.kind, method.folder, **options)
    except (BackendFolderError, ValueError) as err:
        raise UsageError(f"--methods {method.name}: {err}") from None
    for s in tqdm(todo, desc=method.name, disable=None):
        image, seed = s.image(), sample_seed(args.seed, s.key)
        if method.is_editor:
            result = model.edit(image, s.category, seed=seed)
            record = result.record()
            record["box"] = record["region"]
        else:
            result = model.insert(image, s.category, box=boxes[s.key], seed=seed, mode=args.mode, margin=args.margin)
            record = result.record()
        record.update(key=s.key, category=s.category, source=s.source, method=method.name, kind=method.kind)
        (folder / f"{s.key}.scores.json").unlink(missing_ok=True)  # scores of an unfinished earlier attempt
        save_image(folder / f"{s.key}.png", result.image)
        write_json(folder / f"{s.key}.json", record)  # last: its presence marks the edit as done
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- scoring ------------------------------------------------------------------------------------
def mean_ci95(values: list[float]) -> dict:
    """Mean and Student-t 95 % interval of the mean (None bounds for fewer than 2 values)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "ci95": [None, None], "n": 0}
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "ci95": [None, None], "n": 1}
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": int(len(v))}


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def clip_identity(args) -> dict | None:
    """What a stored CLIP score was computed with; a score of other weights is computed again."""
    if not args.clip_weights:
        return None
    return {"weights": str(args.clip_weights), "model": args.clip_model, "config": args.clip_config}


def score(args, methods: list[Method], samples: list[Sample], out: Path) -> None:
    """Background SSIM outside the scored box and CLIP of the box crop, for the edits of `samples`. The
    scored box is the GenLoc box for back-ends and the changed region for editors; an editor edit with
    no changed region is scored on the whole image (SSIM of everything but one corner pixel, CLIP of the
    whole picture). Scores are kept next to each edit (`{key}.scores.json`) and only missing ones are
    computed."""
    from metrics.inpainting import ForegroundCLIPScore, background_ssim

    clip, clip_id = None, clip_identity(args)
    if clip_id is not None:
        clip = ForegroundCLIPScore(args.clip_weights, args.clip_model, args.clip_config).to(args.device)
    for method in methods:
        folder = out / "edits" / method.name
        for s in tqdm(samples, desc=f"scoring {method.name}", disable=None):
            record = json.loads((folder / f"{s.key}.json").read_text())
            cache = folder / f"{s.key}.scores.json"
            scores = json.loads(cache.read_text()) if cache.is_file() else {}
            if scores.get("clip") != clip_id:
                scores.pop("clip_score", None)
            if "background_ssim" in scores and (clip is None or "clip_score" in scores):
                continue
            original, edit = to_tensor(s.image()), to_tensor(Image.open(folder / f"{s.key}.png"))
            h, w = original.shape[-2:]
            if record["box"] is None:
                ssim_box, clip_box = torch.tensor([[0.0, 0.0, 1 / w, 1 / h]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]])
            else:
                ssim_box = clip_box = torch.tensor([record["box"]]) / torch.tensor([w, h, w, h])
            if "background_ssim" not in scores:
                scores["background_ssim"] = background_ssim(edit, original, ssim_box).item()
            if clip is not None and "clip_score" not in scores:
                scores["clip_score"] = clip.scores(edit.to(args.device), clip_box, [s.category]).item()
            scores["clip"] = clip_id
            write_json(cache, scores)


def summarise(args, methods: list[Method], samples: list[Sample], out: Path) -> dict:
    """Every edit's stored scores, per method the mean and 95 % interval, and the editors' edits with no
    changed region counted."""
    clip_id = clip_identity(args)
    if clip_id is None:
        print("no --clip-weights: foreground CLIP score not computed (pass local open_clip weights to add it)")
    edits, summary = [], {}
    for method in methods:
        ssim, clips, no_region = [], [], 0
        folder = out / "edits" / method.name
        for s in samples:
            record = json.loads((folder / f"{s.key}.json").read_text())
            scores = json.loads((folder / f"{s.key}.scores.json").read_text())
            no_region += record["box"] is None
            row = {"method": method.name, "key": s.key, "category": s.category, "box": record["box"],
                   "background_ssim": scores["background_ssim"]}
            ssim.append(scores["background_ssim"])
            if clip_id is not None:
                row["clip_score"] = scores["clip_score"]
                clips.append(scores["clip_score"])
            edits.append(row)
        summary[method.name] = {"kind": method.kind, "folder": method.folder, "background_ssim": mean_ci95(ssim),
                                "clip_score": mean_ci95(clips) if clip_id is not None else None,
                                "no_region": no_region if method.is_editor else None}
    return {"methods": summary, "edits": edits, "num_images": len(samples), "clip": clip_id}


def markdown(results: dict) -> str:
    def cell(stat):
        if stat is None or stat["mean"] is None:
            return "-"
        lo, hi = stat["ci95"]
        return f"{stat['mean']:.3f}" + ("" if lo is None else f" [{lo:.3f}, {hi:.3f}]")

    lines = [f"Insertion on {results['num_images']} images: mean [95 % t-interval].", "",
             "| method | kind | background SSIM | foreground CLIP | editor: no changed region |", "|---|---|---|---|---|"]
    for name, m in results["methods"].items():
        lines.append(f"| {name} | {m['kind']} | {cell(m['background_ssim'])} | {cell(m['clip_score'])} | "
                     f"{'-' if m['no_region'] is None else m['no_region']} |")
    return "\n".join(lines) + "\n"


def grid(methods: list[Method], samples: list[Sample], out: Path, rows: int, cell: int) -> Image.Image:
    """Fig. 7 style: one row per image, columns input + methods, the scored box outlined in red."""
    samples = samples[:rows]
    header = 22
    font = ImageFont.load_default(size=13)
    sheet = Image.new("RGB", ((len(methods) + 1) * cell, header + len(samples) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(["input"] + [m.name for m in methods]):
        draw.text((c * cell + 4, 4), title[: cell // 7], fill="black", font=font)
    for r, s in enumerate(samples):
        original = s.image()
        pictures = [(original, None)]
        for m in methods:
            record = json.loads((out / "edits" / m.name / f"{s.key}.json").read_text())
            pictures.append((Image.open(out / "edits" / m.name / f"{s.key}.png").convert("RGB"), record["box"]))
        for c, (picture, box) in enumerate(pictures):
            scale = cell / max(picture.size)
            small = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                   Image.BICUBIC)
            if box is not None:
                small = draw_boxes(small, [[v * scale for v in box]], colours=[(255, 0, 0)], width=2)
            sheet.paste(small, (c * cell + (cell - small.width) // 2, header + r * cell + (cell - small.height) // 2))
        draw.text((4, header + r * cell + 4), s.category, fill=(255, 255, 0), font=font, stroke_width=2,
                  stroke_fill="black")
    return sheet


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    ranks = Ranks.start(args)
    try:
        methods = parse_methods(args.methods)
        samples = read_samples(Path(args.images), args.split)[: args.limit]
        if not samples:
            raise UsageError(f"--images {args.images}: no (image, category) samples")
        needs_boxes = any(not m.is_editor for m in methods)
        if needs_boxes and not (args.model or args.boxes):
            raise UsageError("the back-end methods need GenLoc boxes: pass --model MODEL (a train.py checkpoint, "
                             "model folder or Hub id) or --boxes PREDICTIONS.jsonl")
        out = prepare_output_dir(args.out, "--out")  # before any model loads
        check_settings(out, {m.name: method_settings(args, m) for m in methods}, write=ranks.rank == 0)
        ranks.barrier()  # no rank edits before rank zero has recorded the settings
        share = ranks.share(samples)
        if ranks.world > 1:
            print(f"rank {ranks.rank} of {ranks.world}: {len(share)} of {len(samples)} images")
        boxes = genloc_boxes(args, samples, share) if needs_boxes else {}
        if needs_boxes:
            ranks.write_boxes(out / "boxes.json", samples, boxes)
        for method in methods:
            run_method(args, method, share, boxes, out)
        score(args, methods, share, out)
        if not ranks.merge():
            return 0
        results = summarise(args, methods, samples, out)
        results["settings"] = json.loads((out / "settings.json").read_text())
        write_json(out / "results.json", results)
        write_atomic(out / "results.md", markdown(results))
        save_image(out / "grid.png", grid(methods, samples, out, args.grid_rows, args.grid_cell))
    except UsageError as err:
        parser.error(str(err))
    except OutputError as err:  # --out unusable, or the disk filled during a write (finished files are kept)
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(markdown(results))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
