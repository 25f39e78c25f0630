"""Routing traces: per step, per MoE layer, per source shard, tokens routed to each expert.

The global batch of a step (``batch_size * grad_accum`` sequences, in the order they were
drawn) is split into ``shards`` equal groups of consecutive sequences, as if each group came
from one data-parallel rank. ``counts[n, l, g, e]`` is the number of token slots of shard g
routed to (and kept by) expert e in MoE layer l at the n-th recorded step; summed over
shards it is that step's load vector. See docs/traces.md for the file format.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

TRACE_FORMAT_VERSION = 1


@dataclass
class RoutingTrace:
    """counts [steps, layers, shards, experts] (int32, int64 if it would overflow); step [steps]."""

    counts: np.ndarray
    step: np.ndarray
    num_experts: int
    top_k: int
    tokens_per_shard: int
    seq_len: int
    sequences_per_shard: int
    moe_layers: np.ndarray  # block index of each MoE layer, [layers]
    balancer: str = ""
    preset: str = ""
    capacity_factor: float = float("nan")  # nan: dropless
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def loads(self) -> np.ndarray:
        """Per-step, per-layer loads [steps, layers, experts] (the sum over shards)."""
        return self.counts.sum(axis=2)

    def truncate(self, last_step: int) -> "RoutingTrace":
        keep = self.step <= last_step
        return RoutingTrace(
            self.counts[keep], self.step[keep], self.num_experts, self.top_k,
            self.tokens_per_shard, self.seq_len, self.sequences_per_shard, self.moe_layers,
            self.balancer, self.preset, self.capacity_factor, dict(self.meta),
        )


def save_trace(path: str | os.PathLike, trace: RoutingTrace) -> Path:
    """Write ``trace`` as a compressed .npz (atomically: temp file + os.replace)."""
    path = Path(path)
    counts = np.asarray(trace.counts)
    if counts.ndim != 4:
        raise ValueError(f"counts must be [steps, layers, shards, experts], got {counts.shape}")
    dtype = np.int32 if (counts.size == 0 or counts.max() <= np.iinfo(np.int32).max) else np.int64
    arrays = {
        "format_version": np.asarray(TRACE_FORMAT_VERSION, dtype=np.int64),
        "counts": counts.astype(dtype),
        "step": np.asarray(trace.step, dtype=np.int64),
        "num_experts": np.asarray(trace.num_experts, dtype=np.int64),
        "top_k": np.asarray(trace.top_k, dtype=np.int64),
        "tokens_per_shard": np.asarray(trace.tokens_per_shard, dtype=np.int64),
        "seq_len": np.asarray(trace.seq_len, dtype=np.int64),
        "sequences_per_shard": np.asarray(trace.sequences_per_shard, dtype=np.int64),
        "moe_layers": np.asarray(trace.moe_layers, dtype=np.int64),
        "balancer": np.asarray(trace.balancer),
        "preset": np.asarray(trace.preset),
        "capacity_factor": np.asarray(trace.capacity_factor, dtype=np.float64),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_trace(path: str | os.PathLike) -> RoutingTrace:
    """Read a trace written by :func:`save_trace` (no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace file {str(path)!r} does not exist")
    with np.load(path, allow_pickle=False) as z:
        version = int(z["format_version"])
        if version != TRACE_FORMAT_VERSION:
            raise ValueError(
                f"{str(path)!r} is trace format {version}, expected {TRACE_FORMAT_VERSION}"
            )
        return RoutingTrace(
            counts=z["counts"],
            step=z["step"],
            num_experts=int(z["num_experts"]),
            top_k=int(z["top_k"]),
            tokens_per_shard=int(z["tokens_per_shard"]),
            seq_len=int(z["seq_len"]),
            sequences_per_shard=int(z["sequences_per_shard"]),
            moe_layers=z["moe_layers"],
            balancer=str(z["balancer"]),
            preset=str(z["preset"]),
            capacity_factor=float(z["capacity_factor"]),
        )


def shard_counts(
    indices_TK: torch.Tensor,
    kept_TK: torch.Tensor,
    seq_len: int,
    first_sequence: int,
    sequences_per_shard: int,
    shards: int,
    num_experts: int,
) -> torch.Tensor:
    """int64 [shards, experts]: kept slots per (shard, expert) of one micro-batch.

    Token t of the micro-batch belongs to sequence ``first_sequence + t // seq_len`` of the
    global batch, and that sequence to shard ``sequence // sequences_per_shard``.
    """
    T = indices_TK.shape[0]
    seq_T = first_sequence + torch.arange(T, device=indices_TK.device) // seq_len
    shard_T = seq_T // sequences_per_shard
    flat_TK = shard_T.unsqueeze(1) * num_experts + indices_TK
    counts = torch.bincount(flat_TK[kept_TK], minlength=shards * num_experts)
    return counts.view(shards, num_experts)


class TraceRecorder:
    """Collects one [layers, shards, experts] block per optimizer step."""

    def __init__(self, num_layers: int, shards: int, num_experts: int, global_batch: int,
                 seq_len: int) -> None:
        if global_batch % shards:
            raise ValueError(f"shards={shards} must divide the global batch of {global_batch}")
        self.num_layers, self.shards, self.num_experts = num_layers, shards, num_experts
        self.seq_len = seq_len
        self.sequences_per_shard = global_batch // shards
        self.blocks: list[np.ndarray] = []
        self.steps: list[int] = []
        self._current: Optional[torch.Tensor] = None

    def begin_step(self, device: torch.device) -> None:
        self._current = torch.zeros(
            self.num_layers, self.shards, self.num_experts, dtype=torch.int64, device=device
        )

    def add_micro_batch(self, routings: list, first_sequence: int) -> None:
        for layer, routing in enumerate(routings):
            self._current[layer] += shard_counts(
                routing.indices_TK, routing.kept_TK, self.seq_len, first_sequence,
                self.sequences_per_shard, self.shards, self.num_experts,
            )

    def end_step(self, step: int) -> np.ndarray:
        block = self._current.cpu().numpy()
        self.blocks.append(block)
        self.steps.append(int(step))
        self._current = None
        return block

    def discard_step(self) -> None:
        self._current = None

    def to_trace(self, **meta: Any) -> RoutingTrace:
        counts = (np.stack(self.blocks) if self.blocks
                  else np.zeros((0, self.num_layers, self.shards, self.num_experts), np.int64))
        return RoutingTrace(
            counts=counts,
            step=np.asarray(self.steps, dtype=np.int64),
            num_experts=self.num_experts,
            tokens_per_shard=self.sequences_per_shard * self.seq_len,
            seq_len=self.seq_len,
            sequences_per_shard=self.sequences_per_shard,
            **meta,
        )

    def load(self, trace: RoutingTrace) -> None:
        """Continue from a saved trace (on resume)."""
        if trace.counts.shape[1:] != (self.num_layers, self.shards, self.num_experts):
            raise ValueError(
                f"trace has blocks of shape {trace.counts.shape[1:]}, expected "
                f"{(self.num_layers, self.shards, self.num_experts)}"
            )
        self.blocks = [b.astype(np.int64) for b in trace.counts]
        self.steps = [int(s) for s in trace.step]
