"""Comparing the cost model with measured per-rank times (the runtime's JSONL fields)."""

import json

import numpy as np
import pytest

from moebal.sim.cost import CostModel, Hardware, ModelShape
from moebal.sim.validate import REQUIRED, fit, predict, read_records, validate


def truth() -> CostModel:
    hw = Hardware(name="cpu", rate=2e10, compute_overhead_s=1e-3, intra_bw=2e9, bw_efficiency=1.0, latency_s=2e-4)
    return CostModel(hardware=hw, shape=ModelShape(d_model=64, ffn_hidden=128, top_k=2, bytes_per_elem=4), passes="fwd_bwd")


def synthetic_run(cost: CostModel, steps=20, ranks=4, noise=0.02, seed=0) -> list[dict]:
    """Records as the runtime would write them, with times from ``cost`` plus noise."""
    rng = np.random.default_rng(seed)
    recs = []
    for step in range(steps):
        for rank in range(ranks):
            r = {
                "step": step,
                "rank": rank,
                "tokens_computed": int(rng.integers(200, 3000)),
                "tokens_sent": int(rng.integers(0, 2000)),
                "tokens_received": int(rng.integers(0, 2000)),
                "n_alltoall": 2,
            }
            p = predict([{**r, "t_dispatch": 0, "t_compute": 0, "t_combine": 0}], cost)
            for key in ("t_dispatch", "t_compute", "t_combine"):
                r[key] = float(p[key][0]) * (1 + noise * rng.standard_normal())
            recs.append(r)
    return recs


def test_predict_equals_the_formulas():
    cost = truth()
    rec = dict(step=0, rank=0, tokens_computed=1000, tokens_sent=300, tokens_received=500,
               t_dispatch=0, t_compute=0, t_combine=0)
    p = predict([rec], cost)
    phi = 18 * 64 * 128
    assert p["t_compute"][0] == pytest.approx(3 * 1e-3 + 1000 * phi / 2e10)
    assert p["t_dispatch"][0] == pytest.approx(2e-4 + 500 * 64 * 4 / 2e9)
    assert p["t_combine"][0] == p["t_dispatch"][0]


def test_validate_recovers_the_constants_on_synthetic_measurements():
    cost = truth()
    recs = synthetic_run(cost)
    start = CostModel(shape=cost.shape, passes="fwd_bwd")  # H100 defaults: far off for a CPU
    out = validate(recs, start)
    assert out["fitted"]["rate_flops"] == pytest.approx(2e10, rel=0.05)
    assert out["fitted"]["intra_bw_effective"] == pytest.approx(2e9, rel=0.1)
    assert out["mape"]["t_compute"] < 5 and out["mape"]["t_dispatch"] < 5
    assert out["step_mape"] < 5
    assert out["steps_fit"] == 10 and out["steps_eval"] == 10
    # without refitting, the GPU defaults mispredict a CPU run by orders of magnitude
    assert validate(recs, start, refit=False)["mape"]["t_compute"] > 90


def test_read_records_jsonl_and_bad_input(tmp_path):
    recs = synthetic_run(truth(), steps=2, ranks=2)
    path = tmp_path / "run.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"step": 0, "loss": 3.0}] + recs) + "\n")
    assert len(read_records(path)) == 4
    nested = [{"step": s, "ranks": [{k: v for k, v in r.items() if k not in ("step", "rank")}
                                    for r in recs if r["step"] == s]} for s in (0, 1)]
    (tmp_path / "nested.jsonl").write_text("\n".join(json.dumps(r) for r in nested))
    assert read_records(tmp_path / "nested.jsonl") == recs
    (tmp_path / "empty.jsonl").write_text(json.dumps({"step": 0, "loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no records"):
        read_records(tmp_path / "empty.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"step": 0}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        read_records(tmp_path / "broken.jsonl")
    with pytest.raises(ValueError, match="not found"):
        read_records(tmp_path / "missing.jsonl")
    bad = dict(recs[0], tokens_sent=-1)
    with pytest.raises(ValueError, match="tokens_sent"):
        predict([bad], truth())
    with pytest.raises(ValueError, match="fit_fraction"):
        validate(recs, truth(), fit_fraction=1.0)
    with pytest.raises(ValueError, match="single-node"):
        fit([dict(recs[0], tokens_sent_inter=1)], truth())
    assert set(REQUIRED) <= set(recs[0])


def test_scheduling_time_is_taken_out_of_the_dispatch_and_charged_as_measured():
    cost = truth()
    recs = synthetic_run(cost)
    rng = np.random.default_rng(1)
    for r in recs:
        r["t_schedule"] = float(rng.uniform(0.0, 0.02))  # planning dwarfs the all-to-all
        r["t_dispatch"] += r["t_schedule"]
    start = CostModel(shape=cost.shape, passes="fwd_bwd")
    out = validate(recs, start)
    assert out["fitted"]["intra_bw_effective"] == pytest.approx(2e9, rel=0.1)
    assert out["fitted"]["bw_resolved"] is True
    assert out["mape"]["t_dispatch"] < 5 and out["mape"]["t_alltoall"] < 5 and out["step_mape"] < 5
    p = predict(recs[:1], cost)
    assert p["t_dispatch"][0] == pytest.approx(p["t_combine"][0] + recs[0]["t_schedule"])
    with pytest.raises(ValueError, match="t_schedule"):
        predict([dict(recs[0], t_schedule=recs[0]["t_dispatch"] + 1)], cost)


def test_a_bandwidth_the_times_do_not_show_is_not_claimed_as_fitted():
    recs = synthetic_run(truth(), noise=0.0)
    for r in recs:  # all-to-all time independent of the volume
        r["t_dispatch"] = r["t_combine"] = 0.05
    start = CostModel(shape=truth().shape, passes="fwd_bwd")
    out = validate(recs, start)
    assert out["fitted"]["bw_resolved"] is False
    assert out["fitted"]["intra_bw_effective"] == start.hardware.intra_bw * start.hardware.bw_efficiency
    # the latency absorbs the mean (the kept link adds well under 1% of it), per all-to-all
    assert out["fitted"]["latency_s"] == pytest.approx(0.05 / 2, rel=0.01)
    assert out["mape"]["t_combine"] < 1


def test_a_real_gloo_run_validates_end_to_end():
    """Per-rank records of `moebal train --nproc 4 --preset tiny --steps 30 --ep-size 2
    --placement symmetric --schedule lp` on a 2-core CPU (gloo), stored as written."""
    from pathlib import Path

    path = Path(__file__).parent / "data" / "parallel_tiny_symmetric_lp.jsonl"
    recs = read_records(path)
    assert len(recs) == 120 and {r["rank"] for r in recs} == {0, 1, 2, 3}
    tiny = CostModel(shape=ModelShape(d_model=128, ffn_hidden=128, top_k=2, bytes_per_elem=4), passes="fwd")
    out = validate(recs, tiny)
    assert out["steps_fit"] == 15 and out["steps_eval"] == 15
    assert 1e9 < out["fitted"]["rate_flops"] < 1e13  # a CPU rate, nowhere near the H100 default
    for table in (out["mape"], out["baseline_mape"]):
        assert all(np.isfinite(v) and v >= 0 for v in table.values())
    # the H100 defaults predict this CPU run's compute time wrong by orders of magnitude
    assert validate(recs, tiny, refit=False)["mape"]["t_compute"] > 99
