"""Load-balance metrics of the Loss-Free and BIP papers.

MaxVio of one load vector (Loss-Free paper)::

    MaxVio(load) = max_j load_j / mean_j load_j - 1

where the mean is the ideal load T*K/E when every slot was routed (with capacity drops the
mean of the kept loads). It is 0 for a perfectly balanced vector and E-1 when one expert
takes everything.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float]]


def _as_array(loads: ArrayLike) -> np.ndarray:
    if isinstance(loads, torch.Tensor):
        loads = loads.detach().cpu().double().numpy()
    arr = np.asarray(loads, dtype=np.float64)
    if arr.ndim == 0:
        raise ValueError(f"loads must have an expert axis, got a scalar {arr!r}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"loads must be finite and non-negative, got {arr!r}")
    return arr


def max_violation(loads_E: ArrayLike) -> float:
    """MaxVio of one load vector: ``max(load) / mean(load) - 1``; 0.0 for an all-zero vector."""
    arr = _as_array(loads_E)
    if arr.ndim != 1:
        raise ValueError(f"max_violation takes a 1-D load vector, got shape {arr.shape}")
    mean = arr.mean() if arr.size else 0.0
    if mean <= 0:
        return 0.0
    return float(arr.max() / mean - 1.0)


def max_violation_per_layer(loads_LE: ArrayLike) -> np.ndarray:
    """MaxVio of each row of a [layers, experts] load matrix."""
    arr = _as_array(loads_LE)
    if arr.ndim != 2:
        raise ValueError(f"expected a [layers, experts] matrix, got shape {arr.shape}")
    mean_L = arr.mean(axis=1)
    out = np.zeros(arr.shape[0])
    nz = mean_L > 0
    out[nz] = arr[nz].max(axis=1) / mean_L[nz] - 1.0
    return out


class BalanceTracker:
    """Records per-layer, per-step loads and gives the papers' aggregates.

    ``record(loads_LE)`` — one training step's per-layer loads. Its **MaxVio_batch** is the
    MaxVio of each layer's loads, averaged over the MoE layers (Loss-Free paper).

    - ``avg_max_vio``: **AvgMaxVio** (BIP paper), the mean over recorded steps of the
      layer-averaged MaxVio_batch.
    - ``sup_max_vio``: **SupMaxVio** (BIP paper), the maximum over recorded steps of the
      layer-averaged MaxVio_batch.
    - ``max_vio_global()``: **MaxVio_global** (Loss-Free paper), the MaxVio of each layer's
      loads summed over an evaluation set (fed through ``accumulate_global``), averaged over
      layers.

    ``history`` keeps the per-layer MaxVio_batch of every step ([steps, layers]).
    """

    def __init__(self, num_layers: int, num_experts: Optional[int] = None) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers!r}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.steps: list[int] = []
        self.per_layer: list[np.ndarray] = []
        self._global_LE: Optional[np.ndarray] = None

    def _check_shape(self, arr: np.ndarray) -> None:
        if arr.ndim != 2 or arr.shape[0] != self.num_layers:
            raise ValueError(
                f"loads must be [{self.num_layers} layers, experts], got shape {arr.shape}"
            )
        if self.num_experts is not None and arr.shape[1] != self.num_experts:
            raise ValueError(f"loads have {arr.shape[1]} experts, expected {self.num_experts}")

    def record(self, loads_LE: ArrayLike, step: Optional[int] = None) -> float:
        """Record one step's loads; returns its layer-averaged MaxVio_batch."""
        arr = _as_array(loads_LE)
        self._check_shape(arr)
        vio_L = max_violation_per_layer(arr)
        self.steps.append(len(self.steps) if step is None else int(step))
        self.per_layer.append(vio_L)
        return float(vio_L.mean())

    @property
    def history(self) -> np.ndarray:
        if not self.per_layer:
            return np.zeros((0, self.num_layers))
        return np.stack(self.per_layer)

    @property
    def max_vio_batch(self) -> np.ndarray:
        """Layer-averaged MaxVio_batch of every recorded step."""
        return self.history.mean(axis=1) if self.per_layer else np.zeros(0)

    @property
    def avg_max_vio(self) -> float:
        vio = self.max_vio_batch
        return float(vio.mean()) if vio.size else float("nan")

    @property
    def sup_max_vio(self) -> float:
        vio = self.max_vio_batch
        return float(vio.max()) if vio.size else float("nan")

    def accumulate_global(self, loads_LE: ArrayLike) -> None:
        """Add one evaluation batch's per-layer loads to the global sum."""
        arr = _as_array(loads_LE)
        self._check_shape(arr)
        self._global_LE = arr.copy() if self._global_LE is None else self._global_LE + arr

    def max_vio_global(self, reset: bool = True) -> float:
        """Layer-averaged MaxVio of the accumulated evaluation loads (then cleared if reset)."""
        if self._global_LE is None:
            return float("nan")
        value = float(max_violation_per_layer(self._global_LE).mean())
        if reset:
            self._global_LE = None
        return value

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "steps": list(self.steps),
            "per_layer": self.history.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_layers"] != self.num_layers:
            raise ValueError(
                f"tracker state is for {state['num_layers']} layers, this one has {self.num_layers}"
            )
        self.steps = [int(s) for s in state["steps"]]
        self.per_layer = [np.asarray(row, dtype=np.float64) for row in state["per_layer"]]
