"""The token permutation shared by the local and the expert-parallel dispatcher."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moebal.model.dispatch import (
    LocalDispatcher,
    combine_rows,
    inverse_permutation,
    sort_runs,
    sort_slots,
)
from moebal.routing import Router, RouterConfig


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 12), K=st.integers(1, 3), E=st.integers(3, 6), seed=st.integers(0, 99),
       drop=st.booleans())
def test_sorted_slots_are_the_kept_slots_by_expert_then_slot(T, K, E, seed, drop):
    g = torch.Generator().manual_seed(seed)
    indices_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    kept_TK = (torch.rand(T, K, generator=g) > 0.3) if drop else torch.ones(T, K, dtype=torch.bool)
    slots = sort_slots(indices_TK, kept_TK, E)
    expected = sorted((int(indices_TK.view(-1)[s]), s) for s in range(T * K)
                      if kept_TK.view(-1)[s])
    assert slots.slot_N.tolist() == [s for _, s in expected]
    assert slots.token_N.tolist() == [s // K for _, s in expected]
    assert slots.counts_E.tolist() == [sum(e == x for x, _ in expected) for e in range(E)]


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(0, 4), min_size=1, max_size=8), seed=st.integers(0, 99))
def test_sort_runs_orders_rows_by_their_runs_key_stably(counts, seed):
    g = torch.Generator().manual_seed(seed)
    counts_C = torch.tensor(counts)
    key_C = torch.randint(0, 3, (len(counts),), generator=g)
    run_of_row = [c for c, n in enumerate(counts) for _ in range(n)]
    perm = sort_runs(counts_C, key_C, sum(counts))
    assert perm.tolist() == sorted(range(len(run_of_row)),
                                   key=lambda n: (int(key_C[run_of_row[n]]), n))
    inv = inverse_permutation(perm)
    x = torch.arange(len(perm)) * 10
    assert torch.equal(x[perm][inv], x) and torch.equal(perm[inv], torch.arange(len(perm)))


def test_combine_rows_sums_weighted_rows_per_token():
    y_ND = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    out = combine_rows(y_ND, torch.tensor([2, 0, 2]), torch.tensor([0.5, 1.0, 2.0]), 3,
                       torch.float64)
    assert out.dtype == torch.float64
    assert out.tolist() == [[3.0, 4.0], [0.0, 0.0], [10.5, 13.0]]


def test_local_dispatch_then_combine_is_the_per_token_sum():
    torch.manual_seed(0)
    T, D, E, K = 10, 4, 5, 2
    router = Router(RouterConfig(num_experts=E, top_k=K))
    routing = router(torch.randn(T, E))
    x_TD = torch.randn(T, D)
    w_ED = torch.randn(E, D)  # expert e: multiply by w[e] elementwise
    dispatcher = LocalDispatcher(E)
    x_ND, counts_E, meta = dispatcher.dispatch(x_TD, routing)
    expert_N = torch.repeat_interleave(torch.arange(E), counts_E)
    out = dispatcher.combine(x_ND * w_ED[expert_N], meta)
    expected = torch.zeros(T, D)
    for t in range(T):
        for k in range(K):
            e = int(routing.indices_TK[t, k])
            expected[t] += routing.weights_TK[t, k] * x_TD[t] * w_ED[e]
    torch.testing.assert_close(out, expected)
