"""Integer max-flow and min-cost-flow helpers over arc lists (scipy's compiled Dinic).

Graphs are given as arc arrays ``tail_A``, ``head_A``, ``cap_A`` (int64, capacities < 2^31)
on nodes ``0..n-1``. No two arcs may join the same ordered pair; an arc and its reverse may
both be present (the flow returned is then the net flow). Everything is integer arithmetic,
so results are the same on every machine for a given scipy version.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import dijkstra, maximum_flow

INT32_MAX = 2**31 - 1


def max_flow(
    n: int,
    tail_A: np.ndarray,
    head_A: np.ndarray,
    cap_A: np.ndarray,
    source: int,
    sink: int,
    query_u: np.ndarray,
    query_v: np.ndarray,
    rows_first: int = 0,
) -> tuple[int, np.ndarray]:
    """Maximum ``source -> sink`` flow; returns (value, net flow u->v at each query pair).

    ``query_u``/``query_v`` [Q]: node pairs; pairs joined by no arc get 0. Shortcut: when
    ``rows_first`` > 0 and the queries are exactly the entries of rows ``0..rows_first-1`` of
    the flow matrix in row-major order, they are read off directly.
    """
    key_A = tail_A * n + head_A
    order = np.argsort(key_A, kind="stable")
    indptr = np.searchsorted(tail_A[order], np.arange(n + 1)).astype(np.int32)
    graph = sp.csr_array(
        (cap_A[order].astype(np.int32), head_A[order].astype(np.int32), indptr), shape=(n, n)
    )
    res = maximum_flow(graph, int(source), int(sink), method="dinic")
    flow = res.flow
    if rows_first and flow.indptr[rows_first] == len(query_u):
        return int(res.flow_value), flow.data[: len(query_u)].astype(np.int64)
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(flow.indptr))
    key_F = rows * n + flow.indices  # sorted: rows ascending, indices sorted per row
    key_Q = query_u * n + query_v
    pos = np.minimum(np.searchsorted(key_F, key_Q), max(len(key_F) - 1, 0))
    if len(key_F) == 0:
        return int(res.flow_value), np.zeros(len(key_Q), dtype=np.int64)
    found = key_F[pos] == key_Q
    return int(res.flow_value), np.where(found, flow.data[pos], 0).astype(np.int64)


def min_cost_flow(
    n: int,
    tail_A: np.ndarray,
    head_A: np.ndarray,
    cap_A: np.ndarray,
    cost_A: np.ndarray,
    source: int,
    sink: int,
    flow_A: np.ndarray,
    demand: int,
) -> np.ndarray:
    """A minimum-cost ``source -> sink`` flow of value ``demand`` (primal-dual method).

    ``cost_A`` >= 0 integers. ``flow_A`` is a starting flow that must be of minimum cost for
    its value with zero potentials (e.g. a flow on zero-cost arcs only). Each phase computes
    shortest reduced-cost distances (Dijkstra), raises the potentials, and pushes a maximum
    flow through the arcs of zero reduced cost; every phase keeps the flow of minimum cost
    for its value (the successive-shortest-path invariant), and the phases stop when the value
    reaches ``demand``. Arcs must not be antiparallel. Returns the flow per arc (int64).
    Raises ValueError when ``demand`` cannot be reached.
    """
    flow_A = flow_A.astype(np.int64).copy()
    pot = np.zeros(n, dtype=np.int64)
    out_of_source = tail_A == source
    value = int(flow_A[out_of_source].sum()) - int(flow_A[head_A == source].sum())
    scale = n + 1  # weight = reduced cost * scale + 1: positive, ties broken by hops
    while value < demand:
        fwd = flow_A < cap_A
        bwd = flow_A > 0
        u = np.concatenate([tail_A[fwd], head_A[bwd]])
        v = np.concatenate([head_A[fwd], tail_A[bwd]])
        rc = np.concatenate(
            [
                cost_A[fwd] + pot[tail_A[fwd]] - pot[head_A[fwd]],
                -cost_A[bwd] + pot[head_A[bwd]] - pot[tail_A[bwd]],
            ]
        )
        key = u * n + v
        order = np.argsort(key, kind="stable")
        indptr = np.searchsorted(u[order], np.arange(n + 1)).astype(np.int32)
        weights = sp.csr_array(
            ((rc[order] * scale + 1).astype(np.float64), v[order].astype(np.int32), indptr),
            shape=(n, n),
        )
        dist = dijkstra(weights, indices=int(source))
        if not np.isfinite(dist[sink]):
            raise ValueError(f"min_cost_flow: only {value} of the demanded {demand} can flow")
        reach = np.isfinite(dist)
        d = np.where(reach, np.floor_divide(np.where(reach, dist, 0), scale), 0).astype(np.int64)
        d_sink = int(d[sink])
        d = np.where(reach, np.minimum(d, d_sink), d_sink)
        pot = pot + d
        rc_new = rc + d[u] - d[v]
        adm = rc_new == 0
        res_cap = np.concatenate([(cap_A - flow_A)[fwd], flow_A[bwd]])
        arc_u, arc_v = u[adm], v[adm]
        got, net = max_flow(
            n, arc_u, arc_v, np.minimum(res_cap[adm], INT32_MAX), source, sink, tail_A, head_A
        ) if adm.any() else (0, np.zeros_like(flow_A))
        if got == 0:
            raise ValueError(f"min_cost_flow: no progress at value {value} of {demand}")
        flow_A += net
        value += got
    return flow_A
