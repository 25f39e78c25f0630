"""Switch/GShard auxiliary load-balancing loss, at Megatron-core's scale."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

import torch

from moebal.routing.kernels import expert_counts
from moebal.routing.balancers.base import (
    Balancer,
    BalancerConfig,
    RoutingContext,
    register_balancer,
)
from moebal.routing.validate import check_number


def switch_aux_loss(
    scores_TE: torch.Tensor,
    counts_E: torch.Tensor,
    num_tokens: Union[int, torch.Tensor],
    top_k: int,
    coeff: float,
) -> torch.Tensor:
    """``coeff * E * sum_j f_j * P_j`` with ``f_j = counts_j / (K * T)``, ``P_j = mean_i s_ij``.

    ``counts_E``: tokens that chose each expert (no gradient flows through it);
    ``num_tokens``: T, the tokens the counts were taken over. Equal to ``coeff`` when the
    counts and the mean scores are both uniform (Megatron-core's scale).
    """
    E = scores_TE.shape[1]
    probs_sum_E = scores_TE.sum(dim=0)
    loss = torch.dot(probs_sum_E, counts_E.to(probs_sum_E.dtype))
    scale = coeff * E / (top_k * scores_TE.shape[0])
    if isinstance(num_tokens, torch.Tensor):
        return loss * (scale / num_tokens).to(loss.dtype)
    return loss * (scale / num_tokens)


def aux_loss_scores(scores_TE: torch.Tensor, score_function: str) -> torch.Tensor:
    """The scores P is taken from: normalised to sum 1 over the experts.

    Softmax scores already do (returned as they are). Sigmoid scores do not: at perfect
    balance their mean over tokens is about ``E * mean(s)`` times too large, so the loss
    would be far above alpha. Megatron-core normalises them the same way
    (``compute_routing_scores_for_aux_loss``).
    """
    if score_function == "softmax":
        return scores_TE
    return scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)


@register_balancer("aux_loss")
class AuxLoss(Balancer):
    """Plain top-k choice; the loss ``alpha * E * sum_j f_j P_j`` pushes scores to balance.

    ``f_j = #tokens choosing j / (K T)`` (before capacity drops), ``P_j = mean_i s_ij`` over
    the batch, of the scores normalised over the experts (:func:`aux_loss_scores`, a no-op
    for softmax); alpha = ``options.coeff``. Equals alpha when perfectly balanced, for
    either score function.
    """

    @dataclass(kw_only=True)
    class Config(BalancerConfig):
        """coeff: alpha of the loss (flat name ``aux_loss_coeff``)."""

        coeff: float = 1e-2
        flat_names: ClassVar[dict[str, str]] = {"coeff": "aux_loss_coeff"}

        def validate(self) -> None:
            check_number("aux_loss_coeff", self.coeff, low=0.0)

    def loss(
        self, scores_TE: torch.Tensor, indices_TK: torch.Tensor, ctx: RoutingContext
    ) -> torch.Tensor:
        counts_E = ctx.counts_E
        if counts_E is None:
            counts_E = expert_counts(indices_TK.flatten(), scores_TE.shape[1])
        T, K = scores_TE.shape[0], indices_TK.shape[1]
        scores_TE = aux_loss_scores(scores_TE, self.config.score_function)
        return switch_aux_loss(scores_TE, counts_E, T, K, self.options.coeff)
