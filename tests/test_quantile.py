"""Quantile balancing's three estimators: Megatron-LM's micro-batch mean, the exact
global-batch quantile, and the histogram that resolves it to a bin."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moebal.routing import Router, RouterConfig
from moebal.routing.balancers import quantile_histogram as hist
from moebal.routing.balancers.quantile import QuantileBalancer, admission, excess_ET

E, K = 6, 2
SKEW = torch.arange(E, dtype=torch.float32) * 0.5


def micro_batches(n=3, T=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(T, E, generator=gen) * 1.5 + SKEW for _ in range(n)]


def router(mode, **options):
    r = Router(RouterConfig(num_experts=E, top_k=K, balancer=QuantileBalancer.Config(
        mode=mode, **options)))
    r.step()  # one step per optimizer step from here on
    return r


def kth_largest_loop(values, k):
    return sorted(values, reverse=True)[k - 1]


def global_estimate_loop(batches, beta):
    """The (c+1)-th largest of l_ij - alpha_i over all tokens, by plain loops."""
    cols = [[] for _ in range(E)]
    for b in batches:
        for row in b.tolist():
            alpha = kth_largest_loop([row[j] - beta[j] for j in range(E)], K + 1)
            for j in range(E):
                cols[j].append(row[j] - alpha)
    c = sum(len(b) for b in batches) * K // E
    return [kth_largest_loop(col, c + 1) for col in cols]


# --------------------------------------------------------------------------- histograms


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 4), st.integers(1, 50),
       st.floats(0.05, 4.0), st.integers(0, 2**16))
def test_histogram_counts_are_exact_and_resolve_the_exact_quantile(T, shards, bins, margin, seed):
    gen = torch.Generator().manual_seed(seed)
    x_TE = torch.randn(T, E, generator=gen) * 2
    x_TE[: T // 3] = x_TE[: T // 3].round()  # ties, and values on bin edges
    lo_E = torch.randn(E, generator=gen) - margin
    # summed over any split of the tokens, the counts are those of all the tokens
    counts = sum(hist.histogram_counts_TE(part.clone(), lo_E, margin, bins)
                 for part in torch.tensor_split(x_TE, shards))
    whole = hist.bin_of(x_TE.t().contiguous(), lo_E, margin, bins)
    assert torch.equal(counts, torch.stack(
        [torch.bincount(row + 1, minlength=bins + 2) for row in whole]))
    for k in {1, (T + 1) // 2, T}:
        exact_E = x_TE.t().sort(dim=1, descending=True).values[:, k - 1]
        want = hist.bin_of(exact_E[:, None], lo_E, margin, bins)[:, 0]
        assert torch.equal(hist.kth_largest_bin(counts, k), want)


def test_bin_value_is_the_centre_and_the_range_edges():
    lo_E = torch.tensor([-1.0, 0.5])
    got = hist.bin_value(torch.tensor([-1, 4]), lo_E, margin=1.0, bins=4)
    assert got.tolist() == [-1.0, 2.5]  # underflow: lo; overflow: lo + 2 margin
    assert hist.bin_value(torch.tensor([0, 3]), lo_E, 1.0, 4).tolist() == [-0.75, 2.25]


# --------------------------------------------------------------------------- the modes


def test_global_batch_is_the_exact_quantile_over_every_micro_batch():
    batches = micro_batches()
    r = router("global_batch", ema=0.5)
    beta = [0.0] * E
    for step in range(2):
        for b in batches:
            chosen = r(b).indices_TK  # routed with the beta of earlier steps
            assert torch.equal(chosen.sort(1).values,
                               torch.topk(b - torch.tensor(beta), K, 1).indices.sort(1).values)
        est = global_estimate_loop(batches, beta)
        assert r.balancer.pending_ET.shape == (E, 60)
        r.step()
        new = [0.5 * beta[j] + 0.5 * est[j] for j in range(E)]
        beta = [v - sum(new) / E for v in new]
        assert r.balancer.beta_E.tolist() == pytest.approx(beta, abs=1e-5)
        assert r.balancer.pending_ET.shape == (E, 0)
    assert int(r.balancer.num_updates) == 2


def test_histogram_is_the_global_quantile_resolved_to_its_bin():
    batches = micro_batches(seed=3)
    r = router("histogram", bins=64, margin=2.0)
    beta_E = torch.zeros(E)
    for _ in range(3):
        for b in batches:
            r(b)
        values_ET = torch.cat([excess_ET(b, admission(b, beta_E, K)[1]) for b in batches], 1)
        exact_E = values_ET.sort(1, descending=True).values[:, 60 * K // E]
        assert exact_E.tolist() == pytest.approx(
            global_estimate_loop(batches, beta_E.tolist()), abs=1e-5)
        lo_E = hist.histogram_low(beta_E, 2.0)
        est_E = hist.bin_value(hist.bin_of(exact_E[:, None], lo_E, 2.0, 64)[:, 0], lo_E, 2.0, 64)
        assert torch.equal(int(r.balancer.tokens) * torch.ones(()), torch.tensor(60.0))
        r.step()
        beta_E = est_E - est_E.mean()
        assert torch.equal(r.balancer.beta_E, beta_E)
        assert (est_E - exact_E).abs().max() <= 2.0 + 1e-6  # clipped to the range at worst
    assert int(r.balancer.counts_EB.sum()) == 0


def test_histogram_within_half_a_bin_of_global_batch_when_in_range():
    batches = micro_batches(seed=5)
    exact, histo = router("global_batch"), router("histogram", bins=1000, margin=8.0)
    for b in batches:
        exact(b)
        histo(b)
    exact.step()
    histo.step()
    assert (exact.balancer.beta_E - histo.balancer.beta_E).abs().max() <= 8.0 / 1000 + 1e-6


def test_micro_batch_default_keeps_its_state_and_every_training_forward_estimates():
    r = router("micro_batch")
    assert set(dict(r.balancer.named_buffers())) == {
        "beta_E", "beta_sum_E", "micro_batches", "num_updates"}
    for mode in ("micro_batch", "global_batch", "histogram"):
        r = router(mode)
        before = {k: v.clone() for k, v in r.balancer.state_dict().items()}
        r.eval()
        r(micro_batches(1)[0])
        assert all(torch.equal(before[k], v) for k, v in r.balancer.state_dict().items()), mode
        r.train()
        with torch.no_grad():  # as a reentrant checkpoint's forward runs: it counts
            r(micro_batches(1)[0])
        assert not all(torch.equal(before[k], v) for k, v in r.balancer.state_dict().items())


def test_global_batch_state_round_trips_between_micro_batches():
    batches = micro_batches()
    a = router("global_batch")
    a(batches[0])
    b = router("global_batch")
    b.load_state_dict(a.state_dict())
    for r in (a, b):
        r(batches[1])
        r.step()
    assert torch.equal(a.balancer.beta_E, b.balancer.beta_E)


def test_flat_names_and_bad_options():
    cfg = RouterConfig(num_experts=E, top_k=K, balancer="quantile", quantile_mode="histogram",
                       quantile_bins=10, quantile_margin=0.5)
    assert cfg.balancer == QuantileBalancer.Config(mode="histogram", bins=10, margin=0.5)
    assert cfg.options()["quantile_mode"] == "histogram"
    for bad in (dict(quantile_mode="global"), dict(quantile_bins=0),
                dict(quantile_margin=0.0), dict(quantile_bins=2.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RouterConfig(num_experts=E, top_k=K, balancer="quantile", **bad)
    with pytest.raises(ValueError, match="2\\*\\*20"):
        Router(RouterConfig(num_experts=20000, top_k=2, balancer="quantile",
                            quantile_mode="histogram"))


@pytest.mark.parametrize("mode", ["global_batch", "histogram"])
def test_the_global_forms_balance_a_skewed_stream(mode):
    gen = torch.Generator().manual_seed(11)
    r = router(mode, bins=200, margin=1.0)
    skew = torch.arange(E, dtype=torch.float32) * 0.8
    for _ in range(30):
        for _ in range(2):
            out = r(torch.randn(64, E, generator=gen) + skew)
        r.step()
    loads = out.loads_E.float()
    assert loads.max() / loads.mean() < 1.35  # plain top-k: the last expert takes ~all
