"""Honest numbers: capacity drops are reported, and a failed forward changes no balancer."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from moebal.metrics import BalanceTracker, max_violation, max_violation_per_layer
from moebal.model import MoEModel, ModelConfig
from moebal.routing import NonFiniteLogits, Router, RouterConfig, RoutingLog
from moebal.train import get_preset
from moebal.train.trainer import Trainer

STATEFUL = ("loss_free", "bip", "quantile", "global_aux_loss")


def small_model(balancer: str, **router_options) -> MoEModel:
    torch.manual_seed(0)
    return MoEModel(ModelConfig(vocab_size=61, seq_len=16, d_model=32, n_layers=3, n_heads=4,
                                num_experts=4, top_k=2, expert_hidden=16, balancer=balancer,
                                router_options=router_options))


def balancer_buffers(model: MoEModel) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in r.balancer.state_dict().items()} for r in model.routers()]


def bit_identical(a, b) -> bool:
    return all(x.keys() == y.keys() and all(
        x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


# --------------------------------------------------------------------------- dropped slots
def test_max_violation_against_the_ideal_load():
    assert max_violation([1] * 8, ideal=512 / 8) == pytest.approx(1 / 64 - 1)
    assert max_violation([6, 2, 2, 2]) == max_violation([6, 2, 2, 2], ideal=3.0)
    assert max_violation([0, 0], ideal=0) == 0.0
    with pytest.raises(ValueError, match="-1"):
        max_violation([1, 1], ideal=-1)
    loads_LE = np.array([[4, 4], [6, 2]])
    assert np.array_equal(max_violation_per_layer(loads_LE, routed_slots=8),
                          max_violation_per_layer(loads_LE))  # nothing dropped: same numbers


def test_tracker_reports_drops_and_measures_against_t_k_over_e():
    tr = BalanceTracker(num_layers=2)
    vio = tr.record([[1, 1, 1, 1], [4, 4, 4, 4]], routed_slots=16)
    assert tr.dropped_history.tolist() == [[0.75, 0.0]]
    assert vio == pytest.approx(((1 / 4 - 1) + 0.0) / 2)
    assert tr.dropped_frac == pytest.approx(0.375)
    tr.accumulate_global([[1, 1, 1, 1], [2, 2, 2, 2]], routed_slots=8)
    tr.accumulate_global([[1, 1, 1, 1], [2, 2, 2, 2]], routed_slots=8)
    assert tr.max_vio_global() == pytest.approx(((2 / 4 - 1) + 0.0) / 2)
    clone = BalanceTracker(num_layers=2)
    clone.load_state_dict(tr.state_dict())
    assert np.array_equal(clone.dropped_history, tr.dropped_history)


def test_model_output_counts_dropped_slots():
    model = small_model("none", capacity_factor=0.01)
    out = model(torch.randint(0, 61, (4, 16)))
    T, K, E = 64, 2, 4
    assert out.routed_slots == T * K
    assert out.dropped_L.dtype == torch.int64 and out.dropped_L.shape == (3,)
    assert torch.equal(out.dropped_L, T * K - out.loads_LE.sum(dim=1))
    assert torch.equal(out.dropped_L, torch.stack([r.dropped for r in out.routings]))
    capacity = 2  # ceil(0.01 * 128 / 4)
    assert bool((out.loads_LE <= capacity).all()) and int(out.dropped_L.min()) >= T * K - E * capacity
    dropless = small_model("none")(torch.randint(0, 61, (4, 16)))
    assert int(dropless.dropped_L.abs().sum()) == 0


def test_capacity_0_01_is_reported_as_dropping_not_as_balance(small_corpus):
    model_cfg, train_cfg = get_preset("micro")
    model_cfg = dataclasses.replace(model_cfg, router_options={"capacity_factor": 0.01})
    train_cfg = dataclasses.replace(train_cfg, steps=2, eval_every=0, eval_batches=1)
    t = Trainer(model_cfg, train_cfg, small_corpus)
    stats = t.train_step()
    record = stats.record(0, 0.0)
    T, K, E = train_cfg.batch_size * model_cfg.seq_len, model_cfg.top_k, model_cfg.num_experts
    capacity = math.ceil(0.01 * T * K / E)  # 2 of the ideal 128 per expert
    kept = E * capacity  # 8 of 512 slots
    assert record["dropped_frac"] == pytest.approx(1 - kept / (T * K))  # 0.98
    assert record["dropped_frac"] > 0.97 and len(record["dropped_frac_layers"]) == 2
    # every expert kept 2 of its ideal 128 slots: MaxVio is 1/64 - 1, far from a balanced 0
    assert record["max_vio_batch"] == pytest.approx(capacity / (T * K / E) - 1)
    assert t.evaluate()["max_vio_global"] < -0.9
    assert t.result().dropped_frac == pytest.approx(record["dropped_frac"])


def test_dropless_training_numbers_are_unchanged(small_corpus):
    model_cfg, train_cfg = get_preset("micro")
    train_cfg = dataclasses.replace(train_cfg, steps=2, eval_every=0, eval_batches=1)
    stats = Trainer(model_cfg, train_cfg, small_corpus).train_step()
    assert stats.dropped_frac == 0.0
    assert stats.max_vio_batch == max_violation_per_layer(stats.loads_LE).mean()


# --------------------------------------------------------------------------- all or nothing
@pytest.mark.parametrize("balancer", STATEFUL)
def test_nan_in_the_last_layer_leaves_every_balancer_unchanged(balancer):
    model = small_model(balancer, **({"aux_loss_coeff": 0.1} if "aux" in balancer else {}))
    model.train()
    for r in model.routers():  # steps once per optimizer step, as in training
        r.auto_step = False
    tokens = torch.randint(0, 61, (2, 16))
    model(tokens)  # one committed forward: state is no longer the initial one
    before = balancer_buffers(model)
    with torch.no_grad():
        model.moe_layers()[-1].gate.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLogits):
        model(tokens)
    assert bit_identical(before, balancer_buffers(model))
    with torch.no_grad():
        model.moe_layers()[-1].gate.weight[0, 0] = 0.0
    model(tokens)  # the test can fail: a successful forward does change the state
    assert not bit_identical(before, balancer_buffers(model))


def test_grad_accumulation_keeps_the_micro_batches_that_succeeded():
    model = small_model("loss_free")
    model.train()
    for r in model.routers():
        r.auto_step = False
    tokens = torch.randint(0, 61, (2, 16))
    out = model(tokens)
    after_first = balancer_buffers(model)
    assert torch.equal(after_first[0]["loads_sum_E"], out.loads_LE[0].double())
    with torch.no_grad():
        model.moe_layers()[-1].gate.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteLogits) as err:
        model(tokens)
    assert isinstance(err.value, ValueError)
    assert bit_identical(after_first, balancer_buffers(model))


def test_a_standalone_router_commits_on_return_and_a_log_waits():
    router = Router(RouterConfig(num_experts=4, top_k=1, balancer="bip"))
    logits = torch.randn(16, 4) + torch.tensor([0.0, 0.0, 0.0, 3.0])
    log = RoutingLog()
    router(logits, log=log)
    assert int(router.balancer.num_updates) == 0 and len(log.routings) == 1
    with pytest.raises(ValueError, match="twice"):
        router(logits, log=log)
    log.commit()
    assert int(router.balancer.num_updates) == 1
    router(logits)
    assert int(router.balancer.num_updates) == 2


@pytest.mark.parametrize("balancer", ["bip", "loss_free", "quantile"])
def test_activation_checkpointing_counts_each_forward_once(balancer):
    def run(checkpointed: bool, replay: bool = True):
        options = {"bip_order": "causal"} if balancer == "bip" else {}
        model = small_model(balancer, **options)
        model.train()
        layer = model.moe_layers()[0]
        layer.router.replay = replay
        with torch.no_grad():  # a skewed gate, so the first update moves the state a lot
            layer.gate.weight[-1] += 0.3
        chosen = []
        layer.router.register_forward_hook(lambda m, a, out: chosen.append(out.indices_TK))
        x_TD = torch.randn(32, 32, requires_grad=True)
        grads = []
        for _ in range(2):
            log = RoutingLog()
            if checkpointed:
                y_TD = checkpoint(layer, x_TD, 16, log, use_reentrant=False)
            else:
                y_TD = layer(x_TD, 16, log)
            log.commit()
            (g,) = torch.autograd.grad(y_TD.square().sum(), x_TD)
            grads.append(g)
            assert len(log.routings) == 1  # the recompute added nothing to the log
        return balancer_buffers(model)[0], grads, chosen

    state, grads, _ = run(False)
    state_ckpt, grads_ckpt, chosen = run(True)
    assert bit_identical([state], [state_ckpt])  # each batch counted once
    assert len(chosen) == 4  # forward, recompute, forward, recompute
    for g, h in zip(grads, grads_ckpt):
        torch.testing.assert_close(g, h)
    # the recompute routed as its forward did (from the state that forward saw) ...
    assert torch.equal(chosen[0], chosen[1]) and torch.equal(chosen[2], chosen[3])
    if balancer == "bip":  # ... which, without replay, it would not have
        _, _, plain = run(True, replay=False)
        assert not torch.equal(plain[0], plain[1])
