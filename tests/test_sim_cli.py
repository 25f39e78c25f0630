"""`moebal simulate`: tables, JSON, plots, traces, sweep, calibration, validation, bad input."""

import json

import numpy as np
import pytest

from moebal.cli import main
from moebal.sim.trace import generate_trace, save_trace

SMALL = ["--gpus", "8", "--experts", "16", "--steps", "3", "--layers", "1", "--tokens-per-gpu", "256",
         "--no-progress", "--sched-time-ms", "0.5", "--rebalance-every", "2"]


def run_json(capsys, args):
    assert main(["simulate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_synthetic_run_json_and_files(tmp_path, capsys):
    out = run_json(capsys, SMALL + ["--out", str(tmp_path)])
    (run,) = out["runs"]
    systems = [r["system"] for r in run["summary"]]
    assert systems == ["plain_ep", "standard", "eplb", "lp_standard", "lp_symmetric", "lp_asymmetric", "ideal"]
    ep = next(r for r in run["summary"] if r["system"] == "plain_ep")
    assert ep["speedup_vs_plain_ep"] == pytest.approx(1.0)
    lp = next(r for r in run["summary"] if r["system"] == "lp_symmetric")
    assert lp["sched_ms"] == pytest.approx(0.5)
    assert json.loads((tmp_path / "results.json").read_text())["runs"][0]["summary"] == run["summary"]
    for png in ("relative.png", "imbalance.png", "moved.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_table_output(tmp_path, capsys):
    assert main(["simulate", *SMALL, "--out", str(tmp_path), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "lp_asymmetric" in text and "vs std" in text and "8 GPUs, 16 experts" in text


def test_traces_are_replayed_each_on_its_own(tmp_path, capsys):
    for name, exponent in (("flat", 0.0), ("skewed", 1.5)):
        tr = generate_trace("zipf", steps=4, layers=2, shards=2, experts=16, tokens_per_shard=64, top_k=2, exponent=exponent)
        save_trace(tmp_path / f"{name}.npz", tr)
    out = run_json(capsys, ["--trace", str(tmp_path / "flat.npz"), str(tmp_path / "skewed.npz"), "--gpus", "8",
                            "--tokens-per-gpu", "0", "--no-progress", "--no-plots", "--out", str(tmp_path / "o"),
                            "--systems", "standard,lp_symmetric,ideal", "--sched-time-ms", "0"])
    flat, skewed = out["runs"]
    assert flat["label"] == "flat" and skewed["label"] == "skewed"
    assert flat["micro_batches"] == 1  # 4 steps x 2 shards = 8 source vectors = 1 micro-batch of 8
    imb = {r["label"]: next(s for s in r["summary"] if s["system"] == "standard")["imbalance_mean"] for r in out["runs"]}
    assert imb["skewed"] > imb["flat"]


def test_sweep(tmp_path, capsys):
    out = run_json(capsys, ["--sweep", "--sweep-gpus", "8,16", "--sweep-experts", "16,24", "--steps", "1", "--layers", "1",
                            "--tokens-per-gpu", "128", "--no-progress", "--out", str(tmp_path),
                            "--systems", "plain_ep,standard,lp_symmetric", "--sched-time-ms", "0"])
    configs = {(r["gpus"], r["experts"]) for r in out["sweep"]}
    assert configs == {(8, 16), (16, 16), (8, 24), (16, 24)}
    assert (tmp_path / "sweep.png").exists()
    plain = {(r["gpus"], r["experts"]) for r in out["sweep"] if r["system"] == "plain_ep"}
    assert plain == {(8, 16), (16, 16), (8, 24)}  # 24 experts do not divide over 16 GPUs


def test_calibration_from_measured_records(tmp_path, capsys):
    phi = 18 * 4096 * 14336
    rows = [{"tokens": t, "seconds": 1e-4 + t * phi / 400e12} for t in (1024, 2048, 4096, 8192)]
    (tmp_path / "cal.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = run_json(capsys, SMALL + ["--out", str(tmp_path), "--no-plots", "--calibrate", str(tmp_path / "cal.jsonl"),
                                    "--systems", "standard"])
    assert out["cost"]["rate_tflops"] == pytest.approx(400, rel=1e-6)
    assert out["notes"]["calibrated_overhead_us"] == pytest.approx(100, rel=1e-6)


def test_validate_option(tmp_path, capsys):
    recs = []
    rng = np.random.default_rng(0)
    for step in range(6):
        for rank in range(2):
            n, s, r = (int(v) for v in rng.integers(100, 1000, 3))
            t = 18 * 4096 * 14336 * n / 1e12
            comm = 2e-5 + max(s, r) * 8192 / 10e9
            recs.append(dict(step=step, rank=rank, tokens_computed=n, tokens_sent=s, tokens_received=r,
                             t_dispatch=comm, t_compute=t, t_combine=comm))
    (tmp_path / "run.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    out = run_json(capsys, ["--validate", str(tmp_path / "run.jsonl")])
    assert out["mape"]["t_compute"] < 1e-6 and out["step_mape"] < 1e-6


@pytest.mark.parametrize(
    "args, match",
    [
        (["--gpus", "30"], "multiple of sched_group"),
        (["--experts", "30"], "divisible by ep_size"),
        (["--steps", "0"], "--steps"),
        (["--trace", "/nonexistent.npz"], "not found"),
        (["--calibrate", "/nonexistent.json"], "not found"),
        (["--synthetic", "uniform", "--experts", "48", "--tokens-per-gpu", "100"], "divisible"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, args, match):
    assert main(["simulate", "--no-progress", "--no-plots", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moebal: error:") and match in err
    assert not (tmp_path / "results.json").exists()


def test_bad_trace_shape(tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", counts=np.zeros((3, 4)))
    assert main(["simulate", "--trace", str(tmp_path / "bad.npz"), "--no-progress", "--out", str(tmp_path)]) == 2
    assert "steps, layers" in capsys.readouterr().err
