"""Benchmark the token scheduler against HiGHS on replicated expert placements.

For every (GPUs, experts) size and replica count, a symmetric placement is built and skewed
micro-batch loads are drawn (Zipf over the experts with exponents 0.5, 1.0, 1.5, expert ranks
shuffled; or loads from a routing trace). Reported per row: the median over micro-batches of
the per-micro-batch median (``--stat min``: minimum) solve time of ``solve_schedule`` (exact
flow solver; cold, and warm-started from the previous micro-batch, which has the same expert
popularity) and of the HiGHS makespan LP (model building included, solved in the same run),
their ratio, whether the makespans agree on every micro-batch, and the makespan relative to
the perfect-balance bound (total / GPUs) and to the ``standard`` placement without scheduling
(every expert's tokens split evenly over its replicas). A second table times the locality
objective (loads per source GPU) against HiGHS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
import zipfile
from typing import Any, Callable, Optional

import numpy as np

from moebal.schedule import build_placement, even_split_makespan, solve_schedule, standard
from moebal.schedule.highs import highs_makespan_lp
from moebal.schedule.locality import split_sends

SIZES = ((8, 64), (64, 256), (256, 1024))
REPLICAS = (2, 4)
ZIPF = (0.5, 1.0, 1.5)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "--trace",
        metavar="FILE",
        help="routing trace .npz with int array `counts` [steps, layers, experts] or "
        "[steps, layers, shards, experts]; its micro-batches replace the Zipf loads",
    )
    parser.add_argument("--instances", type=int, default=5, help="load vectors per row")
    parser.add_argument("--repeats", type=int, default=7, help="timed solves per instance")
    parser.add_argument(
        "--highs-repeats", type=int, default=3, help="timed HiGHS solves per instance"
    )
    parser.add_argument(
        "--tokens-per-gpu", type=int, default=4096, help="routed tokens per GPU per micro-batch"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sizes",
        default=",".join(f"{g}x{e}" for g, e in SIZES),
        help="comma-separated GPUSxEXPERTS list (default %(default)s)",
    )
    parser.add_argument("--no-locality", action="store_true", help="skip the locality table")
    parser.add_argument(
        "--stat",
        choices=("median", "min"),
        default="median",
        help="summary of the timed solves (min: the least disturbed, on a shared machine)",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: CPU time of this process (steadier on a shared machine)",
    )


Timing = tuple[Callable[[], float], Callable[[list[float]], float]]  # (clock, summary)


def _timing(args: argparse.Namespace) -> Timing:
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    return clock, (min if args.stat == "min" else statistics.median)


def _timed(fn: Callable[[], Any], repeats: int, timing: Timing) -> tuple[float, Any]:
    clock, stat = timing
    times, out = [], None
    for _ in range(repeats):
        t0 = clock()
        out = fn()
        times.append(clock() - t0)
    return stat(times), out


def _zipf_popularity(rng: np.random.Generator, E: int, exponent: float) -> np.ndarray:
    p = 1.0 / np.arange(1, E + 1) ** exponent
    return rng.permutation(p / p.sum())


def _zipf_loads(rng: np.random.Generator, E: int, exponent: float, total: int) -> np.ndarray:
    return rng.multinomial(total, _zipf_popularity(rng, E, exponent)).astype(np.int64)


def load_trace(path: str) -> np.ndarray:
    """Micro-batch loads [M, E] from a trace .npz (`counts` [S, L, E] or [S, L, shards, E])."""
    if not os.path.isfile(path):
        raise ValueError(f"trace file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"trace {path} is not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "counts" not in data:
                raise ValueError(f"trace {path} has no array `counts` (found {sorted(data.files)})")
            counts = np.asarray(data["counts"])
    except ValueError as exc:
        if str(exc).startswith(f"trace {path} "):
            raise
        raise ValueError(f"cannot read trace {path}: {exc}") from exc
    except Exception as exc:  # a damaged archive fails inside numpy, zipfile or zlib
        raise ValueError(
            f"cannot read trace {path}: damaged or not an .npz ({type(exc).__name__})"
        ) from exc
    if counts.ndim == 4:
        counts = counts.sum(2)
    if counts.ndim != 3 or not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(
            f"trace `counts` must be an integer array [steps, layers, experts] or "
            f"[steps, layers, shards, experts], got {counts.dtype} {counts.shape}"
        )
    if (counts < 0).any():
        raise ValueError("trace `counts` has negative entries")
    return counts.reshape(-1, counts.shape[-1]).astype(np.int64)


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        try:
            g, e = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"--sizes: expected GPUSxEXPERTS items, got {item!r}") from None
        if g < 1 or e < 1:
            raise ValueError(f"--sizes: sizes must be positive, got {item!r}")
        out.append((g, e))
    return out


def run_bench(args: argparse.Namespace, progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    for name in ("instances", "repeats", "highs_repeats", "tokens_per_gpu"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    timing = _timing(args)
    rng = np.random.default_rng(args.seed)
    trace = load_trace(args.trace) if args.trace else None
    sizes = _parse_sizes(args.sizes)
    if trace is not None:
        sizes = [(g, int(trace.shape[1])) for g, _ in sizes]
    plan = [
        (G, E, r, z)
        for G, E in sizes
        for r in REPLICAS
        for z in ((None,) if trace is not None else ZIPF)
        if r <= G and (E * r) % G == 0
    ]
    rows = [
        _makespan_row(args, timing, rng, trace, G, E, r, z)
        for G, E, r, z in tqdm(plan, desc="bench schedule", disable=not progress)
    ]
    locality: list[dict[str, Any]] = []
    if not args.no_locality:
        locality = _locality_rows(args, timing, sizes, rng, trace, progress)
    return {
        "command": "moebal bench schedule",
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        "clock": args.clock,
        "stat": args.stat,
        "tokens_per_gpu": args.tokens_per_gpu,
        "rows": rows,
        "locality": locality,
    }


def _micro_batch_pairs(
    args: argparse.Namespace,
    rng: np.random.Generator,
    trace: Optional[np.ndarray],
    G: int,
    E: int,
    z: Optional[float],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pairs of consecutive micro-batches [E]: (instance, the next one, for the warm start)."""
    pairs = []
    for i in range(args.instances):
        if trace is not None:
            j = int(i * (len(trace) - 1) // max(args.instances, 1))
            pairs.append((trace[j], trace[min(j + 1, len(trace) - 1)]))
        else:  # same expert popularity, fresh tokens
            p = _zipf_popularity(rng, E, z)
            total = G * args.tokens_per_gpu
            pairs.append((rng.multinomial(total, p), rng.multinomial(total, p)))
    return pairs


def _makespan_row(
    args: argparse.Namespace,
    timing: Timing,
    rng: np.random.Generator,
    trace: Optional[np.ndarray],
    G: int,
    E: int,
    r: int,
    z: Optional[float],
) -> dict[str, Any]:
    """One row of the first table: G GPUs, E experts, r replicas, Zipf ``z`` (None: trace)."""
    slots = E * r // G
    placement = build_placement("symmetric", G, E, slots, seed=args.seed)
    try:
        baseline = standard(G, E, slots)
    except ValueError:
        baseline = None
    t_ours, t_warm, t_highs = [], [], []
    equal, span_ratio, std_ratio = 0, [], []
    for cur, nxt in _micro_batch_pairs(args, rng, trace, G, E, z):
        t, sched = _timed(lambda: solve_schedule(placement, cur), args.repeats, timing)
        t_ours.append(t)
        tw, _ = _timed(lambda: solve_schedule(placement, nxt, prev=sched), args.repeats, timing)
        t_warm.append(tw)
        th, (optimum, _) = _timed(
            lambda: highs_makespan_lp(placement, cur), args.highs_repeats, timing
        )
        t_highs.append(th)
        equal += int(sched.makespan == max(0, math.ceil(optimum - 1e-6)))
        total = int(cur.sum())
        if total > 0:
            span_ratio.append(sched.makespan / (total / G))
            if baseline is not None:
                std_ratio.append(sched.makespan / even_split_makespan(baseline, cur))
    return {
        "gpus": G,
        "experts": E,
        "replicas": r,
        "loads": "trace" if z is None else f"zipf {z}",
        "ours_ms": statistics.median(t_ours) * 1e3,
        "ours_warm_ms": statistics.median(t_warm) * 1e3,
        "highs_ms": statistics.median(t_highs) * 1e3,
        "speedup": statistics.median(t_highs) / statistics.median(t_ours),
        "makespan_equal": f"{equal}/{args.instances}",
        "vs_balance": statistics.mean(span_ratio) if span_ratio else float("nan"),
        "vs_standard": statistics.mean(std_ratio) if std_ratio else float("nan"),
    }


def _locality_rows(
    args: argparse.Namespace,
    timing: Timing,
    sizes: list[tuple[int, int]],
    rng: np.random.Generator,
    trace: Optional[np.ndarray],
    progress: bool,
) -> list[dict[str, Any]]:
    from tqdm import tqdm

    out = []
    plan = [
        (G, E, r) for G, E in sizes if G <= 64 for r in REPLICAS if r <= G and (E * r) % G == 0
    ]
    for G, E, r in tqdm(plan, desc="bench locality", disable=not progress):
        placement = build_placement("symmetric", G, E, E * r // G, seed=args.seed)
        idx = placement.slots
        t_ours, t_highs, moved, moved_h, naive, total = [], [], [], [], [], 0
        for i in range(max(1, args.instances // 2)):
            if trace is not None:
                loads_E = trace[(i * 7919) % len(trace)]
            else:
                loads_E = _zipf_loads(rng, E, 1.0, G * args.tokens_per_gpu)
            # tokens of every expert come from uniformly random source GPUs
            loads_RE = np.stack([rng.multinomial(int(n), np.full(G, 1.0 / G)) for n in loads_E], 1)
            t, sched = _timed(lambda: solve_schedule(placement, loads_RE), args.repeats, timing)
            th, ref = _timed(
                lambda: solve_schedule(placement, loads_RE, method="highs"),
                args.highs_repeats,
                timing,
            )
            plain = solve_schedule(placement, loads_RE.sum(0))
            _, naive_moved = split_sends(
                placement, plain.x_EG[idx.expert_N, idx.gpu_N], loads_RE
            )
            t_ours.append(t)
            t_highs.append(th)
            moved.append(sched.tokens_moved)
            moved_h.append(ref.tokens_moved)
            naive.append(naive_moved)
            total += int(loads_E.sum())
        out.append(
            {
                "gpus": G,
                "experts": E,
                "replicas": r,
                "ours_ms": statistics.median(t_ours) * 1e3,
                "highs_ms": statistics.median(t_highs) * 1e3,
                "speedup": statistics.median(t_highs) / statistics.median(t_ours),
                "moved_equal": f"{sum(a == b for a, b in zip(moved, moved_h))}/{len(moved)}",
                "moved_frac": sum(moved) / max(total, 1),
                "naive_moved_frac": sum(naive) / max(total, 1),
            }
        )
    return out


def format_tables(result: dict[str, Any]) -> str:
    lines = [
        "| GPUs | experts | replicas | loads | ours ms | ours warm ms | HiGHS ms | HiGHS/ours "
        "| makespan = HiGHS | makespan / balance | makespan / standard unscheduled |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['gpus']} | {r['experts']} | {r['replicas']} | {r['loads']} "
            f"| {r['ours_ms']:.3f} | {r['ours_warm_ms']:.3f} | {r['highs_ms']:.3f} "
            f"| {r['speedup']:.1f}x | {r['makespan_equal']} | {r['vs_balance']:.3f} "
            f"| {r['vs_standard']:.3f} |"
        )
    if result["locality"]:
        lines += [
            "",
            "Locality (loads per source GPU; Zipf 1.0 experts, uniform sources):",
            "",
            "| GPUs | experts | replicas | ours ms | HiGHS ms | HiGHS/ours | moved = HiGHS "
            "| moved / tokens | naive moved / tokens |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["locality"]:
            lines.append(
                f"| {r['gpus']} | {r['experts']} | {r['replicas']} | {r['ours_ms']:.3f} "
                f"| {r['highs_ms']:.3f} | {r['speedup']:.1f}x | {r['moved_equal']} "
                f"| {r['moved_frac']:.4f} | {r['naive_moved_frac']:.4f} |"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = run_bench(args, progress=not args.json)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['command']}  ({result['machine']}, {result['clock']} clock, "
            f"{result['stat']} per micro-batch, "
            f"{result['tokens_per_gpu']} tokens/GPU)"
        )
        print(format_tables(result))
    return 0
