"""The trainer's view of ``torch.distributed``: rank and world size, and the object collectives it
needs besides DDP's own (gathering every rank's RNG state into a checkpoint, handing rank 0's verdict
on the run folder to every rank). Everything is a no-op in a single process."""

from __future__ import annotations

import torch.distributed as dist

__all__ = ["is_distributed", "rank_and_world_size", "gather_object", "broadcast_object"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather_object(obj, world_size: int) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, world_size: int):
    """Rank 0's ``obj`` on every rank."""
    if world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
