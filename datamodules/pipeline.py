"""The one WebDataset pipeline shared by PIPE, OPA and toy data.

Per rank and worker: shard list -> tar samples -> (train) seeded sample shuffle buffer -> decode,
validate (the one box rule, `genloc.boxes.validate_boxes`), resize (stretch to ``image_size``;
normalised boxes unchanged), (train) horizontal flip of image, boxes and -- through the data kind's
``flip_meta`` hook (`datamodules.kinds`, the kind named by ``{split}.json``'s "source") -- meta,
(pairs) one (positive, negative) pair per sample -> batches collated into the batch dict of
docs/ARCHITECTURE.md.

DDP safety:
- Train shards are shuffled with ``Random(seed, epoch, pass)`` BEFORE the rank split, the same on
  every rank; then ``order[rank::world_size]`` and ``[worker::num_workers]``. Rank and world size
  come from the caller (the datamodule reads them from the trainer), never from the environment.
  ``resampled=True`` instead draws shards with replacement from a (seed, epoch, rank, worker) rng.
- Every rank yields exactly ``max(1, num_samples // (world_size * batch_size))`` batches per
  epoch: each worker has a fixed quota and walks its shards again (next pass) if they run out.
- The epoch lives in a shared-memory tensor read by each worker when it starts an epoch's
  iteration. `EpochLoader.__iter__` writes it right before the workers start, which happens at
  every epoch for both persistent and non-persistent workers.
- Eval loaders read each sample exactly once over all ranks (shards split by rank then worker),
  in order, without flip; the last batch of a worker may be short.
- A corrupt sample (unreadable image/json, size mismatch, invalid box) or tar is skipped, logged
  with its key and reason, and counted in shared memory (`ShardStream.num_skipped`). The same holds
  for shards read from a URL (`datamodules.shard_reader.open_binary`: fsspec or a pipe: command): a shard
  that cannot be opened or that breaks off mid-stream is a counted skip. Where ``{split}.json``
  records each shard's sample count, a shard read to its end counts every recorded sample it did
  not hold (torn, garbled, or damaged so that it reads as a shorter valid tar), not one per error.
- Shard checksums: where ``{split}.json`` records a sha256 per shard, each shard is hashed as it
  streams (local, file:// and URL alike, no extra read) and its samples are held back until the
  shard was read to its end: a shard whose hash differs (a flipped byte, a sibling shard of the
  same split, one from another conversion) is dropped whole, each of its samples counted as skipped
  and one warning names the shard and both hashes; ``verify="strict"`` stops instead (one line),
  ``verify="unchecked"`` streams without hashing. Holding back never changes the order of samples nor any RNG.
- Mid-epoch resume: ``set_skip(n)`` (shared memory, read with the epoch) makes the next train
  iteration drop exactly the epoch's first ``n`` batches and continue with batch ``n``, bit for bit
  as the uninterrupted epoch would; worker ``w`` then plays reader ``(w + n) % num_workers``,
  because the DataLoader's round-robin restarts at worker 0.
"""
from __future__ import annotations

import io
import json
import logging
import math
import random
from collections import deque
from itertools import islice

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from genloc.boxes import hflip, normalise, validate_boxes
from genloc.images import to_rgb_image

from .kinds import data_kind
from .shard_format import ShardFormatError
from .shard_reader import HashingReader, StorageStalled, open_binary, read_split_info

log = logging.getLogger("datamodules")

__all__ = ["ShardStream", "EpochLoader", "PaddedBoxes", "collate", "decode_sample"]

_MAX_SLOTS = 256  # shared skip counters: one per worker (slot 0 = main process)
VERIFY = ("drop", "strict", "unchecked")  # what a shard whose sha256 differs from {split}.json's does (ShardStream)


class CorruptSample(ValueError):
    pass


def _boxes(raw, w: int, h: int, what: str) -> torch.Tensor:
    """Pixel boxes of the json -> normalised float32 ``[k, 4]``, by the one rule of `genloc.boxes`."""
    check = validate_boxes(np.asarray(raw, dtype=np.float64).reshape(-1, 4), (w, h))
    check.raise_first(f"{what} box", CorruptSample)
    return torch.from_numpy(normalise(check.clipped, (w, h))).float()


def decode_sample(sample: dict, image_size: int) -> dict:
    """Tar sample -> dict(image, category, size, positives, negatives, key, meta); raises
    CorruptSample with a readable reason."""
    key = sample.get("__key__", "?")
    try:
        ann = json.loads(sample["json"])
    except KeyError:
        raise CorruptSample("no json member") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptSample(f"bad json ({e})") from None
    data = sample.get("jpg", sample.get("png"))
    if data is None:
        raise CorruptSample("no jpg/png member")
    try:
        w, h = int(ann["width"]), int(ann["height"])
        pos = _boxes(ann.get("positives", []), w, h, "positive")
        neg = _boxes(ann.get("negatives", []), w, h, "negative")
        category = str(ann["category"])
    except CorruptSample:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CorruptSample(f"bad annotation ({type(e).__name__}: {e})") from None
    try:
        img = Image.open(io.BytesIO(data))
        if img.size != (w, h):
            raise CorruptSample(f"image is {img.size[0]}x{img.size[1]} but json says {w}x{h}")
        img.draft("RGB", (image_size, image_size))  # JPEG: decode at a reduced scale when much larger
        if img.mode != "RGB":  # the framework's one conversion: 16-bit, alpha, CMYK ... keep their values
            img = to_rgb_image(img)[0]
        img = img.resize((image_size, image_size), Image.BILINEAR)
    except CorruptSample:
        raise
    except Exception as e:  # PIL raises many types for broken files
        raise CorruptSample(f"unreadable image ({type(e).__name__}: {e})") from None
    image = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div_(255)
    return {"image": image, "category": category, "size": (w, h), "positives": pos, "negatives": neg,
            "key": key, "meta": dict(ann.get("meta") or {})}


def _hflip(s: dict, flip_meta) -> dict:
    """Mirror the image and its boxes; ``flip_meta`` (the data kind's hook, or None) mirrors the meta."""
    s["image"] = s["image"].flip(-1)
    s["positives"], s["negatives"] = hflip(s["positives"]), hflip(s["negatives"])
    if flip_meta is not None:
        s["meta"] = flip_meta(s["meta"])
    return s


class PaddedBoxes:
    """A batch's per-sample box lists as one padded tensor ``[B, K, 4]`` (K: the most boxes of a sample)
    and the counts as host integers, collated in the loader worker: pinning and the host-to-device
    copy are one transfer each instead of one per sample. Reads like the list of ``[k, 4]`` tensors it
    replaces (``len``, index, slice, iterate: views, no copy); `flatten` gives every box and its sample."""

    def __init__(self, padded: torch.Tensor, counts: tuple[int, ...]):
        self.padded, self.counts = padded, tuple(int(c) for c in counts)

    @classmethod
    def collate(cls, box_lists: list[torch.Tensor]) -> "PaddedBoxes":
        counts = [len(b) for b in box_lists]
        padded = torch.zeros(len(box_lists), max(counts, default=0), 4)
        for i, boxes in enumerate(box_lists):
            padded[i, :len(boxes)] = boxes.reshape(-1, 4)
        return cls(padded, tuple(counts))

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.padded[index, :self.counts[index]]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def flatten(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every box ``[M, 4]`` in sample order and the index of its sample ``[M]`` (host counts: no
        device read)."""
        counts = torch.tensor(self.counts, dtype=torch.long)
        owner = torch.repeat_interleave(torch.arange(len(self)), counts).to(self.padded.device)
        keep = torch.arange(self.padded.shape[1]) < counts[:, None]
        return self.padded[keep.to(self.padded.device)], owner

    def select(self, index: list[int]) -> "PaddedBoxes":
        """The box lists of the given samples."""
        return PaddedBoxes(self.padded[torch.tensor(index, dtype=torch.long, device=self.padded.device)],
                           tuple(self.counts[i] for i in index))

    def to(self, *args, **kwargs) -> "PaddedBoxes":
        return PaddedBoxes(self.padded.to(*args, **kwargs), self.counts)

    def pin_memory(self, device=None) -> "PaddedBoxes":
        return PaddedBoxes(self.padded.pin_memory(), self.counts)


def collate(samples: list[dict], pairs: bool = False, padded_boxes: bool = False) -> dict:
    """Samples -> the batch dict of docs/ARCHITECTURE.md (+ chosen/rejected for DPO pairs).
    ``padded_boxes``: positives and negatives as `PaddedBoxes` instead of lists of tensors."""
    boxes = PaddedBoxes.collate if padded_boxes else list
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "category": [s["category"] for s in samples],
        "size": torch.tensor([s["size"] for s in samples], dtype=torch.long),
        "positives": boxes([s["positives"] for s in samples]),
        "negatives": boxes([s["negatives"] for s in samples]),
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }
    if pairs:
        batch["chosen"] = torch.stack([s["chosen"] for s in samples])
        batch["rejected"] = torch.stack([s["rejected"] for s in samples])
    return batch


class ShardStream(IterableDataset):
    """Iterable of ready batches for one rank (use with ``batch_size=None`` loaders)."""

    def __init__(self, data_dir, split: str, *, image_size: int, batch_size: int, train: bool, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0, shuffle_buffer: int = 1000,
                 flip_prob: float = 0.5, pairs: bool = False, resampled: bool = False, verify: str = "drop",
                 padded_boxes: bool = False):
        super().__init__()
        info = read_split_info(data_dir, split)
        self.info, self.paths, self.split, self.data_dir = info, info.paths, split, str(data_dir)
        self.kind = data_kind(info.get("source"))  # the hooks of the data this folder holds
        self.image_size, self.batch_size, self.train = int(image_size), int(batch_size), bool(train)
        self.rank, self.world_size, self.num_workers = int(rank), int(world_size), int(num_workers)
        self.seed, self.shuffle_buffer, self.pairs, self.resampled = int(seed), int(shuffle_buffer), pairs, resampled
        self.flip_prob = float(flip_prob) if train else 0.0
        self.padded_boxes = bool(padded_boxes)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        consumers = self.world_size * max(1, self.num_workers)
        if len(self.paths) < consumers and not (train and resampled):
            raise ShardFormatError(
                f"{data_dir}/{split}: {len(self.paths)} shards for {self.world_size} rank(s) x "
                f"{max(1, self.num_workers)} worker(s) = {consumers} readers; some would get no data. "
                f"Re-convert with more shards (e.g. --num-shards {consumers}), or lower num_workers.")
        sizes = info.get("pair_shard_sizes" if pairs else "shard_sizes")
        self.num_samples = int(info.get("num_pair_samples", 0) if pairs else info["num_samples"])
        if pairs and self.num_samples == 0:
            raise ShardFormatError(f"{data_dir}/{split}: no sample has both a positive and a negative box, "
                                   f"so pairs=True has nothing to read; use pairs=False or an OPA-style split")
        self.shard_sizes = sizes
        self.recorded_sizes = info.get("shard_sizes")  # raw samples per shard, to count what a damaged one lost
        if verify not in VERIFY:
            raise ValueError(f"verify={verify!r}: choose one of {', '.join(VERIFY)}")
        self.verify = verify
        self.checksums = info.get("shard_sha256") if verify != "unchecked" else None
        self._shard_index = {p: i for i, p in enumerate(self.paths)}
        self._epoch = torch.zeros(1, dtype=torch.long).share_memory_()
        self._skip = torch.zeros(1, dtype=torch.long).share_memory_()
        self._skipped = torch.zeros(_MAX_SLOTS, dtype=torch.long).share_memory_()

    # -- epoch and counters ------------------------------------------------------------
    def set_epoch(self, epoch: int):
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_skip(self, batches: int):
        """Batches of the epoch already trained (resume): the next train iteration starts after them."""
        self._skip[0] = int(batches)

    @property
    def num_skipped(self) -> int:
        """Corrupt samples/tars skipped so far, summed over all workers of this loader."""
        return int(self._skipped.sum())

    @property
    def batches_per_epoch(self) -> int:
        """Train: the fixed per-rank count. Eval: exact when shard sizes are known."""
        if self.train:
            return max(1, self.num_samples // (self.world_size * self.batch_size))
        nw = max(1, self.num_workers)
        mine = list(range(len(self.paths)))[self.rank::self.world_size]
        if self.shard_sizes is None:
            return math.ceil(self.num_samples / (self.world_size * self.batch_size))
        return sum(math.ceil(sum(self.shard_sizes[i] for i in mine[w::nw]) / self.batch_size) for w in range(nw))

    def __len__(self):
        return self.batches_per_epoch

    # -- pipeline ------------------------------------------------------------------------
    def _worker(self):
        wi = get_worker_info()
        return (0, 1) if wi is None else (wi.id, wi.num_workers)

    def _passes(self, epoch: int, worker: int, nworkers: int):
        """Shard lists of this rank/worker, one per pass: eval one in-order pass; train endless
        passes, each shuffled identically on every rank (seed, epoch, pass) before the rank split."""
        if not self.train:
            yield self.paths[self.rank::self.world_size][worker::nworkers]
            return
        if self.resampled:
            rng = random.Random(f"{self.seed}-{epoch}-{self.rank}-{worker}-resample")
            while True:
                yield [rng.choice(self.paths) for _ in range(len(self.paths))]
        pass_ = 0
        while True:
            order = list(self.paths)
            random.Random(f"{self.seed}-{epoch}-{pass_}").shuffle(order)
            yield order[self.rank::self.world_size][worker::nworkers]
            pass_ += 1

    def _tar_error(self, exn) -> bool:
        """Log unreadable tar data; count it as one skip only when ``{split}.json`` records no shard
        sizes (otherwise `_account` counts every sample the shard lost). Stalled storage is not a
        damaged shard: it stops the run (`StorageStalled`)."""
        if isinstance(exn, StorageStalled):
            raise exn
        if self.recorded_sizes is None:
            slot = self._worker()[0] + 1
            self._skipped[slot % _MAX_SLOTS] += 1
        log.warning("skipping unreadable tar data in %s/%s: %s", self.data_dir, self.split, exn)
        return True

    def _account(self, url: str, keys: set):
        """A shard read to its end: count each sample ``{split}.json`` records for it that was not
        found (a shard damaged in the middle may read as a shorter valid tar, without any error)."""
        if self.recorded_sizes is None:
            return
        recorded = self.recorded_sizes[self._shard_index[url]]
        if len(keys) == recorded:
            return
        if len(keys) < recorded:
            self._skipped[(self._worker()[0] + 1) % _MAX_SLOTS] += recorded - len(keys)
        log.warning("%s holds %d samples but %s.json records %d: %d lost; the shard is damaged or was replaced, "
                    "re-run the conversion (python -m datamodules.verify checks every shard) [%d skipped so far]",
                    url, len(keys), self.split, recorded, max(0, recorded - len(keys)), self.num_skipped)

    def _open_shards(self, sources, keys: set, digests: dict):
        """``{url}`` -> ``{url, stream}`` through `open_binary` (local file, fsspec URL or pipe:); a shard
        that cannot be opened is a counted skip, and each stream is closed once its tar is read.
        ``keys`` collects the sample keys of the shard being read (`_noting_keys`); ``digests`` gets
        the sha256 of each shard read to its end when checksums are checked."""
        for source in sources:
            keys.clear()
            try:
                stream = open_binary(source["url"])
            except Exception as exn:
                self._tar_error(exn)
                self._account(source["url"], keys)
                continue
            hashed = HashingReader(stream) if self.checksums is not None else stream
            try:
                yield {**source, "stream": hashed}
                if self.checksums is not None:
                    digests[source["url"]] = hashed.hexdigest()  # reads the tar's end padding too
            except Exception as exn:  # the rest of the stream unreadable: no digest, the shard's samples go
                self._tar_error(exn)
            finally:
                try:
                    stream.close()
                except Exception as exn:  # a pipe: command that failed after its last byte
                    self._tar_error(exn)
            self._account(source["url"], keys)  # not reached when the reader stops mid-shard

    def _checked(self, url: str, digest: str | None, samples: list) -> list:
        """The samples of a shard read to its end when its sha256 is the one ``{split}.json`` records;
        otherwise none, each one counted as skipped, with one warning naming the shard and both hashes
        (``verify="strict"``: ShardFormatError instead)."""
        recorded = self.checksums[self._shard_index[url]]
        if digest == recorded:
            return samples
        what = (f"does not match its sha256 in {self.split}.json (read {digest}, recorded {recorded})"
                if digest is not None else "could not be read to its end, so its sha256 is unknown")
        if self.verify == "strict":
            raise ShardFormatError(f"{url} {what}: the shard is damaged or was replaced; re-run the conversion of "
                                   f"split '{self.split}' (python -m datamodules.verify checks every shard), or set "
                                   f"data.verify=drop to train without its samples")
        self._skipped[(self._worker()[0] + 1) % _MAX_SLOTS] += len(samples)
        log.warning("%s %s: its %d samples are dropped; the shard is damaged or was replaced, re-run the conversion "
                    "(python -m datamodules.verify checks every shard) [%d skipped so far]", url, what, len(samples),
                    self.num_skipped)
        return []

    @staticmethod
    def _noting_keys(files, keys: set):
        for file in files:
            if "fname" in file:
                keys.add(base_plus_ext(file["fname"])[0])
            yield file

    def _tar_samples(self, sources):
        """Shard URLs -> raw tar samples (webdataset's tar expansion and key grouping), one shard at a
        time; with checksums a shard's samples are held until it is hashed to its end (`_checked`)."""
        for source in sources:
            keys: set = set()
            digests: dict = {}
            files = tar_file_expander(self._open_shards([source], keys, digests), handler=self._tar_error)
            samples = group_by_keys(self._noting_keys(files, keys), handler=self._tar_error)
            if self.checksums is None:
                yield from samples
            else:
                held = list(samples)
                yield from self._checked(source["url"], digests.get(source["url"]), held)

    def _samples(self, src, epoch: int, worker: int):
        """Decode, flip, pair; skip (count + log) corrupt samples."""
        slot = (worker + 1) % _MAX_SLOTS
        for raw in src:
            key = raw.get("__key__", "?")
            try:
                s = decode_sample(raw, self.image_size)
            except CorruptSample as e:
                self._skipped[slot] += 1
                log.warning("skipping corrupt sample %s (%s) in %s: %s [%d skipped so far]", key,
                            raw.get("__url__", "?"), self.split, e, self.num_skipped)
                continue
            if self.pairs and (len(s["positives"]) == 0 or len(s["negatives"]) == 0):
                continue
            rng = random.Random(f"{self.seed}-{epoch}-{key}")  # deterministic per sample, not per worker
            flipped = self.flip_prob > 0 and rng.random() < self.flip_prob
            if flipped:
                s = _hflip(s, self.kind.flip_meta)
            s["meta"]["hflip"] = flipped
            if self.pairs:
                s["chosen"] = s["positives"][rng.randrange(len(s["positives"]))]
                s["rejected"] = s["negatives"][rng.randrange(len(s["negatives"]))]
            yield s

    def _stream(self, epoch: int, worker: int, nworkers: int):
        """Samples of this reader; the shuffle buffer is flushed at the end of every pass so a
        pass never borrows samples of the next one (which would break per-epoch coverage)."""
        for i, shards in enumerate(self._passes(epoch, worker, nworkers)):
            urls = [{"url": p} for p in shards]
            stages = [lambda urls=urls: iter(urls), self._tar_samples]
            if self.train and self.shuffle_buffer > 1:
                rng = random.Random(f"{self.seed}-{epoch}-{self.rank}-{worker}-{i}-buffer")
                stages.append(wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng))
            stages.append(lambda src: self._samples(src, epoch, worker))
            n = 0
            for n, sample in enumerate(wds.DataPipeline(*stages), 1):
                yield sample
            if n == 0 and shards:
                raise RuntimeError(f"{self.data_dir}/{self.split}: rank {self.rank} worker {worker} read no usable "
                                   f"sample from {len(shards)} shard(s) (all empty or corrupt, see warnings); "
                                   f"re-run the conversion")

    def __iter__(self):
        epoch = self.epoch
        worker, nworkers = self._worker()
        if self.num_workers and nworkers != self.num_workers:
            raise RuntimeError(f"ShardStream built for {self.num_workers} workers runs in {nworkers}")
        if not self.train:
            samples = self._stream(epoch, worker, nworkers)
            while chunk := [s for _, s in zip(range(self.batch_size), samples)]:
                yield collate(chunk, self.pairs, self.padded_boxes)
            return
        # Reader r makes the epoch's batches j with j % nworkers == r; after skipping `skip` batches
        # the loader asks worker 0 first, so worker w plays the reader of batch skip + w.
        skip = int(self._skip[0])
        reader = (worker + skip) % nworkers
        samples = self._stream(epoch, reader, nworkers)
        total = self.batches_per_epoch
        mine = total // nworkers + (reader < total % nworkers)
        done = min(mine, skip // nworkers + (reader < skip % nworkers))
        deque(islice(samples, done * self.batch_size), maxlen=0)  # decode and drop: same stream state
        for _ in range(mine - done):
            yield collate([s for _, s in zip(range(self.batch_size), samples)], self.pairs, self.padded_boxes)


class EpochLoader(DataLoader):
    """DataLoader that pushes the current epoch into its `ShardStream` right before each epoch's
    iteration starts (workers read it when they begin iterating, persistent or not)."""

    def __init__(self, dataset: ShardStream, epoch_fn=None, skip_fn=None, **kwargs):
        kwargs.setdefault("batch_size", None)
        super().__init__(dataset, **kwargs)
        self.epoch_fn, self.skip_fn = epoch_fn, skip_fn

    def __iter__(self):
        if self.epoch_fn is not None:
            self.dataset.set_epoch(self.epoch_fn())
        self.dataset.set_skip(self.skip_fn() if self.skip_fn is not None else 0)
        return super().__iter__()
