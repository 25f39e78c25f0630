"""Fitting moebal's router to one ``transformers`` router module.

:func:`router_config` builds the :class:`RouterConfig` that reproduces the module's routing
(or refuses options it cannot honour); :func:`verify_gate` runs the module and moebal on a
random probe and refuses the patch if they differ; :func:`init_expert_bias` starts the
loss-free balancer from the module's own expert bias.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from moebal.integrations.hf.families import (
    FoundGate,
    gate_attr,
    model_expert_bias,
    model_norm,
    model_score_function,
)
from moebal.integrations.hf.gate import GateAdapter
from moebal.routing import RouterConfig
from moebal.routing.config import SCORE_FUNCTIONS

MODEL_BIAS_POLICIES = ("error", "drop", "init")

# RouterConfig fields fixed by the model's router: passed only if they agree with it.
MODEL_FIXED_FIELDS = ("num_experts", "top_k", "score_function", "norm_topk_prob",
                      "num_groups", "group_topk", "group_score")


def router_config(
    found: FoundGate, balancer: str, options: dict[str, Any], model_bias: str
) -> RouterConfig:
    """The RouterConfig that reproduces this router's routing, or ValueError naming it."""
    gate, spec, where = found.module, found.spec, found.where
    score_function = model_score_function(gate, spec)
    if score_function not in SCORE_FUNCTIONS:
        raise ValueError(
            f"{where} scores with {score_function}, which moebal's router does not offer "
            f"(its score functions: {', '.join(SCORE_FUNCTIONS)}); not patched"
        )
    model_values = {
        "num_experts": int(gate_attr(gate, spec.num_experts)),
        "top_k": int(gate_attr(gate, spec.top_k)),
        "score_function": score_function,
        "norm_topk_prob": model_norm(gate, spec),
        # group-limited routing (DeepSeek-V3's n_group/topk_group), the sum of a group's
        # top-2 choice scores as every family with groups computes it; the probe checks it
        "num_groups": None,
        "group_topk": None,
        "group_score": "top2",
    }
    if spec.groups is not None:
        n_group, topk_group = (getattr(gate, a) for a in spec.groups)
        if n_group is not None and topk_group is not None and int(topk_group) < int(n_group):
            model_values.update(num_groups=int(n_group), group_topk=int(topk_group))
    for key in MODEL_FIXED_FIELDS:
        if key in options and options[key] != model_values[key]:
            raise ValueError(
                f"{where} routes with {key}={model_values[key]!r}; moebal cannot route it "
                f"with {key}={options[key]!r} (the model's experts and weights are built for "
                f"its own); leave {key} out"
            )
    if spec.topk_method is not None and getattr(gate, spec.topk_method) != "greedy":
        raise ValueError(
            f"{where} uses topk_method={getattr(gate, spec.topk_method)!r}; moebal's router "
            f"reproduces only 'greedy'"
        )
    bias_E = model_expert_bias(found)
    if bias_E is not None:
        bias_name = spec.correction_bias or f"block's {spec.block_bias}"
        if bool((bias_E != 0).any()) and model_bias == "error":
            raise ValueError(
                f"{where} has a non-zero {bias_name} (the model's own loss-free "
                f"balancing); moebal's balancer {balancer!r} would route without it. Pass "
                f"model_bias='drop' to accept that, or balancer='loss_free' with "
                f"model_bias='init' to continue from it"
            )
    rest = {k: v for k, v in options.items() if k not in MODEL_FIXED_FIELDS}
    return RouterConfig(balancer=balancer, **model_values, **rest)


def _close(a: torch.Tensor, b: torch.Tensor, loose: bool) -> bool:
    rtol, atol = (2e-2, 1e-2) if loose else (1e-4, 1e-6)
    return torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol)


def _probe_problems(spec_output: str, ref: tuple, ours: tuple, loose: bool,
                    compare_choice: bool) -> list[str]:
    """What differs between the router module's output ``ref`` and moebal's ``ours``."""
    if spec_output == "dense":  # (weights_TE, logits_TE)
        if ref[0].shape != ours[0].shape or ref[1].shape != ours[1].shape:
            return ["shapes differ"]
        if ref[0].dtype != ours[0].dtype or ref[1].dtype != ours[1].dtype:
            return [f"dtypes differ ({ref[0].dtype} vs {ours[0].dtype})"]
        problems = [] if _close(ref[1], ours[1], loose) else ["logits differ"]
        if compare_choice and not torch.equal(ref[0] != 0, ours[0] != 0):
            problems.append("chosen experts differ")
        elif compare_choice and not _close(ref[0], ours[0], loose):
            problems.append("gate weights differ")
        return problems
    ref_logits, ref_weights, ref_indices = ref
    logits_TE, weights_TK, indices_TK = ours
    if ref_logits.shape != logits_TE.shape or ref_indices.shape != indices_TK.shape:
        return ["shapes differ"]
    if ref_weights.dtype != weights_TK.dtype or ref_logits.dtype != logits_TE.dtype:
        return [f"dtypes differ ({ref_weights.dtype} vs {weights_TK.dtype})"]
    problems = [] if _close(ref_logits, logits_TE, loose) else ["logits differ"]
    if compare_choice:
        ref_order = ref_indices.argsort(dim=-1)
        our_order = indices_TK.argsort(dim=-1)
        if not torch.equal(ref_indices.gather(1, ref_order), indices_TK.gather(1, our_order)):
            problems.append("chosen experts differ")
        elif not _close(ref_weights.gather(1, ref_order), weights_TK.gather(1, our_order), loose):
            problems.append("gate weights differ")
    return problems


@torch.no_grad()
def verify_gate(found: FoundGate, config: RouterConfig) -> None:
    """Check on a random probe that moebal, routing with no balancer, computes what the
    router module itself computes (logits, K experts, weights and their dtypes), so that a
    transformers version whose router differs is refused instead of silently mis-routed."""
    gate, spec, where = found.module, found.spec, found.where
    weight_ED = gate_attr(gate, spec.weight)
    generator = torch.Generator().manual_seed(0)
    shape = (2, 16, weight_ED.shape[1]) if spec.probe_3d else (32, weight_ED.shape[1])
    x = torch.randn(*shape, generator=generator).to(weight_ED)
    bias_E = model_expert_bias(found)
    extra = (bias_E,) if spec.block_bias is not None else ()
    try:
        ref = type(gate).forward(gate, x, *extra)
    except Exception as exc:  # noqa: BLE001 - any failure means we cannot stand in for it
        raise ValueError(f"{where}: its forward fails on a probe ({exc}); not patched") from None
    arity = 2 if spec.output == "dense" else 3
    if not (isinstance(ref, tuple) and len(ref) == arity
            and all(isinstance(t, torch.Tensor) for t in ref)):
        expected = "(weights, logits)" if spec.output == "dense" else "(logits, weights, indices)"
        raise ValueError(f"{where} does not return {expected} in this transformers version; "
                         f"not patched")
    probe_cfg = replace(config, balancer="none", balancer_name=None, capacity_factor=None)
    probe = GateAdapter(found.name, found.class_name, spec, probe_cfg).to(weight_ED.device).eval()
    compare_choice = bias_E is None or not bool((bias_E != 0).any())  # else it uses its bias
    problems = _probe_problems(spec.output, ref, probe(gate, x), weight_ED.dtype != torch.float32,
                               compare_choice)
    if problems:
        raise ValueError(
            f"{where} in this transformers version does not compute what moebal reproduces "
            f"({'; '.join(problems)}); not patched"
        )


def init_expert_bias(found: FoundGate, adapter: GateAdapter) -> None:
    """Start the balancer's expert bias (``bias_E``, the loss_free balancer's) from the
    model's own correction bias: the same score space (added to the unbiased scores)."""
    model_bias_E = model_expert_bias(found)
    if found.spec.bias_on_logits:
        raise ValueError(
            f"{found.where} adds its expert bias to the logits, not to the scores; "
            f"model_bias='init' cannot start the balancer's bias from it (use 'drop')"
        )
    bias_E = getattr(adapter.router.balancer, "bias_E", None)
    if not isinstance(bias_E, torch.Tensor) or bias_E.shape != model_bias_E.shape:
        raise ValueError(
            f"{found.where}: model_bias='init' needs a balancer with an expert bias "
            f"of {tuple(model_bias_E.shape)} (balancer='loss_free'), not "
            f"{adapter.router.config.balancer_name!r}"
        )
    with torch.no_grad():
        bias_E.copy_(model_bias_E.detach().to(bias_E.dtype).cpu())


__all__ = ["MODEL_BIAS_POLICIES", "MODEL_FIXED_FIELDS", "init_expert_bias", "router_config",
           "verify_gate"]
