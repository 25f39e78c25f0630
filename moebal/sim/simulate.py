"""Replay micro-batches on a modelled cluster under every balancing system.

``simulate(mb_MLGE, cluster, cost)`` takes micro-batches [M steps, L layers, G GPUs (sources),
E experts] of token-expert assignments and returns, per system, the time of every step, the
GPU load imbalance and the tokens moved of every (step, layer). A step is one micro-batch on
every GPU, forward and backward through the L MoE layers (``CostModel.passes``), ending with
the data-parallel gradient synchronisation: its time is the slowest scheduling group's sum of
layer times (groups do not wait for one another inside a step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from moebal.sim.cost import CostModel, min_sends
from moebal.sim.systems import SYSTEMS, Cluster, make_system


@dataclass
class SystemResult:
    """Per-system series: ``step_time_M`` seconds; per (step, layer): ``imbalance_ML``
    (max/mean assignments computed over all GPUs), ``moved_ML`` (assignments sent to another
    GPU), ``inter_node_ML`` (of which across nodes), ``layer_time_ML`` (slowest group) and
    ``sched_ML`` (scheduling time charged, slowest group)."""

    name: str
    step_time_M: np.ndarray
    layer_time_ML: np.ndarray
    imbalance_ML: np.ndarray
    moved_ML: np.ndarray
    inter_node_ML: np.ndarray
    sched_ML: np.ndarray
    solve_seconds: list = field(default_factory=list)


@dataclass
class SimResult:
    cluster: Cluster
    cost: CostModel
    top_k: int
    tokens_M: np.ndarray  # tokens (not assignments) of each step over the cluster
    systems: dict  # name -> SystemResult
    skipped: dict  # name -> reason

    @property
    def num_layers(self) -> int:
        return next(iter(self.systems.values())).layer_time_ML.shape[1]

    def summary(self) -> list[dict]:
        """One row per system: mean step time, throughput, gains, imbalance, tokens moved."""
        rows = []
        total_tokens = float(self.tokens_M.sum())
        assignments = total_tokens * self.top_k * self.num_layers
        base = {}
        for ref in ("plain_ep", "standard"):
            if ref in self.systems:
                base[ref] = float(self.systems[ref].step_time_M.sum())
        for name, r in self.systems.items():
            t = float(r.step_time_M.sum())
            row = {
                "system": name,
                "step_ms": 1e3 * t / len(r.step_time_M),
                "tokens_per_s": total_tokens / t if t > 0 else float("inf"),
                "speedup_vs_plain_ep": base["plain_ep"] / t if "plain_ep" in base else None,
                "speedup_vs_standard": base["standard"] / t if "standard" in base else None,
                "imbalance_mean": float(r.imbalance_ML.mean()),
                "imbalance_max": float(r.imbalance_ML.max()),
                "moved_frac": float(r.moved_ML.sum()) / assignments,
                "inter_node_frac": float(r.inter_node_ML.sum()) / assignments,
                "sched_ms": 1e3 * float(r.sched_ML.mean()),
            }
            rows.append(row)
        return rows


def _validate_microbatches(mb_MLGE: np.ndarray, cluster: Cluster) -> np.ndarray:
    arr = np.asarray(mb_MLGE)
    if arr.ndim != 4:
        raise ValueError(f"micro-batches must be [steps, layers, gpus, experts], got shape {arr.shape}")
    M, L, G, E = arr.shape
    if G != cluster.num_gpus:
        raise ValueError(f"micro-batches have {G} sources but the cluster has {cluster.num_gpus} GPUs")
    if E != cluster.num_experts:
        raise ValueError(f"micro-batches have {E} experts but the cluster has {cluster.num_experts}")
    if 0 in arr.shape:
        raise ValueError(f"micro-batches must not be empty, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError("micro-batch counts must be whole numbers")
    if np.any(arr < 0):
        raise ValueError("micro-batch counts must be non-negative")
    return arr.astype(np.int64)


def simulate(
    mb_MLGE: np.ndarray,
    cluster: Cluster,
    cost: CostModel,
    systems: Sequence[str] = SYSTEMS,
    *,
    top_k: int = 2,
    rebalance_every: int = 10,
    seed: int = 0,
    sched_time_s: Optional[float] = None,
    history_MLGE: Optional[np.ndarray] = None,
    progress: bool = False,
) -> SimResult:
    """Run every system in ``systems`` on the same micro-batches (see the module doc).

    ``mb_MLGE``: int [M steps, L layers, G sources, E experts]. ``sched_time_s``: charge this
    many seconds per layer for LP scheduling instead of the measured solve time of
    ``moebal.schedule``. ``history_MLGE``: earlier micro-batches (same shape but for the step
    count) that are not timed: the re-placing systems (eplb, lp_asymmetric) see their loads
    as history, as if the run had been going on, so that the timed steps start from a
    placement built from loads rather than from the cold start. Systems the cluster cannot
    run (plain EP with experts that do not divide over the GPUs) are listed in ``skipped``
    with the reason.
    """
    mb = _validate_microbatches(mb_MLGE, cluster)
    if not isinstance(cost, CostModel):
        raise TypeError(f"cost must be a CostModel, got {cost!r}")
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise ValueError(f"unknown systems {unknown or systems!r}; choose from {SYSTEMS}")
    if sched_time_s is not None and (not np.isfinite(sched_time_s) or sched_time_s < 0):
        raise ValueError(f"sched_time_s must be >= 0, got {sched_time_s!r}")
    M, L, G, E = mb.shape
    hist = np.zeros((0, L, G, E), dtype=np.int64)
    if history_MLGE is not None:
        hist = _validate_microbatches(history_MLGE, cluster) if len(history_MLGE) else hist
        if hist.shape[1:] != mb.shape[1:]:
            raise ValueError(f"history shape {hist.shape} does not match micro-batches {mb.shape}")
    tokens_M = mb.sum(axis=(1, 2, 3))[:] / L / top_k
    attn_s = cost.attention_time(float(mb.sum()) / (M * L * G * top_k))

    runners, skipped = {}, {}
    for name in systems:
        if name == "ideal":
            continue
        reason = cluster.supports(name)
        if reason:
            skipped[name] = reason
            continue
        runners[name] = make_system(
            name, cluster, rebalance_every=rebalance_every, seed=seed, sched_time_s=sched_time_s
        )
    for runner in runners.values():  # the untimed history, as if the run had been going on
        for h in range(hist.shape[0]):
            _observe(runner, hist[h])

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=M * L * max(1, len(runners)), desc="simulate", unit="layer", leave=False)
    try:
        results = {name: _replay(name, runner, mb, hist.shape[0], cost, attn_s, bar)
                   for name, runner in runners.items()}
    finally:
        if bar is not None:
            bar.close()
    if "ideal" in systems:
        results["ideal"] = _ideal(mb, cluster, cost, attn_s)
    return SimResult(cluster, cost, top_k, tokens_M, results, skipped)


def _observe(runner, loads_LGE: np.ndarray) -> None:
    """Give a re-placing system one step's loads of every layer, summed per scheduling group."""
    if hasattr(runner, "observe"):
        L, G, E = loads_LGE.shape
        gs = runner.group_size
        for layer in range(L):
            runner.observe(layer, loads_LGE[layer].reshape(G // gs, gs, E).sum(1))


def _replay(name: str, runner, mb: np.ndarray, first_step: int, cost: CostModel, attn_s: float,
            bar) -> SystemResult:
    """One system over every step and layer: each scheduling group is timed on its own, a
    layer takes its slowest group, a step the slowest group's sum over the layers."""
    M, L, G, E = mb.shape
    gs = runner.group_size
    node_G = np.arange(G) // cost.gpus_per_node
    s = {k: np.zeros((M, L)) for k in ("layer", "imb", "moved", "inter", "sched")}
    step_M = np.zeros(M)
    for m in range(M):
        group_time = np.zeros(G // gs)
        for layer in range(L):
            tokens_G = np.zeros(G)
            worst_t = worst_sched = 0.0
            moved = inter = 0
            for k in range(G // gs):
                ids = np.arange(k * gs, (k + 1) * gs)
                a = runner.assign(k, layer, first_step + m, mb[m, layer, k * gs : (k + 1) * gs])
                t = cost.layer_time(a.tokens_G, a.flow_GG, a.sched_s, gpu_ids=ids)["time"] + attn_s
                group_time[k] += t
                worst_t = max(worst_t, t)
                worst_sched = max(worst_sched, a.sched_s)
                tokens_G[ids] = a.tokens_G
                moved += a.flow_GG.sum() - np.trace(a.flow_GG)
                same = node_G[ids][:, None] == node_G[ids][None, :]
                inter += a.flow_GG[~same].sum()
            if hasattr(runner, "observe"):
                runner.observe(layer, mb[m, layer].reshape(G // gs, gs, E).sum(1))
            mean = tokens_G.mean()
            s["imb"][m, layer] = tokens_G.max() / mean if mean > 0 else 1.0
            s["layer"][m, layer] = worst_t
            s["sched"][m, layer] = worst_sched
            s["moved"][m, layer] = moved
            s["inter"][m, layer] = inter
            if bar is not None:
                bar.update(1)
        step_M[m] = group_time.max()
    return SystemResult(name, step_M, s["layer"], s["imb"], s["moved"], s["inter"], s["sched"],
                        list(getattr(runner, "solve_seconds", [])))


def _ideal(mb: np.ndarray, cluster: Cluster, cost: CostModel, attn_s: float) -> SystemResult:
    """The lower bound of every (step, layer): ``CostModel.ideal_layer_time``."""
    M, L, G, _ = mb.shape
    lay = np.zeros((M, L))
    moved = np.zeros((M, L))
    for m in range(M):
        for layer in range(L):
            lay[m, layer] = cost.ideal_layer_time(mb[m, layer], cluster.slots_per_gpu, G) + attn_s
            moved[m, layer] = min_sends(mb[m, layer], cluster.slots_per_gpu).sum()
    return SystemResult("ideal", lay.sum(1), lay, np.ones((M, L)), moved, np.zeros((M, L)),
                        np.zeros((M, L)))
