"""One trace class and one file format for training (writes) and the simulator (reads)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moebal.trace import RoutingTrace, load_trace, save_trace

DOC_TRACES = sorted(Path(__file__).parent.parent.glob("docs/results/simulation/traces/*/trace.npz"))


def test_training_and_the_simulator_share_the_class_and_the_functions():
    import moebal.sim.trace as sim
    import moebal.train as train

    assert sim.Trace is train.RoutingTrace is RoutingTrace
    assert sim.load_trace is train.load_trace is load_trace
    assert sim.save_trace is train.save_trace is save_trace


@pytest.mark.parametrize("path", DOC_TRACES, ids=lambda p: p.parent.name)
def test_the_published_traces_still_load(path):
    trace = load_trace(path)
    assert trace.counts_PLRE.shape == (80, 4, 8, 8) and trace.top_k == 2
    assert trace.balancer == path.parent.name.split("-", 1)[1] and trace.preset == "tiny"
    assert np.isnan(trace.capacity_factor)  # dropless: every slot counted
    assert (trace.counts_PLRE.sum(axis=3) == trace.tokens_per_shard * trace.top_k).all()
    assert np.array_equal(trace.step, np.arange(1, 81))


def test_a_generated_trace_round_trips_with_its_metadata(tmp_path):
    from moebal.sim.trace import generate_trace

    trace = generate_trace("burst", steps=3, layers=2, shards=4, experts=8, tokens_per_shard=16,
                           top_k=2, seed=3)
    back = load_trace(save_trace(tmp_path / "t.npz", trace))
    assert np.array_equal(back.counts_PLRE, trace.counts_PLRE)
    assert back.meta["generator"] == "burst" and back.meta["hot_experts"] == 4
    assert back.tokens_per_shard == 16 and back.seq_len is None and back.balancer == ""
    with pytest.warns(DeprecationWarning, match="save_trace"):
        save_trace(trace, tmp_path / "old-order.npz")
    assert np.array_equal(load_trace(tmp_path / "old-order.npz").counts_PLRE, trace.counts_PLRE)


def test_bad_fields_are_named():
    counts = np.ones((2, 1, 1, 4), int)
    with pytest.raises(ValueError, match="num_experts=5"):
        RoutingTrace(counts, num_experts=5)
    with pytest.raises(ValueError, match="step has 3 entries"):
        RoutingTrace(counts, step=[1, 2, 3])
    with pytest.raises(TypeError, match="unknown trace fields"):
        RoutingTrace(counts, shards=1)
    with pytest.raises(ValueError, match="top_k"):
        RoutingTrace(counts, top_k=0)
    with pytest.raises(TypeError, match="needs a RoutingTrace"):
        save_trace("x.npz", counts)


def test_the_simulator_reads_traces_without_torch():
    code = "import sys, moebal.sim, moebal.trace; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
