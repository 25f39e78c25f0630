"""Compare the cost model's predictions with measured per-rank times of a real run.

The distributed runtime writes, per step and per rank, one JSON record (in the run's JSONL;
other records without these fields are ignored)::

    {"step": 12, "rank": 3,
     "tokens_computed": 8192,      # token-expert assignments computed on this rank
     "tokens_sent": 6144,          # assignments this rank sent to other ranks (dispatch)
     "tokens_received": 6400,      # assignments it received from other ranks (dispatch)
     "t_dispatch": 0.0031, "t_compute": 0.0120, "t_combine": 0.0029,    # seconds
     # optional:
     "tokens_sent_inter": 0, "tokens_received_inter": 0,   # the part crossing nodes
     "n_alltoall": 4,               # all-to-all calls the times cover (default 1)
     "t_schedule": 0.0008}          # seconds of planning inside t_dispatch (default 0)

A record may instead hold one step with a list of per-rank dicts: ``{"step": 12, "ranks":
[{...rank 0 fields...}, {...}]}``. The times of one record cover whatever its token counts
cover (e.g. all MoE layers and micro-batches of the step, forward only: then validate with
``passes="fwd"``). ``validate`` fits the model's free constants (compute rate and
overhead, link bandwidth and latency) on the first ``fit_fraction`` of the steps, predicts
the rest, and reports the error of each quantity and of each step's slowest rank.

As in the simulator's layer time (``sched + dispatch``), planning is not part of the
all-to-all: a record's ``t_schedule`` is taken out of ``t_dispatch`` before the link is
fitted and added back, as measured, to the predicted ``t_dispatch`` (the simulator's
``--sched-time-ms``). When the all-to-all times do not grow with the volume (no positive
slope), the bandwidth cannot be resolved: it keeps the given value, only the latency is
fitted, and ``fitted["bw_resolved"]`` is False.

``read_calibration`` reads the simpler (tokens, seconds) records that ``moebal simulate
--calibrate`` fits the compute rate to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Union

import numpy as np

from moebal.sim.cost import CostModel, calibrate

REQUIRED = ("step", "rank", "tokens_computed", "tokens_sent", "tokens_received",
            "t_dispatch", "t_compute", "t_combine")


def read_records(path: Union[str, Path]) -> list[dict]:
    """Records with every field of ``REQUIRED`` from a JSONL (or JSON list) file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"measurement file not found: {str(path)!r}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read measurement file {str(path)!r}: {exc}") from exc
    try:
        items = json.loads(text)
        if isinstance(items, dict):
            items = [items]
    except json.JSONDecodeError:
        items = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{str(path)!r} line {i + 1} is not JSON: {exc}") from exc
    flat = []
    for r in items:
        if isinstance(r, dict) and isinstance(r.get("ranks"), list) and "step" in r:
            # one record per step with a list of per-rank dicts: rank = position in the list
            for i, per_rank in enumerate(r["ranks"]):
                if isinstance(per_rank, dict):
                    flat.append({"step": r["step"], "rank": i, **per_rank})
        else:
            flat.append(r)
    records = [r for r in flat if isinstance(r, dict) and all(k in r for k in REQUIRED)]
    if not records:
        raise ValueError(f"{str(path)!r} has no records with the fields {REQUIRED}")
    return records


def read_calibration(
    path: Union[str, Path], d_model: int, ffn_hidden: int, passes: str
) -> tuple[list[float], list[float]]:
    """(tokens, seconds) pairs from JSON/JSONL records: tokens in ``tokens_computed`` or
    ``tokens`` or ``T``; seconds in ``t_compute`` or ``seconds`` or ``fwd_bwd_s``/``fwd_s``
    (by ``passes``). Records carrying ``D``/``F`` of another shape are skipped; a JSON object
    with a ``rows`` list is read as its rows."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"calibration file not found: {str(path)!r}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read calibration file {str(path)!r}: {exc}") from exc
    try:
        data = json.loads(text)
        items = data.get("rows", [data]) if isinstance(data, dict) else data
    except json.JSONDecodeError:
        try:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(f"calibration file {str(path)!r} is neither JSON nor JSONL: {exc}") from exc
    tokens, secs = [], []
    for r in items:
        if not isinstance(r, dict):
            continue
        if ("D" in r and r["D"] != d_model) or ("F" in r and r["F"] != ffn_hidden):
            continue
        t = next((r[k] for k in ("tokens_computed", "tokens", "T") if k in r), None)
        s = next((r[k] for k in ("t_compute", "seconds", f"{passes}_s") if k in r), None)
        if t is not None and s is not None:
            tokens.append(float(t))
            secs.append(float(s))
    if len(tokens) < 2:
        raise ValueError(
            f"calibration file {str(path)!r} has {len(tokens)} usable (tokens, seconds) records"
            f" for D={d_model}, F={ffn_hidden}; need at least 2"
        )
    return tokens, secs


def _arrays(records: Iterable[dict]) -> dict:
    recs = list(records)
    out = {}
    for key in REQUIRED + ("tokens_sent_inter", "tokens_received_inter", "n_alltoall", "t_schedule"):
        default = 1.0 if key == "n_alltoall" else 0.0
        try:
            out[key] = np.array([float(r.get(key, default)) for r in recs])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"field {key!r} must be numeric: {exc}") from exc
        if not np.all(np.isfinite(out[key])) or np.any(out[key] < 0):
            raise ValueError(f"field {key!r} must be finite and non-negative")
    if np.any(out["tokens_sent_inter"] > out["tokens_sent"]) or np.any(
        out["tokens_received_inter"] > out["tokens_received"]
    ):
        raise ValueError("tokens_sent_inter/received_inter exceed tokens_sent/received")
    if np.any(out["t_schedule"] > out["t_dispatch"]):
        raise ValueError("t_schedule exceeds t_dispatch (planning is a part of the dispatch)")
    return out


def predict(records: Iterable[dict], cost: CostModel) -> dict:
    """Predicted ``t_compute``, ``t_dispatch``, ``t_combine`` of every record (seconds).

    compute = c0 + n * phi / R with phi of ``cost.passes``; one all-to-all =
    alpha + max(max(S, R)^intra * b / B_intra, max(S, R)^inter * b / B_inter), times the
    record's ``n_alltoall`` for the latency; the combine moves the same volumes reversed.
    The predicted ``t_dispatch`` adds the record's measured ``t_schedule`` (default 0)."""
    a = _arrays(records)
    hw = cost.hardware
    b = cost.bytes_per_token
    compute = cost.compute_time(a["tokens_computed"])
    s_out, r_out = a["tokens_sent_inter"], a["tokens_received_inter"]
    s_in, r_in = a["tokens_sent"] - s_out, a["tokens_received"] - r_out
    vol_in = np.maximum(s_in, r_in) * b / (hw.intra_bw * hw.bw_efficiency)
    vol_out = np.maximum(s_out, r_out) * b / (hw.inter_bw * hw.bw_efficiency)
    one = a["n_alltoall"] * hw.latency_s + np.maximum(vol_in, vol_out)
    return {"t_compute": compute, "t_dispatch": one + a["t_schedule"], "t_combine": one}


def fit(records: Iterable[dict], cost: CostModel) -> CostModel:
    """The cost model with rate/overhead fitted on (tokens_computed, t_compute) and the
    intra-node bandwidth/latency on (max(sent, received), mean of t_dispatch and t_combine);
    records are assumed to stay within one node (as on one machine with gloo)."""
    a = _arrays(records)
    if np.any(a["tokens_sent_inter"] > 0) or np.any(a["tokens_received_inter"] > 0):
        raise ValueError("fit() handles single-node runs only (records have inter-node tokens)")
    phi = cost.hardware.rate * cost.seconds_per_token
    rate, c0 = calibrate(a["tokens_computed"], a["t_compute"], phi)
    c0 /= cost.compute_multiplier
    vol = np.maximum(a["tokens_sent"], a["tokens_received"]) * cost.bytes_per_token
    t_comm = 0.5 * ((a["t_dispatch"] - a["t_schedule"]) + a["t_combine"])
    n = a["n_alltoall"]
    hw = cost.hardware
    if np.ptp(vol) > 0:
        slope, icpt = np.polyfit(vol, t_comm, 1)
    else:
        slope, icpt = (float(t_comm.mean() / vol.mean()) if vol.mean() > 0 else 0.0), 0.0
    if slope > 0:
        hw = hw.replace(intra_bw=1.0 / (slope * hw.bw_efficiency))
    else:  # time does not grow with volume: keep the bandwidth, fit the latency alone
        icpt = float(np.mean(t_comm - vol / (hw.intra_bw * hw.bw_efficiency)))
    latency = max(0.0, float(icpt) / float(n.mean()))
    hw = hw.replace(rate=rate, compute_overhead_s=c0, latency_s=latency)
    return cost.replace(hardware=hw)


def _bw_resolved(records: list[dict], cost: CostModel) -> bool:
    """Whether :func:`fit` found the all-to-all time growing with the volume."""
    a = _arrays(records)
    vol = np.maximum(a["tokens_sent"], a["tokens_received"]) * cost.bytes_per_token
    t_comm = 0.5 * ((a["t_dispatch"] - a["t_schedule"]) + a["t_combine"])
    if np.ptp(vol) > 0:
        return bool(np.polyfit(vol, t_comm, 1)[0] > 0)
    return bool(vol.mean() > 0 and t_comm.mean() > 0)


def validate(records: list[dict], cost: CostModel, fit_fraction: float = 0.5, refit: bool = True) -> dict:
    """Fit on the first ``fit_fraction`` of the steps (when ``refit``), predict the rest.

    Returns ``{"fitted": {...constants}, "mape": {field: mean abs % error},
    "step_mape": error of each step's slowest rank (dispatch + compute + combine),
    "baseline_mape": the same errors of predicting every record by the mean of the fitted
    steps (the model must beat it to explain anything), "steps_fit": n, "steps_eval": n}``.
    ``mape["t_alltoall"]`` is the two all-to-alls alone: dispatch without ``t_schedule``
    plus combine.
    """
    if not 0 < fit_fraction < 1:
        raise ValueError(f"fit_fraction must be in (0, 1), got {fit_fraction!r}")
    steps = sorted({int(r["step"]) for r in records})
    if refit and len(steps) < 2:
        raise ValueError(f"need records of at least 2 steps to fit and evaluate, got {len(steps)}")
    cut = steps[max(1, int(len(steps) * fit_fraction)) - 1] if refit else -1
    train = [r for r in records if int(r["step"]) <= cut]
    test = [r for r in records if int(r["step"]) > cut] if refit else list(records)
    model = fit(train, cost) if refit else cost
    pred = predict(test, model)
    meas = _arrays(test)
    step_of = np.array([int(r["step"]) for r in test])
    base_src = _arrays(train) if refit else meas
    base = {k: np.full(len(test), base_src[k].mean()) for k in ("t_compute", "t_dispatch", "t_combine", "t_schedule")}

    def errors(p: dict) -> tuple[dict, float]:
        p = dict(p, t_alltoall=p["t_dispatch"] - meas["t_schedule"] + p["t_combine"])
        m_all = dict(meas, t_alltoall=meas["t_dispatch"] - meas["t_schedule"] + meas["t_combine"])
        out = {}
        for key in ("t_compute", "t_dispatch", "t_combine", "t_alltoall"):
            m = m_all[key]
            ok = m > 0
            out[key] = float(np.mean(np.abs(p[key][ok] - m[ok]) / m[ok])) * 100 if ok.any() else None
        tot_pred = p["t_dispatch"] + p["t_compute"] + p["t_combine"]
        tot_meas = meas["t_dispatch"] + meas["t_compute"] + meas["t_combine"]
        errs = [abs(tot_pred[step_of == s].max() - tot_meas[step_of == s].max()) / tot_meas[step_of == s].max()
                for s in np.unique(step_of)]
        return out, float(np.mean(errs)) * 100

    mape, step_mape = errors(pred)
    base_mape, base_step = errors({**base, "t_dispatch": base["t_dispatch"] - base["t_schedule"] + meas["t_schedule"]})
    hw = model.hardware
    return {
        "fitted": {
            "rate_flops": hw.rate,
            "compute_overhead_s": hw.compute_overhead_s,
            "intra_bw_effective": hw.intra_bw * hw.bw_efficiency,
            "latency_s": hw.latency_s,
            "bw_resolved": _bw_resolved(train, cost) if refit else None,
        },
        "mape": mape,
        "step_mape": step_mape,
        "baseline_mape": {**base_mape, "step": base_step},
        "steps_fit": len({int(r["step"]) for r in train}),
        "steps_eval": len(np.unique(step_of)),
    }
