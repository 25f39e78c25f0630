"""From a placement name (or an explicit placement) to the experts of each rank.

The builders live in :mod:`moebal.schedule` (``PLACEMENTS``, ``build_placement``);
:func:`build_rank_placement` calls them with the sizes of one scheduling group
(``num_gpus = sched_size``, ``slots_per_gpu = E / ep_size``) and also takes an explicit
list of experts per rank.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from moebal import schedule
from moebal.schedule import PLACEMENTS, Placement


def check_placement_name(name: str) -> None:
    if name not in PLACEMENTS:
        raise ValueError(f"placement must be one of {sorted(PLACEMENTS)} or a list of experts "
                         f"per rank, got {name!r}")


def build_rank_placement(
    placement: Union[str, Sequence[Sequence[int]]],
    sched_size: int,
    ep_size: int,
    num_experts: int,
    seed: int = 0,
    loads: Optional[Sequence[float]] = None,
) -> tuple[list[list[int]], Placement]:
    """``(experts_of_gpu, placement)`` for one scheduling group of ``sched_size`` ranks.

    ``experts_of_gpu[g]``: the experts of rank g of the group; ``placement``: the
    ``moebal.schedule.Placement`` the scheduler takes. ``loads`` is the load history of the
    builders that use one ([E] or [steps, E]). Raises ValueError for an unknown name, sizes
    the builder cannot serve, or an explicit placement the scheduler would refuse.
    """
    slots = num_experts // ep_size
    if isinstance(placement, str):
        check_placement_name(placement)
        built = schedule.build_placement(placement, sched_size, num_experts, slots,
                       loads_E=None if loads is None else np.asarray(loads), seed=seed)
        return [list(row) for row in built.experts_of_gpu], built
    if not isinstance(placement, (list, tuple, np.ndarray)):
        raise TypeError(f"placement must be a name or a list of experts per rank, got "
                        f"{type(placement).__name__}")
    experts_of_gpu = [[int(e) for e in row] for row in placement]
    holds_EG = np.zeros((num_experts, len(experts_of_gpu)), dtype=bool)
    for g, row in enumerate(experts_of_gpu):
        for e in row:
            if 0 <= e < num_experts:
                holds_EG[e, g] = True
    if not holds_EG.any(axis=1).all():  # ParallelLayout names the missing experts
        return experts_of_gpu, None  # type: ignore[return-value]
    return experts_of_gpu, Placement.from_holds(holds_EG, slots, name="explicit")
