"""What a patched ``transformers`` router module runs: the model's logits, moebal's choice."""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moebal.integrations.hf.families import GateSpec, gate_attr
from moebal.integrations.hf.record import RoutingRecord
from moebal.integrations.hf.tokens import AttentionMask
from moebal.routing import Router, RouterConfig, Routing

if TYPE_CHECKING:  # pragma: no cover
    import torch.distributed as dist

ADAPTER_ATTR = "_moebal_adapter"  # plain attribute of a patched router module


def gate_logits(gate: nn.Module, spec: GateSpec, x_TD: torch.Tensor) -> torch.Tensor:
    """[T, E] logits of the router module ``gate``, computed as the model computes them."""
    weight_ED = gate_attr(gate, spec.weight)
    bias_E = gate_attr(gate, spec.bias) if spec.bias else None
    if spec.linear_fp32:
        return F.linear(x_TD.float(), weight_ED.float(), None if bias_E is None else bias_E.float())
    if spec.input_to_weight:
        x_TD = x_TD.to(weight_ED.dtype)
    logits_TE = F.linear(x_TD, weight_ED, bias_E)
    return logits_TE.float() if spec.logits_fp32 else logits_TE


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
    if spec.weights_dtype == "logits":
        weights_TK = weights_TK.to(logits_TE.dtype)
    elif spec.weights_dtype == "hidden":
        weights_TK = weights_TK.to(hidden_dtype)
    if spec.output == "dense":
        dense_TE = torch.zeros_like(logits_TE, dtype=weights_TK.dtype)
        return dense_TE.scatter(1, indices_TK, weights_TK), logits_TE
    return logits_TE, weights_TK, indices_TK


def with_padding(router: Router, logits_TE: torch.Tensor, valid_T: torch.Tensor,
                 seq_len: Optional[int]) -> Routing:
    """Route the tokens ``valid_T`` keeps through ``router`` (their loads, losses and the
    balancer's update are the routing's) and the others, padding, by the plain top-k of the
    scores, as the model itself would: padding takes no capacity and counts as no load."""
    config = router.config
    real = router(logits_TE[valid_T], seq_len=seq_len)
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
    layer, record     the MoE layer's index and the :class:`RoutingRecord` each forward adds
                      its :class:`Routing` to (None: not recorded, as for the patch's probe).
    tokens            the :class:`AttentionMask` of the model forward: tokens it masks out
                      are routed but count as no load (None: every token counts).
    checkpointed_by   the modules above the router with a ``gradient_checkpointing`` flag.

    The adapters of a patched model are registered as ``model.moebal`` (a ModuleList, one per
    MoE layer in model order), so each ``router`` and its balancer's buffers are part of the
    model: ``state_dict`` keys ``moebal.<i>.router.balancer.*``, the same whatever the
    model's module names or the renaming ``save_pretrained`` applies to them. ``seq_len`` is
    the tokens per sequence of the current batch (set by :class:`SeqLenHook`).
    """

    def __init__(
        self, name: str, class_name: str, spec: GateSpec, config: RouterConfig, *,
        layer: int = 0, record: Optional[RoutingRecord] = None,
        tokens: Optional[AttentionMask] = None, group: Optional["dist.ProcessGroup"] = None, checkpointed_by: Iterable[nn.Module] = (),
    ):
        super().__init__()
        self.name = name
        self.class_name = class_name
        self.spec = spec
        self.router = Router(config, group=group)
        self.layer = layer
        self.record = record
        self.tokens = tokens
        self.seq_len: Optional[int] = None
        self.checkpointed_by = list(checkpointed_by)
        # (balancer state, valid tokens) of each checkpointed forward, for backward's recompute
        self._replay: collections.deque = collections.deque()

    def extra_repr(self) -> str:
        return f"patches {self.name} ({self.class_name})"

    @property
    def pending_replays(self) -> int:
        """Checkpointed forwards whose recompute has not run yet."""
        return len(self._replay)

    def end_step(self) -> None:
        """Forget the balancer states saved for recomputes (an optimizer step is over)."""
        self._replay.clear()

    def _recomputing(self) -> bool:
        """True when autograd re-runs this forward for activation checkpointing."""
        return torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1

    def _checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.checkpointed_by)

    def _buffers_snapshot(self) -> dict[str, torch.Tensor]:
        return {name: buf.clone() for name, buf in self.router.named_buffers()}

    def _restore_buffers(self, snapshot: dict[str, torch.Tensor]) -> None:
        for name, value in snapshot.items():
            owner, _, leaf = name.rpartition(".")
            self.router.get_submodule(owner)._buffers[leaf] = value

    def _router(self, logits_TE: torch.Tensor, seq_len: Optional[int],
                valid_T: Optional[torch.Tensor]) -> Routing:
        if valid_T is None:
            return self.router(logits_TE, seq_len=seq_len)
        return with_padding(self.router, logits_TE, valid_T, None)

    def route(self, logits_TE: torch.Tensor, seq_len: Optional[int],
              valid_T: Optional[torch.Tensor] = None) -> Routing:
        """The router's answer for these logits, padding (``valid_T`` False) not counted; a
        checkpointed layer's recompute routes from the balancer state its forward saw and
        leaves the state as it found it."""
        if self.training and self._replay and self._recomputing():
            # Backward re-runs a checkpointed layer: route it again from the balancer state
            # (and the padding) its forward saw, so the choice and the saved tensors are the
            # forward's, then put the state back, so the balancer counts the batch once.
            state_now = self._buffers_snapshot()
            state_then, valid_T = self._replay.popleft()
            self._restore_buffers(state_then)
            routing = self._router(logits_TE, seq_len, valid_T)
            self._restore_buffers(state_now)
            return routing
        if self.training and self._checkpointing():
            self._replay.append((self._buffers_snapshot(), valid_T))
        routing = self._router(logits_TE, seq_len, valid_T)
        if self.record is not None:
            self.record.add(self.layer, routing, self.training)
        return routing

    def forward(self, gate: nn.Module, hidden_states: torch.Tensor):
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        seq_len = hidden_states.shape[1] if hidden_states.dim() == 3 else self.seq_len
        if seq_len is not None and (seq_len < 1 or x_TD.shape[0] % seq_len):
            seq_len = None
        logits_TE = gate_logits(gate, self.spec, x_TD)
        valid_T = None if self.tokens is None else self.tokens.valid_T(x_TD.shape[0], seq_len)
        routing = self.route(logits_TE, seq_len, valid_T)
        return model_outputs(gate, self.spec, routing, logits_TE, hidden_states.dtype)


def patched_gate_forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    """Replaces ``forward`` of a patched router module (bound to the instance)."""
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


__all__ = ["ADAPTER_ATTR", "GateAdapter", "SeqLenHook", "gate_logits", "model_outputs",
           "patched_gate_forward"]
