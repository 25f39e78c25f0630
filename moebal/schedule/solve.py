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
from typing import Optional

import numpy as np

from moebal.schedule import _flow
from moebal.schedule.placement import Placement, _SlotIndex

METHODS = ("flow", "highs")
_INF = np.int64(1 << 40)
_MAX_TOTAL = 2**50  # token totals stay far from int64 and float64-exact limits


@dataclass(frozen=True)
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
                    tokens > 0, sorted; rows with source == gpu are tokens kept local.
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
            bad = np.argwhere(~ok)[0]
            raise ValueError(f"loads must be integers; loads{list(bad)} = {arr[tuple(bad)]!r}")
    if (arr < 0).any():
        bad = np.argwhere(arr < 0)[0]
        raise ValueError(f"loads must be non-negative; loads{list(bad)} = {arr[tuple(bad)]!r}")
    if float(arr.sum(dtype=np.float64)) >= _MAX_TOTAL:
        raise ValueError(f"total load {arr.sum()} is too large (limit 2^50 tokens)")
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


def _warm_plan(idx: _SlotIndex, loads_E: np.ndarray, prev_x_EG: np.ndarray) -> np.ndarray:
    """x_N: each expert's tokens split in the proportions of the previous plan."""
    prev_N = prev_x_EG[idx.expert_N, idx.gpu_N].astype(np.int64)
    even_N = _even_plan(idx, loads_E)
    if (prev_N < 0).any() or float(prev_N.max(initial=0)) * float(loads_E.max(initial=0)) >= 2**62:
        return even_N  # not a usable plan: start cold
    prev_E = np.add.reduceat(prev_N, idx.start_E)
    has_E = prev_E > 0
    share_N = loads_E[idx.expert_N] * prev_N // np.maximum(prev_E, 1)[idx.expert_N]
    rem_N = (loads_E - np.add.reduceat(share_N, idx.start_E))[idx.expert_N]
    q_N = rem_N // idx.rep_N
    share_N = share_N + q_N + (idx.rot_N < rem_N - q_N * idx.rep_N)
    return np.where(has_E[idx.expert_N], share_N, even_N)


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
    idx: _SlotIndex, x_N: np.ndarray, T: int, dist_G: np.ndarray, G: int, passes: int = 2
) -> np.ndarray:
    """Move excess down the distance labels, level by level, from the farthest to GPUs < T.

    At level d, every GPU above T offers its excess over its slots (expert order) whose expert
    has a holder at level d-1; each such expert sends to its holder at level d-1 with the
    most room (for d = 1 the room below T; deeper, the tokens it could pass on), and no
    holder receives more than its room. Always keeps a valid plan (conservation, holders only).
    """
    se, sg = idx.expert_N, idx.gpu_N
    N = len(se)
    x_N = x_N.copy()
    sd_N = dist_G[sg]
    dist_E = np.minimum.reduceat(sd_N, idx.start_E)
    load_G = _gpu_loads(idx, x_N, G)
    excess_G = load_G - T
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
    over = np.flatnonzero(excess_G > 0)
    under = np.flatnonzero(excess_G < 0)
    pos = x_N > 0
    src, snk = E + G, E + G + 1
    big = int(excess_G[over].sum())
    tail = np.concatenate([np.full(len(over), src), E + sg[pos], se, E + under])
    head = np.concatenate([E + over, se[pos], E + sg, np.full(len(under), snk)])
    cap = np.concatenate([excess_G[over], x_N[pos], np.full(len(se), big), -excess_G[under]])
    _, net_N = _flow.max_flow(E + G + 2, tail, head, cap, src, snk, se, E + sg, rows_first=E)
    return x_N + net_N


def _min_makespan(
    idx: _SlotIndex,
    loads_E: np.ndarray,
    x_N: np.ndarray,
    T: int,
    cert_G: np.ndarray,
    E: int,
    G: int,
    push_rounds: int = 1,
) -> tuple[np.ndarray, int, np.ndarray]:
    """From a valid plan and a certified lower bound T, the optimal plan and makespan.

    Invariant: ``T == ceil(density(cert_G))``, so T is a lower bound. Returns (x_N, T, cert_G)
    with max load == T.
    """
    total = int(loads_E.sum())
    use_scipy = total <= _flow.INT32_MAX
    # pushes only pay when there is slack (G T >= 1.25 total); near perfect balance the exact
    # max flow is cheaper than the several push sweeps it would take
    rounds = 0
    while True:
        load_G = _gpu_loads(idx, x_N, G)
        excess_G = load_G - T
        if excess_G.max(initial=0) <= 0:
            return x_N, T, cert_G
        dist_G = _distance_to_under(idx, x_N, excess_G, G)
        if ((excess_G > 0) & (dist_G == _INF)).any():
            stuck_G = dist_G == _INF  # closed under residual moves and overloaded
            T_new = _ceil_div(_covered_load(idx, loads_E, stuck_G), int(stuck_G.sum()))
            cert_new = stuck_G
            T_pre, pre_G = _prefix_bound(idx, loads_E, load_G, G)
            if T_pre > T_new:
                T_new, cert_new = T_pre, pre_G
            if T_new <= T:  # impossible by the max-flow min-cut theorem
                raise RuntimeError(f"no progress at makespan {T}")
            T, cert_G = T_new, cert_new
            continue
        if not use_scipy or (rounds < push_rounds and 4 * G * T >= 5 * total):
            x_N = _push_sweep(idx, x_N, T, dist_G, G)
        else:
            x_N = _residual_max_flow(idx, x_N, excess_G, E, G)
        rounds += 1


# --------------------------------------------------------------------------- locality


def _min_moved_plan(
    placement: Placement, loads_SE: np.ndarray, T: int
) -> np.ndarray:
    """x_N of makespan <= T that keeps the most tokens on their source GPU (exact).

    Min-cost flow: source -> expert e (load_e); e -> GPU g in G_e "local" (cap loads_SE[g, e],
    cost 0); e -> hub_e (cost 1) -> any holder of e (cost 0); GPU -> sink (cap T).
    Starting flow: local tokens only, each GPU keeping at most T of them.
    """
    idx = placement._index
    E, G = placement.num_experts, placement.num_gpus
    se, sg = idx.expert_N, idx.gpu_N
    N = len(se)
    loads_E = loads_SE.sum(0)
    local_N = loads_SE[sg, se]
    # node ids: experts 0..E-1, hubs E..2E-1, GPUs 2E..2E+G-1, source, sink
    src, snk = 2 * E + G, 2 * E + G + 1
    n = 2 * E + G + 2
    loc = np.flatnonzero(local_N > 0)
    ar = np.arange(E)
    tail = np.concatenate([np.full(E, src), se[loc], ar, E + se, 2 * E + np.arange(G)])
    head = np.concatenate([ar, 2 * E + sg[loc], E + ar, 2 * E + sg, np.full(G, snk)])
    cap = np.concatenate([loads_E, local_N[loc], loads_E, loads_E[se], np.full(G, T)])
    cost = np.concatenate(
        [np.zeros(E + len(loc), np.int64), np.ones(E, np.int64), np.zeros(N + G, np.int64)]
    )
    # starting flow: on every GPU keep its local tokens in expert order, at most T in all
    order = idx.by_gpu_N[(local_N > 0)[idx.by_gpu_N]]
    keep = np.minimum(np.maximum(T - _excl_cumsum(local_N[order], sg[order]), 0), local_N[order])
    keep_N = np.zeros(N, dtype=np.int64)
    keep_N[order] = keep
    kept_E = np.bincount(se, weights=keep_N, minlength=E).astype(np.int64)
    kept_G = np.bincount(sg, weights=keep_N, minlength=G).astype(np.int64)
    flow0 = np.concatenate([kept_E, keep_N[loc], np.zeros(E + N, np.int64), kept_G])
    flow = _flow.min_cost_flow(n, tail, head, cap, cost, src, snk, flow0, int(loads_E.sum()))
    x_N = np.zeros(N, dtype=np.int64)
    x_N[loc] += flow[E : E + len(loc)]
    x_N += flow[2 * E + len(loc) : 2 * E + len(loc) + N]
    return x_N


def _split_sends(
    placement: Placement, x_N: np.ndarray, loads_SE: np.ndarray
) -> tuple[np.ndarray, int]:
    """Which source sends how many tokens of which expert to which GPU.

    Each GPU first keeps its own tokens of an expert it computes (min(x[e, g], loads_SE[g, e])),
    which is the most any split of this plan can keep; the rest of every expert is matched
    source-by-source (ascending) to GPU-by-GPU (ascending). Returns (sends [N, 4], moved).
    """
    idx = placement._index
    E, G = placement.num_experts, placement.num_gpus
    se, sg = idx.expert_N, idx.gpu_N
    keep_N = np.minimum(x_N, loads_SE[sg, se])
    need_N = x_N - keep_N  # tokens GPU g still receives for e
    supply_ES = loads_SE.T.copy()
    supply_ES[se, sg] -= keep_N  # tokens source s still sends for e
    s_e, s_s = np.nonzero(supply_ES)  # row-major: sorted by (expert, source)
    s_amt = supply_ES[s_e, s_s]
    d_ids = np.flatnonzero(need_N)  # slots are sorted by (expert, gpu)
    d_amt = need_N[d_ids]
    s_cum, d_cum = np.cumsum(s_amt), np.cumsum(d_amt)
    cuts = np.union1d(s_cum, d_cum)  # per-expert totals agree, so boundaries align
    widths = np.diff(np.concatenate([[0], cuts]))
    si = np.searchsorted(s_cum, cuts, side="left")
    di = np.searchsorted(d_cum, cuts, side="left")
    moved = np.stack([s_s[si], s_e[si], sg[d_ids[di]], widths], axis=1)
    kept = np.flatnonzero(keep_N)
    local = np.stack([sg[kept], se[kept], sg[kept], keep_N[kept]], axis=1)
    sends = np.concatenate([moved, local]).astype(np.int64)
    sends = sends[sends[:, 3] > 0]
    sends = sends[np.lexsort((sends[:, 2], sends[:, 1], sends[:, 0]))]
    return sends, int(need_N.sum())


# ------------------------------------------------------------------------------ public


def _to_dense(placement: Placement, x_N: np.ndarray) -> np.ndarray:
    idx = placement._index
    x_EG = np.zeros((placement.num_experts, placement.num_gpus), dtype=np.int64)
    x_EG[idx.expert_N, idx.gpu_N] = x_N
    return x_EG


def solve_schedule(
    placement: Placement,
    loads: np.ndarray,
    *,
    method: str = "flow",
    prev: Optional[Schedule] = None,
) -> Schedule:
    """Schedule one micro-batch's tokens onto the expert replicas of ``placement``.

    loads   int [E] tokens per expert, or int [G, E] tokens per (source GPU, expert).
    method  "flow" (exact combinatorial solver) or "highs" (LP reference).
    prev    the previous micro-batch's schedule on the same placement (flow only): its
            proportions seed the plan and its critical GPU set seeds the lower bound.

    Returns a :class:`Schedule` whose makespan is ``ceil(LP optimum)``. With [G, E] loads the
    plan also minimises the tokens computed away from their source GPU among all plans of
    that makespan, and ``sends`` says which source sends what where. Raises ValueError on
    loads of the wrong shape, negative or non-integer loads, or an unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    loads_E, loads_SE = _as_loads(placement, loads)
    if method == "highs":
        from moebal.schedule.highs import highs_schedule

        return highs_schedule(placement, loads_E, loads_SE)
    idx = placement._index
    E, G = placement.num_experts, placement.num_gpus
    lower, cert_G = _simple_bound(idx, loads_E, G)
    T = lower
    if prev is not None:
        if not isinstance(prev, Schedule):
            raise TypeError(f"prev must be a Schedule, got {type(prev).__name__}")
        if prev.x_EG.shape != (E, G):
            raise ValueError(
                f"prev schedule is for {prev.x_EG.shape} experts x GPUs, not ({E}, {G})"
            )
        x_N = _warm_plan(idx, loads_E, prev.x_EG)
        if prev.critical_gpus:
            mask = np.zeros(G, dtype=bool)
            mask[list(prev.critical_gpus)] = True
            T_prev = _ceil_div(_covered_load(idx, loads_E, mask), int(mask.sum()))
            if T_prev > T:
                T, cert_G = T_prev, mask
    else:
        x_N = _even_plan(idx, loads_E)
    T_pre, pre_G = _prefix_bound(idx, loads_E, _gpu_loads(idx, x_N, G), G)
    if T_pre > T:
        T, cert_G = T_pre, pre_G
    x_N, T, cert_G = _min_makespan(idx, loads_E, x_N, T, cert_G, E, G)
    tokens_moved: Optional[int] = None
    sends: Optional[np.ndarray] = None
    if loads_SE is not None:
        if T > 0:
            x_N = _min_moved_plan(placement, loads_SE, T)
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
        x_N = _even_plan(idx, scaled_E)
        rounds = 0
        while True:
            excess_G = _gpu_loads(idx, x_N, G) - p
            if excess_G.max(initial=0) <= 0:
                return value
            dist_G = _distance_to_under(idx, x_N, excess_G, G)
            if ((excess_G > 0) & (dist_G == _INF)).any():
                stuck_G = dist_G == _INF
                new = Fraction(_covered_load(idx, loads_E, stuck_G), int(stuck_G.sum()))
                if new <= value:
                    raise RuntimeError(f"no progress at {value}")
                value = new
                break
            if rounds < 1 or int(scaled_E.sum()) > _flow.INT32_MAX:
                x_N = _push_sweep(idx, x_N, p, dist_G, G)
            else:
                x_N = _residual_max_flow(idx, x_N, excess_G, E, G)
            rounds += 1


def even_split_makespan(placement: Placement, loads_E: np.ndarray) -> int:
    """Makespan without scheduling: every expert's tokens split evenly over its replicas."""
    loads_E, _ = _as_loads(placement, loads_E)
    idx = placement._index
    return int(_gpu_loads(idx, _even_plan(idx, loads_E), placement.num_gpus).max(initial=0))
