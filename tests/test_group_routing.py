"""Group-limited (node-limited) routing: DeepSeek-V3's rule and Megatron-core's, under
every balancer."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moebal.metrics import max_violation
from moebal.routing import BALANCERS, Router, RouterConfig, routing_settings
from moebal.routing.balancers import RoutingContext
from moebal.routing.groups import group_mask_TE


def deepseek_v3_choice(scores, bias, n_group, topk_group, top_k, per_group_sum=2):
    """DeepSeek-V3's router, by loops: group score = sum of the group's top-2 biased scores
    (``per_group_sum``: Megatron-core sums top_k // topk_group of them instead); keep the
    best topk_group groups; the top-k biased scores among their experts."""
    T, E = len(scores), len(scores[0])
    size = E // n_group
    chosen = []
    for i in range(T):
        biased = [scores[i][j] + bias[j] for j in range(E)]
        group_score = [sum(sorted(biased[g * size:(g + 1) * size], reverse=True)[:per_group_sum])
                       for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        allowed = [j for j in range(E) if j // size in groups]
        chosen.append(set(sorted(allowed, key=lambda j: -biased[j])[:top_k]))
    return chosen


def as_sets(indices_TK):
    return [set(row) for row in indices_TK.tolist()]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([(8, 4, 2, 2), (16, 4, 2, 4), (12, 3, 1, 2), (16, 8, 3, 3)]),
       st.sampled_from(["top2", "topk_share"]), st.integers(0, 2**16))
def test_the_router_is_deepseek_v3s_rule(shape, group_score, seed):
    E, G, topk_group, K = shape
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(24, E, generator=gen) * 2
    bias = torch.randn(E, generator=gen) * 0.1
    router = Router(RouterConfig(num_experts=E, top_k=K, score_function="sigmoid",
                                 balancer="loss_free", norm_topk_prob=True, num_groups=G,
                                 group_topk=topk_group, group_score=group_score)).eval()
    router.balancer.bias_E.copy_(bias)
    out = router(logits)
    scores = torch.sigmoid(logits)
    per = 2 if group_score == "top2" else K // topk_group
    assert as_sets(out.indices_TK) == deepseek_v3_choice(
        scores.tolist(), bias.tolist(), G, topk_group, K, per)
    # gate weights from the unbiased scores, renormalised (DeepSeek-V3's norm_topk_prob)
    w = scores.gather(1, out.indices_TK)
    assert torch.allclose(out.weights_TK, w / w.sum(1, keepdim=True))


def test_the_two_group_scores_can_choose_differently():
    # group 0: one strong expert; group 1: two good ones. top2 prefers group 1, top-1 group 0
    scores = torch.tensor([[0.9, 0.0, 0.5, 0.5]])
    logits = torch.logit(scores.clamp(1e-4, 1 - 1e-4))
    pick = {}
    for group_score, K in (("top2", 2), ("topk_share", 1)):
        router = Router(RouterConfig(num_experts=4, top_k=K, score_function="sigmoid",
                                     num_groups=2, group_topk=1, group_score=group_score))
        pick[group_score] = as_sets(router(logits).indices_TK)[0]
    assert pick == {"top2": {2, 3}, "topk_share": {0}}


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_every_balancer_chooses_inside_its_groups(name):
    E, G, topk_group, K, T = 16, 4, 2, 2, 64
    options = {"aux_loss_coeff": 0.01} if "aux" in name else {}
    router = Router(RouterConfig(num_experts=E, top_k=K, balancer=name, num_groups=G,
                                 group_topk=topk_group, **options))
    gen = torch.Generator().manual_seed(1)
    # the exact optimum keeps the limit where a balanced routing inside the groups exists
    # (it breaks it on as few slots as balance needs where none does): no skew for it
    skew = torch.arange(E, dtype=torch.float32) * (0.0 if name == "optimal" else 0.2)
    for _ in range(6):
        logits = torch.randn(T, E, generator=gen) + skew
        # the groups: the best by what the balancer ranks by, with the state it routes with
        choice_TE = router.balancer.choice_scores(router.scores(logits), RoutingContext(logits))
        allowed_TE = group_mask_TE(choice_TE, G, topk_group, K, "top2")
        out = router(logits, seq_len=16)
        assert bool(allowed_TE.gather(1, out.indices_TK).all()), name
        assert all(len(set(row)) == K for row in out.indices_TK.tolist())
    assert out.loads_E.shape == (E,) and int(out.loads_E.sum()) == T * K
    assert max_violation(out.loads_E) >= 0.0  # balance over all E experts
    state = {k: v for k, v in router.state_dict().items() if v.is_floating_point()}
    assert all(torch.isfinite(v).all() for v in state.values()), name


@pytest.mark.parametrize("mode", ["micro_batch", "global_batch", "histogram"])
def test_quantile_prices_stay_finite_when_a_token_has_no_choice_left(mode):
    # 2 groups of 2, one group kept, K = 2: every token takes both experts of its group
    router = Router(RouterConfig(num_experts=4, top_k=2, balancer="quantile",
                                 quantile_mode=mode, num_groups=2, group_topk=1))
    router.step()
    for _ in range(3):
        router(torch.randn(32, 4) + torch.tensor([0.0, 0.0, 2.0, 2.0]))
        router.step()
    assert torch.isfinite(router.balancer.beta_E).all()


def test_the_group_limit_is_validated_and_recorded():
    with pytest.raises(ValueError, match="exceeds"):
        RouterConfig(num_experts=8, top_k=2, num_groups=2, group_topk=3)
    for bad, match in ((dict(num_groups=4), "come together"),
                       (dict(num_groups=3, group_topk=1), "does not divide"),
                       (dict(num_groups=4, group_topk=5), "exceeds"),
                       (dict(num_groups=8, group_topk=1), "fewer than top_k"),
                       (dict(num_groups=8, group_topk=4, group_score="top2"), "2 experts"),
                       (dict(num_groups=2, group_topk=1, group_score="best"), "group_score"),
                       (dict(num_groups=0, group_topk=1), "num_groups")):
        with pytest.raises(ValueError, match=match):
            RouterConfig(num_experts=8, top_k=2, **bad)
    with pytest.raises(ValueError, match="topk_share"):
        RouterConfig(num_experts=8, top_k=1, num_groups=4, group_topk=2, group_score="topk_share")
    plain = routing_settings(RouterConfig(num_experts=8))
    assert "num_groups" not in plain and "group_score" not in plain
    grouped = routing_settings(RouterConfig(num_experts=8, num_groups=2, group_topk=1))
    assert (grouped["num_groups"], grouped["group_topk"], grouped["group_score"]) == (2, 1, "top2")
    assert RouterConfig.from_options(8, "bip", num_groups=2, group_topk=1).num_groups == 2
