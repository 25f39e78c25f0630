"""The MoE language model: shapes, causality, the grouped expert path, configs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moebal.model import GroupedExperts, MoELayer, MoEModel, ModelConfig, SwiGLU
from moebal.model.experts import grouped_matmul, grouped_mm_works, padded_bmm
from moebal.routing import Routing, RoutingLog


def small_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, seq_len=32, d_model=32, n_layers=2, n_heads=4,
                num_experts=4, top_k=2, expert_hidden=16)
    base.update(overrides)
    return ModelConfig(**base)


def loop_reference(x_TD, routing, experts: GroupedExperts):
    """Per-token, per-slot Python loop: y[t] = sum_k w[t,k] * expert_{e[t,k]}(x[t])."""
    rows = []
    for t in range(x_TD.shape[0]):
        y = x_TD.new_zeros(x_TD.shape[1])
        for k in range(routing.indices_TK.shape[1]):
            if not routing.kept_TK[t, k]:
                continue
            e = int(routing.indices_TK[t, k])
            h = F.silu(x_TD[t] @ experts.w1_EDF[e]) * (x_TD[t] @ experts.w3_EDF[e])
            y = y + routing.weights_TK[t, k].to(x_TD.dtype) * (h @ experts.w2_EFD[e])
        rows.append(y)
    return torch.stack(rows) if rows else x_TD.new_zeros(0, x_TD.shape[1])


def make_routing(indices_TK, weights_TK, kept_TK=None, E=4):
    if kept_TK is None:
        kept_TK = torch.ones_like(indices_TK, dtype=torch.bool)
    weights_TK = weights_TK * kept_TK
    zero = torch.zeros(())
    return Routing(indices_TK, weights_TK, kept_TK, zero, zero,
                   torch.bincount(indices_TK[kept_TK], minlength=E))


# --- the whole model -------------------------------------------------------------------

def test_forward_shapes_losses_and_loads():
    torch.manual_seed(0)
    config = small_config(dense_layers=1, n_layers=3)
    model = MoEModel(config)
    tokens, targets = torch.randint(0, 97, (2, 3, 16))
    out = model(tokens, targets)
    assert out.logits.shape == (3, 16, 97)
    assert out.loads_LE.shape == (2, 4) and out.loads_LE.dtype == torch.int64
    assert torch.all(out.loads_LE.sum(1) == 3 * 16 * 2)
    assert torch.allclose(out.loss, out.lm_loss + out.router_loss)
    assert abs(out.lm_loss.item() - math.log(97)) < 0.5  # near-uniform at init
    assert model(tokens).loss is None and model(tokens).lm_loss is None


def test_tied_embeddings_and_gpt2_init():
    torch.manual_seed(0)
    config = small_config(d_model=64, n_layers=4, expert_hidden=64, num_experts=8)
    model = MoEModel(config)
    assert model.lm_head.weight is model.embed.weight
    assert abs(model.embed.weight.std().item() - 0.02) < 2e-3
    out_std = 0.02 / math.sqrt(2 * 4)
    experts = model.moe_layers()[0].experts
    assert abs(experts.w2_EFD.std().item() - out_std) < 1e-3
    assert abs(experts.w1_EDF.std().item() - 0.02) < 2e-3
    assert abs(model.blocks[0].attn.proj.weight.std().item() - out_std) < 1e-3


def test_causal_later_tokens_never_change_earlier_logits():
    torch.manual_seed(0)
    model = MoEModel(small_config(n_layers=2)).eval()
    tokens = torch.randint(0, 97, (2, 20))
    base = model(tokens).logits
    for j in (0, 7, 19):
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] + 1 + torch.arange(2)) % 97
        logits = model(changed).logits
        torch.testing.assert_close(logits[:, :j], base[:, :j], rtol=0, atol=1e-5)
        assert not torch.allclose(logits[:, j], base[:, j])


def test_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = MoEModel(small_config(router_options=dict(aux_loss_coeff=0.01)))
    tokens = torch.randint(0, 97, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        out = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.step_routers()
        first = out.lm_loss.item() if first is None else first
    assert out.lm_loss.item() < first - 0.5


def test_shared_experts_and_dense_layers():
    torch.manual_seed(0)
    config = small_config(n_layers=3, dense_layers=1, num_shared_experts=2)
    model = MoEModel(config)
    assert isinstance(model.blocks[0].ffn, SwiGLU)
    assert model.blocks[0].ffn.w1.out_features == config.top_k * config.expert_hidden
    layers = model.moe_layers()
    assert len(layers) == 2 and len(model.routers()) == 2
    assert layers[0].shared.w1.out_features == 2 * config.expert_hidden
    x_TD = torch.randn(10, config.d_model)
    layer = layers[0]
    log = RoutingLog()
    y = layer(x_TD, log=log)
    expected = layer.experts(x_TD, log.routings[0]) + layer.shared(x_TD)
    torch.testing.assert_close(y, expected)

    all_dense = MoEModel(small_config(n_layers=2, dense_layers=2, dense_hidden=24))
    out = all_dense(torch.randint(0, 97, (2, 8)))
    assert out.loads_LE.shape == (0, 4) and out.router_loss.item() == 0.0
    assert all_dense.blocks[1].ffn.w1.out_features == 24


def test_num_params_active_counts_top_k_experts():
    config = small_config(n_layers=2, dense_layers=1)
    model = MoEModel(config)
    total = model.num_params()
    assert total == sum(p.numel() for p in model.parameters())
    per_expert = 3 * config.d_model * config.expert_hidden
    assert model.num_params(active=True) == total - 1 * (4 - 2) * per_expert


def test_router_timing_flag_accumulates_seconds():
    model = MoEModel(small_config())
    assert model(torch.randint(0, 97, (2, 8))).router_seconds == 0.0
    assert model(torch.randint(0, 97, (2, 8)), time_routers=True).router_seconds > 0.0


def test_sequence_aux_loss_sees_whole_sequences():
    # seq_len is passed to the router: a seq_len that does not divide T would raise there
    model = MoEModel(small_config())
    model(torch.randint(0, 97, (3, 7)))


@pytest.mark.parametrize("bad", [
    dict(d_model=30), dict(n_heads=0), dict(dense_layers=5), dict(vocab_size=0),
    dict(balancer="nope"), dict(router_options=dict(capacity_factor=-1.0)),
    dict(router_options=dict(top_k=1)), dict(router_options=dict(no_such_option=1)),
    dict(d_model=24, n_heads=8),
])
def test_bad_configs_raise_value_error(bad):
    with pytest.raises(ValueError):
        small_config(**bad)


def test_bad_inputs_raise():
    model = MoEModel(small_config())
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="targets shape"):
        model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 7, dtype=torch.long))


def test_config_dict_round_trip_through_json():
    config = small_config(num_shared_experts=1, dense_layers=1, dense_hidden=40,
                          router_options=dict(capacity_factor=1.25, score_function="sigmoid"))
    d = json.loads(json.dumps(config.to_dict()))
    again = ModelConfig.from_dict(d)
    assert again == config
    assert again.router_config().capacity_factor == 1.25
    d["router_options"]["capacity_factor"] = 9.0  # no aliasing
    assert config.router_options["capacity_factor"] == 1.25
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({**config.to_dict(), "n_expert": 3})


# --- the grouped expert path -----------------------------------------------------------

def test_grouped_mm_runs_on_this_build_for_float32():
    assert grouped_mm_works("cpu", torch.float32)
    assert not grouped_mm_works("cpu", torch.float64)  # float64 takes the padded-bmm path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("capacity_factor", [None, 0.6])
@pytest.mark.parametrize("top_k", [1, 2])
def test_grouped_experts_equal_loop_forward_and_gradients(dtype, capacity_factor, top_k):
    torch.manual_seed(0)
    config = small_config(top_k=top_k, router_options=dict(capacity_factor=capacity_factor))
    layer = MoELayer(config).to(dtype)
    for p in layer.parameters():  # larger weights so the gradients are not all tiny
        torch.nn.init.normal_(p, std=0.3)
    x_TD = torch.randn(24, config.d_model, dtype=dtype, requires_grad=True)
    routing = layer.route(x_TD)
    if capacity_factor is not None:
        assert not bool(routing.kept_TK.all())  # the test exercises drops

    y = layer.experts(x_TD, routing)
    ref = loop_reference(x_TD, routing, layer.experts)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y, ref, **tol)

    g = torch.randn_like(y)
    params = [x_TD, layer.experts.w1_EDF, layer.experts.w3_EDF, layer.experts.w2_EFD,
              layer.gate.weight]
    grads = torch.autograd.grad(y, params, g, retain_graph=True)
    ref_grads = torch.autograd.grad(ref, params, g)
    for name, a, b in zip(["x", "w1", "w3", "w2", "gate"], grads, ref_grads):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"grad {name}: {m}")


@settings(max_examples=25, deadline=None)
@given(T=st.integers(0, 20), E=st.integers(1, 6), data=st.data())
def test_grouped_experts_equal_loop_on_random_routings(T, E, data):
    K = data.draw(st.integers(1, E))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    experts = GroupedExperts(E, 8, 4)  # F=4 fp32 rows are 16 bytes: grouped_mm path
    indices_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) \
        if T else torch.empty(0, K, dtype=torch.long)
    weights_TK = torch.rand(T, K, generator=g)
    kept_TK = torch.rand(T, K, generator=g) < 0.7
    routing = make_routing(indices_TK, weights_TK, kept_TK, E)
    x_TD = torch.randn(T, 8, generator=g)
    torch.testing.assert_close(experts(x_TD, routing), loop_reference(x_TD, routing, experts),
                               rtol=1e-4, atol=1e-5)


def test_capacity_drops_remove_exactly_the_dropped_slots():
    torch.manual_seed(0)
    experts = GroupedExperts(4, 16, 8)
    x_TD = torch.randn(6, 16)
    indices_TK = torch.tensor([[0, 1]] * 6)
    weights_TK = torch.full((6, 2), 0.5)
    kept_TK = torch.ones(6, 2, dtype=torch.bool)
    kept_TK[3:, 0] = False  # expert 0 takes only 3 tokens
    kept_TK[5, 1] = False  # token 5 loses both slots
    y = experts(x_TD, make_routing(indices_TK, weights_TK, kept_TK))
    assert torch.all(y[5] == 0)
    only_expert_1 = experts(x_TD[3:5], make_routing(torch.tensor([[1, 0]] * 2),
                                                    torch.tensor([[0.5, 0.0]] * 2)))
    torch.testing.assert_close(y[3:5], only_expert_1)


def test_zero_tokens_and_idle_experts():
    experts = GroupedExperts(4, 16, 8)
    x_TD = torch.randn(0, 16, requires_grad=True)
    empty = make_routing(torch.empty(0, 2, dtype=torch.long), torch.empty(0, 2))
    y = experts(x_TD, empty)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert experts.w1_EDF.grad is None or torch.all(experts.w1_EDF.grad == 0)

    layer = MoELayer(small_config())
    assert layer(torch.randn(0, 32)).shape == (0, 32)

    # every token to expert 2: the other experts get no rows and no gradient
    x_TD = torch.randn(5, 16)
    routing = make_routing(torch.full((5, 1), 2), torch.ones(5, 1))
    experts.zero_grad()
    y = experts(x_TD, routing)
    torch.testing.assert_close(y, loop_reference(x_TD, routing, experts))
    y.square().sum().backward()
    assert torch.all(experts.w1_EDF.grad[[0, 1, 3]] == 0)
    assert experts.w1_EDF.grad[2].abs().sum() > 0


def test_padded_bmm_fallback_equals_grouped_mm():
    torch.manual_seed(0)
    counts_E = torch.tensor([3, 0, 5, 1])
    offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    x_ND = torch.randn(9, 8)
    w_EXY = torch.randn(4, 8, 12)
    torch.testing.assert_close(padded_bmm(x_ND, w_EXY, counts_E),
                               grouped_matmul(x_ND, w_EXY, offsets_E, counts_E))
    # misaligned rows (F=5 floats = 20 bytes) fall back instead of failing
    w_odd = torch.randn(4, 8, 5)
    y = grouped_matmul(x_ND, w_odd, offsets_E, counts_E)
    torch.testing.assert_close(y[3:8], x_ND[3:8] @ w_odd[2])


def test_grouped_mm_probe_is_not_fooled_by_no_grad_or_inference_mode():
    grouped_mm_works.cache_clear()
    with torch.inference_mode():
        assert grouped_mm_works("cpu", torch.float32)
    grouped_mm_works.cache_clear()
    with torch.no_grad():
        assert grouped_mm_works("cpu", torch.float32)
        model = MoEModel(small_config()).eval()
        assert model(torch.randint(0, 97, (2, 8))).logits.shape == (2, 8, 97)


def test_eval_under_inference_mode_matches_training_graph_forward():
    torch.manual_seed(0)
    model = MoEModel(small_config()).eval()
    tokens = torch.randint(0, 97, (2, 12))
    with torch.inference_mode():
        fast = model(tokens).logits
    torch.testing.assert_close(fast, model(tokens).logits)


def test_bfloat16_autocast_runs_the_grouped_path_close_to_float32():
    torch.manual_seed(0)
    layer = MoELayer(small_config())
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x_TD = torch.randn(40, 32, requires_grad=True)
    routing = layer.route(x_TD)
    ref = layer.experts(x_TD, routing)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer.experts(x_TD, routing)
    assert y.dtype == torch.float32  # back in the input's dtype
    assert ((y - ref).norm() / ref.norm()).item() < 3e-2
    y.sum().backward()
    assert layer.experts.w1_EDF.grad.dtype == torch.float32
    assert torch.isfinite(layer.experts.w1_EDF.grad).all()


def test_float32_takes_grouped_mm_not_the_padded_fallback(monkeypatch):
    import moebal.model.experts as experts_module

    def no_fallback(*args, **kwargs):
        raise AssertionError("padded_bmm fallback used for an aligned float32 layer")

    monkeypatch.setattr(experts_module, "padded_bmm", no_fallback)
    layer = MoELayer(small_config())
    x_TD = torch.randn(20, 32, requires_grad=True)
    layer(x_TD).square().sum().backward()
    assert layer.experts.w2_EFD.grad is not None


def test_moe_layer_bench_runs_and_reports_json(capsys):
    from moebal.cli import main

    threads = torch.get_num_threads()
    try:
        assert main(["bench", "moe-layer", "--cases", "tiny", "--repeats", "1", "--warmup",
                     "0", "--threads", "1", "--router-option", "capacity_factor=1.5",
                     "--json"]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(capsys.readouterr().out)
    (row,) = report["results"]
    assert row["case"] == "tiny" and row["router_options"]["capacity_factor"] == 1.5
    assert row["dense_hidden"] == row["top_k"] * row["expert_hidden"]
    assert row["moe_ms"] > 0 and row["dense_ms"] > 0
    assert main(["bench", "moe-layer", "--cases", "nope"]) == 2
    assert main(["bench", "moe-layer", "--router-option", "capacity_factor=\"x\""]) == 2
