"""The exact balanced routing: the optimum that BIP-based balancing approximates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np
import torch

from moebal.routing.balancers.base import (
    Balancer,
    BalancerConfig,
    RoutingContext,
    register_balancer,
)
from moebal.routing.validate import check_choice


def balanced_capacities(num_tokens: int, top_k: int, num_experts: int) -> tuple[int, int]:
    """Per-expert load bounds ``(floor(TK/E), ceil(TK/E))`` of the exact balanced routing.

    The loads of a routing sum to ``T K``; when ``T K / E`` is not an integer no routing has
    equal loads, and the balanced ones are those with every load ``floor`` or ``ceil``:
    exactly ``T K mod E`` experts then take ``ceil``. Which ones is left to the optimiser.
    """
    total = num_tokens * top_k
    return total // num_experts, -(-total // num_experts)


def optimal_routing_lp(
    scores_TE: torch.Tensor, top_k: int, candidates: Optional[int] = None
) -> torch.Tensor:
    """:func:`optimal_routing` by HiGHS's simplex on the LP relaxation; returns ``indices_TK``.

    Maximise ``sum_ij s_ij x_ij`` over ``x`` in {0,1}^{T x E} with ``sum_j x_ij = K`` for
    every token and ``floor(TK/E) <= sum_i x_ij <= ceil(TK/E)`` for every expert
    (:func:`balanced_capacities`). The constraint matrix is the incidence matrix of the
    complete bipartite graph tokens x experts, totally unimodular, and every bound is an
    integer, so the LP relaxation has integral vertices: HiGHS's simplex solves the LP and
    its basic optimum is the integral optimum.

    Column generation keeps the LP small without giving up exactness: it starts from each
    token's ``candidates`` best experts (default ``K + 2``) plus one feasible balanced
    routing (token i's slot k on expert ``(i K + k) mod E``), then adds every pair whose
    reduced cost ``s_ij - p_i - q_j`` (HiGHS's row duals) is positive and solves again,
    until none is: the restricted optimum is then optimal for the whole LP. The result is
    checked (integral, K per token, loads within the bounds) before it is returned.
    """
    import highspy  # noqa: PLC0415 - heavy, and only this reference needs it

    T, E = scores_TE.shape
    K = top_k
    if not 1 <= K <= E:
        raise ValueError(f"top_k must be in 1..{E}, got {K!r}")
    device = scores_TE.device
    if T == 0:
        return torch.empty(0, K, dtype=torch.int64, device=device)
    lo, hi = balanced_capacities(T, K, E)
    s = scores_TE.detach().to("cpu", torch.float64).numpy()
    m = min(E, K + 2 if candidates is None else max(int(candidates), K))

    # the starting columns: top-m per token, plus a feasible balanced routing
    in_lp = np.zeros((T, E), dtype=bool)
    if m == E:
        in_lp[:] = True
    else:
        top = np.argpartition(-s, m - 1, axis=1)[:, :m]
        np.put_along_axis(in_lp, top, True, axis=1)
        slots = np.arange(T * K)
        in_lp[slots // K, slots % E] = True

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("solver", "simplex")
    # presolve's dependent-equation search costs more than the whole solve here
    h.setOptionValue("presolve", "off")
    # no "threads" option: it must match HiGHS's per-process scheduler (see schedule/highs.py)
    h.changeObjectiveSense(highspy.ObjSense.kMaximize)
    row_lo = np.concatenate([np.full(T, float(K)), np.full(E, float(lo))])
    row_hi = np.concatenate([np.full(T, float(K)), np.full(E, float(hi))])
    h.addRows(T + E, row_lo, row_hi, 0, np.zeros(1, np.int32), np.zeros(0, np.int32), np.zeros(0))

    col_i = np.zeros(0, dtype=np.int64)
    col_j = np.zeros(0, dtype=np.int64)
    new_i, new_j = np.nonzero(in_lp)
    tol = 1e-9
    for _ in range(T * E + 1):
        n = new_i.size
        index = np.empty(2 * n, dtype=np.int32)
        index[0::2] = new_i
        index[1::2] = T + new_j
        h.addCols(
            n, s[new_i, new_j], np.zeros(n), np.ones(n), 2 * n,
            np.arange(0, 2 * n, 2, dtype=np.int32), index, np.ones(2 * n),
        )
        col_i = np.concatenate([col_i, new_i])
        col_j = np.concatenate([col_j, new_j])
        h.run()
        status = h.getModelStatus()
        if status != highspy.HighsModelStatus.kOptimal:
            raise RuntimeError(
                f"HiGHS did not solve the balanced routing LP: {h.modelStatusToString(status)}"
            )
        dual = np.asarray(h.getSolution().row_dual)
        reduced_TE = s - dual[:T, None] - dual[None, T:]
        reduced_TE[in_lp] = -np.inf
        new_i, new_j = np.nonzero(reduced_TE > tol)
        if new_i.size == 0:
            break
        in_lp[new_i, new_j] = True

    x = np.asarray(h.getSolution().col_value)
    chosen = x > 0.5
    if np.abs(x - chosen).max(initial=0.0) > 1e-6:
        raise RuntimeError("the balanced routing LP returned a fractional vertex")
    routed = np.zeros((T, E), dtype=bool)
    routed[col_i[chosen], col_j[chosen]] = True
    per_token = routed.sum(axis=1)
    loads = routed.sum(axis=0)
    if (per_token != K).any() or loads.min() < lo or loads.max() > hi:
        raise RuntimeError("the balanced routing LP returned an infeasible routing")
    cols = np.nonzero(routed)[1].reshape(T, K)
    return torch.from_numpy(cols.astype(np.int64)).to(device)


def _edge_costs(s_NE: torch.Tensor, x_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cheapest single move between each pair of experts, and the token that makes it.

    Moving token i from expert a (``x_ia``) to expert b (``not x_ib``) loses ``s_ia - s_ib``
    of score. Returns ``w_EE[a, b]`` (the least such loss, inf if no token can move) and
    ``tok_EE[a, b]`` (a token achieving it). Works on the tokens grouped by the expert they
    leave: an [E, max load, E] block rather than all [N, E, E] pairs.
    """
    N, E = s_NE.shape
    tok, frm = x_NE.nonzero(as_tuple=True)
    order = torch.argsort(frm, stable=True)
    tok, frm = tok[order], frm[order]
    count_E = torch.bincount(frm, minlength=E)
    width = max(int(count_E.max()), 1)
    pos = torch.arange(tok.numel(), device=s_NE.device) - (torch.cumsum(count_E, 0) - count_E)[frm]
    tok_EW = torch.full((E, width), -1, dtype=torch.int64, device=s_NE.device)
    tok_EW[frm, pos] = tok
    safe_EW = tok_EW.clamp_min(0)
    s_EWE = s_NE[safe_EW]
    cost_EWE = s_EWE.gather(2, torch.arange(E, device=s_NE.device).view(E, 1, 1).expand(E, width, 1)) - s_EWE
    blocked_EWE = x_NE[safe_EW] | (tok_EW < 0).unsqueeze(2)
    w_EE, arg_EE = cost_EWE.masked_fill_(blocked_EWE, float("inf")).min(dim=1)
    return w_EE, tok_EW.gather(1, arg_EE)


def _shortest_paths(w_EE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All-pairs shortest paths by repeated min-plus squaring (no negative cycles assumed).

    Returns ``dist_EE`` and ``next_EE`` (the first hop on a shortest path from a to b).
    """
    E = w_EE.shape[0]
    dist = w_EE.clone()
    dist.fill_diagonal_(0.0)
    nxt = torch.arange(E, device=w_EE.device).expand(E, E).clone()
    for _ in range(max(1, (E - 1).bit_length())):
        best, via = (dist.unsqueeze(2) + dist.unsqueeze(0)).min(dim=1)
        better = best < dist
        nxt = torch.where(better, nxt.gather(1, via), nxt)
        dist = torch.where(better, best, dist)
    return dist, nxt


def optimal_routing(scores_TE: torch.Tensor, top_k: int, warm_iters: int = 50) -> torch.Tensor:
    """The balanced routing of greatest total score, exactly; returns ``indices_TK``.

    Maximise ``sum_ij s_ij x_ij`` over ``x`` in {0,1}^{T x E} with ``sum_j x_ij = K`` for
    every token and ``floor(TK/E) <= sum_i x_ij <= ceil(TK/E)`` for every expert
    (:func:`balanced_capacities`). This is a min-cost flow (tokens -> experts, unit arcs),
    solved by successive shortest paths on the graph of experts:

    1. Start from ``x`` = the top-k of ``s - q`` per token, q from ``warm_iters`` BIP dual
       iterations. Such an ``x`` is optimal among the routings with its own loads (for any
       q), so the residual graph has no negative cycle.
    2. While an expert is over capacity: the edge a -> b costs the least score lost by
       moving one token from a to b (:func:`_edge_costs`); move one unit along a shortest
       path from an over-full expert to an under-full one. Each move keeps "no negative
       cycle" and removes one unit of excess.
    3. At the end the loads are balanced and the residual graph has no negative cycle: the
       optimality certificate of a min-cost flow, which is checked (with the loads and
       the K per token) before returning.

    When ``T K / E`` is not an integer, one phantom token with ``E - (T K mod E)`` slots and
    zero scores joins the batch and every capacity is ``ceil``: the experts it takes are
    the ones left at ``floor``, chosen by the optimisation itself. Ties in score are broken
    arbitrarily. :func:`optimal_routing_lp` solves the same program with HiGHS.
    """
    from moebal.routing.balancers.bip import bip_dual_iterations

    T, E = scores_TE.shape
    K = top_k
    if not 1 <= K <= E:
        raise ValueError(f"top_k must be in 1..{E}, got {K!r}")
    device = scores_TE.device
    if T == 0:
        return torch.empty(0, K, dtype=torch.int64, device=device)
    s_TE = scores_TE.detach().double()
    lo, hi = balanced_capacities(T, K, E)
    k_N = torch.full((T,), K, dtype=torch.int64, device=device)
    s_NE = s_TE
    if hi != lo:
        s_NE = torch.cat([s_TE, s_TE.new_zeros(1, E)])
        k_N = torch.cat([k_N, k_N.new_full((1,), E - (T * K) % E)])
    if K < E and warm_iters > 0:
        q_E = bip_dual_iterations(s_TE, s_TE.new_zeros(E), K, warm_iters)
    else:
        q_E = s_TE.new_zeros(E)
    order_NE = torch.argsort(s_NE - q_E, dim=1, descending=True)
    x_NE = torch.zeros_like(s_NE, dtype=torch.bool)
    x_NE.scatter_(1, order_NE, torch.arange(E, device=device).expand_as(order_NE) < k_N[:, None])

    inf = float("inf")
    for _ in range(T * K + 1):
        loads_E = x_NE.sum(dim=0)
        over_E, under_E = loads_E > hi, loads_E < hi
        w_EE, tok_EE = _edge_costs(s_NE, x_NE)
        if not bool(over_E.any()):
            break
        dist_EE, next_EE = _shortest_paths(w_EE)
        pick = dist_EE.masked_fill(~(over_E.unsqueeze(1) & under_E.unsqueeze(0)), inf).argmin()
        a, b = divmod(int(pick), E)
        # move one unit along the path a -> ... -> b (a simple path: at most E - 1 hops)
        hops = []
        v = a
        while v != b:
            u = int(next_EE[v, b])
            hops.append((int(tok_EE[v, u]), v, u))
            v = u
        for i, v, u in hops:
            x_NE[i, v] = False
            x_NE[i, u] = True
    # the certificate: loads, K per token, and no negative cycle left
    dist_EE, _ = _shortest_paths(w_EE)
    loads_E = x_NE[:T].sum(dim=0)
    scale = float(s_TE.abs().max()) * E
    if (
        bool((x_NE[:T].sum(dim=1) != K).any())
        or int(loads_E.min()) < lo
        or int(loads_E.max()) > hi
        or float(dist_EE.diagonal().min()) < -1e-9 * max(scale, 1.0)
    ):
        raise RuntimeError("the balanced-routing flow failed its optimality check")
    return x_NE[:T].nonzero()[:, 1].view(T, K)


def forbid_outside(scores_TE: torch.Tensor, allowed_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """Scores with every pair outside ``allowed_TE`` lowered by more than any routing can
    gain elsewhere (``T K`` times the score span, plus 1): the optimum of the balanced
    program on them uses as few such pairs as balance allows, and none where the allowed
    pairs alone admit a balanced routing."""
    span = float(scores_TE.max() - scores_TE.min()) if scores_TE.numel() else 0.0
    penalty = scores_TE.shape[0] * top_k * span + 1.0
    return torch.where(allowed_TE, scores_TE, scores_TE - penalty)


@register_balancer("optimal")
class OptimalBalancer(Balancer):
    """Each batch routed by the exact balanced optimum (:func:`optimal_routing`).

    ``options.solver``: "flow" (successive shortest paths, the default) or "highs" (the LP
    by HiGHS's simplex, :func:`optimal_routing_lp`); both exact.

    Under a group limit (``RouterConfig.num_groups``) the pairs outside each token's
    groups get a prohibitive score (:func:`forbid_outside`): the limit holds wherever a
    balanced routing inside the groups exists; where none does, balance wins and the
    limit is broken on as few token-slots as it needs.

    A reference, not a training method: it needs the whole batch, runs an LP on the CPU per
    batch, and loads are equal (up to the floor/ceil of ``T K / E``) by construction. Same
    in training and ``eval()``; no state, no loss.
    """

    @dataclass(kw_only=True)
    class Config(BalancerConfig):
        """solver: "flow" or "highs" (flat ``optimal_solver``)."""

        solver: str = "flow"
        flat_names: ClassVar[dict[str, str]] = {"solver": "optimal_solver"}

        def validate(self) -> None:
            check_choice("optimal_solver", self.solver, ("flow", "highs"))

    reads_on_host = True  # the solver runs on the host

    def select(self, scores_TE: torch.Tensor, top_k: int, ctx: RoutingContext) -> torch.Tensor:
        if ctx.allowed_TE is not None:
            scores_TE = forbid_outside(scores_TE.detach().double(), ctx.allowed_TE, top_k)
        if self.options.solver == "highs":
            return optimal_routing_lp(scores_TE, top_k)
        return optimal_routing(scores_TE, top_k)
