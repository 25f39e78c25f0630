"""Load-balance metrics of the Loss-Free and BIP papers.

MaxVio of one load vector (Loss-Free paper)::

    MaxVio(load) = max_j load_j / ideal - 1,     ideal = T*K/E

the ideal load of an expert when the T*K routed token-slots are shared equally. Without
capacity drops the loads sum to T*K and the ideal is their mean: 0 for a perfectly balanced
vector, E-1 when one expert takes everything. With drops the loads sum to less, and against
the ideal the drops show (keeping 8 of 512 slots on 8 experts is 1/64 - 1 = -0.98, not a
balanced 0); read it beside the dropped fraction ``1 - sum_j load_j / (T*K)``.
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


def _check_slots(routed_slots: Optional[float]) -> None:
    if routed_slots is not None and not (
        isinstance(routed_slots, (int, float, np.integer, np.floating))
        and not isinstance(routed_slots, bool) and np.isfinite(routed_slots) and routed_slots >= 0
    ):
        raise ValueError(f"routed_slots must be a finite number >= 0, got {routed_slots!r}")


def max_violation(loads_E: ArrayLike, ideal: Optional[float] = None) -> float:
    """MaxVio of one load vector: ``max(load) / ideal - 1``.

    ``ideal``: the ideal load per expert, ``T*K/E`` (None: the mean of the loads, which is
    the ideal when no slot was dropped). 0.0 when the ideal is 0.
    """
    arr = _as_array(loads_E)
    if arr.ndim != 1:
        raise ValueError(f"max_violation takes a 1-D load vector, got shape {arr.shape}")
    if ideal is None:
        ideal = arr.mean() if arr.size else 0.0
    elif not (isinstance(ideal, (int, float, np.integer, np.floating))
              and not isinstance(ideal, bool) and np.isfinite(ideal) and ideal >= 0):
        raise ValueError(f"ideal must be a finite number >= 0, got {ideal!r}")
    if ideal <= 0 or not arr.size:
        return 0.0
    return float(arr.max() / ideal - 1.0)


def max_violation_per_layer(loads_LE: ArrayLike, routed_slots: Optional[float] = None) -> np.ndarray:
    """MaxVio of each row of a [layers, experts] load matrix.

    ``routed_slots``: the token-slots each layer routed, T*K (ideal ``T*K/E``); None: the
    row's own sum (right when nothing was dropped).
    """
    arr = _as_array(loads_LE)
    if arr.ndim != 2:
        raise ValueError(f"expected a [layers, experts] matrix, got shape {arr.shape}")
    _check_slots(routed_slots)
    E = arr.shape[1]
    ideal_L = arr.mean(axis=1) if routed_slots is None or not E else np.full(
        arr.shape[0], routed_slots / E)
    out = np.zeros(arr.shape[0])
    nz = ideal_L > 0
    out[nz] = arr[nz].max(axis=1) / ideal_L[nz] - 1.0
    return out


def dropped_fraction_per_layer(loads_LE: ArrayLike, routed_slots: Optional[float]) -> np.ndarray:
    """``1 - sum_j load_j / routed_slots`` per layer: the share of the T*K token-slots that
    capacity dropped (0 for routed_slots None or 0)."""
    arr = _as_array(loads_LE)
    if arr.ndim != 2:
        raise ValueError(f"expected a [layers, experts] matrix, got shape {arr.shape}")
    _check_slots(routed_slots)
    if not routed_slots:
        return np.zeros(arr.shape[0])
    return 1.0 - arr.sum(axis=1) / routed_slots


class BalanceTracker:
    """Records per-layer, per-step loads and gives the papers' aggregates.

    ``record(loads_LE, routed_slots=T*K)`` — one training step's per-layer loads and the
    token-slots each layer routed. Its **MaxVio_batch** is the MaxVio of each layer's loads
    against the ideal ``T*K/E``, averaged over the MoE layers (Loss-Free paper); its dropped
    fraction per layer is ``1 - sum_j load_j / (T*K)``. Without ``routed_slots`` the loads'
    own sum stands for T*K (no drops).

    - ``avg_max_vio``: **AvgMaxVio** (BIP paper), the mean over recorded steps of the
      layer-averaged MaxVio_batch.
    - ``sup_max_vio``: **SupMaxVio** (BIP paper), the maximum over recorded steps of the
      layer-averaged MaxVio_batch.
    - ``dropped_frac``: the mean over recorded steps of the layer-averaged dropped fraction.
    - ``max_vio_global()``: **MaxVio_global** (Loss-Free paper), the MaxVio of each layer's
      loads summed over an evaluation set (fed through ``accumulate_global``, with the
      routed slots of each batch), against the ideal of the summed slots, averaged over
      layers.

    ``history`` keeps the per-layer MaxVio_batch of every step ([steps, layers]),
    ``dropped_history`` the per-layer dropped fraction.
    """

    def __init__(self, num_layers: int, num_experts: Optional[int] = None) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers!r}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.steps: list[int] = []
        self.per_layer: list[np.ndarray] = []
        self.dropped: list[np.ndarray] = []
        self._global_LE: Optional[np.ndarray] = None
        self._global_slots: Optional[float] = 0.0

    def _check_shape(self, arr: np.ndarray) -> None:
        if arr.ndim != 2 or arr.shape[0] != self.num_layers:
            raise ValueError(
                f"loads must be [{self.num_layers} layers, experts], got shape {arr.shape}"
            )
        if self.num_experts is not None and arr.shape[1] != self.num_experts:
            raise ValueError(f"loads have {arr.shape[1]} experts, expected {self.num_experts}")

    def record(
        self, loads_LE: ArrayLike, step: Optional[int] = None,
        routed_slots: Optional[float] = None,
    ) -> float:
        """Record one step's loads; returns its layer-averaged MaxVio_batch."""
        arr = _as_array(loads_LE)
        self._check_shape(arr)
        vio_L = max_violation_per_layer(arr, routed_slots)
        dropped_L = dropped_fraction_per_layer(arr, routed_slots)
        self.steps.append(len(self.steps) if step is None else int(step))
        self.per_layer.append(vio_L)
        self.dropped.append(dropped_L)
        return float(vio_L.mean())

    @property
    def history(self) -> np.ndarray:
        if not self.per_layer:
            return np.zeros((0, self.num_layers))
        return np.stack(self.per_layer)

    @property
    def dropped_history(self) -> np.ndarray:
        if not self.dropped:
            return np.zeros((0, self.num_layers))
        return np.stack(self.dropped)

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

    @property
    def dropped_frac(self) -> float:
        """Mean over recorded steps of the layer-averaged dropped fraction (nan before any)."""
        return float(self.dropped_history.mean()) if self.dropped else float("nan")

    def accumulate_global(self, loads_LE: ArrayLike, routed_slots: Optional[float] = None) -> None:
        """Add one evaluation batch's per-layer loads (and its T*K routed slots) to the sum."""
        arr = _as_array(loads_LE)
        self._check_shape(arr)
        _check_slots(routed_slots)
        if self._global_LE is None:
            self._global_LE, self._global_slots = arr.copy(), 0.0
        else:
            self._global_LE = self._global_LE + arr
        if routed_slots is None or self._global_slots is None:
            self._global_slots = None  # a batch without its slots: the loads' own sums
        else:
            self._global_slots += routed_slots

    def max_vio_global(self, reset: bool = True) -> float:
        """Layer-averaged MaxVio of the accumulated evaluation loads (then cleared if reset)."""
        layers = self.max_vio_global_per_layer(reset)
        return float(layers.mean()) if layers.size else float("nan")

    def max_vio_global_per_layer(self, reset: bool = True) -> np.ndarray:
        """Each layer's MaxVio of the accumulated evaluation loads (then cleared if reset);
        empty before any evaluation batch."""
        if self._global_LE is None:
            return np.zeros(0)
        value = max_violation_per_layer(self._global_LE, self._global_slots)
        if reset:
            self._global_LE, self._global_slots = None, 0.0
        return value

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "steps": list(self.steps),
            "per_layer": self.history.tolist(),
            "dropped": self.dropped_history.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_layers"] != self.num_layers:
            raise ValueError(
                f"tracker state is for {state['num_layers']} layers, this one has {self.num_layers}"
            )
        self.steps = [int(s) for s in state["steps"]]
        self.per_layer = [np.asarray(row, dtype=np.float64) for row in state["per_layer"]]
        # a state saved before drops were recorded: none were counted
        dropped = state.get("dropped", [[0.0] * self.num_layers for _ in self.steps])
        self.dropped = [np.asarray(row, dtype=np.float64) for row in dropped]


def optimal_score_gap(scores_TE: torch.Tensor, indices_TK: torch.Tensor,
                      kept_TK: Optional[torch.Tensor] = None) -> dict[str, float]:
    """How far a routing's score is from the exact balanced optimum of the same batch.

    ``S`` is the sum of the routing scores of the chosen (and kept) token-expert slots;
    ``S_opt`` that of the best routing in which every expert takes its balanced share of
    the T*K slots (:func:`moebal.routing.balancers.optimal.optimal_routing`), ``S_top`` that
    of plain top-k (the unconstrained best). Returns ``{"gap": (S_opt - S) / S_opt,
    "price_of_balance": (S_top - S_opt) / S_top, "score": S, "optimal": S_opt,
    "topk": S_top}``. A negative gap means the routing took more score than any balanced
    routing can: it is not balanced.
    """
    from moebal.routing.balancers.optimal import optimal_routing

    scores_TE = scores_TE.detach().float()
    K = indices_TK.shape[1]
    chosen_TK = scores_TE.gather(1, indices_TK)
    if kept_TK is not None:
        chosen_TK = chosen_TK * kept_TK
    s = float(chosen_TK.sum())
    s_opt = float(scores_TE.gather(1, optimal_routing(scores_TE, K)).sum())
    s_top = float(torch.topk(scores_TE, K, dim=-1).values.sum())
    return {"gap": (s_opt - s) / s_opt if s_opt else float("nan"),
            "price_of_balance": (s_top - s_opt) / s_top if s_top else float("nan"),
            "score": s, "optimal": s_opt, "topk": s_top}


def optimal_score_gaps(routings: Sequence[Any]) -> list[dict[str, float]]:
    """:func:`optimal_score_gap` of each non-empty ``moebal.routing.Routing`` (one per MoE
    layer of a forward) that carries its scores."""
    return [optimal_score_gap(r.scores_TE, r.indices_TK, r.kept_TK) for r in routings
            if r.scores_TE is not None and r.scores_TE.numel()]
