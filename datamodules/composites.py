"""Labelled copy-paste composites from placement shards, for the plausibility classifier and the
placement metrics (docs/design/evaluation.md).

A shard sample gives a background, boxes and the object to paste: the sample's own ``fg.png`` /
``fg.jpg`` + ``fgmask.png`` members (the OPA converter keeps them) or, when the shard holds none, its
data kind's ``foreground`` hook (toy scenes draw a sprite). Every labelled box becomes one composite
(`genloc.composite`); its label is the kind's ``plausible`` oracle where one exists (toy scenes),
else positive = 1, negative = 0. A sample that already is a composite (OPA's composite set,
`datamodules.convert.convert_opa_composites`: image + ``composite_mask.png``) is one item with its
own label. ``random_boxes`` adds that many boxes with uniformly drawn corners
per sample (seeded per sample, labelled by the oracle; only for kinds with one), so a classifier
also sees the far misses a uniform sampler makes.

The index reads each local shard's members in place (offsets in the tar), so the dataset is
map-style: Lightning gives each rank its share with a distributed sampler.
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from genloc.boxes import denormalise
from genloc.composite import composite

from .kinds import DataKind, data_kind
from .shard_format import ShardFormatError
from .shard_reader import is_url, read_split_info

__all__ = ["ShardSample", "index_samples", "foreground_of", "composite_input", "CompositeDataset",
           "CompositeDataModule", "FOREGROUND_MEMBERS"]

FOREGROUND_MEMBERS = (("fg.png", "fg.jpg"), "fgmask.png")  # (image, mask) member names of a sample
COMPOSITE_MASK = "composite_mask.png"  # a sample that is already a composite (OPA's composite set)


@dataclass
class ShardSample:
    """One sample of a local shard: its annotation and where each member's bytes are."""

    key: str
    ann: dict
    members: dict[str, tuple[str, int, int]]  # member extension -> (tar path, byte offset, size)

    def read(self, ext: str) -> bytes:
        path, offset, size = self.members[ext]
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def image(self, ext: str) -> np.ndarray:
        with Image.open(io.BytesIO(self.read(ext))) as img:
            return np.asarray(img.convert("L" if ext in (FOREGROUND_MEMBERS[1], COMPOSITE_MASK) else "RGB"))

    def background(self) -> np.ndarray:
        return self.image("jpg" if "jpg" in self.members else "png")


def index_samples(data_dir, split: str) -> list[ShardSample]:
    """Every sample of a local split folder, in shard order (member offsets, no image decoded)."""
    if is_url(data_dir):
        raise ShardFormatError(f"{data_dir}: composites read shards in place; copy the split to a local folder")
    out: list[ShardSample] = []
    for path in read_split_info(data_dir, split).paths:
        samples: dict[str, ShardSample] = {}
        with tarfile.open(path) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = Path(m.name).name.split(".", 1)
                s = samples.setdefault(key, ShardSample(key, {}, {}))
                if ext == "json":
                    s.ann = json.loads(tar.extractfile(m).read())
                else:
                    s.members[ext] = (path, m.offset_data, m.size)
        out += samples.values()
    return out


def foreground_of(sample: ShardSample, kind: DataKind) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8, bool mask) of the object pasted for ``sample``: its own members, else the kind's hook."""
    images, mask = FOREGROUND_MEMBERS
    own = next((name for name in images if name in sample.members), None)
    if own is not None and mask in sample.members:
        return sample.image(own), sample.image(mask) > 127
    if kind.foreground is not None:
        return kind.foreground(sample.ann.get("meta") or {}, sample.ann["category"])
    raise ShardFormatError(f"sample {sample.key}: no foreground ({'/'.join(images)} + {mask} members) and its data "
                           f"kind {kind.name!r} draws none; convert the data with its foregrounds")


def composite_input(image: np.ndarray, mask: np.ndarray, image_size: int) -> torch.Tensor:
    """A composite as the classifier reads it: RGB in [0, 1] and the mask as a fourth channel, ``[4, S, S]``
    (bilinear resize, as the location model's images)."""
    rgb = Image.fromarray(np.asarray(image, np.uint8)).resize((image_size, image_size), Image.BILINEAR)
    m = Image.fromarray(np.asarray(mask, np.uint8) * 255).resize((image_size, image_size), Image.BILINEAR)
    x = np.concatenate([np.asarray(rgb, np.float32), np.asarray(m, np.float32)[..., None]], axis=2) / 255.0
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()


class CompositeDataset(Dataset):
    """Labelled composites of one split: item -> dict(input ``[4, S, S]``, label, category, key)."""

    def __init__(self, data_dir, split: str, image_size: int, random_boxes: int = 0, seed: int = 0):
        self.samples = index_samples(data_dir, split)
        self.kind = data_kind(read_split_info(data_dir, split).get("source"))
        self.image_size = int(image_size)
        if random_boxes and self.kind.plausible is None:
            raise ShardFormatError(f"{data_dir}/{split}: random_boxes need an oracle to label them; the data kind "
                                   f"{self.kind.name!r} has none (set random_boxes=0)")
        self.items: list[tuple[int, np.ndarray, float]] = []  # (sample index, normalised box, label)
        for i, s in enumerate(self.samples):
            if COMPOSITE_MASK in s.members:  # already a composite (OPA's composite set): its own label
                self.items.append((i, None, 1.0 if s.ann["positives"] else 0.0))
                continue
            w, h = s.ann["width"], s.ann["height"]
            labelled = [(b, 1.0) for b in s.ann["positives"]] + [(b, 0.0) for b in s.ann["negatives"]]
            boxes = np.asarray([b for b, _ in labelled], np.float64).reshape(-1, 4) / [w, h, w, h]
            labels = np.asarray([y for _, y in labelled])
            if random_boxes:
                rng = np.random.default_rng([int(seed), i])
                xs, ys = np.sort(rng.uniform(0, 1, (random_boxes, 2)), 1), np.sort(rng.uniform(0, 1, (random_boxes, 2)), 1)
                boxes = np.concatenate([boxes, np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1)])
            if self.kind.plausible is not None:
                labels = self.kind.plausible(s.ann.get("meta") or {}, s.ann["category"], boxes).astype(np.float64)
            self.items += [(i, b, float(y)) for b, y in zip(boxes, labels)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        i, box, label = self.items[index]
        s = self.samples[i]
        if box is None:
            image, mask = s.background(), s.image(COMPOSITE_MASK) > 127
        else:
            fg, fg_mask = foreground_of(s, self.kind)
            bg = s.background()
            image, mask = composite(bg, fg, fg_mask, denormalise(box, (bg.shape[1], bg.shape[0])))
        return {"input": composite_input(image, mask, self.image_size), "label": torch.tensor(label),
                "category": s.ann["category"], "key": s.key}


class CompositeDataModule(L.LightningDataModule):
    """Train / val composites from one shard folder for `lightning_modules.PlausibilityModule`.

    ``kind`` names the data kind that writes missing data (toy scenes); ``random_boxes`` /
    ``val_random_boxes``: uniform boxes added per training / validation sample (module docstring),
    drawn from ``seed`` (validation: ``seed + 1``)."""

    def __init__(self, data_dir: str, image_size: int = 64, batch_size: int = 64, num_workers: int = 0,
                 train_split: str = "train", val_split: str = "val", random_boxes: int = 1,
                 val_random_boxes: int = 1, seed: int = 0, kind: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = str(data_dir)
        self.datasets: dict[str, CompositeDataset] = {}

    def missing_splits(self) -> list[str]:
        splits = (self.hparams.train_split, self.hparams.val_split)
        return [s for s in splits if not (Path(self.data_dir) / f"{s}.json").is_file()]

    def prepare_data(self) -> None:
        prepare = data_kind(self.hparams.kind).prepare
        if prepare is not None and self.missing_splits():
            prepare(self.data_dir, self.hparams.seed)

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if "train" not in self.datasets:
            self.datasets["train"] = CompositeDataset(self.data_dir, h.train_split, h.image_size, h.random_boxes, h.seed)
            self.datasets["val"] = CompositeDataset(self.data_dir, h.val_split, h.image_size, h.val_random_boxes,
                                                    h.seed + 1)

    @property
    def num_skipped(self) -> dict[str, int]:
        return {}

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.datasets[name], batch_size=self.hparams.batch_size, shuffle=shuffle,
                          num_workers=self.hparams.num_workers, drop_last=shuffle,
                          persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)
