"""Training with expert parallelism: the ``moebal.train`` loop on several processes.

Every process runs the same :class:`ParallelTrainer` (a :class:`moebal.train.Trainer`):

- data: every rank draws the same global micro-batch (same sampler, same seed) and computes
  its ``batch_size / world_size`` consecutive rows, so a run on N processes trains the model
  a single process would train on the same batches (up to float rounding);
- gradients: :meth:`ExpertParallel.sync_gradients`, then the global-norm clipping of
  :meth:`ExpertParallel.clip_grad_norm_` (same norm on every rank);
- losses and loads: all-reduced, so every rank logs and decides the same (a non-finite loss
  stops all ranks at the same step);
- evaluation: every rank evaluates the whole validation batches (the same numbers everywhere;
  the redundant work is small next to training);
- per-step, per-rank parallel counters (``ExpertParallel.step_records``) go to the run's
  metrics.jsonl as records of type "parallel", summarized into ``parallel.json`` at the end;
- checkpoints: one file per rank, ``checkpoint.rank<r>.pt`` (local experts and their
  optimizer state); ``resume`` needs the same world size, EP size and placement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union

import numpy as np
import torch
import torch.distributed as dist

from moebal.data import resolve_corpus
from moebal.model import MoEModel, ModelConfig
from moebal.parallel import comm
from moebal.parallel.runtime import ExpertParallel, ParallelConfig
from moebal.parallel.stats import STAT_FIELDS, summarize_rank_stats
from moebal.train.config import TrainConfig, check_configs
from moebal.train.context import resolve_device
from moebal.train.results import StepStats, TrainResult
from moebal.train.run import (
    DataLike,
    continue_from_checkpoint,
    finished_result,
    write_config,
)
from moebal.train.rundir import CONTINUE, FINISHED, FRESH, RunDir, read_metrics
from moebal.train.trainer import Trainer

T = TypeVar("T")


def check_parallel_train(train_cfg: TrainConfig, world_size: int) -> None:
    """ValueError for training settings a run on ``world_size`` processes cannot take."""
    if train_cfg.batch_size % world_size:
        raise ValueError(
            f"batch_size={train_cfg.batch_size} does not split over {world_size} processes "
            f"(each computes batch_size / world size sequences of every micro-batch)"
        )
    if train_cfg.trace:
        raise ValueError(
            "--trace records the routing of a single process; record traces without --nproc "
            "(the routing is the same)"
        )


class ParallelTrainer(Trainer):
    """The training loop with expert parallelism (see the module docstring).

    ``ep`` is this process's :class:`ExpertParallel`; the model is built from the seed on
    every rank and made expert-parallel before the optimizer sees it.
    """

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, corpus: Any,
                 out_dir: Union[str, os.PathLike, None] = None, *, ep: ExpertParallel,
                 preset: str = "") -> None:
        check_parallel_train(train_cfg, ep.world_size)
        self.ep = ep
        torch.manual_seed(train_cfg.seed)
        model = MoEModel(model_cfg)
        self.full_params = (model.num_params(), model.num_params(active=True))
        model.to(resolve_device(train_cfg.device))
        ep.parallelize(model)
        super().__init__(model_cfg, train_cfg, corpus, out_dir, preset=preset, model=model)
        self.ep.stats.reset()

    # -- Trainer hooks ---------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.ep.rank == 0

    def micro_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x_BS, y_BS = super().micro_batch(index)  # the global micro-batch, same on all ranks
        n = x_BS.shape[0] // self.ep.world_size
        rows = slice(self.ep.rank * n, (self.ep.rank + 1) * n)
        return x_BS[rows], y_BS[rows]

    def reduce_gradients(self) -> None:
        self.ep.sync_gradients(self.model)

    def clip_gradients(self, max_norm: float) -> float:
        return float(self.ep.clip_grad_norm_(self.model, max_norm))

    def reduce_losses(self, totals: torch.Tensor) -> torch.Tensor:
        totals = totals.clone()
        comm.all_reduce_(totals, self.ep.dp_pg, what="loss all-reduce")
        return totals / self.ep.world_size

    def reduce_loads(self, loads_LE: torch.Tensor) -> torch.Tensor:
        """Training: this rank's rows -> the global batch (all-reduce). Evaluation runs
        whole batches on every rank, so its loads are already global."""
        if not self.model.training:
            return loads_LE
        loads_LE = loads_LE.clone()
        comm.all_reduce_(loads_LE, self.ep.dp_pg, what="load all-reduce")
        return loads_LE

    def extra_records(self, stats: StepStats) -> list[dict[str, Any]]:
        return [{"type": "parallel", **r} for r in self.ep.step_records(stats.step)]

    @property
    def checkpoint_file(self) -> Optional[Path]:
        # every rank keeps its own experts' state
        return self.run.checkpoint(self.ep.rank) if self.run is not None else None

    def agree(self, signum: int, clock_due: bool) -> tuple[int, bool]:
        """Stop and checkpoint together: a signal or the clock on any rank counts for all
        (rank 0's clock decides, the others may lag it by a step)."""
        flags = torch.tensor([signum == signal.SIGINT, signum == signal.SIGTERM,
                              clock_due and self.is_main], dtype=torch.float32,
                             device=self.device)
        comm.all_reduce_(flags, None, what="stop and checkpoint agreement")
        sigint, sigterm, due = (bool(x) for x in flags.tolist())
        return (signal.SIGINT if sigint else signal.SIGTERM if sigterm else 0), due

    # -- checkpoints and results -------------------------------------------------------
    def parallel_identity(self) -> dict[str, Any]:
        layout = self.ep.layout
        return {
            "world_size": layout.world_size,
            "ep_size": layout.ep_size,
            "sched_size": layout.sched_size,
            "experts": [list(row) for row in layout.experts_of_rank],
            "rank": self.ep.rank,
        }

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["parallel"] = self.parallel_identity()
        return state

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        saved = state.get("parallel")
        if saved != self.parallel_identity():
            raise ValueError(
                f"{source} was written with another parallel layout (saved {saved}, now "
                f"{self.parallel_identity()}); resume with the same --nproc, --ep-size and "
                f"--placement"
            )
        super().load_state_dict(state, source)

    def result(self) -> TrainResult:
        result = super().result()
        result.params, result.active_params = self.full_params
        return result


def checkpoint_path(out_dir: Union[str, os.PathLike], rank: int) -> Path:
    return RunDir(out_dir).checkpoint(rank)


def _in_turns(fn: Callable[[], T], first: bool) -> T:
    """Run ``fn`` on the ranks with ``first`` set, then on the others. Bad input
    (ValueError/TypeError) on any rank is raised on every rank, naming the rank."""
    value: Any = None
    for turn in (True, False):
        error = None
        if first == turn:
            try:
                value = fn()
            except (ValueError, TypeError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        errors: list = [None] * dist.get_world_size()
        with comm.collective("all_gather of start-up errors"):
            dist.all_gather_object(errors, error)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            rank, message = failed[0]
            raise ValueError(f"rank {rank}: {message}")
    return value


def start_world(parallel: ParallelConfig, model_cfg: ModelConfig, train_cfg: TrainConfig,
                timeout_s: float) -> torch.device:
    """Check the sizes (no collective yet: the same ValueError on every rank), then start
    the process group; returns this rank's device."""
    if not isinstance(parallel, ParallelConfig):
        raise TypeError(f"parallel must be a ParallelConfig, got {type(parallel).__name__}")
    check_configs(model_cfg, train_cfg)
    _, world = comm.world_from_env()
    ExpertParallel.validate(parallel, model_cfg.num_experts, world)  # pure: no collective
    check_parallel_train(train_cfg, world)
    device = resolve_device(train_cfg.device)
    comm.init_distributed("nccl" if device.type == "cuda" else "gloo", timeout_s)
    return device


def open_run(trainer: ParallelTrainer, resume: bool, force: bool) -> tuple[bool, Any]:
    """The run folder's start on every rank (the rules of :class:`moebal.train.RunDir`,
    decided alike everywhere): returns (finished, result or None)."""
    run, rank = trainer.run, trainer.ep.rank
    decision = _in_turns(lambda: run.decide(resume, force, trainer.checkpoint_file),
                         first=rank == 0)
    decisions: list = [None] * dist.get_world_size()
    with comm.collective("all_gather of resume decisions"):
        dist.all_gather_object(decisions, decision)
    if CONTINUE in decisions and set(decisions) != {CONTINUE}:
        missing = [r for r, d in enumerate(decisions) if d != CONTINUE]
        raise ValueError(f"cannot resume {str(run.path)!r}: no checkpoint for ranks {missing} "
                         f"(each rank reads checkpoint.rank<r>.pt from its own --out)")
    if decision == FINISHED:
        return True, _in_turns(lambda: finished_result(trainer) if rank == 0 else None, True)
    if decision == CONTINUE:
        done = _in_turns(lambda: continue_from_checkpoint(trainer), first=rank == 0)
        finished: list = [None] * dist.get_world_size()
        with comm.collective("all_gather of finished runs"):
            dist.all_gather_object(finished, done is not None)
        if all(finished):
            return True, done if rank == 0 else None
    elif decision == FRESH and rank == 0:
        run.clear()
    comm.barrier("run folder ready")
    return False, None


def train_parallel(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out_dir: Union[str, os.PathLike, None],
    parallel: ParallelConfig,
    data: DataLike = None,
    *,
    preset: str = "",
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    timeout_s: float = comm.DEFAULT_TIMEOUT_S,
) -> Optional[TrainResult]:
    """:func:`moebal.train.train` on every process of a ``torchrun`` launch.

    Returns the TrainResult on rank 0 and None elsewhere. Bad sizes (world, EP size,
    experts, placement, batch size) raise ValueError on every rank before any collective;
    the process group is started here (torchrun's environment) unless one exists, with
    ``timeout_s`` on every collective, and is left for the caller to end. Rank 0 holds
    the run folder's lock; every rank writes its own checkpoint.rank<r>.pt.
    """
    device = start_world(parallel, model_cfg, train_cfg, timeout_s)
    rank = dist.get_rank()
    run = RunDir(out_dir, extra_files=("parallel.json",)) if out_dir is not None else None
    with contextlib.ExitStack() as stack:
        if run is not None:
            def take_folder() -> None:
                if rank == 0:
                    stack.enter_context(run.locked())
                    run.remove_temp_files()
                run.check_request(resume, force)

            _in_turns(take_folder, first=rank == 0)
        # one process per machine tokenises (or finds the cache) before the others read it
        local_first = int(os.environ.get("LOCAL_RANK", rank)) == 0
        corpus = _in_turns(lambda: resolve_corpus(data, vocab_size=model_cfg.vocab_size,
                                                  progress=progress and rank == 0),
                           first=local_first)
        model_cfg = dataclasses.replace(model_cfg, vocab_size=corpus.vocab_size)
        ep = ExpertParallel.setup(parallel, model_cfg.num_experts, device=device if
                                  device.type == "cpu" else None)
        if rank == 0:
            placement = parallel.placement if isinstance(parallel.placement, str) else "explicit"
            print(f"expert parallelism: {ep.layout.describe()}; placement {placement}, "
                  f"schedule {parallel.schedule}, backend {dist.get_backend()}", flush=True)
        trainer = ParallelTrainer(model_cfg, train_cfg, corpus, run, ep=ep, preset=preset)
        if run is not None:
            finished, result = open_run(trainer, resume, force)
            if finished:
                return result
            if rank == 0:
                write_config(trainer, params=trainer.full_params[0],
                             active_params=trainer.full_params[1],
                             parallel={**parallel_config_dict(parallel),
                                       **trainer.parallel_identity(), "rank": None,
                                       "backend": dist.get_backend()})
        result = trainer.fit(progress=progress and rank == 0)
        if rank != 0:
            return None
        if run is not None:
            summary = summarize_run(run.path)
            run.write_json("parallel.json", summary)
            print(format_summary(summary))
        return result


def parallel_config_dict(config: ParallelConfig) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    if d["placement_loads"] is not None:
        d["placement_loads"] = np.asarray(d["placement_loads"]).tolist()
    return d


def summarize_run(run_dir: Union[str, os.PathLike]) -> dict[str, Any]:
    """The summary of a run's "parallel" records (see
    :func:`moebal.parallel.summarize_rank_stats`)."""
    records = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl")
               if r.get("type") == "parallel"]
    return summarize_rank_stats(records)


def format_summary(summary: dict[str, Any]) -> str:
    """A table: per rank, the mean per step of every counter; then the makespan ratio."""
    if not summary:
        return "expert parallelism: no steps recorded"
    head = ["rank"] + list(STAT_FIELDS)
    rows = [head]
    for rank, values in sorted(summary["per_rank"].items(), key=lambda kv: int(kv[0])):
        rows.append([str(rank)] + [
            f"{values[n] * 1e3:.1f}ms" if n.startswith("t_") else f"{values[n]:.0f}"
            for n in STAT_FIELDS
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"expert parallelism, mean per step over {summary['steps']} steps:"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append(f"scheduled / unscheduled makespan: {summary['makespan_ratio']:.3f}")
    return "\n".join(lines)


def load_placement_loads(path: Union[str, os.PathLike], num_experts: int) -> np.ndarray:
    """A per-expert load history for the placement builders: int [steps, E].

    ``path``: a ``.npy`` ([E] or [steps, E]), a ``.json`` list (same shapes), or a routing
    trace ``.npz`` written by ``moebal train --trace`` (every step and layer one row).
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"placement loads file {str(path)!r} does not exist")
    if p.suffix == ".npz":
        from moebal.train.trace import load_trace

        loads = load_trace(p).loads  # [steps, layers, E]
        loads = loads.reshape(-1, loads.shape[-1])
    elif p.suffix == ".npy":
        loads = np.load(p)
    elif p.suffix == ".json":
        loads = np.asarray(json.loads(p.read_text()))
    else:
        raise ValueError(f"placement loads file {str(path)!r}: expected .npy, .json or a "
                         f"trace .npz")
    loads = np.atleast_2d(loads)
    if loads.ndim != 2 or loads.shape[1] != num_experts:
        raise ValueError(
            f"placement loads in {str(path)!r} have shape {loads.shape}; expected "
            f"[{num_experts}] or [steps, {num_experts}]"
        )
    return loads
