"""BIP-based balancing: expert prices q from the dual of the balanced-routing program."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import torch

from moebal.routing.balancers.base import (
    Balancer,
    BalancerConfig,
    RoutingContext,
    register_balancer,
)
from moebal.routing.kernels import Workspace, kth_largest, topk_indices
from moebal.routing.validate import check_bool, check_choice, check_int

if TYPE_CHECKING:  # pragma: no cover
    from moebal.routing.config import RouterConfig


def bip_dual_iterations(
    scores_TE: torch.Tensor,
    q_E: torch.Tensor,
    top_k: int,
    iters: int,
    pin_q: bool = True,
    p_T: Optional[torch.Tensor] = None,
    ws: Optional[Workspace] = None,
) -> torch.Tensor:
    """``iters`` alternating updates of the token prices p and expert prices q; returns q.

    The program: maximise ``sum s_ij x_ij`` s.t. ``sum_j x_ij <= K`` per token,
    ``sum_i x_ij <= c`` per expert, ``x`` binary, with ``c = floor(T K / E)``. Its LP dual
    has token prices ``p_i >= 0`` and expert prices ``q_j >= 0``; one iteration is::

        p_i <- max(0, (K+1)-th largest_j (s_ij - q_j))
        q_j <- max(0, (c+1)-th largest_i (s_ij - p_i))

    and, with ``pin_q``, ``q <- q - min_j q_j`` (a move along the dual's flat direction
    ``(p - d, q + d)``, which changes no top-k of ``s - q``). ``p_T``, when given, replaces
    the first iteration's p update (the caller already has it). Needs ``K < E``. ``ws``
    holds the [T, E]-sized scratch tensors between calls.
    """
    T, E = scores_TE.shape
    capacity = (T * top_k) // E
    ws = ws if ws is not None else Workspace()
    s_ET = ws.get("s_ET", (E, T), scores_TE)
    s_ET.copy_(scores_TE.t())
    y_TE = ws.get("y_TE", (T, E), scores_TE)
    x_ET = ws.get("x_ET", (E, T), scores_TE)
    for it in range(iters):
        if it > 0 or p_T is None:
            torch.sub(scores_TE, q_E, out=y_TE)
            p_T = kth_largest(y_TE, top_k + 1, dim=1).clamp_min_(0.0)
        torch.sub(s_ET, p_T, out=x_ET)
        q_E = kth_largest(x_ET, capacity + 1, dim=1).clamp_min_(0.0)
        if pin_q:
            q_E = q_E - q_E.min()
    return q_E


def bip_route(
    scores_TE: torch.Tensor,
    q_E: torch.Tensor,
    top_k: int,
    iters: int,
    pin_q: bool = True,
    order: str = "paper",
    ws: Optional[Workspace] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of the BIP balancer: ``(indices_TK, new q)``.

    ``order="paper"``: :func:`bip_dual_iterations` from ``q_E``, then route by the top-k
    of ``s - q_new``. ``order="causal"``: route by the top-k of ``s - q_E``; the same
    top-(k+1) gives the first iteration's p, then the iterations run as usual.
    """
    ws = ws if ws is not None else Workspace()
    y_TE = ws.get("y_TE", tuple(scores_TE.shape), scores_TE)
    if order == "paper":
        q_E = bip_dual_iterations(scores_TE, q_E, top_k, iters, pin_q, ws=ws)
        return topk_indices(torch.sub(scores_TE, q_E, out=y_TE), top_k), q_E
    values, indices = torch.topk(
        torch.sub(scores_TE, q_E, out=y_TE), top_k + 1, dim=1, sorted=True
    )
    p_T = values[:, top_k].clamp_min(0.0)
    q_E = bip_dual_iterations(scores_TE, q_E, top_k, iters, pin_q, p_T=p_T, ws=ws)
    return indices[:, :top_k].contiguous(), q_E


@register_balancer("bip")
class BIPBalancer(Balancer):
    """Route token i to the top-k of ``s_ij - q_j``, q the expert prices of the batch's BIP.

    q persists across batches (one vector per router). In training mode each batch runs
    ``options.iters`` dual iterations (:func:`bip_dual_iterations`) starting from the
    stored q:

    - ``order="paper"``: update q on the batch, then route the batch with the new q.
      A token's route then depends on the other tokens of its batch, later ones included.
    - ``order="causal"``: route the batch with the q left by earlier batches, then
      update q from it. A token's route depends only on earlier batches.

    The first update (q never updated yet: at initialisation) runs
    ``options.warmup_iters`` iterations instead, so that the start from q = 0 does not
    leave the first batches unbalanced; later batches start from the previous batch's q.

    In ``eval()`` q is not updated: every batch is routed with the stored q, in either
    order. Gate weights are the unbiased scores (the router's rule). The update is computed
    in the forward pass, per batch, and applied when the forward is committed; ``step()``
    has nothing to do.

    State (buffers): ``q_E``, ``num_updates`` (batches that updated q).
    """

    @dataclass(kw_only=True)
    class Config(BalancerConfig):
        """iters          T_iter: dual iterations per batch (flat ``bip_iters``).
        warmup_iters   iterations of the first update, from q = 0 (``bip_warmup_iters``).
        order          "paper" (update q on the batch, then route it) or "causal" (route
                       with the previous q, then update it) (``bip_order``).
        pin_q          after each q update subtract min_j q_j: keeps the dual on the
                       representative with min q = 0 (the batch's routing is unchanged);
                       False is the bare update, which drifts on long streams
                       (``bip_pin_q``; docs/design.md, "Balancers").
        """

        iters: int = 2
        warmup_iters: int = 32
        order: str = "paper"
        pin_q: bool = True
        flat_names: ClassVar[dict[str, str]] = {
            "iters": "bip_iters", "warmup_iters": "bip_warmup_iters", "order": "bip_order",
            "pin_q": "bip_pin_q"}

        def validate(self) -> None:
            check_int("bip_iters", self.iters, minimum=1)
            check_int("bip_warmup_iters", self.warmup_iters, minimum=1)
            check_choice("bip_order", self.order, ("paper", "causal"))
            check_bool("bip_pin_q", self.pin_q)

    def __init__(self, config: "RouterConfig") -> None:
        super().__init__(config)
        self.register_buffer("q_E", torch.zeros(config.num_experts, dtype=torch.float32))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        # cached ``num_updates > 0`` with the buffer version it was read at: no device sync
        # per batch, and still right after any in-place write to the buffer (load_state_dict,
        # a restore by activation checkpointing, a user's copy_)
        self._updated: Optional[tuple[int, bool]] = None
        self._ws = Workspace()

    def _iters(self) -> int:
        """``iters``, or ``warmup_iters`` while q has never been updated."""
        version = self.num_updates._version
        if self._updated is None or self._updated[0] != version:
            self._updated = (version, bool(self.num_updates > 0))
        return self.options.iters if self._updated[1] else self.options.warmup_iters

    def choice_scores(self, scores_TE: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        """``s - q`` with the stored q (the q before this batch's update)."""
        return scores_TE.detach() - self.q_E.to(scores_TE.dtype)

    def select(self, scores_TE: torch.Tensor, top_k: int, ctx: RoutingContext) -> torch.Tensor:
        opts = self.options
        s_TE = scores_TE.detach()
        if ctx.allowed_TE is not None:  # -inf out of the groups: neither chosen nor priced
            s_TE = s_TE.masked_fill(~ctx.allowed_TE, float("-inf"))
        q_E = self.q_E.to(s_TE.dtype)
        if not self.training or top_k >= s_TE.shape[1]:
            y_TE = self._ws.get("y_TE", tuple(s_TE.shape), s_TE)
            return topk_indices(torch.sub(s_TE, q_E, out=y_TE), top_k)
        indices_TK, q_E = bip_route(
            s_TE, q_E, top_k, self._iters(), opts.pin_q, opts.order, self._ws
        )
        ctx.updates["q_E"] = q_E
        ctx.updates["num_updates"] = self.num_updates + 1
        return indices_TK

    def commit(self, updates: dict[str, torch.Tensor]) -> None:
        super().commit(updates)
        if "num_updates" in updates:
            self._updated = (self.num_updates._version, True)
