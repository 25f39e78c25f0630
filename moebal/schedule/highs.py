"""The reference path: the scheduling LPs in HiGHS (``solve_schedule(..., method="highs")``).

Stage 1, ``highs_makespan_lp``: ``min T`` s.t. ``sum_g x[e, g] = load_e``, ``sum_e x[e, g] <= T``
over the replica slots: the LP optimum (a float) and the GPU rows' duals.
Stage 2, ``highs_plan_lp``: at the integer capacity ``T = ceil(optimum)``, a transportation LP
solved by simplex, whose vertices are integral (network matrix, integer data); with per-source
loads it minimises the tokens computed away from their source GPU. ``highs_optimal_plan``
runs both and adds a certificate. Model building is part of every call, as it is for the
flow solver.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from typing import Optional

import highspy
import numpy as np

from moebal.schedule.bounds import ceil_div, covered_load
from moebal.schedule.placement import Placement


_started = False


def _first_highs() -> highspy.Highs:
    """The process's first ``Highs()``, its banner sent to stderr instead of stdout.

    HiGHS prints a banner when the first instance is built, before any option can silence
    it; on stdout it would corrupt ``--json`` output. File descriptor 1 points at stderr for
    that one construction (C stdio flushed before it is restored).
    """
    sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no stdout or stderr to redirect: nothing to protect
        return highspy.Highs()
    try:
        h = highspy.Highs()
        try:
            ctypes.CDLL(None).fflush(None)
        except (OSError, AttributeError, TypeError):  # no C library handle on this platform
            pass
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    return h


def _highs() -> highspy.Highs:
    global _started
    h = highspy.Highs() if _started else _first_highs()
    _started = True
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
    idx = placement.slots
    E = placement.num_experts
    N = len(idx.expert_N)
    rows = np.empty(2 * N, dtype=np.int32)
    rows[0::2] = idx.expert_N
    rows[1::2] = E + idx.gpu_N
    return np.tile(rows, copies), np.arange(0, 2 * N * copies + 1, 2, dtype=np.int32)


def highs_makespan_lp(placement: Placement, loads_E: np.ndarray) -> tuple[float, np.ndarray]:
    """(LP optimum, |dual| of each GPU row [G]) of the makespan LP, built and solved in HiGHS."""
    E, G = placement.num_experts, placement.num_gpus
    N = len(placement.slots.expert_N)
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
    placement: Placement, loads_E: np.ndarray, T: int, loads_RE: Optional[np.ndarray] = None
) -> Optional[np.ndarray]:
    """An integral plan x_N at GPU capacity T (None if infeasible).

    With ``loads_RE`` [R = G, E]: every slot gets a local column (upper bound = the tokens its GPU
    itself routed to the expert, cost 0) and a remote column (cost 1); the optimum minimises
    tokens moved.
    """
    idx = placement.slots
    E, G = placement.num_experts, placement.num_gpus
    N = len(idx.expert_N)
    copies = 1 if loads_RE is None else 2
    index, start = _slot_columns(placement, copies)
    value = np.ones(2 * N * copies)
    if loads_RE is None:
        cost = np.zeros(N)
        upper = np.full(N, highspy.kHighsInf)
    else:
        cost = np.concatenate([np.zeros(N), np.ones(N)])
        local_N = np.asarray(loads_RE)[idx.gpu_N, idx.expert_N].astype(np.float64)
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
    return x if loads_RE is None else x[:N] + x[N:]


def highs_optimal_plan(
    placement: Placement, loads_E: np.ndarray, loads_RE: Optional[np.ndarray] = None
) -> tuple[np.ndarray, tuple[int, ...]]:
    """(x_N, critical GPUs): the reference plan of makespan ``ceil(LP optimum)`` and a GPU set
    certifying it, from validated int64 loads (``loads_RE`` [R = G, E] adds the locality
    objective). The certificate is the best level set of the GPU rows' duals (a densest set
    is one of them).
    """
    idx = placement.slots
    G = placement.num_gpus
    optimum, duals_G = highs_makespan_lp(placement, loads_E)
    T = max(0, math.ceil(optimum - 1e-6))
    x_N = highs_plan_lp(placement, loads_E, T, loads_RE)
    while x_N is None:  # the float optimum was a hair low
        T += 1
        x_N = highs_plan_lp(placement, loads_E, T, loads_RE)
    order = np.lexsort((np.arange(G), -duals_G))
    best, best_k = -1, G
    for k in range(1, G + 1):
        mask = np.zeros(G, dtype=bool)
        mask[order[:k]] = True
        value = ceil_div(covered_load(idx, loads_E, mask), k)
        if value > best:
            best, best_k = value, k
    return x_N, tuple(sorted(int(g) for g in order[:best_k]))
