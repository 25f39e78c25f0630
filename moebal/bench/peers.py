"""The peers' routers as callables on logits, for ``moebal bench router --peers``.

Each callable runs, on a ``[T, E]`` float32 logits tensor, what the peer's router does per
batch in training, with the peer's own functions (nothing of theirs is re-implemented):

- ``megatron aux``: Megatron-core's ``topk_routing_with_score_function`` (softmax), the
  scores and routing map for the auxiliary loss (``compute_routing_scores_for_aux_loss``),
  the tokens per expert, ``switch_load_balancing_loss_func`` and the loss attached to the
  probabilities (``MoEAuxLossAutoScaler``), as its ``TopKRouter`` does on one rank;
- ``megatron bias``: ``topk_routing_with_score_function`` with an ``expert_bias`` and the
  tokens per expert its router accumulates (the E-sized sign update runs at the
  optimizer step behind an all-reduce: not timed);
- ``torchtitan bias``: torchtitan's ``TokenChoiceTopKRouter`` (softmax, with
  ``expert_bias_E``; its gate replaced by the identity so that it routes the given logits)
  and the routing map and tokens per expert of its ``MoE.forward``.

A peer that is not importable is left out (:func:`peer_methods` says which and why).
Megatron-core 0.16.1 has no quantile balancing (it is on Megatron-LM's main branch only).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

Method = Callable[[torch.Tensor], Any]


def megatron_methods(experts: int, top_k: int) -> dict[str, Method]:
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        compute_routing_scores_for_aux_loss,
        switch_load_balancing_loss_func,
        topk_routing_with_score_function,
    )

    def aux(logits_TE: torch.Tensor) -> Any:
        probs_TE, routing_map_TE = topk_routing_with_score_function(
            logits_TE, top_k, score_function="softmax")
        aux_map_TE, aux_scores_TE = compute_routing_scores_for_aux_loss(
            logits_TE, top_k, "softmax")
        tokens_E = aux_map_TE.sum(dim=0)
        loss = switch_load_balancing_loss_func(
            probs=aux_scores_TE, tokens_per_expert=tokens_E,
            total_num_tokens=logits_TE.shape[0], topk=top_k, num_experts=experts,
            moe_aux_loss_coeff=1e-2)
        return MoEAuxLossAutoScaler.apply(probs_TE, loss), routing_map_TE

    bias_E = torch.zeros(experts)
    local_tokens_E = torch.zeros(experts)

    def bias(logits_TE: torch.Tensor) -> Any:
        probs_TE, routing_map_TE = topk_routing_with_score_function(
            logits_TE, top_k, score_function="softmax", expert_bias=bias_E)
        with torch.no_grad():
            local_tokens_E.add_(routing_map_TE.sum(dim=0))
        return probs_TE, routing_map_TE

    return {"megatron aux": aux, "megatron bias": bias}


def torchtitan_methods(experts: int, top_k: int) -> dict[str, Method]:
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import TokenChoiceTopKRouter

    router = TokenChoiceTopKRouter(TokenChoiceTopKRouter.Config(
        num_experts=experts, gate=Linear.Config(in_features=experts, out_features=experts),
        top_k=top_k, score_func="softmax"))
    router.gate = torch.nn.Identity()
    bias_E = torch.zeros(experts)
    tokens_E = torch.zeros(experts)

    def bias(logits_TE: torch.Tensor) -> Any:
        scores_BLK, ids_BLK, scores_BLE = router(logits_TE[None], bias_E)
        routing_map_BLE = torch.zeros_like(scores_BLE, dtype=torch.bool).scatter_(
            -1, ids_BLK, True)
        with torch.no_grad():
            tokens_E.add_(routing_map_BLE.sum(dim=(0, 1)))
        return scores_BLK, ids_BLK

    return {"torchtitan bias": bias}


def peer_methods(experts: int, top_k: int) -> tuple[dict[str, Method], dict[str, str]]:
    """``(methods, missing)``: the importable peers' callables, and for each peer left out
    the reason (its import error)."""
    methods: dict[str, Method] = {}
    missing: dict[str, str] = {}
    for peer, build in (("megatron-core", megatron_methods), ("torchtitan", torchtitan_methods)):
        try:
            methods.update(build(experts, top_k))
        except ImportError as exc:
            missing[peer] = f"{type(exc).__name__}: {exc}"
    return methods, missing
