"""The README's comparison example: 3 real photos from tests/fixtures, a tiny RANDOM location model and
tiny RANDOM pipelines for every back-end and the instruction editor (nothing downloaded), run through
scripts/compare_insertion.py; copies the grid and the table to docs/compare_example/.

    PYTHONPATH=. python -m scripts.tiny_compare_example

It shows the mechanics (boxes, crop-mode insertion, editor regions, table, grid), not quality: with
random weights every method paints noise.
"""
from __future__ import annotations

import csv
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image

from genloc import LocationModel, LocationModelConfig
from scripts import compare_insertion
from genloc.testing import (save_flux_fill, save_instruct_pix2pix, save_powerpaint, save_sd, save_tiny_gligen,
                            save_tiny_open_clip)

FIXTURES = Path("tests/fixtures")
PHOTOS = [
    (FIXTURES / "libcom/controllable_composition/background/000000049931.png", "dog"),
    (FIXTURES / "libcom/controllable_composition/background/000000460450.png", "dog"),
    (FIXTURES / "opa_sample/reconstructed/580029_background_reconstructed.png", "airplane"),
]


def main(docs: Path = Path("docs/compare_example")) -> None:
    work = Path(tempfile.mkdtemp(prefix="genloc_compare_"))
    photos = work / "photos"
    photos.mkdir()
    with open(photos / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "category"])
        for src, category in PHOTOS:
            shutil.copy(src, photos / src.name)
            writer.writerow([src.name, category])
    torch.manual_seed(0)
    config = LocationModelConfig.preset("tiny")
    torch.save({"hyper_parameters": {"model_config": config.to_dict()},
                "state_dict": {"model." + k: v for k, v in LocationModel(config).state_dict().items()}}, work / "tiny.ckpt")
    clip_config, clip_weights = save_tiny_open_clip(work / "clip")
    methods = [f"genloc+sd=sd:{save_sd(work / 'sd')}", f"genloc+flux-fill=flux-fill:{save_flux_fill(work / 'flux')}",
               f"genloc+powerpaint=powerpaint:{save_powerpaint(work / 'pp')}",
               f"genloc+gligen=gligen:{save_tiny_gligen(work / 'gligen')}",
               f"instructpix2pix=instruct-pix2pix:{save_instruct_pix2pix(work / 'ip2p')}"]
    out = work / "out"
    compare_insertion.main(["--images", str(photos), "--model", str(work / "tiny.ckpt"), "--out", str(out),
                            "--methods", *methods, "--steps", "4", "--resolution", "64", "--grid-cell", "160",
                            "--clip-weights", str(clip_weights), "--clip-config", str(clip_config)])
    docs.mkdir(parents=True, exist_ok=True)
    Image.open(out / "grid.png").save(docs / "grid.png", optimize=True)
    shutil.copy(out / "results.md", docs / "results.md")
    shutil.rmtree(work)
    print(f"wrote {docs / 'grid.png'} and {docs / 'results.md'}")


if __name__ == "__main__":
    main()
