"""The README's insertion example: a real photo, a tiny RANDOM location model and a tiny RANDOM
Stable Diffusion inpainter (nothing downloaded), run through insert.py (`genloc insert` plus the edit metrics); writes docs/insert_example/.

It demonstrates the mechanics (region-restricted sampling, mask, paste-back) — not quality.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from PIL import Image

import insert
from genloc.checkpoint import save_model_checkpoint
from genloc import LocationModel, LocationModelConfig
from genloc.testing import save_tiny_sd_inpainter

ROOT = Path(__file__).resolve().parents[1]
PHOTO = Path("tests/fixtures/libcom/controllable_composition/background/000000049931.png")


def main(out: Path = Path("docs/insert_example")) -> None:
    """Runs from the repository root with repository-relative paths, so the JSON records it writes
    name no machine's folders; the two tiny models live in ``out/scratch`` only while it runs."""
    os.chdir(ROOT)
    if out.exists():  # a fresh example: boxes.jsonl would otherwise keep the photo as done
        shutil.rmtree(out)
    out.mkdir(parents=True)
    work = out / "scratch"
    save_tiny_sd_inpainter(work / "tiny_sd_inpaint")
    torch.manual_seed(0)
    save_model_checkpoint(LocationModel(LocationModelConfig.preset("tiny")), work / "tiny_random.ckpt")
    try:
        insert.main(["--image", str(PHOTO), "--category", "cat", "--model", str(work / "tiny_random.ckpt"),
                     "--inpainter", str(work / "tiny_sd_inpaint"), "--n", "2", "--region", "left", "--steps", "4",
                     "--resolution", "256", "--feather", "4", "--seed", "0", "--out", str(out)])
    finally:
        shutil.rmtree(work)
    panels = [Image.open(PHOTO).convert("RGB"), Image.open(out / f"{PHOTO.stem}_overlay.png").convert("RGB"),
              Image.open(out / f"{PHOTO.stem}_edit_0.png").convert("RGB")]
    sheet = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, 0))
        x += panel.width
    sheet.resize((sheet.width // 2, sheet.height // 2)).save(out / "example.png")
    print(f"wrote {out / 'example.png'} (input | sampled boxes, region=left | edit 0)")


if __name__ == "__main__":
    main()
