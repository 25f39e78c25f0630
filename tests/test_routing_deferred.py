"""The finite check off the hot path: NaN/inf logits are refused at ``log.commit()`` (the
deferred check, the default on accelerators) as they are before routing (the synchronous
one), with the same error and no balancer changed; and the router's time is measured with
CUDA events on GPU, resolved only when read."""

import dataclasses

import pytest
import torch

from moebal.model import MoEModel, ModelConfig
from moebal.routing import (
    FINITE_CHECKS,
    NonFiniteLogits,
    Router,
    RouterConfig,
    RouterTimer,
    RoutingLog,
)
from moebal.routing.kernels import expert_counts, scatter_counts
from moebal.train import NonFiniteLoss, get_preset
from moebal.train.trainer import Trainer

STATEFUL = ("loss_free", "bip", "quantile", "global_aux_loss")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def small_model(balancer: str, finite_check: str, **router_options) -> MoEModel:
    torch.manual_seed(0)
    model = MoEModel(ModelConfig(vocab_size=61, seq_len=16, d_model=32, n_layers=3, n_heads=4,
                                 num_experts=4, top_k=2, expert_hidden=16, balancer=balancer,
                                 router_options=router_options))
    model.train()
    for r in model.routers():
        r.auto_step = False
        r.finite_check = finite_check
    return model


def balancer_buffers(model: MoEModel) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in r.balancer.state_dict().items()} for r in model.routers()]


def bit_identical(a, b) -> bool:
    return all(x.keys() == y.keys() and all(
        x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def nan_logits(T: int = 16, E: int = 4) -> torch.Tensor:
    logits = torch.randn(T, E)
    logits[3, 2] = float("nan")
    logits[5, 0] = float("inf")
    return logits


# ------------------------------------------------------------------------------- the option
def test_finite_check_is_validated_with_one_line_errors():
    config = RouterConfig(num_experts=4, top_k=2)
    assert FINITE_CHECKS == ("auto", "sync", "deferred", "off")
    assert Router(config).finite_check == "auto"
    for bad in ("lazy", "", None, 1):
        with pytest.raises(ValueError, match=repr(bad)) as err:
            Router(config, finite_check=bad)
        assert "\n" not in str(err.value)
    router = Router(config, finite_check="off")
    with pytest.raises(ValueError, match="'never'"):
        router.finite_check = "never"
    assert router.finite_check == "off"


@pytest.mark.parametrize("mode", ["auto", "sync"])
def test_on_cpu_auto_and_sync_refuse_before_routing_even_with_a_log(mode):
    router = Router(RouterConfig(num_experts=4, top_k=2, balancer="loss_free"), finite_check=mode)
    log = RoutingLog()
    with pytest.raises(NonFiniteLogits):
        router(nan_logits(), log=log)
    assert log.routings == []


def test_deferred_refuses_at_commit_with_the_synchronous_message():
    config = RouterConfig(num_experts=4, top_k=2, balancer="loss_free")
    logits = nan_logits()
    with pytest.raises(NonFiniteLogits) as sync_err:
        Router(config, finite_check="sync")(logits, log=RoutingLog())
    router = Router(config, finite_check="deferred")
    before = {k: v.clone() for k, v in router.balancer.state_dict().items()}
    log = RoutingLog()
    router(logits, log=log)  # routes: the check waits for the commit
    assert len(log.routings) == 1
    with pytest.raises(NonFiniteLogits) as err:
        log.commit()
    assert str(err.value) == str(sync_err.value)
    assert "2 entries, first at (3, 2): nan" in str(err.value)
    assert bit_identical([before], [router.balancer.state_dict()])
    log.commit()  # the failed commit dropped what it held: nothing is applied later
    assert bit_identical([before], [router.balancer.state_dict()])
    finite = RoutingLog()
    router(torch.randn(16, 4), log=finite)
    finite.commit()  # the test can fail: a good commit changes the state
    assert not bit_identical([before], [router.balancer.state_dict()])


@pytest.mark.parametrize("where", ["no log", "eval"])
def test_deferred_is_synchronous_without_a_log_or_in_eval(where):
    router = Router(RouterConfig(num_experts=4, top_k=2, balancer="loss_free"),
                    finite_check="deferred")
    log = None
    if where == "eval":
        router.eval()
        log = RoutingLog()
    with pytest.raises(NonFiniteLogits):
        router(nan_logits(), log=log)


def test_off_checks_nothing():
    router = Router(RouterConfig(num_experts=4, top_k=2), finite_check="off")
    log = RoutingLog()
    router(nan_logits(), log=log)
    log.commit()
    router(nan_logits())
    assert len(log.routings) == 1


def test_a_balancer_that_reads_on_the_host_is_checked_before_routing():
    router = Router(RouterConfig(num_experts=4, top_k=1, balancer="optimal"),
                    finite_check="deferred")
    assert router.balancer.reads_on_host
    with pytest.raises(NonFiniteLogits):
        router(nan_logits(), log=RoutingLog())


def test_a_sum_that_overflows_is_not_an_error():
    logits = torch.full((4, 4), 3e38)  # every entry finite, their float32 sum is inf
    for mode in ("sync", "deferred"):
        log = RoutingLog()
        Router(RouterConfig(num_experts=4, top_k=2), finite_check=mode)(logits, log=log)
        log.commit()


def test_a_later_failure_names_non_finite_logits_staged_before_it():
    config = RouterConfig(num_experts=4, top_k=2, balancer="loss_free")
    first, second = (Router(config, finite_check="deferred") for _ in range(2))

    def broken(scores_TE, top_k, ctx):
        raise RuntimeError("the selection failed")

    second.balancer.select = broken
    log = RoutingLog()
    first(nan_logits(), log=log)
    with pytest.raises(NonFiniteLogits) as err:
        second(torch.randn(16, 4), log=log)
    assert isinstance(err.value.__context__, RuntimeError)
    log = RoutingLog()
    first(torch.randn(16, 4), log=log)
    with pytest.raises(RuntimeError, match="selection failed"):
        second(torch.randn(16, 4), log=log)


# ------------------------------------------------------------------------------ in a model
@pytest.mark.parametrize("balancer", STATEFUL)
@pytest.mark.parametrize("layer", [0, -1])
def test_deferred_nan_in_any_layer_leaves_every_balancer_unchanged(balancer, layer):
    options = {"aux_loss_coeff": 0.1} if "aux" in balancer else {}
    tokens = torch.randint(0, 61, (2, 16))
    messages = {}
    for mode in ("sync", "deferred"):
        model = small_model(balancer, mode, **options)
        model(tokens)  # one committed forward: state is no longer the initial one
        before = balancer_buffers(model)
        with torch.no_grad():
            model.moe_layers()[layer].gate.weight[0, 0] = float("nan")
        with pytest.raises(NonFiniteLogits) as err:
            model(tokens)
        messages[mode] = str(err.value)
        assert bit_identical(before, balancer_buffers(model))
    assert messages["deferred"] == messages["sync"]  # the first bad layer's logits, named


def test_a_forward_that_raises_after_a_deferred_layer_changes_nothing():
    model = small_model("loss_free", "deferred")
    tokens = torch.randint(0, 61, (2, 16))
    model(tokens)
    before = balancer_buffers(model)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory in the last block")

    model.lm_head.forward = broken  # after every MoE layer has routed and staged
    with pytest.raises(RuntimeError, match="out of memory"):
        model(tokens)
    assert bit_identical(before, balancer_buffers(model))
    del model.lm_head.forward
    model(tokens)
    assert not bit_identical(before, balancer_buffers(model))


def test_the_trainer_stops_on_deferred_nan_logits_and_changes_no_router(small_corpus):
    model_cfg, train_cfg = get_preset("micro")
    model_cfg = dataclasses.replace(model_cfg, balancer="loss_free")
    train_cfg = dataclasses.replace(train_cfg, steps=4, eval_every=0, eval_batches=1)
    t = Trainer(model_cfg, train_cfg, small_corpus)
    for r in t.model.routers():
        r.finite_check = "deferred"
    t.train_step()
    before = balancer_buffers(t.model)
    with torch.no_grad():
        t.model.moe_layers()[0].gate.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss):
        t.train_step()
    assert t.step == 1 and bit_identical(before, balancer_buffers(t.model))


# ---------------------------------------------------------------------------------- timing
def test_cpu_timer_adds_wall_time():
    timer = RouterTimer()
    assert timer.seconds == 0.0
    token = timer.start(torch.device("cpu"))
    sum(range(20000))
    timer.stop(torch.device("cpu"), token)
    first = timer.seconds
    assert first > 0 and timer.unresolved == 0 and timer.seconds == first


def test_timed_route_fills_the_log_and_an_untimed_one_does_not():
    router = Router(RouterConfig(num_experts=4, top_k=2))
    x_TD, w_ED = torch.randn(64, 8), torch.randn(4, 8)
    timed, plain = RoutingLog(timed=True), RoutingLog()
    router.route(x_TD, w_ED, log=timed)
    router.route(x_TD, w_ED, log=plain)
    assert timed.router_seconds > 0 and plain.router_seconds == 0.0


def test_the_trainer_reads_router_seconds_from_the_step(small_corpus):
    model_cfg, train_cfg = get_preset("micro")
    train_cfg = dataclasses.replace(train_cfg, steps=2, eval_every=0, eval_batches=1,
                                    grad_accum=2)
    stats = Trainer(model_cfg, train_cfg, small_corpus).train_step()
    assert 0 < stats.router_seconds < stats.seconds


def test_expert_counts_agree_with_bincount():
    torch.manual_seed(0)
    idx = torch.randint(0, 7, (500,))
    keep = torch.rand(500) < 0.6
    for counts in (expert_counts(idx, 9), scatter_counts(idx, 9)):
        assert counts.dtype == torch.int64 and torch.equal(counts, torch.bincount(idx, minlength=9))
    for counts in (expert_counts(idx, 9, keep), scatter_counts(idx, 9, keep)):
        assert torch.equal(counts, torch.bincount(idx[keep], minlength=9))


@cuda
def test_cuda_timer_records_events_and_resolves_them_once():
    device = torch.device("cuda")
    a = torch.randn(2048, 2048, device=device)
    timer = RouterTimer()
    token = timer.start(device)
    for _ in range(10):
        a = a @ a / 2048
    timer.stop(device, token)
    assert timer.unresolved == 1
    seconds = timer.seconds
    assert seconds > 0 and timer.unresolved == 0 and timer.seconds == seconds


@cuda
@pytest.mark.parametrize("balancer", ["none", "loss_free"])
def test_cuda_routing_with_a_log_never_synchronises(balancer):
    router = Router(RouterConfig(num_experts=8, top_k=2, balancer=balancer)).cuda()
    router.auto_step = False
    x_TD = torch.randn(256, 16, device="cuda")
    w_ED = torch.randn(8, 16, device="cuda")
    router.route(x_TD, w_ED, log=RoutingLog(timed=True))  # warm-up (lazy inits may sync)
    log = RoutingLog(timed=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        router.route(x_TD, w_ED, log=log)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert log.timer.unresolved == 1
    log.commit()
    assert log.router_seconds > 0
    bad = x_TD.clone()
    bad[7, 3] = float("nan")
    log = RoutingLog()
    router.route(bad, w_ED, log=log)
    with pytest.raises(NonFiniteLogits, match=r"first at \(7, "):
        log.commit()
