"""Which ``transformers`` router modules moebal stands in for, and how each one routes.

A router is recognised by its class (or a ``transformers`` base class of it): a class in
:data:`SUPPORTED_ROUTERS` is described by a :class:`GateSpec`; a class in
:data:`UNSUPPORTED_ROUTERS` is refused with the reason given there.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

from torch import nn


@dataclass(frozen=True)
class GateSpec:
    """How one ``transformers`` router class computes its routing.

    families        model types that use it (for messages and docs).
    score_function  "softmax" or "sigmoid" over all experts.
    norm            True/False, or the gate attribute holding the model's
                    ``norm_topk_prob``: renormalise the K weights to sum 1.
    weights_dtype   dtype of the returned weights: "float32", "logits" or "hidden".
    weight, bias    attribute paths of the linear weight [E, D] and optional bias [E].
    linear_fp32     the logits come from float32 copies of input and weight (DeepSeek).
    input_to_weight the input is cast to the weight's dtype before the linear.
    logits_fp32     the logits are cast to float32 after the linear (Granite).
    scale           gate attribute of a factor on the K weights (routed_scaling_factor).
    correction_bias gate buffer of the model's own loss-free expert bias.
    groups          gate attributes (n_group, topk_group) of group-limited routing.
    topk_method     gate attribute that must be "greedy" (DeepSeek-V2).
    top_k, num_experts  gate attributes holding K and E.
    """

    families: tuple[str, ...]
    score_function: str = "softmax"
    norm: Union[bool, str] = True
    weights_dtype: str = "logits"
    weight: str = "weight"
    bias: Optional[str] = None
    linear_fp32: bool = False
    input_to_weight: bool = False
    logits_fp32: bool = False
    scale: Optional[str] = None
    correction_bias: Optional[str] = None
    groups: Optional[tuple[str, str]] = None
    topk_method: Optional[str] = None
    top_k: str = "top_k"
    num_experts: str = "num_experts"


_QWEN_LIKE = dict(norm="norm_topk_prob", weights_dtype="logits")
_DEEPSEEK_V3_LIKE = dict(
    score_function="sigmoid",
    norm="norm_topk_prob",
    weights_dtype="float32",
    linear_fp32=True,
    scale="routed_scaling_factor",
    correction_bias="e_score_correction_bias",
    groups=("num_group", "topk_group"),
)

# Router classes of transformers 5.x whose routing moebal reproduces; each is exercised by
# tests/test_hf.py (patched with balancer="none" == unpatched).
SUPPORTED_ROUTERS: dict[str, GateSpec] = {
    "MixtralTopKRouter": GateSpec(("mixtral",), norm=True, weights_dtype="float32"),
    "MiniMaxTopKRouter": GateSpec(("minimax",), norm=True, weights_dtype="float32"),
    "Qwen2MoeTopKRouter": GateSpec(("qwen2_moe",), **_QWEN_LIKE),
    "Qwen3MoeTopKRouter": GateSpec(("qwen3_moe",), **_QWEN_LIKE),
    "OlmoeTopKRouter": GateSpec(("olmoe",), **_QWEN_LIKE),
    "FlexOlmoTopKRouter": GateSpec(("flex_olmo",), **_QWEN_LIKE),
    "JambaTopKRouter": GateSpec(("jamba",), norm=False, weights_dtype="hidden"),
    "HunYuanMoEV1Gate": GateSpec(
        ("hunyuan_v1_moe",), norm=True, weights_dtype="logits", weight="wg.weight",
        input_to_weight=True,
    ),
    # top-k of the logits, then softmax over those K: the renormalised softmax top-k
    "GraniteMoeTopKRouter": GateSpec(
        ("granitemoe",), norm=True, weights_dtype="hidden", logits_fp32=True
    ),
    "GraniteMoeSharedTopKRouter": GateSpec(
        ("granitemoeshared",), norm=True, weights_dtype="hidden", logits_fp32=True
    ),
    "GptOssTopKRouter": GateSpec(("gpt_oss",), norm=True, weights_dtype="logits", bias="bias"),
    "DeepseekV2TopkRouter": GateSpec(
        ("deepseek_v2",), norm=False, weights_dtype="float32", linear_fp32=True,
        scale="routed_scaling_factor", topk_method="topk_method",
    ),
    "DeepseekV3TopkRouter": GateSpec(("deepseek_v3",), **_DEEPSEEK_V3_LIKE),
    "Glm4MoeTopkRouter": GateSpec(("glm4_moe",), **_DEEPSEEK_V3_LIKE),
    "Dots1TopkRouter": GateSpec(("dots1",), **_DEEPSEEK_V3_LIKE),
}

# MoE routers that moebal recognises but cannot stand in for, and why.
UNSUPPORTED_ROUTERS: dict[str, str] = {
    "PhimoeTopKRouter": "routes with sparsemixer (a sampled, masked top-k), not a top-k of scores",
    "SwitchTransformersTop1Router": "applies capacity inside the router and returns a one-hot "
    "dispatch mask instead of expert indices",
    "NllbMoeTop2Router": "applies capacity and a second-expert sampling policy inside the router",
    "Llama4Router": "returns sigmoid scores over all experts rather than K indices and weights",
    "DbrxRouter": "returns only logits; the top-k is taken inside the MoE block",
    "JetMoeTopKGating": "returns a token permutation rather than K indices and weights",
    "DeepseekV4HashRouter": "chooses experts by a fixed token-id table, not by scores",
    "Ernie4_5_MoeTopKRouter": "chooses by scores corrected with its own statistics module",
    "Lfm2MoeTopKRouter": "takes the expert bias as a forward argument from the block",
    "AfmoeTokenChoiceRouter": "takes the expert bias as a forward argument from the block",
    "MiniMaxM2TopKRouter": "takes the expert bias as a forward argument from the block",
    "ZayaRouter": "is an MLP router with a skip expert",
}


class FoundGate(NamedTuple):
    """A supported router module of a model: its name, class, the module and its spec."""

    name: str
    class_name: str
    module: nn.Module
    spec: GateSpec

    @property
    def where(self) -> str:
        return f"{self.name} ({self.class_name})"


def router_class(module: nn.Module) -> Optional[str]:
    """The name of the ``transformers`` router class moebal knows ``module`` by (its own class
    or a base class, supported or not), or None."""
    for cls in type(module).__mro__:
        if not cls.__module__.startswith("transformers."):
            continue
        if cls.__name__ in SUPPORTED_ROUTERS or cls.__name__ in UNSUPPORTED_ROUTERS:
            return cls.__name__
    return None


def find_gates(model: nn.Module) -> tuple[list[FoundGate], list[str]]:
    """The supported router modules of ``model`` in model order, and one line per router moebal
    cannot stand in for (its name, class and why)."""
    found, unsupported = [], []
    for name, module in model.named_modules():
        class_name = router_class(module)
        if class_name is None:
            continue
        if class_name in UNSUPPORTED_ROUTERS:
            unsupported.append(f"{name} ({class_name}): {UNSUPPORTED_ROUTERS[class_name]}")
        else:
            found.append(FoundGate(name, class_name, module, SUPPORTED_ROUTERS[class_name]))
    return found, unsupported


def gate_attr(gate: nn.Module, path: str) -> Any:
    """The attribute at the dotted ``path`` of a router module (``"wg.weight"``)."""
    return operator.attrgetter(path)(gate)


def model_norm(gate: nn.Module, spec: GateSpec) -> bool:
    """Whether the router renormalises its K weights (its ``norm_topk_prob``)."""
    return bool(getattr(gate, spec.norm) if isinstance(spec.norm, str) else spec.norm)


__all__ = [
    "FoundGate",
    "GateSpec",
    "SUPPORTED_ROUTERS",
    "UNSUPPORTED_ROUTERS",
    "find_gates",
    "gate_attr",
    "model_norm",
    "router_class",
]
