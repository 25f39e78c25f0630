"""`moebal bench schedule`: runs, agrees with HiGHS, reads routing traces."""

import json

import numpy as np
import pytest

from moebal.bench.schedule import load_trace
from moebal.cli import main

QUICK = ["--instances", "1", "--repeats", "1", "--highs-repeats", "1", "--no-locality"]


def test_bench_json_rows_agree_with_highs(capsys):
    assert main(["bench", "schedule", "--json", "--sizes", "8x64", *QUICK]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["rows"]) == 6  # 2 replica counts x 3 Zipf exponents
    for row in out["rows"]:
        assert row["makespan_equal"] == "1/1"
        assert row["vs_balance"] >= 1.0 and row["ours_ms"] > 0 and row["highs_ms"] > 0


@pytest.mark.parametrize("shards", [None, 4])
def test_trace_shapes_are_accepted(tmp_path, capsys, shards):
    rng = np.random.default_rng(0)
    shape = (3, 2, 16) if shards is None else (3, 2, shards, 16)
    path = tmp_path / "trace.npz"
    np.savez(path, counts=rng.integers(0, 50, size=shape))
    loads = load_trace(str(path))
    assert loads.shape == (6, 16)
    args = ["bench", "schedule", "--json", "--trace", str(path), "--sizes", "8x16", *QUICK]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert {r["loads"] for r in rows} == {"trace"}
    assert all(r["makespan_equal"] == "1/1" for r in rows)


def test_bad_trace_and_sizes_are_reported(tmp_path, capsys):
    path = tmp_path / "bad.npz"
    np.savez(path, other=np.zeros((2, 2, 4), dtype=np.int64))
    assert main(["bench", "schedule", "--trace", str(path), *QUICK]) == 2
    assert "no array `counts`" in capsys.readouterr().err
    np.savez(path, counts=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="integer array"):
        load_trace(str(path))
    assert main(["bench", "schedule", "--sizes", "8by64", *QUICK]) == 2
    assert "GPUSxEXPERTS" in capsys.readouterr().err


_BENCH_JSON = """
import argparse, sys
from moebal.bench.schedule import add_arguments, run
parser = argparse.ArgumentParser()
add_arguments(parser)
sys.exit(run(parser.parse_args(sys.argv[1:])))
"""


def test_json_on_stdout_is_only_json():
    """HiGHS prints a banner when a process builds its first solver: it must not land on stdout."""
    import subprocess
    import sys

    args = ["--json", "--sizes", "8x16", *QUICK]
    done = subprocess.run([sys.executable, "-c", _BENCH_JSON, *args], capture_output=True,
                          text=True, check=True, timeout=120)
    assert len(json.loads(done.stdout)["rows"]) == 6
