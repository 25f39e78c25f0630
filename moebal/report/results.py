"""The ``results.json`` of a comparison run folder: its schema, checks and aggregates.

A comparison trains one model under several balancers and seeds. Its run folder holds::

    results.json             this file's schema (below)
    report.md, report.html   written by :func:`moebal.report.write_report`
    plots/*.png
    runs/<method>/seed<k>/   one training run each (a moebal.train.RunDir + run.json)

``results.json`` is self-contained: the report is regenerated from it alone, so a run
folder can be copied elsewhere (or only its ``results.json``) and ``moebal report`` rerun::

    {
      "schema": "moebal.compare.results/2",
      "command": "moebal compare --preset tiny",      # how it was made
      "created_at": "...", "updated_at": "...",      # ISO 8601, UTC
      "config": {                                    # what makes two runs comparable
        "preset": "tiny", "steps": 300, "seeds": [0],
        "balancers": ["none", "aux_loss", ...],      # in report order
        "balancer_options": {"aux_loss": {"aux_loss_coeff": 0.01}, ...},
        "variants": {                                # optional: the methods run, by name
          "bip_paper": {"balancer": "bip", "options": {...},   # every routing option
                        "setting": "paper" | "moebal" | "sweep",
                        "label": "BIP (paper)", "why": "...",
                        "in_batch": true},           # routes a batch with that batch's
        },                                           #   own information
        "sweep": {"aux_loss": {"option": "aux_loss_coeff",     # optional: grids run
                               "values": [...], "paper": "aux_loss"}},
        "world_size": 1,                             # optional: devices per run (1)
        "model": {...}, "train": {...},              # ModelConfig / TrainConfig as dicts
        "data": "...", "device": "cpu"
      },
      "environment": {"torch": "...", "device_name": "...", "threads": 2,
                      "device_count": 1,             # optional
                      "gpu_other_processes": [...],  # optional: other processes on the GPU
                      ...},
      "runs": [                                      # one per method x seed
        {
          "method": "aux_loss", "seed": 0,           # method: a variant's name
          "balancer": "aux_loss",                    # optional: the variant's balancer
          "status": "ok" | "failed",
          "failure": null | {"step": 123, "reason": "training loss is nan (diverged)",
                             "kind": "diverged" | "error"},   # diverged: for good
          "steps": 300,                              # optimizer steps completed
          "tokens": 1228800,                         # training tokens seen
          "val_loss": 5.1, "val_ppl": 164.0,         # as in TrainResult (/1: final_val_*)
          "max_vio_global": 0.31,                    # at the last evaluation
          "avg_max_vio": 0.42, "sup_max_vio": 2.1,   # over all training steps
          "max_vio_batch_first": 2.1, "max_vio_batch_last": 0.3,
          "sup_max_vio_layers": 2.9,                 # optional: max over steps and layers
          "max_vio_global_layers": 0.5,              # optional: max over layers, last eval
          "optimal_gap": 0.01,                       # optional: mean (S_opt - S) / S_opt
          "optimal_gap_samples": 40,                 #   over sampled batches and layers
          "sim": {"gpus": 32, "ep": 4, "sched_group": 8,        # optional: the routing
                  "standard_ep_ms": 9.1, "lp_ms": 7.2,          #   trace replayed by
                  "lp_speedup": 1.26} | null,                   #   moebal simulate
          "train_seconds": 58.0,                     # the training steps (/1: train_time_s)
          "wall_seconds": 61.0,                      # with evaluations and checkpoints
          "tokens_per_s": 20150.0,
          "router_time_share": 0.04,                 # router seconds / step seconds
          "dropped_frac": 0.0,                       # token-slots dropped by capacity
          "series": {
            "step": [...], "loss": [...], "max_vio_batch": [...],   # per training step
            "eval_step": [...], "val_ppl": [...], "eval_max_vio_global": [...]
          },
          "load_snapshots": [{"step": 1, "loads_LE": [[...], ...]}, ...],
          "run_dir": "runs/aux_loss/seed0"
        }
      ]
    }

Numbers that were not measured (a failed run's perplexity, say) are ``null``. Every
field marked optional may be absent (files written before it existed): without
``config.variants`` each method is its own variant (setting "moebal", its
``balancer_options``), in-batch when it is ``bip`` in paper order, ``sinkhorn`` or
``optimal``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from moebal.report.methods import (
    METHOD_LABELS,
    METHOD_ORDER,
    Variant,
    method_label,
    ordered_methods,
    routes_in_batch,
    validate_variants,
    variants_of,
)

__all__ = ["METHOD_LABELS", "METHOD_ORDER", "RESULTS_FILE", "RUN_METRICS", "SCHEMA",
           "SIM_METRICS", "MethodSummary", "Stat", "Variant", "load_results", "method_label",
           "missing_runs", "ordered_methods", "run_value", "summarize", "upgrade_results",
           "validate_results", "variants_of"]

SCHEMA = "moebal.compare.results/2"
# results.json of schema /1 named four numbers differently from TrainResult; they are read
# (and upgraded) under the names used everywhere since.
RENAMED_IN_2 = {"final_val_loss": "val_loss", "final_val_ppl": "val_ppl",
                "train_time_s": "train_seconds", "wall_time_s": "wall_seconds"}
OLD_SCHEMAS = ("moebal.compare.results/1",)
RESULTS_FILE = "results.json"

STATUSES = ("ok", "failed")

# the per-run numbers the report aggregates over seeds
RUN_METRICS = (
    "val_loss",
    "val_ppl",
    "max_vio_global",
    "avg_max_vio",
    "sup_max_vio",
    "max_vio_batch_first",
    "max_vio_batch_last",
    "train_seconds",
    "wall_seconds",
    "tokens_per_s",
    "router_time_share",
    "dropped_frac",
    "sup_max_vio_layers",
    "max_vio_global_layers",
    "optimal_gap",
)
# the numbers of a run's "sim" object, aggregated as "sim_<name>"
SIM_METRICS = ("standard_ep_ms", "lp_ms", "lp_speedup")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def upgrade_results(results: dict) -> dict:
    """A results dict of an older schema in the current one (the same numbers)."""
    if results.get("schema") not in OLD_SCHEMAS:
        return results
    runs = [{RENAMED_IN_2.get(k, k): v for k, v in run.items()} if isinstance(run, dict)
            else run for run in results.get("runs") or []]
    return {**results, "schema": SCHEMA, "runs": runs}


def validate_results(results: Any) -> dict:
    """Check the structure of a results dict (an older schema is upgraded first); raise
    ValueError naming what is wrong."""
    if not isinstance(results, dict):
        raise ValueError(f"results must be a JSON object, got {type(results).__name__}")
    results = upgrade_results(results)
    if results.get("schema") != SCHEMA:
        raise ValueError(
            f"results schema is {results.get('schema')!r}, this moebal reads {SCHEMA!r}"
        )
    config = results.get("config")
    if not isinstance(config, dict):
        raise ValueError("results has no 'config' object")
    for key in ("balancers", "seeds"):
        if not isinstance(config.get(key), list):
            raise ValueError(f"results config.{key} must be a list, got {config.get(key)!r}")
    validate_variants(config)
    env = results.get("environment")
    if env is not None and not isinstance(env, dict):
        raise ValueError(f"results environment must be an object, got {type(env).__name__}")
    others = (env or {}).get("gpu_other_processes")
    if others is not None and not isinstance(others, list):
        raise ValueError(f"results environment.gpu_other_processes must be a list, got {others!r}")
    runs = results.get("runs")
    if not isinstance(runs, list):
        raise ValueError("results has no 'runs' list")
    seen = set()
    for i, run in enumerate(runs):
        where = f"runs[{i}]"
        if not isinstance(run, dict):
            raise ValueError(f"{where} must be an object, got {type(run).__name__}")
        method, seed = run.get("method"), run.get("seed")
        if not isinstance(method, str) or not method:
            raise ValueError(f"{where}.method must be a balancer name, got {method!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"{where}.seed must be an int, got {seed!r}")
        if (method, seed) in seen:
            raise ValueError(f"{where}: method {method!r} seed {seed} appears twice")
        seen.add((method, seed))
        if run.get("status") not in STATUSES:
            raise ValueError(f"{where}.status must be one of {STATUSES}, got {run.get('status')!r}")
        if run["status"] == "failed":
            failure = run.get("failure")
            if not isinstance(failure, dict) or "step" not in failure or "reason" not in failure:
                raise ValueError(f"{where} failed but has no failure {{step, reason}}")
        for key in RUN_METRICS:
            value = run.get(key)
            if value is not None and not _is_number(value):
                raise ValueError(f"{where}.{key} must be a number or null, got {value!r}")
        samples = run.get("optimal_gap_samples")
        if samples is not None and (not isinstance(samples, int) or isinstance(samples, bool)):
            raise ValueError(f"{where}.optimal_gap_samples must be an int or null, got {samples!r}")
        sim = run.get("sim")
        if sim is not None:
            if not isinstance(sim, dict):
                raise ValueError(f"{where}.sim must be an object or null, got {sim!r}")
            for key in SIM_METRICS:
                if sim.get(key) is not None and not _is_number(sim[key]):
                    raise ValueError(f"{where}.sim.{key} must be a number or null, got {sim[key]!r}")
        series = run.get("series", {})
        if not isinstance(series, dict):
            raise ValueError(f"{where}.series must be an object")
        for a, b in (("step", "max_vio_batch"), ("step", "loss"), ("eval_step", "val_ppl")):
            if b in series and len(series[b]) != len(series.get(a, [])):
                raise ValueError(
                    f"{where}.series.{b} has {len(series[b])} values but {a} has "
                    f"{len(series.get(a, []))}"
                )
        for j, snap in enumerate(run.get("load_snapshots", [])):
            loads = snap.get("loads_LE") if isinstance(snap, dict) else None
            if not isinstance(loads, list) or not loads or not isinstance(loads[0], list):
                raise ValueError(f"{where}.load_snapshots[{j}].loads_LE must be a [layers][experts] list")
    return results


def load_results(path: Union[str, Path]) -> dict:
    """Read and check ``results.json`` from a run folder (or the file itself)."""
    path = Path(path)
    file = path / RESULTS_FILE if path.is_dir() else path
    if not file.exists():
        raise ValueError(f"no {RESULTS_FILE} in {str(path)!r}: not a comparison run folder")
    try:
        results = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(file)!r} is not valid JSON: {exc}") from None
    return validate_results(results)


@dataclass
class Stat:
    """Mean and sample standard deviation of one number over seeds."""

    mean: float
    std: float  # NaN with fewer than two values
    n: int

    @classmethod
    def of(cls, values: Sequence[Optional[float]]) -> "Stat":
        arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
        if arr.size == 0:
            return cls(float("nan"), float("nan"), 0)
        std = float(arr.std(ddof=1)) if arr.size > 1 else float("nan")
        return cls(float(arr.mean()), std, int(arr.size))

    @property
    def ok(self) -> bool:
        return self.n > 0


@dataclass
class MethodSummary:
    """One method's runs over all seeds, with each metric aggregated over its ok runs."""

    method: str
    options: dict
    runs: list[dict]
    stats: dict[str, Stat] = field(default_factory=dict)
    variant: Optional[Variant] = None

    @property
    def ok_runs(self) -> list[dict]:
        return [r for r in self.runs if r["status"] == "ok"]

    @property
    def failed_runs(self) -> list[dict]:
        return [r for r in self.runs if r["status"] == "failed"]

    @property
    def label(self) -> str:
        return self.variant.label if self.variant and self.variant.label else method_label(self.method)

    @property
    def balancer(self) -> str:
        return self.variant.balancer if self.variant else self.method

    @property
    def setting(self) -> str:
        return self.variant.setting if self.variant else "moebal"

    @property
    def in_batch(self) -> bool:
        return self.variant.in_batch if self.variant else routes_in_batch(self.method, self.options)

    def stat(self, key: str) -> Stat:
        return self.stats[key]

    def by_seed(self, key: str) -> dict[int, Optional[float]]:
        """seed -> the number ``key`` of each ok run (a stats key, "sim_*" included)."""
        return {r["seed"]: run_value(r, key) for r in self.ok_runs}


def run_value(run: dict, key: str) -> Optional[float]:
    """A run's number ``key``: a field of the run, or ``sim_<name>`` of its "sim" object."""
    if key.startswith("sim_"):
        sim = run.get("sim") or {}
        value = sim.get(key[len("sim_"):])
    else:
        value = run.get(key)
    return float(value) if _is_number(value) else None


def summarize(results: dict) -> list[MethodSummary]:
    """One :class:`MethodSummary` per method that has at least one run."""
    variants = variants_of(results)
    keys = RUN_METRICS + tuple(f"sim_{k}" for k in SIM_METRICS)
    out = []
    for method in ordered_methods(results):
        runs = sorted((r for r in results["runs"] if r["method"] == method), key=lambda r: r["seed"])
        if not runs:
            continue
        variant = variants[method]
        summary = MethodSummary(method, dict(variant.options), runs, variant=variant)
        ok = summary.ok_runs
        summary.stats = {key: Stat.of([run_value(r, key) for r in ok]) for key in keys}
        out.append(summary)
    return out


def missing_runs(results: dict) -> list[tuple[str, int]]:
    """(method, seed) pairs the config asks for (its variants, else its balancers) that have
    no run yet."""
    have = {(r["method"], r["seed"]) for r in results["runs"]}
    cfg = results["config"]
    return [
        (m, s)
        for m in (list(cfg.get("variants") or {}) or cfg["balancers"])
        for s in results["config"]["seeds"]
        if (m, s) not in have
    ]
