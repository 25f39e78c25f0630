"""The expert-parallel options of ``moebal train`` and how a run is launched.

``moebal train --nproc N ...`` re-runs the same command under ``torchrun`` on N local
processes; under ``torchrun`` (``torchrun --nproc-per-node N -m moebal.train ...``) every
process trains its share with :func:`moebal.parallel.train.train_parallel`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from typing import Any, Callable, Optional

from moebal.parallel.comm import DEFAULT_TIMEOUT_S, world_from_env
from moebal.parallel.launch import ERRORS_ENV, first_rank_error, reported_once, torchrun_command
from moebal.parallel.layout import ParallelLayout
from moebal.parallel.plan import SCHEDULES

LOAD_PLACEMENTS = ("asymmetric", "eplb")  # the placements built from --placement-loads
PARALLEL_FLAGS = ("ep_size", "placement", "schedule", "sched_size", "placement_seed",
                  "placement_loads")


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the expert-parallel flags to the ``train`` parser."""
    from moebal.schedule import PLACEMENTS

    g = parser.add_argument_group(
        "expert parallelism (with --nproc N, or under torchrun; see docs/distributed.md)")
    g.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N local processes: starts torchrun (gloo on CPU, nccl and "
                        "one GPU per process on CUDA)")
    g.add_argument("--ep-size", type=int, default=None, metavar="P",
                   help="ranks per expert-parallel group; each rank holds num_experts / P "
                        "experts, each expert has N / P replicas (default: N/2 on 4 or more "
                        "processes, so --schedule lp can move tokens between 2 replicas; "
                        "else N, one replica: nothing to schedule, said at the start)")
    g.add_argument("--placement", default=None, choices=sorted(PLACEMENTS),
                   help="where expert replicas live (default: standard)")
    g.add_argument("--schedule", default=None, choices=SCHEDULES,
                   help="lp: schedule every micro-batch's tokens onto replicas (default); "
                        "none: each token to the replica in its own EP group")
    g.add_argument("--sched-size", type=int, default=None, metavar="G",
                   help="ranks per scheduling group (default: all ranks)")
    g.add_argument("--placement-seed", type=int, default=None, metavar="S",
                   help="seed of the shuffled placements (default 0)")
    g.add_argument("--placement-loads", default=None, metavar="FILE",
                   help="load history for --placement asymmetric/eplb: .npy or .json "
                        "([E] or [steps, E]) or a trace.npz of moebal train --trace")
    g.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help=f"a collective waiting longer fails on every rank "
                        f"(default {DEFAULT_TIMEOUT_S:g})")
    parser.set_defaults(_train_parser=parser)


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ


def _argv_from_args(args: argparse.Namespace) -> list[str]:
    """The command-line arguments that give ``args`` again, without ``--nproc``."""
    parser: argparse.ArgumentParser = args._train_parser
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "nproc"):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def default_ep_size(world_size: int, num_experts: int) -> int:
    """The EP size of ``--ep-size`` left out: on 4 or more ranks half the world when that
    divides the experts (two replicas of every expert on different ranks, so ``--schedule
    lp`` has a choice for every token), else the whole world (one replica per expert).

    Two ranks cannot give the scheduler a choice: EP size 2 leaves one replica per expert,
    EP size 1 puts every expert on every rank, which then computes exactly its own tokens.
    """
    half = world_size // 2
    if world_size >= 4 and world_size % 2 == 0 and num_experts % half == 0:
        return half
    return world_size


def parallel_config_from_args(args: argparse.Namespace, world_size: int, num_experts: int):
    from moebal.parallel.runtime import ParallelConfig
    from moebal.parallel.train import load_placement_loads

    loads = None
    if args.placement_loads is not None:
        loads = load_placement_loads(args.placement_loads, num_experts)
    elif args.placement in LOAD_PLACEMENTS:
        raise ValueError(f"--placement {args.placement} is built from a load history: give "
                         f"--placement-loads FILE (.npy/.json [E] or [steps, E], or a "
                         f"trace.npz of moebal train --trace)")
    ep_size = args.ep_size
    if ep_size is None:
        ep_size = default_ep_size(world_size, num_experts)
    return ParallelConfig(
        ep_size=ep_size,
        placement=args.placement or "standard",
        schedule=args.schedule or "lp",
        sched_size=args.sched_size,
        placement_seed=args.placement_seed or 0,
        placement_loads=loads,
    )


def idle_schedule_note(layout: ParallelLayout, schedule: str) -> Optional[str]:
    """What to tell the user when ``lp`` scheduling cannot change anything: every expert has
    one replica per scheduling group (every token has one rank to go to), or every rank
    holds every expert (every rank computes its own tokens, as many as any other)."""
    if schedule != "lp":
        return None
    if layout.single_replica():
        why = (f"with EP size {layout.ep_size} and scheduling groups of {layout.sched_size} "
               f"ranks every expert has one replica per scheduling group")
    elif layout.ep_size == 1:
        why = "with EP size 1 every rank holds every expert and computes its own tokens"
    else:
        return None
    note = (f"expert parallelism: --schedule lp has nothing to do: {why}, so the scheduled / "
            f"unscheduled makespan is 1.000")
    other = default_ep_size(layout.world_size, layout.num_experts)
    if layout.world_size < 4:
        note += "; on 4 or more processes the default EP size (N/2) gives every expert 2 replicas"
    elif other != layout.ep_size:
        note += f"; --ep-size {other} gives every expert {layout.world_size // other} replicas"
    return note


ConfigsFn = Callable[[argparse.Namespace], tuple]


def check_parallel_args(args: argparse.Namespace, world_size: int,
                        configs: Optional[ConfigsFn] = None) -> ParallelLayout:
    """Every check of an expert-parallel ``moebal train`` that needs no process group: the
    configs (``configs(args)`` gives ``(model_cfg, train_cfg, ...)``), the sizes, the
    placement, the batch split. Returns the layout; raises ValueError."""
    from moebal.parallel.runtime import ExpertParallel
    from moebal.parallel.train import check_parallel_train
    from moebal.train.presets import get_preset

    if configs is None:
        model_cfg, train_cfg = get_preset(args.preset)
    else:
        try:
            model_cfg, train_cfg = configs(args)[:2]
        except TypeError as exc:  # a wrongly typed --set value: bad input like any other
            raise ValueError(str(exc)) from None
    model_cfg.validate()
    train_cfg.validate()
    parallel = parallel_config_from_args(args, world_size, model_cfg.num_experts)
    layout = ExpertParallel.validate(parallel, model_cfg.num_experts, world_size)
    check_parallel_train(train_cfg, world_size)
    return layout


def launch_if_asked(args: argparse.Namespace, configs: Optional[ConfigsFn] = None) -> Optional[int]:
    """With ``--nproc N`` outside torchrun: check the run, then run this command under
    torchrun on N local processes and return its exit code. Otherwise None (train in this
    process); under torchrun the same checks run first, and bad input is reported once.

    ``configs(args)`` gives the run's ``(model_cfg, train_cfg, ...)`` so that the checks see
    the preset and the ``--set`` overrides (without it: the preset's).
    """
    nproc = getattr(args, "nproc", None)
    if under_torchrun():
        with reported_once():
            _, world = world_from_env()
            layout = check_parallel_args(args, world, configs)
        note = idle_schedule_note(layout, args.schedule or "lp")
        if note and world_from_env()[0] == 0:
            print(note, flush=True)
        return None
    if nproc is None:
        used = [f"--{f.replace('_', '-')}" for f in PARALLEL_FLAGS
                if getattr(args, f, None) is not None]
        if used:
            raise ValueError(f"{', '.join(used)} take effect with --nproc N or under torchrun")
        return None
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive int, got {nproc!r}")
    check_parallel_args(args, nproc, configs)  # bad input: one line here, nothing started
    cmd = torchrun_command(nproc, "moebal.train", _argv_from_args(args))
    with tempfile.TemporaryDirectory(prefix="moebal-launch-") as errors:
        code = subprocess.run(cmd, check=False,
                              env={**os.environ, ERRORS_ENV: errors}).returncode
        message = first_rank_error(errors)
    if message is not None:  # the ranks stopped on bad input, and said so here
        raise ValueError(message)
    return code


def train_from_args(args: argparse.Namespace, model_cfg: Any, train_cfg: Any, data_cfg: Any,
                    out: str):
    """Under torchrun: the expert-parallel run of ``moebal train``; the TrainResult on rank 0,
    None on the other ranks. Bad input is reported once (see :func:`reported_once`). The
    process group is ended before returning."""
    import torch.distributed as dist

    from moebal.parallel.train import train_parallel

    try:
        with reported_once():
            _, world = world_from_env()
            parallel = parallel_config_from_args(args, world, model_cfg.num_experts)
            return train_parallel(model_cfg, train_cfg, out, parallel, data_cfg,
                                  preset=args.preset, resume=args.resume, force=args.force,
                                  progress=not args.quiet, timeout_s=args.timeout)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
