"""The one configuration dataclass of the MoE language model."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from moebal.routing import RouterConfig
from moebal.routing.validate import check_int, check_number

# RouterConfig fields the model sets itself; router_options may not repeat them.
_ROUTER_FIELDS_FROM_MODEL = ("num_experts", "top_k", "balancer")


@dataclass
class ModelConfig:
    """A decoder-only MoE transformer.

    vocab_size          tokens in the vocabulary (embeddings are tied to the output layer).
    seq_len             longest sequence the model takes (size of the rotary table).
    d_model, n_layers, n_heads
                        D, number of blocks, attention heads (D / n_heads must be even).
    num_experts, top_k  E routed experts per MoE layer, K chosen per token.
    expert_hidden       F, hidden size of each routed SwiGLU expert.
    num_shared_experts  always-on SwiGLU experts of hidden F each (0 = none).
    dense_layers        the first ``dense_layers`` blocks use a dense SwiGLU FFN.
    dense_hidden        hidden size of those dense FFNs; None = top_k * expert_hidden,
                        the active size of a routed layer.
    balancer            any registered balancer name (``moebal.routing.BALANCERS``).
    router_options      the router's other options in flat form: router knobs
                        (score_function, capacity_factor, ...) and balancer options under
                        their flat names (aux_loss_coeff, bip_iters, ...; see
                        ``moebal.routing.router_option_names()``). Each is validated; those
                        the chosen balancer does not read are left out, so one set can be
                        shared by several balancers (``moebal compare``). The typed config
                        the routers are built from is ``router_config()``.
    init_std            std of the normal initialisation; residual output projections use
                        init_std / sqrt(2 * n_layers) (GPT-2).
    """

    vocab_size: int = 8192
    seq_len: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    num_experts: int = 16
    top_k: int = 2
    expert_hidden: int = 256
    num_shared_experts: int = 0
    dense_layers: int = 0
    dense_hidden: Optional[int] = None
    balancer: str = "none"
    router_options: dict[str, Any] = field(default_factory=dict)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        positive = ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "num_experts",
                    "top_k", "expert_hidden")
        for name in positive:
            check_int(name, getattr(self, name), minimum=1)
        for name in ("num_shared_experts", "dense_layers"):
            check_int(name, getattr(self, name), minimum=0)
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"head size d_model/n_heads={self.d_model // self.n_heads} must be even "
                f"for rotary positions"
            )
        if self.dense_layers > self.n_layers:
            raise ValueError(
                f"dense_layers={self.dense_layers} exceeds n_layers={self.n_layers}"
            )
        if self.dense_hidden is not None:
            check_int("dense_hidden (None: top_k * expert_hidden)", self.dense_hidden, minimum=1)
        check_number("init_std", self.init_std, low=0.0, low_open=True)
        if not isinstance(self.router_options, dict):
            raise TypeError(
                f"router_options must be a dict, got {type(self.router_options).__name__}"
            )
        for name in _ROUTER_FIELDS_FROM_MODEL:
            if name in self.router_options:
                raise ValueError(
                    f"router_options may not set {name!r}; it is the model config's own field"
                )
        self.router_config()  # validates balancer and router options

    @property
    def ffn_dense_hidden(self) -> int:
        """Hidden size of the dense FFN blocks."""
        return self.dense_hidden if self.dense_hidden is not None else (
            self.top_k * self.expert_hidden)

    @property
    def num_moe_layers(self) -> int:
        return self.n_layers - self.dense_layers

    def router_config(self) -> RouterConfig:
        """The RouterConfig every MoE layer's router is built from."""
        try:
            return RouterConfig.from_options(
                num_experts=self.num_experts,
                top_k=self.top_k,
                balancer=self.balancer,
                strict=False,
                **copy.deepcopy(self.router_options),
            )
        except TypeError as exc:  # an unknown option name
            raise ValueError(str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``ModelConfig.from_dict(c.to_dict()) == c``."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return dataclass_from_dict(cls, d)


def dataclass_from_dict(cls: type, d: dict[str, Any]) -> Any:
    """``cls(**d)`` for a config dataclass, refusing a non-dict and unknown field names."""
    if not isinstance(d, dict):
        raise TypeError(f"{cls.__name__}.from_dict takes a dict, got {type(d).__name__}")
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}")
    return cls(**copy.deepcopy(d))
