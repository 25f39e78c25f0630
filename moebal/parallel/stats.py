"""The per-rank counters of an expert-parallel run: what one optimizer step moved, computed
and waited for on each rank, and their means over a run (``parallel.json``)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

STAT_FIELDS = (
    "tokens_computed",
    "tokens_sent",
    "tokens_received",
    "t_dispatch",
    "t_compute",
    "t_combine",
    "t_schedule",
    "makespan",
    "makespan_unscheduled",
)


class RankStepStats:
    """Per-rank counters of one optimizer step, summed over MoE layers and micro-batches
    (training-mode forwards only); the MoE layers add to it, the step gathers and resets it.

    tokens_computed  expert-token rows computed on this rank (from any source, itself too).
    tokens_sent      rows this rank sent to other ranks in dispatch (rows kept local
                     are not counted); tokens_received likewise.
    t_dispatch       seconds in counts all-gather, planning, permutation and the dispatch
                     all-to-all (forward); t_compute: local experts; t_combine: the
                     unpermutation, the return all-to-all, gate weighting and per-token sum
                     (forward); t_schedule: the planning part of t_dispatch (the scheduler,
                     same on every rank).
    makespan         rows on the busiest rank of the scheduling group under the plan used;
    makespan_unscheduled  the same under the ``none`` rule; per layer, summed over layers.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.values = {name: 0.0 for name in STAT_FIELDS}

    def add(self, **kwargs: float) -> None:
        for name, value in kwargs.items():
            self.values[name] += float(value)

    def as_dict(self) -> dict[str, float]:
        return dict(self.values)


def summarize_rank_stats(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over steps of the per-rank records of a run (``ExpertParallel.step_records``):
    ``{"steps", "per_rank": {rank: {field: mean}}, "makespan_ratio"}``, the ratio being the
    summed scheduled over the summed unscheduled makespan ({} for no records)."""
    if not records:
        return {}
    ranks = sorted({int(r["rank"]) for r in records})
    per_rank = {}
    for rank in ranks:
        rows = [r for r in records if int(r["rank"]) == rank]
        per_rank[rank] = {n: float(np.mean([row[n] for row in rows])) for n in STAT_FIELDS}
    rows0 = [r for r in records if int(r["rank"]) == ranks[0]]
    makespan = float(np.sum([r["makespan"] for r in rows0]))
    unscheduled = float(np.sum([r["makespan_unscheduled"] for r in rows0]))
    return {
        "steps": len(rows0),
        "per_rank": per_rank,
        "makespan_ratio": makespan / unscheduled if unscheduled else 1.0,
    }
