"""Placement: validation, the four builders, and the exact subset density."""

import itertools
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moebal.schedule import (
    PLACEMENTS,
    Placement,
    asymmetric,
    build_placement,
    densest_subset,
    eplb,
    solve_schedule,
    standard,
    subset_density,
    symmetric,
)
from moebal.schedule.placements.packing import pack as _pack
from moebal.schedule.placements.packing import replica_counts as _replica_counts


def _zipf(rng, E, a, total):
    p = 1.0 / np.arange(1, E + 1) ** a
    return rng.multinomial(total, rng.permutation(p / p.sum()))


# ------------------------------------------------------------------------- validation


def test_placement_normalises_and_derives():
    p = Placement(3, 2, ((2, 0), (1,), (0, 1)))
    assert p.gpus_of_expert == ((0, 2), (1,), (0, 1))
    assert p.num_experts == 3
    assert p.replicas_E.tolist() == [2, 1, 2]
    assert p.holds_EG.tolist() == [[True, False, True], [False, True, False], [True, True, False]]
    assert p.experts_of_gpu == ((0, 2), (1, 2), (0,))
    assert Placement.from_holds(p.holds_EG, 2) == p
    with pytest.raises(ValueError):
        p.holds_EG[0, 0] = False  # read-only


@pytest.mark.parametrize(
    "args, match",
    [
        ((2, 2, ((0,), ())), "expert 1 has no replica"),
        ((2, 2, ((0, 2),)), "expert 0 lists GPU 2, outside 0..1"),
        ((2, 2, ((0, -1),)), "expert 0 lists GPU -1"),
        ((2, 2, ((1, 1),)), "expert 0 lists GPU 1 twice"),
        ((2, 1, ((0,), (0, 1))), "GPU 0 holds 2 experts but has only 1 slots"),
        ((0, 1, ((0,),)), "num_gpus"),
        ((2, 0, ((0,),)), "slots_per_gpu"),
        ((2, 1, ()), "non-empty"),
        ((2, 1, ((0.5,),)), "integers"),
    ],
)
def test_placement_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        Placement(*args)


def test_builders_reject_bad_sizes():
    with pytest.raises(ValueError, match="cannot hold"):
        standard(2, 8, 3)
    with pytest.raises(ValueError, match="multiple of slots_per_gpu"):
        standard(4, 6, 4)
    with pytest.raises(ValueError, match="must divide num_gpus"):
        standard(6, 8, 2)
    with pytest.raises(ValueError, match="multiple of num_experts"):
        symmetric(4, 6, 2)
    with pytest.raises(ValueError, match="load history"):
        eplb(4, 8, 4)
    with pytest.raises(ValueError, match="shape"):
        asymmetric(4, 8, 4, loads_E=np.ones(7))
    with pytest.raises(ValueError, match="non-negative integers"):
        eplb(4, 8, 4, loads_E=np.full(8, -1))
    with pytest.raises(ValueError, match="unknown placement 'nope'"):
        build_placement("nope", 4, 8, 4)


# --------------------------------------------------------------------------- builders


def test_registry_has_the_four_builders():
    assert set(PLACEMENTS) >= {"standard", "symmetric", "asymmetric", "eplb"}
    hist = np.arange(1, 17)
    for name in PLACEMENTS:
        p = build_placement(name, 8, 16, 4, loads_E=hist, seed=3)
        assert isinstance(p, Placement) and p.name == name
        assert p.num_gpus == 8 and p.num_experts == 16
        assert p.holds_EG.sum(0).max() <= 4


def test_standard_is_megatron_ep_by_edp():
    p = standard(8, 8, 2)  # EP = 4 GPUs per group, 2 groups
    assert p.gpus_of_expert[0] == (0, 4)
    assert p.gpus_of_expert[5] == (1, 5)
    sets = set(p.gpus_of_expert)
    for a, b in itertools.combinations(sets, 2):
        assert not set(a) & set(b)  # replica sets equal or disjoint
    assert p.holds_EG.sum(0).tolist() == [2] * 8


@pytest.mark.parametrize(
    "G, E, s", [(8, 64, 16), (8, 64, 32), (64, 256, 8), (32, 8, 1), (6, 4, 2), (12, 8, 2)]
)
def test_symmetric_is_regular_and_seeded(G, E, s):
    p = symmetric(G, E, s, seed=1)
    r = G * s // E
    assert p.replicas_E.tolist() == [r] * E
    assert p.holds_EG.sum(0).tolist() == [s] * G
    assert symmetric(G, E, s, seed=1) == p
    if G >= 8:
        assert symmetric(G, E, s, seed=2) != p


def test_symmetric_overlaps_beat_standard_on_skewed_loads():
    rng = np.random.default_rng(0)
    sym, std = symmetric(16, 64, 8, seed=0), standard(16, 64, 8)
    spans_sym, spans_std = [], []
    for _ in range(20):
        loads = _zipf(rng, 64, 1.2, 16 * 256)
        spans_sym.append(solve_schedule(sym, loads).makespan)
        spans_std.append(solve_schedule(std, loads).makespan)
    assert np.mean(spans_sym) < 0.9 * np.mean(spans_std)
    # the co-occurrence graph of the symmetric design reaches many more GPUs
    co = lambda p: ((p.holds_EG.T.astype(int) @ p.holds_EG.astype(int)) > 0).sum(1).min()
    assert co(sym) > co(std)


def test_replica_counts_follow_the_greedy_rule():
    loads = np.array([100, 1, 30, 30, 7, 0])
    counts = _replica_counts(loads, 14, 4)
    assert counts.sum() == 14 and counts.min() >= 1 and counts.max() <= 4
    # greedy invariant: every extra replica went to a load per replica at least as large as
    # what any expert has now
    worst_given = min(
        Fraction(int(l), int(c) - 1) for l, c in zip(loads, counts) if c > 1 and c <= 4
    )
    best_left = max(Fraction(int(l), int(c)) for l, c in zip(loads, counts) if c < 4)
    assert worst_given >= best_left


def test_eplb_packs_balanced_and_never_doubles_a_replica():
    rng = np.random.default_rng(1)
    hist = np.stack([_zipf(rng, 32, 1.0, 2048) for _ in range(5)])
    p = eplb(8, 32, 6, loads_E=hist)
    assert p.holds_EG.sum() == 48 and p.holds_EG.sum(0).tolist() == [6] * 8
    total = hist.sum(0)
    assert p.replicas_E.tolist() == _replica_counts(total, 48, 8).tolist()
    share_EG = p.holds_EG * (total / p.replicas_E)[:, None]
    per_gpu = share_EG.sum(0)
    assert per_gpu.max() <= per_gpu.mean() * 1.25
    assert eplb(8, 32, 6, loads_E=hist) == p


def test_asymmetric_is_never_worse_than_eplb_on_its_history():
    rng = np.random.default_rng(2)
    hist = np.stack([_zipf(rng, 32, 1.2, 4096) for _ in range(6)])
    a = asymmetric(8, 32, 6, loads_E=hist, seed=5)
    b = eplb(8, 32, 6, loads_E=hist)
    score = lambda p: sum(solve_schedule(p, row).makespan for row in hist)
    assert score(a) <= score(b)
    assert a.replicas_E.tolist() == b.replicas_E.tolist()
    assert asymmetric(8, 32, 6, loads_E=hist, seed=5) == a


def test_packing_moves_a_replica_when_free_slots_hold_the_expert():
    # 2 GPUs x 3 slots; expert 4 (two light replicas) comes last, when the only free slots
    # are both on GPU 0: the second replica needs another expert moved out of GPU 1
    holds = _pack(np.array([10, 1, 1, 1, 1]), np.array([1, 1, 1, 1, 2]), 2, 3, np.arange(2))
    assert holds.sum(0).tolist() == [3, 3]
    assert holds.sum(1).tolist() == [1, 1, 1, 1, 2]
    # eplb on a skewed history still fills every slot with distinct replicas
    p = eplb(3, 4, 2, loads_E=np.array([1000, 1, 1, 1]))
    assert p.replicas_E[0] == 3 and p.holds_EG.sum(0).tolist() == [2, 2, 2]


# ---------------------------------------------------------------------- subset density


def _brute_density(p: Placement, loads) -> Fraction:
    best = Fraction(0)
    G = p.num_gpus
    for k in range(1, G + 1):
        for S in itertools.combinations(range(G), k):
            inside = sum(
                int(l) for l, gs in zip(loads, p.gpus_of_expert) if set(gs) <= set(S)
            )
            best = max(best, Fraction(inside, k))
    return best


@st.composite
def small_instances(draw, max_gpus=6, max_experts=7):
    G = draw(st.integers(1, max_gpus))
    E = draw(st.integers(1, max_experts))
    sets = [
        tuple(sorted(draw(st.sets(st.integers(0, G - 1), min_size=1, max_size=G))))
        for _ in range(E)
    ]
    slots = max(1, max(sum(g in s for s in sets) for g in range(G)))
    loads = draw(st.lists(st.integers(0, 60), min_size=E, max_size=E))
    return Placement(G, slots, tuple(sets)), np.array(loads, dtype=np.int64)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(small_instances())
def test_densest_subset_matches_brute_force(inst):
    p, loads = inst
    value, S = densest_subset(p, loads)
    assert value == _brute_density(p, loads)
    inside = sum(int(l) for l, gs in zip(loads, p.gpus_of_expert) if set(gs) <= set(S))
    assert Fraction(inside, len(S)) == value
    assert subset_density(p, loads) == value


def test_densest_subset_limits_and_errors():
    p = symmetric(8, 16, 4)
    with pytest.raises(ValueError, match="max_gpus"):
        densest_subset(p, np.ones(16), max_gpus=4)
    with pytest.raises(ValueError, match="shape"):
        subset_density(p, np.ones(15))
    with pytest.raises(ValueError, match="expert 3"):
        subset_density(p, np.r_[np.ones(3), 0.5, np.ones(12)])
    assert subset_density(p, np.zeros(16)) == 0
