"""The sweep of a comparison: a small grid per balancer, its best-by-validation setting
against the paper's setting.

``config.sweep`` of ``results.json`` names, per swept balancer, the option varied, its
values and the variant at the paper's setting; the grid's points are variants of setting
"sweep". The best point is the one with the lowest mean validation perplexity (the paper's
setting competing too); it is compared with the paper's setting over the shared seeds.
Choosing the best on the validation set that also scores it flatters the best: the
difference overstates what tuning gains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from moebal.report.results import MethodSummary
from moebal.report.stats import Paired, paired_difference


@dataclass
class SweepResult:
    """One swept balancer: its points (option value, summary), the paper's setting, the best
    point and the paired difference best − paper of validation perplexity (None when either
    is missing or they are the same variant)."""

    balancer: str
    option: str
    points: list[tuple[Any, MethodSummary]]
    paper: Optional[MethodSummary]
    best: Optional[MethodSummary]
    paired: Optional[Paired]


def _value(summary: MethodSummary, option: str) -> Any:
    return summary.options.get(option, "–")


def sweep_results(results: dict, summaries: list[MethodSummary]) -> list[SweepResult]:
    """The :class:`SweepResult` of every balancer in ``config.sweep`` that has a point run,
    plus one per balancer whose "sweep" variants no grid names (option "?")."""
    by = {s.method: s for s in summaries}
    grids = dict(results["config"].get("sweep") or {})
    for s in summaries:
        if s.setting == "sweep" and s.balancer not in grids:
            grids[s.balancer] = {"option": "?", "values": [], "paper": s.balancer}
    out = []
    for balancer, grid in grids.items():
        option = grid["option"]
        points = [s for s in summaries if s.setting == "sweep" and s.balancer == balancer]
        if not points:
            continue
        paper = by.get(grid.get("paper") or "")
        ranked = [s for s in points + ([paper] if paper else []) if s.stat("val_ppl").ok]
        best = min(ranked, key=lambda s: s.stat("val_ppl").mean) if ranked else None
        paired = None
        if best is not None and paper is not None and best is not paper:
            paired = paired_difference(best.by_seed("val_ppl"), paper.by_seed("val_ppl"))
        values = [(_value(s, option), s) for s in points]
        out.append(SweepResult(balancer, option, values, paper, best, paired))
    return out
