"""From a placement name (or an explicit placement) to the experts of each rank.

The builders themselves live in :mod:`moebal.schedule`; this module only calls them with
the sizes of one scheduling group and converts the result.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np

PLACEMENTS = ("standard", "symmetric", "asymmetric", "eplb")


def check_placement_name(name: str) -> None:
    if name not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS} or a list of experts per "
                         f"rank, got {name!r}")


def build_placement(
    placement: Union[str, Sequence[Sequence[int]]],
    sched_size: int,
    ep_size: int,
    num_experts: int,
    seed: int = 0,
    loads: Optional[Sequence[float]] = None,
    need_solver_placement: bool = False,
) -> tuple[list[list[int]], Any]:
    """``(experts_GS, solver_placement)`` for one scheduling group of ``sched_size`` ranks.

    ``experts_GS``: the experts of each of the ``sched_size`` ranks. ``solver_placement`` is what
    ``moebal.schedule.solve_schedule`` takes (None unless ``need_solver_placement``).
    """
    if isinstance(placement, str):
        check_placement_name(placement)
        raise ValueError(
            f"placement {placement!r} needs moebal.schedule, which is not available here"
        )
    if not isinstance(placement, (list, tuple, np.ndarray)):
        raise TypeError(f"placement must be a name or a list of experts per rank, got "
                        f"{type(placement).__name__}")
    experts_GS = [[int(e) for e in row] for row in placement]  # ParallelLayout checks it
    if need_solver_placement:
        raise ValueError("schedule 'lp' needs moebal.schedule, which is not available here")
    return experts_GS, None
