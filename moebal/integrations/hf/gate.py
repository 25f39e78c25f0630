"""What a patched ``transformers`` router module runs: the model's logits, moebal's choice.

The logits come from the router module's own weight by the model's arithmetic
(:func:`model_logits`); the choice, the gate weights, the losses and the balancer's update
come from moebal's one gate-and-router core, :class:`moebal.routing.Router`, routing into
the forward's :class:`moebal.routing.RoutingLog`; :func:`model_outputs` returns its answer
in the module's own form.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Iterable, Optional

import torch
from torch import nn

from moebal.integrations.hf.families import GateSpec, gate_attr
from moebal.integrations.hf.forward import ModelForward
from moebal.routing import Router, RouterConfig, Routing, RoutingLog, gate_logits
from moebal.routing.router import recomputing

if TYPE_CHECKING:  # pragma: no cover
    import torch.distributed as dist

ADAPTER_ATTR = "_moebal_adapter"  # plain attribute of a patched router module


def model_logits(gate: nn.Module, spec: GateSpec, x_TD: torch.Tensor) -> torch.Tensor:
    """[T, E] logits of the router module ``gate``, computed as the model computes them."""
    weight_ED = gate_attr(gate, spec.weight)
    bias_E = gate_attr(gate, spec.bias) if spec.bias else None
    if spec.rms_input:
        x_TD = gate.norm(x_TD) * gate.scale * gate.scalar_root_size
    if spec.fp32_no_autocast:
        return gate_logits(x_TD, weight_ED, bias_E, float32=True)
    if spec.linear_fp32:  # float32 copies, as the model makes them (autocast applies)
        x_TD, weight_ED = x_TD.float(), weight_ED.float()
        bias_E = None if bias_E is None else bias_E.float()
    elif spec.input_to_weight:
        x_TD = x_TD.to(weight_ED.dtype)
    logits_TE = gate_logits(x_TD, weight_ED, bias_E, float32=False)
    if spec.logits_fp32:
        logits_TE = logits_TE.float()
    if spec.logit_scale is not None:
        logits_TE = logits_TE * getattr(gate, spec.logit_scale)
    if spec.logit_softcap is not None and getattr(gate, spec.logit_softcap) > 0:
        cap = getattr(gate, spec.logit_softcap)
        logits_TE = torch.tanh(logits_TE / cap) * cap
    return logits_TE


def model_outputs(
    gate: nn.Module, spec: GateSpec, routing: Routing, logits_TE: torch.Tensor,
    hidden_dtype: torch.dtype,
) -> tuple[torch.Tensor, ...]:
    """``routing`` as the router module returns it: ``(logits, weights, indices)``, the K
    slots best expert first, the weights times the model's scaling factor in its dtype; or,
    for ``spec.output == "dense"`` (Llama 4), ``(weights_TE, logits)`` with each token's
    weights scattered over all experts (0 where not chosen), as the model applies them."""
    order_TK = torch.argsort(routing.weights_TK.detach(), dim=-1, descending=True, stable=True)
    weights_TK = routing.weights_TK.gather(1, order_TK)
    indices_TK = routing.indices_TK.gather(1, order_TK)
    if spec.scale is not None:
        weights_TK = weights_TK * getattr(gate, spec.scale)
    if spec.divide_by is not None:
        weights_TK = weights_TK / getattr(gate, spec.divide_by)
    if spec.expert_scale is not None:
        weights_TK = weights_TK * gate_attr(gate, spec.expert_scale)[indices_TK]
    if spec.weights_dtype == "logits":
        weights_TK = weights_TK.to(logits_TE.dtype)
    elif spec.weights_dtype == "hidden":
        weights_TK = weights_TK.to(hidden_dtype)
    if spec.output == "dense":
        dense_TE = torch.zeros_like(logits_TE, dtype=weights_TK.dtype)
        return dense_TE.scatter(1, indices_TK, weights_TK), logits_TE
    if spec.output == "probs":
        return torch.softmax(logits_TE, dim=-1, dtype=torch.float32), weights_TK, indices_TK
    return logits_TE, weights_TK, indices_TK


def with_padding(router: Router, logits_TE: torch.Tensor, valid_T: torch.Tensor,
                 log: Optional[RoutingLog]) -> Routing:
    """Route the tokens ``valid_T`` keeps through ``router`` (their loads, losses and the
    balancer's update are the routing's) and the others, padding, by the plain top-k of the
    scores, as the model itself would: padding takes no capacity and counts as no load."""
    config = router.config
    valid_T = valid_T.to(logits_TE.device)  # the mask's device may not be this layer's
    real = router(logits_TE[valid_T], None, log=log)
    scores_PE = router.scores(logits_TE[~valid_T])
    pad_weights_PK, pad_indices_PK = torch.topk(scores_PE, config.top_k, dim=-1)
    if config.norm_topk_prob:
        pad_weights_PK = pad_weights_PK / pad_weights_PK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    T, K = logits_TE.shape[0], config.top_k
    indices_TK = real.indices_TK.new_empty(T, K)
    indices_TK[valid_T] = real.indices_TK
    indices_TK[~valid_T] = pad_indices_PK
    weights_TK = real.weights_TK.new_zeros(T, K).index_put((valid_T,), real.weights_TK)
    weights_TK = weights_TK.index_put((~valid_T,), pad_weights_PK.to(weights_TK.dtype))
    kept_TK = torch.ones(T, K, dtype=torch.bool, device=logits_TE.device)
    kept_TK[valid_T] = real.kept_TK
    return Routing(indices_TK, weights_TK, kept_TK, real.aux_loss, real.z_loss, real.loads_E)


class GateAdapter(nn.Module):
    """Routes one patched router module through a :class:`moebal.routing.Router`.

    name, class_name  the router module's name in the model and its class (for messages).
    layer, forward    the MoE layer's index and the patched model's :class:`ModelForward`:
                      its attention mask says which tokens count as load, its log takes the
                      balancer update, and the routing is recorded when it ends (None: route
                      alone, update at once, record nothing, as the patch's probe does).
    checkpointed_by   the modules above the router with a ``gradient_checkpointing`` flag.

    The adapters of a patched model are registered as ``model.moebal`` (a ModuleList, one per
    MoE layer in model order), so each ``router`` and its balancer's buffers are part of the
    model: ``state_dict`` keys ``moebal.<i>.router.balancer.*``, the same whatever the
    model's module names or the renaming ``save_pretrained`` applies to them. ``seq_len`` is
    the tokens per sequence of the current batch (set by :class:`SeqLenHook`).
    """

    def __init__(
        self, name: str, class_name: str, spec: GateSpec, config: RouterConfig, *,
        layer: int = 0, forward: Optional[ModelForward] = None,
        group: Optional["dist.ProcessGroup"] = None, checkpointed_by: Iterable[nn.Module] = (),
    ):
        super().__init__()
        self.name = name
        self.class_name = class_name
        self.spec = spec
        self.router = Router(config, group=group)
        self.layer = layer
        self.model_forward = forward
        self.seq_len: Optional[int] = None
        self.checkpointed_by = list(checkpointed_by)
        # the padding of each checkpointed forward, for backward's recompute (the router
        # keeps the balancer state that forward saw)
        self._replay_valid: collections.deque = collections.deque()

    def extra_repr(self) -> str:
        return f"patches {self.name} ({self.class_name})"

    @property
    def pending_replays(self) -> int:
        """Checkpointed forwards whose recompute has not run yet."""
        return len(self._replay_valid)

    def end_step(self) -> None:
        """Forget what was kept for recomputes (an optimizer step is over)."""
        self._replay_valid.clear()

    def _checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.checkpointed_by)

    def _route(self, logits_TE: torch.Tensor, seq_len: Optional[int],
               valid_T: Optional[torch.Tensor], log: Optional[RoutingLog]) -> Routing:
        if valid_T is None:
            return self.router(logits_TE, seq_len, log=log)
        return with_padding(self.router, logits_TE, valid_T, log)

    def route(self, logits_TE: torch.Tensor, seq_len: Optional[int],
              valid_T: Optional[torch.Tensor] = None) -> Routing:
        """The router's answer for these logits, padding (``valid_T`` False) not counted. A
        checkpointed layer's recompute routes the tokens its forward routed, from the balancer
        state that forward saw, and changes nothing."""
        if self.training and recomputing():
            if self._replay_valid:
                valid_T = self._replay_valid.popleft()
            return self._route(logits_TE, seq_len, valid_T, None)
        checkpointing = self.training and self._checkpointing() and torch.is_grad_enabled()
        self.router.replay = checkpointing
        if checkpointing:
            self._replay_valid.append(valid_T)
        forward = self.model_forward
        log = None if forward is None else forward.log_for(self.layer)
        routing = self._route(logits_TE, seq_len, valid_T, log)
        if forward is not None:
            forward.routed(self.layer, routing, self.training)
        return routing

    def forward(self, gate: nn.Module, hidden_states: torch.Tensor):
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        seq_len = hidden_states.shape[1] if hidden_states.dim() == 3 else self.seq_len
        if seq_len is not None and (seq_len < 1 or x_TD.shape[0] % seq_len):
            seq_len = None
        logits_TE = model_logits(gate, self.spec, x_TD)
        forward = self.model_forward
        valid_T = None if forward is None else forward.valid_T(x_TD.shape[0], seq_len)
        routing = self.route(logits_TE, seq_len, valid_T)
        return model_outputs(gate, self.spec, routing, logits_TE, hidden_states.dtype)


def patched_gate_forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    """Replaces ``forward`` of a patched router module (bound to the instance); arguments
    after the hidden states (the expert bias some blocks pass) are the model's own balancing,
    which the balancer replaces."""
    return self.__dict__[ADAPTER_ATTR](self, hidden_states)


class SeqLenHook:
    """Forward pre-hook on the MoE block above a router: tells its adapter the sequence length
    of the block's ``[B, S, D]`` input (the router itself sees ``[B*S, D]``).

    An object, not a closure, so that ``copy.deepcopy`` of the model copies it with the
    model and the copy's hook feeds the copy's adapter."""

    def __init__(self, adapter: GateAdapter) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        self.adapter.seq_len = (
            int(x.shape[1]) if isinstance(x, torch.Tensor) and x.dim() == 3 else None
        )


__all__ = ["ADAPTER_ATTR", "GateAdapter", "SeqLenHook", "model_logits", "model_outputs",
           "patched_gate_forward", "with_padding"]
