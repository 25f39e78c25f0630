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



def all_gather_columns(
    x_EN: torch.Tensor, group: Optional["dist.ProcessGroup"], fill: float
) -> tuple[torch.Tensor, list[int]]:
    """Every rank's ``[E, N_r]`` columns side by side, and the ``N_r`` of each rank.

    Ranks may hold different N: each pads to the largest with ``fill`` for the gather, so
    the result is ``[E, R * max N_r]`` with the padding left in (``fill`` chosen so that
    it never counts, e.g. -inf for a k-th largest). Without a group: ``(x_EN, [N])``.
    """
    if group is None:
        return x_EN, [x_EN.shape[1]]
    import torch.distributed as dist

    world = dist.get_world_size(group)
    size = torch.tensor([x_EN.shape[1]], dtype=torch.int64, device=x_EN.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s) for s in sizes]
    widest = max(counts)
    padded = x_EN.new_full((x_EN.shape[0], widest), fill)
    padded[:, : x_EN.shape[1]] = x_EN
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat(parts, dim=1), counts
