"""Expert parallelism on torch.distributed: process groups, token dispatch and combine
with per-micro-batch scheduling onto expert replicas, gradient synchronisation.

See :mod:`moebal.parallel.runtime` for the entry points and docs/distributed.md; the shape
letters of the tensor names are those of docs/design.md.
"""

from moebal.parallel.comm import CollectiveError, all_to_all, default_backend, init_distributed
from moebal.parallel.dispatch import ExpertParallelDispatch, ExpertParallelDispatcher
from moebal.parallel.experts import ExpertParallelExperts
from moebal.parallel.gradients import GradientSync
from moebal.parallel.launch import WorkerError, WorkerResult, spawn
from moebal.parallel.layout import ParallelLayout, check_sizes
from moebal.parallel.placement import build_rank_placement
from moebal.parallel.plan import SCHEDULES, Planner, RankPlan
from moebal.parallel.runtime import ExpertParallel, ParallelConfig
from moebal.parallel.stats import STAT_FIELDS, RankStepStats, summarize_rank_stats

__all__ = [
    "STAT_FIELDS",
    "SCHEDULES",
    "CollectiveError",
    "ExpertParallel",
    "ExpertParallelDispatch",
    "ExpertParallelDispatcher",
    "ExpertParallelExperts",
    "GradientSync",
    "ParallelConfig",
    "ParallelLayout",
    "Planner",
    "RankPlan",
    "RankStepStats",
    "WorkerError",
    "WorkerResult",
    "all_to_all",
    "build_rank_placement",
    "check_sizes",
    "default_backend",
    "init_distributed",
    "spawn",
    "summarize_rank_stats",
]
