"""Routing traces: per step, per MoE layer, per source shard, tokens routed to each expert.

One class and one file format for everything that writes or reads a trace: ``moebal train
--trace`` records one (:mod:`moebal.train.trace`), the simulator replays and generates them
(:mod:`moebal.sim.trace`). NumPy only, so that the simulator never imports torch.

``counts_PLRE[p, l, r, e]``: token slots of source shard r routed to (and kept by) expert e
in MoE layer l at the p-th recorded step (P steps, L layers, R shards, E experts; a token
routed to K experts counts K times). A shard is a group of consecutive sequences of the
step's global batch, as if it came from one data-parallel rank. File format: docs/traces.md.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from moebal.fileio import atomic_write

TRACE_FORMAT_VERSION = 1

# what a training run knows about its trace, stored as scalar arrays and read through the
# typed properties; anything else a trace carries (a generator's parameters, ...) goes in
# the JSON string array ``meta``
RUN_KEYS = {"tokens_per_shard": int, "seq_len": int, "sequences_per_shard": int,
            "balancer": str, "preset": str, "capacity_factor": float}
_ARRAY_KEYS = ("format_version", "counts", "step", "num_experts", "top_k", "moe_layers", "meta")

PathLike = Union[str, os.PathLike]


def _counts_array(counts: Any) -> np.ndarray:
    arr = np.asarray(counts)
    if arr.ndim == 3:  # [steps, layers, experts]: one shard
        arr = arr[:, :, None, :]
    if arr.ndim != 4:
        raise ValueError("trace counts must be [steps, layers, shards, experts] or "
                         f"[steps, layers, experts], got shape {arr.shape}")
    if 0 in arr.shape[1:]:
        raise ValueError(f"trace counts must not be empty, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.bool_) or not (np.issubdtype(arr.dtype, np.integer)
                                                  or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"trace counts must be numbers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError("trace counts must be whole numbers")
        arr = arr.astype(np.int64)
    elif arr.dtype not in (np.int32, np.int64):
        arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"trace counts must be non-negative, found {arr.min()}")
    return arr


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class RoutingTrace:
    """A routing trace: ``counts_PLRE`` and what is known about the run that made it.

    counts_PLRE  int [P, L, R, E] (int32 as training writes it, else int64); [P, L, E] is
                 taken as one shard.
    top_k        K, slots per token.
    step         int64 [P]: the optimizer step of each row (default 1..P).
    moe_layers   int64 [L]: the transformer block of each MoE layer (default 0..L-1).
    meta         everything else, a dict: the run's ``tokens_per_shard``, ``seq_len``,
                 ``sequences_per_shard``, ``balancer``, ``preset``, ``capacity_factor``
                 (also given as keywords, read through the properties of those names),
                 and any other key (a generator's parameters, the source file, ...).

    The names of the two former trace classes still work: ``counts`` (the same array),
    ``counts_SLRE`` (int64), ``loads`` and ``loads_SLE()``.
    """

    def __init__(self, counts_PLRE: Any = None, top_k: int = 1,
                 meta: Optional[dict[str, Any]] = None, *, counts: Any = None,
                 step: Any = None, moe_layers: Any = None, num_experts: Optional[int] = None,
                 **run: Any) -> None:
        if (counts_PLRE is None) == (counts is None):
            raise TypeError("give the trace counts once: counts_PLRE (or counts)")
        unknown = sorted(set(run) - set(RUN_KEYS))
        if unknown:
            raise TypeError(f"unknown trace fields {unknown}; known: {sorted(RUN_KEYS)}")
        self.counts_PLRE = _counts_array(counts_PLRE if counts is None else counts)
        P, L, _, E = self.counts_PLRE.shape
        self.top_k = _positive_int("top_k", top_k)
        if num_experts is not None and int(num_experts) != E:
            raise ValueError(f"num_experts={num_experts} but the counts have {E} experts")
        self.step = (np.arange(1, P + 1, dtype=np.int64) if step is None
                     else np.asarray(step, dtype=np.int64).reshape(-1))
        if len(self.step) != P:
            raise ValueError(f"step has {len(self.step)} entries for {P} steps of counts")
        self.moe_layers = (np.arange(L, dtype=np.int64) if moe_layers is None
                           else np.asarray(moe_layers, dtype=np.int64).reshape(-1))
        if len(self.moe_layers) != L:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries for {L} layers")
        self.meta: dict[str, Any] = dict(meta or {})
        for key, value in run.items():
            self.meta[key] = RUN_KEYS[key](value)
        self._counts_int64: tuple[Optional[np.ndarray], Optional[np.ndarray]] = (None, None)

    def __repr__(self) -> str:
        return (f"RoutingTrace(steps={self.num_steps}, layers={self.num_layers}, "
                f"shards={self.num_shards}, experts={self.num_experts}, top_k={self.top_k})")

    # -- sizes and sums ------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self.counts_PLRE.shape[0]

    @property
    def num_layers(self) -> int:
        return self.counts_PLRE.shape[1]

    @property
    def num_shards(self) -> int:
        return self.counts_PLRE.shape[2]

    @property
    def num_experts(self) -> int:
        return self.counts_PLRE.shape[3]

    @property
    def loads_PLE(self) -> np.ndarray:
        """Per-step, per-layer loads [P, L, E]: the sum over shards."""
        return self.counts_PLRE.sum(axis=2)

    # -- what the run said ------------------------------------------------------------------
    def _optional_int(self, key: str) -> Optional[int]:
        value = self.meta.get(key)
        return None if value is None else int(value)

    @property
    def tokens_per_shard(self) -> Optional[int]:
        """Tokens each shard holds per step (None when not known)."""
        return self._optional_int("tokens_per_shard")

    @property
    def seq_len(self) -> Optional[int]:
        return self._optional_int("seq_len")

    @property
    def sequences_per_shard(self) -> Optional[int]:
        return self._optional_int("sequences_per_shard")

    @property
    def balancer(self) -> str:
        return str(self.meta.get("balancer", ""))

    @property
    def preset(self) -> str:
        return str(self.meta.get("preset", ""))

    @property
    def capacity_factor(self) -> float:
        """The router's capacity factor; NaN when dropless (or not known)."""
        value = self.meta.get("capacity_factor")
        return float("nan") if value is None else float(value)

    # -- the former names ----------------------------------------------------------------
    @property
    def counts(self) -> np.ndarray:
        """``counts_PLRE`` (the name of ``moebal.train``'s former trace class)."""
        return self.counts_PLRE

    @property
    def counts_SLRE(self) -> np.ndarray:
        """``counts_PLRE`` as int64 (the name of the simulator's former trace class)."""
        source, cached = self._counts_int64
        if source is not self.counts_PLRE:  # first use, or counts_PLRE was replaced
            cached = self.counts_PLRE.astype(np.int64, copy=False)
            self._counts_int64 = (self.counts_PLRE, cached)
        return cached

    @property
    def loads(self) -> np.ndarray:
        """``loads_PLE`` (former name)."""
        return self.loads_PLE

    def loads_SLE(self) -> np.ndarray:
        """``loads_PLE`` (the simulator's former method)."""
        return self.loads_PLE

    def truncate(self, last_step: int) -> "RoutingTrace":
        """The rows recorded at steps up to ``last_step`` (on resume: those the resumed
        checkpoint has seen)."""
        keep = self.step <= last_step
        return RoutingTrace(self.counts_PLRE[keep], self.top_k, dict(self.meta),
                            step=self.step[keep], moe_layers=self.moe_layers)


def save_trace(path: PathLike, trace: RoutingTrace) -> Path:
    """Write ``trace`` to ``path`` as a compressed ``.npz`` (no pickle), atomically;
    returns the path. The simulator's former order ``save_trace(trace, path)`` still
    works, with a DeprecationWarning."""
    if isinstance(path, RoutingTrace) and not isinstance(trace, RoutingTrace):
        warnings.warn("save_trace(trace, path) is the former argument order; call "
                      "save_trace(path, trace)", DeprecationWarning, stacklevel=2)
        path, trace = trace, path
    if not isinstance(trace, RoutingTrace):
        raise TypeError(f"save_trace needs a RoutingTrace, got {type(trace).__name__}")
    counts = trace.counts_PLRE
    fits = counts.size == 0 or counts.max() <= np.iinfo(np.int32).max
    arrays = {
        "format_version": np.asarray(TRACE_FORMAT_VERSION, dtype=np.int64),
        "counts": counts.astype(np.int32 if fits else np.int64),
        "step": trace.step,
        "num_experts": np.asarray(trace.num_experts, dtype=np.int64),
        "top_k": np.asarray(trace.top_k, dtype=np.int64),
        "moe_layers": trace.moe_layers,
    }
    extra = {}
    for key, value in trace.meta.items():
        if key in RUN_KEYS and value is not None:
            kind = RUN_KEYS[key]
            arrays[key] = np.asarray(kind(value), dtype=np.int64 if kind is int
                                     else np.float64 if kind is float else None)
        elif key not in _ARRAY_KEYS and key != "source":
            extra[key] = value
    if "capacity_factor" not in arrays:
        arrays["capacity_factor"] = np.asarray(float("nan"))
    if extra:
        arrays["meta"] = np.asarray(json.dumps(extra, default=str))
    return atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def _scalar(value: np.ndarray) -> Any:
    return value.reshape(()).item()


def _meta_of(data: Any) -> dict[str, Any]:
    """The metadata of an open ``.npz``: its JSON ``meta`` string, then its other small
    arrays (scalars as Python values, short vectors as lists)."""
    meta: dict[str, Any] = {}
    if "meta" in data.files:
        raw = data["meta"]
        try:
            meta = json.loads(str(raw.item() if raw.shape == () else raw.tolist()))
        except (ValueError, TypeError):
            meta = {"meta": str(raw)}
        if not isinstance(meta, dict):
            meta = {"meta": meta}
    for key in data.files:
        if key in _ARRAY_KEYS:
            continue
        value = data[key]
        if value.size == 1:
            meta.setdefault(key, _scalar(value))
        elif value.size <= 64:
            meta.setdefault(key, value.tolist())
    cf = meta.get("capacity_factor")
    if isinstance(cf, float) and math.isnan(cf):
        del meta["capacity_factor"]  # NaN: dropless, the property's default
    return meta


def load_trace(path: PathLike, top_k: Optional[int] = None) -> RoutingTrace:
    """Read a trace ``.npz``: what :func:`save_trace` writes (``moebal train --trace``), or
    any ``.npz`` with a ``counts`` array [steps, layers, shards, experts] (or [steps,
    layers, experts]) and optional metadata (a JSON string ``meta``, scalar arrays;
    ``top_k`` from either, else 1). ``top_k`` given here wins over the file's.

    Raises ValueError naming the file: missing, unreadable, no ``counts``, another format
    version, or counts that are empty, negative, fractional or of the wrong rank.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace file not found: {str(path)!r}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # not an npz, truncated, ...
        raise ValueError(f"cannot read trace {str(path)!r}: {exc}") from exc
    if not hasattr(data, "files"):
        raise ValueError(f"trace {str(path)!r} is a bare array; expected an .npz with 'counts'")
    with data:
        if "counts" not in data.files:
            raise ValueError(f"trace {str(path)!r} has no 'counts' array (found {data.files})")
        if "format_version" in data.files and int(data["format_version"]) != TRACE_FORMAT_VERSION:
            raise ValueError(f"{str(path)!r} is trace format {int(data['format_version'])}, "
                             f"expected {TRACE_FORMAT_VERSION}")
        counts = data["counts"]
        meta = _meta_of(data)
        arrays = {key: data[key] for key in ("step", "moe_layers", "num_experts")
                  if key in data.files}
        if top_k is None and "top_k" in data.files:
            top_k = int(_scalar(data["top_k"]))
    if top_k is None:
        top_k = int(meta.get("top_k", meta.get("k", 1)))
    meta.setdefault("source", str(path))
    if np.asarray(counts).shape[:1] == (0,):
        raise ValueError(f"trace {str(path)!r}: trace counts must not be empty, got shape "
                         f"{np.asarray(counts).shape}")
    try:
        return RoutingTrace(counts, top_k, meta, **arrays)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"trace {str(path)!r}: {exc}") from exc


__all__ = ["RUN_KEYS", "TRACE_FORMAT_VERSION", "RoutingTrace", "load_trace", "save_trace"]
