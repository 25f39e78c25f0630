"""The expert-parallel options of ``moebal train`` and how a run is launched.

``moebal train --nproc N ...`` re-runs the same command under ``torchrun`` on N local
processes; under ``torchrun`` (``torchrun --nproc-per-node N -m moebal.train ...``) every
process trains its share with :func:`moebal.parallel.train.train_parallel`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from typing import Any, Optional

from moebal.parallel.comm import DEFAULT_TIMEOUT_S
from moebal.parallel.launch import torchrun_command
from moebal.parallel.plan import SCHEDULES

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
                   help="ranks per expert-parallel group (default: all ranks); each rank "
                        "holds num_experts / P experts")
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


def launch_if_asked(args: argparse.Namespace) -> Optional[int]:
    """With ``--nproc N`` outside torchrun: run this command under torchrun on N local
    processes and return its exit code. Otherwise None (train in this process)."""
    nproc = getattr(args, "nproc", None)
    if nproc is None or under_torchrun():
        if nproc is None and not under_torchrun():
            used = [f"--{f.replace('_', '-')}" for f in PARALLEL_FLAGS
                    if getattr(args, f, None) is not None]
            if used:
                raise ValueError(f"{', '.join(used)} take effect with --nproc N or under "
                                 f"torchrun")
        return None
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive int, got {nproc!r}")
    cmd = torchrun_command(nproc, "moebal.train", _argv_from_args(args))
    return subprocess.run(cmd, check=False).returncode


def parallel_config_from_args(args: argparse.Namespace, world_size: int, num_experts: int):
    from moebal.parallel.runtime import ParallelConfig
    from moebal.parallel.train import load_placement_loads

    loads = None
    if args.placement_loads is not None:
        loads = load_placement_loads(args.placement_loads, num_experts)
    return ParallelConfig(
        ep_size=args.ep_size if args.ep_size is not None else world_size,
        placement=args.placement or "standard",
        schedule=args.schedule or "lp",
        sched_size=args.sched_size,
        placement_seed=args.placement_seed or 0,
        placement_loads=loads,
    )


def train_from_args(args: argparse.Namespace, model_cfg: Any, train_cfg: Any, data_cfg: Any,
                    out: str):
    """Under torchrun: the expert-parallel run of ``moebal train``; the TrainResult on rank 0,
    None on the other ranks. The process group is ended before returning."""
    import torch.distributed as dist

    from moebal.parallel.train import _world_from_env, train_parallel

    _, world = _world_from_env()
    parallel = parallel_config_from_args(args, world, model_cfg.num_experts)
    try:
        return train_parallel(model_cfg, train_cfg, out, parallel, data_cfg,
                              preset=args.preset, resume=args.resume, force=args.force,
                              progress=not args.quiet, timeout_s=args.timeout)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
