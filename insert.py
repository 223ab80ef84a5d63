"""Insert objects into photos: `genloc insert` (docs/usage.md#the-genloc-command) from the repository,
plus each edit's metrics, which need the train extra: the background SSIM outside the box, and with
--clip-weights the foreground CLIP score.

    python insert.py --model runs/toy_model --image photo.jpg --category cup --inpainter DIR --region left --out out/
    python insert.py --model runs/toy_model --image photos/ --category cup plate --inpainter DIR --out out/

Takes every option of `genloc insert` and writes the same files: one `boxes.jsonl` line per photo,
`NAME_overlay.png` and `NAME_edit_I.png`; each box's record holds its `metrics`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from genloc.arguments import text
from genloc.cli.parsers import add_command_arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="insert.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_command_arguments(p, "insert")
    p.add_argument("--clip-weights", type=text, help="local open_clip weights file: adds the foreground CLIP score")
    p.add_argument("--clip-model", type=text, help="open_clip model name (default ViT-B-32, or the --clip-config stem)")
    p.add_argument("--clip-config", type=text, help="open_clip model config JSON for models open_clip does not ship")
    return p


class EditMetrics:
    """`genloc.cli.placing.run`'s ``measure``: an edit's background SSIM against the image it was drawn
    into, and its foreground CLIP score when --clip-weights is given (loaded at the first edit)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.options = {k: getattr(args, k) for k in ("clip_weights", "clip_model", "clip_config")}
        self.clip = None

    def __call__(self, before, after, box: list, category: str) -> dict:
        import torch

        from metrics.inpainting import ForegroundCLIPScore, background_ssim

        w, h = before.size
        box_norm = torch.tensor([[box[0] / w, box[1] / h, box[2] / w, box[3] / h]])
        found = {"background_ssim": background_ssim(to_tensor(after), to_tensor(before), box_norm).item()}
        if self.args.clip_weights:
            if self.clip is None:
                self.clip = ForegroundCLIPScore(self.args.clip_weights, self.args.clip_model, self.args.clip_config)
            found["clip_score"] = self.clip.scores(to_tensor(after), box_norm, [category]).item()
        return found


def to_tensor(image):
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def main(argv=None) -> int:
    from genloc.cli.placing import run

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.clip_weights and not Path(args.clip_weights).is_file():
        parser.error(f"--clip-weights {args.clip_weights}: no such file (a local open_clip weights file)")
    return run(parser, args, measure=EditMetrics(args))


if __name__ == "__main__":
    sys.exit(main())
