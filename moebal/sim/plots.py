"""PNG plots of simulation results (matplotlib, Agg backend, files written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from moebal.fileio import atomic_write

COLORS = {
    "plain_ep": "#7f7f7f",
    "standard": "#1f77b4",
    "eplb": "#ff7f0e",
    "lp_standard": "#2ca02c",
    "lp_symmetric": "#d62728",
    "lp_asymmetric": "#9467bd",
    "ideal": "#000000",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    try:
        return atomic_write(path, lambda f: fig.savefig(f, dpi=110, bbox_inches="tight", format="png"))
    except OSError as exc:
        raise ValueError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc


def plot_run(runs: Sequence[dict], out_dir: Path) -> list[Path]:
    """Plots of one or more runs (each ``{"label", "summary", "series"}`` as the CLI builds
    them): relative throughput and step time, per-micro-batch GPU imbalance, tokens moved."""
    plt = _plt()
    out_dir = Path(out_dir)
    paths = []
    for name, draw in (("relative.png", _relative), ("imbalance.png", _imbalance), ("moved.png", _moved)):
        fig = draw(plt, runs)
        paths.append(_save(fig, out_dir / name))
        plt.close(fig)
    return paths


def _relative(plt, runs: Sequence[dict]):
    """Throughput and step time relative to plain EP (standard where plain EP cannot run)."""
    n = len(runs)
    fig, axes = plt.subplots(2, n, figsize=(max(6, 4.5 * n), 6.5), squeeze=False)
    for i, run in enumerate(runs):
        rows = run["summary"]
        ref = "plain_ep" if any(r["system"] == "plain_ep" for r in rows) else "standard"
        key = "speedup_vs_" + ref
        names = [r["system"] for r in rows]
        thr = [r[key] or np.nan for r in rows]
        step = [1.0 / r[key] if r[key] else np.nan for r in rows]
        cols = [COLORS.get(s, "#333333") for s in names]
        for ax, vals, what in ((axes[0, i], thr, "throughput"), (axes[1, i], step, "step time")):
            ax.bar(range(len(names)), vals, color=cols)
            ax.axhline(1.0, color="k", lw=0.8, ls=":")
            if what == "step time":
                ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
            else:
                ax.set_xticks(range(len(names)), [""] * len(names))
            ax.set_ylabel(f"{what} / {ref}")
            for x, v in enumerate(vals):
                if np.isfinite(v):
                    ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        axes[0, i].set_title(run["label"], fontsize=9)
    fig.suptitle("MoE layers: throughput and step time relative to the baseline")
    return fig


def _imbalance(plt, runs: Sequence[dict]):
    """GPU load imbalance (max/mean computed assignments) per micro-batch and layer."""
    n = len(runs)
    fig, axes = plt.subplots(1, n, figsize=(max(6, 5 * n), 3.8), squeeze=False)
    for i, run in enumerate(runs):
        ax = axes[0, i]
        for name, s in run["series"].items():
            imb = np.asarray(s["imbalance_ML"]).ravel()
            ax.plot(np.arange(imb.size), imb, label=name, color=COLORS.get(name), lw=1.2)
        ax.set_xlabel("micro-batch x layer")
        ax.set_ylabel("GPU load max / mean")
        ax.set_title(run["label"], fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("GPU load imbalance per micro-batch")
    return fig


def _moved(plt, runs: Sequence[dict]):
    """Tokens moved (sent to another GPU) and across nodes, as a share of all assignments."""
    n = len(runs)
    fig, axes = plt.subplots(1, n, figsize=(max(6, 4.5 * n), 3.8), squeeze=False)
    for i, run in enumerate(runs):
        ax = axes[0, i]
        rows = run["summary"]
        names = [r["system"] for r in rows]
        x = np.arange(len(names))
        ax.bar(x - 0.2, [100 * r["moved_frac"] for r in rows], 0.4, label="sent to another GPU")
        ax.bar(x + 0.2, [100 * r["inter_node_frac"] for r in rows], 0.4, label="across nodes")
        ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("% of token-expert assignments")
        ax.set_title(run["label"], fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Tokens moved")
    return fig


def plot_sweep(rows: Sequence[dict], out_dir: Path, name: str = "sweep.png") -> Path:
    """Throughput relative to the standard placement against the GPU count, one panel per
    expert count (rows: flat dicts with gpus, experts, system, speedup_vs_standard)."""
    plt = _plt()
    experts = sorted({r["experts"] for r in rows})
    fig, axes = plt.subplots(1, len(experts), figsize=(4.5 * len(experts), 3.8), squeeze=False)
    for i, e in enumerate(experts):
        ax = axes[0, i]
        for system in COLORS:
            pts = sorted((r["gpus"], r["speedup_vs_standard"]) for r in rows
                         if r["experts"] == e and r["system"] == system and r["speedup_vs_standard"])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=system, color=COLORS[system])
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
        ax.set_xlabel("GPUs")
        ax.set_ylabel("throughput / standard")
        ax.set_title(f"{e} experts", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Throughput of the MoE layers relative to the standard placement")
    path = _save(fig, Path(out_dir) / name)
    plt.close(fig)
    return path
