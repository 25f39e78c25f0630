"""Global-batch auxiliary loss: expert counts summed over the data-parallel group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from moebal.routing.kernels import expert_counts
from moebal.routing.balancers.collectives import all_reduce_sum_
from moebal.routing.balancers.aux_loss import AuxLoss, aux_loss_scores, switch_aux_loss
from moebal.routing.balancers.base import Balancer, RoutingContext, register_balancer

if TYPE_CHECKING:  # pragma: no cover
    import torch.distributed as dist

    from moebal.routing.config import RouterConfig


@register_balancer("global_aux_loss")
class GlobalAuxLoss(Balancer):
    """The Switch loss with ``f`` counted over the global batch (Megatron-core's variant).

    ``f_j`` comes from the tokens choosing j summed over the data-parallel ranks of
    ``ctx.group`` and, as in Megatron-core, averaged over the micro-batches since the last
    ``step()``; ``P_j`` is the mean score over this rank's batch (the only part with a
    gradient). ``alpha * E * sum_j f_j P_j``, alpha when balanced. Megatron-core's per-rank
    value is this divided by the data-parallel size (it divides ``P`` by the global token
    count); here each rank's loss is on the same scale as ``aux_loss``.

    State: ``counts_sum_E`` (global counts summed over micro-batches), ``tokens_sum``
    (global tokens over them) and ``micro_batches``, reset at ``step()``. alpha =
    ``options.coeff`` (flat name ``aux_loss_coeff``).
    """

    @dataclass(kw_only=True)
    class Config(AuxLoss.Config):
        """coeff: alpha of the loss (flat name ``aux_loss_coeff``)."""

    def __init__(self, config: "RouterConfig") -> None:
        super().__init__(config)
        E = config.num_experts
        self.register_buffer("counts_sum_E", torch.zeros(E, dtype=torch.float64))
        self.register_buffer("tokens_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("micro_batches", torch.zeros((), dtype=torch.int64))

    def loss(
        self, scores_TE: torch.Tensor, indices_TK: torch.Tensor, ctx: RoutingContext
    ) -> torch.Tensor:
        T, E = scores_TE.shape
        K = indices_TK.shape[1]
        counts_E = ctx.counts_E
        if counts_E is None:
            counts_E = expert_counts(indices_TK.flatten(), E)
        # global counts and tokens of this micro-batch, in one collective
        packed = torch.cat([counts_E.to(torch.float64), counts_E.new_full((1,), T).double()])
        all_reduce_sum_(packed, ctx.group)
        counts_E, tokens = packed[:E], packed[E]
        if self.training:
            # the counts since the last step, this micro-batch included (applied at commit)
            counts_E = self.counts_sum_E + counts_E
            tokens = self.tokens_sum + tokens
            ctx.updates["counts_sum_E"] = counts_E
            ctx.updates["tokens_sum"] = tokens
            ctx.updates["micro_batches"] = self.micro_batches + 1
        scores_TE = aux_loss_scores(scores_TE, self.config.score_function)
        return switch_aux_loss(scores_TE, counts_E, tokens, K, self.options.coeff)

    def step(self, group: Optional["dist.ProcessGroup"] = None) -> None:
        self.counts_sum_E.zero_()
        self.tokens_sum.zero_()
        self.micro_batches.zero_()
