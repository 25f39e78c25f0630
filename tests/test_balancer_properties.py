"""What every balancer guarantees: valid routings, exact state round-trips, no updates in
eval(), untouched state on bad input, and the balance the methods promise on a stream."""

import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moebal.demo import run_stream
from moebal.routing import BALANCERS, Router, RouterConfig

ALL = sorted(BALANCERS)
STATEFUL = ["bip", "global_aux_loss", "loss_free", "quantile"]


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- properties


@st.composite
def routing_cases(draw):
    E = draw(st.integers(1, 8))
    K = draw(st.integers(1, E))
    T = draw(st.integers(0, 24))
    seq_len = draw(st.sampled_from([None] + [d for d in range(1, T + 1) if T % d == 0]))
    values = draw(st.lists(st.floats(-20, 20, width=32), min_size=T * E, max_size=T * E))
    cfg = dict(
        num_experts=E,
        top_k=K,
        score_function=draw(st.sampled_from(["softmax", "sigmoid"])),
        norm_topk_prob=draw(st.booleans()),
        capacity_factor=draw(st.sampled_from([None, None, 0.5, 1.0, 1.5])),
        drop_policy=draw(st.sampled_from(["probs", "position"])),
    )
    return cfg, torch.tensor(values, dtype=torch.float32).view(T, E), seq_len, draw(st.booleans())


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=routing_cases())
def test_every_balancer_returns_a_valid_routing(name, case):
    cfg, logits, seq_len, training = case
    router = Router(RouterConfig(balancer=name, **cfg))
    router.train(training)
    T, E, K = logits.shape[0], cfg["num_experts"], cfg["top_k"]
    for _ in range(2):  # the second batch sees whatever state the first left
        out = router(logits, seq_len=seq_len)
        router.step()
        idx = out.indices_TK
        assert idx.shape == (T, K) and idx.dtype == torch.int64
        assert out.weights_TK.shape == (T, K) and out.kept_TK.shape == (T, K)
        if T:
            assert int(idx.min()) >= 0 and int(idx.max()) < E
            assert torch.all(idx.sort(dim=1).values.diff(dim=1) > 0)  # distinct per token
        assert torch.all(torch.isfinite(out.weights_TK)) and torch.all(out.weights_TK >= 0)
        assert torch.all(out.weights_TK[~out.kept_TK] == 0)
        drops = int((~out.kept_TK).sum())
        assert int(out.loads_E.sum()) == T * K - drops
        assert torch.equal(out.loads_E, torch.bincount(idx[out.kept_TK], minlength=E))
        if cfg["capacity_factor"] is not None:
            assert int(out.loads_E.max()) <= router.capacity(T)
        assert out.aux_loss.dim() == 0 and bool(torch.isfinite(out.aux_loss))
        assert all(bool(torch.isfinite(b).all()) for b in router.buffers())


# --------------------------------------------------------------------------- state


def stream(n, T=64, E=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(T, E, generator=gen) + torch.linspace(0, 2, E) for _ in range(n)]


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trips_exactly(name):
    cfg = RouterConfig(num_experts=8, top_k=2, balancer=name)
    a = Router(cfg)
    batches = stream(6)
    for b in batches[:3]:
        a(b)
    a.step()
    a(batches[3])  # a micro-batch in flight: accumulators are part of the state
    b = Router(copy.deepcopy(cfg))
    b.step()  # b must be in the same "explicit steps" mode
    b.load_state_dict(a.state_dict())
    assert same_state(a.state_dict(), b.state_dict())
    for batch in batches[4:]:
        oa, ob = a(batch), b(batch)
        a.step()
        b.step()
        assert torch.equal(oa.indices_TK, ob.indices_TK)
        assert torch.equal(oa.aux_loss, ob.aux_loss)
    assert same_state(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("name", ALL)
def test_eval_changes_no_state(name):
    router = Router(RouterConfig(num_experts=8, top_k=2, balancer=name))
    batches = stream(5)
    for b in batches[:2]:
        router(b)
    before = {k: v.clone() for k, v in router.state_dict().items()}
    router.eval()
    for b in batches[2:]:
        router(b)
        router.step()
    assert same_state(before, router.state_dict())


@pytest.mark.parametrize("name", STATEFUL)
def test_state_is_a_buffer_that_moves_with_the_module(name):
    router = Router(RouterConfig(num_experts=8, top_k=2, balancer=name))
    names = {n for n, _ in router.named_buffers()}
    assert names and names == set(router.state_dict())
    assert not list(router.parameters())


@pytest.mark.parametrize("name", STATEFUL)
@pytest.mark.parametrize(
    "bad",
    [torch.tensor([[float("nan")] * 8] * 4), torch.full((4, 8), float("inf")),
     torch.randn(4, 7), torch.randn(4, 8, 1), torch.randint(0, 5, (4, 8))],
)
def test_bad_logits_leave_state_unchanged(name, bad):
    router = Router(RouterConfig(num_experts=8, top_k=2, balancer=name))
    router(stream(1)[0])
    before = {k: v.clone() for k, v in router.state_dict().items()}
    with pytest.raises(ValueError):
        router(bad)
    with pytest.raises(ValueError, match="seq_len"):
        router(stream(1)[0], seq_len=5)
    assert same_state(before, router.state_dict())


def test_nan_message_names_the_entry():
    logits = torch.zeros(3, 4)
    logits[1, 2] = float("-inf")
    with pytest.raises(ValueError, match=r"\(1, 2\)"):
        Router(RouterConfig(num_experts=4, top_k=1))(logits)


def test_huge_finite_logits_are_accepted():
    logits = torch.full((8, 4), 3e38)
    logits[:, 0] = -3e38
    out = Router(RouterConfig(num_experts=4, top_k=1))(logits)  # the sum overflows; entries don't
    assert out.indices_TK.shape == (8, 1)


@pytest.mark.parametrize(
    "kwargs",
    [dict(bias_update="multiplicative"), dict(bip_order="future"), dict(bip_iters=0),
     dict(bip_iters=1.5), dict(quantile_ema=1.0), dict(quantile_ema=-0.1),
     dict(sinkhorn_iters=0), dict(sinkhorn_tol=0.0), dict(optimal_solver="glpk"),
     dict(aux_loss_coeff=float("nan")), dict(bias_update_rate=-1e-3), dict(bip_pin_q="yes")],
)
def test_bad_balancer_options_name_the_value(kwargs):
    with pytest.raises(ValueError) as err:
        RouterConfig(num_experts=4, **kwargs)
    assert repr(next(iter(kwargs.values()))) in str(err.value)


# --------------------------------------------------------------------------- the stream


STREAM = dict(batches=50, tokens=4096, experts=16, top_k=2, skew=2.0, seed=0)


@pytest.mark.slow
def test_bip_is_balanced_from_its_first_batch():
    result = run_stream("bip", **STREAM)
    vio = np.array(result["max_vio_batch"])
    assert vio[0] < 0.1 and vio.max() < 0.1, vio.round(3)
    plain = run_stream("none", **dict(STREAM, batches=1))
    assert plain["max_vio_first"] > 1.0  # the stream is skewed


def test_loss_free_falls_steadily():
    vio = np.array(run_stream("loss_free", **STREAM)["max_vio_batch"])
    chunk_means = vio.reshape(5, 10).mean(axis=1)
    assert np.all(np.diff(chunk_means) < 0), chunk_means.round(3)
    assert vio[-1] < 0.8 * vio[0]


def test_quantile_and_sinkhorn_balance_the_stream():
    for name in ("quantile", "sinkhorn"):
        vio = np.array(run_stream(name, **dict(STREAM, batches=10))["max_vio_batch"])
        assert vio[1:].max() < 0.5, (name, vio.round(3))
