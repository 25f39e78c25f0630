"""Build the comparison report (``report.md``, ``report.html``, ``plots/*.png``) from results."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Union

from moebal.fileio import atomic_write_bytes, atomic_write_text
from moebal.report.claims import (
    BALANCED_MAXVIO,
    FAR_LOWER_RATIO,
    ClaimCheck,
    check_claims,
    gap_beyond_noise,
)
from moebal.report.plots import PLOTS
from moebal.report.render import (
    Block,
    Bullets,
    Code,
    Heading,
    Image,
    Para,
    Table,
    to_html,
    to_markdown,
)
from moebal.report.results import (
    MethodSummary,
    Stat,
    load_results,
    missing_runs,
    summarize,
    validate_results,
)

PLOTS_DIR = "plots"

_OPTION_SYMBOLS = {
    "aux_loss_coeff": "α",
    "z_loss_coeff": "z-loss β",
    "bias_update_rate": "u",
    "bias_update": "update",
    "bip_iters": "T_iter",
    "bip_order": "order",
    "quantile_ema": "EMA",
    "bip_pin_q": "pin q",
    "sinkhorn_iters": "max iters",
    "sinkhorn_tol": "tol",
    "score_function": "scores",
    "capacity_factor": "capacity",
}


def options_label(options: dict) -> str:
    """Short form of a balancer's options for tables, e.g. ``α=0.01``."""
    if not options:
        return "–"
    return ", ".join(f"{_OPTION_SYMBOLS.get(k, k)}={v:g}" if isinstance(v, float) else
                     f"{_OPTION_SYMBOLS.get(k, k)}={v}" for k, v in options.items())


def _num(x: float, digits: int) -> str:
    return f"{x:.{digits}f}"


def fmt_stat(s: Stat, digits: int = 3, scale: float = 1.0, suffix: str = "") -> str:
    """``mean ± std`` (or the mean alone for one seed; ``n/a`` when nothing was measured)."""
    if not s.ok:
        return "n/a"
    text = _num(s.mean * scale, digits)
    if s.n > 1 and math.isfinite(s.std):
        text += f" ± {_num(s.std * scale, digits)}"
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


def _runs_cell(s: MethodSummary) -> str:
    n, ok = len(s.runs), len(s.ok_runs)
    if ok == n:
        return f"{ok}"
    return f"{ok}/{n} (failed: " + ", ".join(
        f"seed {r['seed']} at step {r['failure']['step']}" for r in s.failed_runs
    ) + ")"


def results_table(summaries: list[MethodSummary]) -> Table:
    header = [
        "Method", "Settings", "Seeds ok", "Val PPL", "MaxVio_global", "AvgMaxVio",
        "SupMaxVio", "MaxVio_batch first", "MaxVio_batch last", "Train time",
        "Tokens/s", "Router share",
    ]
    rows = []
    best_ppl = min(
        (s.stat("val_ppl").mean for s in summaries if s.stat("val_ppl").ok),
        default=None,
    )
    for s in summaries:
        st = s.stat
        ppl = fmt_stat(st("val_ppl"), 2)
        if best_ppl is not None and st("val_ppl").ok and st("val_ppl").mean == best_ppl:
            ppl = f"**{ppl}**"
        rows.append([
            s.label,
            options_label(s.options),
            _runs_cell(s),
            ppl,
            fmt_stat(st("max_vio_global")),
            fmt_stat(st("avg_max_vio")),
            fmt_stat(st("sup_max_vio")),
            fmt_stat(st("max_vio_batch_first")),
            fmt_stat(st("max_vio_batch_last")),
            fmt_time(st("train_seconds")),
            fmt_throughput(st("tokens_per_s")),
            fmt_stat(st("router_time_share"), 1, 100.0, "%"),
        ])
    # with a capacity factor, MaxVio is measured against the ideal T*K/E of the slots
    # routed, so the share of them dropped stands beside it
    if any(st.ok and st.mean for st in (s.stat("dropped_frac") for s in summaries)):
        header.append("Dropped slots")
        for row, s in zip(rows, summaries):
            row.append(fmt_stat(s.stat("dropped_frac"), 1, 100.0, "%"))
    return Table(header, rows, "lllrrrrrrrrr" + "r" * (len(header) - 12))


def _claim_item(c: ClaimCheck) -> str:
    return f"**{c.claim}** ({c.source}) — **{c.verdict}**. {c.evidence}"


def _headline(summaries: list[MethodSummary]) -> Optional[str]:
    ok = [s for s in summaries if s.stat("val_ppl").ok]
    if not ok:
        return None
    best = min(ok, key=lambda s: s.stat("val_ppl").mean)
    balanced = min(
        (s for s in ok if s.stat("avg_max_vio").ok), key=lambda s: s.stat("avg_max_vio").mean,
        default=None,
    )
    text = (
        f"Lowest validation perplexity: **{best.label}** "
        f"({fmt_stat(best.stat('val_ppl'), 2)})"
    )
    rest = sorted((s for s in ok if s is not best), key=lambda s: s.stat("val_ppl").mean)
    if rest:
        runner = rest[0]
        beyond = gap_beyond_noise(best.stat("val_ppl"), runner.stat("val_ppl"))
        gap = runner.stat("val_ppl").mean - best.stat("val_ppl").mean
        text += f", {gap:.2f} below {runner.label}" + {
            None: " (one seed: noise unknown)",
            True: ", a gap larger than the seeds' standard deviations",
            False: ", within the seeds' standard deviations",
        }[beyond]
    text += "."
    if balanced is not None:
        text += (
            f" Best balanced during training (lowest AvgMaxVio): **{balanced.label}** "
            f"({fmt_stat(balanced.stat('avg_max_vio'))})."
        )
    return text


def _config_bullets(results: dict) -> list[str]:
    cfg = results["config"]
    model, train = cfg.get("model", {}), cfg.get("train", {})
    items = [f"Command: `{results.get('command', '?')}`"]
    seeds = cfg.get("seeds", [])
    items.append(
        f"Preset `{cfg.get('preset', '?')}`, {cfg.get('steps', '?')} optimizer steps per run, "
        f"seeds {', '.join(map(str, seeds))}, device `{cfg.get('device', '?')}`."
    )
    shape = [
        f"{k}={model[k]}"
        for k in ("d_model", "n_layers", "n_heads", "num_experts", "top_k", "expert_hidden",
                  "num_shared_experts", "dense_layers", "seq_len", "vocab_size")
        if k in model
    ]
    if shape:
        text = "Model: " + ", ".join(shape)
        if cfg.get("params_total"):
            text += f"; {cfg['params_total'] / 1e6:.2f} M parameters"
            if cfg.get("params_active"):
                text += f" ({cfg['params_active'] / 1e6:.2f} M active per token)"
        items.append(text + ".")
    if cfg.get("tokens_per_step"):
        items.append(f"Tokens per optimizer step: {cfg['tokens_per_step']:,}.")
    if cfg.get("data"):
        items.append(f"Data: {cfg['data']}.")
    score = model.get("router_options", {}).get("score_function") if isinstance(
        model.get("router_options"), dict) else None
    if score:
        items.append(f"Router scores: {score}.")
    if results.get("created_at"):
        items.append(f"Started {results['created_at']}, last updated {results.get('updated_at', '?')}.")
    return items


def build_document(results: dict, plots: dict[str, bytes]) -> list[Block]:
    """The report as blocks; ``plots`` maps file names under plots/ to PNG bytes."""
    summaries = summarize(results)
    cfg = results["config"]
    blocks: list[Block] = [
        Heading(1, f"Load balancing compared: {len(summaries)} balancers, preset `{cfg.get('preset', '?')}`"),
        Para(
            "One MoE language model, trained with the same data, seeds and number of steps "
            "under each balancer; only the routing changes. Metrics as in the Loss-Free and "
            "BIP papers."
        ),
        Bullets(_config_bullets(results)),
        Heading(2, "Results"),
    ]
    headline = _headline(summaries)
    if headline:
        blocks.append(Para(headline))
    blocks.append(results_table(summaries))
    blocks.append(Bullets([
        "**Val PPL**: validation perplexity at the end of training, mean ± standard deviation "
        "over seeds (one seed: the value); the lowest in bold.",
        "**MaxVio_global**: MaxVio (max load / mean load − 1) of the loads summed over the "
        "whole validation set at the last evaluation, averaged over MoE layers (Loss-Free paper).",
        "**AvgMaxVio / SupMaxVio**: mean and maximum over training steps of MaxVio_batch, the "
        "layer-averaged MaxVio of each training batch (BIP paper); **first / last**: "
        "MaxVio_batch of the first and the last training step.",
        "**Train time**: wall time of the training steps; **Tokens/s**: training tokens per "
        "second; **Router share**: time in the gate and router as a share of the step.",
    ]))
    failed = [(s, r) for s in summaries for r in s.failed_runs]
    if failed:
        blocks.append(Heading(3, "Failed runs"))
        blocks.append(Bullets([
            f"{s.label}, seed {r['seed']}: stopped at step {r['failure']['step']} — "
            f"{r['failure']['reason']}"
            for s, r in failed
        ]))
    missing = missing_runs(results)
    if missing:
        blocks.append(Para(
            "**Incomplete run**: not yet trained: "
            + ", ".join(f"{m} seed {s}" for m, s in missing)
            + ". Rerun the command with `--resume` to finish."
        ))

    blocks.append(Heading(2, "What this run says about the papers' claims"))
    claims = check_claims(summaries, results.get("environment"))
    blocks.append(Bullets([_claim_item(c) for c in claims]))
    blocks.append(Para(
        f"Rules: a batch is *balanced* when its MaxVio ≤ {BALANCED_MAXVIO}; *far lower* "
        f"MaxVio_global means at most {FAR_LOWER_RATIO}× the other's; a perplexity gap counts "
        "only when it is larger than the standard deviation over seeds of both methods "
        "(unknown with one seed). These verdicts concern this model, corpus and budget, "
        "which are far smaller than the papers'."
    ))

    blocks.append(Heading(2, "Plots"))
    for name, (_, caption) in PLOTS.items():
        if name in plots:
            blocks.append(Image(f"{PLOTS_DIR}/{name}", caption, plots[name]))

    blocks.append(Heading(2, "Balancer settings"))
    blocks.append(Table(
        ["Method", "Options"],
        [[s.label, "`" + json.dumps(s.options, sort_keys=True) + "`"] for s in summaries],
    ))
    if cfg.get("model") or cfg.get("train"):
        blocks.append(Heading(2, "Configuration"))
        blocks.append(Code(json.dumps(
            {"model": cfg.get("model", {}), "train": cfg.get("train", {})}, indent=1, sort_keys=True
        )))
    env = results.get("environment") or {}
    if env:
        blocks.append(Heading(2, "Environment"))
        blocks.append(Bullets([f"{k}: {v}" for k, v in env.items()]))
    blocks.append(Para(f"Regenerate this report with `moebal report RUN_DIR`."))
    return blocks


def make_plots(results: dict) -> dict[str, bytes]:
    summaries = summarize(results)
    out = {}
    for name, (fn, _) in PLOTS.items():
        png = fn(summaries)
        if png:
            out[name] = png
    return out


def write_report(
    run_dir: Union[str, Path], results: Optional[dict] = None
) -> dict[str, Path]:
    """Write report.md, report.html and plots/*.png into ``run_dir`` (atomically, each file).

    ``results`` defaults to the folder's results.json. Returns the written paths by name.
    """
    run_dir = Path(run_dir)
    results = load_results(run_dir) if results is None else validate_results(results)
    plots = make_plots(results)
    written: dict[str, Path] = {}
    for name, png in plots.items():
        written[name] = atomic_write_bytes(run_dir / PLOTS_DIR / name, png)
    blocks = build_document(results, plots)
    title = blocks[0].text.replace("`", "") if isinstance(blocks[0], Heading) else "moebal comparison"
    written["report.md"] = atomic_write_text(run_dir / "report.md", to_markdown(blocks))
    written["report.html"] = atomic_write_text(run_dir / "report.html", to_html(blocks, title))
    return written
