"""Routing tokens under a GPU capacity, and the exact minimum makespan (combinatorial).

A plan is a slot vector ``x_N`` (see :class:`moebal.schedule.placement.SlotIndex`); a GPU's
load is the sum over its slots. :func:`route` moves tokens along residual paths (GPU g ->
expert e when x[e, g] > 0, expert e -> any holder of e) until no GPU exceeds a capacity, or
returns the GPUs that cannot reach one below it: a closed set whose density exceeds the
capacity. :func:`min_makespan` raises the capacity to that set's rounded-up density until
routing succeeds (a Newton/Dinkelbach iteration on the subset densities), so the plan it
returns meets a lower bound and is optimal.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy.sparse import csr_array
from scipy.sparse.csgraph import maximum_flow

from moebal.schedule.bounds import ceil_div, covered_load, gpu_loads, prefix_bound
from moebal.schedule.placement import SlotIndex

_INF = np.int64(1 << 40)
INT32_MAX = 2**31 - 1  # scipy's max flow works on int32 capacities


def _distance_to_under(
    idx: SlotIndex, x_N: np.ndarray, excess_G: np.ndarray, G: int
) -> np.ndarray:
    """dist_G: residual hops from each GPU to a GPU below the target (_INF: none).

    Residual arcs: GPU g -> expert e when x[e, g] > 0 (tokens of e can leave g), expert e ->
    any holder of e. Breadth-first from the GPUs with excess < 0, stopping once every GPU
    with positive excess is labelled.
    """
    dist_G = np.full(G, _INF, dtype=np.int64)
    frontier_G = excess_G < 0
    dist_G[frontier_G] = 0
    need_G = excess_G > 0
    pos_N = x_N > 0
    level = 0
    while True:
        reach_E = np.logical_or.reduceat(frontier_G[idx.gpu_N], idx.start_E)
        new_G = np.zeros(G, dtype=bool)
        new_G[idx.gpu_N[reach_E[idx.expert_N] & pos_N]] = True
        new_G &= dist_G == _INF
        if not new_G.any():
            return dist_G
        level += 1
        dist_G[new_G] = level
        frontier_G = new_G
        if not (need_G & (dist_G == _INF)).any():
            return dist_G


def excl_cumsum(v: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Exclusive cumulative sum of ``v`` within runs of equal (sorted) ``group``."""
    c = np.cumsum(v)
    first = np.empty(len(v), dtype=bool)
    first[:1] = True
    np.not_equal(group[1:], group[:-1], out=first[1:])
    base = np.maximum.accumulate(np.where(first, c - v, 0))
    return c - v - base


def _push_sweep(
    idx: SlotIndex, x_N: np.ndarray, cap: object, dist_G: np.ndarray, G: int, passes: int = 2
) -> np.ndarray:
    """Move excess down the distance labels, level by level, to GPUs below capacity.

    ``cap``: the GPU capacity, an int or int64 [G]. At level d, every GPU above capacity
    offers its excess over its slots (expert order) whose expert has a holder at level d-1;
    each such expert sends to its holder at level d-1 with the most room (for d = 1 the room
    below capacity; deeper, the tokens it could pass on), and no holder receives more than its
    room. Always keeps a valid plan (conservation, holders only).
    """
    se, sg = idx.expert_N, idx.gpu_N
    N = len(se)
    x_N = x_N.copy()
    sd_N = dist_G[sg]
    dist_E = np.minimum.reduceat(sd_N, idx.start_E)
    excess_G = gpu_loads(idx, x_N, G) - cap
    top = int(dist_G[excess_G > 0].max(initial=0))
    for d in range(top, 0, -1):
        at_d_N = sd_N == d
        below_N = sd_N == d - 1
        onward_N = below_N & (dist_E[se] == d - 2) if d > 1 else None
        for _ in range(passes):
            if d == 1:
                room_G = np.maximum(-excess_G, 0)
            else:
                el = onward_N & (x_N > 0)
                room_G = np.maximum(
                    np.bincount(sg[el], weights=x_N[el], minlength=G).astype(np.int64)
                    - np.maximum(excess_G, 0),
                    0,
                )
            room_G[dist_G != d - 1] = 0
            key_N = np.where(below_N, room_G[sg] * G + (G - 1 - sg), -1)
            best_E = np.maximum.reduceat(key_N, idx.start_E)
            elig_N = at_d_N & (excess_G[sg] > 0) & (best_E[se] >= G) & (x_N > 0)
            if not elig_N.any():
                break
            ids = idx.by_gpu_N[elig_N[idx.by_gpu_N]]
            xs, gs = x_N[ids], sg[ids]
            amount = np.minimum(np.maximum(excess_G[gs] - excl_cumsum(xs, gs), 0), xs)
            h = G - 1 - best_E[se[ids]] % G
            o = np.argsort(h, kind="stable")
            ho, ao = h[o], amount[o]
            amount[o] = np.minimum(np.maximum(room_G[ho] - excl_cumsum(ao, ho), 0), ao)
            if not amount.any():
                break
            target = np.searchsorted(idx.key_N, se[ids] * G + h)
            x_N[ids] -= amount
            x_N += np.bincount(target, weights=amount, minlength=N).astype(np.int64)
            moved_G = np.bincount(gs, weights=amount, minlength=G).astype(np.int64)
            excess_G = excess_G - moved_G + np.bincount(h, weights=amount, minlength=G).astype(
                np.int64
            )
    return x_N


def _residual_max_flow(
    idx: SlotIndex, x_N: np.ndarray, excess_G: np.ndarray, E: int, G: int
) -> np.ndarray:
    """Route as much excess as possible to GPUs below target with one exact max flow.

    Network: source -> GPU g above target (its excess); GPU g -> expert e (x[e, g]); expert
    e -> any holder (unbounded); GPU h below target -> sink (its room). Returns the new plan.
    """
    se, sg = idx.expert_N, idx.gpu_N
    N = len(se)
    over = np.flatnonzero(excess_G > 0)
    under_G = excess_G < 0
    # CSR rows, built in order: experts (arcs to every holder), GPUs (arcs to the experts
    # they hold tokens of, then to the sink when below target), source (arcs to GPUs above)
    ids = idx.by_gpu_N[x_N[idx.by_gpu_N] > 0]  # slots with tokens, by (GPU, expert)
    gs = sg[ids]
    per_G = np.bincount(gs, minlength=G)
    row_G = per_G + under_G
    start_G = np.cumsum(row_G) - row_G
    rank = np.arange(len(ids)) - (np.cumsum(per_G) - per_G)[gs]
    gpu_idx = np.empty(int(row_G.sum()), dtype=np.int32)
    gpu_cap = np.empty(len(gpu_idx), dtype=np.int64)
    gpu_idx[start_G[gs] + rank] = se[ids]
    gpu_cap[start_G[gs] + rank] = x_N[ids]
    sink_at = (start_G + per_G)[under_G]
    gpu_idx[sink_at] = E + G + 1
    gpu_cap[sink_at] = -excess_G[under_G]
    end = N + len(gpu_idx) + len(over)
    indptr = np.concatenate(
        [idx.start_E, N + np.cumsum(np.concatenate([[0], row_G])), [end, end]]
    ).astype(np.int32)
    big = int(excess_G[over].sum())
    indices = np.concatenate([E + sg, gpu_idx, E + over]).astype(np.int32)
    data = np.concatenate([np.full(N, big), gpu_cap, excess_G[over]]).astype(np.int32)
    graph = csr_array((data, indices, indptr), shape=(E + G + 2, E + G + 2))
    flow = maximum_flow(graph, E + G, E + G + 1, method="dinic").flow
    # expert rows hold exactly the expert -> holder entries, in slot order: the net flows
    return x_N + flow.data[:N]


def route(
    idx: SlotIndex, x_N: np.ndarray, cap: object, E: int, G: int, push_rounds: int = 1
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Move tokens until no GPU exceeds ``cap`` (int or int64 [G]), or prove it impossible.

    Returns (plan, None) on success, else (plan, stuck_G): the GPUs that cannot reach a GPU
    below capacity in the residual graph; they hold a GPU above capacity and every expert with
    tokens on them has all its replicas among them, so they carry more than their capacity.
    Pushes are tried first only with slack (capacity >= 1.25 x load); near a perfect fit the
    exact residual max flow is cheaper than the several push sweeps it would take.
    """
    total = int(x_N.sum())
    use_scipy = total <= INT32_MAX
    slack = 4 * int(np.sum(np.broadcast_to(cap, (G,)))) >= 5 * total
    rounds, flowed = 0, False
    while True:
        excess_G = gpu_loads(idx, x_N, G) - cap
        if excess_G.max(initial=0) <= 0:
            return x_N, None
        if use_scipy and not flowed and not (rounds < push_rounds and slack):
            # straight to the exact max flow; what it cannot route is then certified stuck
            x_N = _residual_max_flow(idx, x_N, excess_G, E, G)
            flowed = True
            continue
        dist_G = _distance_to_under(idx, x_N, excess_G, G)
        if ((excess_G > 0) & (dist_G == _INF)).any():
            return x_N, dist_G == _INF
        x_N = _push_sweep(idx, x_N, cap, dist_G, G)
        rounds += 1


def min_makespan(
    idx: SlotIndex,
    loads_E: np.ndarray,
    x_N: np.ndarray,
    T: int,
    cert_G: np.ndarray,
    E: int,
    G: int,
) -> tuple[np.ndarray, int, np.ndarray]:
    """From a valid plan and a certified lower bound T, the optimal plan and makespan.

    Invariant: ``T == ceil(density(cert_G))``, so T is a lower bound. Each time the plan
    cannot be routed under T, the stuck GPU set has density > T and T becomes its rounded-up
    density (or a better prefix bound). Returns (x_N, T, cert_G) with max load == T.
    """
    while True:
        x_N, stuck_G = route(idx, x_N, T, E, G)
        if stuck_G is None:
            return x_N, T, cert_G
        T_new = ceil_div(covered_load(idx, loads_E, stuck_G), int(stuck_G.sum()))
        cert_new = stuck_G
        T_pre, pre_G = prefix_bound(idx, loads_E, gpu_loads(idx, x_N, G), G)
        if T_pre > T_new:
            T_new, cert_new = T_pre, pre_G
        if T_new <= T:  # impossible by the max-flow min-cut theorem
            raise RuntimeError(f"no progress at makespan {T}")
        T, cert_G = T_new, cert_new
