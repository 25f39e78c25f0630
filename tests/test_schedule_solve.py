"""Token scheduling: exact, conserving, feasible, deterministic, local, and checked by HiGHS."""

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moebal.schedule import (
    Placement,
    Schedule,
    build_placement,
    densest_subset,
    even_split_makespan,
    lp_optimum,
    solve_schedule,
    standard,
    symmetric,
)
from moebal.schedule.highs import highs_makespan_lp
from moebal.schedule.locality import split_sends as _split_sends


@st.composite
def instances(draw, max_gpus=6, max_experts=8, max_load=80, per_source=False):
    G = draw(st.integers(1, max_gpus))
    E = draw(st.integers(1, max_experts))
    sets = [
        tuple(sorted(draw(st.sets(st.integers(0, G - 1), min_size=1, max_size=G))))
        for _ in range(E)
    ]
    slots = max(1, max(sum(g in s for s in sets) for g in range(G)))
    shape = (G, E) if per_source else (E,)
    cells = int(np.prod(shape))
    big = draw(st.sampled_from([max_load, max_load, 3, 10**6]))  # mostly small, some tiny/huge
    values = draw(st.lists(st.integers(0, big), min_size=cells, max_size=cells))
    return Placement(G, slots, tuple(sets)), np.array(values, dtype=np.int64).reshape(shape)


def check_plan(p: Placement, loads_E: np.ndarray, s: Schedule) -> None:
    """Conservation, holders only, non-negative integers, makespan = busiest GPU."""
    x = s.x_EG
    assert x.dtype == np.int64 and x.shape == (p.num_experts, p.num_gpus)
    assert (x >= 0).all()
    assert not x[~p.holds_EG].any(), "tokens on a GPU without the expert"
    assert np.array_equal(x.sum(1), loads_E), "every token scheduled exactly once"
    assert s.makespan == int(x.sum(0).max(initial=0))
    assert s.lower_bound <= s.makespan
    # the certificate: ceil(density(critical set)) == makespan
    S = set(s.critical_gpus)
    assert S and S <= set(range(p.num_gpus))
    inside = sum(int(l) for l, gs in zip(loads_E, p.gpus_of_expert) if set(gs) <= S)
    assert math.ceil(Fraction(inside, len(S))) == s.makespan


def _quick_and_many(quick: int, many: int, strategy):
    """Two tests from one property: ``quick`` examples always, ``many`` under the slow mark."""

    def wrap(prop):
        def run(n):
            def test(inst):
                prop(inst)

            test.__name__ = prop.__name__
            return given(strategy)(settings(max_examples=n, derandomize=True, deadline=None)(test))

        return run(quick), pytest.mark.slow(run(many))

    return wrap


def flow_is_exact_feasible_and_certified(inst):
    p, loads = inst
    s = solve_schedule(p, loads)
    check_plan(p, loads, s)
    density = densest_subset(p, loads)[0]
    assert s.makespan == math.ceil(density)  # ceil of the LP optimum, by enumeration
    h = solve_schedule(p, loads, method="highs")
    check_plan(p, loads, h)
    assert s.makespan == h.makespan
    assert s.tokens_moved is None and s.sends is None


test_flow_is_exact, test_flow_is_exact_many = _quick_and_many(150, 1500, instances())(
    flow_is_exact_feasible_and_certified
)


def lp_optimum_equals_subset_density_and_highs(inst):
    p, loads = inst
    value = lp_optimum(p, loads)
    assert value == densest_subset(p, loads)[0]
    lp, _ = highs_makespan_lp(p, loads)
    assert abs(float(value) - lp) <= 1e-6 * max(1.0, lp)


test_lp_optimum, test_lp_optimum_many = _quick_and_many(60, 400, instances())(
    lp_optimum_equals_subset_density_and_highs
)


def locality_is_exact_and_never_worse_than_naive(inst):
    p, loads_SE = inst
    loads_E = loads_SE.sum(0)
    s = solve_schedule(p, loads_SE)
    check_plan(p, loads_E, s)
    assert s.makespan == solve_schedule(p, loads_E).makespan
    # sends are consistent with the loads and the plan
    sends = s.sends_SEG()
    assert np.array_equal(sends.sum(2), loads_SE)
    assert np.array_equal(sends.sum(0), s.x_EG)
    off = ~np.eye(p.num_gpus, dtype=bool)[:, None, :]
    assert s.tokens_moved == int((sends * off).sum())
    assert (s.sends[:, 3] > 0).all()
    # exact: the fewest tokens moved among optimal plans (HiGHS lexicographic LP)
    h = solve_schedule(p, loads_SE, method="highs")
    assert h.makespan == s.makespan and h.tokens_moved == s.tokens_moved
    # never worse than ignoring locality: the makespan-only plan, split local-first ...
    plain = solve_schedule(p, loads_E)
    idx = p.slots
    _, naive_local_first = _split_sends(p, plain.x_EG[idx.expert_N, idx.gpu_N], loads_SE)
    assert s.tokens_moved <= naive_local_first
    # ... or matched source-by-source to GPU-by-GPU without looking for local tokens
    assert s.tokens_moved <= _blind_split_moved(plain.x_EG, loads_SE)


test_locality, test_locality_many = _quick_and_many(60, 500, instances(per_source=True))(
    locality_is_exact_and_never_worse_than_naive
)


def _blind_split_moved(x_EG: np.ndarray, loads_SE: np.ndarray) -> int:
    """Tokens moved by a north-west-corner split that ignores where tokens come from."""
    moved = 0
    for e in range(x_EG.shape[0]):
        supply = [[s, int(n)] for s, n in enumerate(loads_SE[:, e]) if n]
        for g, need in enumerate(x_EG[e]):
            need = int(need)
            while need:
                s, n = supply[0]
                take = min(n, need)
                moved += take if s != g else 0
                need -= take
                supply[0][1] -= take
                if supply[0][1] == 0:
                    supply.pop(0)
    return moved


@settings(max_examples=100, derandomize=True, deadline=None)
@given(instances(), st.integers(0, 2**32 - 1))
def test_deterministic_and_warm_start_is_exact(inst, seed):
    p, loads = inst
    a = solve_schedule(p, loads)
    b = solve_schedule(p, loads.astype(np.int32).astype(np.float64))
    assert np.array_equal(a.x_EG, b.x_EG) and a.critical_gpus == b.critical_gpus
    rng = np.random.default_rng(seed)
    nxt = rng.integers(0, 50, size=loads.shape)
    warm = solve_schedule(p, nxt, prev=a)
    check_plan(p, nxt, warm)
    assert warm.makespan == solve_schedule(p, nxt).makespan
    assert np.array_equal(solve_schedule(p, nxt, prev=a).x_EG, warm.x_EG)


@pytest.mark.parametrize("name", ["standard", "symmetric", "eplb", "asymmetric"])
@pytest.mark.parametrize("G, E, s", [(8, 64, 16), (16, 64, 8), (64, 256, 16)])
def test_medium_instances_match_highs(name, G, E, s):
    rng = np.random.default_rng(G + E + s)
    p = lambda exponent: 1.0 / np.arange(1, E + 1) ** exponent
    w1 = p(1.0) / p(1.0).sum()
    hist = np.stack([rng.multinomial(G * 256, rng.permutation(w1)) for _ in range(3)])
    placement = build_placement(name, G, E, s, loads_E=hist, seed=1)
    prev = None
    for a in (0.5, 1.0, 1.5):
        w = p(a)
        loads = rng.multinomial(G * 1024, rng.permutation(w / w.sum()))
        ours = solve_schedule(placement, loads, prev=prev)
        check_plan(placement, loads, ours)
        lp, _ = highs_makespan_lp(placement, loads)
        assert ours.makespan == math.ceil(lp - 1e-6)
        prev = ours


def test_huge_loads_use_the_integer_push_path():
    p = symmetric(8, 16, 4, seed=0)
    rng = np.random.default_rng(0)
    loads = rng.integers(0, 2**36, size=16)  # total beyond int32: no scipy max flow
    s = solve_schedule(p, loads)
    check_plan(p, loads, s)
    assert s.makespan == math.ceil(lp_optimum(p, loads))
    loads_SE = rng.integers(0, 2**30, size=(8, 16))  # locality beyond int32 too
    s = solve_schedule(p, loads_SE)
    check_plan(p, loads_SE.sum(0), s)
    h = solve_schedule(p, loads_SE, method="highs")
    assert (s.makespan, s.tokens_moved) == (h.makespan, h.tokens_moved)


def test_zero_load_and_single_gpu():
    p = symmetric(4, 8, 4)
    s = solve_schedule(p, np.zeros(8, dtype=np.int64))
    assert s.makespan == 0 and not s.x_EG.any()
    s = solve_schedule(p, np.zeros((4, 8), dtype=np.int64))
    assert s.makespan == 0 and s.tokens_moved == 0 and s.sends.shape == (0, 4)
    one = Placement(1, 3, ((0,), (0,), (0,)))
    s = solve_schedule(one, [3, 0, 4])
    assert s.makespan == 7 and s.x_EG[:, 0].tolist() == [3, 0, 4]


def test_standard_without_scheduling_is_the_even_split():
    p = standard(4, 4, 2)  # EP 2, experts {0,2} on GPUs 0 and 2, {1,3} on GPUs 1 and 3
    loads = np.array([9, 1, 3, 0])
    assert even_split_makespan(p, loads) == 5 + 2  # GPU 0 or 2: ceil/floor of 9 plus 3 split
    assert solve_schedule(p, loads).makespan == 6


def test_sends_rows_are_sorted_and_local_rows_marked():
    p = symmetric(4, 4, 2, seed=0)
    loads = np.array([[5, 0, 2, 1], [0, 3, 0, 0], [1, 1, 1, 1], [0, 0, 4, 2]])
    s = solve_schedule(p, loads)
    rows = s.sends
    order = np.lexsort((rows[:, 2], rows[:, 0], rows[:, 1]))
    assert np.array_equal(order, np.arange(len(rows)))  # sorted by (expert, source, gpu)
    local = rows[rows[:, 0] == rows[:, 2]]
    assert int(loads.sum()) - int(local[:, 3].sum()) == s.tokens_moved


def test_bad_inputs_name_the_problem():
    p = symmetric(4, 8, 4)
    with pytest.raises(ValueError, match=r"shape \[8\].*got \(7,\)"):
        solve_schedule(p, np.ones(7))
    with pytest.raises(ValueError, match=r"\[4, 8\]"):
        solve_schedule(p, np.ones((3, 8)))
    with pytest.raises(ValueError, match=r"non-negative; loads\[2\] = -1"):
        solve_schedule(p, np.array([1, 1, -1, 1, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"integers; loads\[1\] = 0.5"):
        solve_schedule(p, np.array([1, 0.5, 1, 1, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"integers; loads\[1\] = nan"):
        solve_schedule(p, np.array([1, np.nan, 1, 1, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match="dtype bool"):
        solve_schedule(p, np.ones(8, dtype=bool))
    with pytest.raises(ValueError, match="unknown method 'simplex'"):
        solve_schedule(p, np.ones(8), method="simplex")
    with pytest.raises(ValueError, match="prev schedule"):
        solve_schedule(p, np.ones(8), prev=solve_schedule(symmetric(4, 4, 2), np.ones(4)))
    with pytest.raises(TypeError, match="Placement"):
        solve_schedule("symmetric", np.ones(8))
    with pytest.raises(ValueError, match="too large"):
        solve_schedule(p, np.full(8, 2**48))
    with pytest.raises(ValueError, match="per-expert loads"):
        solve_schedule(p, np.ones(8)).sends_SEG()


_PLAN_SCRIPT = """
import hashlib, sys
import numpy as np
from moebal.schedule import build_placement, solve_schedule
rng = np.random.default_rng(7)
p = build_placement("symmetric", 16, 64, 8, seed=3)
w = 1.0 / np.arange(1, 65)
loads_E = rng.multinomial(16 * 500, w / w.sum())
loads_SE = np.stack([rng.multinomial(int(n), np.full(16, 1 / 16)) for n in loads_E], 1)
h = hashlib.sha256()
for loads in (loads_SE.sum(0), loads_SE):
    s = solve_schedule(p, loads)
    h.update(s.x_EG.tobytes())
    h.update(repr(s.critical_gpus).encode())
    if s.sends is not None:
        h.update(s.sends.tobytes())
print(h.hexdigest())
"""


def test_another_process_computes_the_same_plan():
    import contextlib
    import io
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONHASHSEED="123")
    other = subprocess.run(
        [sys.executable, "-c", _PLAN_SCRIPT], capture_output=True, text=True, env=env, check=True
    ).stdout
    here = io.StringIO()
    with contextlib.redirect_stdout(here):
        exec(_PLAN_SCRIPT, {})
    assert other == here.getvalue() and len(other.strip()) == 64


def test_scheduler_registry():
    from moebal.schedule import METHODS, SCHEDULERS, register_scheduler

    assert set(METHODS) == {"flow", "highs"} and set(SCHEDULERS) >= set(METHODS)
    with pytest.raises(ValueError, match="already registered"):
        register_scheduler("flow")(lambda *a: None)


def test_a_total_beyond_int64_is_named_exactly():
    p = symmetric(4, 8, 4)
    near = 2**62 - 1  # eight of them wrap an int64 sum around
    with pytest.raises(ValueError, match=f"total load {8 * near} is too large"):
        solve_schedule(p, np.full(8, near, dtype=np.int64))
    with pytest.raises(ValueError, match=f"total load {32 * 2**61} is too large"):
        solve_schedule(p, np.full((4, 8), 2**61, dtype=np.int64))
    with pytest.raises(ValueError, match=f"total load {8 * 2**63} is too large"):
        solve_schedule(p, np.full(8, 2**63, dtype=np.uint64))
    with pytest.raises(ValueError, match=f"total load {8 * near} must stay below"):
        densest_subset(p, np.full(8, near, dtype=np.int64))
    with pytest.raises(ValueError, match=f"total load {8 * near} of the history"):
        build_placement("eplb", 4, 8, 4, loads_E=np.full(8, near, dtype=np.int64))
