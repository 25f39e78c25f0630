"""A drop-in MoE gate for your own PyTorch MoE code.

``MoEGate`` is the gate linear layer plus moebal's :class:`~moebal.routing.Router`: hidden
states in, the K experts of every token out, with gate weights, the balancer's auxiliary
loss and the loads per expert. It replaces the two lines most MoE blocks start with::

    logits_TE = self.gate(x_TD)                                   # nn.Linear(D, E)
    weights_TK, indices_TK = torch.topk(logits_TE.softmax(-1), K)

by::

    out = self.gate(x_TD)              # MoEGate(D, E, top_k=K, balancer="bip")
    out.indices_TK, out.weights_TK     # and out.loss to add to the model's loss

and ``gate.step()`` once per optimizer step. ``MoEGate.from_linear(linear, ...)`` keeps the
weights of an existing ``nn.Linear`` gate (the parameter keeps its name ``weight``, so old
checkpoints load). Option names follow Megatron-core; see docs/migrating.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from moebal.metrics import max_violation
from moebal.routing import Router, RouterConfig, Routing, RoutingLog

if TYPE_CHECKING:  # pragma: no cover
    import torch.distributed as dist


@dataclass
class GateOutput(Routing):
    """A :class:`Routing` plus the gate's logits.

    indices_TK, weights_TK, kept_TK, aux_loss, z_loss, loads_E as in ``Routing``
    (``loss`` = aux_loss + z_loss); logits_TE the raw gate logits (float32 when the input
    is, else the input's dtype; always given by ``MoEGate``). Weights are float32.
    """

    logits_TE: Optional[torch.Tensor] = None

    def max_vio(self) -> float:
        """MaxVio of these loads against the ideal ``T*K/E`` (``moebal.metrics``)."""
        E = self.loads_E.numel()
        return max_violation(self.loads_E, ideal=self.routed_slots / E if E else None)


class MoEGate(nn.Module):
    """Gate linear layer + balanced top-k router.

    hidden_size, num_experts, top_k   D, E, K.
    balancer                          a registered balancer name ("none", "aux_loss",
                                      "loss_free", "bip", ...: ``moebal.routing.BALANCERS``).
    bias                              give the gate linear a bias (most MoE gates have none).
    topk_scaling_factor               multiply the K gate weights by this (Megatron-core's
                                      moe_router_topk_scaling_factor, torchtitan's
                                      route_scale, DeepSeek's routed_scaling_factor).
    router_options                    other :class:`RouterConfig` fields: score_function,
                                      norm_topk_prob, capacity_factor, drop_policy,
                                      aux_loss_coeff, z_loss_coeff, bias_update_rate, ...
    group                             data-parallel process group whose loads the balancer
                                      all-reduces (None: this process only).

    ``forward(x, seq_len=None, log=None)`` takes ``x`` of shape [T, D] or [B, S, D] (then
    ``seq_len=S``, as the sequence-wise aux loss needs) and returns a :class:`GateOutput`
    over the T (= B*S) tokens. Call ``step()`` once per optimizer step. Pass one
    :class:`~moebal.routing.RoutingLog` to every gate of a model forward and call its
    ``commit()`` at the end to make the balancer updates all or nothing; without one each
    gate applies its own update before returning.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        balancer: str = "none",
        *,
        bias: bool = False,
        topk_scaling_factor: Optional[float] = None,
        group: Optional["dist.ProcessGroup"] = None,
        **router_options: Any,
    ) -> None:
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if topk_scaling_factor is not None and not (
            isinstance(topk_scaling_factor, (int, float))
            and math.isfinite(topk_scaling_factor) and topk_scaling_factor > 0
        ):
            raise ValueError(
                f"topk_scaling_factor must be None or a positive number, got {topk_scaling_factor!r}"
            )
        try:
            config = RouterConfig.from_options(
                num_experts=num_experts, top_k=top_k, balancer=balancer, **router_options
            )
        except TypeError as exc:  # unknown option name
            raise TypeError(f"MoEGate: {exc}") from None
        self.hidden_size = hidden_size
        self.topk_scaling_factor = topk_scaling_factor
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.empty(num_experts)) if bias else None
        self.router = Router(config, group=group)
        self.last_loads_E: Optional[torch.Tensor] = None
        self.reset_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, top_k: int = 2, balancer: str = "none",
                    **options: Any) -> "MoEGate":
        """A gate that shares the weight (and bias) of an existing ``nn.Linear(D, E)``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        gate = cls(linear.in_features, linear.out_features, top_k, balancer,
                   bias=linear.bias is not None, **options)
        gate.weight = linear.weight
        if linear.bias is not None:
            gate.bias = linear.bias
        gate.router.to(linear.weight.device)
        return gate

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        if self.bias is not None:
            bound = 1 / self.hidden_size ** 0.5
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def config(self) -> RouterConfig:
        return self.router.config

    def extra_repr(self) -> str:
        scale = "" if self.topk_scaling_factor is None else f", scale={self.topk_scaling_factor}"
        return f"hidden_size={self.hidden_size}, bias={self.bias is not None}{scale}"

    def forward(
        self, x: torch.Tensor, seq_len: Optional[int] = None, log: Optional[RoutingLog] = None
    ) -> GateOutput:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MoEGate takes a tensor, got {type(x).__name__}")
        if x.dim() not in (2, 3) or x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"MoEGate(hidden_size={self.hidden_size}) takes [tokens, {self.hidden_size}] "
                f"or [batch, seq, {self.hidden_size}], got shape {tuple(x.shape)}"
            )
        if x.dim() == 3:
            if seq_len is not None and seq_len != x.shape[1]:
                raise ValueError(f"seq_len={seq_len!r} but the input has sequences of {x.shape[1]}")
            seq_len = x.shape[1]
        x_TD = x.reshape(-1, self.hidden_size)
        logits_TE, routing = self.router.route(x_TD, self.weight, self.bias, seq_len=seq_len,
                                               log=log, float32=False)
        self.last_loads_E = routing.loads_E.detach()
        weights_TK = routing.weights_TK
        if self.topk_scaling_factor is not None:
            weights_TK = weights_TK * self.topk_scaling_factor
        return GateOutput(
            indices_TK=routing.indices_TK,
            weights_TK=weights_TK,
            kept_TK=routing.kept_TK,
            aux_loss=routing.aux_loss,
            z_loss=routing.z_loss,
            loads_E=routing.loads_E,
            scores_TE=routing.scores_TE,
            logits_TE=logits_TE,
        )

    def max_vio(self) -> float:
        """MaxVio of the loads of the last forward (nan before the first).

        Kept for existing code; prefer ``out.max_vio()`` on the forward's result, which
        also counts slots dropped by capacity.
        """
        if self.last_loads_E is None:
            return float("nan")
        return max_violation(self.last_loads_E)

    def step(self) -> None:
        """Once per optimizer step: stateful balancers update from the loads seen since."""
        self.router.step()


__all__ = ["GateOutput", "MoEGate"]
