"""The simulated systems on hand-computable clusters, the ideal bound, and bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moebal.sim.cost import CostModel, Hardware, ModelShape
from moebal.sim.simulate import simulate
from moebal.sim.systems import SYSTEMS, Cluster, _even_split_flows, make_system
from moebal.sim.trace import generate_trace, microbatches


def unit_cost(**kw) -> CostModel:
    """1 s per computed assignment, 1 s per assignment sent within a node, 4 s across."""
    hw = Hardware(name="unit", rate=36.0, intra_bw=2.0, inter_bw=0.5, bw_efficiency=1.0, latency_s=0.0)
    shape = ModelShape(d_model=2, ffn_hidden=3, top_k=1, bytes_per_elem=1, seq_len=4)
    args = dict(hardware=hw, shape=shape, gpus_per_node=2, passes="fwd", sync="gpu")
    args.update(kw)
    return CostModel(**args)


def summary(result):
    return {r["system"]: r for r in result.summary()}


def test_two_gpus_one_expert_each_equals_the_formula():
    # expert 0 on GPU 0, expert 1 on GPU 1 (plain EP = standard with EP 2)
    mb = np.array([[[[3, 0], [1, 2]]]])  # 1 step, 1 layer, sources x experts
    res = simulate(mb, Cluster(2, 2, 2, 2), unit_cost(), ["plain_ep", "standard", "ideal"], top_k=1)
    # GPU 0 computes 4 and receives 1 (1 s each way): 1 + 4 + 1
    assert res.systems["plain_ep"].step_time_M[0] == pytest.approx(6.0)
    assert res.systems["standard"].step_time_M[0] == pytest.approx(6.0)
    assert res.systems["standard"].imbalance_ML[0, 0] == pytest.approx(4 / 3)
    assert res.systems["standard"].moved_ML[0, 0] == 1
    # ideal: 3 per GPU; each source keeps its heaviest expert: source 1 must send 1
    assert res.systems["ideal"].step_time_M[0] == pytest.approx(3 + 2 * 0.5)


def test_two_gpus_with_both_experts_lp_balances_at_a_communication_cost():
    # each GPU holds both experts (EP 1); source 0 routed 4 tokens to expert 0, source 1 two
    # tokens to expert 1
    mb = np.array([[[[4, 0], [0, 2]]]] * 2)  # 2 identical steps
    res = simulate(mb, Cluster(2, 2, 1, 2), unit_cost(), ["standard", "lp_symmetric", "ideal"],
                   top_k=1, sched_time_s=0.0)
    s = summary(res)
    # standard: everything stays local, GPU 0 computes 4: 0 + 4 + 0
    np.testing.assert_allclose(res.systems["standard"].step_time_M, [4.0, 4.0])
    # LP: GPU 0 sends 1 token to GPU 1: 1 + 3 + 1
    np.testing.assert_allclose(res.systems["lp_symmetric"].step_time_M, [5.0, 5.0])
    assert res.systems["lp_symmetric"].imbalance_ML.max() == pytest.approx(1.0)
    assert res.systems["lp_symmetric"].moved_ML.sum() == 2
    np.testing.assert_allclose(res.systems["ideal"].step_time_M, [3.0, 3.0])
    assert s["lp_symmetric"]["speedup_vs_standard"] == pytest.approx(4 / 5)
    # with free communication the LP wins by exactly the compute imbalance
    free = unit_cost(hardware=unit_cost().hardware.replace(intra_bw=1e12, inter_bw=1e12))
    res2 = simulate(mb, Cluster(2, 2, 1, 2), free, ["standard", "lp_symmetric"], top_k=1, sched_time_s=0.0)
    assert summary(res2)["lp_symmetric"]["speedup_vs_standard"] == pytest.approx(4 / 3, rel=1e-9)


def test_scheduling_time_is_charged_per_layer_and_overlap_hides_it():
    mb = np.array([[[[4, 0], [0, 2]]] * 3])  # 1 step, 3 layers
    res = simulate(mb, Cluster(2, 2, 1, 2), unit_cost(), ["lp_symmetric"], top_k=1, sched_time_s=0.5)
    assert res.systems["lp_symmetric"].step_time_M[0] == pytest.approx(3 * 5.5)
    res = simulate(mb, Cluster(2, 2, 1, 2), unit_cost(overlap=True), ["lp_symmetric"], top_k=1, sched_time_s=0.5)
    assert res.systems["lp_symmetric"].step_time_M[0] == pytest.approx(3 * 5.0)


def test_step_is_the_slowest_group():
    # 4 GPUs, scheduling groups of 2 (EP 2): group 0 gets all the work
    mb = np.zeros((1, 1, 4, 2), dtype=int)
    mb[0, 0, 0] = [2, 0]
    mb[0, 0, 2] = [1, 0]
    res = simulate(mb, Cluster(4, 2, 2, 2), unit_cost(gpus_per_node=4), ["standard"], top_k=1)
    assert res.systems["standard"].step_time_M[0] == pytest.approx(2.0)  # group 0: GPU 0, local
    assert res.systems["standard"].imbalance_ML[0, 0] == pytest.approx(2 / (3 / 4))


def test_perfectly_balanced_trace_gives_no_gain_from_scheduling():
    tr = generate_trace("uniform", steps=3, layers=2, shards=16, experts=32, tokens_per_shard=256, top_k=2)
    mb = microbatches(tr, 16)
    cost = CostModel(gpus_per_node=8)
    res = simulate(mb, Cluster(16, 32, 4, 8), cost, top_k=2, sched_time_s=0.0)
    s = summary(res)
    for name in ("standard", "lp_standard", "lp_symmetric", "lp_asymmetric"):
        assert res.systems[name].imbalance_ML.max() == pytest.approx(1.0)
        assert s[name]["speedup_vs_standard"] == pytest.approx(1.0, rel=1e-12), name
        assert s[name]["moved_frac"] == pytest.approx(0.75)  # 3 of 4 experts are elsewhere
    # the bound assumes both links could carry a GPU's traffic at once: barely lower here
    assert 1.0 <= s["ideal"]["speedup_vs_standard"] < 1.01
    # plain EP over 2 nodes sends most tokens across nodes: slower even when balanced
    assert s["plain_ep"]["speedup_vs_standard"] < 1


def test_lp_fixes_skew_that_the_standard_placement_cannot():
    tr = generate_trace("zipf", steps=4, layers=1, shards=8, experts=16, tokens_per_shard=512, top_k=2, exponent=1.2)
    res = simulate(microbatches(tr, 8), Cluster(8, 16, 4, 8), CostModel(), top_k=2, sched_time_s=0.0)
    s = summary(res)
    assert s["standard"]["imbalance_mean"] > 1.3
    assert s["lp_symmetric"]["imbalance_mean"] < s["standard"]["imbalance_mean"]
    assert s["lp_symmetric"]["speedup_vs_standard"] > 1.1
    # the standard placement's replica sets do not overlap: LP over it cannot fix expert skew
    assert s["lp_standard"]["imbalance_mean"] > 1.3


def test_eplb_rebalances_from_history():
    tr = generate_trace("zipf", steps=6, layers=1, shards=8, experts=16, tokens_per_shard=512, top_k=2, exponent=1.2)
    res = simulate(microbatches(tr, 8), Cluster(8, 16, 4, 8), CostModel(), ["standard", "eplb"],
                   top_k=2, rebalance_every=3)
    std, eplb = res.systems["standard"], res.systems["eplb"]
    np.testing.assert_allclose(eplb.step_time_M[:3], std.step_time_M[:3])  # no history yet
    assert eplb.imbalance_ML[3:].mean() < std.imbalance_ML[3:].mean()
    # untimed history: the first timed step already uses the re-placed experts
    mb = microbatches(tr, 8)
    warm = simulate(mb[3:], Cluster(8, 16, 4, 8), CostModel(), ["standard", "eplb"], top_k=2,
                    rebalance_every=3, history_MLGE=mb[:3])
    np.testing.assert_allclose(warm.systems["eplb"].step_time_M, eplb.step_time_M[3:])
    with pytest.raises(ValueError, match="history"):
        simulate(mb[3:], Cluster(8, 16, 4, 8), CostModel(), ["eplb"], history_MLGE=np.concatenate([mb[:3], mb[:3]], axis=1))


def test_even_split_conserves_tokens():
    rng = np.random.default_rng(0)
    loads = rng.integers(0, 30, (6, 10))
    hosts = rng.random((10, 6)) < 0.4
    hosts[np.arange(10), rng.integers(0, 6, 10)] = True
    x, flow = _even_split_flows(loads, hosts)
    assert (x.sum(1) == loads.sum(0)).all() and (flow.sum(1) == loads.sum(1)).all()
    assert (flow.sum(0) == x.sum(0)).all() and (x[~hosts] == 0).all()
    assert x.max() - x[hosts].min() >= 0


@settings(max_examples=8, deadline=None)
@given(
    st.sampled_from([(4, 8, 2, 4), (8, 16, 4, 8), (8, 8, 2, 4), (4, 4, 1, 2)]),
    st.floats(0.0, 2.0),
    st.integers(0, 10_000),
    st.sampled_from(["gpu", "stage"]),
    st.booleans(),
)
def test_ideal_bound_is_never_beaten(shape, exponent, seed, sync, overlap):
    G, E, ep, sg = shape
    tr = generate_trace("zipf", steps=3, layers=2, shards=G, experts=E, tokens_per_shard=64,
                        top_k=2, exponent=exponent, seed=seed)
    cost = CostModel(gpus_per_node=2, sync=sync, overlap=overlap, passes="fwd_bwd")
    res = simulate(microbatches(tr, G), Cluster(G, E, ep, sg), cost, top_k=2, rebalance_every=2, seed=seed)
    ideal = res.systems["ideal"].step_time_M
    for name, r in res.systems.items():
        assert np.all(r.step_time_M >= ideal * (1 - 1e-12)), name


@pytest.mark.parametrize(
    "args, match",
    [
        ((32, 64, 3, 6), "divisible by ep_size"),
        ((32, 64, 4, 6), "multiple of ep_size"),
        ((30, 64, 4, 8), "multiple of sched_group"),
        ((0, 64, 4, 8), "num_gpus"),
    ],
)
def test_clusters_the_placement_cannot_use(args, match):
    with pytest.raises(ValueError, match=match):
        Cluster(*args)


def test_bad_simulation_input():
    c = Cluster(8, 16, 4, 8)
    good = np.ones((1, 1, 8, 16), dtype=int)
    with pytest.raises(ValueError, match="sources"):
        simulate(np.ones((1, 1, 4, 16)), c, CostModel())
    with pytest.raises(ValueError, match="experts"):
        simulate(np.ones((1, 1, 8, 15)), c, CostModel())
    with pytest.raises(ValueError, match="non-negative"):
        simulate(-good, c, CostModel())
    with pytest.raises(ValueError, match="shape"):
        simulate(good[0], c, CostModel())
    with pytest.raises(ValueError, match="unknown systems"):
        simulate(good, c, CostModel(), ["megatron"])
    with pytest.raises(ValueError, match="unknown system"):
        make_system("ideal", c)
    res = simulate(good, Cluster(32, 16, 4, 8) if False else c, CostModel(), ["plain_ep", "standard"])
    assert "plain_ep" in res.systems
    res = simulate(np.ones((1, 1, 32, 16), dtype=int), Cluster(32, 16, 4, 8), CostModel(), SYSTEMS[:2])
    assert "16 experts" in res.skipped["plain_ep"] and "plain_ep" not in res.systems
