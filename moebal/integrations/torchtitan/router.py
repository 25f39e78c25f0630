"""moebal's balancers in torchtitan MoE models.

``patch_model(model, balancer="bip")`` finds every ``torchtitan.models.common.moe.MoE``
block of a torchtitan model (``qwen3``, ``deepseek_v3``, ``gpt_oss``, ... any decoder built
from ``MoE.Config``) and swaps its ``TokenChoiceTopKRouter`` for a :class:`BalancedRouter`
(a subclass, so torchtitan's code that looks for the router still finds one):

- the router's own gate computes the logits as torchtitan does (float32);
- the scores are torchtitan's (``score_func`` sigmoid or softmax);
- the moebal balancer chooses the K experts from those logits;
- the gate weights are the unbiased scores of the chosen experts, renormalised when
  ``route_norm`` is set (torchtitan's ``+ 1e-20``) and times ``route_scale``;
- the expert computation, the token dispatcher and the shared experts are untouched.

With ``balancer="none"`` the patched model computes what the unpatched one does (checked on
a probe for every router before anything is changed).

torchtitan's own loss-free balancing (``MoE.Config(load_balance_coeff=...)``, an
``expert_bias_E`` updated by the optimizer step pre-hook of
``register_moe_load_balancing_hook``) is switched off while moebal drives: the patch sets
each block's ``load_balance_coeff`` to 0 (the hook then adds exact zeros) and the balanced
router ignores ``expert_bias_E``; ``unpatch()`` restores both. moebal's balancers update
at ``handle.step()``, which ``handle.register_step_pre_hook(optimizers)`` runs before every
optimizer step, the way torchtitan updates its bias (gradient accumulation included).

Each balancer is a submodule of its router, so its state is in ``model.state_dict()``
under ``<block>.moe.router.moebal.balancer.*`` and travels with torchtitan's checkpoints
(``ModelWrapper`` / DCP). Patch before torchtitan's ``parallelize`` and before wrapping the
model for checkpointing (``ModelWrapper`` caches the keys). A balancer is a plain
``nn.Module``, so call ``verify_module_protocol`` (if at all) before patching.

Group-limited routing (``num_limited_groups < num_expert_groups``) becomes moebal's
``num_groups``/``group_topk`` with torchtitan's group score (the sum of a group's two best
scores, after the bias the balancer chooses with: ``group_score="top2"``).

Limits, each refused with a ValueError naming the block: ``_debug_force_load_balance``, ``capacity_factor`` (torchtitan's MoE is dropless), a router
subclass with a forward of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchtitan.models.common.moe import MoE, TokenChoiceTopKRouter

from moebal.metrics import max_violation_per_layer
from moebal.routing import Router, RouterConfig, Routing, router_option_names
from moebal.routing.router import recomputing

if TYPE_CHECKING:  # pragma: no cover
    import torch.distributed as dist

HANDLE_ATTR = "moebal_patch"  # attribute of the patched model holding its handle
SUBMODULE = "moebal"  # the moebal Router inside each BalancedRouter
MODEL_BIAS_POLICIES = ("error", "drop", "init")
# RouterConfig fields fixed by the torchtitan router: accepted only if they agree with it
FIXED = ("num_experts", "top_k", "score_function", "norm_topk_prob", "num_groups", "group_topk",
         "group_score")
# torchtitan router attributes a BalancedRouter copies (and the Module protocol's ones)
_ROUTER_ATTRS = ("num_experts", "num_expert_groups", "num_limited_groups", "top_k",
                 "score_func", "route_norm", "route_scale", "_debug_force_load_balance",
                 "_param_init", "_sharding_config")


def router_config(*, num_experts: int, top_k: int, score_function: str, norm_topk_prob: bool,
                  balancer: str, options: dict[str, Any], num_groups: Optional[int] = None,
                  group_topk: Optional[int] = None, group_score: str = "top2") -> RouterConfig:
    """The one place this integration builds a :class:`moebal.routing.RouterConfig`."""
    groups = ({"num_groups": num_groups, "group_topk": group_topk, "group_score": group_score}
              if num_groups is not None else {})
    return RouterConfig(num_experts=num_experts, top_k=top_k, score_function=score_function,
                        norm_topk_prob=norm_topk_prob, balancer=balancer, **groups, **options)


def moe_blocks(model: nn.Module) -> list[tuple[str, MoE]]:
    """``(name, block)`` of every torchtitan ``MoE`` block of ``model``, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


class BalancedRouter(TokenChoiceTopKRouter):
    """A torchtitan router whose choice a moebal balancer makes.

    Holds the original router's gate (same parameter, same ``state_dict`` key) and a
    :class:`moebal.routing.Router` as ``self.moebal``. ``forward(x_BLD, expert_bias_E)``
    returns torchtitan's ``(topk_scores_BLK, topk_expert_ids_BLK, scores_BLE)``;
    ``expert_bias_E`` (torchtitan's own bias) is ignored. ``last`` is the
    :class:`moebal.routing.Routing` of the latest forward, ``step_loads_E`` the loads of
    the training forwards since the last ``step``.
    """

    def __init__(self, original: TokenChoiceTopKRouter, router: Router, block: str) -> None:
        nn.Module.__init__(self)  # the torchtitan config was consumed by ``original``
        for attr in _ROUTER_ATTRS:
            if attr in original.__dict__:
                self.__dict__[attr] = original.__dict__[attr]
        self.gate = original.gate
        router.replay = True  # a recompute in backward routes from its forward's state
        self.add_module(SUBMODULE, router)
        self.block = block
        self.last: Optional[Routing] = None
        self.step_loads_E: Optional[torch.Tensor] = None
        self.train(original.training)

    def extra_repr(self) -> str:
        return f"moebal balancer for {self.block}"

    def logits(self, x_BLD: torch.Tensor) -> torch.Tensor:
        """The gate's logits [T, E] in float32, as torchtitan computes them."""
        device_type = x_BLD.device.type
        with torch.autocast(device_type=device_type, dtype=torch.float32,
                            enabled=device_type != "cpu"):  # CPU autocast has no float32
            logits_BLE = self.gate(x_BLD)
        return logits_BLE.reshape(-1, self.num_experts)

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        if self.score_func == "sigmoid":
            return torch.sigmoid(logits_TE)
        return F.softmax(logits_TE, dim=-1)

    def choose(self, logits_TE: torch.Tensor, seq_len: Optional[int]) -> Routing:
        """The moebal router's answer. A recompute under activation checkpointing routes
        from the state its forward saw and counts nothing again."""
        if self.training and recomputing():
            return self.moebal(logits_TE, seq_len=seq_len)
        routing = self.moebal(logits_TE, seq_len=seq_len)
        self.last = routing
        if self.training:
            loads_E = routing.loads_E.detach()
            self.step_loads_E = loads_E if self.step_loads_E is None else self.step_loads_E + loads_E
        return routing

    def forward(self, x_BLD: torch.Tensor, expert_bias_E: Optional[torch.Tensor] = None):
        del expert_bias_E  # torchtitan's own bias: moebal's balancer chooses instead
        B, L = x_BLD.shape[0], x_BLD.shape[1]
        E, K = self.num_experts, self.top_k
        logits_TE = self.logits(x_BLD)
        scores_TE = self.scores(logits_TE)
        indices_TK = self.choose(logits_TE.float(), seq_len=L).indices_TK
        topk_scores_TK = scores_TE.gather(dim=-1, index=indices_TK)
        if self.route_norm:
            topk_scores_TK = topk_scores_TK / (topk_scores_TK.sum(dim=-1, keepdim=True) + 1e-20)
        topk_scores_TK = topk_scores_TK * self.route_scale
        return (topk_scores_TK.view(B, L, K), indices_TK.view(B, L, K),
                scores_TE.view(B, L, E))


class TitanPatchHandle:
    """What :func:`patch_model` returns: the balanced routers, their balance, ``step`` and
    ``unpatch``. ``names``: the patched MoE blocks, in model order."""

    def __init__(self, model: nn.Module, balancer: str, options: dict[str, Any],
                 center_bias: bool) -> None:
        self.model = model
        self.balancer = balancer
        self.options = dict(options)
        self.center_bias = center_bias
        # (block name, block, original router, balanced router, block's load_balance_coeff)
        self._blocks: list[tuple[str, MoE, TokenChoiceTopKRouter, BalancedRouter, Any]] = []
        self._hooks: list[Any] = []
        self.patched = False

    @property
    def names(self) -> list[str]:
        return [name for name, *_ in self._blocks]

    @property
    def num_layers(self) -> int:
        return len(self._blocks)

    @property
    def routers(self) -> list[BalancedRouter]:
        return [balanced for _, _, _, balanced, _ in self._blocks]

    def _require_patched(self) -> None:
        if not self.patched:
            raise RuntimeError("this patch has been undone (unpatch() was called)")

    def _stack(self, rows: list[Optional[torch.Tensor]]) -> torch.Tensor:
        E = self.routers[0].num_experts
        return torch.stack([torch.zeros(E, dtype=torch.int64) if r is None
                            else r.detach().to("cpu", torch.int64) for r in rows])

    def loads(self) -> torch.Tensor:
        """int64 [layers, experts]: tokens per expert in each layer's latest forward."""
        return self._stack([None if r.last is None else r.last.loads_E for r in self.routers])

    def max_vio(self) -> np.ndarray:
        """MaxVio of each layer's loads in its latest forward ([layers])."""
        return max_violation_per_layer(self.loads())

    def step_loads(self) -> torch.Tensor:
        """int64 [layers, experts]: loads of the training forwards since the last step()."""
        return self._stack([r.step_loads_E for r in self.routers])

    def loss(self) -> torch.Tensor:
        """The balancers' aux loss plus z-loss of the latest forward, summed over layers
        (zero for the loss-free balancers): add it to the training loss."""
        terms = [r.last.loss for r in self.routers if r.last is not None]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def step(self) -> torch.Tensor:
        """One optimizer step: every balancer updates its state from the loads seen since
        the last step (all-reduced over ``group``). With ``center_bias`` an expert bias is
        then shifted to mean zero, as torchtitan's update keeps it (the choice is
        unchanged: a shift of every expert's bias by one constant). Returns those loads."""
        self._require_patched()
        loads_LE = self.step_loads()
        for router in self.routers:
            router.moebal.step()
            bias_E = getattr(router.moebal.balancer, "bias_E", None)
            if self.center_bias and isinstance(bias_E, torch.Tensor) and router.training:
                with torch.no_grad():
                    bias_E.sub_(bias_E.mean())
            router.step_loads_E = None
        return loads_LE

    def register_step_pre_hook(self, optimizer: torch.optim.Optimizer):
        """Run ``step()`` before every ``optimizer.step()`` (torchtitan's
        ``OptimizersContainer`` or any torch optimizer); removed by ``unpatch``."""
        self._require_patched()
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (torchtitan's "
                            f"OptimizersContainer is one), got {type(optimizer).__name__}")
        def pre_hook(optimizer, args, kwargs) -> None:
            self.step()

        hook = optimizer.register_step_pre_hook(pre_hook)
        self._hooks.append(hook)
        return hook

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The balancer state only, under its keys in ``model.state_dict()``."""
        return {key: value for key, value in self.model.state_dict().items()
                if f".router.{SUBMODULE}." in f".{key}"}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load balancer state from a dict with the keys of ``state_dict()`` (a full model
        state dict will do: its other keys are ignored). Every key must be present."""
        self._require_patched()
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"balancer state is missing {len(missing)} keys, e.g. {missing[:3]}")
        for key, current in expected.items():
            if tuple(state[key].shape) != tuple(current.shape):
                raise ValueError(f"balancer state {key!r} has shape {tuple(state[key].shape)}, "
                                 f"expected {tuple(current.shape)}")
        with torch.no_grad():
            for key, current in expected.items():
                current.copy_(state[key])

    def unpatch(self) -> None:
        """Restore the model exactly as it was before ``patch_model``."""
        self._require_patched()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for _, block, original, _, coeff in self._blocks:
            block.router = original
            block.load_balance_coeff = coeff
        if self.model.__dict__.get(HANDLE_ATTR) is self:
            del self.model.__dict__[HANDLE_ATTR]
        self.patched = False

    def __repr__(self) -> str:
        state = "patched" if self.patched else "unpatched"
        return (f"TitanPatchHandle({state}, balancer={self.balancer!r}, "
                f"layers={self.num_layers}, model={type(self.model).__name__})")


def _block_config(name: str, block: MoE, balancer: str, options: dict[str, Any],
                  model_bias: str) -> RouterConfig:
    """The RouterConfig for one block's router, or a ValueError naming the block."""
    router = block.router
    where = f"{name} ({type(router).__name__})"
    if type(router).forward is not TokenChoiceTopKRouter.forward:
        raise ValueError(f"{where} has a forward of its own; moebal reproduces only "
                         f"torchtitan's TokenChoiceTopKRouter")
    if router._debug_force_load_balance:
        raise ValueError(f"{where} has _debug_force_load_balance set (round-robin routing); "
                         f"there is nothing for a balancer to choose")
    if options.get("capacity_factor") is not None:
        raise ValueError(f"{where}: torchtitan's MoE is dropless; capacity_factor "
                         f"{options['capacity_factor']!r} is not supported")
    model_values = model_routing(router)
    for key in FIXED:
        if key in options and options[key] != model_values[key]:
            raise ValueError(f"{where} routes with {key}={model_values[key]!r}; moebal cannot "
                             f"route it with {key}={options[key]!r}; leave {key} out")
    rest = {k: v for k, v in options.items() if k not in FIXED}
    coeff = block.load_balance_coeff
    if balancer == "loss_free" and "bias_update_rate" not in rest and coeff:
        rest["bias_update_rate"] = float(coeff)  # torchtitan's rate, unless told otherwise
    bias_E = block.expert_bias_E
    if (isinstance(bias_E, torch.Tensor) and bool((bias_E != 0).any())
            and model_bias == "error"):
        raise ValueError(f"{name} has a non-zero expert_bias_E (torchtitan's own loss-free "
                         f"balancing); balancer {balancer!r} would route without it. Pass "
                         f"model_bias='drop' to accept that, or balancer='loss_free' with "
                         f"model_bias='init' to continue from it")
    return router_config(balancer=balancer, options=rest, **model_values)


def model_routing(router: TokenChoiceTopKRouter) -> dict[str, Any]:
    """The router-level settings a torchtitan router fixes, as RouterConfig fields."""
    values = {"num_experts": int(router.num_experts), "top_k": int(router.top_k),
              "score_function": router.score_func, "norm_topk_prob": bool(router.route_norm),
              "num_groups": None, "group_topk": None, "group_score": "top2"}
    groups, limited = router.num_expert_groups, router.num_limited_groups
    if groups is not None and limited is not None and limited < groups:
        values.update(num_groups=int(groups), group_topk=int(limited))
    return values


@torch.no_grad()
def _verify(name: str, block: MoE) -> None:
    """On a random probe, the balanced router with no balancer must compute what the
    original router computes; a torchtitan version whose router differs is refused."""
    router = block.router
    weight = router.gate.weight
    generator = torch.Generator().manual_seed(0)
    x_BLD = torch.randn(2, 8, weight.shape[1], generator=generator).to(weight)
    probe_cfg = router_config(balancer="none", options={}, **model_routing(router))
    probe = BalancedRouter(router, Router(probe_cfg), name).to(weight.device).eval()
    ref = TokenChoiceTopKRouter.forward(router, x_BLD, None)
    got = probe(x_BLD)
    order_ref, order_got = ref[1].argsort(dim=-1), got[1].argsort(dim=-1)
    if (ref[2].shape != got[2].shape
            or not torch.equal(ref[1].gather(-1, order_ref), got[1].gather(-1, order_got))
            or not torch.allclose(ref[0].gather(-1, order_ref), got[0].gather(-1, order_got))
            or not torch.allclose(ref[2], got[2])):
        raise ValueError(f"{name}: its router in this torchtitan version does not compute "
                         f"what moebal reproduces; not patched")


def patch_model(
    model: nn.Module,
    balancer: str = "none",
    *,
    model_bias: str = "error",
    center_bias: bool = True,
    group: Optional["dist.ProcessGroup"] = None,
    **router_options: Any,
) -> TitanPatchHandle:
    """Route every torchtitan ``MoE`` block of ``model`` through a moebal balancer.

    balancer        a registered balancer name (``moebal.routing.BALANCERS``).
    router_options  other :class:`moebal.routing.RouterConfig` fields (bias_update_rate,
                    bip_iters, aux_loss_coeff, ...). ``num_experts``, ``top_k``,
                    ``score_function`` and ``norm_topk_prob`` are the router's. For
                    ``loss_free`` the rate defaults to the block's ``load_balance_coeff``.
    model_bias      a non-zero torchtitan ``expert_bias_E``: "error" refuses it, "drop"
                    routes without it (it stays in the model), "init" starts the loss_free
                    balancer's bias from it.
    center_bias     keep an expert bias at mean zero after each step (torchtitan's update).
    group           process group whose loads the balancers all-reduce at ``step()``
                    (torchtitan's ``loss`` mesh group: data and context parallel).

    Raises TypeError/ValueError naming the block for bad options, a model without MoE
    blocks, a model already patched or a router moebal cannot stand in for; the model is
    then unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(balancer, str):
        raise TypeError(f"balancer must be a name (str), got {type(balancer).__name__}")
    if model_bias not in MODEL_BIAS_POLICIES:
        raise ValueError(f"model_bias must be one of {MODEL_BIAS_POLICIES}, got {model_bias!r}")
    known = set(router_option_names())
    unknown = sorted(set(router_options) - known)
    if unknown:
        raise TypeError(f"unknown router options {unknown}; known: {sorted(known)}")
    if get_handle(model) is not None:
        raise ValueError(f"{type(model).__name__} is already patched by moebal; call "
                         f"unpatch() on its handle first")
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError(f"no torchtitan MoE block in {type(model).__name__} (looked for "
                         f"torchtitan.models.common.moe.MoE)")
    for name, block in blocks:
        if isinstance(block.router, BalancedRouter):
            raise ValueError(f"{name}.router is already a moebal BalancedRouter")

    built = []  # everything first: a bad option raises before the model is touched
    for name, block in blocks:
        config = _block_config(name, block, balancer, router_options, model_bias)
        balanced = BalancedRouter(block.router, Router(config, group=group), name)
        _verify(name, block)
        if model_bias == "init" and block.expert_bias_E is not None:
            bias_E = getattr(balanced.moebal.balancer, "bias_E", None)
            if not isinstance(bias_E, torch.Tensor):
                raise ValueError(f"{name}: model_bias='init' needs balancer='loss_free', "
                                 f"not {balancer!r}")
            bias_E.copy_(block.expert_bias_E.detach().to(bias_E.dtype).cpu())
        balanced.to(block.router.gate.weight.device)
        built.append((name, block, balanced))
    if len({b.num_experts for _, _, b in built}) > 1:
        raise ValueError(f"{type(model).__name__} has MoE blocks with different expert counts")

    handle = TitanPatchHandle(model, balancer, router_options, center_bias)
    for name, block, balanced in built:
        handle._blocks.append((name, block, block.router, balanced, block.load_balance_coeff))
        block.router = balanced
        if block.load_balance_coeff is not None:
            block.load_balance_coeff = 0.0  # torchtitan's bias hook now adds exact zeros
    model.__dict__[HANDLE_ATTR] = handle
    handle.patched = True
    return handle


def get_handle(model: nn.Module) -> Optional[TitanPatchHandle]:
    """The handle of the patch applied to ``model``, or None."""
    handle = model.__dict__.get(HANDLE_ATTR)
    return handle if handle is not None and handle.patched else None


__all__ = ["BalancedRouter", "TitanPatchHandle", "get_handle", "moe_blocks", "patch_model",
           "router_config"]
