"""moebal's router inside Hugging Face ``transformers`` MoE models.

``patch_model(model, balancer="bip")`` finds every MoE router module of a ``transformers``
model (``MixtralTopKRouter``, ``Qwen3MoeTopKRouter``, ... see ``SUPPORTED_ROUTERS``) and
makes it route through a :class:`moebal.routing.Router`:

- the model's own gate weight computes the logits exactly as the model does;
- the balancer chooses the experts;
- the gate weights come from the unbiased scores by the model's own convention (softmax or
  sigmoid, renormalised over the K chosen experts when the model does, times the model's
  routed scaling factor), in the model's dtype and slot order (best expert first);
- the model's expert computation is untouched.

With ``balancer="none"`` the patched model computes what the unpatched one does.

The routers are registered on the model as ``model.moebal`` (a ModuleList, one per MoE layer
in model order), so the balancers' state (expert bias, dual prices) is in
``model.state_dict()`` under ``moebal.<i>.router.balancer.*`` (keys that ``save_pretrained``'s
renaming of the model's own modules leaves alone), moves with ``model.to()`` and is written
by ``save_pretrained``. Each router is first run once on a random probe, unpatched and
through moebal with no balancer; a router whose output moebal would not reproduce (another
transformers version) is refused. ``from_pretrained`` builds an unpatched model and skips
those keys; :func:`from_pretrained` here loads, re-patches with the options saved in
``config.json`` and loads the balancer state (or do it by hand:
``patch_model(model)`` then ``handle.load_pretrained_state(path)``).

The model's own router aux loss (``output_router_logits=True``, ``router_aux_loss_coef``) is
computed by ``transformers`` from the router logits with a plain top-k of its own; it keeps
working after the patch but does not see which experts the balancer chose. With a moebal
balancer, turn it off (``output_router_logits=False``) and use moebal's: the aux loss and
z-loss of the last forward, summed over MoE layers (Megatron-core's convention), are
``handle.loss()``; when ``add_loss_to_output`` is True (default) the patch adds it to the
``loss`` the model returns when given labels, so ``Trainer`` picks it up unchanged.

The router sees every token of the batch, padding included (the model's blocks do not pass
the attention mask to their routers).
"""

from __future__ import annotations

import collections
import json
import operator
import os
import types
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moebal.metrics import max_violation_per_layer
from moebal.routing import Router, RouterConfig, Routing, router_option_names

if TYPE_CHECKING:  # pragma: no cover
    import torch.distributed as dist

SUBMODULE = "moebal"  # ModuleList of the adapters, registered on the patched model
ADAPTER_ATTR = "_moebal_adapter"  # plain attribute of a patched router module
CONFIG_KEY = "moebal_routing"  # entry of model.config holding the options of the patch
HANDLE_ATTR = "moebal_patch"  # attribute of the patched model holding its handle
MODEL_BIAS_POLICIES = ("error", "drop", "init")

# RouterConfig fields fixed by the model's router: passed only if they agree with it.
_FIXED = ("num_experts", "top_k", "score_function", "norm_topk_prob")


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


def _router_spec(module: nn.Module) -> tuple[Optional[str], Optional[GateSpec]]:
    """(class name, spec) of a transformers router module; (name, None) if recognised but
    unsupported; (None, None) if not a router moebal knows."""
    for cls in type(module).__mro__:
        if not cls.__module__.startswith("transformers."):
            continue
        if cls.__name__ in SUPPORTED_ROUTERS:
            return cls.__name__, SUPPORTED_ROUTERS[cls.__name__]
        if cls.__name__ in UNSUPPORTED_ROUTERS:
            return cls.__name__, None
    return None, None


def _attr(module: nn.Module, path: str) -> Any:
    return operator.attrgetter(path)(module)


def _resolve_norm(gate: nn.Module, spec: GateSpec) -> bool:
    return bool(getattr(gate, spec.norm) if isinstance(spec.norm, str) else spec.norm)


class GateAdapter(nn.Module):
    """What a patched router module runs: the model's logits, moebal's choice.

    The adapters of a patched model are registered as ``model.moebal`` (a ModuleList, one
    per MoE layer in model order), so each ``router`` and its balancer's buffers are part of
    the model: ``state_dict`` keys ``moebal.<i>.router.balancer.*``, the same whatever the
    model's module names or the renaming ``save_pretrained`` applies to them. ``last`` is
    the :class:`Routing` of the most recent forward; ``step_loads_E`` the loads of the
    training forwards since the last ``step``.
    """

    def __init__(
        self, name: str, class_name: str, spec: GateSpec, config: RouterConfig,
        group: Optional["dist.ProcessGroup"] = None,
    ):
        super().__init__()
        self.name = name
        self.class_name = class_name
        self.spec = spec
        self.router = Router(config, group=group)
        self.last: Optional[Routing] = None
        self.step_loads_E: Optional[torch.Tensor] = None
        self.seq_len: Optional[int] = None
        # balancer state before each checkpointed forward, for backward's recompute
        self._replay: collections.deque = collections.deque()
        self._checkpointed_by: list[nn.Module] = []

    def extra_repr(self) -> str:
        return f"patches {self.name} ({self.class_name})"

    def logits(self, gate: nn.Module, x_TD: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        weight_ED = _attr(gate, spec.weight)
        bias_E = _attr(gate, spec.bias) if spec.bias else None
        if spec.linear_fp32:
            return F.linear(x_TD.float(), weight_ED.float(), None if bias_E is None else bias_E.float())
        if spec.input_to_weight:
            x_TD = x_TD.to(weight_ED.dtype)
        logits_TE = F.linear(x_TD, weight_ED, bias_E)
        return logits_TE.float() if spec.logits_fp32 else logits_TE

    def _recomputing(self) -> bool:
        """True when autograd re-runs this forward for activation checkpointing."""
        return torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1

    def _checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self._checkpointed_by)

    def _buffers_snapshot(self) -> dict[str, torch.Tensor]:
        return {name: buf.clone() for name, buf in self.router.named_buffers()}

    def _restore_buffers(self, snapshot: dict[str, torch.Tensor]) -> None:
        for name, value in snapshot.items():
            owner, _, leaf = name.rpartition(".")
            self.router.get_submodule(owner)._buffers[leaf] = value

    def forward(self, gate: nn.Module, hidden_states: torch.Tensor):
        spec = self.spec
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        seq_len = hidden_states.shape[1] if hidden_states.dim() == 3 else self.seq_len
        if seq_len is not None and (seq_len < 1 or x_TD.shape[0] % seq_len):
            seq_len = None
        logits_TE = self.logits(gate, x_TD)

        if self.training and self._replay and self._recomputing():
            # Backward re-runs a checkpointed layer: route it again from the balancer state
            # its forward saw (same choice, same saved tensors), then put the state back, so
            # the balancer counts the batch once.
            state_now = self._buffers_snapshot()
            self._restore_buffers(self._replay.popleft())
            routing = self.router(logits_TE, seq_len=seq_len)
            self._restore_buffers(state_now)
        else:
            if self.training and self._checkpointing():
                self._replay.append(self._buffers_snapshot())
            routing = self.router(logits_TE, seq_len=seq_len)
            self.last = routing
            if self.training:
                loads_E = routing.loads_E.detach()
                self.step_loads_E = loads_E if self.step_loads_E is None else self.step_loads_E + loads_E
        indices_TK, weights_TK = routing.indices_TK, routing.weights_TK

        # the model's slot order: best expert first
        order_TK = torch.argsort(weights_TK.detach(), dim=-1, descending=True, stable=True)
        weights_TK = weights_TK.gather(1, order_TK)
        indices_TK = indices_TK.gather(1, order_TK)
        if spec.scale is not None:
            weights_TK = weights_TK * getattr(gate, spec.scale)
        if spec.weights_dtype == "logits":
            weights_TK = weights_TK.to(logits_TE.dtype)
        elif spec.weights_dtype == "hidden":
            weights_TK = weights_TK.to(hidden_states.dtype)
        return logits_TE, weights_TK, indices_TK


def _patched_gate_forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    """Replaces ``forward`` of a patched router module (bound to the instance)."""
    return self.__dict__[ADAPTER_ATTR](self, hidden_states)


class PatchHandle:
    """What ``patch_model`` returns: the patched layers, their balance, ``step`` and ``unpatch``.

    ``names``: the patched router modules, in model order (one per MoE layer).
    """

    def __init__(self, model: nn.Module, balancer: str, options: dict[str, Any]) -> None:
        self.model = model
        self.balancer = balancer
        self.options = dict(options)
        self._gates: list[tuple[str, nn.Module, GateAdapter]] = []
        self._hooks: list[Any] = []
        self._config_before: tuple[bool, Any] = (False, None)
        self.patched = False

    # -- what was patched ------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self._gates]

    @property
    def num_layers(self) -> int:
        return len(self._gates)

    @property
    def num_experts(self) -> int:
        return self._gates[0][2].router.config.num_experts

    @property
    def routers(self) -> list[Router]:
        return [adapter.router for _, _, adapter in self._gates]

    @property
    def adapters(self) -> list[GateAdapter]:
        return [adapter for _, _, adapter in self._gates]

    @property
    def _adapter_list(self) -> nn.ModuleList:
        return self.model._modules[SUBMODULE]

    def _require_patched(self) -> None:
        if not self.patched:
            raise RuntimeError("this patch has been undone (unpatch() was called)")

    # -- balance of the last forward ---------------------------------------------------
    def loads(self) -> torch.Tensor:
        """int64 [layers, experts]: tokens per expert in each layer's most recent forward
        (zeros for a layer that has not run)."""
        rows = []
        for adapter in self.adapters:
            E = adapter.router.config.num_experts
            rows.append(
                torch.zeros(E, dtype=torch.int64) if adapter.last is None
                else adapter.last.loads_E.detach().cpu()
            )
        return torch.stack(rows)

    def max_vio(self) -> np.ndarray:
        """MaxVio of each layer's loads in its most recent forward ([layers])."""
        return max_violation_per_layer(self.loads())

    def _sum(self, part: Callable[[Routing], torch.Tensor]) -> torch.Tensor:
        terms = [part(a.last) for a in self.adapters if a.last is not None]
        if not terms:
            return torch.zeros(())
        device = terms[0].device
        return torch.stack([t.to(device) for t in terms]).sum()

    def aux_loss(self) -> torch.Tensor:
        """The balancer's auxiliary loss of the last forward, summed over MoE layers."""
        return self._sum(lambda r: r.aux_loss)

    def z_loss(self) -> torch.Tensor:
        """The router z-loss of the last forward, summed over MoE layers."""
        return self._sum(lambda r: r.z_loss)

    def loss(self) -> torch.Tensor:
        """aux_loss() + z_loss(): what to add to the model's loss."""
        return self._sum(lambda r: r.loss)

    # -- optimizer steps ---------------------------------------------------------------
    def step_loads(self) -> torch.Tensor:
        """int64 [layers, experts]: loads of the training forwards since the last step()."""
        rows = []
        for adapter in self.adapters:
            E = adapter.router.config.num_experts
            rows.append(
                torch.zeros(E, dtype=torch.int64) if adapter.step_loads_E is None
                else adapter.step_loads_E.cpu()
            )
        return torch.stack(rows)

    def step(self) -> torch.Tensor:
        """One optimizer step: every balancer updates its state (loss-free bias, quantile
        prices) from the loads seen since the previous step. Returns those loads
        ([layers, experts]) and starts counting afresh."""
        self._require_patched()
        loads_LE = self.step_loads()
        for adapter in self.adapters:
            adapter.router.step()
            adapter.step_loads_E = None
            adapter._replay.clear()
        return loads_LE

    # -- balancer state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The balancer state only, under the same keys as in ``model.state_dict()``."""
        return {f"{SUBMODULE}.{key}": value for key, value in self._adapter_list.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load balancer state from a dict whose keys are those of ``state_dict()`` (other
        keys of a full model state dict are ignored). ``strict``: every balancer buffer must
        be present."""
        self._require_patched()
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        if strict and missing:
            raise ValueError(f"balancer state is missing {len(missing)} keys, e.g. {missing[:3]}")
        for key, current in expected.items():
            if key in state and tuple(state[key].shape) != tuple(current.shape):
                raise ValueError(
                    f"balancer state {key!r} has shape {tuple(state[key].shape)}, "
                    f"expected {tuple(current.shape)}"
                )
        prefix = f"{SUBMODULE}."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        self._adapter_list.load_state_dict(sub, strict=False)

    def load_pretrained_state(self, path: Union[str, os.PathLike]) -> None:
        """Load the balancer state from a ``save_pretrained`` directory (safetensors)."""
        self.load_state_dict(_read_checkpoint_keys(path, f"{SUBMODULE}."))

    # -- undo --------------------------------------------------------------------------
    def unpatch(self) -> None:
        """Restore the model exactly as it was before ``patch_model``."""
        self._require_patched()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for _, gate, _ in self._gates:
            del gate.__dict__[ADAPTER_ATTR]
            del gate.__dict__["forward"]
        del self.model._modules[SUBMODULE]
        had, value = self._config_before
        config = getattr(self.model, "config", None)
        if config is not None:
            if had:
                setattr(config, CONFIG_KEY, value)
            elif hasattr(config, CONFIG_KEY):
                delattr(config, CONFIG_KEY)
        if self.model.__dict__.get(HANDLE_ATTR) is self:
            del self.model.__dict__[HANDLE_ATTR]
        self.patched = False

    def __repr__(self) -> str:
        state = "patched" if self.patched else "unpatched"
        return (
            f"PatchHandle({state}, balancer={self.balancer!r}, layers={self.num_layers}, "
            f"model={type(self.model).__name__})"
        )


def _read_checkpoint_keys(path: Union[str, os.PathLike], prefix: str) -> dict[str, torch.Tensor]:
    """Tensors whose key starts with ``prefix`` from the safetensors files of a checkpoint dir."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a save_pretrained directory")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"no model.safetensors (or its index) in {path!r}")
    out: dict[str, torch.Tensor] = {}
    for name in files:
        for key, value in load_file(os.path.join(path, name)).items():
            if key.startswith(prefix):
                out[key] = value
    return out


def _router_config(
    name: str, class_name: str, gate: nn.Module, spec: GateSpec, balancer: str,
    options: dict[str, Any], model_bias: str,
) -> RouterConfig:
    """The RouterConfig that reproduces this router's routing, or ValueError naming it."""
    where = f"{name} ({class_name})"
    top_k = int(getattr(gate, spec.top_k))
    num_experts = int(getattr(gate, spec.num_experts))
    model_values = {
        "num_experts": num_experts,
        "top_k": top_k,
        "score_function": spec.score_function,
        "norm_topk_prob": _resolve_norm(gate, spec),
    }
    for key in _FIXED:
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
    if spec.groups is not None:
        n_group, topk_group = (getattr(gate, a) for a in spec.groups)
        if n_group is not None and topk_group is not None and int(topk_group) < int(n_group):
            raise ValueError(
                f"{where} uses group-limited routing (n_group={n_group}, "
                f"topk_group={topk_group}), which moebal's router does not implement; "
                f"set topk_group=n_group in the config to route over all experts"
            )
    if spec.correction_bias is not None:
        bias_E = getattr(gate, spec.correction_bias)
        if bool((bias_E != 0).any()) and model_bias == "error":
            raise ValueError(
                f"{where} has a non-zero {spec.correction_bias} (the model's own loss-free "
                f"balancing); moebal's balancer {balancer!r} would route without it. Pass "
                f"model_bias='drop' to accept that, or balancer='loss_free' with "
                f"model_bias='init' to continue from it"
            )
    rest = {k: v for k, v in options.items() if k not in _FIXED}
    return RouterConfig(balancer=balancer, **model_values, **rest)


@torch.no_grad()
def _verify_gate(name: str, class_name: str, gate: nn.Module, spec: GateSpec,
                 config: RouterConfig) -> None:
    """Check on a random probe that moebal, routing with no balancer, computes what the
    router module itself computes (logits, K experts, weights and their dtypes), so that a
    transformers version whose router differs is refused instead of silently mis-routed."""
    where = f"{name} ({class_name})"
    weight_ED = _attr(gate, spec.weight)
    generator = torch.Generator().manual_seed(0)
    x_TD = torch.randn(32, weight_ED.shape[1], generator=generator).to(weight_ED)
    try:
        ref = type(gate).forward(gate, x_TD)
    except Exception as exc:  # noqa: BLE001 - any failure means we cannot stand in for it
        raise ValueError(f"{where}: its forward fails on a probe ({exc}); not patched") from None
    if not (isinstance(ref, tuple) and len(ref) == 3 and all(isinstance(t, torch.Tensor) for t in ref)):
        raise ValueError(f"{where} does not return (logits, weights, indices) in this "
                         f"transformers version; not patched")
    probe_cfg = replace(config, balancer="none", balancer_name=None, capacity_factor=None)
    probe = GateAdapter(name, class_name, spec, probe_cfg).to(weight_ED.device).eval()
    logits_TE, weights_TK, indices_TK = probe(gate, x_TD)
    ref_logits, ref_weights, ref_indices = ref
    problems = []
    if ref_logits.shape != logits_TE.shape or ref_indices.shape != indices_TK.shape:
        problems.append("shapes differ")
    elif ref_weights.dtype != weights_TK.dtype or ref_logits.dtype != logits_TE.dtype:
        problems.append(f"dtypes differ ({ref_weights.dtype} vs {weights_TK.dtype})")
    else:
        loose = weight_ED.dtype != torch.float32
        rtol, atol = (2e-2, 1e-2) if loose else (1e-4, 1e-6)
        if not torch.allclose(ref_logits.float(), logits_TE.float(), rtol=rtol, atol=atol):
            problems.append("logits differ")
        bias = getattr(gate, spec.correction_bias) if spec.correction_bias else None
        if bias is None or not bool((bias != 0).any()):  # else the model routes with its bias
            ref_order = ref_indices.argsort(dim=-1)
            our_order = indices_TK.argsort(dim=-1)
            if not torch.equal(ref_indices.gather(1, ref_order), indices_TK.gather(1, our_order)):
                problems.append("chosen experts differ")
            elif not torch.allclose(ref_weights.gather(1, ref_order).float(),
                                    weights_TK.gather(1, our_order).float(), rtol=rtol, atol=atol):
                problems.append("gate weights differ")
    if problems:
        raise ValueError(
            f"{where} in this transformers version does not compute what moebal reproduces "
            f"({'; '.join(problems)}); not patched"
        )


def _init_expert_bias(name: str, class_name: str, adapter: GateAdapter,
                      model_bias_E: torch.Tensor) -> None:
    """Start the balancer's expert bias (``bias_E``, the loss_free balancer's) from the
    model's own correction bias: the same score space (added to the unbiased scores)."""
    bias_E = getattr(adapter.router.balancer, "bias_E", None)
    if not isinstance(bias_E, torch.Tensor) or bias_E.shape != model_bias_E.shape:
        raise ValueError(
            f"{name} ({class_name}): model_bias='init' needs a balancer with an expert bias "
            f"of {tuple(model_bias_E.shape)} (balancer='loss_free'), not "
            f"{adapter.router.config.balancer_name!r}"
        )
    with torch.no_grad():
        bias_E.copy_(model_bias_E.detach().to(bias_E.dtype).cpu())


def _find_gates(model: nn.Module) -> tuple[list[tuple[str, str, nn.Module, GateSpec]], list[str]]:
    found, unsupported = [], []
    for name, module in model.named_modules():
        class_name, spec = _router_spec(module)
        if class_name is None:
            continue
        if spec is None:
            unsupported.append(f"{name} ({class_name}): {UNSUPPORTED_ROUTERS[class_name]}")
        else:
            found.append((name, class_name, module, spec))
    return found, unsupported


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

    Raises ValueError naming the module for a model with no supported MoE router, a model
    already patched, or options the model's router cannot honour; the model is then left
    unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model_bias not in MODEL_BIAS_POLICIES:
        raise ValueError(f"model_bias must be one of {MODEL_BIAS_POLICIES}, got {model_bias!r}")
    known = set(router_option_names())
    unknown = sorted(set(router_options) - known)
    if unknown:
        raise TypeError(f"unknown router options {unknown}; known: {sorted(known)}")

    config = getattr(model, "config", None)
    saved = getattr(config, CONFIG_KEY, None) if config is not None else None
    if balancer is None:
        if isinstance(saved, dict):
            merged = {k: v for k, v in saved.items() if k != "balancer"}
            merged.update(router_options)
            router_options = merged
            balancer = saved.get("balancer", "none")
        else:
            balancer = "none"
    if not isinstance(balancer, str):
        raise TypeError(f"balancer must be a name (str), got {type(balancer).__name__}")

    existing = model.__dict__.get(HANDLE_ATTR)
    if existing is not None and existing.patched:
        raise ValueError(
            f"{type(model).__name__} is already patched by moebal ({existing!r}); "
            f"call unpatch() on its handle first"
        )
    found, unsupported = _find_gates(model)
    for name, class_name, gate, _ in found:
        if ADAPTER_ATTR in gate.__dict__ or "forward" in gate.__dict__:
            raise ValueError(f"{name} ({class_name}) is already patched")
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

    # Build everything first: any bad option raises before the model is touched.
    adapters = []
    for name, class_name, gate, spec in found:
        rcfg = _router_config(name, class_name, gate, spec, balancer, router_options, model_bias)
        _verify_gate(name, class_name, gate, spec, rcfg)
        adapter = GateAdapter(name, class_name, spec, rcfg, group=group)
        if model_bias == "init" and spec.correction_bias is not None:
            _init_expert_bias(name, class_name, adapter, getattr(gate, spec.correction_bias))
        adapter.to(device=_attr(gate, spec.weight).device)
        adapters.append(adapter)
    experts = {a.router.config.num_experts for a in adapters}
    if len(experts) > 1:
        raise ValueError(
            f"{type(model).__name__} has MoE layers with different expert counts {sorted(experts)}"
        )
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
            stacklevel=2,
        )

    handle = PatchHandle(model, balancer, router_options)
    modules = dict(model.named_modules())
    for (name, _, gate, _), adapter in zip(found, adapters):
        gate.__dict__[ADAPTER_ATTR] = adapter  # not a submodule: state lives in model.moebal
        gate.forward = types.MethodType(_patched_gate_forward, gate)
        adapter.train(gate.training)
        parts = name.split(".")
        ancestors = [modules[".".join(parts[:i])] for i in range(len(parts))]
        adapter._checkpointed_by = [m for m in ancestors if hasattr(m, "gradient_checkpointing")]
        parent = modules[".".join(parts[:-1])]
        handle._hooks.append(parent.register_forward_pre_hook(_seq_len_hook(adapter)))
        handle._gates.append((name, gate, adapter))
    model.add_module(SUBMODULE, nn.ModuleList(adapters))
    if add_loss_to_output:
        handle._hooks.append(model.register_forward_hook(_add_loss_hook(handle)))
    if config is not None:
        handle._config_before = (hasattr(config, CONFIG_KEY), saved)
        setattr(config, CONFIG_KEY, {"balancer": balancer, **_jsonable(router_options)})
    model.__dict__[HANDLE_ATTR] = handle
    handle.patched = True
    return handle


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in options.items():
        try:
            json.dumps(value)
        except TypeError:
            continue  # not saved with the config; pass it again when re-patching
        out[key] = value
    return out


def _seq_len_hook(adapter: GateAdapter):
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        adapter.seq_len = int(x.shape[1]) if isinstance(x, torch.Tensor) and x.dim() == 3 else None

    return hook


def _add_loss_hook(handle: PatchHandle):
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        loss = getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            output.loss = loss + handle.loss().to(device=loss.device, dtype=loss.dtype)
        return output

    return hook


def get_handle(model: nn.Module) -> Optional[PatchHandle]:
    """The handle of the patch applied to ``model``, or None."""
    handle = model.__dict__.get(HANDLE_ATTR)
    return handle if handle is not None and handle.patched else None


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


__all__ = [
    "GateAdapter",
    "GateSpec",
    "PatchHandle",
    "SUPPORTED_ROUTERS",
    "UNSUPPORTED_ROUTERS",
    "from_pretrained",
    "get_handle",
    "patch_model",
]
