"""Routing traces: loading the training format, synthetic generators, micro-batches."""

import json

import numpy as np
import pytest

from moebal.sim.trace import (
    Trace,
    generate_trace,
    load_trace,
    microbatches,
    rescale_rows,
    save_trace,
    zipf_popularity,
)


def test_round_trip(tmp_path):
    tr = generate_trace("zipf", steps=3, layers=2, shards=4, experts=8, tokens_per_shard=16, top_k=2)
    save_trace(tmp_path / "t.npz", tr)
    back = load_trace(tmp_path / "t.npz")
    np.testing.assert_array_equal(back.counts_SLRE, tr.counts_SLRE)
    assert back.top_k == 2 and back.meta["generator"] == "zipf"
    assert not list(tmp_path.glob(".trace-*"))  # no temp file left


def test_loads_training_format_with_and_without_shards(tmp_path):
    c4 = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    np.savez(tmp_path / "a.npz", counts=c4, top_k=np.int64(2), meta=json.dumps({"preset": "tiny"}))
    a = load_trace(tmp_path / "a.npz")
    assert a.counts_SLRE.shape == (2, 3, 4, 5) and a.top_k == 2 and a.meta["preset"] == "tiny"
    np.savez(tmp_path / "b.npz", counts=c4.sum(2))
    b = load_trace(tmp_path / "b.npz", top_k=3)
    assert b.counts_SLRE.shape == (2, 3, 1, 5) and b.top_k == 3
    np.testing.assert_array_equal(b.loads_SLE(), a.loads_SLE())


@pytest.mark.parametrize(
    "counts, match",
    [
        (np.zeros((2, 3)), "steps, layers"),
        (np.zeros((1, 2, 3, 4, 5)), "steps, layers"),
        (-np.ones((2, 2, 2, 2)), "non-negative"),
        (np.full((2, 2, 2), 0.5), "whole numbers"),
        (np.zeros((0, 2, 2, 2)), "empty"),
    ],
)
def test_inconsistent_traces_are_rejected(tmp_path, counts, match):
    np.savez(tmp_path / "bad.npz", counts=counts)
    with pytest.raises(ValueError, match=match):
        load_trace(tmp_path / "bad.npz")


def test_missing_or_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_trace(tmp_path / "nope.npz")
    np.savez(tmp_path / "x.npz", loads=np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="no 'counts'"):
        load_trace(tmp_path / "x.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        load_trace(tmp_path / "junk.npz")


def test_zipf_popularity_is_capped_and_ordered():
    p = zipf_popularity(16, 2.0, top_k=2)
    assert p.sum() == pytest.approx(1.0)
    assert p.max() <= 0.5 + 1e-12
    assert np.all(np.diff(p) <= 1e-15)
    np.testing.assert_allclose(zipf_popularity(8, 0.0), np.full(8, 1 / 8))


def test_generators_totals_and_shapes():
    for kind in ("zipf", "drift", "burst", "uniform"):
        tr = generate_trace(kind, steps=4, layers=2, shards=3, experts=8, tokens_per_shard=32, top_k=2, seed=1)
        assert tr.counts_SLRE.shape == (4, 2, 3, 8)
        assert np.all(tr.counts_SLRE.sum(-1) == 64)
    u = generate_trace("uniform", steps=2, layers=1, shards=2, experts=8, tokens_per_shard=32, top_k=2)
    assert np.all(u.counts_SLRE == 8)


def test_skew_grows_with_the_exponent_and_drift_moves_the_hot_expert():
    def hottest_share(exponent):
        tr = generate_trace("zipf", steps=2, layers=1, shards=8, experts=32, tokens_per_shard=4096, exponent=exponent)
        loads = tr.loads_SLE()
        return (loads.max(-1) / loads.sum(-1)).mean()

    assert hottest_share(0.0) < hottest_share(1.0) < hottest_share(2.0)
    tr = generate_trace("drift", steps=6, layers=1, shards=8, experts=32, tokens_per_shard=4096, exponent=1.5, drift=3)
    hot = tr.loads_SLE()[:, 0].argmax(-1)
    assert len(set(hot.tolist())) == 6
    assert np.all((hot[1:] - hot[:-1]) % 32 == 3)


def test_generators_are_deterministic_for_a_seed():
    a = generate_trace("burst", steps=3, layers=2, shards=2, experts=8, seed=7)
    b = generate_trace("burst", steps=3, layers=2, shards=2, experts=8, seed=7)
    np.testing.assert_array_equal(a.counts_SLRE, b.counts_SLRE)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="gauss"), "unknown trace generator"),
        (dict(experts=0), "experts"),
        (dict(top_k=9, experts=8), "top_k"),
        (dict(kind="uniform", experts=7, tokens_per_shard=10), "divisible"),
        (dict(exponent=-1.0), "exponent"),
    ],
)
def test_bad_generator_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_trace(**kwargs)


def test_microbatches_group_shard_vectors_in_order():
    counts = np.arange(3 * 2 * 4 * 5).reshape(3, 2, 4, 5)  # 3 steps, 2 layers, 4 shards
    tr = Trace(counts, top_k=1)
    mb = microbatches(tr, 2)
    assert mb.shape == (6, 2, 2, 5)  # 12 shard vectors per layer -> 6 micro-batches of 2
    np.testing.assert_array_equal(mb[0, 1, 1], counts[0, 1, 1])
    np.testing.assert_array_equal(mb[2, 0, 0], counts[1, 0, 0])
    np.testing.assert_array_equal(microbatches(tr, 4)[1, 0], counts[1, 0])
    with pytest.raises(ValueError, match="fewer than one"):
        microbatches(tr, 13)
    pooled = microbatches(tr, 2, pool=3)  # 12 vectors -> 4 sources -> 2 micro-batches
    assert pooled.shape == (2, 2, 2, 5)
    np.testing.assert_array_equal(pooled[0, 1, 1], counts[0, 1, 3] + counts[1, 1, 0] + counts[1, 1, 1])
    with pytest.raises(ValueError, match="pool"):
        microbatches(tr, 2, pool=0)


def test_rescale_keeps_totals_and_proportions():
    rows = np.array([[1, 1, 2], [0, 0, 0], [5, 0, 0]])
    out = rescale_rows(rows, 10)
    assert np.all(out.sum(1) == 10)
    np.testing.assert_array_equal(out[2], [10, 0, 0])
    assert abs(out[0, 2] - 5) <= 1 and out[1].tolist() in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    tr = Trace(np.ones((2, 1, 2, 4), int), top_k=2)
    assert np.all(microbatches(tr, 2, tokens_per_gpu=8).sum(-1) == 16)


def test_reads_the_training_runs_trace_format(tmp_path):
    """The layout `moebal train --trace` writes (docs/traces.md): scalar metadata arrays."""
    counts = np.random.default_rng(0).integers(0, 50, (5, 4, 8, 8)).astype(np.int32)
    np.savez_compressed(
        tmp_path / "trace.npz",
        format_version=np.asarray(1), counts=counts, step=np.arange(1, 6),
        num_experts=np.asarray(8), top_k=np.asarray(2), tokens_per_shard=np.asarray(256),
        seq_len=np.asarray(128), sequences_per_shard=np.asarray(2), moe_layers=np.arange(4),
        balancer=np.asarray("loss_free"), preset=np.asarray("tiny"),
        capacity_factor=np.asarray(float("nan")),
    )
    tr = load_trace(tmp_path / "trace.npz")
    assert tr.counts_SLRE.shape == (5, 4, 8, 8) and tr.counts_SLRE.dtype == np.int64
    assert tr.top_k == 2 and tr.meta["balancer"] == "loss_free" and tr.meta["preset"] == "tiny"
    assert tr.meta["tokens_per_shard"] == 256
