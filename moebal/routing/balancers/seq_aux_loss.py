"""DeepSeek-V3's sequence-wise auxiliary loss (Megatron-core's ``seq_aux_loss``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moebal.routing.kernels import expert_counts
from moebal.routing.balancers.aux_loss import AuxLoss, aux_loss_scores
from moebal.routing.balancers.base import Balancer, RoutingContext, register_balancer


@register_balancer("seq_aux_loss")
class SeqAuxLoss(Balancer):
    """The Switch loss taken per sequence and averaged over the sequences of the batch.

    The batch is a stack of whole sequences of ``seq_len`` tokens each (token t belongs to
    sequence ``t // seq_len``); with ``seq_len=None`` the whole batch is one sequence. For
    sequence b with S tokens::

        L_b = alpha * sum_j f_bj * P_bj,   f_bj = E / (K S) * #{t in b choosing j},
                                           P_bj = mean_{t in b} s'_tj

    where ``s'`` are the scores normalised to sum 1 over the experts (a no-op for softmax).
    The loss is ``mean_b L_b``: alpha when every sequence is balanced. alpha =
    ``options.coeff`` (flat name ``aux_loss_coeff``).
    """

    @dataclass(kw_only=True)
    class Config(AuxLoss.Config):
        """coeff: alpha of the loss (flat name ``aux_loss_coeff``)."""

    def loss(
        self, scores_TE: torch.Tensor, indices_TK: torch.Tensor, ctx: RoutingContext
    ) -> torch.Tensor:
        T, E = scores_TE.shape
        K = indices_TK.shape[1]
        S = T if ctx.seq_len is None else ctx.seq_len
        B = T // S
        scores_TE = aux_loss_scores(scores_TE, self.config.score_function)
        probs_BE = scores_TE.view(B, S, E).mean(dim=1)
        if B == 1 and ctx.counts_E is not None:
            counts_BE = ctx.counts_E.view(1, E)
        else:
            seq_T = torch.arange(T, device=indices_TK.device) // S
            flat = (seq_T.unsqueeze(1) * E + indices_TK).flatten()
            counts_BE = expert_counts(flat, B * E).view(B, E)
        f_BE = counts_BE.to(probs_BE.dtype) * (E / (K * S))
        return (f_BE * probs_BE).sum() * (self.options.coeff / B)
