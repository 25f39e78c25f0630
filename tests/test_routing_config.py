"""Each balancer owns a typed config; the flat spelling maps onto it; one core routes all."""

import dataclasses

import pytest
import torch

from moebal.model import MoEModel, ModelConfig
from moebal.nn import MoEGate
from moebal.routing import (
    BALANCERS,
    Balancer,
    BalancerConfig,
    Router,
    RouterConfig,
    RoutingLog,
    balancer_defaults,
    register_balancer,
    router_defaults,
    router_option_names,
    routing_settings,
)
from moebal.routing.balancers.bip import BIPBalancer
from moebal.routing.balancers.loss_free import LossFree
from moebal.routing.validate import check_choice, check_int, check_number
from moebal.train import apply_overrides, get_preset


def skewed(T=64, E=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(T, E, generator=gen) + torch.linspace(0, 2, E)


# --------------------------------------------------------------------------- typed configs
def test_typed_and_flat_configs_are_the_same_config_and_route_alike():
    typed = RouterConfig(num_experts=8, top_k=2, balancer=BIPBalancer.Config(iters=4, order="causal"))
    flat = RouterConfig(num_experts=8, top_k=2, balancer="bip", bip_iters=4, bip_order="causal")
    opts = RouterConfig.from_options(num_experts=8, top_k=2, balancer="bip", bip_iters=4,
                                     bip_order="causal")
    assert typed == flat == opts and typed.balancer_name == "bip"
    assert typed.options() == {"bip_iters": 4, "bip_warmup_iters": 32, "bip_order": "causal",
                               "bip_pin_q": True}
    a, b = Router(typed), Router(flat)
    assert a.balancer.options.iters == 4
    for _ in range(3):
        logits = skewed()
        assert torch.equal(a(logits).indices_TK, b(logits).indices_TK)
    assert dataclasses.replace(typed, capacity_factor=1.0).balancer == typed.balancer


def test_an_option_the_balancer_does_not_read_is_refused_by_name():
    with pytest.raises(ValueError, match="bip_iters=4") as err:
        RouterConfig.from_options(num_experts=8, balancer="loss_free", bip_iters=4)
    assert "'loss_free'" in str(err.value) and "bip" in str(err.value)
    with pytest.raises(ValueError, match="aux_loss_coeff"):
        RouterConfig(num_experts=8, balancer="bip", aux_loss_coeff=0.1)
    with pytest.raises(TypeError, match="no_such"):
        RouterConfig.from_options(num_experts=8, no_such=1)
    with pytest.raises(TypeError, match="bip_iters"):
        RouterConfig(num_experts=8, balancer=BIPBalancer.Config(), bip_iters=3)
    with pytest.raises(ValueError, match="0"):
        BIPBalancer.Config(iters=0)
    with pytest.raises(ValueError, match="'exp'"):
        LossFree.Config(update="exp")


def test_shared_options_keep_what_the_balancer_reads():
    shared = {"bip_iters": 4, "aux_loss_coeff": 0.1, "capacity_factor": 1.5}
    cfg = RouterConfig.from_options(num_experts=8, balancer="aux_loss", strict=False, **shared)
    assert cfg.options() == {"aux_loss_coeff": 0.1} and cfg.capacity_factor == 1.5
    model_cfg = ModelConfig(num_experts=8, balancer="bip", router_options=shared)
    assert model_cfg.router_config().options()["bip_iters"] == 4
    with pytest.raises(ValueError, match="bip_iters"):  # unread, but still validated
        ModelConfig(num_experts=8, balancer="none", router_options={"bip_iters": 0})
    m, _ = apply_overrides(*get_preset("micro"), ["router.bip_iters=4"])
    m = dataclasses.replace(m, balancer="bip")
    assert m.router_config().balancer == BIPBalancer.Config(iters=4)


def test_settings_and_defaults_come_from_the_configs():
    for name, cls in BALANCERS.items():
        assert balancer_defaults(name) == cls.Config().flat()
        assert set(cls.Config.flat_names.values()) <= set(router_option_names())
    assert balancer_defaults("bip") == {"bip_iters": 2, "bip_warmup_iters": 32,
                                        "bip_order": "paper", "bip_pin_q": True}
    assert balancer_defaults("none") == {}
    settings = routing_settings(RouterConfig(num_experts=8, balancer="bip", bip_iters=4))
    assert settings["balancer"] == "bip" and settings["bip_iters"] == 4
    assert {"bip_warmup_iters", "bip_pin_q", "capacity_factor", "score_function"} <= set(settings)
    assert "aux_loss_coeff" not in settings
    assert router_defaults()["top_k"] == 2 and router_defaults()["capacity_factor"] is None
    with pytest.raises(ValueError, match="'nope'"):
        balancer_defaults("nope")


def test_a_new_balancer_is_one_class_and_one_registration():
    @register_balancer("test_scaled_topk")
    class ScaledTopK(Balancer):
        @dataclasses.dataclass(kw_only=True)
        class Config(BalancerConfig):
            scale: float = 1.0
            flat_names = {"scale": "scaled_topk_scale"}

            def validate(self) -> None:
                check_number("scaled_topk_scale", self.scale, low=0.0, low_open=True)

        def selection_scores(self, scores_TE, ctx):
            return scores_TE * self.options.scale

    try:
        cfg = RouterConfig(num_experts=4, balancer="test_scaled_topk", scaled_topk_scale=2.0)
        assert cfg.balancer == ScaledTopK.Config(scale=2.0)
        assert Router(cfg)(skewed(E=4)).indices_TK.shape == (64, 2)
        assert "scaled_topk_scale" in router_option_names()
    finally:
        del BALANCERS["test_scaled_topk"]


def test_validation_helpers_name_the_value():
    with pytest.raises(ValueError, match=r"x must be an int >= 1, got 0"):
        check_int("x", 0, minimum=1)
    with pytest.raises(ValueError, match=r"got True"):
        check_int("x", True)
    with pytest.raises(ValueError, match=r"\[0, 1\), got 1"):
        check_number("x", 1, low=0, high=1, high_open=True)
    with pytest.raises(ValueError, match="nan"):
        check_number("x", float("nan"))
    with pytest.raises(ValueError, match="'c'"):
        check_choice("x", "c", ("a", "b"))
    check_number("x", 0.5, low=0, high=1)


# --------------------------------------------------------------------------- one core
def test_auto_step_off_leaves_stepping_to_the_caller():
    router = Router(RouterConfig(num_experts=8, balancer="loss_free"), auto_step=False).train()
    router(skewed())
    assert int(router.balancer.num_updates) == 0 and router.balancer.loads_sum_E.sum() > 0
    router.step()
    assert int(router.balancer.num_updates) == 1
    stepping = Router(RouterConfig(num_experts=8, balancer="loss_free")).train()
    stepping(skewed())
    assert int(stepping.balancer.num_updates) == 1


def test_model_returns_its_routings_and_nothing_is_stashed():
    torch.manual_seed(0)
    model = MoEModel(ModelConfig(vocab_size=31, seq_len=8, d_model=16, n_layers=2, n_heads=2,
                                 num_experts=4, top_k=2, expert_hidden=8, balancer="loss_free"))
    model.set_auto_step(False)
    out = model(torch.randint(0, 31, (2, 8)))
    assert len(out.routings) == 2
    assert torch.equal(out.loads_LE, torch.stack([r.loads_E for r in out.routings]))
    for layer in model.moe_layers():
        assert not hasattr(layer, "last_routing") and not hasattr(layer, "router_seconds")
        assert not layer.router.auto_step
    assert not hasattr(type(model.moe_layers()[0]), "timing")


def test_moe_gate_runs_on_the_same_core_and_takes_a_log():
    torch.manual_seed(0)
    gate = MoEGate(16, 8, top_k=2, balancer="bip").train()
    x_TD = torch.randn(32, 16)
    log = RoutingLog(timed=True)
    out = gate(x_TD, log=log)
    assert int(gate.router.balancer.num_updates) == 0  # waits for the log
    log.commit()
    assert int(gate.router.balancer.num_updates) == 1 and log.router_seconds > 0
    assert out.max_vio() == pytest.approx(float(out.loads_E.max()) / 8 - 1)
    ref_logits, ref = gate.router.route(x_TD, gate.weight, gate.bias, float32=False)
    torch.testing.assert_close(ref_logits, out.logits_TE)
    with pytest.raises(ValueError, match="bip_iters"):
        MoEGate(16, 8, balancer="loss_free", bip_iters=4)
