"""Which ``transformers`` router modules moebal stands in for, and how each one routes.

A router is recognised by its class (or a ``transformers`` base class of it): a class in
:data:`SUPPORTED_ROUTERS` is described by a :class:`GateSpec`; a class in
:data:`UNSUPPORTED_ROUTERS` is refused with the reason given there.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

import torch
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
    fp32_no_autocast  the same with autocast off (ERNIE, Flint).
    input_to_weight the input is cast to the weight's dtype before the linear.
    rms_input       the router normalises its input first (``gate.norm``, times
                    ``gate.scale`` and ``gate.scalar_root_size``: Gemma 4).
    logits_fp32     the logits are cast to float32 after the linear (Granite).
    logit_scale     gate attribute of a factor on the logits (MuSpark's output_multiplier).
    logit_softcap   gate attribute of a tanh soft cap on the logits (Laguna; 0 = none).
    scale           gate attribute of a factor on the K weights (routed_scaling_factor).
    divide_by       gate attribute the K weights are divided by (OpenAI's filter: top_k).
    expert_scale    gate parameter [E] of a learned factor on each chosen expert's weight.
    correction_bias gate attribute path of the model's own loss-free expert bias.
    bias_on_logits  that bias is added to the logits, not to the scores (Kolibri): the
                    loss-free balancer cannot start from it.
    block_bias      attribute of the MoE block (the router's parent) holding that bias, when
                    the block passes it to the router's forward (AFMoE, MiniMax-M2).
    score_attr      gate attribute naming the score function, over ``score_function``: a
                    name, or an activation module (``ACT2FN[config.scoring_func]``).
    norm_if_softmax the model's softmax is over the K largest logits (Cohere2): the K
                    weights sum to 1 whatever ``norm`` says.
    output          "topk": ``(logits, weights_TK, indices_TK)``; "probs" (Gemma 4): the
                    same with the float32 softmax of the logits first; "dense" (Llama 4):
                    ``(weights_TE, logits)``, each token's weights over all E experts.
    probe_3d        the router takes ``[B, S, D]`` only (its probe input is 3-D).
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
    fp32_no_autocast: bool = False
    input_to_weight: bool = False
    rms_input: bool = False
    logits_fp32: bool = False
    logit_scale: Optional[str] = None
    logit_softcap: Optional[str] = None
    scale: Optional[str] = None
    divide_by: Optional[str] = None
    expert_scale: Optional[str] = None
    correction_bias: Optional[str] = None
    block_bias: Optional[str] = None
    bias_on_logits: bool = False
    score_attr: Optional[str] = None
    norm_if_softmax: bool = False
    output: str = "topk"
    probe_3d: bool = False
    groups: Optional[tuple[str, str]] = None
    topk_method: Optional[str] = None
    top_k: str = "top_k"
    num_experts: str = "num_experts"


_QWEN_LIKE = dict(norm="norm_topk_prob", weights_dtype="logits")
_QWEN3_5_LIKE = dict(norm=True, weights_dtype="logits")
_GRANITE_LIKE = dict(norm=True, weights_dtype="hidden", logits_fp32=True)
_DEEPSEEK_V2_LIKE = dict(norm=False, weights_dtype="float32", linear_fp32=True,
                         scale="routed_scaling_factor", topk_method="topk_method")
_DEEPSEEK_V3_LIKE = dict(
    score_function="sigmoid",
    norm="norm_topk_prob",
    weights_dtype="float32",
    linear_fp32=True,
    scale="routed_scaling_factor",
    correction_bias="e_score_correction_bias",
    groups=("num_group", "topk_group"),
)
_MINIMAX_M2_LIKE = dict(score_function="sigmoid", norm=True, weights_dtype="float32",
                        input_to_weight=True)
_HY_V3_LIKE = dict(score_function="sigmoid", norm=True, weights_dtype="float32",
                   linear_fp32=True, scale="router_scaling_factor",
                   block_bias="e_score_correction_bias")
# the score function by config.scoring_func (sigmoid; DeepSeek-V4's sqrtsoftplus refused)
_INKLING2_LIKE = dict(score_attr="score_fn", norm=True, weights_dtype="float32",
                      linear_fp32=True, scale="routed_scaling_factor",
                      correction_bias="e_score_correction_bias")
# softmax top-k of the logits of its normalised input; each weight times a learned
# per-expert factor; returns the probabilities first
_GEMMA4_LIKE = dict(norm=True, weights_dtype="float32", weight="proj.weight", rms_input=True,
                    expert_scale="per_expert_scale", output="probs",
                    top_k="config.top_k_experts", num_experts="config.num_experts")
_ERNIE_LIKE = dict(norm=True, weights_dtype="hidden", fp32_no_autocast=True,
                   correction_bias="moe_statics.e_score_correction_bias")

# Router classes of transformers 5.x whose routing moebal reproduces; each is exercised by
# tests/test_hf.py (patched with balancer="none" == unpatched).
SUPPORTED_ROUTERS: dict[str, GateSpec] = {
    "MixtralTopKRouter": GateSpec(("mixtral",), norm=True, weights_dtype="float32"),
    "MiniMaxTopKRouter": GateSpec(("minimax",), norm=True, weights_dtype="float32"),
    "Qwen2MoeTopKRouter": GateSpec(("qwen2_moe",), **_QWEN_LIKE),
    "Qwen3MoeTopKRouter": GateSpec(("qwen3_moe",), **_QWEN_LIKE),
    "Qwen3NextTopKRouter": GateSpec(("qwen3_next",), **_QWEN_LIKE),
    "Qwen3OmniMoeThinkerTextTopKRouter": GateSpec(("qwen3_omni_moe",), **_QWEN_LIKE),
    "Qwen3OmniMoeTalkerTextTopKRouter": GateSpec(("qwen3_omni_moe",), **_QWEN_LIKE),
    "Qwen4ExpTextTopKRouter": GateSpec(("qwen4_exp",), **_QWEN_LIKE),
    "OlmoeTopKRouter": GateSpec(("olmoe",), **_QWEN_LIKE),
    "FlexOlmoTopKRouter": GateSpec(("flex_olmo",), **_QWEN_LIKE),
    "MellumTopKRouter": GateSpec(("mellum",), **_QWEN_LIKE),
    "Qwen3_5MoeTopKRouter": GateSpec(("qwen3_5_moe",), **_QWEN3_5_LIKE),
    "Qwen3OmniMoeTextTopKRouter": GateSpec(("qwen3_omni_moe",), **_QWEN3_5_LIKE),
    "Qwen3VLMoeTextTopKRouter": GateSpec(("qwen3_vl_moe",), **_QWEN3_5_LIKE),
    "LaraMiniTopKRouter": GateSpec(("lara_mini",), norm="norm_topk_prob",
                                   weights_dtype="hidden", linear_fp32=True),
    "JambaTopKRouter": GateSpec(("jamba",), norm=False, weights_dtype="hidden"),
    "HunYuanMoEV1Gate": GateSpec(
        ("hunyuan_v1_moe",), norm=True, weights_dtype="logits", weight="wg.weight",
        input_to_weight=True,
    ),
    # top-k of the logits, then softmax over those K: the renormalised softmax top-k
    "GraniteMoeTopKRouter": GateSpec(("granitemoe",), **_GRANITE_LIKE),
    "GraniteMoeSharedTopKRouter": GateSpec(("granitemoeshared",), **_GRANITE_LIKE),
    "GraniteMoeSWATopKRouter": GateSpec(("granitemoe_swa",), **_GRANITE_LIKE),
    "GraniteMoeHybridTopKRouter": GateSpec(("granitemoehybrid",), **_GRANITE_LIKE),
    "AriaTextTopKRouter": GateSpec(("aria",), norm=True, weights_dtype="logits",
                                   top_k="top_k", num_experts="num_experts"),
    "Cohere2MoeTopKRouter": GateSpec(("cohere2_moe",), score_attr="expert_selection_fn",
                                     norm="norm_topk_prob", norm_if_softmax=True,
                                     weights_dtype="hidden"),
    "GptOssTopKRouter": GateSpec(("gpt_oss",), norm=True, weights_dtype="logits", bias="bias"),
    "DeepseekV2TopkRouter": GateSpec(("deepseek_v2",), **_DEEPSEEK_V2_LIKE),
    "DeepseekOcr2TextTopkRouter": GateSpec(("deepseek_ocr2",), **_DEEPSEEK_V2_LIKE),
    "UnlimitedOcrTextTopkRouter": GateSpec(("unlimited_ocr",), **_DEEPSEEK_V2_LIKE),
    "DeepseekV3TopkRouter": GateSpec(("deepseek_v3", "sarvam_mla"), **_DEEPSEEK_V3_LIKE),
    "DeepseekV32TopkRouter": GateSpec(("deepseek_v32",), **_DEEPSEEK_V3_LIKE),
    "Glm4MoeTopkRouter": GateSpec(("glm4_moe", "sarvam_moe"), **_DEEPSEEK_V3_LIKE),
    "Glm4MoeLiteTopkRouter": GateSpec(("glm4_moe_lite",), **_DEEPSEEK_V3_LIKE),
    "Glm4vMoeTextTopkRouter": GateSpec(("glm4v_moe",), **_DEEPSEEK_V3_LIKE),
    "Glm5NextTextTopkRouter": GateSpec(("glm5_next",), **_DEEPSEEK_V3_LIKE),
    "GlmMoeDsaTopkRouter": GateSpec(("glm_moe_dsa",), **_DEEPSEEK_V3_LIKE),
    "Dots1TopkRouter": GateSpec(("dots1",), **_DEEPSEEK_V3_LIKE),
    "Dots3NoteTextTopkRouter": GateSpec(("dots3_note",), **_DEEPSEEK_V3_LIKE),
    "ExaoneMoeTopkRouter": GateSpec(("exaone_moe",), **_DEEPSEEK_V3_LIKE),
    "AXK1TopkRouter": GateSpec(("axk1",), **_DEEPSEEK_V3_LIKE),
    "AXK2TopkRouter": GateSpec(("axk2",), **_DEEPSEEK_V3_LIKE),
    "BailingHybridTopkRouter": GateSpec(("bailing_hybrid",), **_DEEPSEEK_V3_LIKE),
    "KimiLinearTopkRouter": GateSpec(("kimi_linear",), **_DEEPSEEK_V3_LIKE),
    "MiMoV2FlashTopkRouter": GateSpec(("mimo_v2_flash",), **_DEEPSEEK_V3_LIKE),
    "NemotronHTopkRouter": GateSpec(("nemotron_h",), **_DEEPSEEK_V3_LIKE),
    "HYV4TopkRouter": GateSpec(("hy_v4",), **_DEEPSEEK_V3_LIKE),
    "HYV4VLTopkRouter": GateSpec(("hy_v4_vl",), **_DEEPSEEK_V3_LIKE),
    "SolarOpenTopkRouter": GateSpec(("solar_open",), **_DEEPSEEK_V3_LIKE),
    "BeamTopKRouter": GateSpec(("beam",), **{**_DEEPSEEK_V3_LIKE, "scale": None}),
    "MiniMaxM2TopKRouter": GateSpec(("minimax_m2",), **_MINIMAX_M2_LIKE,
                                    block_bias="e_score_correction_bias"),
    "MiniMaxM3VLTopKRouter": GateSpec(("minimax_m3_vl",), **_MINIMAX_M2_LIKE,
                                      correction_bias="e_score_correction_bias"),
    "Step3p7TopKRouter": GateSpec(("step3p7",), **_MINIMAX_M2_LIKE,
                                  correction_bias="e_score_correction_bias"),
    "HYV3TopKRouter": GateSpec(("hy_v3",), **_HY_V3_LIKE),
    "Dots3NoteVisionTopKRouter": GateSpec(("dots3_note",), **_HY_V3_LIKE),
    "AfmoeTokenChoiceRouter": GateSpec(("afmoe",), score_function="sigmoid", norm=True,
                                       weights_dtype="float32", weight="gate.weight",
                                       logits_fp32=True, scale="route_scale",
                                       block_bias="expert_bias", probe_3d=True),
    # group-limited routing masks with 0, not -inf: the same choice (softmax scores are > 0)
    "Mistral4TopkRouter": GateSpec(("mistral4",), norm="norm_topk_prob", weights_dtype="logits",
                                   scale="routed_scaling_factor",
                                   groups=("num_group", "topk_group")),
    "MistralLarge4TextTopkRouter": GateSpec(("mistral_large4",), norm=True,
                                            weights_dtype="float32", linear_fp32=True,
                                            scale="routed_scaling_factor",
                                            groups=("num_group", "topk_group")),
    # renormalised with a 1e-6 term: to rounding
    "Lfm2MoeTopKRouter": GateSpec(("lfm2_moe",), score_function="sigmoid",
                                  norm="norm_topk_prob", weights_dtype="logits",
                                  scale="routed_scaling_factor", block_bias="expert_bias"),
    "LagunaTopKRouter": GateSpec(("laguna",), score_function="sigmoid", norm=True,
                                 weights_dtype="hidden", logits_fp32=True,
                                 logit_softcap="router_logit_softcapping",
                                 correction_bias="e_score_correction_bias"),
    "MuseSparkTopkRouter": GateSpec(("muse_spark",), score_function="sigmoid", norm=True,
                                    weights_dtype="float32", linear_fp32=True,
                                    logit_scale="output_multiplier",
                                    scale="routed_scaling_factor",
                                    correction_bias="e_score_correction_bias"),
    # the top-k of the logits (plus its bias) is that of their sigmoid
    "Kolibri1TopKRouter": GateSpec(("kolibri1",), score_function="sigmoid",
                                   norm="norm_topk_prob", weights_dtype="float32",
                                   linear_fp32=True, correction_bias="e_score_correction_bias",
                                   bias_on_logits=True),
    "DeepseekV4TopKRouter": GateSpec(("deepseek_v4",), **{**_INKLING2_LIKE, "linear_fp32": False,
                                                           "weights_dtype": "logits"}),
    "Inkling2TopKRouter": GateSpec(("inkling2",), **_INKLING2_LIKE),
    "Inkling2LoopTopKRouter": GateSpec(("inkling2_loop",), **_INKLING2_LIKE),
    # a softmax over the K largest logits, divided by K (to rounding)
    "OpenAIPrivacyFilterTopKRouter": GateSpec(("openai_privacy_filter",), norm=True,
                                              weights_dtype="float32", linear_fp32=True,
                                              bias="bias", divide_by="top_k"),
    "Gemma4TextRouter": GateSpec(("gemma4",), **_GEMMA4_LIKE),
    "DiffusionGemmaTextRouter": GateSpec(("diffusion_gemma",), **_GEMMA4_LIKE),
    "FlintTopKRouter": GateSpec(("flint",), score_function="sigmoid", norm="norm_topk_prob",
                                weights_dtype="float32", fp32_no_autocast=True),
    # the top-k of the logits is that of their sigmoid; the block applies the K sigmoid
    # scores to each token's copy for every expert (0 for the experts not chosen)
    "Llama4Router": GateSpec(("llama4",), score_function="sigmoid", norm=False,
                             weights_dtype="logits", output="dense"),
    # the statistics module adds its bias to the softmax scores for the choice only
    "Ernie4_5_MoeTopKRouter": GateSpec(("ernie4_5_moe",), **_ERNIE_LIKE),
    "Ernie4_5_VLMoeMoeTopKRouter": GateSpec(("ernie4_5_vl_moe",), **_ERNIE_LIKE),
}

# MoE routers that moebal recognises but cannot stand in for, and why.
UNSUPPORTED_ROUTERS: dict[str, str] = {
    "PhimoeTopKRouter": "routes with sparsemixer (a sampled, masked top-k), not a top-k of scores",
    "SwitchTransformersTop1Router": "applies capacity inside the router and returns a one-hot "
    "dispatch mask instead of expert indices",
    "NllbMoeTop2Router": "applies capacity and a second-expert sampling policy inside the router",
    "DbrxRouter": "returns only logits; the top-k is taken inside the MoE block",
    "JetMoeTopKGating": "returns a token permutation rather than K indices and weights",
    "DeepseekV4HashRouter": "chooses experts by a fixed token-id table, not by scores",
    "InklingTopkRouter": "routes shared experts inside the router (a log-sigmoid softmax over "
    "the K routed and the shared logits) and returns their weights too",
    "LongcatFlashTopkRouter": "routes to zero (identity) experts beside the routed ones; "
    "balancing them as experts would change how much computation each token gets",
    "ZayaRouter": "is an MLP router with a skip expert",
    # MoE blocks that choose their experts themselves, with no router module
    "DogeCDMoE": "chooses its experts inside the MoE block by product-key retrieval over "
    "the expert embeddings (no router module)",
    "VitPoseBackboneMoeMLP": "chooses its expert by the dataset index given to the forward, "
    "not by a router",
}


class FoundGate(NamedTuple):
    """A supported router module of a model: its name, class, the module, its spec and the
    MoE block it belongs to (its parent module)."""

    name: str
    class_name: str
    module: nn.Module
    spec: GateSpec
    block: nn.Module

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
    modules = dict(model.named_modules())
    for name, module in modules.items():
        class_name = router_class(module)
        if class_name is None:
            continue
        if class_name in UNSUPPORTED_ROUTERS:
            unsupported.append(f"{name} ({class_name}): {UNSUPPORTED_ROUTERS[class_name]}")
        else:
            block = modules[name.rpartition(".")[0]]
            found.append(FoundGate(name, class_name, module, SUPPORTED_ROUTERS[class_name], block))
    return found, unsupported


def gate_attr(gate: nn.Module, path: str) -> Any:
    """The attribute at the dotted ``path`` of a router module (``"wg.weight"``)."""
    return operator.attrgetter(path)(gate)


def model_score_function(gate: nn.Module, spec: GateSpec) -> str:
    """The router's score function over all experts: "softmax", "sigmoid", or the name of
    another (which no RouterConfig accepts)."""
    if not spec.score_attr:
        return spec.score_function
    score = getattr(gate, spec.score_attr)
    if isinstance(score, nn.Module):  # an activation module: ACT2FN[config.scoring_func]
        return "sigmoid" if type(score) is nn.Sigmoid else type(score).__name__
    return str(score)


def model_norm(gate: nn.Module, spec: GateSpec) -> bool:
    """Whether the router renormalises its K weights (its ``norm_topk_prob``)."""
    if spec.norm_if_softmax and model_score_function(gate, spec) == "softmax":
        return True
    return bool(getattr(gate, spec.norm) if isinstance(spec.norm, str) else spec.norm)


def model_expert_bias(found: FoundGate) -> Optional[torch.Tensor]:
    """The router's own loss-free expert bias ([E]), from the router or from its block, or
    None when it has none."""
    spec = found.spec
    if spec.correction_bias is not None:
        bias = gate_attr(found.module, spec.correction_bias)
    elif spec.block_bias is not None:
        bias = getattr(found.block, spec.block_bias, None)
    else:
        return None
    return bias.reshape(-1) if isinstance(bias, torch.Tensor) else None


__all__ = [
    "FoundGate",
    "GateSpec",
    "SUPPORTED_ROUTERS",
    "UNSUPPORTED_ROUTERS",
    "find_gates",
    "gate_attr",
    "model_expert_bias",
    "model_norm",
    "model_score_function",
    "router_class",
]
