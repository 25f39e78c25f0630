"""What a training run measures: per step (:class:`StepStats`), its history of logged steps
(:class:`History`) and its summary (:class:`TrainResult`, also written as result.json).

The result carries the run's series (thinned to at most :data:`MAX_SERIES_POINTS` points)
and load snapshots, so a caller (the balancer comparison) has everything without reading
the run folder back.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

MAX_SERIES_POINTS = 4000  # per-step series longer than this are thinned (every k-th step)
SNAPSHOT_FRACTIONS = (0.0, 0.1, 0.5, 1.0)  # load snapshots: first logged step, 10%, half, last


def finite_or_none(x: Any) -> Optional[float]:
    """``float(x)``, or None for None, NaN and infinities (strict JSON)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def thin(n: int, limit: int = MAX_SERIES_POINTS) -> list[int]:
    """Indices of at most ``limit`` of n points: every k-th, always the first and last."""
    if n <= limit:
        return list(range(n))
    k = math.ceil(n / limit)
    idx = list(range(0, n, k))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    return idx


@dataclass
class StepStats:
    """What one optimizer step measured."""

    step: int
    loss: float
    lm_loss: float
    aux_loss: float
    lr: float
    grad_norm: float
    tokens: int
    seconds: float
    router_seconds: float
    max_vio_batch: float
    max_vio_layers: list[float]
    loads_LE: np.ndarray
    dropped_frac_layers: list[float] = field(default_factory=list)

    @property
    def dropped_frac(self) -> float:
        """Share of the step's token-slots capacity dropped, averaged over MoE layers."""
        return float(np.mean(self.dropped_frac_layers)) if self.dropped_frac_layers else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def router_time_share(self) -> float:
        return self.router_seconds / self.seconds if self.seconds > 0 else float("nan")

    def record(self, total_tokens: int, elapsed: float) -> dict[str, Any]:
        """The step's metrics.jsonl record (type "train")."""
        return {
            "type": "train",
            "step": self.step,
            "loss": self.loss,
            "lm_loss": self.lm_loss,
            "aux_loss": self.aux_loss,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "tokens_per_s": self.tokens_per_s,
            "step_seconds": self.seconds,
            "router_time_share": self.router_time_share,
            "max_vio_batch": self.max_vio_batch,
            "max_vio_batch_layers": self.max_vio_layers,
            "dropped_frac": self.dropped_frac,
            "dropped_frac_layers": self.dropped_frac_layers,
            "loads": self.loads_LE.tolist(),
            "tokens": total_tokens,
            "elapsed": elapsed,
        }


class History:
    """The logged training steps of a run (what its metrics.jsonl "train" records hold):
    step, loss, MaxVio_batch and the per-layer loads. A resumed run starts from the records
    its checkpoint covers (:meth:`from_records`)."""

    def __init__(self) -> None:
        self.step_P: list[int] = []
        self.loss_P: list[float] = []
        self.max_vio_P: list[float] = []
        self.loads_PLE: list[Optional[np.ndarray]] = []

    def add(self, record: dict[str, Any]) -> None:
        """Add one "train" record."""
        self.step_P.append(int(record["step"]))
        self.loss_P.append(record.get("loss"))
        self.max_vio_P.append(record.get("max_vio_batch"))
        loads = record.get("loads")
        self.loads_PLE.append(np.asarray(loads, dtype=np.int64) if loads else None)

    @classmethod
    def from_records(cls, records: list[dict[str, Any]]) -> "History":
        history = cls()
        for r in records:
            if r.get("type") == "train":
                history.add(r)
        return history

    def series(self, evals: list[dict[str, Any]]) -> dict[str, list]:
        """Per logged step (thinned) and per evaluation, as plotted by the report."""
        idx = thin(len(self.step_P))
        return {
            "step": [self.step_P[i] for i in idx],
            "loss": [finite_or_none(self.loss_P[i]) for i in idx],
            "max_vio_batch": [finite_or_none(self.max_vio_P[i]) for i in idx],
            "eval_step": [int(r["step"]) for r in evals],
            "val_ppl": [finite_or_none(r.get("val_ppl")) for r in evals],
            "eval_max_vio_global": [finite_or_none(r.get("max_vio_global")) for r in evals],
        }

    def load_snapshots(self) -> list[dict[str, Any]]:
        """The loads of the logged steps at :data:`SNAPSHOT_FRACTIONS` of the run."""
        with_loads = [i for i, loads in enumerate(self.loads_PLE) if loads is not None]
        if not with_loads:
            return []
        n = len(with_loads)
        picks = sorted({min(n - 1, round(f * (n - 1))) for f in SNAPSHOT_FRACTIONS})
        return [{"step": self.step_P[with_loads[i]],
                 "loads_LE": self.loads_PLE[with_loads[i]].tolist()} for i in picks]


@dataclass
class TrainResult:
    """The summary of a run (also written as result.json).

    val_loss / val_ppl / max_vio_global come from the last evaluation; avg_max_vio and
    sup_max_vio aggregate MaxVio_batch over all steps; train_seconds sums the step times
    (no evaluation), wall_seconds includes evaluation and checkpointing. ``diverged_step``
    is the step whose loss was not finite (training stopped there; ``divergence`` says
    what was not finite), else None. ``series`` and ``load_snapshots``: see
    :class:`History`.
    """

    steps: int
    final_loss: float
    val_loss: float
    val_ppl: float
    max_vio_global: float
    avg_max_vio: float
    sup_max_vio: float
    max_vio_batch_first: float
    max_vio_batch_last: float
    tokens: int
    train_seconds: float
    wall_seconds: float
    tokens_per_s: float
    router_time_share: float
    params: int
    active_params: int
    balancer: str
    seed: int
    preset: str = ""
    diverged_step: Optional[int] = None
    divergence: Optional[str] = None
    dropped_frac: float = float("nan")
    sup_max_vio_layers: float = float("nan")  # max over steps and layers of MaxVio_batch
    max_vio_global_layers: float = float("nan")  # max over layers, last evaluation
    optimal_gap: float = float("nan")  # mean routing-score gap to the balanced optimum
    price_of_balance: float = float("nan")  # mean (S_top - S_opt) / S_top, same samples
    optimal_gap_samples: int = 0
    out_dir: Optional[str] = None
    model_config: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    evals: list[dict[str, Any]] = field(default_factory=list)
    series: dict[str, list] = field(default_factory=dict)
    load_snapshots: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainResult":
        """From :meth:`to_dict` or result.json (where NaN is written as null)."""
        floats = {f.name for f in dataclasses.fields(cls) if f.type == "float"}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (float("nan") if v is None and k in floats else v)
                      for k, v in d.items() if k in known})


def balance_summary(tracker: Any, last_eval: dict[str, Any],
                    optimal_gaps: Sequence[dict[str, float]]) -> dict[str, Any]:
    """The balance fields of a :class:`TrainResult`: from the BalanceTracker of the run
    (None without MoE layers), its last evaluation record and its
    ``moebal.metrics.optimal_score_gap`` samples."""
    nan = float("nan")
    vio = tracker.max_vio_batch if tracker is not None else np.zeros(0)
    has = tracker is not None and bool(tracker.per_layer)
    return {
        "max_vio_global": last_eval.get("max_vio_global", nan),
        "avg_max_vio": tracker.avg_max_vio if tracker is not None else nan,
        "sup_max_vio": tracker.sup_max_vio if tracker is not None else nan,
        "max_vio_batch_first": float(vio[0]) if vio.size else nan,
        "max_vio_batch_last": float(vio[-1]) if vio.size else nan,
        "dropped_frac": tracker.dropped_frac if tracker is not None else nan,
        "sup_max_vio_layers": float(tracker.history.max()) if has else nan,
        "max_vio_global_layers": max(last_eval.get("max_vio_global_layers") or [nan]),
        "optimal_gap": (float(np.mean([g["gap"] for g in optimal_gaps]))
                        if optimal_gaps else nan),
        "price_of_balance": (float(np.mean([g["price_of_balance"] for g in optimal_gaps]))
                             if optimal_gaps else nan),
        "optimal_gap_samples": len(optimal_gaps),
    }


def load_result(run_dir: Union[str, os.PathLike]) -> TrainResult:
    """The TrainResult of a finished run folder (its result.json)."""
    import json

    path = Path(run_dir) / "result.json"
    if not path.is_file():
        raise ValueError(f"{str(run_dir)!r} holds no finished run (no result.json)")
    try:
        return TrainResult.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{str(path)!r} cannot be read ({exc})") from None
