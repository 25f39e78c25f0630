"""The text tables `moebal simulate` prints: one run, a sweep, a validation."""

from __future__ import annotations

import sys

from moebal.sim.systems import SYSTEMS


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def print_table(run: dict, file=None) -> None:
    """One run (``label``, ``summary`` rows, ``skipped``, as ``moebal simulate`` builds it)."""
    file = sys.stdout if file is None else file
    print(f"\n{run['label']}: {run['gpus']} GPUs, {run['experts']} experts, top-{run['top_k']},"
          f" {run['micro_batches']} steps x {run['layers']} layers (after {run['warmup']} warm-up steps);"
          f" routing MaxVio_batch {run['max_vio_batch']:.3f}", file=file)
    head = (f"{'system':<14}{'step ms':>9}{'Mtok/s':>9}{'vs EP':>8}{'vs std':>8}"
            f"{'imb mean':>9}{'imb max':>9}{'moved%':>8}{'inter%':>8}{'sched ms':>9}")
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in run["summary"]:
        print(
            f"{r['system']:<14}{r['step_ms']:>9.2f}{r['tokens_per_s'] / 1e6:>9.2f}"
            f"{_fmt(r['speedup_vs_plain_ep'], '.3f'):>8}{_fmt(r['speedup_vs_standard'], '.3f'):>8}"
            f"{r['imbalance_mean']:>9.3f}{r['imbalance_max']:>9.3f}{100 * r['moved_frac']:>8.1f}"
            f"{100 * r['inter_node_frac']:>8.1f}{r['sched_ms']:>9.3f}",
            file=file,
        )
    for name, why in run["skipped"].items():
        print(f"{name:<14}skipped: {why}", file=file)


def print_sweep(flat: list[dict], skipped: list[dict]) -> None:
    """Throughput relative to the standard placement, one line per (GPUs, experts)."""
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in flat)]
    head = f"{'GPUs':>6}{'experts':>8}" + "".join(f"{s:>14}" for s in systems)
    print("throughput relative to the standard placement (MoE layers)")
    print(head)
    print("-" * len(head))
    keys = sorted({(r["gpus"], r["experts"]) for r in flat}, key=lambda k: (k[1], k[0]))
    for g, e in keys:
        vals = {r["system"]: r["speedup_vs_standard"] for r in flat if r["gpus"] == g and r["experts"] == e}
        print(f"{g:>6}{e:>8}" + "".join(f"{_fmt(vals.get(s), '.3f'):>14}" for s in systems))
    for s in skipped:
        print(f"skipped {s['label']}: {s['reason']}")


def print_validation(out: dict) -> None:
    """The fitted constants and the prediction errors of ``moebal.sim.validate.validate``."""
    f = out["fitted"]
    print(f"fitted on {out['steps_fit']} steps, evaluated on {out['steps_eval']}:")
    link = f"{f['intra_bw_effective'] / 1e9:.3f} GB/s"
    if f.get("bw_resolved") is False:
        link = f"not resolved (time does not grow with volume; kept {link})"
    print(f"  rate {f['rate_flops'] / 1e9:.2f} GFLOP/s, overhead {f['compute_overhead_s'] * 1e3:.3f} ms,"
          f" link {link}, latency {f['latency_s'] * 1e6:.1f} us")
    base = out["baseline_mape"]
    print("  mean abs error, model (predicting the mean of the fitted steps):")
    for k, v in out["mape"].items():
        print(f"  {k:<11} {_fmt(v, '.1f')}% ({_fmt(base[k], '.1f')}%)")
    print(f"  slowest rank per step: {out['step_mape']:.1f}% ({base['step']:.1f}%)")
