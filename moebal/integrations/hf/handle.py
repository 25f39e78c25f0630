"""The handle of a patched model: its layers, their balance, ``step`` and ``unpatch``."""

from __future__ import annotations

import os
import types
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from moebal.integrations.hf.checkpoint import read_checkpoint_keys
from moebal.integrations.hf.families import FoundGate
from moebal.integrations.hf.gate import ADAPTER_ATTR, GateAdapter, SeqLenHook, patched_gate_forward
from moebal.integrations.hf.record import RoutingRecord
from moebal.integrations.hf.forward import ForwardBeginHook, ForwardEndHook, ModelForward
from moebal.metrics import max_violation_per_layer
from moebal.routing import Router, Routing

SUBMODULE = "moebal"  # ModuleList of the adapters, registered on the patched model
CONFIG_KEY = "moebal_routing"  # entry of model.config holding the options of the patch
HANDLE_ATTR = "moebal_patch"  # attribute of the patched model holding its handle


class AddLossHook:
    """Forward hook on the model: adds ``handle.loss()`` to the ``loss`` of its output.

    An object, not a closure, so that ``copy.deepcopy`` of the model copies it with the
    model and the copy's hook reads the copy's handle."""

    def __init__(self, handle: "PatchHandle") -> None:
        self.handle = handle

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        loss = getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            output.loss = loss + self.handle.loss().to(device=loss.device, dtype=loss.dtype)
        return output


class PatchHandle:
    """What ``patch_model`` returns: the patched layers, their balance, ``step`` and ``unpatch``.

    ``names``: the patched router modules, in model order (one per MoE layer). ``record``:
    the :class:`RoutingRecord` the layers add each forward's routing to.
    """

    def __init__(self, model: nn.Module, balancer: str, options: dict[str, Any],
                 record: RoutingRecord) -> None:
        self.model = model
        self.balancer = balancer
        self.options = dict(options)
        self.record = record
        self._gates: list[tuple[str, nn.Module, GateAdapter]] = []
        self._hooks: list[Any] = []
        self._config_before: tuple[bool, Any] = (False, None)
        self.patched = False

    # -- patch and undo ------------------------------------------------------------------
    def install(self, found: list[FoundGate], adapters: list[GateAdapter], forward: ModelForward,
                add_loss_to_output: bool, config_entry: Optional[dict[str, Any]]) -> None:
        """Route each found router module through its adapter; register the adapters as
        ``model.moebal``, the hooks that open and close the model's ``forward`` (before the
        loss hook, which reads what it recorded) and the patch options in ``model.config``."""
        model = self.model
        self._hooks.append(
            model.register_forward_pre_hook(ForwardBeginHook(forward), with_kwargs=True))
        self._hooks.append(model.register_forward_hook(ForwardEndHook(forward)))
        modules = dict(model.named_modules())
        for gate, adapter in zip(found, adapters):
            gate.module.__dict__[ADAPTER_ATTR] = adapter  # not a submodule: state is in model.moebal
            gate.module.forward = types.MethodType(patched_gate_forward, gate.module)
            adapter.train(gate.module.training)
            parent = modules[gate.name.rpartition(".")[0]]
            self._hooks.append(parent.register_forward_pre_hook(SeqLenHook(adapter)))
            self._gates.append((gate.name, gate.module, adapter))
        model.add_module(SUBMODULE, nn.ModuleList(adapters))
        if add_loss_to_output:
            self._hooks.append(model.register_forward_hook(AddLossHook(self)))
        config = getattr(model, "config", None)
        if config is not None and config_entry is not None:
            self._config_before = (hasattr(config, CONFIG_KEY), getattr(config, CONFIG_KEY, None))
            setattr(config, CONFIG_KEY, config_entry)
        model.__dict__[HANDLE_ATTR] = self
        self.patched = True

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

    def _require_patched(self) -> None:
        if not self.patched:
            raise RuntimeError("this patch has been undone (unpatch() was called)")

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

    def _per_layer_loads(self, rows: list[Optional[torch.Tensor]]) -> torch.Tensor:
        return torch.stack([
            torch.zeros(a.router.config.num_experts, dtype=torch.int64) if row is None
            else row.detach().cpu()
            for a, row in zip(self.adapters, rows)
        ])

    # -- balance of the last forward ---------------------------------------------------
    def routings(self) -> list[Optional[Routing]]:
        """Each layer's :class:`Routing` of its most recent forward (None before its first)."""
        return list(self.record.latest)

    def loads(self) -> torch.Tensor:
        """int64 [layers, experts]: tokens per expert in each layer's most recent forward
        (zeros for a layer that has not run)."""
        return self._per_layer_loads([None if r is None else r.loads_E for r in self.record.latest])

    def max_vio(self) -> np.ndarray:
        """MaxVio of each layer's loads in its most recent forward ([layers])."""
        return max_violation_per_layer(self.loads())

    def _sum(self, part: Callable[[Routing], torch.Tensor]) -> torch.Tensor:
        terms = [part(r) for r in self.record.latest if r is not None]
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
        return self._per_layer_loads(self.record.step_loads_LE)

    def discard_step_loads(self) -> None:
        """Forget the loads counted since the last step() without stepping the balancers."""
        self.record.end_step()

    def step(self) -> torch.Tensor:
        """One optimizer step: every balancer updates its state (loss-free bias, quantile
        prices) from the loads seen since the previous step. Returns those loads
        ([layers, experts]) and starts counting afresh."""
        self._require_patched()
        loads_LE = self.step_loads()
        for adapter in self.adapters:
            adapter.router.step()
            adapter.end_step()
        self.record.end_step()
        return loads_LE

    # -- balancer state ----------------------------------------------------------------
    def _adapter_list(self) -> nn.ModuleList:
        return self.model._modules[SUBMODULE]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The balancer state only, under the same keys as in ``model.state_dict()``."""
        return {f"{SUBMODULE}.{key}": value
                for key, value in self._adapter_list().state_dict().items()}

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
        self._adapter_list().load_state_dict(sub, strict=False)

    def load_pretrained_state(self, path: Union[str, os.PathLike]) -> None:
        """Load the balancer state from a ``save_pretrained`` directory (safetensors)."""
        self.load_state_dict(read_checkpoint_keys(path, f"{SUBMODULE}."))

    def __repr__(self) -> str:
        state = "patched" if self.patched else "unpatched"
        return (
            f"PatchHandle({state}, balancer={self.balancer!r}, layers={self.num_layers}, "
            f"model={type(self.model).__name__})"
        )


def get_handle(model: nn.Module) -> Optional[PatchHandle]:
    """The handle of the patch applied to ``model``, or None."""
    handle = model.__dict__.get(HANDLE_ATTR)
    return handle if handle is not None and handle.patched else None


__all__ = ["AddLossHook", "CONFIG_KEY", "HANDLE_ATTR", "PatchHandle", "SUBMODULE", "get_handle"]
