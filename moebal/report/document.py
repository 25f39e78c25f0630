"""Build the comparison report (``report.md``, ``report.html``, ``plots/*.png``) from results.

The report leads with held-out balance (MaxVio_global) beside training balance, marks the
methods that route a batch with information from that same batch, and checks the papers'
claims with paired statistics over the seeds (:mod:`moebal.report.claims`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from moebal.fileio import atomic_write_bytes, atomic_write_text
from moebal.report.claims import (
    BALANCED_MAXVIO,
    FAR_LOWER_RATIO,
    ClaimCheck,
    check_claims,
    timing_withheld,
)
from moebal.report.plots import PLOTS
from moebal.report.render import (
    Block,
    Bullets,
    Code,
    Heading,
    Image,
    Para,
    to_html,
    to_markdown,
)
from moebal.report.results import (
    MethodSummary,
    load_results,
    missing_runs,
    summarize,
    validate_results,
)
from moebal.report.stats import format_paired, paired_difference
from moebal.report.sweep import sweep_results
from moebal.report.tables import (
    cost_table,
    fmt_stat,
    methods_table,
    options_label,
    results_table,
    sweep_lines,
    sweep_table,
)

__all__ = ["PLOTS_DIR", "build_document", "cost_table", "make_plots", "methods_table",
           "options_label", "results_table", "write_report"]

PLOTS_DIR = "plots"


def _claim_item(c: ClaimCheck) -> str:
    return f"**{c.claim}** ({c.source}) — **{c.verdict}**. {c.evidence}"


def _lowest(summaries: list[MethodSummary], key: str) -> Optional[MethodSummary]:
    ok = [s for s in summaries if s.stat(key).ok]
    return min(ok, key=lambda s: s.stat(key).mean) if ok else None


def _in_batch(s: MethodSummary) -> str:
    return " — in-batch: it routes each batch with information from that same batch" \
        if s.in_batch else ""


def headline(summaries: list[MethodSummary]) -> Optional[str]:
    """Held-out balance, then perplexity (with the paired difference to the runner-up),
    then training balance; None when no run finished."""
    held = _lowest(summaries, "max_vio_global")
    best = _lowest(summaries, "val_ppl")
    if best is None:
        return None
    parts = []
    if held is not None:
        parts.append(f"Best held-out balance (lowest MaxVio_global): **{held.label}** "
                     f"({fmt_stat(held.stat('max_vio_global'))}){_in_batch(held)}.")
    text = f"Lowest validation perplexity: **{best.label}** ({fmt_stat(best.stat('val_ppl'), 2)})"
    rest = sorted((s for s in summaries if s is not best and s.stat("val_ppl").ok),
                  key=lambda s: s.stat("val_ppl").mean)
    if rest:
        p = paired_difference(rest[0].by_seed("val_ppl"), best.by_seed("val_ppl"))
        text += f"; {rest[0].label} − {best.label}: {format_paired(p)}"
        if p.known and p.sign == 0:
            text += ", the interval spans zero"
    parts.append(text + ".")
    train = _lowest(summaries, "avg_max_vio")
    if train is not None:
        parts.append(f"Lowest training imbalance (AvgMaxVio): **{train.label}** "
                     f"({fmt_stat(train.stat('avg_max_vio'))}){_in_batch(train)}.")
    return " ".join(parts)


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
    every = summarize(results)
    summaries = [s for s in every if s.setting != "sweep"]
    cfg = results["config"]
    env = results.get("environment") or {}
    blocks: list[Block] = [
        Heading(1, f"Load balancing compared: {len(summaries)} methods, preset `{cfg.get('preset', '?')}`"),
        Para(
            "One MoE language model, trained with the same data, seeds and number of steps "
            "under each method; only the routing changes. Metrics as in the Loss-Free and "
            "BIP papers; comparisons paired over the shared seeds."
        ),
        Bullets(_config_bullets(results)),
        Heading(2, "Results"),
    ]
    text = headline(summaries)
    if text:
        blocks.append(Para(text))
    blocks.append(results_table(summaries))
    notes = [
        "**MaxVio_global** (held-out balance): MaxVio (max load / mean load − 1) of the loads "
        "summed over the whole validation set at the last evaluation, averaged over MoE "
        "layers (Loss-Free paper); **worst layer**: its maximum over layers.",
        "**AvgMaxVio / SupMaxVio** (training balance): mean and maximum over training steps "
        "of MaxVio_batch, the layer-averaged MaxVio of each training batch (BIP paper); "
        "**SupMaxVio worst layer**: the maximum over steps and layers of the per-layer "
        "MaxVio_batch; **MaxVio_batch first**: at the first training step.",
        "**In-batch**: the method routes each batch with information computed from that same "
        "batch (later tokens decide earlier tokens' experts), so its training MaxVio_batch is "
        "an in-batch optimisation, not available when tokens arrive one at a time; its "
        "MaxVio_global shows its balance on text it did not route with.",
        "**Val PPL**: validation perplexity at the end of training, mean ± standard deviation "
        "over seeds (one seed: the value); the lowest in bold.",
    ]
    if any(s.stat("optimal_gap").ok for s in summaries):
        notes.append("**Optimal gap**: mean over sampled training batches and layers of "
                     "(S_opt − S)/S_opt, S the summed routing scores of the chosen experts and "
                     "S_opt that of the exact balanced optimum; negative: more score than any "
                     "balanced routing can take, i.e. unbalanced.")
    blocks.append(Bullets(notes))
    blocks.append(Heading(3, "Cost"))
    blocks.append(cost_table(summaries))
    cost_notes = ["**Train time**: wall time of the training steps; **Tokens/s**: training "
                  "tokens per second; **Router share**: time in the gate and router as a "
                  "share of the step."]
    sims = [r["sim"] for s in summaries for r in s.ok_runs if r.get("sim")]
    if sims:
        sim = sims[0]
        cost_notes.append(
            f"**Sim. MoE layer**: each run's recorded routing replayed with `moebal simulate` "
            f"in the MicroMoE setting ({sim.get('gpus', '?')} GPUs, EP {sim.get('ep', '?')}, "
            f"scheduling group {sim.get('sched_group', '?')}): MoE-layer time with standard "
            "expert parallelism and with LP token scheduling (simulated, not measured).")
    withheld = timing_withheld(env)
    if withheld:
        cost_notes.append(f"**Timings withheld**: {withheld}")
    blocks.append(Bullets(cost_notes))
    failed = [(s, r) for s in every for r in s.failed_runs]
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
    claims = check_claims(every, env, int(cfg.get("world_size") or 1))
    blocks.append(Bullets([_claim_item(c) for c in claims]))
    blocks.append(Para(
        "Verdicts: **supported** / **contradicted** — the 95% interval of the paired "
        "difference over the shared seeds lies on the claim's side of zero / on the other "
        "side; **inconclusive** — one seed, or the interval spans zero; **not testable here** "
        "— the paper's effect is below the run's minimum detectable effect (MDE, 80% power), "
        "or the claim needs hardware or numbers this run lacks. With one seed no claim is "
        f"supported or contradicted. A batch is *balanced* when its MaxVio ≤ {BALANCED_MAXVIO}; "
        f"*far lower* MaxVio_global means at most {FAR_LOWER_RATIO}× the other's. These "
        "verdicts concern this model, corpus and budget, far smaller than the papers'."
    ))

    sweeps = sweep_results(results, every)
    if sweeps:
        blocks.append(Heading(2, "Sweep: best by validation vs the paper's setting"))
        blocks.append(sweep_table(sweeps))
        blocks.append(Bullets(sweep_lines(sweeps)))
        blocks.append(Para(
            "The best point is chosen on the validation set that also scores it, so its "
            "advantage over the paper's setting is optimistic (biased in its favour)."
        ))

    blocks.append(Heading(2, "Plots"))
    for name, (_, caption) in PLOTS.items():
        if name in plots:
            blocks.append(Image(f"{PLOTS_DIR}/{name}", caption, plots[name]))

    blocks.append(Heading(2, "Methods and their settings"))
    blocks.append(methods_table(every))
    if cfg.get("model") or cfg.get("train"):
        blocks.append(Heading(2, "Configuration"))
        blocks.append(Code(json.dumps(
            {"model": cfg.get("model", {}), "train": cfg.get("train", {})}, indent=1, sort_keys=True
        )))
    if env:
        blocks.append(Heading(2, "Environment"))
        blocks.append(Bullets([f"{k}: {v}" for k, v in env.items()]))
    blocks.append(Para("Regenerate this report with `moebal report RUN_DIR`."))
    return blocks


def make_plots(results: dict) -> dict[str, bytes]:
    """The PNG of every plot that has something to show, by file name (sweep points left
    out: the sweep section tabulates them)."""
    summaries = [s for s in summarize(results) if s.setting != "sweep"]
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
