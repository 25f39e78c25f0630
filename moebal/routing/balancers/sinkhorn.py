"""Sinkhorn routing (S-BASE) as in Megatron-core: balance the choice, not the weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from moebal.routing.balancers.base import (
    Balancer,
    BalancerConfig,
    RoutingContext,
    register_balancer,
)
from moebal.routing.kernels import topk_indices
from moebal.routing.validate import check_int, check_number


def sinkhorn(logits_TE: torch.Tensor, tol: float = 1e-4, max_iters: int = 1000) -> torch.Tensor:
    """Megatron-core's Sinkhorn scaling of ``exp(logits)`` towards uniform marginals.

    Alternates ``d0_i = 1 / (T * sum_j d1_j c_ij)`` and ``d1_j = 1 / (E * sum_i d0_i c_ij)``
    with ``c = exp(logits)`` until the mean absolute change of ``d1`` is below ``tol`` (or
    ``max_iters`` iterations); returns ``d1_j * c_ij * d0_i``. Each row of ``c`` is divided
    by its largest entry first, which rescales ``d0`` and changes nothing else (no overflow
    for large logits).
    """
    cost_TE = torch.exp(logits_TE - logits_TE.amax(dim=1, keepdim=True))
    T, E = cost_TE.shape
    eps = 1e-8
    d1_E = torch.ones(E, dtype=cost_TE.dtype, device=cost_TE.device)
    for _ in range(max_iters):
        d0_T = (1.0 / T) / (cost_TE @ d1_E + eps)
        d1_new = (1.0 / E) / (d0_T @ cost_TE + eps)
        error = (d1_new - d1_E).abs().mean()
        d1_E = d1_new
        if float(error) <= tol:
            break
    return cost_TE * d1_E * d0_T.unsqueeze(1)


@register_balancer("sinkhorn")
class SinkhornBalancer(Balancer):
    """In training, token i takes the top-k of the Sinkhorn-balanced ``exp(l)``.

    As in Megatron-core: Sinkhorn runs on the logits (in float32) only to choose; gate
    weights are the unbiased scores; in ``eval()`` the choice is the plain top-k of the
    scores. No state, no loss. Iterates to ``options.tol`` (Megatron-core: 1e-4), at most
    ``options.iters`` times.
    """

    @dataclass(kw_only=True)
    class Config(BalancerConfig):
        """iters: cap on iterations per batch (flat ``sinkhorn_iters``); tol: stop when the
        mean change of the expert scaling is below it (``sinkhorn_tol``)."""

        iters: int = 1000
        tol: float = 1e-4
        flat_names: ClassVar[dict[str, str]] = {"iters": "sinkhorn_iters", "tol": "sinkhorn_tol"}

        def validate(self) -> None:
            check_int("sinkhorn_iters", self.iters, minimum=1)
            check_number("sinkhorn_tol", self.tol, low=0.0, low_open=True)

    reads_on_host = True  # the tolerance test reads the error each iteration

    def select(self, scores_TE: torch.Tensor, top_k: int, ctx: RoutingContext) -> torch.Tensor:
        allowed_TE = ctx.allowed_TE
        if not self.training:
            if allowed_TE is not None:
                scores_TE = scores_TE.masked_fill(~allowed_TE, float("-inf"))
            return topk_indices(scores_TE, top_k)
        with torch.no_grad():
            logits_TE = ctx.logits_TE.detach().float()
            if allowed_TE is not None:  # exp(-inf) = 0: no mass on experts out of the groups
                logits_TE = logits_TE.masked_fill(~allowed_TE, float("-inf"))
            balanced_TE = sinkhorn(logits_TE, self.options.tol, self.options.iters)
            if allowed_TE is not None:
                balanced_TE.masked_fill_(~allowed_TE, float("-inf"))
        return topk_indices(balanced_TE, top_k)
