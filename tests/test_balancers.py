"""Each balancer against a plain reference written here, on small inputs."""

import math

import pytest
import torch

from moebal.routing import Router, RouterConfig
from moebal.routing.balancers.aux_loss import switch_aux_loss
from moebal.routing.balancers.bip import bip_dual_iterations


def softmax_rows(logits):
    out = []
    for row in logits.tolist():
        m = max(row)
        e = [math.exp(v - m) for v in row]
        out.append([v / sum(e) for v in e])
    return out


def kth_largest(values, k):
    return sorted(values, reverse=True)[k - 1]


def chosen_sets(indices_TK):
    return [set(row) for row in indices_TK.tolist()]


def topk_sets(rows, k):
    return [set(sorted(range(len(r)), key=lambda j: -r[j])[:k]) for r in rows]


def assert_topk(chosen, rows, k, tol=1e-5):
    """Each chosen set is a top-k of its row, ties (within tol) broken either way."""
    for c, row in zip(chosen, rows):
        assert len(c) == k
        others = [row[j] for j in range(len(row)) if j not in c]
        if others:
            assert min(row[j] for j in c) >= max(others) - tol


# --------------------------------------------------------------------------- aux losses


def test_aux_loss_matches_explicit_sums():
    torch.manual_seed(0)
    T, E, K, alpha = 12, 5, 2, 0.3
    logits = torch.randn(T, E)
    out = Router(RouterConfig(num_experts=E, top_k=K, balancer="aux_loss", aux_loss_coeff=alpha))(
        logits
    )
    s = softmax_rows(logits)
    chosen = chosen_sets(out.indices_TK)
    assert chosen == topk_sets(s, K)
    loss = 0.0
    for j in range(E):
        f = E / (K * T) * sum(j in c for c in chosen)
        P = sum(s[i][j] for i in range(T)) / T
        loss += f * P
    assert float(out.aux_loss) == pytest.approx(alpha * loss, rel=1e-5)


def test_aux_loss_is_alpha_when_balanced_and_has_a_gradient():
    E, K, T = 4, 2, 8
    scores = torch.full((T, E), 1.0 / E, requires_grad=True)
    counts = torch.full((E,), T * K // E)
    loss = switch_aux_loss(scores, counts, T, K, coeff=0.01)
    assert float(loss.detach()) == pytest.approx(0.01)
    loss.backward()
    assert scores.grad is not None and torch.all(scores.grad > 0)


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("balancer", ["aux_loss", "seq_aux_loss", "global_aux_loss"])
def test_every_aux_loss_is_alpha_at_perfect_balance(balancer, score_function):
    # token t prefers experts t % E and (t+1) % E: every expert is chosen equally often and
    # every row of scores is a rotation of the first, so P is uniform after normalising
    E, K, alpha, cycles = 8, 2, 1e-2, 3
    row = torch.tensor([3.0, 2.5] + [-1.0 - 0.1 * j for j in range(E - 2)])
    logits = torch.stack([row.roll(t) for t in range(E * cycles)])
    cfg = RouterConfig(num_experts=E, top_k=K, balancer=balancer, aux_loss_coeff=alpha,
                       score_function=score_function)
    router = Router(cfg).train()
    out = router(logits, seq_len=E)
    assert torch.bincount(out.indices_TK.flatten(), minlength=E).tolist() == [K * cycles] * E
    assert float(out.aux_loss) == pytest.approx(alpha, rel=1e-5)


def test_sigmoid_aux_loss_takes_p_from_scores_normalised_over_experts():
    torch.manual_seed(4)
    T, E, K, alpha = 10, 6, 2, 0.2
    logits = torch.randn(T, E)
    out = Router(RouterConfig(num_experts=E, top_k=K, balancer="aux_loss", aux_loss_coeff=alpha,
                              score_function="sigmoid"))(logits)
    sig = [[1 / (1 + math.exp(-v)) for v in row] for row in logits.tolist()]
    s = [[v / sum(r) for v in r] for r in sig]
    chosen = chosen_sets(out.indices_TK)
    loss = sum(E / (K * T) * sum(j in c for c in chosen) * sum(s[i][j] for i in range(T)) / T
               for j in range(E))
    assert float(out.aux_loss) == pytest.approx(alpha * loss, rel=1e-5)


def test_seq_aux_loss_matches_per_sequence_sums():
    torch.manual_seed(1)
    B, S, E, K, alpha = 3, 6, 5, 2, 0.5
    logits = torch.randn(B * S, E)
    for score in ("softmax", "sigmoid"):
        cfg = RouterConfig(
            num_experts=E, top_k=K, balancer="seq_aux_loss", aux_loss_coeff=alpha,
            score_function=score,
        )
        out = Router(cfg)(logits, seq_len=S)
        if score == "softmax":
            s = softmax_rows(logits)
        else:
            sig = [[1 / (1 + math.exp(-v)) for v in row] for row in logits.tolist()]
            s = [[v / sum(row) for v in row] for row in sig]
        chosen = chosen_sets(out.indices_TK)
        total = 0.0
        for b in range(B):
            rows = range(b * S, (b + 1) * S)
            for j in range(E):
                f = E / (K * S) * sum(j in chosen[i] for i in rows)
                P = sum(s[i][j] for i in rows) / S
                total += alpha * f * P
        assert float(out.aux_loss) == pytest.approx(total / B, rel=1e-5)


def test_seq_aux_loss_without_seq_len_is_the_batch_loss():
    torch.manual_seed(2)
    logits = torch.randn(20, 6)
    a = Router(RouterConfig(num_experts=6, top_k=2, balancer="seq_aux_loss"))(logits)
    b = Router(RouterConfig(num_experts=6, top_k=2, balancer="aux_loss"))(logits)
    assert float(a.aux_loss) == pytest.approx(float(b.aux_loss), rel=1e-6)


def test_global_aux_loss_averages_counts_over_micro_batches_until_step():
    torch.manual_seed(3)
    E, K, alpha = 5, 2, 1.0
    router = Router(RouterConfig(num_experts=E, top_k=K, balancer="global_aux_loss",
                                 aux_loss_coeff=alpha))
    router.step()  # explicit steps from here on
    batches = [torch.randn(10, E), torch.randn(14, E)]
    outs = [router(b) for b in batches]
    counts = [0] * E
    tokens = 0
    for b, out in zip(batches, outs):
        for row in out.indices_TK.tolist():
            for j in row:
                counts[j] += 1
        tokens += b.shape[0]
    s = softmax_rows(batches[1])
    expect = alpha * E * sum(
        counts[j] / (K * tokens) * sum(r[j] for r in s) / len(s) for j in range(E)
    )
    assert float(outs[1].aux_loss) == pytest.approx(expect, rel=1e-5)
    router.step()
    fresh = router(batches[1])
    single = Router(RouterConfig(num_experts=E, top_k=K, balancer="aux_loss",
                                 aux_loss_coeff=alpha))(batches[1])
    assert float(fresh.aux_loss) == pytest.approx(float(single.aux_loss), rel=1e-6)


# --------------------------------------------------------------------------- loss-free


@pytest.mark.parametrize("variant", ["sign", "proportional"])
def test_loss_free_bias_update_from_accumulated_loads(variant):
    torch.manual_seed(4)
    E, K, u = 6, 2, 0.01
    router = Router(RouterConfig(num_experts=E, top_k=K, balancer="loss_free",
                                 bias_update_rate=u, bias_update=variant))
    router.step()  # from now on the bias moves only at step()
    bias = [0.0] * E
    for _ in range(3):
        loads = [0] * E
        for _ in range(2):  # two micro-batches per step
            logits = torch.randn(16, E) + torch.arange(E) * 0.5
            out = router(logits)
            s = softmax_rows(logits)
            biased = [[s[i][j] + bias[j] for j in range(E)] for i in range(len(s))]
            assert chosen_sets(out.indices_TK) == topk_sets(biased, K)
            # gate weights are the unbiased scores
            for i, row in enumerate(out.indices_TK.tolist()):
                for slot, j in enumerate(row):
                    assert float(out.weights_TK[i, slot]) == pytest.approx(s[i][j], rel=1e-5)
            for c in chosen_sets(out.indices_TK):
                for j in c:
                    loads[j] += 1
        router.step()
        mean = sum(loads) / E
        for j in range(E):
            e = mean - loads[j]
            if variant == "sign":
                bias[j] += u * ((e > 0) - (e < 0))
            else:
                bias[j] += u * e / mean
        assert router.balancer.bias_E.tolist() == pytest.approx(bias, abs=1e-6)


def test_loss_free_first_batch_is_plain_topk_and_auto_steps():
    torch.manual_seed(5)
    logits = torch.randn(32, 8) + torch.arange(8.0)
    router = Router(RouterConfig(num_experts=8, top_k=2, balancer="loss_free"))
    first = router(logits)
    plain = Router(RouterConfig(num_experts=8, top_k=2))(logits)
    assert chosen_sets(first.indices_TK) == chosen_sets(plain.indices_TK)
    # no explicit step yet: that forward was a step of its own
    assert int(router.balancer.num_updates) == 1
    assert float(router.balancer.bias_E[-1]) == pytest.approx(-1e-3)


# --------------------------------------------------------------------------- BIP


def reference_bip(s, q, K, iters, pin):
    T, E = len(s), len(s[0])
    c = (T * K) // E
    for _ in range(iters):
        p = [max(0.0, kth_largest([s[i][j] - q[j] for j in range(E)], K + 1)) for i in range(T)]
        q = [max(0.0, kth_largest([s[i][j] - p[i] for i in range(T)], c + 1)) for j in range(E)]
        if pin:
            m = min(q)
            q = [v - m for v in q]
    return q


@pytest.mark.parametrize("pin", [True, False])
@pytest.mark.parametrize("T,E,K", [(12, 4, 1), (10, 5, 2), (7, 6, 3)])
def test_bip_dual_iterations_match_loops(T, E, K, pin):
    torch.manual_seed(T * E + K)
    s = torch.softmax(torch.randn(T, E, dtype=torch.float64) * 2, dim=-1)
    q0 = torch.rand(E, dtype=torch.float64) * 0.1
    got = bip_dual_iterations(s, q0, K, iters=3, pin_q=pin)
    want = reference_bip(s.tolist(), q0.tolist(), K, 3, pin)
    assert got.tolist() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("order", ["paper", "causal"])
def test_bip_router_orders(order):
    torch.manual_seed(6)
    T, E, K, iters, warmup = 16, 4, 2, 2, 5
    router = Router(RouterConfig(num_experts=E, top_k=K, balancer="bip", bip_iters=iters,
                                 bip_warmup_iters=warmup, bip_order=order))
    q = [0.0] * E
    for batch in range(3):
        logits = torch.randn(T, E) + torch.tensor([0.0, 0.5, 1.0, 2.0])
        out = router(logits)
        s = torch.softmax(logits, -1).tolist()
        # the first update (from q = 0) runs the warm-up iterations
        q_new = reference_bip(s, q, K, warmup if batch == 0 else iters, pin=True)
        route_q = q_new if order == "paper" else q
        # q_j is the (c+1)-th largest s_ij - p_i: the token that sets it sits exactly on
        # its own k / k+1 boundary, so ties are part of the method
        assert_topk(chosen_sets(out.indices_TK),
                    [[s[i][j] - route_q[j] for j in range(E)] for i in range(T)], K)
        q = q_new
        assert router.balancer.q_E.tolist() == pytest.approx(q, abs=1e-5)


def test_bip_eval_routes_with_stored_q_and_does_not_update():
    torch.manual_seed(7)
    router = Router(RouterConfig(num_experts=4, top_k=1, balancer="bip"))
    router(torch.randn(32, 4) + torch.arange(4.0))
    q = router.balancer.q_E.clone()
    router.eval()
    logits = torch.randn(32, 4)
    out = router(logits)
    assert torch.equal(router.balancer.q_E, q)
    assert_topk(chosen_sets(out.indices_TK), (torch.softmax(logits, -1) - q).tolist(), 1)


# --------------------------------------------------------------------------- quantile


def test_quantile_matches_loops_with_ema_and_centring():
    torch.manual_seed(8)
    T, E, K, ema = 12, 4, 1, 0.25
    router = Router(RouterConfig(num_experts=E, top_k=K, balancer="quantile", quantile_ema=ema))
    router.step()
    beta = [0.0] * E
    c = (T * K) // E
    for _ in range(2):
        acc = [0.0] * E
        for _ in range(3):  # micro-batches
            logits = torch.randn(T, E) + torch.tensor([0.0, 0.3, 0.6, 1.5])
            out = router(logits)
            l = logits.tolist()
            # routed with the beta of earlier steps
            assert_topk(chosen_sets(out.indices_TK),
                        [[l[i][j] - beta[j] for j in range(E)] for i in range(T)], K)
            alpha = [kth_largest([l[i][j] - beta[j] for j in range(E)], K + 1) for i in range(T)]
            for j in range(E):
                acc[j] += kth_largest([l[i][j] - alpha[i] for i in range(T)], c + 1)
        router.step()
        new = [ema * beta[j] + (1 - ema) * acc[j] / 3 for j in range(E)]
        m = sum(new) / E
        beta = [v - m for v in new]
        assert router.balancer.beta_E.tolist() == pytest.approx(beta, abs=1e-5)
    assert sum(beta) == pytest.approx(0.0, abs=1e-6)
    assert min(beta) < 0  # unclipped


# --------------------------------------------------------------------------- Sinkhorn


def reference_sinkhorn(logits, tol=1e-4):
    cost = [[math.exp(v) for v in row] for row in logits]
    T, E = len(cost), len(cost[0])
    d0, d1 = [1.0] * T, [1.0] * E
    while True:
        d0 = [1.0 / T / (sum(d1[j] * cost[i][j] for j in range(E)) + 1e-8) for i in range(T)]
        new = [1.0 / E / (sum(d0[i] * cost[i][j] for i in range(T)) + 1e-8) for j in range(E)]
        err = sum(abs(a - b) for a, b in zip(new, d1)) / E
        d1 = new
        if err <= tol:
            break
    return [[d1[j] * cost[i][j] * d0[i] for j in range(E)] for i in range(T)]


def test_sinkhorn_chooses_by_balanced_costs_in_training_only():
    torch.manual_seed(9)
    logits = torch.randn(24, 4) + torch.tensor([0.0, 0.0, 1.0, 2.0])
    router = Router(RouterConfig(num_experts=4, top_k=2, balancer="sinkhorn"))
    out = router(logits)
    assert chosen_sets(out.indices_TK) == topk_sets(reference_sinkhorn(logits.tolist()), 2)
    s = torch.softmax(logits, -1)
    assert torch.allclose(out.weights_TK, s.gather(1, out.indices_TK))
    router.eval()
    assert chosen_sets(router(logits).indices_TK) == topk_sets(s.tolist(), 2)
