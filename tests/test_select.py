"""The sampled-bracket k-th largest is exact: it equals torch.kthvalue on every input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moebal.routing import select
from moebal.routing.kernels import kth_largest
from moebal.routing.select import (
    bracket_kth_largest,
    fast_kth_largest,
    row_counts,
    sample_bracket,
    topk_kth_largest,
)


def bracket_for_all_sizes(mp: pytest.MonkeyPatch) -> None:
    """Let the bracket take small matrices too (by default they go to torch.topk), on any
    number of threads."""
    mp.setattr(select, "MIN_SIZE", 0)
    mp.setattr(select, "MIN_ROW", 1024)
    mp.setattr(select, "MAX_THREADS", 1 << 10)


def reference(x_RN: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of each row by torch.kthvalue (the (n - k + 1)-th smallest)."""
    return torch.kthvalue(x_RN, x_RN.shape[1] - k + 1, dim=1).values


def make_rows(rows: int, n: int, kind: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(rows, n, generator=g) * 3 + torch.randn(rows, 1, generator=g)
    elif kind == "ties":  # a handful of distinct values: long runs of equal values
        x = torch.randint(-3, 4, (rows, n), generator=g).float()
    elif kind == "extreme":  # finite values near the ends of the dtype's range, and tiny ones
        big = torch.finfo(dtype).max
        tiny = torch.finfo(dtype).tiny
        choices = torch.tensor([-big, -big / 2, -tiny, 0.0, tiny, big / 2, big])
        x = choices[torch.randint(0, len(choices), (rows, n), generator=g)]
        x = x * (1 - 0.25 * torch.rand(rows, n, generator=g))
    elif kind == "inf":  # what quantile's group-limited routing makes: -inf where not allowed,
        x = torch.randn(rows, n, generator=g)  # +inf for a token with at most K experts
        draw = torch.rand(rows, n, generator=g)
        x = x.masked_fill(draw < 0.3, -math.inf).masked_fill(draw > 0.97, math.inf)
    else:  # sorted rows: a strided sample sees an ordered, not a random, subset
        x = torch.randn(rows, n, generator=g).sort(dim=1).values
    return x.to(dtype)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    n=st.integers(1, 6000),
    k_frac=st.floats(0.0, 1.0),
    kind=st.sampled_from(["normal", "ties", "extreme", "sorted", "inf"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_kth_largest_equals_kthvalue(rows, n, k_frac, kind, dtype, seed):
    x = make_rows(rows, n, kind, dtype, seed)
    k = 1 + min(n - 1, int(k_frac * n))
    want = reference(x, k)
    assert torch.equal(fast_kth_largest(x, k), want)
    with pytest.MonkeyPatch.context() as mp:
        bracket_for_all_sizes(mp)
        assert torch.equal(fast_kth_largest(x, k), want)
        assert torch.equal(kth_largest(x, k, dim=1), want)
        assert torch.equal(kth_largest(x.t().contiguous(), k, dim=0), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["normal", "ties", "extreme", "sorted", "inf"])
@pytest.mark.parametrize("rows,n,k", [(64, 16384, 2049), (16, 16384, 2049), (256, 4096, 129)])
def test_balancer_shapes_are_exact(monkeypatch, rows, n, k, kind, dtype):
    """The expert side of quantile and BIP: (c + 1)-th largest, c = T K / E."""
    x = make_rows(rows, n, kind, dtype, seed=rows + n)
    want = reference(x, k)
    assert torch.equal(fast_kth_largest(x, k), want)
    bracket_for_all_sizes(monkeypatch)
    assert torch.equal(fast_kth_largest(x, k), want)


def test_balancer_shapes_take_the_bracket(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    spy = CountingTopk()
    monkeypatch.setattr(select, "topk_kth_largest", spy)
    x = make_rows(8, 65536, "normal", torch.float32, seed=5)
    assert torch.equal(kth_largest(x, 8193, dim=1), reference(x, 8193))
    assert spy.rows and all(r * w < 8 * 65536 // 4 for r, w in spy.rows)
    small = make_rows(16, 4096, "normal", torch.float32, seed=5)
    spy.rows.clear()
    assert torch.equal(kth_largest(small, 513, dim=1), reference(small, 513))
    assert spy.rows == [(16, 4096)]  # below MIN_SIZE: torch.topk directly
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    spy.rows.clear()
    assert torch.equal(kth_largest(x, 8193, dim=1), reference(x, 8193))
    assert spy.rows == [(8, 65536)]  # two threads: torch.topk


def test_huge_and_tiny_rows(monkeypatch):
    bracket_for_all_sizes(monkeypatch)
    x = make_rows(2, 1 << 20, "normal", torch.float32, seed=3)
    for k in (1, 1000, 1 << 17, (1 << 20) - 5, 1 << 20):
        assert torch.equal(fast_kth_largest(x, k), reference(x, k))
    one = torch.tensor([[2.5]])
    assert torch.equal(kth_largest(one, 1, dim=1), torch.tensor([2.5]))
    assert torch.equal(kth_largest(torch.tensor([[3.0, 3.0, 1.0]]), 2, dim=1), torch.tensor([3.0]))


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2048, 6000),
    k_frac=st.floats(0.0, 1.0),
    kind=st.sampled_from(["normal", "ties", "sorted"]),
    seed=st.integers(0, 2**16),
    picks=st.lists(st.integers(0, 10**6), min_size=8, max_size=8),
)
def test_any_bracket_is_exact(n, k_frac, kind, seed, picks):
    """Brackets drawn from the row's values, good or bad: misses fall back, still exact."""
    x = make_rows(4, n, kind, torch.float32, seed)
    k = 1 + min(n - 1, int(k_frac * n))
    ends = x.gather(1, torch.tensor(picks).view(4, 2) % n)
    hi, lo = ends.max(dim=1).values, ends.min(dim=1).values
    assert torch.equal(bracket_kth_largest(x, k, hi, lo), reference(x, k))


class CountingTopk:
    """Wraps select.topk_kth_largest and records the row counts of the matrices it takes."""

    def __init__(self):
        self.rows: list[tuple[int, int]] = []

    def __call__(self, x_RN, k):
        self.rows.append(tuple(x_RN.shape))
        return topk_kth_largest(x_RN, k)


def test_missed_rows_fall_back_one_by_one(monkeypatch):
    x = make_rows(8, 4096, "normal", torch.float32, seed=1)
    k = 500
    want = reference(x, k)
    hi, lo = sample_bracket(x, k)
    # rows 2 and 5: a bracket wholly above the k-th largest (too few values above lo)
    hi[2] = lo[2] = x[2].max()
    hi[5] = lo[5] = x[5].max()
    spy = CountingTopk()
    monkeypatch.setattr(select, "topk_kth_largest", spy)
    assert torch.equal(bracket_kth_largest(x, k, hi, lo), want)
    assert (2, 4096) in spy.rows  # the two missed rows, and only they, took the full topk
    assert all(r < 8 or w < 4096 for r, w in spy.rows)


def test_bracket_below_the_kth_misses_and_is_exact(monkeypatch):
    x = make_rows(3, 4096, "normal", torch.float32, seed=2)
    k = 100
    lo = hi = x.min(dim=1).values  # everything above hi: above >= k
    spy = CountingTopk()
    monkeypatch.setattr(select, "topk_kth_largest", spy)
    assert torch.equal(bracket_kth_largest(x, k, hi, lo), reference(x, k))
    assert (3, 4096) in spy.rows


def test_empty_bracket_is_exact():
    x = make_rows(3, 4096, "normal", torch.float32, seed=6)
    gap = torch.full((3,), 1e9)  # no value inside [1e9, 1e9]
    assert torch.equal(bracket_kth_largest(x, 7, gap, gap), reference(x, 7))


def test_heavy_ties_take_topk_for_all_rows(monkeypatch):
    bracket_for_all_sizes(monkeypatch)
    x = torch.zeros(4, 4096)
    x[:, :10] = 1.0
    spy = CountingTopk()
    monkeypatch.setattr(select, "topk_kth_largest", spy)
    assert torch.equal(fast_kth_largest(x, 300), torch.zeros(4))
    assert spy.rows == [(4, 4096)]  # the bracket [0, 0] holds almost every value


def test_good_bracket_needs_no_full_topk(monkeypatch):
    x = make_rows(4, 16384, "normal", torch.float32, seed=4)
    hi, lo = sample_bracket(x, 2049)
    assert bool((hi >= lo).all())
    spy = CountingTopk()
    monkeypatch.setattr(select, "topk_kth_largest", spy)
    assert torch.equal(bracket_kth_largest(x, 2049, hi, lo), reference(x, 2049))
    assert all(w < 16384 for _, w in spy.rows)


@pytest.mark.parametrize("n", [1, 3, 4, 507, 508, 1016, 5000, 16384])
def test_row_counts_equal_sum(n):
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(5, n, generator=g) < 0.7
    assert torch.equal(row_counts(mask), mask.sum(dim=1))
    assert torch.equal(row_counts(torch.ones(2, n, dtype=torch.bool)), torch.full((2,), n))
    wide = torch.rand(5, n + 8, generator=g) < 0.3
    for start in (1, 4):  # a column slice, aligned or not
        part = wide[:, start:start + n]
        assert torch.equal(row_counts(part), part.sum(dim=1))


def test_bad_arguments_raise():
    x = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="k=6"):
        kth_largest(x, 6, dim=1)
    with pytest.raises(ValueError, match="k=0"):
        kth_largest(x, 0, dim=0)
    with pytest.raises(ValueError, match="2-D"):
        kth_largest(torch.zeros(5), 1, dim=0)


def topk_path(x, k, dim):
    """kth_largest as it was: torch.topk only."""
    x = x.t().contiguous() if dim % 2 == 0 else x
    return topk_kth_largest(x, k)


@pytest.mark.parametrize("order", ["paper", "causal"])
def test_bip_and_quantile_equal_the_topk_path(monkeypatch, order):
    from moebal.routing.balancers import bip, quantile

    bracket_for_all_sizes(monkeypatch)
    g = torch.Generator().manual_seed(7)
    logits_TE = torch.randn(4096, 8, generator=g) + torch.linspace(0, 2, 8)
    scores_TE = torch.softmax(logits_TE, dim=-1)
    q0_E = torch.rand(8, generator=g) * 0.05
    spy = CountingTopk()
    monkeypatch.setattr(select, "topk_kth_largest", spy)
    fast = bip.bip_route(scores_TE, q0_E, 2, 4, order=order)
    fast_q = quantile.quantile_dual_update(logits_TE, q0_E, 2)
    assert spy.rows and (8, 4096) not in spy.rows  # the expert side took the bracket
    monkeypatch.setattr(bip, "kth_largest", topk_path)
    monkeypatch.setattr(quantile, "kth_largest", topk_path)
    exact = bip.bip_route(scores_TE, q0_E, 2, 4, order=order)
    exact_q = quantile.quantile_dual_update(logits_TE, q0_E, 2)
    for a, b in zip(fast + fast_q, exact + exact_q):
        assert torch.equal(a, b)
