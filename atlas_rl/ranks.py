"""Ranks of a data-parallel trainer (torch.distributed, any backend): every rank's
engine learns every rank's rollouts, so that the speculators of all ranks stay identical.
Without an initialised process group (or with one rank) everything here is the identity."""

from __future__ import annotations

from typing import Any


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (on every rank)."""
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return [obj]
    out: list = [None] * size
    dist.all_gather_object(out, obj)
    return out


def from_rank_zero(obj: Any) -> Any:
    """Rank 0's `obj`, on every rank."""
    import torch.distributed as dist

    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
