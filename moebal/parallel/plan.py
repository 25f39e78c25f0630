"""Where each source rank's tokens of each expert are computed, for one MoE layer's forward.

Every rank of a scheduling group has the same ``loads_GE`` (tokens of source g for expert
e, all-gathered) and runs the same deterministic rule, so all ranks agree on the plan
without more communication. A rank only needs its own row and column of the plan: how
many of its tokens of each expert go to each rank (``send_EG``) and how many tokens of
each expert it receives from each rank (``recv_GE``). Ranks here are positions 0..G-1 in
the scheduling group.

Schedules:
    none  fixed targets, Megatron-style: a source's tokens of expert e go to its own
          replica if it holds e, else to the replica of e in its own EP group (the lowest
          rank there if several), else to replica number ``g mod |replicas|`` of e.
    lp    ``moebal.schedule.solve_schedule`` on the placement and the per-(source, expert)
          loads, warm-started from the same layer's previous plan: the busiest rank
          computes as few tokens as possible (the LP optimum rounded up), and among such
          plans as few tokens as possible leave their source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from moebal.parallel.layout import ParallelLayout
from moebal.schedule import Placement, Schedule, solve_schedule

SCHEDULES = ("lp", "none")


@dataclass
class RankPlan:
    """One rank's share of a plan, and the load of every rank of its scheduling group.

    send_EG      int64 [E, G]: this rank's tokens of expert e computed on rank g.
    recv_GE      int64 [G, E]: tokens of expert e from rank g computed on this rank.
    computed_G   int64 [G]: tokens computed on each rank of the group under this plan.
    computed_unscheduled_G  the same under the ``none`` rule, for comparison.
    """

    send_EG: np.ndarray
    recv_GE: np.ndarray
    computed_G: np.ndarray
    computed_unscheduled_G: np.ndarray

    @property
    def makespan(self) -> int:
        """Tokens on the busiest rank of the group."""
        return int(self.computed_G.max()) if self.computed_G.size else 0

    @property
    def makespan_unscheduled(self) -> int:
        return int(self.computed_unscheduled_G.max()) if self.computed_unscheduled_G.size else 0


def static_targets(layout: ParallelLayout) -> np.ndarray:
    """int64 [G, E]: the rank of the scheduling group that computes source g's tokens of
    expert e under the ``none`` schedule (see the module docstring)."""
    G, E, P = layout.sched_size, layout.num_experts, layout.ep_size
    holds_GE = layout.holds_GE()
    target_GE = np.empty((G, E), dtype=np.int64)
    for g in range(G):
        own_group = range(g - g % P, g - g % P + P)
        for e in range(E):
            if holds_GE[g, e]:
                target_GE[g, e] = g
                continue
            in_group = [h for h in own_group if holds_GE[h, e]]
            if in_group:
                target_GE[g, e] = in_group[0]
            else:
                replicas = np.flatnonzero(holds_GE[:, e])
                target_GE[g, e] = replicas[g % len(replicas)]
    return target_GE


def _computed_static(target_GE: np.ndarray, loads_GE: np.ndarray) -> np.ndarray:
    G = target_GE.shape[0]
    return np.bincount(target_GE.ravel(), weights=loads_GE.ravel(), minlength=G).astype(np.int64)


class Planner:
    """Turns all-gathered loads into this rank's plan, identically on every rank.

    ``schedule`` is ``"lp"`` or ``"none"``; ``placement`` is the ``moebal.schedule``
    placement of one scheduling group (needed for ``lp``).
    """

    def __init__(self, layout: ParallelLayout, schedule: str,
                 placement: Optional[Placement] = None):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if schedule == "lp" and placement is None:
            raise ValueError("schedule 'lp' needs the moebal.schedule placement")
        self.layout = layout
        self.schedule = schedule
        self.placement = placement
        self.target_GE = static_targets(layout)
        self._prev: dict[int, Schedule] = {}

    def plan(self, loads_GE: np.ndarray, rank: int, layer: int = 0) -> RankPlan:
        """The plan of rank ``rank`` (position in its scheduling group) for ``loads_GE``.

        ``layer`` keys the warm start: ``lp`` starts from the same layer's previous plan.
        """
        loads_GE = np.asarray(loads_GE, dtype=np.int64)
        G, E = self.target_GE.shape
        if loads_GE.shape != (G, E):
            raise ValueError(f"loads_GE has shape {loads_GE.shape}, expected {(G, E)}")
        unscheduled_G = _computed_static(self.target_GE, loads_GE)
        if self.schedule == "none":
            send_EG = np.zeros((E, G), dtype=np.int64)
            send_EG[np.arange(E), self.target_GE[rank]] = loads_GE[rank]
            recv_GE = np.where(self.target_GE == rank, loads_GE, 0)
            return RankPlan(send_EG, recv_GE, unscheduled_G, unscheduled_G)
        schedule = solve_schedule(self.placement, loads_GE, prev=self._prev.get(layer))
        self._prev[layer] = schedule
        source, expert, gpu, tokens = schedule.sends.T
        send_EG = np.zeros((E, G), dtype=np.int64)
        mine = source == rank
        send_EG[expert[mine], gpu[mine]] = tokens[mine]
        recv_GE = np.zeros((G, E), dtype=np.int64)
        here = gpu == rank
        recv_GE[source[here], expert[here]] = tokens[here]
        return RankPlan(send_EG, recv_GE, schedule.load_G, unscheduled_G)


def check_plan(plan: RankPlan, loads_GE: np.ndarray, rank: int, holds_GE: np.ndarray,
               layer: Optional[int] = None) -> None:
    """Raise RuntimeError if this rank's plan loses tokens or uses a rank without the expert."""
    where = f" (MoE layer {layer})" if layer is not None else ""
    if not np.array_equal(plan.send_EG.sum(1), loads_GE[rank]):
        raise RuntimeError(f"plan{where} does not send each of rank {rank}'s tokens once")
    if np.any(plan.send_EG.T[~holds_GE] != 0) or np.any(plan.recv_GE[:, ~holds_GE[rank]] != 0):
        raise RuntimeError(f"plan{where} sends tokens to a rank without their expert")
