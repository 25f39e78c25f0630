"""Collectives the balancers use, a no-op without a process group."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    import torch.distributed as dist


def all_reduce_sum_(tensor: torch.Tensor, group: Optional["dist.ProcessGroup"]) -> torch.Tensor:
    """Sum ``tensor`` in place over ``group`` (nothing when ``group`` is None)."""
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor

