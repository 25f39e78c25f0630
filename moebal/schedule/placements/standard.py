"""``standard``: Megatron-style EP x EDP, replica sets equal or disjoint."""

from __future__ import annotations

from typing import Optional

import numpy as np

from moebal.schedule.placement import Placement
from moebal.schedule.placements.packing import check_sizes


def standard(
    num_gpus: int,
    num_experts: int,
    slots_per_gpu: int,
    *,
    loads_E: Optional[np.ndarray] = None,
    seed: int = 0,
) -> Placement:
    """Megatron EP x EDP: expert e on GPU ``k * EP + (e mod EP)`` for every group k.

    ``EP = num_experts / slots_per_gpu`` GPUs per expert-parallel group, ``num_gpus / EP``
    groups (= replicas per expert). Ignores ``loads_E`` and ``seed``.
    """
    G, E, s = check_sizes(num_gpus, num_experts, slots_per_gpu)
    if E % s:
        raise ValueError(
            f"standard placement needs num_experts ({E}) to be a multiple of slots_per_gpu ({s})"
        )
    ep = E // s
    if G % ep:
        raise ValueError(
            f"standard placement: expert-parallel size {ep} = num_experts / slots_per_gpu "
            f"must divide num_gpus ({G})"
        )
    groups = G // ep
    sets = tuple(tuple(k * ep + e % ep for k in range(groups)) for e in range(E))
    return Placement(G, s, sets, name="standard")
