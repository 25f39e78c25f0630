"""The exact balanced routing: balanced, optimal, and the same optimum as HiGHS finds."""

import numpy as np
import pytest
import torch

from moebal.metrics import max_violation
from moebal.routing import BALANCERS, Router, RouterConfig
from moebal.routing.balancers.optimal import (
    balanced_capacities,
    optimal_routing,
    optimal_routing_lp,
)


def milp_optimum(s: np.ndarray, K: int) -> float:
    """The balanced routing's best total score by HiGHS as a MILP (binary x, plain model)."""
    import highspy

    T, E = s.shape
    lo, hi = balanced_capacities(T, K, E)
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    x = [[h.addBinary(obj=float(s[i, j])) for j in range(E)] for i in range(T)]
    for i in range(T):
        h.addConstr(sum(x[i]) == K)
    for j in range(E):
        load = sum(x[i][j] for i in range(T))
        h.addConstr(load >= lo)
        h.addConstr(load <= hi)
    h.changeObjectiveSense(highspy.ObjSense.kMaximize)
    h.run()
    assert h.getModelStatus() == highspy.HighsModelStatus.kOptimal
    return h.getInfo().objective_function_value


def total_score(s: torch.Tensor, indices_TK: torch.Tensor) -> float:
    return float(s.double().gather(1, indices_TK).sum())


@pytest.mark.parametrize("T,E,K", [(12, 4, 1), (16, 4, 2), (10, 6, 3), (9, 4, 2), (13, 5, 2),
                                   (6, 3, 3), (1, 4, 1)])
def test_flow_and_lp_reach_the_milp_optimum(T, E, K):
    gen = torch.Generator().manual_seed(T * 100 + E * 10 + K)
    s = torch.softmax(torch.randn(T, E, generator=gen) * 2 + torch.arange(E) * 0.7, dim=-1)
    best = milp_optimum(s.double().numpy(), K)
    lo, hi = balanced_capacities(T, K, E)
    for solve in (optimal_routing, optimal_routing_lp):
        idx = solve(s, K)
        assert idx.shape == (T, K) and idx.dtype == torch.int64
        assert all(len(set(row)) == K for row in idx.tolist())
        loads = torch.bincount(idx.flatten(), minlength=E)
        assert int(loads.min()) >= lo and int(loads.max()) <= hi
        assert total_score(s, idx) == pytest.approx(best, abs=1e-9)


def test_floor_ceil_capacities_when_tk_over_e_is_not_an_integer():
    assert balanced_capacities(10, 2, 6) == (3, 4)
    assert balanced_capacities(12, 2, 6) == (4, 4)
    s = torch.softmax(torch.randn(10, 6, generator=torch.Generator().manual_seed(0)), -1)
    loads = torch.bincount(optimal_routing(s, 2).flatten(), minlength=6)
    assert sorted(loads.tolist()) == [3, 3, 3, 3, 4, 4]  # 20 slots: 20 mod 6 = 2 take 4


def test_optimal_balances_and_beats_every_balancer_within_capacity():
    """Every balancer's routing, cut to capacity T*K/E, keeps at most the optimum's score.

    Plain top-k (dropless) scores more than any balanced routing; the comparison that holds
    is within the capacity the optimum respects: with ``capacity_factor=1`` each balancer
    keeps at most T*K/E tokens per expert, a feasible point of the same program (the kept
    slots extend to a full balanced routing, and scores are >= 0).
    """
    T, E, K = 64, 8, 2
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(T, E, generator=gen) + torch.linspace(0, 2, E)
    scores = torch.softmax(logits, -1)
    best = Router(RouterConfig(num_experts=E, top_k=K, balancer="optimal"))(logits)
    assert max_violation(best.loads_E) == 0.0
    best_score = float(best.weights_TK.double().sum())
    assert best_score == pytest.approx(total_score(scores, best.indices_TK))
    assert best_score == pytest.approx(milp_optimum(scores.double().numpy(), K), abs=1e-6)
    for name in BALANCERS:
        out = Router(RouterConfig(num_experts=E, top_k=K, balancer=name, capacity_factor=1.0))(
            logits
        )
        assert float(out.weights_TK.double().sum()) <= best_score + 1e-6, name


def test_highs_solver_option_and_eval_are_the_same_optimum():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(40, 5, generator=gen) + torch.arange(5.0)
    a = Router(RouterConfig(num_experts=5, top_k=2, balancer="optimal"))(logits)
    b = Router(RouterConfig(num_experts=5, top_k=2, balancer="optimal",
                            optimal_solver="highs")).eval()(logits)
    assert float(a.weights_TK.sum()) == pytest.approx(float(b.weights_TK.sum()), abs=1e-6)
    assert torch.equal(a.loads_E, b.loads_E)


def test_top_k_equal_to_experts_takes_every_expert():
    s = torch.rand(7, 3)
    idx = optimal_routing(s, 3)
    assert [sorted(r) for r in idx.tolist()] == [[0, 1, 2]] * 7
