"""Every MoE family of the installed ``transformers``: patched exactly, or refused by name.

The families are found at run time (a modeling module that defines an MoE router class, or
a config with experts), so a new ``transformers`` release shows each new family here as a
failing test named for it until it is supported or refused with a reason.
"""

import importlib.util
import os
import re
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # noqa: E402
from transformers.models.auto.modeling_auto import (  # noqa: E402
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)

from moebal.integrations.hf import SUPPORTED_ROUTERS, UNSUPPORTED_ROUTERS, patch_model  # noqa: E402

KNOWN = set(SUPPORTED_ROUTERS) | set(UNSUPPORTED_ROUTERS)
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# an MoE router class: its name ends so and its code takes a top-k (or a sampled choice)
ROUTER_CLASS = re.compile(r"^class (\w+(?:Router|Gate|Gating))\(.*?\):\n(.*?)(?=^\S)", re.S | re.M)


def router_classes(source: str) -> list[str]:
    return [name for name, body in ROUTER_CLASS.findall(source)
            if re.search(r"\btopk\b|\.topk\(|top_k|sparsemixer", body)]


EXPERT_FIELD = re.compile(r"^\s+(?:%s)\s*[:=]" % "|".join(EXPERT_KEYS), re.M)


def families() -> dict[str, list[str]]:
    """The MoE families of the installed transformers, from their sources (no import): each
    model folder whose modeling code defines an MoE router class or whose configuration has
    an expert count, with the router classes it defines."""
    root = os.path.dirname(importlib.util.find_spec("transformers.models").origin)
    out = {}
    for folder in sorted(os.listdir(root)):
        path = os.path.join(root, folder)
        if not os.path.isdir(path):
            continue
        routers, experts = set(), False
        for name in os.listdir(path):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(path, name), encoding="utf-8") as fh:
                source = fh.read()
            if name.startswith("modeling_"):
                routers.update(router_classes(source))
            elif name.startswith("configuration_") and EXPERT_FIELD.search(source):
                experts = True
        if routers or experts:
            out[folder] = sorted(routers)
    return out


def model_type(folder: str) -> str:
    """The model type of ``folder`` to build: one whose default config has experts and a
    causal-LM (else a base) model class."""
    candidates = []
    for model_type, config_name in CONFIG_MAPPING_NAMES.items():
        config_cls = getattr(transformers, config_name, None)
        if config_cls is None or config_cls.__module__.split(".")[2] != folder:
            continue
        try:
            config = config_cls().to_dict()
        except Exception:  # noqa: BLE001 - a config that needs arguments has no defaults
            continue
        if any(isinstance(config.get(k), int) and config[k] > 1 for k in EXPERT_KEYS):
            candidates.append(model_type)
    buildable = [t for t in candidates
                 if t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or t in MODEL_MAPPING_NAMES]
    return (buildable or candidates or [folder])[0]


FAMILIES = families()

SMALL = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
    shared_expert_intermediate_size=16, shared_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, head_dim=8, num_experts=4,
    num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
    moe_topk=2, moe_k=2, top_k_experts=2, max_position_embeddings=64, n_group=1,
    topk_group=1, first_k_dense_replace=0, kv_lora_rank=8, q_lora_rank=16,
    qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, qk_head_dim=8, index_head_dim=8,
    index_n_heads=2, index_topk=4, decoder_sparse_step=1, mlp_only_layers=[],
    expert_layer_period=1, expert_layer_offset=0, attn_layer_period=1, attn_layer_offset=0,
    use_mamba_kernels=False, moe_layer_freq=1, n_shared_experts=1, sliding_window=8,
    moe_layer_start_index=0, num_dense_layers=0, mamba_n_heads=4, mamba_d_head=16,
    mamba_d_state=8, mamba_expand=2, pad_token_id=0, bos_token_id=1, eos_token_id=1,
)
# what a family needs beyond SMALL to build and run at that size (by modeling folder);
# "model_type" and "model_class" pick what to build when the defaults do not
OVERRIDES: dict[str, dict] = {
    "gemma4": dict(model_type="gemma4_text", enable_moe_block=True),
    "diffusion_gemma": dict(model_type="diffusion_gemma_text",
                            model_class="DiffusionGemmaEncoderTextModel", enable_moe_block=True),
    "doge": dict(is_moe=True),
    "zaya": dict(num_experts_per_tok=1),
    "dbrx": dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
                 attn_config=dict(kv_n_heads=4, rope_theta=10000.0),
                 ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2)),
    "glm5_next": dict(index_topk=16, qk_rope_head_dim=0, head_dim=0, qk_nope_head_dim=8),
    "deepseek_ocr2": dict(mlp_layer_types=["sparse", "sparse"]),
    "ernie4_5_vl_moe": dict(moe_intermediate_size=[16, 16], rope_parameters={
        "rope_type": "default", "rope_theta": 500000.0, "mrope_section": [1, 1, 2]}),
    "qwen3_omni_moe": dict(model_type="qwen3_omni_moe_text"),
    "qwen4_exp": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8,
                      indexer_budget=8, indexer_compress_ratio=2),
    "vitpose_backbone": dict(num_experts=4, part_features=8),
    "laguna": dict(moe_router_logit_softcapping=0.5),  # the cap at work
    "mimo_v2_flash": dict(num_key_value_heads=2, rope_parameters={
        kind: {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        for kind in ("full_attention", "sliding_attention")}),
    "granitemoehybrid": dict(layer_types=["linear_attention", "attention"]),
    "lfm2_moe": dict(layer_types=["full_attention", "conv"]),
    "glm4v_moe": dict(rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 0]}),
    "hy_v4_vl": dict(rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 0]}),
}
# routers that take the top-k of the logits and a softmax over those K (the renormalised
# softmax top-k up to rounding)
TO_ROUNDING = {"GraniteMoeTopKRouter", "GraniteMoeSharedTopKRouter", "GraniteMoeSWATopKRouter",
               "GraniteMoeHybridTopKRouter", "AriaTextTopKRouter", "GptOssTopKRouter",
               "Cohere2MoeTopKRouter", "Lfm2MoeTopKRouter", "OpenAIPrivacyFilterTopKRouter"}


def per_layer(values: list, num_layers: int) -> list:
    """A per-layer list of ``num_layers`` entries holding each kind of ``values`` in turn
    (a hybrid keeps one layer of each kind, a dense-then-sparse stack a sparse layer)."""
    kinds = list(dict.fromkeys(values))
    return [kinds[i % len(kinds)] for i in range(num_layers)]


def model_class(config_cls, model_type, name=None):
    name = name or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) or MODEL_MAPPING_NAMES.get(model_type)
    if name:
        return getattr(transformers, name)
    module = importlib.import_module(config_cls.__module__.replace(".configuration_", ".modeling_"))
    classes = [c for c in vars(module).values() if isinstance(c, type)
               and getattr(c, "config_class", None) is config_cls
               and "PreTrained" not in c.__name__]
    classes.sort(key=lambda c: (not c.__name__.endswith("ForCausalLM"),
                                not c.__name__.endswith("Model")))
    return classes[0]


def tiny(folder, **extra):
    """A tiny random model of ``folder``'s family (``extra``: config fields over OVERRIDES)."""
    overrides = {**OVERRIDES.get(folder, {}), **extra}
    mtype = overrides.pop("model_type", None) or model_type(folder)
    class_name = overrides.pop("model_class", None)
    config_cls = getattr(transformers, CONFIG_MAPPING_NAMES[mtype])
    defaults = config_cls().to_dict()
    aliases = getattr(config_cls, "attribute_map", {})
    options = {aliases.get(k, k): v for k, v in SMALL.items() if aliases.get(k, k) in defaults}
    if "qk_rope_head_dim" in defaults and "head_dim" in defaults:
        options["head_dim"] = options["qk_rope_head_dim"]  # MLA: rotary width
    L = options.get("num_hidden_layers", 2)
    for key, value in defaults.items():
        if key.endswith("_types") and isinstance(value, list) and len(value) > L:
            options[key] = per_layer(value, L)
    options.update(overrides)
    config = config_cls(**options)
    torch.manual_seed(0)
    return model_class(config_cls, mtype, class_name)(config).eval()


@torch.no_grad()
def randomise_routers(model):
    """Random router parameters (some families start them at zero, where every choice is a
    tie, or at one, where a per-expert scale does nothing); the models' own expert biases
    stay zero."""
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if type(module).__name__ in SUPPORTED_ROUTERS:
            for name, p in module.named_parameters():
                if "correction" not in name:  # weights, biases, per-expert scales
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.5)


def forward(model, x):
    if getattr(model.config, "is_encoder_decoder", False):
        out = model(input_ids=x, decoder_input_ids=x)
    else:
        out = model(x)
    logits = getattr(out, "logits", None)
    return out.last_hidden_state if logits is None else logits


def test_every_router_class_of_the_installed_transformers_is_known():
    unknown = {folder: [c for c in routers if c not in KNOWN]
               for folder, routers in FAMILIES.items()}
    unknown = {k: v for k, v in unknown.items() if v}
    assert not unknown, f"MoE routers neither supported nor refused: {unknown}"


@pytest.mark.slow
@pytest.mark.parametrize("folder", sorted(FAMILIES))
def test_family_is_patched_exactly_or_refused_by_name(folder):
    model = tiny(folder)
    try:
        handle = patch_model(model, balancer="none")
    except ValueError as exc:
        message = str(exc)
        assert "no recognised MoE router" not in message, message
        # refused by name: the module and the class of a router moebal cannot stand in for
        # (a supported router refused by the probe computes something else: a failure)
        named = [c for _, c in re.findall(r"([\w.]+) \((\w+)\)", message)
                 if c in UNSUPPORTED_ROUTERS]
        assert named, message
        return
    handle.unpatch()
    randomise_routers(model)
    x = torch.randint(2, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = forward(model, x)
        handle = patch_model(model, balancer="none")
        out = forward(model, x)
    if {a.class_name for a in handle.adapters} & TO_ROUNDING:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(out, ref)
    routed_L = handle.loads().sum(1)  # a layer's router that did not run (vision experts): 0
    assert routed_L.max() == x.numel() * handle.routers[0].config.top_k
