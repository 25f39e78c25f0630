"""The reference path: the scheduling LPs in HiGHS (``solve_schedule(..., method="highs")``).

Stage 1, ``highs_makespan_lp``: ``min T`` s.t. ``sum_g x[e, g] = load_e``, ``sum_e x[e, g] <= T``
over the replica slots: the LP optimum (a float) and the GPU rows' duals.
Stage 2, ``highs_plan_lp``: at the integer capacity ``T = ceil(optimum)``, a transportation LP
solved by simplex, whose vertices are integral (network matrix, integer data); with per-source
loads it minimises the tokens computed away from their source GPU. Model building is part of
every call, as it is for the flow solver.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import highspy
import numpy as np

from moebal.schedule.placement import Placement

if TYPE_CHECKING:  # pragma: no cover
    from moebal.schedule.solve import Schedule


def _highs() -> highspy.Highs:
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("solver", "simplex")
    h.setOptionValue("random_seed", 0)
    # No "threads" option: HiGHS keeps one thread scheduler per process and refuses a model
    # whose thread count differs from the one it started with (whoever started it first).
    # The default follows the running scheduler, and simplex on an LP is serial anyway.
    return h


def _solve(
    num_rows: int,
    col_cost: np.ndarray,
    col_upper: np.ndarray,
    start: np.ndarray,
    index: np.ndarray,
    value: np.ndarray,
    row_lower: np.ndarray,
    row_upper: np.ndarray,
) -> Optional[highspy.Highs]:
    lp = highspy.HighsLp()
    lp.num_col_ = len(col_cost)
    lp.num_row_ = num_rows
    lp.col_cost_ = col_cost
    lp.col_lower_ = np.zeros(len(col_cost))
    lp.col_upper_ = col_upper
    lp.row_lower_ = row_lower
    lp.row_upper_ = row_upper
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = start
    lp.a_matrix_.index_ = index
    lp.a_matrix_.value_ = value
    h = _highs()
    h.passModel(lp)
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return None
    return h


def _slot_columns(placement: Placement, copies: int) -> tuple[np.ndarray, np.ndarray]:
    """Column starts and row indices for ``copies`` blocks of slot columns (expert row, GPU row)."""
    idx = placement._index
    E = placement.num_experts
    N = len(idx.expert_N)
    rows = np.empty(2 * N, dtype=np.int32)
    rows[0::2] = idx.expert_N
    rows[1::2] = E + idx.gpu_N
    return np.tile(rows, copies), np.arange(0, 2 * N * copies + 1, 2, dtype=np.int32)


def highs_makespan_lp(placement: Placement, loads_E: np.ndarray) -> tuple[float, np.ndarray]:
    """(LP optimum, |dual| of each GPU row [G]) of the makespan LP, built and solved in HiGHS."""
    E, G = placement.num_experts, placement.num_gpus
    N = len(placement._index.expert_N)
    index, start = _slot_columns(placement, 1)
    index = np.concatenate([index, E + np.arange(G, dtype=np.int32)])
    start = np.concatenate([start, [2 * N + G]]).astype(np.int32)
    value = np.concatenate([np.ones(2 * N), -np.ones(G)])
    cost = np.zeros(N + 1)
    cost[-1] = 1.0
    loads = np.asarray(loads_E, dtype=np.float64)
    h = _solve(
        E + G,
        cost,
        np.full(N + 1, highspy.kHighsInf),
        start,
        index,
        value,
        np.concatenate([loads, np.full(G, -highspy.kHighsInf)]),
        np.concatenate([loads, np.zeros(G)]),
    )
    if h is None:
        raise RuntimeError("HiGHS did not solve the makespan LP")
    duals = np.abs(np.asarray(h.getSolution().row_dual)[E:])
    return float(h.getInfo().objective_function_value), duals


def highs_plan_lp(
    placement: Placement, loads_E: np.ndarray, T: int, loads_SE: Optional[np.ndarray] = None
) -> Optional[np.ndarray]:
    """An integral plan x_N at GPU capacity T (None if infeasible).

    With ``loads_SE`` [G, E]: every slot gets a local column (upper bound = the tokens its GPU
    itself routed to the expert, cost 0) and a remote column (cost 1); the optimum minimises
    tokens moved.
    """
    idx = placement._index
    E, G = placement.num_experts, placement.num_gpus
    N = len(idx.expert_N)
    copies = 1 if loads_SE is None else 2
    index, start = _slot_columns(placement, copies)
    value = np.ones(2 * N * copies)
    if loads_SE is None:
        cost = np.zeros(N)
        upper = np.full(N, highspy.kHighsInf)
    else:
        cost = np.concatenate([np.zeros(N), np.ones(N)])
        local_N = np.asarray(loads_SE)[idx.gpu_N, idx.expert_N].astype(np.float64)
        upper = np.concatenate([local_N, np.full(N, highspy.kHighsInf)])
    loads = np.asarray(loads_E, dtype=np.float64)
    h = _solve(
        E + G,
        cost,
        upper,
        start,
        index,
        value,
        np.concatenate([loads, np.full(G, -highspy.kHighsInf)]),
        np.concatenate([loads, np.full(G, float(T))]),
    )
    if h is None:
        return None
    sol = np.asarray(h.getSolution().col_value)
    x = np.rint(sol)
    if np.abs(sol - x).max(initial=0.0) > 1e-6:
        raise RuntimeError("HiGHS returned a fractional vertex for a transportation LP")
    x = x.astype(np.int64)
    return x if loads_SE is None else x[:N] + x[N:]


def highs_schedule(
    placement: Placement, loads_E: np.ndarray, loads_SE: Optional[np.ndarray]
) -> "Schedule":
    """The full reference schedule (see the module docstring); validated inputs."""
    from moebal.schedule.solve import (
        Schedule,
        _ceil_div,
        _covered_load,
        _simple_bound,
        _split_sends,
        _to_dense,
    )

    idx = placement._index
    G = placement.num_gpus
    lower, _ = _simple_bound(idx, loads_E, G)
    optimum, duals_G = highs_makespan_lp(placement, loads_E)
    T = max(0, math.ceil(optimum - 1e-6))
    x_N = highs_plan_lp(placement, loads_E, T, loads_SE)
    while x_N is None:  # the float optimum was a hair low
        T += 1
        x_N = highs_plan_lp(placement, loads_E, T, loads_SE)
    # certificate: the best level set of the GPU duals (a densest set is one of them)
    order = np.lexsort((np.arange(G), -duals_G))
    best, best_k = -1, G
    for k in range(1, G + 1):
        mask = np.zeros(G, dtype=bool)
        mask[order[:k]] = True
        value = _ceil_div(_covered_load(idx, loads_E, mask), k)
        if value > best:
            best, best_k = value, k
    tokens_moved = sends = None
    if loads_SE is not None:
        sends, tokens_moved = _split_sends(placement, x_N, loads_SE)
    return Schedule(
        x_EG=_to_dense(placement, x_N),
        makespan=int(np.bincount(idx.gpu_N, weights=x_N, minlength=G).max(initial=0)),
        lower_bound=int(lower),
        critical_gpus=tuple(sorted(int(g) for g in order[:best_k])),
        tokens_moved=tokens_moved,
        sends=sends,
        method="highs",
    )
