"""The LightningDataModule over the shared shard pipeline: one class for every kind of shard data.

Rank and world size come from ``self.trainer`` in ``setup`` (0/1 without a trainer). The
epoch reaches the workers through `EpochLoader`: it reads ``trainer.current_epoch`` (or the value
given to `set_epoch` when no trainer is attached) at the start of every epoch's iteration.
Checkpoints hold the position within the epoch (`state_dict`), so a resumed fit continues with the
next batch instead of replaying the epoch from its start.
"""
from __future__ import annotations

from functools import partial
from typing import Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from .kinds import data_kind
from .own_data import KEEP_OBJECTS
from .pipeline import EpochLoader, ShardStream
from .shard_format import ShardFormatError
from .shard_reader import is_url, member, read_split_info, split_file_exists

__all__ = ["ShardDataModule"]


class ShardDataModule(L.LightningDataModule):
    """Train/val/test loaders over ``{split}-*.tar`` + ``{split}.json`` in ``data_dir``: a local folder
    or a URL fsspec can read (``https://``, ``s3://``, ``gs://``, ``file://``, ``memory://``, ...) or a
    ``pipe:`` command with ``{}`` for the file name (see `datamodules.shard_reader.member`).

    A split set to None is skipped (e.g. ``val_split=None`` for data without a validation split).
    ``pairs=True`` keeps samples with >=1 positive and >=1 negative and adds ``chosen`` /
    ``rejected`` (one pair per sample, re-drawn each epoch from seed+epoch+key) to every batch.
    ``resampled=True`` draws training shards with replacement (no per-epoch coverage guarantee).
    ``kind`` names the data kind whose hooks write missing data in `prepare_data` (the toy scenes
    are generated on first use; see datamodules/kinds.py); None: shards must exist.
    ``verify`` is what a shard whose sha256 differs from the one ``{split}.json`` records does while
    training or validating: ``drop`` its samples (counted as skipped, one warning), ``strict`` stop
    the run, ``unchecked`` no hashing (`datamodules.pipeline`).
    ``padded_boxes=True`` collates each batch's positives and negatives in the loader workers into
    `PaddedBoxes` (one padded tensor each: a few pinned host-to-device copies instead of one per sample).
    """

    def __init__(self, data_dir: str, image_size: int = 64, batch_size: int = 64, num_workers: int = 0,
                 seed: int = 0, shuffle_buffer: int = 1000, flip_prob: float = 0.5, train_split: str | None = "train",
                 val_split: str | None = "val", test_split: str | None = "test", pairs: bool = False,
                 resampled: bool = False, eval_batch_size: int | None = None, persistent_workers: bool = False,
                 pin_memory: bool = False, kind: str | None = None, prefetch_factor: int | None = None,
                 verify: Literal["drop", "strict", "unchecked"] = "drop", padded_boxes: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = str(data_dir)
        self.rank, self.world_size = 0, 1
        self._epoch = 0
        self._streams: dict[str, ShardStream] = {}
        self._resume: dict | None = None

    def missing_splits(self) -> list[str]:
        """`{split}.json` files of the configured splits that do not exist (local folder or URL; a URL
        that cannot be reached raises ShardFormatError instead of reading as missing)."""
        hp = self.hparams
        splits = [s for s in (hp.train_split, hp.val_split) if s is not None]
        return [member(self.data_dir, f"{s}.json") for s in splits if not split_file_exists(self.data_dir, s)]

    def prepare_data(self) -> None:
        """Let the data kind write missing data (toy scenes) into a local folder; real shards come from
        scripts/convert_*.py (and are uploaded by the user when data_dir is a URL)."""
        prepare = data_kind(self.hparams.kind).prepare
        if prepare is not None and not is_url(self.data_dir) and self.missing_splits():
            prepare(self.data_dir, self.hparams.seed)

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (int(t.global_rank), int(t.world_size)) if t is not None else (0, 1)

    def setup(self, stage: str | None = None):
        self.rank, self.world_size = self._rank_world()
        hp = self.hparams
        wanted = {"fit": [hp.train_split, hp.val_split], "validate": [hp.val_split], "test": [hp.test_split],
                  "predict": [hp.test_split]}.get(stage, [hp.train_split, hp.val_split, hp.test_split])
        for name, split in zip(("train_split", "val_split", "test_split"), (hp.train_split, hp.val_split, hp.test_split)):
            if split is not None and split in wanted:
                try:
                    info = read_split_info(self.data_dir, split)  # fail early with a clear message
                except ShardFormatError as e:
                    raise ShardFormatError(f"{e} (this split is {type(self).__name__}'s {name}; set "
                                           f"{name}=None to skip it or name another split)") from None
                if name == "train_split" and stage == "fit" and info.get("mode") == KEEP_OBJECTS:
                    rank_zero_warn(f"training split '{split}' of {self.data_dir} was written with --keep-objects: "
                                   f"its objects are still in the photos, so the model learns to find them, not "
                                   f"where a missing one could go; convert with --remove-objects to train placement")

    def stream(self, split: str, train: bool) -> ShardStream:
        hp = self.hparams
        return ShardStream(self.data_dir, split, image_size=hp.image_size,
                           batch_size=hp.batch_size if train else (hp.eval_batch_size or hp.batch_size),
                           train=train, rank=self.rank, world_size=self.world_size, num_workers=hp.num_workers,
                           seed=hp.seed, shuffle_buffer=hp.shuffle_buffer, flip_prob=hp.flip_prob, pairs=hp.pairs,
                           resampled=hp.resampled and train, verify=hp.verify, padded_boxes=hp.padded_boxes)

    def current_epoch(self) -> int:
        return int(self.trainer.current_epoch) if self.trainer is not None else self._epoch

    def set_epoch(self, epoch: int):
        """Set the epoch by hand (without a trainer); pushed to workers at the next iteration."""
        self._epoch = int(epoch)
        for s in self._streams.values():
            s.set_epoch(epoch)

    def state_dict(self) -> dict:
        """Training position saved in every checkpoint: the epoch and how many of its batches were
        trained (Lightning's batch progress; `processed` is right both at train-batch end and after
        validation)."""
        t = self.trainer
        if t is None or t.state.fn != "fit":
            return {}
        return {"epoch": int(t.current_epoch),
                "batches_done": int(t.fit_loop.epoch_loop.batch_progress.current.processed)}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state) or None

    def _resume_skip(self, stream: ShardStream) -> int:
        """Batches the first train iteration after a resume skips (0 at an epoch boundary or later)."""
        resume, self._resume = self._resume, None
        if not resume or resume["epoch"] != self.current_epoch():
            return 0
        done = int(resume["batches_done"])
        return done if done < stream.batches_per_epoch else 0

    @property
    def num_skipped(self) -> dict[str, int]:
        """Corrupt samples skipped so far per split (all workers of this process)."""
        return {k: s.num_skipped for k, s in self._streams.items()}

    def _loader(self, split: str | None, train: bool):
        if split is None:
            return []
        s = self.stream(split, train)
        self._streams[split] = s
        hp = self.hparams
        return EpochLoader(s, epoch_fn=self.current_epoch, skip_fn=partial(self._resume_skip, s) if train else None,
                           num_workers=hp.num_workers,
                           persistent_workers=hp.persistent_workers and hp.num_workers > 0, pin_memory=hp.pin_memory,
                           **({"prefetch_factor": hp.prefetch_factor} if hp.prefetch_factor and hp.num_workers else {}))

    def train_dataloader(self):
        return self._loader(self.hparams.train_split, train=True)

    def val_dataloader(self):
        return self._loader(self.hparams.val_split, train=False)

    def test_dataloader(self):
        return self._loader(self.hparams.test_split, train=False)
