"""What a balancer's routing leaves for the system scheduler: its trace on a cluster.

Each comparison run records its routing trace (``trace.npz``); :func:`simulate_run` replays
its last steps with ``moebal simulate`` in the MicroMoE setting (32 GPUs, expert-parallel
groups of 4, scheduling groups of 8, H100 cost model, 4096 tokens per GPU and micro-batch)
and returns the MoE-layer step time with Megatron's standard EP x EDP placement and with
per-micro-batch LP scheduling on the symmetric replica placement (MicroMoE). Scheduling
is charged no time: MicroMoE overlaps it with the token permutation (its overhead is under
1 ms at 64 GPUs), and charging the solve times measured here would make the column depend
on how busy this machine was. The column is therefore deterministic.

:func:`resimulate` recomputes the column of a finished comparison from its run folders
(``moebal report RUN_DIR --simulate``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from moebal.trace import RoutingTrace, load_trace

GPUS, EP, SCHED_GROUP = 32, 4, 8
STEPS = 200  # the last steps of the run: the routing the balancer settled into
SYSTEMS = ("standard", "lp_symmetric")


def simulate_run(trace_file: Path, steps: int = STEPS) -> Optional[dict[str, Any]]:
    """The ``sim`` entry of a results.json row, or None when the run left no usable trace
    (none recorded, or experts that do not divide over an EP group)."""
    if not Path(trace_file).is_file():
        return None
    from moebal.sim.cli import replay

    trace = load_trace(trace_file)
    if trace.num_experts % EP:
        return None
    last = RoutingTrace(trace.counts_PLRE[-steps:], trace.top_k, dict(trace.meta))
    options = ["--gpus", str(GPUS), "--ep", str(EP), "--sched-group", str(SCHED_GROUP),
               "--systems", ",".join(SYSTEMS), "--warmup", "0", "--sched-time-ms", "0"]
    result = replay(last, options, label=str(trace_file))
    by = {row["system"]: row for row in result["summary"]}
    standard, lp = by["standard"]["step_ms"], by["lp_symmetric"]["step_ms"]
    return {"gpus": GPUS, "ep": EP, "sched_group": SCHED_GROUP, "steps": len(last.counts_PLRE),
            "micro_batches": result["micro_batches"], "standard_ep_ms": standard, "lp_ms": lp,
            "lp_speedup": standard / lp if lp > 0 else None,
            "imbalance_standard": by["standard"]["imbalance_mean"],
            "imbalance_lp": by["lp_symmetric"]["imbalance_mean"]}


def resimulate(run_dir: Path, results: dict[str, Any]) -> int:
    """Recompute the ``sim`` entry of every ok run of ``results`` (a comparison's
    results.json, changed in place) from ``run_dir/<row's run_dir>/trace.npz``; returns how
    many runs had a trace."""
    done = 0
    for row in results["runs"]:
        if row.get("status") != "ok" or not row.get("run_dir"):
            continue
        sim = simulate_run(Path(run_dir) / row["run_dir"] / "trace.npz")
        if sim is not None:
            row["sim"] = sim
            done += 1
    return done
