"""``patch_model``: route every MoE layer of a ``transformers`` model through moebal."""

from __future__ import annotations

import json
import os
import warnings
from typing import TYPE_CHECKING, Any, Optional, Union

from torch import nn

from moebal.integrations.hf.families import (
    SUPPORTED_ROUTERS,
    FoundGate,
    find_gates,
    gate_attr,
    model_expert_bias,
)
from moebal.integrations.hf.fit import (
    MODEL_BIAS_POLICIES,
    init_expert_bias,
    router_config,
    verify_gate,
)
from moebal.integrations.hf.gate import ADAPTER_ATTR, GateAdapter
from moebal.integrations.hf.handle import CONFIG_KEY, HANDLE_ATTR, SUBMODULE, PatchHandle
from moebal.integrations.hf.record import RoutingRecord
from moebal.integrations.hf.forward import ModelForward
from moebal.routing import router_option_names

if TYPE_CHECKING:  # pragma: no cover
    import torch.distributed as dist


def patch_model(
    model: nn.Module,
    balancer: Optional[str] = None,
    *,
    add_loss_to_output: bool = True,
    model_bias: str = "error",
    group: Optional["dist.ProcessGroup"] = None,
    **router_options: Any,
) -> PatchHandle:
    """Route every MoE layer of a ``transformers`` model through moebal's router.

    balancer            a registered balancer name (``moebal.routing.BALANCERS``). None: the
                        options saved in ``config.moebal_routing`` by an earlier patch (after
                        ``from_pretrained``), else "none".
    router_options      other :class:`RouterConfig` fields (aux_loss_coeff, z_loss_coeff,
                        bias_update_rate, capacity_factor, ...). ``num_experts``, ``top_k``,
                        ``score_function`` and ``norm_topk_prob`` are the model's; passing a
                        different value is a ValueError.
    add_loss_to_output  add ``handle.loss()`` to the ``loss`` of the model's output.
    model_bias          what to do with a router's own expert-bias buffer
                        (``e_score_correction_bias``, DeepSeek-V3 style): "error" refuses a
                        non-zero one; "drop" routes without it (the buffer stays in the model,
                        unused until ``unpatch``); "init" starts the loss_free balancer's bias
                        from it, so routing continues where the model's left off.
    group               data-parallel process group whose loads the balancers all-reduce at
                        ``step()`` so every rank keeps the same state (None: this process;
                        under DDP pass ``torch.distributed.group.WORLD`` or the DP group).

    Tokens that the ``attention_mask`` given to the model's forward masks out (padding) are
    routed as the model routes them (the plain top-k of its scores) but count as no load:
    they are left out of the loads, MaxVio, aux losses and every balancer's update.

    Raises ValueError naming the module for a model with no supported MoE router, a model
    already patched, or options the model's router cannot honour; the model is then left
    unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model_bias not in MODEL_BIAS_POLICIES:
        raise ValueError(f"model_bias must be one of {MODEL_BIAS_POLICIES}, got {model_bias!r}")
    balancer, router_options = _resolve_options(model, balancer, router_options)
    found = _patchable_gates(model)
    # Build everything first: any bad option raises before the model is touched.
    forward = ModelForward(RoutingRecord(len(found)))
    adapters = _build_adapters(model, found, balancer, router_options, model_bias, group,
                               forward)
    _warn_if_the_models_aux_loss_is_on(model, balancer)

    handle = PatchHandle(model, balancer, router_options, forward.record)
    config_entry = {"balancer": balancer, **_jsonable(router_options)}
    handle.install(found, adapters, forward, add_loss_to_output,
                   config_entry if getattr(model, "config", None) is not None else None)
    return handle


def _resolve_options(model: nn.Module, balancer: Optional[str],
                     options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The balancer and router options to patch with: those given, over those saved in the
    model's config by an earlier patch when no balancer is given."""
    known = set(router_option_names())
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown router options {unknown}; known: {sorted(known)}")
    saved = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if balancer is None:
        if isinstance(saved, dict):
            merged = {k: v for k, v in saved.items() if k != "balancer"}
            merged.update(options)
            options = merged
            balancer = saved.get("balancer", "none")
        else:
            balancer = "none"
    if not isinstance(balancer, str):
        raise TypeError(f"balancer must be a name (str), got {type(balancer).__name__}")
    return balancer, options


def _patchable_gates(model: nn.Module) -> list[FoundGate]:
    """The model's router modules, or ValueError if it is patched already or has routers
    moebal cannot stand in for (or none at all)."""
    existing = model.__dict__.get(HANDLE_ATTR)
    if existing is not None and existing.patched:
        raise ValueError(
            f"{type(model).__name__} is already patched by moebal ({existing!r}); "
            f"call unpatch() on its handle first"
        )
    found, unsupported = find_gates(model)
    for gate in found:
        if ADAPTER_ATTR in gate.module.__dict__ or "forward" in gate.module.__dict__:
            raise ValueError(f"{gate.where} is already patched")
    if hasattr(model, SUBMODULE):
        raise ValueError(
            f"{type(model).__name__} already has an attribute {SUBMODULE!r}; it is either "
            f"patched already or moebal cannot register its routers there"
        )
    if unsupported:
        raise ValueError(
            f"{type(model).__name__} has MoE routers moebal cannot stand in for: "
            + "; ".join(unsupported)
        )
    if not found:
        raise ValueError(
            f"no recognised MoE router in {type(model).__name__}; supported router classes: "
            f"{sorted(SUPPORTED_ROUTERS)}"
        )
    return found


def _build_adapters(
    model: nn.Module, found: list[FoundGate], balancer: str, options: dict[str, Any],
    model_bias: str, group: Optional["dist.ProcessGroup"], forward: ModelForward,
) -> list[GateAdapter]:
    """One checked adapter per router module, on its device, routing within the model's
    ``forward``."""
    modules = dict(model.named_modules())
    adapters = []
    for layer, gate in enumerate(found):
        config = router_config(gate, balancer, options, model_bias)
        verify_gate(gate, config)
        parts = gate.name.split(".")
        ancestors = [modules[".".join(parts[:i])] for i in range(len(parts))]
        adapter = GateAdapter(
            gate.name, gate.class_name, gate.spec, config, layer=layer, forward=forward,
            group=group,
            checkpointed_by=[m for m in ancestors if hasattr(m, "gradient_checkpointing")],
        )
        if model_bias == "init" and model_expert_bias(gate) is not None:
            init_expert_bias(gate, adapter)
        adapter.to(device=gate_attr(gate.module, gate.spec.weight).device)
        adapters.append(adapter)
    experts = {a.router.config.num_experts for a in adapters}
    if len(experts) > 1:
        raise ValueError(
            f"{type(model).__name__} has MoE layers with different expert counts {sorted(experts)}"
        )
    return adapters


def _warn_if_the_models_aux_loss_is_on(model: nn.Module, balancer: str) -> None:
    config = getattr(model, "config", None)
    if (
        balancer != "none"
        and config is not None
        and getattr(config, "output_router_logits", False)
        and getattr(config, "router_aux_loss_coef", 0)
    ):
        warnings.warn(
            f"{type(model).__name__} also adds its own router aux loss "
            f"(output_router_logits=True, router_aux_loss_coef={config.router_aux_loss_coef}), "
            f"computed from a plain top-k of the logits, not from the experts balancer "
            f"{balancer!r} chooses; set config.output_router_logits=False to balance with "
            f"moebal alone",
            stacklevel=3,
        )


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in options.items():
        try:
            json.dumps(value)
        except TypeError:
            continue  # not saved with the config; pass it again when re-patching
        out[key] = value
    return out


def from_pretrained(model_class: Any, path: Union[str, os.PathLike], **kwargs: Any):
    """``model_class.from_pretrained(path, **kwargs)``, re-patched with the options saved in
    its config by ``patch_model`` and with the balancer state of the checkpoint loaded.

    Returns ``(model, handle)``. A checkpoint saved unpatched gives ``handle=None``.
    """
    model = model_class.from_pretrained(path, **kwargs)
    if not isinstance(getattr(model.config, CONFIG_KEY, None), dict):
        return model, None
    handle = patch_model(model)
    handle.load_pretrained_state(path)
    return model, handle


__all__ = ["from_pretrained", "patch_model"]
