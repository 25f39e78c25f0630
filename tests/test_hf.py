"""moebal's router inside Hugging Face transformers MoE models (tiny random configs)."""

import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moebal.integrations.hf import (  # noqa: E402
    SUPPORTED_ROUTERS,
    from_pretrained,
    get_handle,
    patch_model,
)

COMMON = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
    max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1,
)
_DEEPSEEK = dict(n_routed_experts=4, moe_intermediate_size=16, n_shared_experts=1,
                 first_k_dense_replace=0, n_group=1, topk_group=1)
# model type -> (config class, model class, config overrides, exact)
# exact: the model computes the same floats as moebal (else it takes the top-k of the logits
# and a softmax over those K, equal to the renormalised softmax top-k up to rounding).
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4), True),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, moe_intermediate_size=16, head_dim=8), True),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, moe_intermediate_size=16,
                       shared_expert_intermediate_size=16), True),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4), True),
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM", dict(num_experts=4), True),
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM",
                dict(num_local_experts=4, head_dim=8,
                     layer_types=["full_attention", "linear_attention"]), True),
    "jamba": ("JambaConfig", "JambaForCausalLM",
              dict(num_experts=4, expert_layer_period=1, expert_layer_offset=0,
                   attn_layer_period=1, attn_layer_offset=0, use_mamba_kernels=False), True),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM",
                       dict(num_experts=4, moe_topk=2, head_dim=8), True),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(_DEEPSEEK, kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4,
                         qk_nope_head_dim=4, v_head_dim=8, topk_method="greedy"), True),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(_DEEPSEEK, kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=4,
                         qk_nope_head_dim=4, v_head_dim=8), True),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(_DEEPSEEK, head_dim=8), True),
    "dots1": ("Dots1Config", "Dots1ForCausalLM", dict(_DEEPSEEK, head_dim=8), True),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM",
                   dict(num_local_experts=4), False),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM",
                         dict(num_local_experts=4, shared_intermediate_size=16), False),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(num_local_experts=4, head_dim=8, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention"]), False),
}
FAST = ("mixtral", "qwen3_moe")


def tiny(family="mixtral", seed=0, **overrides):
    config_cls, model_cls, extra, _ = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config)


def tokens(seed=1, batch=2, seq=16):
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def gates(model):
    return [m for m in model.modules() if type(m).__name__ in SUPPORTED_ROUTERS]


# -- patched with balancer="none" computes what the model computes --------------------------
@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=() if f in FAST else pytest.mark.slow) for f in FAMILIES]
)
def test_none_balancer_gives_the_models_logits(family):
    model = tiny(family).eval()
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
        handle = patch_model(model, balancer="none")
        out = model(x).logits
    assert handle.num_layers >= 2
    if FAMILIES[family][3]:
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    loads = handle.loads()
    assert loads.shape == (handle.num_layers, 4)
    assert torch.all(loads.sum(1) == x.numel() * 2)
    handle.unpatch()
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)


@pytest.mark.parametrize("family", FAST)
def test_none_balancer_in_bfloat16_keeps_the_models_dtypes(family):
    model = tiny(family).to(torch.bfloat16).eval()
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
        patch_model(model)
        assert torch.equal(model(x).logits, ref)


def test_generate_with_kv_cache_is_unchanged():
    model = tiny().eval()
    x = tokens(batch=1, seq=5)
    ref = model.generate(x, max_new_tokens=4, do_sample=False)
    handle = patch_model(model)
    assert torch.equal(model.generate(x, max_new_tokens=4, do_sample=False), ref)
    assert int(handle.loads().sum(1)[0]) == 2  # the last step routed one token, K=2


def test_training_forward_and_gradients_equal_unpatched():
    model = tiny("qwen3_moe", norm_topk_prob=True).train()
    x = tokens()
    loss = model(x, labels=x).loss
    loss.backward()
    ref_loss = loss.detach()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    patch_model(model)
    loss = model(x, labels=x).loss
    loss.backward()
    assert torch.equal(loss.detach(), ref_loss)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, ref_grads[name]), name


def test_handle_reports_loads_max_vio_and_step_loads():
    model = tiny().train()
    handle = patch_model(model)
    x = tokens(batch=2, seq=16)
    model(x)
    model(x)
    last = handle.loads()
    vio = handle.max_vio()
    assert vio.shape == (2,)
    mean = last.double().mean(1)
    assert vio == pytest.approx((last.double().max(1).values / mean - 1).numpy())
    assert torch.equal(handle.step_loads(), 2 * last)  # two training forwards since the start
    assert torch.equal(handle.step(), 2 * last)
    assert int(handle.step_loads().sum()) == 0
    model.eval()
    model(x)
    assert int(handle.step_loads().sum()) == 0  # eval forwards are not training loads


# -- aux loss ---------------------------------------------------------------------------------
def test_moebal_loss_is_added_to_the_models_loss():
    model = tiny().train()
    x = tokens()
    ref = model(x, labels=x).loss.detach()
    handle = patch_model(model, z_loss_coeff=1e-2)
    out = model(x, labels=x)
    per_layer = [r.z_loss for r in handle.routings()]
    assert handle.loss().item() == pytest.approx(sum(t.item() for t in per_layer))
    assert handle.z_loss().item() > 0
    assert out.loss.item() == pytest.approx(ref.item() + handle.loss().item(), rel=1e-6)
    out.loss.backward()
    assert gates(model)[0].weight.grad is not None


def test_add_loss_to_output_false_leaves_the_loss_alone():
    model = tiny().train()
    x = tokens()
    ref = model(x, labels=x).loss.detach()
    handle = patch_model(model, z_loss_coeff=1e-2, add_loss_to_output=False)
    assert torch.equal(model(x, labels=x).loss.detach(), ref)
    assert handle.loss().item() > 0


def test_warns_when_the_models_own_aux_loss_is_on():
    model = tiny(output_router_logits=True, router_aux_loss_coef=0.02)
    with pytest.warns(UserWarning, match="output_router_logits"):
        handle = patch_model(model, balancer="aux_loss")
    handle.unpatch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_model(model, balancer="none")  # the model's routing, the model's own loss


# -- activation checkpointing -------------------------------------------------------------------
def test_checkpointed_recompute_routes_once():
    x = tokens()
    ref = tiny().train()
    ref_handle = patch_model(ref)
    ref(x, labels=x).loss.backward()
    model = tiny().train()
    model.activation_checkpointing_enable()
    handle = patch_model(model)
    model(x, labels=x).loss.backward()
    assert torch.equal(handle.step_loads(), ref_handle.step_loads())  # not counted twice
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert all(a.pending_replays == 0 for a in handle.adapters)


# -- unpatch --------------------------------------------------------------------------------
def test_unpatch_restores_the_model_exactly():
    model = tiny("qwen3_moe")
    x = tokens()
    model(x)  # transformers installs its output-capturing hooks on the first forward
    keys = list(model.state_dict())
    modules = [n for n, _ in model.named_modules()]
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    config = model.config.to_dict()
    handle = patch_model(model, z_loss_coeff=1e-3)
    assert get_handle(model) is handle
    assert "moebal_routing" in model.config.to_dict()
    handle.unpatch()
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_modules()] == modules
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert model.config.to_dict() == config
    assert all("forward" not in g.__dict__ for g in gates(model))
    assert get_handle(model) is None
    with pytest.raises(RuntimeError):
        handle.unpatch()
    patch_model(model).unpatch()  # can be patched again


# -- bad input ------------------------------------------------------------------------------
def _unchanged(model):
    return get_handle(model) is None and not hasattr(model, "moebal") and all(
        "forward" not in g.__dict__ for g in gates(model)
    )


def test_no_moe_block_is_an_error():
    cfg = transformers.LlamaConfig(**{k: v for k, v in COMMON.items() if k != "num_experts_per_tok"})
    with pytest.raises(ValueError, match="no recognised MoE router in LlamaForCausalLM"):
        patch_model(transformers.LlamaForCausalLM(cfg))
    with pytest.raises(TypeError):
        patch_model("model")


def test_patching_twice_is_an_error():
    model = tiny()
    patch_model(model)
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model, balancer="none")


def test_top_k_the_model_cannot_honour_names_the_module():
    model = tiny()
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate \(MixtralTopKRouter\).*top_k=3"):
        patch_model(model, top_k=3)
    with pytest.raises(ValueError, match="score_function"):
        patch_model(model, score_function="sigmoid")
    patch_model(model, top_k=2, num_experts=4).unpatch()  # the model's own values are fine
    assert _unchanged(model)


@pytest.mark.slow
def test_a_model_bias_is_refused():
    model = tiny("deepseek_v3")
    gates(model)[1].e_score_correction_bias[0] = 0.5
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate .*e_score_correction_bias"):
        patch_model(model)
    assert _unchanged(model)
    patch_model(model, model_bias="drop")


def test_bad_options():
    model = tiny()
    with pytest.raises(TypeError, match="topk"):
        patch_model(model, topk=2)
    with pytest.raises(ValueError, match="nope"):
        patch_model(model, balancer="nope")
    with pytest.raises(ValueError, match="capacity_factor"):
        patch_model(model, capacity_factor=-1.0)
    with pytest.raises(ValueError, match="model_bias"):
        patch_model(model, model_bias="keep")
    assert _unchanged(model)


def test_a_router_that_computes_something_else_is_refused():
    """transformers 5.17's GraniteMoeTopKRouter returned (indices, weights, logits): the probe
    at patch time refuses a router whose output moebal would not reproduce."""
    model = tiny()
    gate = model.model.layers[1].mlp.gate

    class Reordered(type(gate)):
        def forward(self, hidden_states):
            logits, weights, indices = super().forward(hidden_states)
            return indices, weights, logits

    class Doubled(type(gate)):
        def forward(self, hidden_states):
            logits, weights, indices = super().forward(hidden_states)
            return logits, 2 * weights, indices

    for cls, match in ((Reordered, "shapes differ"), (Doubled, "gate weights differ")):
        gate.__class__ = cls
        with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate .*" + match):
            patch_model(model)
        assert get_handle(model) is None and "forward" not in gate.__dict__


def test_unsupported_router_is_named():
    cfg = transformers.PhimoeConfig(**{**COMMON, "num_local_experts": 4})
    model = transformers.PhimoeForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.router \(PhimoeTopKRouter\).*sparsemixer"):
        patch_model(model)
    assert _unchanged(model)


# -- stateful balancers: training, checkpointing, save / load ---------------------------------
@torch.no_grad()
def skew_gates(model, x, strength):
    """Pull every gate towards expert 0 along the mean direction of its inputs."""
    inputs = {}
    hooks = [g.register_forward_pre_hook(lambda m, a, g=g: inputs.__setitem__(g, a[0]))
             for g in gates(model)]
    model(x)
    for h in hooks:
        h.remove()
    for gate, x_TD in inputs.items():
        mean_D = x_TD.reshape(-1, x_TD.shape[-1]).mean(0)
        gate.weight[0] += strength * mean_D / mean_D.square().sum()


def train_steps(model, handle, steps, lr=1e-4, seed=5, batch=8, seq=32):
    """AdamW steps on fresh batches; returns each step's layer-mean MaxVio."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    vio = []
    for step in range(steps):
        x = tokens(seed=seed + step, batch=batch, seq=seq)
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        vio.append(float(handle.max_vio().mean()))
        handle.step()
    return vio


def skewed_mixtral():
    """A tiny random Mixtral (8 experts, top-2) whose gates favour expert 0, and the
    layer-mean MaxVio of its own (plain top-k) routing of the first training batch."""
    model = tiny(num_local_experts=8)
    skew_gates(model, tokens(seed=3, batch=4), strength=1.0)
    handle = patch_model(model)
    with torch.no_grad():
        model.eval()(tokens(seed=5, batch=8, seq=32))
    start = float(handle.max_vio().mean())
    handle.unpatch()
    assert start > 1.5  # mean load is 64: expert 0 takes over 160 of 512 slots
    return model, start


def test_a_few_bip_training_steps_bring_max_vio_down():
    model, start = skewed_mixtral()
    handle = patch_model(model, balancer="bip")
    vio = train_steps(model, handle, 4)
    assert max(vio) < 0.5 * start


@pytest.mark.slow
def test_loss_free_training_steps_bring_max_vio_down():
    model, start = skewed_mixtral()
    handle = patch_model(model, balancer="loss_free", bias_update_rate=0.01)
    vio = train_steps(model, handle, 16)
    assert sum(vio[-4:]) / 4 < 0.65 * start
    bias_E = handle.state_dict()["moebal.0.router.balancer.bias_E"]
    assert int(bias_E.argmin()) == 0  # the favoured expert was pushed down


def test_checkpointed_recompute_restores_the_balancer_state():
    """bip updates its prices in the forward: the recompute must not update them again."""
    x = tokens()
    ref = tiny().train()
    ref_handle = patch_model(ref, balancer="bip")
    ref(x, labels=x).loss.backward()
    model = tiny().train()
    model.activation_checkpointing_enable()
    handle = patch_model(model, balancer="bip")
    model(x, labels=x).loss.backward()
    for key, value in ref_handle.state_dict().items():
        assert torch.equal(handle.state_dict()[key], value), key
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_balancer_state_is_in_the_state_dict_and_survives_save_pretrained(tmp_path):
    model, _ = skewed_mixtral()
    handle = patch_model(model, balancer="loss_free", bias_update_rate=0.05)
    train_steps(model, handle, 2, batch=2, seq=16)
    state = handle.state_dict()
    assert set(state) <= set(model.state_dict())
    bias = state["moebal.0.router.balancer.bias_E"]
    assert bias.abs().sum() > 0
    model.eval()
    x = tokens(seed=9)
    with torch.no_grad():
        ref = model(x).logits
    model.save_pretrained(tmp_path)

    loaded, loaded_handle = from_pretrained(transformers.MixtralForCausalLM, tmp_path)
    assert loaded_handle.balancer == "loss_free"
    assert loaded_handle.options["bias_update_rate"] == 0.05
    for key, value in state.items():
        assert torch.equal(loaded_handle.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x).logits, ref)

    # by hand: from_pretrained gives the unpatched model; re-patch, then load the state
    plain = transformers.MixtralForCausalLM.from_pretrained(tmp_path)
    assert get_handle(plain) is None
    again = patch_model(plain)
    assert again.balancer == "loss_free" and torch.equal(
        again.state_dict()["moebal.0.router.balancer.bias_E"], torch.zeros_like(bias))
    again.load_pretrained_state(tmp_path)
    assert torch.equal(again.state_dict()["moebal.0.router.balancer.bias_E"], bias)
    with pytest.raises(ValueError, match="missing"):
        again.load_state_dict({})


@pytest.mark.slow
def test_model_bias_init_continues_the_models_own_loss_free_routing():
    model = tiny("deepseek_v3", n_routed_experts=8).eval()
    for g in gates(model):
        g.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, 8))
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
        handle = patch_model(model, balancer="loss_free", model_bias="init")
        assert torch.equal(model(x).logits, ref)
    handle.unpatch()
    with pytest.raises(ValueError, match="model_bias='init' needs"):
        patch_model(model, balancer="bip", model_bias="init")
    with torch.no_grad():
        patch_model(model, model_bias="drop")
        assert not torch.equal(model(x).logits, ref)


def test_seq_len_reaches_the_router():
    model = tiny()
    handle = patch_model(model, balancer="seq_aux_loss", aux_loss_coeff=1e-2)
    x = tokens(batch=3, seq=10)
    out = model(x, labels=x)
    assert all(a.seq_len == 10 for a in handle.adapters)
    assert handle.aux_loss().item() > 0
    out.loss.backward()


def _all_balancers():
    from moebal.routing import BALANCERS

    return sorted(BALANCERS)


@pytest.mark.slow
@pytest.mark.parametrize("balancer", _all_balancers())
def test_every_balancer_trains_steps_and_round_trips_its_state(balancer):
    model = tiny().train()
    handle = patch_model(model, balancer=balancer)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(2):
        x = tokens(seed=step)
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        loads = handle.step()
        assert torch.all(loads.sum(1) == x.numel() * 2)
    state = handle.state_dict()
    clone = tiny()
    clone_handle = patch_model(clone, balancer=balancer)
    clone_handle.load_state_dict(model.state_dict())  # a full model state dict works too
    for key, value in state.items():
        assert torch.equal(clone_handle.state_dict()[key], value), key


def test_a_forward_that_fails_changes_no_balancer_state():
    """The layers' balancer updates wait for the end of the model's forward: a later layer's
    NaN logits leave the earlier layers' state (and the record) as they were."""
    from moebal.routing import NonFiniteLogits

    model = tiny().train()
    handle = patch_model(model, balancer="bip")
    x = tokens()
    model(x)
    state = {k: v.clone() for k, v in handle.state_dict().items()}
    loads, step_loads = handle.loads(), handle.step_loads()
    gate = gates(model)[1]
    saved = gate.weight.detach().clone()
    with torch.no_grad():
        gate.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLogits):
        model(tokens(seed=4))
    for key, value in state.items():
        assert torch.equal(handle.state_dict()[key], value), key
    assert torch.equal(handle.loads(), loads) and torch.equal(handle.step_loads(), step_loads)
    with torch.no_grad():
        gate.weight.copy_(saved)
    model(tokens(seed=4))  # the next forward starts afresh
    assert int(handle.step_loads().sum()) == 2 * int(step_loads.sum())
