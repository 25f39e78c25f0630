"""The comparison's plots as PNG bytes (matplotlib, Agg backend).

Each function takes the method summaries of :func:`moebal.report.results.summarize` and
returns the PNG as bytes, or None when the runs hold nothing to plot.
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np

from moebal.report.results import METHOD_ORDER, MethodSummary

DPI = 100


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


PALETTE = (
    "#7f7f7f",  # none
    "#d62728",  # aux_loss
    "#ff7f0e",  # seq_aux_loss
    "#8c564b",  # global_aux_loss
    "#1f77b4",  # loss_free
    "#2ca02c",  # bip
    "#9467bd",  # quantile
    "#e377c2",  # sinkhorn
    "#17becf",  # optimal
)
EXTRA = ("#bcbd22", "#393b79", "#637939", "#843c39", "#7b4173")


def method_color(method: str, balancer: Optional[str] = None) -> str:
    """A fixed colour per method, the same in every plot and every report.

    A balancer's own name gets its palette colour; another variant of a known ``balancer``
    a darker or lighter shade of it (fixed by the variant's name); anything else one of
    a few extra colours.
    """
    if method in METHOD_ORDER:
        return PALETTE[METHOD_ORDER.index(method)]
    key = sum(map(ord, method))
    if balancer in METHOD_ORDER:
        base = PALETTE[METHOD_ORDER.index(balancer)]
        rgb = [int(base[i:i + 2], 16) for i in (1, 3, 5)]
        factor = (0.55, 0.75, 1.35, 1.6)[key % 4]
        rgb = [min(255, int(c * factor)) if factor < 1 else int(c + (255 - c) * (factor - 1))
               for c in rgb]
        return "#" + "".join(f"{c:02x}" for c in rgb)
    return EXTRA[key % len(EXTRA)]


def _color(s: MethodSummary) -> str:
    return method_color(s.method, s.balancer)


def _png(fig) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    if window <= 1 or y.size < 2:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, y.size + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _mean_series(runs: list[dict], x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per x: mean, min and max of y over the runs that reach that x (failed runs included)."""
    table: dict[float, list[float]] = {}
    for run in runs:
        series = run.get("series", {})
        for x, y in zip(series.get(x_key, []), series.get(y_key, [])):
            if y is not None and np.isfinite(y):
                table.setdefault(x, []).append(float(y))
    if not table:
        empty = np.zeros(0)
        return empty, empty, empty, empty
    xs = np.array(sorted(table))
    ys = [np.asarray(table[x]) for x in xs]
    return xs, np.array([v.mean() for v in ys]), np.array([v.min() for v in ys]), np.array([v.max() for v in ys])


def plot_max_vio_batch(summaries: list[MethodSummary], floor: float = 1e-3) -> Optional[bytes]:
    """MaxVio_batch per training step per method (mean over seeds), log y.

    Thin lines: every step; thick lines: a moving average over ~2% of the steps.
    Values below ``floor`` (exact balance is 0) are drawn at the floor.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for s in summaries:
        xs, mean, _, _ = _mean_series(s.runs, "step", "max_vio_batch")
        if xs.size == 0:
            continue
        color = _color(s)
        y = np.maximum(mean, floor)
        ax.plot(xs, y, color=color, alpha=0.25, linewidth=0.8)
        window = max(1, xs.size // 50)
        ax.plot(xs, np.maximum(_smooth(mean, window), floor), color=color, linewidth=2, label=s.label)
        for run in s.failed_runs:
            ax.axvline(run["failure"]["step"], color=color, linestyle=":", linewidth=1)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("MaxVio_batch (mean over MoE layers)")
    ax.set_title("Load imbalance of each training batch")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _png(fig)


def plot_val_ppl(summaries: list[MethodSummary]) -> Optional[bytes]:
    """Left: validation perplexity at each evaluation (mean over seeds; band: min..max), log y.
    Right: the final perplexity of every seed (dots) and the mean over seeds (bar)."""
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    drawn = False
    for s in summaries:
        xs, mean, lo, hi = _mean_series(s.runs, "eval_step", "val_ppl")
        if xs.size == 0:
            continue
        color = _color(s)
        ax.plot(xs, mean, color=color, marker="o", markersize=3, linewidth=1.5, label=s.label)
        if len(s.runs) > 1:
            ax.fill_between(xs, lo, hi, color=color, alpha=0.15)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Validation perplexity during training")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)

    finals = [s for s in summaries if s.stat("val_ppl").ok]
    for i, s in enumerate(finals):
        color = _color(s)
        st = s.stat("val_ppl")
        ax2.barh(i, st.mean, color=color, alpha=0.35, height=0.6)
        values = [r["val_ppl"] for r in s.ok_runs if r.get("val_ppl") is not None]
        ax2.plot(values, [i] * len(values), "o", color=color, markersize=5)
        if st.n > 1 and np.isfinite(st.std):
            ax2.errorbar(st.mean, i, xerr=st.std, color="black", capsize=3, linewidth=1)
    if finals:
        lo = min(min(r["val_ppl"] for r in s.ok_runs if r.get("val_ppl") is not None) for s in finals)
        hi = max(max(r["val_ppl"] for r in s.ok_runs if r.get("val_ppl") is not None) for s in finals)
        pad = max(0.1 * (hi - lo), 0.01 * hi)
        ax2.set_xlim(lo - pad, hi + pad)
        ax2.set_yticks(range(len(finals)))
        ax2.set_yticklabels([s.label for s in finals], fontsize=8)
        ax2.invert_yaxis()
    ax2.set_xlabel("final validation perplexity")
    ax2.set_title("End of training (dots: seeds; bar: mean ± std)")
    ax2.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def snapshot_steps(summaries: list[MethodSummary], max_steps: int = 4) -> list[int]:
    """The snapshot steps common to the plotted runs, at most ``max_steps``, spread out."""
    sets = []
    for s in summaries:
        run = _heatmap_run(s)
        if run is not None:
            sets.append({snap["step"] for snap in run["load_snapshots"]})
    if not sets:
        return []
    common = sorted(set.intersection(*sets)) or sorted(set.union(*sets))
    if len(common) <= max_steps:
        return common
    idx = np.unique(np.linspace(0, len(common) - 1, max_steps).round().astype(int))
    return [common[i] for i in idx]


def _heatmap_run(s: MethodSummary) -> Optional[dict]:
    """The run whose load snapshots represent the method: its lowest-seed run that has any."""
    for run in sorted(s.runs, key=lambda r: (r["status"] != "ok", r["seed"])):
        if run.get("load_snapshots"):
            return run
    return None


def plot_load_heatmaps(summaries: list[MethodSummary], max_steps: int = 4) -> Optional[bytes]:
    """Per-layer expert loads (relative to the ideal load) at a few steps, one row per method."""
    plt = _plt()
    from matplotlib.colors import TwoSlopeNorm

    steps = snapshot_steps(summaries, max_steps)
    rows = [(s, _heatmap_run(s)) for s in summaries]
    rows = [(s, r) for s, r in rows if r is not None]
    if not steps or not rows:
        return None
    mats = {}
    vmax = 2.0
    for s, run in rows:
        by_step = {snap["step"]: np.asarray(snap["loads_LE"], dtype=float) for snap in run["load_snapshots"]}
        for step in steps:
            if step in by_step:
                m = by_step[step]
                mean = m.mean(axis=1, keepdims=True)
                rel = np.divide(m, mean, out=np.zeros_like(m), where=mean > 0)
                mats[(s.method, step)] = rel
                vmax = max(vmax, float(rel.max()))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    n_rows, n_cols = len(rows), len(steps)
    any_mat = next(iter(mats.values()))
    L, E = any_mat.shape
    cell_w = max(1.6, min(3.2, 0.16 * E))
    cell_h = max(0.6, min(2.0, 0.3 * L + 0.3))
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(cell_w * n_cols + 1.8, cell_h * n_rows + 0.8), squeeze=False,
        layout="constrained",
    )
    image = None
    for i, (s, run) in enumerate(rows):
        for j, step in enumerate(steps):
            ax = axes[i][j]
            mat = mats.get((s.method, step))
            if mat is None:
                ax.set_axis_off()
                continue
            image = ax.imshow(mat, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks(range(mat.shape[0]))
            ax.tick_params(labelsize=6)
            if i == 0:
                ax.set_title(f"step {step}", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{s.label}\nlayer", fontsize=8)
            if i == n_rows - 1:
                ax.set_xlabel("expert", fontsize=8)
    if image is not None:
        cbar = fig.colorbar(image, ax=axes, shrink=0.8)
        cbar.set_label("load / ideal load", fontsize=8)
    fig.suptitle("Tokens per expert, per MoE layer (blue: under-, red: over-loaded)", fontsize=10)
    return _png(fig)


def plot_router_overhead(summaries: list[MethodSummary]) -> Optional[bytes]:
    """Router time share of the step and training throughput per method (mean ± std)."""
    plt = _plt()
    ok = [s for s in summaries if s.stat("tokens_per_s").ok]
    if not ok:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = [s.label for s in ok]
    colors = [_color(s) for s in ok]
    x = np.arange(len(ok))

    def bars(ax, key, scale):
        means = [s.stat(key).mean * scale if s.stat(key).ok else 0.0 for s in ok]
        errs = [
            s.stat(key).std * scale if s.stat(key).n > 1 and np.isfinite(s.stat(key).std) else 0.0
            for s in ok
        ]
        ax.bar(x, means, yerr=errs, color=colors, capsize=3)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)

    bars(ax1, "router_time_share", 100.0)
    ax1.set_ylabel("router time, % of the training step")
    ax1.set_title("Router overhead")
    bars(ax2, "tokens_per_s", 1.0)
    ax2.set_ylabel("training tokens / s")
    ax2.set_title("Throughput")
    fig.tight_layout()
    return _png(fig)


PLOTS = {
    "max_vio_batch.png": (plot_max_vio_batch, "MaxVio_batch per training step (log scale)"),
    "val_ppl.png": (plot_val_ppl, "Validation perplexity per evaluation"),
    "load_heatmaps.png": (plot_load_heatmaps, "Per-layer expert loads at a few steps"),
    "router_overhead.png": (plot_router_overhead, "Router time share and throughput"),
}
