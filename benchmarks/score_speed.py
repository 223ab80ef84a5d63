"""Scoring given boxes (`LocationModel.score_tokens`, behind `score`) against sampling as many
(`LocationModel.sample`), side by side on one image: both encode the image and the prompt, run the
prefix through GPT-2 once and the boxes' steps through the cascade decoder; scoring gives the
tokens instead of drawing them. Random weights (``pretrained=False``), calls alternating (medians).

    python -m benchmarks.score_speed            # paper shapes, 1 image x 1000 boxes, CPU
    python -m benchmarks.score_speed --tiny     # tiny preset, 100 boxes: a few seconds
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.sampling import alternating_medians  # noqa: E402
from genloc import LocationModel, LocationModelConfig  # noqa: E402


def bench(preset: str, boxes: int, repeats: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    cfg = LocationModelConfig.preset(preset, pretrained=False)
    model = LocationModel(cfg).to(device).eval()
    image = torch.rand(1, 3, cfg.image_size, cfg.image_size, device=device)
    generator = torch.Generator(device=device)
    drawn = model.sample(image, ["dog"], n=boxes, generator=generator.manual_seed(0))
    tokens, owner = drawn.tokens[0], torch.zeros(boxes, dtype=torch.long)

    def sample():
        model.sample(image, ["dog"], n=boxes, generator=generator.manual_seed(0))

    def score():
        model.score_tokens(image, ["dog"], tokens, owner)

    t = alternating_medians({"sample": sample, "score": score}, device, repeats)
    gap = (model.score_tokens(image, ["dog"], tokens, owner) - drawn.log_probs[0]).abs().max().item()
    return dict(preset=preset, boxes=boxes, device=str(device), sample_s=t["sample"], score_s=t["score"],
                sample_over_score=t["sample"] / t["score"], max_log_prob_gap=gap)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny preset, 100 boxes, 1 repeat (a smoke run)")
    parser.add_argument("--boxes", type=int, help="boxes on the image (default 1000; --tiny: 100)")
    parser.add_argument("--repeats", type=int, help="timed calls of each (default 3; --tiny: 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="also write the result as JSON here")
    args = parser.parse_args()
    preset = "tiny" if args.tiny else "paper"
    boxes = args.boxes or (100 if args.tiny else 1000)
    repeats = args.repeats or (1 if args.tiny else 3)
    r = bench(preset, boxes, repeats, torch.device(args.device))
    print(f"{preset} shapes, 1 image x {boxes} boxes on {r['device']}: sample {r['sample_s']:.3f} s, "
          f"score {r['score_s']:.3f} s, sample / score = {r['sample_over_score']:.2f}x "
          f"(max |score - sampler log-prob| {r['max_log_prob_gap']:.2e})")
    if args.out:
        from genloc.files import write_json

        write_json(args.out, r)


if __name__ == "__main__":
    main()
