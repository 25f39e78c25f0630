"""The simulator's cost model: formulas on hand-computable cases, calibration, bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moebal.sim.cost import (
    HARDWARE,
    CostModel,
    Hardware,
    ModelShape,
    attention_flops_per_token,
    calibrate,
    expert_flops_per_token,
    min_sends,
)


def unit_model(**kw) -> CostModel:
    """One token-expert assignment = 1 s of compute; one sent assignment = 1 s on NVLink,
    4 s across nodes; no latency. D=2, F=3: phi = 6*2*3 = 36 FLOPs at 36 FLOP/s;
    bytes/token = D * 1 = 2 bytes at 2 B/s intra and 0.5 B/s inter."""
    hw = Hardware(name="unit", rate=36.0, intra_bw=2.0, inter_bw=0.5, bw_efficiency=1.0, latency_s=0.0)
    shape = ModelShape(d_model=2, ffn_hidden=3, top_k=1, bytes_per_elem=1, seq_len=4)
    defaults = dict(hardware=hw, shape=shape, gpus_per_node=2, passes="fwd", sync="gpu")
    defaults.update(kw)
    return CostModel(**defaults)


def test_flops_per_token_formulas():
    assert expert_flops_per_token(4096, 14336) == 6 * 4096 * 14336
    assert expert_flops_per_token(4096, 14336, "fwd_bwd") == 18 * 4096 * 14336
    assert attention_flops_per_token(8, 16) == 8 * 64 + 2 * 16 * 8
    assert attention_flops_per_token(8, 16, "fwd_bwd") == 3 * (8 * 64 + 2 * 16 * 8)


def test_two_gpus_forward_equals_formula():
    # source 0 keeps 3 on GPU 0; source 1 sends 1 to GPU 0 and keeps 2 on GPU 1
    cost = unit_model()
    flow = np.array([[3, 0], [1, 2]])
    res = cost.layer_time(flow.sum(0), flow)
    np.testing.assert_allclose(res["compute_G"], [4.0, 2.0])
    np.testing.assert_allclose(res["dispatch_G"], [1.0, 1.0])  # GPU0 receives 1, GPU1 sends 1
    # slowest GPU: 1 (dispatch) + 4 (compute) + 1 (combine)
    assert res["time"] == pytest.approx(6.0)
    assert cost.replace(sync="stage").layer_time(flow.sum(0), flow)["time"] == pytest.approx(6.0)


def test_fwd_bwd_multiplies_compute_by_3_and_comm_by_2():
    cost = unit_model(passes="fwd_bwd")
    flow = np.array([[3, 0], [1, 2]])
    res = cost.layer_time(flow.sum(0), flow)
    assert res["time"] == pytest.approx(2 * 1 + 3 * 4 + 2 * 1)


def test_gpu_and_stage_sync_differ_when_the_slowest_gpus_differ():
    cost = unit_model(gpus_per_node=4)
    # GPU 0 computes 5 of its own; GPU 1 sends 3 to GPU 2, which computes them
    flow = np.zeros((3, 3), int)
    flow[0, 0], flow[1, 2] = 5, 3
    tokens = flow.sum(0)
    gpu = cost.layer_time(tokens, flow)["time"]
    stage = cost.replace(sync="stage").layer_time(tokens, flow)["time"]
    assert gpu == pytest.approx(max(0 + 5 + 0, 3 + 0 + 3, 3 + 3 + 3))
    assert stage == pytest.approx(3 + 5 + 3)


def test_inter_node_traffic_uses_the_network_bandwidth():
    cost = unit_model(gpus_per_node=1)  # two nodes of one GPU
    flow = np.array([[3, 0], [1, 2]])
    res = cost.layer_time(flow.sum(0), flow)
    np.testing.assert_allclose(res["dispatch_G"], [4.0, 4.0])  # 1 assignment * 2 B / 0.5 B/s
    assert res["time"] == pytest.approx(4 + 4 + 4)


def test_intra_and_inter_links_run_in_parallel():
    cost = unit_model(gpus_per_node=2)
    # GPU 0 sends 2 to GPU 1 (same node: 2 s) and 1 to GPU 2 (other node: 4 s) -> 4 s
    flow = np.zeros((3, 3), int)
    flow[0, 1], flow[0, 2] = 2, 1
    t = cost.dispatch_time(flow)
    np.testing.assert_allclose(t, [4.0, 2.0, 4.0])


def test_latency_and_overhead_are_charged_per_call():
    hw = unit_model().hardware.replace(latency_s=0.5, compute_overhead_s=0.25)
    cost = unit_model(hardware=hw)
    flow = np.array([[1, 0], [0, 1]])
    res = cost.layer_time(flow.sum(0), flow)
    assert res["time"] == pytest.approx(0.5 + (0.25 + 1) + 0.5)


def test_scheduling_time_and_overlap():
    cost = unit_model()
    flow = np.array([[3, 0], [1, 2]])
    tokens = flow.sum(0)
    assert cost.layer_time(tokens, flow, sched_s=0.5)["time"] == pytest.approx(6.5)
    ov = cost.replace(overlap=True)
    assert ov.layer_time(tokens, flow, sched_s=0.5)["time"] == pytest.approx(6.0)  # hidden
    assert ov.layer_time(tokens, flow, sched_s=2.0)["time"] == pytest.approx(2 + 4 + 1)


def test_attention_share_only_when_included():
    cost = unit_model()
    assert cost.attention_time(10) == 0.0
    inc = cost.replace(include_attention=True)
    assert inc.attention_time(10) == pytest.approx(10 * attention_flops_per_token(2, 4) / 36.0)


def test_ideal_bound_two_gpus():
    cost = unit_model()
    loads = np.array([[4, 0], [0, 2]])  # 6 assignments, 3 per GPU; each GPU could host both
    assert cost.ideal_layer_time(loads, slots_per_gpu=2, num_gpus_total=2) == pytest.approx(3.0)
    # one slot per GPU: source 0 keeps its heaviest (4), source 1 keeps 2: nothing must move
    np.testing.assert_array_equal(min_sends(loads, 1), [0, 0])
    loads2 = np.array([[3, 1], [1, 1]])
    np.testing.assert_array_equal(min_sends(loads2, 1), [1, 1])
    # compute 3.0 + dispatch and combine of 1 assignment at 2 B/s (one node) = 1 s each
    assert cost.ideal_layer_time(loads2, 1, 2) == pytest.approx(3.0 + 2 * 1.0)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(2, 6),
    st.integers(1, 3),
    st.lists(st.integers(0, 50), min_size=36, max_size=36),
    st.sampled_from(["gpu", "stage"]),
    st.sampled_from(["fwd", "fwd_bwd"]),
)
def test_ideal_never_beaten_by_any_flow(G, gpn, raw, sync, passes):
    """Any flow of the sources' assignments onto GPUs hosting at most ``slots`` experts each
    takes at least the ideal time."""
    rng = np.random.default_rng(sum(raw))
    E = 6
    slots = 2
    loads = np.array(raw[: G * E]).reshape(G, E)
    hw = unit_model().hardware.replace(latency_s=0.1)
    cost = unit_model(gpus_per_node=gpn, sync=sync, passes=passes, hardware=hw)
    hosts = np.zeros((E, G), bool)
    for g in range(G):
        hosts[rng.choice(E, slots, replace=False), g] = True
    for e in range(E):
        if not hosts[e].any():
            hosts[e, rng.integers(G)] = True
    flow = np.zeros((G, G), int)
    for s in range(G):
        for e in range(E):
            dests = np.flatnonzero(hosts[e])
            split = rng.multinomial(loads[s, e], np.ones(dests.size) / dests.size)
            flow[s, dests] += split
    t = cost.layer_time(flow.sum(0), flow)["time"]
    used_slots = int(hosts.sum(0).max())
    assert t >= cost.ideal_layer_time(loads, used_slots, G) - 1e-9


def test_calibrate_recovers_rate_and_overhead():
    phi = expert_flops_per_token(64, 128)
    tokens = np.array([100, 200, 400, 800, 1600])
    secs = 0.002 + tokens * phi / 3e9
    rate, c0 = calibrate(tokens, secs, phi)
    assert rate == pytest.approx(3e9, rel=1e-9)
    assert c0 == pytest.approx(0.002, rel=1e-6)
    rate0, c00 = calibrate(tokens, tokens * phi / 3e9, phi, fit_overhead=False)
    assert rate0 == pytest.approx(3e9) and c00 == 0.0


def test_defaults_are_h100_and_h200():
    assert set(HARDWARE) == {"h100", "h200"}
    assert 300e12 < HARDWARE["h100"].rate < 989e12
    assert HARDWARE["h100"].inter_bw == 50e9  # 400 Gb/s


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rate=0),
        dict(rate=-1.0),
        dict(intra_bw=float("nan")),
        dict(bw_efficiency=1.5),
        dict(latency_s=-1e-6),
    ],
)
def test_bad_hardware(kwargs):
    with pytest.raises(ValueError):
        Hardware(**kwargs)


def test_bad_model_and_calibration_input():
    with pytest.raises(ValueError, match="passes"):
        CostModel(passes="bwd")
    with pytest.raises(ValueError, match="sync"):
        CostModel(sync="async")
    with pytest.raises(ValueError, match="d_model"):
        ModelShape(d_model=0)
    with pytest.raises(TypeError):
        Hardware(rate="fast")
    with pytest.raises(ValueError, match="pairs"):
        calibrate([1.0], [1.0], 10.0)
    with pytest.raises(ValueError, match="one length"):
        calibrate([1.0, 2.0], [1.0], 10.0)
    with pytest.raises(ValueError, match="square"):
        unit_model().dispatch_time(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="does not match"):
        unit_model().layer_time(np.zeros(3), np.zeros((2, 2)))
