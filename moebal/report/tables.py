"""The report's tables: balance and quality, cost, methods, sweep.

Each function takes the method summaries of :func:`moebal.report.results.summarize` (and
what else it names) and returns a :class:`moebal.report.render.Table`. Columns whose
numbers no run recorded (per-layer maxima, optimal gap, simulation) are left out.
"""

from __future__ import annotations

import json
import math

from moebal.report.render import Table
from moebal.report.results import MethodSummary, Stat
from moebal.report.stats import format_paired
from moebal.report.sweep import SweepResult

OPTION_SYMBOLS = {
    "aux_loss_coeff": "α",
    "z_loss_coeff": "z-loss β",
    "bias_update_rate": "u",
    "bias_update": "update",
    "bip_iters": "T_iter",
    "bip_order": "order",
    "bip_warmup_iters": "warm-up",
    "bip_pin_q": "pin q",
    "quantile_ema": "EMA",
    "sinkhorn_iters": "max iters",
    "sinkhorn_tol": "tol",
    "score_function": "scores",
    "norm_topk_prob": "norm. top-K",
    "capacity_factor": "capacity",
}


def options_label(options: dict) -> str:
    """Every option of a variant in short form for tables, e.g. ``α=0.01, scores=sigmoid``."""
    if not options:
        return "–"
    return ", ".join(f"{OPTION_SYMBOLS.get(k, k)}={v:g}" if isinstance(v, float) else
                     f"{OPTION_SYMBOLS.get(k, k)}={v}" for k, v in options.items())


def fmt_stat(s: Stat, digits: int = 3, scale: float = 1.0, suffix: str = "") -> str:
    """``mean ± std`` (or the mean alone for one seed; ``n/a`` when nothing was measured)."""
    if not s.ok:
        return "n/a"
    text = f"{s.mean * scale:.{digits}f}"
    if s.n > 1 and math.isfinite(s.std):
        text += f" ± {s.std * scale:.{digits}f}"
    return text + suffix


def fmt_throughput(s: Stat) -> str:
    if not s.ok:
        return "n/a"
    text = f"{s.mean:,.0f}"
    if s.n > 1 and math.isfinite(s.std):
        text += f" ± {s.std:,.0f}"
    return text


def fmt_time(s: Stat) -> str:
    if not s.ok:
        return "n/a"
    unit, scale = ("min", 1 / 60) if s.mean >= 600 else ("s", 1.0)
    return fmt_stat(s, 1, scale, f" {unit}")


def runs_cell(s: MethodSummary) -> str:
    n, ok = len(s.runs), len(s.ok_runs)
    if ok == n:
        return f"{ok}"
    return f"{ok}/{n} (failed: " + ", ".join(
        f"seed {r['seed']} at step {r['failure']['step']}" for r in s.failed_runs
    ) + ")"


def _any(summaries: list[MethodSummary], key: str) -> bool:
    return any(s.stat(key).ok for s in summaries)


def results_table(summaries: list[MethodSummary]) -> Table:
    """Held-out balance first, then training balance, perplexity and the optimal gap."""
    cols: list[tuple[str, str, object]] = [
        ("Method", "l", lambda s: s.label),
        ("Settings", "l", lambda s: options_label(s.options)),
        ("In-batch", "c", lambda s: "yes" if s.in_batch else "no"),
        ("MaxVio_global", "r", lambda s: fmt_stat(s.stat("max_vio_global"))),
    ]
    if _any(summaries, "max_vio_global_layers"):
        cols.append(("MaxVio_global worst layer", "r",
                     lambda s: fmt_stat(s.stat("max_vio_global_layers"))))
    cols += [
        ("AvgMaxVio", "r", lambda s: fmt_stat(s.stat("avg_max_vio"))),
        ("SupMaxVio", "r", lambda s: fmt_stat(s.stat("sup_max_vio"))),
    ]
    if _any(summaries, "sup_max_vio_layers"):
        cols.append(("SupMaxVio worst layer", "r",
                     lambda s: fmt_stat(s.stat("sup_max_vio_layers"))))
    cols.append(("MaxVio_batch first", "r", lambda s: fmt_stat(s.stat("max_vio_batch_first"))))
    best_ppl = min((s.stat("val_ppl").mean for s in summaries if s.stat("val_ppl").ok),
                   default=None)

    def ppl(s: MethodSummary) -> str:
        text = fmt_stat(s.stat("val_ppl"), 2)
        return f"**{text}**" if s.stat("val_ppl").ok and s.stat("val_ppl").mean == best_ppl else text

    cols.append(("Val PPL", "r", ppl))
    if _any(summaries, "optimal_gap"):
        cols.append(("Optimal gap", "r", lambda s: fmt_stat(s.stat("optimal_gap"), 2, 100.0, "%")))
    cols.append(("Seeds ok", "l", runs_cell))
    # with a capacity factor, MaxVio is measured against the ideal T*K/E of the slots
    # routed, so the share of them dropped stands beside it
    if any(st.ok and st.mean for st in (s.stat("dropped_frac") for s in summaries)):
        cols.append(("Dropped slots", "r", lambda s: fmt_stat(s.stat("dropped_frac"), 1, 100.0, "%")))
    return Table([c[0] for c in cols], [[c[2](s) for c in cols] for s in summaries],
                 "".join(c[1] for c in cols))


def cost_table(summaries: list[MethodSummary]) -> Table:
    """Measured time and throughput, then the simulated MoE-layer times when present."""
    cols: list[tuple[str, str, object]] = [
        ("Method", "l", lambda s: s.label),
        ("Train time", "r", lambda s: fmt_time(s.stat("train_seconds"))),
        ("Tokens/s", "r", lambda s: fmt_throughput(s.stat("tokens_per_s"))),
        ("Router share", "r", lambda s: fmt_stat(s.stat("router_time_share"), 1, 100.0, "%")),
    ]
    if _any(summaries, "sim_standard_ep_ms"):
        cols += [
            ("Sim. MoE layer, standard EP", "r",
             lambda s: fmt_stat(s.stat("sim_standard_ep_ms"), 2, suffix=" ms")),
            ("Sim. MoE layer, LP", "r", lambda s: fmt_stat(s.stat("sim_lp_ms"), 2, suffix=" ms")),
            ("LP speed-up", "r", lambda s: fmt_stat(s.stat("sim_lp_speedup"), 2, suffix="×")),
        ]
    return Table([c[0] for c in cols], [[c[2](s) for c in cols] for s in summaries],
                 "".join(c[1] for c in cols))


def methods_table(summaries: list[MethodSummary]) -> Table:
    """Each variant: its balancer, which setting it is and why, every option it runs with."""
    rows = [[s.label, f"`{s.method}`", f"`{s.balancer}`", s.setting,
             "yes" if s.in_batch else "no", s.variant.why if s.variant and s.variant.why else "–",
             "`" + json.dumps(s.options, sort_keys=True) + "`"] for s in summaries]
    return Table(["Method", "Variant", "Balancer", "Setting", "In-batch", "Why", "Options"],
                 rows, "lllllll")


def sweep_table(sweeps: list[SweepResult]) -> Table:
    """One row per point of every sweep; the paper's setting and the best point marked."""
    rows = []
    for sw in sweeps:
        entries = list(sw.points)
        if sw.paper is not None and all(s is not sw.paper for _, s in entries):
            entries.insert(0, (sw.paper.options.get(sw.option, "–"), sw.paper))
        for value, s in entries:
            marks = [m for m, on in (("paper", s is sw.paper), ("best", s is sw.best)) if on]
            rows.append([f"`{sw.balancer}`", f"{sw.option}={value:g}" if isinstance(value, float)
                         else f"{sw.option}={value}", ", ".join(marks) or "–",
                         fmt_stat(s.stat("val_ppl"), 2), fmt_stat(s.stat("max_vio_global")),
                         fmt_stat(s.stat("avg_max_vio")), runs_cell(s)])
    return Table(["Balancer", "Setting", "Marked", "Val PPL", "MaxVio_global", "AvgMaxVio", "Seeds ok"],
                 rows, "lllrrrl")


def sweep_lines(sweeps: list[SweepResult]) -> list[str]:
    """Per swept balancer, one sentence: best by validation vs the paper's setting."""
    out = []
    for sw in sweeps:
        if sw.best is None:
            out.append(f"`{sw.balancer}`: no point of the sweep finished.")
            continue
        best = f"`{sw.best.method}` (val PPL {fmt_stat(sw.best.stat('val_ppl'), 2)})"
        if sw.paper is None:
            out.append(f"`{sw.balancer}`: best by validation {best}; the paper's setting was not run.")
        elif sw.best is sw.paper:
            out.append(f"`{sw.balancer}`: the paper's setting {best} is also the best by validation.")
        else:
            out.append(f"`{sw.balancer}`: best by validation {best}; paper setting "
                       f"`{sw.paper.method}` (val PPL {fmt_stat(sw.paper.stat('val_ppl'), 2)}); "
                       f"paired best − paper: {format_paired(sw.paired)}.")
    return out
