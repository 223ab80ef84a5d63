"""What does a trained model's image prefix know about a toy scene? A ridge-regression probe.

Fits a linear map from the projected image tokens (flattened) to the scene geometry of toy scenes
with exactly one table (horizon, table top, table x1/x2/centre) on 80% of the scenes and prints the
mean absolute error on the rest next to predicting the mean. Used in the README to show why lamps
lag: the horizon is read well, a table's position barely (figures in the README).

    python -m datamodules.toy.probe runs/toy_finetune/default/checkpoints/last.ckpt
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from genloc.arguments import number, text, whole

from .scenes import make_sample

TARGETS = ("horizon", "table_top", "table_x1", "table_x2", "table_cx")


def scenes_with_one_table(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N,3,S,S] in [0,1] and geometry [N, len(TARGETS)] of fresh toy scenes with one table."""
    images, geometry = [], []
    for i in range(count):
        _, image, ann = make_sample(seed, i, "toy-pipe", split_id=7)  # split id unused by the datasets
        scene = ann["meta"]["scene"]
        if len(scene["tables"]) == 1:
            t = scene["tables"][0]
            images.append(image)
            geometry.append([scene["horizon"], t["top"], t["x1"], t["x2"], (t["x1"] + t["x2"]) / 2])
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255, torch.tensor(geometry)


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(prog="python -m datamodules.toy.probe", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=text, help="location model: checkpoint, model folder or Hub id")
    parser.add_argument("--scenes", type=whole(1), default=3000, help="scenes generated (about half have one table)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--ridge", type=number(0, above=True), default=1.0)
    args = parser.parse_args(argv)

    from genloc.checkpoint import ModelSourceError
    from genloc.hub import load_model

    try:
        model = load_model(args.checkpoint)
    except ModelSourceError as err:
        parser.error(str(err))
    images, geometry = scenes_with_one_table(args.scenes, args.seed)
    with torch.no_grad():
        feats = torch.cat([model.image_proj(model.encode_images(images[i:i + 256])).flatten(1)
                           for i in range(0, len(images), 256)]).double()
    x = torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.float64)], dim=1)
    y = geometry.double()
    split = int(0.8 * len(x))
    weights = torch.linalg.solve(x[:split].T @ x[:split] + args.ridge * torch.eye(x.shape[1], dtype=torch.float64),
                                 x[:split].T @ y[:split])
    probe = (x[split:] @ weights - y[split:]).abs().mean(0)
    mean = (y[split:] - y[:split].mean(0)).abs().mean(0)
    print(f"{len(x)} scenes with one table ({split} fit, {len(x) - split} held out); mean absolute error:")
    result = {}
    for name, p, m in zip(TARGETS, probe.tolist(), mean.tolist()):
        print(f"  {name:10s} probe {p:.4f}   predict-the-mean {m:.4f}")
        result[name] = (p, m)
    return result


if __name__ == "__main__":
    main()
