"""The evaluation's settings and choices, importable without torch: `evaluate.py --help` builds its
parser from these defaults at once (metrics.sampling and metrics.predictions use them)."""
from __future__ import annotations

from dataclasses import dataclass, field

# Built-in seeded baselines of evaluate.py (metrics.predictions.baseline_predictions).
BASELINES = ("random", "random_gt_size", "blind")
# Images per sampling call unless the memory budget allows fewer: one seeded generator runs over
# the whole pass, so a seed's boxes depend on the batch size; a fixed ceiling keeps results
# comparable across machines.
MAX_SAMPLING_BATCH = 32


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Sampling:
    """How boxes are drawn: N per sample, the sampler's settings, one seed. ``batch_size=None`` sizes
    the batch from ``sampling_memory`` (GiB), capped at `MAX_SAMPLING_BATCH`."""
    num_samples: int = 100
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    batch_size: int | None = None
    sampling_memory: float = 4.0
    num_workers: int = 0
    device: str = field(default_factory=default_device)
    bf16: bool = False  # decode under bf16 autocast: a GPU speed option (docs/gpu.md)
