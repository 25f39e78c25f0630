"""A ``transformers.Trainer`` callback for a model patched by :func:`moebal.integrations.hf.patch_model`.

At every optimizer step (``on_optimizer_step``: once per step whatever the gradient
accumulation, after ``optimizer.step()``) it

1. takes the per-layer loads of all micro-batches of that step (``handle.step()``), which
   also lets loss-free / quantile / BIP balancers update their state once from those loads,
   as Megatron-core and torchtitan do;
2. records the MaxVio of those loads per layer (one global batch = one "MaxVio_batch").

At each training log it adds ``moebal/max_vio`` (mean over layers of the steps since the
last log) and ``moebal/max_vio/layer_<i>`` to the logs and to ``state.log_history``. The
Trainer calls reporting callbacks (TensorBoard, W&B, ...) in order; to have them see these
values put this callback first: ``add_to_trainer(trainer)`` does.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from transformers import TrainerCallback

from moebal.integrations.hf import PatchHandle, get_handle
from moebal.metrics import BalanceTracker


class MoebalCallback(TrainerCallback):
    """Steps the balancers once per optimizer step and logs MaxVio per MoE layer.

    handle: the patch to drive; None takes the one of the model the Trainer trains.
    per_layer: also log each layer's MaxVio (else only the mean over layers).
    ``tracker`` (a :class:`moebal.metrics.BalanceTracker`) keeps every step's per-layer
    MaxVio: ``tracker.avg_max_vio`` / ``tracker.sup_max_vio`` after training.
    """

    def __init__(self, handle: Optional[PatchHandle] = None, per_layer: bool = True) -> None:
        if handle is not None and not isinstance(handle, PatchHandle):
            raise TypeError(f"handle must be a PatchHandle, got {type(handle).__name__}")
        self.handle = handle
        self.per_layer = per_layer
        self.tracker: Optional[BalanceTracker] = None
        self._logged_rows = 0

    def _bind(self, model: Any) -> None:
        if self.handle is None:
            inner = model
            while inner is not None and get_handle(inner) is None:
                inner = getattr(inner, "module", None)  # DDP / accelerate wrappers
            self.handle = get_handle(inner) if inner is not None else None
            if self.handle is None:
                raise ValueError(
                    f"{type(model).__name__} is not patched by moebal; call "
                    f"moebal.integrations.hf.patch_model(model, balancer=...) first"
                )
        if self.tracker is None:
            self.tracker = BalanceTracker(self.handle.num_layers, self.handle.num_experts)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._bind(model)
        self.handle.discard_step_loads()  # count only what this training routes
        for router in self.handle.routers:
            # the Trainer steps the balancers: no implicit step per forward, even before
            # the first optimizer step (Router's default without a training loop)
            router.auto_step = False

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.tracker is None:
            self._bind(model)
        loads_LE = self.handle.step()
        if int(loads_LE.sum()) > 0:
            self.tracker.record(loads_LE, step=state.global_step + 1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self.tracker is None:
            return
        history = self.tracker.history
        recent = history[self._logged_rows:]
        self._logged_rows = len(history)
        if not len(recent):
            return
        vio_L = np.asarray(recent).mean(axis=0)
        extra = {"moebal/max_vio": round(float(vio_L.mean()), 6)}
        if self.per_layer:
            for i, value in enumerate(vio_L):
                extra[f"moebal/max_vio/layer_{i}"] = round(float(value), 6)
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)


def add_to_trainer(trainer: Any, handle: Optional[PatchHandle] = None,
                   per_layer: bool = True) -> MoebalCallback:
    """Put a :class:`MoebalCallback` first among ``trainer``'s callbacks; returns it."""
    callback = MoebalCallback(handle, per_layer=per_layer)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


__all__ = ["MoebalCallback", "add_to_trainer"]
