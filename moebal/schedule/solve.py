"""Token scheduling across GPUs: the per-micro-batch LP, solved exactly and fast.

With ``G_e`` the GPUs holding expert e and ``load_e`` the tokens routed to e, the LP is::

    minimise T   s.t.   sum_g x[e, g] = load_e   (every expert e, g in G_e)
                        sum_e x[e, g] <= T       (every GPU g),   x >= 0.

Its optimum is the worst subset density ``max_S sum_{e: G_e within S} load_e / |S|`` (the
max-flow min-cut theorem on the network source -> expert (load_e) -> GPU (unbounded, g in
G_e) -> sink (T)); because capacities are integers, an *integer* plan with makespan
``ceil(LP optimum)`` exists, and that is what :func:`solve_schedule` returns.

``method="flow"`` (default): keeps an integer plan and an integer target ``T`` that is always
``ceil(density(S))`` of a known GPU set ``S`` (hence a lower bound). It moves excess tokens
off GPUs above ``T`` along residual paths toward GPUs below ``T`` (vectorised pushes along
breadth-first distance labels, then one exact max-flow on the residual network); when some
GPU above ``T`` cannot reach any GPU below ``T``, the GPUs that cannot reach one form a set
of density > ``T`` and ``T`` is raised to its rounded-up density (a Newton/Dinkelbach step).
It stops when no GPU exceeds ``T``: the plan meets the lower bound, so it is optimal.

``method="highs"``: the reference: the LP above in HiGHS, then an integral transportation LP
at ``ceil(optimum)`` (simplex vertices of that network matrix are integral).

Locality (loads per source GPU and expert, [G, E]): among plans of optimal makespan, the one
sending the fewest tokens off their source GPU, by a min-cost flow at the fixed makespan in
which a token computed where it was routed from costs 0 and any other token costs 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Optional

import numpy as np
from scipy.sparse import csr_array
from scipy.sparse.csgraph import dijkstra, maximum_flow

from moebal.schedule.placement import Placement, _SlotIndex

_INF = np.int64(1 << 40)
_INT32_MAX = 2**31 - 1  # scipy's max flow works on int32 capacities
_MAX_TOTAL = 2**50  # token totals stay far from int64 and float64-exact limits


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
    sends           with per-source loads: int64 [N, 4] rows (source, expert, gpu, tokens),
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

    def sends_SEG(self) -> np.ndarray:
        """Dense int64 [G_source, E, G_dest] view of ``sends`` (small problems only)."""
        if self.sends is None:
            raise ValueError("this schedule was solved from per-expert loads: no sends")
        E, G = self.x_EG.shape
        out = np.zeros((G, E, G), dtype=np.int64)
        s, e, g, n = self.sends.T
        out[s, e, g] = n
        return out


# ------------------------------------------------------------------------------- inputs


def _exact_total(arr: np.ndarray) -> int:
    """The sum of integer-valued ``arr`` in Python integers (an int64 sum can wrap around)."""
    return sum(int(v) for v in arr.ravel().tolist())


def _as_loads(placement: Placement, loads: object) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(loads_E, loads_SE or None) as int64, validated."""
    if not isinstance(placement, Placement):
        raise TypeError(f"placement must be a Placement, got {type(placement).__name__}")
    E, G = placement.num_experts, placement.num_gpus
    if hasattr(loads, "detach"):  # a torch tensor
        loads = loads.detach().cpu().numpy()  # type: ignore[union-attr]
    arr = np.asarray(loads)
    if arr.shape not in ((E,), (G, E)):
        raise ValueError(
            f"loads must have shape [{E}] (per expert) or [{G}, {E}] (per source GPU and "
            f"expert) for this placement, got {arr.shape}"
        )
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"loads must be integer counts, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        ok = np.isfinite(arr) & (arr == np.floor(arr))
        if not ok.all():
            bad = np.argwhere(~ok)[0].tolist()
            raise ValueError(f"loads must be integers; loads{bad} = {arr[tuple(bad)].item()!r}")
    if (arr < 0).any():
        bad = np.argwhere(arr < 0)[0].tolist()
        raise ValueError(f"loads must be non-negative; loads{bad} = {arr[tuple(bad)].item()!r}")
    if float(arr.sum(dtype=np.float64)) >= _MAX_TOTAL:  # float64: no int64 wrap-around
        raise ValueError(f"total load {_exact_total(arr)} is too large (limit 2^50 tokens)")
    arr = arr.astype(np.int64)
    if arr.ndim == 2:
        return arr.sum(0), arr
    return arr, None


# ------------------------------------------------------------------------ combinatorics


def _gpu_loads(idx: _SlotIndex, x_N: np.ndarray, G: int) -> np.ndarray:
    # float64 weights are exact here: every partial sum is an integer below 2^53
    return np.bincount(idx.gpu_N, weights=x_N, minlength=G).astype(np.int64)


def _even_plan(idx: _SlotIndex, loads_E: np.ndarray) -> np.ndarray:
    """x_N: each expert's tokens split as evenly as possible over its replicas."""
    load_N = loads_E[idx.expert_N]
    q_N = load_N // idx.rep_N
    return q_N + (idx.rot_N < load_N - q_N * idx.rep_N)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _covered_load(idx: _SlotIndex, loads_E: np.ndarray, mask_G: np.ndarray) -> int:
    """sum of load_e over experts whose every replica lies in the GPU set ``mask_G``."""
    covered_E = np.logical_and.reduceat(mask_G[idx.gpu_N], idx.start_E)
    return int(loads_E[covered_E].sum())


def _simple_bound(
    idx: _SlotIndex, loads_E: np.ndarray, G: int
) -> tuple[int, np.ndarray]:
    """(max(ceil(total/G), max_e ceil(load_e/|G_e|)), a GPU set attaining it)."""
    total = int(loads_E.sum())
    per_E = -(-loads_E // idx.replicas_E)
    e = int(np.argmax(per_E))
    if int(per_E[e]) > _ceil_div(total, G):
        mask = np.zeros(G, dtype=bool)
        mask[idx.gpu_N[idx.start_E[e] : idx.start_E[e] + idx.replicas_E[e]]] = True
        return int(per_E[e]), mask
    return _ceil_div(total, G), np.ones(G, dtype=bool)


def _prefix_bound(
    idx: _SlotIndex, loads_E: np.ndarray, load_G: np.ndarray, G: int
) -> tuple[int, np.ndarray]:
    """Best ceil-density over the prefixes of the GPUs sorted by decreasing load."""
    order_G = np.argsort(-load_G, kind="stable")
    rank_G = np.empty(G, dtype=np.int64)
    rank_G[order_G] = np.arange(G)
    last_E = np.maximum.reduceat(rank_G[idx.gpu_N], idx.start_E)
    cover_K = np.cumsum(np.bincount(last_E, weights=loads_E, minlength=G)).astype(np.int64)
    k_K = np.arange(1, G + 1)
    bound_K = -(-cover_K // k_K)
    k = int(np.argmax(bound_K))
    return int(bound_K[k]), rank_G <= k


def _distance_to_under(
    idx: _SlotIndex, x_N: np.ndarray, excess_G: np.ndarray, G: int
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


def _excl_cumsum(v: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Exclusive cumulative sum of ``v`` within runs of equal (sorted) ``group``."""
    c = np.cumsum(v)
    first = np.empty(len(v), dtype=bool)
    first[:1] = True
    np.not_equal(group[1:], group[:-1], out=first[1:])
    base = np.maximum.accumulate(np.where(first, c - v, 0))
    return c - v - base


def _push_sweep(
    idx: _SlotIndex, x_N: np.ndarray, cap: object, dist_G: np.ndarray, G: int, passes: int = 2
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
    excess_G = _gpu_loads(idx, x_N, G) - cap
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
            amount = np.minimum(np.maximum(excess_G[gs] - _excl_cumsum(xs, gs), 0), xs)
            h = G - 1 - best_E[se[ids]] % G
            o = np.argsort(h, kind="stable")
            ho, ao = h[o], amount[o]
            amount[o] = np.minimum(np.maximum(room_G[ho] - _excl_cumsum(ao, ho), 0), ao)
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
    idx: _SlotIndex, x_N: np.ndarray, excess_G: np.ndarray, E: int, G: int
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


def _route(
    idx: _SlotIndex, x_N: np.ndarray, cap: object, E: int, G: int, push_rounds: int = 1
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Move tokens until no GPU exceeds ``cap`` (int or int64 [G]), or prove it impossible.

    Returns (plan, None) on success, else (plan, stuck_G): the GPUs that cannot reach a GPU
    below capacity in the residual graph; they hold a GPU above capacity and every expert with
    tokens on them has all its replicas among them, so they carry more than their capacity.
    Pushes are tried first only with slack (capacity >= 1.25 x load); near a perfect fit the
    exact residual max flow is cheaper than the several push sweeps it would take.
    """
    total = int(x_N.sum())
    use_scipy = total <= _INT32_MAX
    slack = 4 * int(np.sum(np.broadcast_to(cap, (G,)))) >= 5 * total
    rounds, flowed = 0, False
    while True:
        excess_G = _gpu_loads(idx, x_N, G) - cap
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


def _min_makespan(
    idx: _SlotIndex,
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
        x_N, stuck_G = _route(idx, x_N, T, E, G)
        if stuck_G is None:
            return x_N, T, cert_G
        T_new = _ceil_div(_covered_load(idx, loads_E, stuck_G), int(stuck_G.sum()))
        cert_new = stuck_G
        T_pre, pre_G = _prefix_bound(idx, loads_E, _gpu_loads(idx, x_N, G), G)
        if T_pre > T_new:
            T_new, cert_new = T_pre, pre_G
        if T_new <= T:  # impossible by the max-flow min-cut theorem
            raise RuntimeError(f"no progress at makespan {T}")
        T, cert_G = T_new, cert_new


# --------------------------------------------------------------------------- locality


def _local_first_plan(
    placement: Placement, loads_SE: np.ndarray, T: int, cert_G: np.ndarray
) -> Optional[np.ndarray]:
    """x_N of makespan <= T keeping every token computable at its source there, or None.

    Every GPU keeps the tokens it routed to experts it holds; the other tokens (whose source
    holds no replica of their expert, so they move in any plan) are routed under the room
    that is left. When that succeeds the plan moves only tokens that must move: optimal.
    Quick refusal: the critical set ``cert_G`` must have room, beyond the experts living
    inside it, for the local tokens its GPUs keep of experts reaching outside it.
    """
    idx = placement._index
    E, G = placement.num_experts, placement.num_gpus
    local_N = loads_SE[idx.gpu_N, idx.expert_N]
    room_G = T - _gpu_loads(idx, local_N, G)
    if (room_G < 0).any():
        return None
    inside_E = np.logical_and.reduceat(cert_G[idx.gpu_N], idx.start_E)
    slack = T * int(cert_G.sum()) - int(loads_SE.sum(0)[inside_E].sum())
    if int(local_N[cert_G[idx.gpu_N] & ~inside_E[idx.expert_N]].sum()) > slack:
        return None
    rest_E = loads_SE.sum(0) - np.add.reduceat(local_N, idx.start_E)
    x_N, stuck_G = _route(idx, _even_plan(idx, rest_E), room_G, E, G)
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


def _residual_layout(placement: Placement) -> _ResidualLayout:
    layout = placement._cache.get("residual")
    if layout is None:
        idx = placement._index
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
        layout = _ResidualLayout(n, rows[order], cols[order], *pos)
        placement._cache["residual"] = layout
    return layout


def _min_moved_plan(
    placement: Placement, loads_SE: np.ndarray, T: int
) -> np.ndarray:
    """x_N of makespan <= T that keeps the most tokens on their source GPU (exact).

    Min-cost flow on source -> expert e (load_e) -> GPU g in G_e -> sink (cap T), where the
    arc e -> g costs 0 for its first ``loads_SE[g, e]`` tokens (kept local) and 1 beyond (a
    convex cost, handled as two segments of one arc). Primal-dual: starting from every GPU
    keeping its local tokens (at most T, expert order), each phase computes reduced-cost
    distances (Dijkstra), raises the potentials and pushes a maximum flow through the
    zero-reduced-cost residual entries, so the flow stays of minimum cost for its value; the
    phases end when every token flows.
    """
    idx = placement._index
    E, G = placement.num_experts, placement.num_gpus
    se, sg = idx.expert_N, idx.gpu_N
    lay = _residual_layout(placement)
    n, rows, cols = lay.n, lay.rows, lay.cols
    src, snk = E + G, E + G + 1
    loads_E = loads_SE.sum(0)
    total = int(loads_E.sum())
    local_N = loads_SE[sg, se]
    # start: every GPU keeps its local tokens in expert order, at most T of them
    order = idx.by_gpu_N
    f_N = np.zeros(len(se), dtype=np.int64)
    f_N[order] = np.minimum(
        np.maximum(T - _excl_cumsum(local_N[order], sg[order]), 0), local_N[order]
    )
    f_E = np.add.reduceat(f_N, idx.start_E)
    f_G = _gpu_loads(idx, f_N, G)
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
        adm_cap = np.minimum(cap[adm], _INT32_MAX).astype(np.int32)
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


def _split_sends(
    placement: Placement, x_N: np.ndarray, loads_SE: np.ndarray
) -> tuple[np.ndarray, int]:
    """Which source sends how many tokens of which expert to which GPU.

    Each GPU first keeps its own tokens of an expert it computes (min(x[e, g], loads_SE[g, e])),
    which is the most any split of this plan can keep; the rest of every expert is matched
    source-by-source (ascending) to GPU-by-GPU (ascending). Returns (sends [N, 4] with rows
    (source, expert, gpu, tokens) sorted by (expert, source, gpu), tokens moved).
    """
    idx = placement._index
    E, G = placement.num_experts, placement.num_gpus
    se, sg = idx.expert_N, idx.gpu_N
    keep_N = np.minimum(x_N, loads_SE[sg, se])
    need_N = x_N - keep_N  # tokens GPU g still receives for e
    supply = loads_SE.T.flatten()  # [E * G] row-major by (expert, source): always a copy
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


# ------------------------------------------------------------------------------ public


def _to_dense(placement: Placement, x_N: np.ndarray) -> np.ndarray:
    idx = placement._index
    x_EG = np.zeros((placement.num_experts, placement.num_gpus), dtype=np.int64)
    x_EG[idx.expert_N, idx.gpu_N] = x_N
    return x_EG


Scheduler = Callable[[Placement, np.ndarray, Optional[np.ndarray], Optional[Schedule]], Schedule]
SCHEDULERS: dict[str, Scheduler] = {}


def register_scheduler(name: str) -> Callable[[Scheduler], Scheduler]:
    """Decorator: make ``fn(placement, loads_E, loads_SE or None, prev) -> Schedule`` available
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

    loads   int [E] tokens per expert, or int [G, E] tokens per (source GPU, expert).
    method  a name in ``SCHEDULERS``: "flow" (exact combinatorial solver, the default) or
            "highs" (LP reference).
    prev    the previous micro-batch's schedule on the same placement (used by "flow"): its
            critical GPU set seeds the lower bound. (Its proportions are deliberately not
            reused as a starting plan: an even split, which spreads every expert over all its
            replicas, leaves more residual paths and routed faster in measurements.)

    Returns a :class:`Schedule` whose makespan is ``ceil(LP optimum)``. With [G, E] loads the
    plan also minimises the tokens computed away from their source GPU among all plans of
    that makespan, and ``sends`` says which source sends what where. Raises ValueError on
    loads of the wrong shape, negative or non-integer loads, an unknown method, or a ``prev``
    for another shape.
    """
    if method not in SCHEDULERS:
        raise ValueError(f"unknown method {method!r}; choose from {tuple(SCHEDULERS)}")
    loads_E, loads_SE = _as_loads(placement, loads)
    if prev is not None:
        if not isinstance(prev, Schedule):
            raise TypeError(f"prev must be a Schedule, got {type(prev).__name__}")
        E, G = placement.num_experts, placement.num_gpus
        if prev.x_EG.shape != (E, G):
            raise ValueError(
                f"prev schedule is for {prev.x_EG.shape} experts x GPUs, not ({E}, {G})"
            )
    return SCHEDULERS[method](placement, loads_E, loads_SE, prev)


@register_scheduler("highs")
def _schedule_highs(
    placement: Placement,
    loads_E: np.ndarray,
    loads_SE: Optional[np.ndarray],
    prev: Optional[Schedule],
) -> Schedule:
    from moebal.schedule.highs import highs_schedule

    return highs_schedule(placement, loads_E, loads_SE)


@register_scheduler("flow")
def _schedule_flow(
    placement: Placement,
    loads_E: np.ndarray,
    loads_SE: Optional[np.ndarray],
    prev: Optional[Schedule],
) -> Schedule:
    idx = placement._index
    E, G = placement.num_experts, placement.num_gpus
    lower, cert_G = _simple_bound(idx, loads_E, G)
    T = lower
    if prev is not None and prev.critical_gpus:
        mask = np.zeros(G, dtype=bool)
        mask[list(prev.critical_gpus)] = True
        T_prev = _ceil_div(_covered_load(idx, loads_E, mask), int(mask.sum()))
        if T_prev > T:
            T, cert_G = T_prev, mask
    x_N = _even_plan(idx, loads_E)
    load_G = _gpu_loads(idx, x_N, G)
    T_pre, pre_G = _prefix_bound(idx, loads_E, load_G, G)
    if T_pre > T:
        T, cert_G = T_pre, pre_G
    x_N, T, cert_G = _min_makespan(idx, loads_E, x_N, T, cert_G, E, G)
    tokens_moved: Optional[int] = None
    sends: Optional[np.ndarray] = None
    if loads_SE is not None:
        if T > 0:
            local = _local_first_plan(placement, loads_SE, T, cert_G)
            if local is not None:
                x_N = local
            elif int(loads_E.sum()) <= _INT32_MAX:
                x_N = _min_moved_plan(placement, loads_SE, T)
            else:  # beyond the int32 max-flow: the reference LP does the min-cost step
                from moebal.schedule.highs import highs_plan_lp

                x_N = highs_plan_lp(placement, loads_E, T, loads_SE)
        sends, tokens_moved = _split_sends(placement, x_N, loads_SE)
    return Schedule(
        x_EG=_to_dense(placement, x_N),
        makespan=int(T),
        lower_bound=int(lower),
        critical_gpus=tuple(np.flatnonzero(cert_G).tolist()),
        tokens_moved=tokens_moved,
        sends=sends,
        method="flow",
    )


def lp_optimum(placement: Placement, loads_E: np.ndarray) -> Fraction:
    """The exact (unrounded) LP optimum = the worst subset density, as a Fraction.

    loads_E: int [E] (or [G, E], summed over sources).

    Dinkelbach iteration on rationals: at T = p/q the loads are scaled by q so the
    feasibility test stays integral; an infeasible T yields a GPU set of density > T, which
    becomes the next T; a feasible T is the density of a set, hence the optimum.
    """
    loads_E, _ = _as_loads(placement, loads_E)
    idx = placement._index
    E, G = placement.num_experts, placement.num_gpus
    total = int(loads_E.sum())
    value = max(
        Fraction(total, G),
        max(Fraction(int(a), int(r)) for a, r in zip(loads_E, idx.replicas_E)),
    )
    while True:
        p, q = value.numerator, value.denominator
        scaled_E = loads_E * q
        if int(scaled_E.sum()) >= _MAX_TOTAL:
            raise ValueError("lp_optimum: loads too large for exact rational search")
        x_N, stuck_G = _route(idx, _even_plan(idx, scaled_E), p, E, G)
        if stuck_G is None:
            return value
        new = Fraction(_covered_load(idx, loads_E, stuck_G), int(stuck_G.sum()))
        if new <= value:  # impossible by the max-flow min-cut theorem
            raise RuntimeError(f"no progress at {value}")
        value = new


def even_split_makespan(placement: Placement, loads_E: np.ndarray) -> int:
    """Makespan without scheduling: every expert's tokens split evenly over its replicas."""
    loads_E, _ = _as_loads(placement, loads_E)
    idx = placement._index
    return int(_gpu_loads(idx, _even_plan(idx, loads_E), placement.num_gpus).max(initial=0))


METHODS = tuple(SCHEDULERS)
