"""How ranks share the items of an expensive metric (one edit per image: diffusion steps, CLIP, SSIM).

Item ``i`` of a set belongs to rank ``i % world_size`` (`rank_indices`): a fixed split by index, so the
ranks' shares are disjoint, their union is the whole set, no item is padded in twice, and an item's
seed can derive from its index whatever the number of ranks. Metric states then sync through
torchmetrics; `gather_to_rank_zero` brings anything else (pictures, boxes) to the one rank that writes.
"""
from __future__ import annotations

import torch.distributed as dist

__all__ = ["rank_indices", "gather_to_rank_zero"]


def rank_indices(total: int, rank: int, world_size: int) -> range:
    """Indices of the items rank ``rank`` of ``world_size`` takes out of ``total``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of world size {world_size}")
    return range(rank, total, world_size)


def gather_to_rank_zero(obj) -> list | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank zero; None on the other ranks.

    Collective: every rank of the default process group calls it. Without one: ``[obj]``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered
