"""Several objects in one toy scene: `place_many` against placing each object independently.

    python -m scripts.toy_place_many --model runs/toy_model --data data/toy/toy-opa --split val

For every scene of the split, car + person + bird (default) are placed on the rendered scene
(a) by `place_many` (one box each, pairwise IoU <= --max-iou) and (b) independently (`place`, one
draw per object, same seed). Printed per method: the rate of scenes whose boxes are all plausible by
the toy oracle, pairwise non-overlapping, and both; for (a) also how often no valid set was found.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time

import torch

from genloc.arguments import number, text, whole


def samples_with_images(data_dir, split: str):
    """(annotation, RGB image) of every sample of a split, in shard order."""
    from datamodules.shard_format import decode_image
    from datamodules.shard_reader import shard_paths

    for path in shard_paths(data_dir, split):
        with tarfile.open(path, "r") as tar:
            parts: dict[str, dict[str, bytes]] = {}
            for member in tar:
                if member.isfile():
                    key, ext = os.path.basename(member.name).split(".", 1)
                    parts.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key, files in parts.items():
            image = next((files[e] for e in ("png", "jpg", "jpeg") if e in files), None)
            if "json" in files and image is not None:
                yield {"key": key, **json.loads(files["json"])}, decode_image(image).image


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=text, required=True, help="model folder, Hub id or Lightning checkpoint")
    p.add_argument("--data", type=text, default="data/toy/toy-opa", help="toy shard folder (scenes in meta.scene)")
    p.add_argument("--split", type=text, default="val")
    p.add_argument("--categories", type=text, nargs="+", default=["car", "person", "bird"])
    p.add_argument("--max-iou", type=number(0, 1), default=0.0)
    p.add_argument("--candidates", type=whole(1), default=100, help="place_many draws per object and round")
    p.add_argument("--limit", type=whole(1), help="only the first N scenes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from datamodules.kinds import data_kind
    from datamodules.shard_format import ShardFormatError
    from datamodules.shard_reader import read_split_info
    from genloc.hub import load_model
    from genloc.placement import NoValidSetError, place, place_many, token_iou
    from genloc.checkpoint import ModelSourceError

    try:
        model = load_model(args.model)
        plausible_fn = data_kind(read_split_info(args.data, args.split).get("source")).plausible
        samples = list(samples_with_images(args.data, args.split))
    except (ModelSourceError, ShardFormatError, FileNotFoundError) as err:
        print(f"toy_place_many: error: {err}", file=sys.stderr)
        return 2
    samples = samples[:args.limit] if args.limit else samples
    if not samples or plausible_fn is None:
        print(f"toy_place_many: error: no samples with a plausibility oracle in {args.data} ({args.split}); "
              "it needs toy shards (python -m datamodules.toy)", file=sys.stderr)
        return 2
    k = len(args.categories)
    off_diagonal = ~torch.eye(k, dtype=torch.bool)
    counts = {m: {"plausible": 0, "apart": 0, "both": 0} for m in ("place_many", "independent")}
    no_set = 0
    start = time.perf_counter()
    for i, (s, image) in enumerate(samples):
        seed = args.seed + i
        results = {"independent": place(model, [image] * k, args.categories, n=1, seed=seed)}
        try:
            group = place_many(model, image, args.categories, max_iou=args.max_iou, candidates=args.candidates,
                               seed=seed)
            results["place_many"] = group
        except NoValidSetError:
            no_set += 1
        for method, result in results.items():
            boxes = group.boxes if method == "place_many" else torch.cat([r.boxes for r in result])
            norm = boxes / torch.tensor([image.width, image.height] * 2)
            plausible = all(bool(plausible_fn(s["meta"], c, b[None].double().numpy())[0])
                            for c, b in zip(args.categories, norm))
            tokens = (norm * model.cfg.num_bins - 0.5).round().long()
            apart = bool((token_iou(tokens, tokens)[off_diagonal] <= args.max_iou + 1e-12).all())
            counts[method]["plausible"] += plausible
            counts[method]["apart"] += apart
            counts[method]["both"] += plausible and apart
    n = len(samples)
    print(f"{n} scenes of {args.data} ({args.split}), objects {' + '.join(args.categories)}, max IoU {args.max_iou}, "
          f"{time.perf_counter() - start:.1f} s")
    print("| method | all plausible | pairwise apart | both | no valid set |")
    print("|---|---|---|---|---|")
    for method, c in counts.items():
        failed = f"{no_set / n:.3f}" if method == "place_many" else "-"
        print(f"| {method} | {c['plausible'] / n:.3f} | {c['apart'] / n:.3f} | {c['both'] / n:.3f} | {failed} |")
    print("(place_many rates count a scene without a valid set as a miss)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
