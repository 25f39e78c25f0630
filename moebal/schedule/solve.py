"""Token scheduling across GPUs: the per-micro-batch LP, solved exactly and fast.

With ``G_e`` the GPUs holding expert e and ``load_e`` the tokens routed to e, the LP is::

    minimise T   s.t.   sum_g x[e, g] = load_e   (every expert e, g in G_e)
                        sum_e x[e, g] <= T       (every GPU g),   x >= 0.

Its optimum is the worst subset density ``max_S sum_{e: G_e within S} load_e / |S|`` (the
max-flow min-cut theorem on the network source -> expert (load_e) -> GPU (unbounded, g in
G_e) -> sink (T)); because capacities are integers, an *integer* plan with makespan
``ceil(LP optimum)`` exists, and that is what :func:`solve_schedule` returns.

``method="flow"`` (default): keeps an integer plan and an integer target ``T`` that is always
``ceil(density(S))`` of a known GPU set ``S`` (hence a lower bound, :mod:`.bounds`), and
routes tokens under ``T``, raising it to the density of the set that cannot route
(:mod:`.flow`); it stops when no GPU exceeds ``T``: the plan meets the lower bound, so it is
optimal. ``method="highs"``: the reference, the LPs in HiGHS (:mod:`.highs`).

Locality (loads per source GPU and expert, ``loads_RE`` [R = G, E]): among plans of optimal
makespan, the one sending the fewest tokens off their source GPU (:mod:`.locality`).

Layers, each importing only those before it: ``placement`` -> ``loads`` -> ``bounds`` ->
``flow`` -> ``locality`` -> ``highs`` -> ``solve`` (this module) -> ``placements`` (the
builders; ``asymmetric`` scores candidates with :func:`solve_schedule`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Optional

import numpy as np

from moebal.schedule.bounds import (
    ceil_div,
    covered_load,
    even_plan,
    gpu_loads,
    prefix_bound,
    simple_bound,
)
from moebal.schedule.flow import INT32_MAX, min_makespan, route
from moebal.schedule.highs import highs_optimal_plan, highs_plan_lp
from moebal.schedule.loads import MAX_TOTAL, schedule_loads
from moebal.schedule.locality import local_first_plan, min_moved_plan, split_sends
from moebal.schedule.placement import Placement


@dataclass(frozen=True, eq=False)
class Schedule:
    """An integer token schedule for one micro-batch.

    x_EG            int64 [E, G]: tokens of expert e computed on GPU g (0 where g lacks e).
    makespan        max_g sum_e x_EG[e, g]; equals ceil(LP optimum).
    lower_bound     the cheap bound max(ceil(total / G), max_e ceil(load_e / |G_e|)).
    critical_gpus   a GPU set S certifying optimality:
                    ceil(sum_{e: G_e within S} load_e / |S|) == makespan.
    tokens_moved    with per-source loads: tokens computed on a GPU other than their source;
                    None for per-expert loads.
    sends           with per-source loads: int64 rows of 4 (source, expert, gpu, tokens),
                    tokens > 0, sorted by (expert, source, gpu); rows with source == gpu
                    are tokens kept local.
                    None for per-expert loads.
    method          "flow" or "highs".
    """

    x_EG: np.ndarray
    makespan: int
    lower_bound: int
    critical_gpus: tuple[int, ...]
    tokens_moved: Optional[int] = None
    sends: Optional[np.ndarray] = field(default=None, repr=False)
    method: str = "flow"

    @property
    def load_G(self) -> np.ndarray:
        """int64 [G]: tokens computed on each GPU."""
        return self.x_EG.sum(0)

    def sends_REG(self) -> np.ndarray:
        """Dense int64 [R source GPU, E, G destination GPU] view of ``sends`` (small problems)."""
        if self.sends is None:
            raise ValueError("this schedule was solved from per-expert loads: no sends")
        E, G = self.x_EG.shape
        out = np.zeros((G, E, G), dtype=np.int64)
        s, e, g, n = self.sends.T
        out[s, e, g] = n
        return out

    sends_SEG = sends_REG  # the former name


def _validated(placement: Placement, loads: object) -> tuple[np.ndarray, Optional[np.ndarray]]:
    if not isinstance(placement, Placement):
        raise TypeError(f"placement must be a Placement, got {type(placement).__name__}")
    return schedule_loads(placement.num_experts, placement.num_gpus, loads)


def _schedule(
    placement: Placement,
    x_N: np.ndarray,
    makespan: int,
    lower: int,
    critical_G: tuple[int, ...],
    loads_RE: Optional[np.ndarray],
    method: str,
) -> Schedule:
    """The Schedule of slot plan ``x_N`` [N], with the sends when loads are per source."""
    idx = placement.slots
    sends = tokens_moved = None
    if loads_RE is not None:
        sends, tokens_moved = split_sends(placement, x_N, loads_RE)
    x_EG = np.zeros((placement.num_experts, placement.num_gpus), dtype=np.int64)
    x_EG[idx.expert_N, idx.gpu_N] = x_N
    return Schedule(
        x_EG=x_EG,
        makespan=int(makespan),
        lower_bound=int(lower),
        critical_gpus=critical_G,
        tokens_moved=tokens_moved,
        sends=sends,
        method=method,
    )


# ---------------------------------------------------------------------------- registry

Scheduler = Callable[[Placement, np.ndarray, Optional[np.ndarray], Optional[Schedule]], Schedule]
SCHEDULERS: dict[str, Scheduler] = {}


def register_scheduler(name: str) -> Callable[[Scheduler], Scheduler]:
    """Decorator: make ``fn(placement, loads_E, loads_RE or None, prev) -> Schedule`` available
    as ``solve_schedule(..., method=name)``; inputs arrive validated (int64)."""

    def wrap(fn: Scheduler) -> Scheduler:
        if name in SCHEDULERS:
            raise ValueError(f"scheduler {name!r} is already registered")
        SCHEDULERS[name] = fn
        return fn

    return wrap


def solve_schedule(
    placement: Placement,
    loads: np.ndarray,
    *,
    method: str = "flow",
    prev: Optional[Schedule] = None,
) -> Schedule:
    """Schedule one micro-batch's tokens onto the expert replicas of ``placement``.

    loads   int [E] tokens per expert, or int [R, E] tokens per (source GPU, expert), R = G.
    method  a name in ``SCHEDULERS``: "flow" (exact combinatorial solver, the default) or
            "highs" (LP reference).
    prev    the previous micro-batch's schedule on the same placement (used by "flow"): its
            critical GPU set seeds the lower bound. (Its proportions are deliberately not
            reused as a starting plan: an even split, which spreads every expert over all its
            replicas, leaves more residual paths and routed faster in measurements.)

    Returns a :class:`Schedule` whose makespan is ``ceil(LP optimum)``. With [R, E] loads the
    plan also minimises the tokens computed away from their source GPU among all plans of
    that makespan, and ``sends`` says which source sends what where. Raises ValueError on
    loads of the wrong shape, negative or non-integer loads, an unknown method, or a ``prev``
    for another shape.
    """
    if method not in SCHEDULERS:
        raise ValueError(f"unknown method {method!r}; choose from {tuple(SCHEDULERS)}")
    loads_E, loads_RE = _validated(placement, loads)
    if prev is not None:
        if not isinstance(prev, Schedule):
            raise TypeError(f"prev must be a Schedule, got {type(prev).__name__}")
        E, G = placement.num_experts, placement.num_gpus
        if prev.x_EG.shape != (E, G):
            raise ValueError(
                f"prev schedule is for {prev.x_EG.shape} experts x GPUs, not ({E}, {G})"
            )
    return SCHEDULERS[method](placement, loads_E, loads_RE, prev)


# -------------------------------------------------------------------------- schedulers


@register_scheduler("highs")
def highs_scheduler(
    placement: Placement,
    loads_E: np.ndarray,
    loads_RE: Optional[np.ndarray],
    prev: Optional[Schedule],
) -> Schedule:
    """The reference: both LPs in HiGHS (:func:`moebal.schedule.highs.highs_optimal_plan`)."""
    lower, _ = simple_bound(placement.slots, loads_E, placement.num_gpus)
    x_N, critical_G = highs_optimal_plan(placement, loads_E, loads_RE)
    makespan = int(gpu_loads(placement.slots, x_N, placement.num_gpus).max(initial=0))
    return _schedule(placement, x_N, makespan, lower, critical_G, loads_RE, "highs")


@register_scheduler("flow")
def flow_scheduler(
    placement: Placement,
    loads_E: np.ndarray,
    loads_RE: Optional[np.ndarray],
    prev: Optional[Schedule],
) -> Schedule:
    """The exact combinatorial solver: bounds, routing under the target, then locality."""
    idx = placement.slots
    E, G = placement.num_experts, placement.num_gpus
    lower, cert_G = simple_bound(idx, loads_E, G)
    T = lower
    if prev is not None and prev.critical_gpus:
        mask = np.zeros(G, dtype=bool)
        mask[list(prev.critical_gpus)] = True
        T_prev = ceil_div(covered_load(idx, loads_E, mask), int(mask.sum()))
        if T_prev > T:
            T, cert_G = T_prev, mask
    x_N = even_plan(idx, loads_E)
    T_pre, pre_G = prefix_bound(idx, loads_E, gpu_loads(idx, x_N, G), G)
    if T_pre > T:
        T, cert_G = T_pre, pre_G
    x_N, T, cert_G = min_makespan(idx, loads_E, x_N, T, cert_G, E, G)
    if loads_RE is not None and T > 0:
        local = local_first_plan(placement, loads_RE, T, cert_G)
        if local is not None:
            x_N = local
        elif int(loads_E.sum()) <= INT32_MAX:
            x_N = min_moved_plan(placement, loads_RE, T)
        else:  # beyond the int32 max-flow: the reference LP does the min-cost step
            x_N = highs_plan_lp(placement, loads_E, T, loads_RE)
    critical_G = tuple(np.flatnonzero(cert_G).tolist())
    return _schedule(placement, x_N, T, lower, critical_G, loads_RE, "flow")


METHODS = tuple(SCHEDULERS)


# ------------------------------------------------------------------------------ values


def lp_optimum(placement: Placement, loads_E: np.ndarray) -> Fraction:
    """The exact (unrounded) LP optimum = the worst subset density, as a Fraction.

    loads_E: int [E] (or [R, E], summed over sources).

    Dinkelbach iteration on rationals: at T = p/q the loads are scaled by q so the
    feasibility test stays integral; an infeasible T yields a GPU set of density > T, which
    becomes the next T; a feasible T is the density of a set, hence the optimum.
    """
    loads_E, _ = _validated(placement, loads_E)
    idx = placement.slots
    E, G = placement.num_experts, placement.num_gpus
    total = int(loads_E.sum())
    value = max(
        Fraction(total, G),
        max(Fraction(int(a), int(r)) for a, r in zip(loads_E, idx.replicas_E)),
    )
    while True:
        p, q = value.numerator, value.denominator
        scaled_E = loads_E * q
        if int(scaled_E.sum()) >= MAX_TOTAL:
            raise ValueError("lp_optimum: loads too large for exact rational search")
        x_N, stuck_G = route(idx, even_plan(idx, scaled_E), p, E, G)
        if stuck_G is None:
            return value
        new = Fraction(covered_load(idx, loads_E, stuck_G), int(stuck_G.sum()))
        if new <= value:  # impossible by the max-flow min-cut theorem
            raise RuntimeError(f"no progress at {value}")
        value = new


def even_split_makespan(placement: Placement, loads_E: np.ndarray) -> int:
    """Makespan without scheduling: every expert's tokens split evenly over its replicas."""
    loads_E, _ = _validated(placement, loads_E)
    idx = placement.slots
    return int(gpu_loads(idx, even_plan(idx, loads_E), placement.num_gpus).max(initial=0))
