"""Locality: among plans of optimal makespan, the one sending the fewest tokens off their source.

With loads per (source GPU, expert), ``loads_RE`` [R = G, E], a token computed on the GPU it
was routed from costs nothing; any other is sent. :func:`local_first_plan` tries the plan
that moves only the tokens that must move; :func:`min_moved_plan` solves the min-cost flow
at the fixed makespan exactly; :func:`split_sends` says which source sends what where.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy.sparse import csr_array
from scipy.sparse.csgraph import dijkstra, maximum_flow

from moebal.schedule.bounds import even_plan, gpu_loads
from moebal.schedule.flow import INT32_MAX, excl_cumsum, route
from moebal.schedule.placement import Placement


def local_first_plan(
    placement: Placement, loads_RE: np.ndarray, T: int, cert_G: np.ndarray
) -> Optional[np.ndarray]:
    """x_N of makespan <= T keeping every token computable at its source there, or None.

    Every GPU keeps the tokens it routed to experts it holds; the other tokens (whose source
    holds no replica of their expert, so they move in any plan) are routed under the room
    that is left. When that succeeds the plan moves only tokens that must move: optimal.
    Quick refusal: the critical set ``cert_G`` must have room, beyond the experts living
    inside it, for the local tokens its GPUs keep of experts reaching outside it.
    """
    idx = placement.slots
    E, G = placement.num_experts, placement.num_gpus
    local_N = loads_RE[idx.gpu_N, idx.expert_N]
    room_G = T - gpu_loads(idx, local_N, G)
    if (room_G < 0).any():
        return None
    inside_E = np.logical_and.reduceat(cert_G[idx.gpu_N], idx.start_E)
    slack = T * int(cert_G.sum()) - int(loads_RE.sum(0)[inside_E].sum())
    if int(local_N[cert_G[idx.gpu_N] & ~inside_E[idx.expert_N]].sum()) > slack:
        return None
    rest_E = loads_RE.sum(0) - np.add.reduceat(local_N, idx.start_E)
    x_N, stuck_G = route(idx, even_plan(idx, rest_E), room_G, E, G)
    return None if stuck_G is not None else local_N + x_N


@dataclass(frozen=True)
class _ResidualLayout:
    """Every possible residual entry of source -> experts -> GPUs -> sink, in CSR order.

    Nodes: experts 0..E-1, GPUs E..E+G-1, source E+G, sink E+G+1. ``rows``/``cols`` [M] are
    sorted row-major; ``pos_*`` give where each arc's forward (f) and backward (b) entry sits:
    source->expert (se, [E]), expert->GPU (slot, [N]), GPU->sink (gt, [G]).
    """

    n: int
    rows: np.ndarray
    cols: np.ndarray
    pos_fse: np.ndarray
    pos_bse: np.ndarray
    pos_fslot: np.ndarray
    pos_bslot: np.ndarray
    pos_fgt: np.ndarray
    pos_bgt: np.ndarray


def _build_residual_layout(placement: Placement) -> _ResidualLayout:
    idx = placement.slots
    E, G = placement.num_experts, placement.num_gpus
    N = len(idx.expert_N)
    src, snk, n = E + G, E + G + 1, E + G + 2
    ar_E, ar_G = np.arange(E), np.arange(G)
    parts = [  # (rows, cols) of: f se, b se, f slot, b slot, f gt, b gt
        (np.full(E, src), ar_E),
        (ar_E, np.full(E, src)),
        (idx.expert_N, E + idx.gpu_N),
        (E + idx.gpu_N, idx.expert_N),
        (E + ar_G, np.full(G, snk)),
        (np.full(G, snk), E + ar_G),
    ]
    rows = np.concatenate([r for r, _ in parts])
    cols = np.concatenate([c for _, c in parts])
    order = np.argsort(rows * n + cols, kind="stable")
    where = np.empty_like(order)
    where[order] = np.arange(len(order))
    cuts = np.cumsum([0, E, E, N, N, G, G])
    pos = [where[cuts[i] : cuts[i + 1]] for i in range(6)]
    return _ResidualLayout(n, rows[order], cols[order], *pos)


def min_moved_plan(
    placement: Placement, loads_RE: np.ndarray, T: int
) -> np.ndarray:
    """x_N of makespan <= T that keeps the most tokens on their source GPU (exact).

    Min-cost flow on source -> expert e (load_e) -> GPU g in G_e -> sink (cap T), where the
    arc e -> g costs 0 for its first ``loads_RE[g, e]`` tokens (kept local) and 1 beyond (a
    convex cost, handled as two segments of one arc). Primal-dual: starting from every GPU
    keeping its local tokens (at most T, expert order), each phase computes reduced-cost
    distances (Dijkstra), raises the potentials and pushes a maximum flow through the
    zero-reduced-cost residual entries, so the flow stays of minimum cost for its value; the
    phases end when every token flows.
    """
    idx = placement.slots
    E, G = placement.num_experts, placement.num_gpus
    se, sg = idx.expert_N, idx.gpu_N
    lay = placement.derived("residual layout", _build_residual_layout)
    n, rows, cols = lay.n, lay.rows, lay.cols
    src, snk = E + G, E + G + 1
    loads_E = loads_RE.sum(0)
    total = int(loads_E.sum())
    local_N = loads_RE[sg, se]
    # start: every GPU keeps its local tokens in expert order, at most T of them
    order = idx.by_gpu_N
    f_N = np.zeros(len(se), dtype=np.int64)
    f_N[order] = np.minimum(
        np.maximum(T - excl_cumsum(local_N[order], sg[order]), 0), local_N[order]
    )
    f_E = np.add.reduceat(f_N, idx.start_E)
    f_G = gpu_loads(idx, f_N, G)
    value = int(f_E.sum())
    pot = np.zeros(n, dtype=np.int64)
    M = len(rows)
    cap = np.empty(M, dtype=np.int64)
    cost = np.zeros(M, dtype=np.int64)
    big_N = loads_E[se]
    scale = n + 1
    key_fse = src * n + np.arange(E)
    key_fslot = se * n + E + sg
    key_fgt = (E + np.arange(G)) * n + snk
    while value < total:
        cap[lay.pos_fse] = loads_E - f_E
        cap[lay.pos_bse] = f_E
        under = f_N < local_N
        cap[lay.pos_fslot] = np.where(under, local_N - f_N, big_N)
        cost[lay.pos_fslot] = ~under
        over = f_N > local_N
        cap[lay.pos_bslot] = np.where(over, f_N - local_N, f_N)
        cost[lay.pos_bslot] = -over.astype(np.int64)
        cap[lay.pos_fgt] = T - f_G
        cap[lay.pos_bgt] = f_G
        rc = cost + pot[rows] - pot[cols]
        avail = cap > 0
        indptr = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(np.bincount(rows[avail], minlength=n), out=indptr[1:])
        weights = csr_array(
            ((rc[avail] * scale + 1).astype(np.float64), cols[avail].astype(np.int32), indptr),
            shape=(n, n),
        )
        dist = dijkstra(weights, indices=src)
        if not np.isfinite(dist[snk]):
            raise RuntimeError(f"min-cost flow stuck at {value} of {total} tokens")
        reach = np.isfinite(dist)
        d = np.where(reach, dist, 0).astype(np.int64) // scale
        d = np.where(reach, np.minimum(d, d[snk]), d[snk])
        pot += d
        adm = avail & (rc + d[rows] - d[cols] == 0)
        indptr = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(np.bincount(rows[adm], minlength=n), out=indptr[1:])
        adm_cap = np.minimum(cap[adm], INT32_MAX).astype(np.int32)
        graph = csr_array((adm_cap, cols[adm].astype(np.int32), indptr), shape=(n, n))
        res = maximum_flow(graph, src, snk, method="dinic")
        if res.flow_value <= 0:
            raise RuntimeError(f"min-cost flow made no progress at {value} of {total} tokens")
        flow = res.flow
        key_F = np.repeat(np.arange(n, dtype=np.int64), np.diff(flow.indptr)) * n + flow.indices
        for key, arr in ((key_fse, f_E), (key_fslot, f_N), (key_fgt, f_G)):
            at = np.minimum(np.searchsorted(key_F, key), len(key_F) - 1)
            arr += np.where(key_F[at] == key, flow.data[at], 0)
        value += int(res.flow_value)
    return f_N


def split_sends(
    placement: Placement, x_N: np.ndarray, loads_RE: np.ndarray
) -> tuple[np.ndarray, int]:
    """Which source sends how many tokens of which expert to which GPU.

    Each GPU first keeps its own tokens of an expert it computes (min(x[e, g], loads_RE[g, e])),
    which is the most any split of this plan can keep; the rest of every expert is matched
    source-by-source (ascending) to GPU-by-GPU (ascending). Returns (sends [N, 4] with rows
    (source, expert, gpu, tokens) sorted by (expert, source, gpu), tokens moved).
    """
    idx = placement.slots
    E, G = placement.num_experts, placement.num_gpus
    se, sg = idx.expert_N, idx.gpu_N
    keep_N = np.minimum(x_N, loads_RE[sg, se])
    need_N = x_N - keep_N  # tokens GPU g still receives for e
    supply = loads_RE.T.flatten()  # [E * G] row-major by (expert, source): always a copy
    supply[idx.key_N] -= keep_N  # tokens source s still sends for e
    # north-west corner over all experts at once: the cumulative supply (by expert, source)
    # and demand (by expert, gpu) agree at every expert boundary, so the merged breakpoints
    # cut them into (source, gpu) pieces; zero entries repeat a breakpoint and drop out
    keys = np.concatenate([np.cumsum(supply) * 2, np.cumsum(need_N) * 2 + 1])
    keys.sort(kind="stable")  # two sorted runs: a linear merge
    is_s = (keys & 1) == 0
    ends = keys >> 1
    first = np.empty(len(keys), dtype=bool)
    first[:1] = True
    np.not_equal(ends[1:], ends[:-1], out=first[1:])
    s_before = np.cumsum(is_s) - is_s  # supply pieces ending strictly before
    s_at = s_before[first]  # = expert * G + source
    d_at = (np.arange(len(keys)) - s_before)[first]  # slot id
    cuts = ends[first]
    src = s_at % G
    exp = s_at // G
    dst = sg[d_at]
    amt = np.diff(cuts, prepend=0)
    if len(amt) and amt[0] == 0:  # the breakpoint 0 of leading zero entries
        src, exp, dst, amt = src[1:], exp[1:], dst[1:], amt[1:]
    # merge in the tokens kept local; both lists are sorted by (expert, source, gpu)
    kept = np.flatnonzero(keep_N)
    k_exp, k_gpu = se[kept], sg[kept]
    at = np.searchsorted((exp * G + src) * G + dst, (k_exp * G + k_gpu) * G + k_gpu)
    sends = np.empty((len(amt) + len(kept), 4), dtype=np.int64)
    sends[:, 0] = np.insert(src, at, k_gpu)
    sends[:, 1] = np.insert(exp, at, k_exp)
    sends[:, 2] = np.insert(dst, at, k_gpu)
    sends[:, 3] = np.insert(amt, at, keep_N[kept])
    return sends, int(need_N.sum())
