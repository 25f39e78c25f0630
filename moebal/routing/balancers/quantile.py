"""Quantile balancing (Megatron-LM): the unclipped, equality-constrained relative of BIP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import torch

from moebal.routing.balancers.collectives import all_reduce_sum_
from moebal.routing.balancers.base import (
    Balancer,
    BalancerConfig,
    RoutingContext,
    register_balancer,
)
from moebal.routing.kernels import Workspace, kth_largest, topk_indices
from moebal.routing.validate import check_number

if TYPE_CHECKING:  # pragma: no cover
    import torch.distributed as dist

    from moebal.routing.config import RouterConfig


def quantile_dual_update(
    logits_TE: torch.Tensor, beta_E: torch.Tensor, top_k: int, ws: Optional[Workspace] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route by the top-k of ``l - beta`` and estimate this batch's beta; both unclipped.

    ``alpha_i`` = (K+1)-th largest of ``l_i - beta`` (the token's admission threshold),
    ``beta_local_j`` = (c+1)-th largest over tokens of ``l_ij - alpha_i`` with
    ``c = floor(T K / E)``. Returns ``(indices_TK, beta_local_E)``. Needs ``K < E``.
    ``ws`` holds the [T, E]-sized scratch tensors between calls.
    """
    T, E = logits_TE.shape
    ws = ws if ws is not None else Workspace()
    y_TE = ws.get("y_TE", (T, E), logits_TE)
    values, indices = torch.topk(
        torch.sub(logits_TE, beta_E, out=y_TE), top_k + 1, dim=1, sorted=True
    )
    alpha_T = values[:, top_k]
    capacity = (T * top_k) // E
    x_ET = ws.get("x_ET", (E, T), logits_TE)
    x_ET.copy_(logits_TE.t()).sub_(alpha_T)
    beta_local_E = kth_largest(x_ET, capacity + 1, dim=1)
    return indices[:, :top_k].contiguous(), beta_local_E


@register_balancer("quantile")
class QuantileBalancer(Balancer):
    """Megatron-LM's quantile balancing: route by the top-k of ``l_ij - beta_j``.

    As in Megatron-LM it works on the logits l (float32), not on the scores: beta is in
    logit units. Each training-mode micro-batch is routed with the beta of earlier steps
    and adds its own estimate (:func:`quantile_dual_update`) to an accumulator; at
    ``step()`` the accumulated estimates are averaged (over micro-batches, then over the
    data-parallel ``group``), blended ``beta <- ema * beta + (1 - ema) * avg`` with
    ``ema = options.ema`` (0 = take the new estimate), and centred (mean 0). No
    ``max(0, .)`` clip on either price: experts below their share get a negative beta.

    State (buffers): ``beta_E``, ``beta_sum_E``, ``micro_batches``, ``num_updates``.
    """

    @dataclass(kw_only=True)
    class Config(BalancerConfig):
        """ema: EMA weight of beta across steps, in [0, 1), 0 = off (flat ``quantile_ema``)."""

        ema: float = 0.0
        flat_names: ClassVar[dict[str, str]] = {"ema": "quantile_ema"}

        def validate(self) -> None:
            check_number("quantile_ema", self.ema, low=0.0, high=1.0, high_open=True)

    def __init__(self, config: "RouterConfig") -> None:
        super().__init__(config)
        E = config.num_experts
        self.register_buffer("beta_E", torch.zeros(E, dtype=torch.float32))
        self.register_buffer("beta_sum_E", torch.zeros(E, dtype=torch.float32))
        self.register_buffer("micro_batches", torch.zeros((), dtype=torch.int64))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self._ws = Workspace()

    def select(self, scores_TE: torch.Tensor, top_k: int, ctx: RoutingContext) -> torch.Tensor:
        logits_TE = ctx.logits_TE.detach().float()
        if not self.training or top_k >= logits_TE.shape[1]:
            y_TE = self._ws.get("y_TE", tuple(logits_TE.shape), logits_TE)
            return topk_indices(torch.sub(logits_TE, self.beta_E, out=y_TE), top_k)
        indices_TK, beta_local_E = quantile_dual_update(logits_TE, self.beta_E, top_k, self._ws)
        ctx.updates["beta_sum_E"] = self.beta_sum_E + beta_local_E
        ctx.updates["micro_batches"] = self.micro_batches + 1
        return indices_TK

    def step(self, group: Optional["dist.ProcessGroup"] = None) -> None:
        # average over micro-batches here, then over ranks (ranks that saw none add 0)
        seen = (self.micro_batches > 0).float()[None]
        packed = torch.cat([self.beta_sum_E / self.micro_batches.clamp_min(1), seen])
        all_reduce_sum_(packed, group)
        ranks = packed[-1]
        avg_E = packed[:-1] / ranks.clamp_min(1.0)
        ema = self.options.ema
        new_E = ema * self.beta_E + (1.0 - ema) * avg_E
        new_E = new_E - new_E.mean()
        # only move when some rank saw a micro-batch
        self.beta_E.copy_(torch.where(ranks > 0, new_E, self.beta_E))
        self.beta_sum_E.zero_()
        self.micro_batches.zero_()
        self.num_updates.add_((ranks > 0).long())
