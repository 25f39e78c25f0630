"""Recording routing traces in training: per step, per MoE layer, per source shard, tokens
routed to each expert.

The global batch of a step (``batch_size * grad_accum`` sequences, in the order they were
drawn) is split into ``shards`` equal groups of consecutive sequences, as if each group came
from one data-parallel rank. ``counts_PLRE[p, l, r, e]`` is the number of token slots of
shard r routed to (and kept by) expert e in MoE layer l at the p-th recorded step; summed
over shards it is that step's load vector. The trace class and its file (docs/traces.md)
are those of :mod:`moebal.trace`, re-exported here.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from moebal.trace import TRACE_FORMAT_VERSION, RoutingTrace, load_trace, save_trace

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
    counts_RE = torch.bincount(flat_TK[kept_TK], minlength=shards * num_experts)
    return counts_RE.view(shards, num_experts)


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

    def to_trace(self, **run: Any) -> RoutingTrace:
        """The trace of the steps recorded so far; ``run``: ``top_k``, ``moe_layers`` and
        the run's fields of :class:`moebal.trace.RoutingTrace` (balancer, preset, ...)."""
        counts_PLRE = (np.stack(self.blocks) if self.blocks
                       else np.zeros((0, self.num_layers, self.shards, self.num_experts), np.int64))
        return RoutingTrace(
            counts_PLRE,
            step=np.asarray(self.steps, dtype=np.int64),
            num_experts=self.num_experts,
            tokens_per_shard=self.sequences_per_shard * self.seq_len,
            seq_len=self.seq_len,
            sequences_per_shard=self.sequences_per_shard,
            **run,
        )

    def load(self, trace: RoutingTrace) -> None:
        """Continue from a saved trace (on resume)."""
        if trace.counts_PLRE.shape[1:] != (self.num_layers, self.shards, self.num_experts):
            raise ValueError(
                f"trace has blocks of shape {trace.counts_PLRE.shape[1:]}, expected "
                f"{(self.num_layers, self.shards, self.num_experts)}"
            )
        self.blocks = [b.astype(np.int64) for b in trace.counts_PLRE]
        self.steps = [int(s) for s in trace.step]


__all__ = ["TRACE_FORMAT_VERSION", "RoutingTrace", "TraceRecorder", "load_trace", "save_trace",
           "shard_counts"]
