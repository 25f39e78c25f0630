"""Expert parallelism on torch.distributed: process groups, token dispatch and combine
with per-micro-batch scheduling onto expert replicas, gradient synchronisation.

See :mod:`moebal.parallel.runtime` for the entry points and docs/distributed.md.
"""

from moebal.parallel.comm import CollectiveError, all_to_all, default_backend, init_distributed
from moebal.parallel.launch import WorkerError, WorkerResult, spawn
from moebal.parallel.layout import ParallelLayout, check_sizes
from moebal.parallel.plan import SCHEDULES, Planner, RankPlan
from moebal.parallel.runtime import (
    STAT_FIELDS,
    ExpertParallel,
    ExpertParallelExperts,
    ParallelConfig,
    summarise,
)

__all__ = [
    "STAT_FIELDS",
    "SCHEDULES",
    "CollectiveError",
    "ExpertParallel",
    "ExpertParallelExperts",
    "ParallelConfig",
    "ParallelLayout",
    "Planner",
    "RankPlan",
    "WorkerError",
    "WorkerResult",
    "all_to_all",
    "check_sizes",
    "default_backend",
    "init_distributed",
    "spawn",
    "summarise",
]
