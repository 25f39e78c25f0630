"""moebal's balancers inside torchtitan MoE models (tiny random configs, CPU).

torchtitan has no attention backend with a CPU backward, so whole models are compared under
``no_grad`` and training runs on stacks of ``MoE`` blocks, whose forward and backward run
on CPU.
"""

import copy
import dataclasses
import functools

import pytest
import torch
from torch import nn

pytest.importorskip("torchtitan")

from torchtitan.components.checkpointer.base import ModelWrapper  # noqa: E402
from torchtitan.components.optimizer import register_moe_load_balancing_hook  # noqa: E402
from torchtitan.models.common.config_utils import (  # noqa: E402
    make_moe_config,
    make_routed_experts_config,
    make_router_config,
)
from torchtitan.models.common.moe import TokenChoiceTopKRouter  # noqa: E402

from moebal.integrations.torchtitan import (  # noqa: E402
    BalancedRouter,
    get_handle,
    moe_blocks,
    patch_model,
)

D, F, E, K = 16, 8, 8, 2
_GATE_INIT = {"weight": functools.partial(nn.init.normal_, std=0.5)}
_EXPERT_INIT = {name: functools.partial(nn.init.normal_, std=0.1)
                for name in ("w1_EFD", "w2_EDF", "w3_EFD")}


def moe_config(score_func="sigmoid", route_norm=True, route_scale=2.5, coeff=1e-3, **router):
    return make_moe_config(
        num_experts=E, load_balance_coeff=coeff,
        router=make_router_config(dim=D, num_experts=E, gate_param_init=_GATE_INIT, top_k=K,
                                  score_func=score_func, route_norm=route_norm,
                                  route_scale=route_scale, **router),
        routed_experts=make_routed_experts_config(dim=D, hidden_dim=F, num_experts=E, top_k=K,
                                                  param_init=_EXPERT_INIT,
                                                  comm_backend="standard"))


class Block(nn.Module):
    """The part of a torchtitan transformer block that its MoE hooks look at."""

    def __init__(self, config):
        super().__init__()
        self.moe_enabled = True
        self.moe = config.build()

    def forward(self, h):
        return h + self.moe(h)


class Stack(nn.Module):
    """Residual MoE blocks under ``layers`` (a ModuleDict), as torchtitan decoders keep them."""

    def __init__(self, n_layers=2, seed=0, **options):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleDict({str(i): Block(moe_config(**options)) for i in range(n_layers)})
        for block in self.layers.values():
            block.moe.init_states(buffer_device=torch.device("cpu"))

    def forward(self, h):
        for block in self.layers.values():
            h = block(h)
        return h


class NoMesh:
    """ParallelDims for one process: no loss mesh, no EP."""

    ep_enabled = False
    tp = 1

    def get_optional_mesh(self, name):
        return None


def batches(n, seed=1, skew=0.0):
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(D, generator=g) * skew  # a common direction: skewed routing
    return [torch.randn(2, 16, D, generator=g) + offset for _ in range(n)]


def chosen(model, x):
    """Sorted expert ids [L, T, K] each router chose for ``x`` (eval, no grad)."""
    ids = []
    hooks = [block.moe.router.register_forward_hook(
        lambda m, a, out: ids.append(out[1].reshape(-1, K).sort(-1).values))
        for block in model.layers.values()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return torch.stack(ids)


# -- balancer="none" computes what torchtitan computes -----------------------------------------
@pytest.mark.parametrize("options", [
    dict(score_func="sigmoid", route_norm=True, route_scale=2.5),
    dict(score_func="softmax", route_norm=False, route_scale=1.0),
    dict(score_func="softmax", route_norm=True, route_scale=1.0,
         num_expert_groups=4, num_limited_groups=4),
    dict(score_func="sigmoid", route_norm=True, route_scale=2.5,
         num_expert_groups=4, num_limited_groups=2),  # group-limited
])
def test_none_equals_unpatched_block_forward_and_backward(options):
    ref = Stack(**options)
    model = copy.deepcopy(ref)
    handle = patch_model(model, "none")
    assert handle.names == ["layers.0.moe", "layers.1.moe"]
    assert all(isinstance(b.moe.router, BalancedRouter) for b in model.layers.values())
    x = batches(1)[0]
    out_ref, out = ref(x), model(x)
    assert torch.equal(out, out_ref)
    out_ref.square().sum().backward()
    out.square().sum().backward()
    grads_ref = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads_ref[name].grad), name
    assert handle.loads().shape == (2, E) and int(handle.loads().sum()) == 2 * 32 * K


def _tiny_decoder(family):
    from torchtitan.models.deepseek_v3 import model_registry as deepseek
    from torchtitan.models.gpt_oss import model_registry as gpt_oss
    from torchtitan.models.qwen3 import model_registry as qwen3

    registry, flavor, layers = {"qwen3": (qwen3, "debugmodel_moe", 1),
                                "deepseek_v3": (deepseek, "debugmodel", 2),
                                "gpt_oss": (gpt_oss, "debugmodel", 1)}[family]
    config = registry(flavor, attn_backend="flex").model
    config = dataclasses.replace(config, layers=config.layers[:layers])
    torch.manual_seed(0)
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device="cpu")
    model.init_weights(buffer_device=torch.device("cpu"))
    return model.eval(), config.vocab_size


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "deepseek_v3"])
def test_none_equals_unpatched_whole_model_logits(family):
    model, vocab = _tiny_decoder(family)
    tokens = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).unsqueeze(0)
    masks = model.get_attention_masks(positions)
    with torch.no_grad():
        ref = model(tokens, positions=positions, attention_masks=masks)
        handle = patch_model(model, "none")
        assert handle.num_layers == len(moe_blocks(model)) >= 1
        out = model(tokens, positions=positions, attention_masks=masks)
        assert torch.equal(out, ref)
        assert int(handle.loads().sum()) == 16 * model.layers[handle.names[0].split(".")[1]].moe.router.top_k
        handle.unpatch()
        assert torch.equal(model(tokens, positions=positions, attention_masks=masks), ref)


def test_none_equals_unpatched_gpt_oss_routers():
    # gpt_oss builds on CPU, but neither its attention (sinks: flex attention with
    # return_lse) nor its experts (bf16 output into a float32 scatter-add) run there: compare
    # its routers (TokenChoiceTopKRouter with a gate bias, inside GptOssMoE)
    model, _ = _tiny_decoder("gpt_oss")
    blocks = moe_blocks(model)
    assert blocks and type(blocks[0][1]).__name__ == "GptOssMoE"
    assert blocks[0][1].router.gate.bias is not None
    originals = [block.router for _, block in blocks]
    x = torch.randn(2, 8, originals[0].gate.weight.shape[1],
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        handle = patch_model(model, "none")
        assert handle.names == [name for name, _ in blocks]
        for original, (_, block) in zip(originals, blocks):
            ref, got = original(x, block.expert_bias_E), block.router(x, block.expert_bias_E)
            for a, b in zip(ref, got):
                assert torch.equal(a, b)


# -- loss_free routes as torchtitan's own expert bias --------------------------------------------
@pytest.mark.parametrize("groups", [{}, dict(num_expert_groups=4, num_limited_groups=2)])
def test_loss_free_routes_as_torchtitan_expert_bias_over_optimizer_steps(groups):
    titan = Stack(**groups)
    ours = copy.deepcopy(titan)
    opt_titan = torch.optim.SGD(titan.parameters(), lr=0.05)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05)
    register_moe_load_balancing_hook(opt_titan, [titan], NoMesh())
    handle = patch_model(ours, "loss_free")
    register_moe_load_balancing_hook(opt_ours, [ours], NoMesh())  # torchtitan's, now a no-op
    handle.register_step_pre_hook(opt_ours)
    probe = batches(1, seed=9, skew=1.0)[0]
    for step, x in enumerate(batches(6, skew=1.0)):
        for model, opt in ((titan, opt_titan), (ours, opt_ours)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        assert torch.equal(chosen(titan, probe), chosen(ours, probe)), step
        for name in ("0", "1"):
            bias_titan = titan.layers[name].moe.expert_bias_E
            bias_ours = ours.layers[name].moe.router.moebal.balancer.bias_E
            assert torch.allclose(bias_ours, bias_titan, atol=1e-6)
            assert not bool(ours.layers[name].moe.expert_bias_E.any())  # switched off
    assert bool(titan.layers["0"].moe.expert_bias_E.any())  # the bias did move


@pytest.mark.parametrize("balancer", ["bip", "quantile"])
def test_bip_and_quantile_lower_maxvio_within_a_few_steps(balancer):
    data = batches(5, skew=2.0)
    base = Stack()
    handle = patch_model(base, "none")
    with torch.no_grad():
        base.train()(data[-1])
    before = handle.max_vio()
    model = Stack()
    handle = patch_model(model, balancer)
    with torch.no_grad():
        for x in data:
            model.train()(x)
            handle.step()
    after = handle.max_vio()
    assert (after < 0.5 * before).all(), (before, after)


def test_activation_checkpointing_recompute_routes_as_the_forward_did():
    from torch.utils.checkpoint import checkpoint

    data = batches(2, skew=2.0)
    runs = []
    for recompute in (False, True):
        model = Stack()
        handle = patch_model(model, "bip")
        for x in data:
            model.zero_grad()
            h = x
            for block in model.layers.values():
                h = checkpoint(block, h, use_reentrant=False) if recompute else block(h)
            h.square().sum().backward()
            loads = handle.step()
        runs.append((loads, [p.grad.clone() for p in model.parameters()], handle.state_dict()))
    (loads_a, grads_a, state_a), (loads_b, grads_b, state_b) = runs
    assert torch.equal(loads_a, loads_b)  # the recompute is not counted again
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


# -- state ---------------------------------------------------------------------------------------
def test_checkpoint_through_torchtitan_state_dict_path_keeps_balancer_state(tmp_path):
    import torch.distributed.checkpoint as dcp

    model = Stack()
    handle = patch_model(model, "bip")
    with torch.no_grad():
        for x in batches(3, skew=2.0):
            model(x)
            handle.step()
    saved = {k: v.clone() for k, v in handle.state_dict().items()}
    assert saved and all(".router.moebal.balancer." in k for k in saved)
    assert any(bool(v.float().abs().sum()) for v in saved.values())
    dcp.save(ModelWrapper(model).state_dict(), checkpoint_id=str(tmp_path))

    fresh = Stack(seed=5)
    fresh_handle = patch_model(fresh, "bip")
    wrapper = ModelWrapper(fresh)
    state = wrapper.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path))
    wrapper.load_state_dict(state)
    for key, value in fresh_handle.state_dict().items():
        assert torch.equal(value, saved[key]), key
    x = batches(1, seed=7)[0]
    assert torch.equal(chosen(fresh, x), chosen(model, x))


def test_unpatch_restores_the_model_exactly():
    model = Stack()
    keys, routers = dict(model.state_dict()), [b.moe.router for b in model.layers.values()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = patch_model(model, "loss_free")
    handle.register_step_pre_hook(opt)
    assert get_handle(model) is handle
    assert all(b.moe.load_balance_coeff == 0.0 for b in model.layers.values())
    handle.unpatch()
    assert get_handle(model) is None
    assert [b.moe.router for b in model.layers.values()] == routers
    assert all(type(r) is TokenChoiceTopKRouter for r in routers)
    assert all(b.moe.load_balance_coeff == 1e-3 for b in model.layers.values())
    state = model.state_dict()
    assert state.keys() == keys.keys() and all(torch.equal(state[k], keys[k]) for k in keys)
    opt.step()  # the step hook is gone with the patch
    with pytest.raises(RuntimeError, match="undone"):
        handle.step()


def test_model_bias_policies():
    model = Stack()
    model.layers["0"].moe.expert_bias_E.fill_(0.25)
    with pytest.raises(ValueError, match="layers.0.moe has a non-zero expert_bias_E"):
        patch_model(model, "bip")
    with pytest.raises(ValueError, match="needs balancer='loss_free'"):
        patch_model(model, "bip", model_bias="init")
    assert get_handle(model) is None and type(model.layers["0"].moe.router) is TokenChoiceTopKRouter
    handle = patch_model(model, "loss_free", model_bias="init")
    assert torch.equal(model.layers["0"].moe.router.moebal.balancer.bias_E,
                       torch.full((E,), 0.25))


@pytest.mark.parametrize("options, kwargs, error, match", [
    (dict(num_expert_groups=4, num_limited_groups=2), dict(group_topk=3), ValueError,
     "layers.0.moe .*routes with group_topk=2"),
    ({}, dict(num_groups=4, group_topk=2), ValueError, "routes with num_groups=None"),
    ({}, dict(top_k=3), ValueError, "routes with top_k=2"),
    ({}, dict(capacity_factor=1.0), ValueError, "dropless"),
    ({}, dict(no_such_option=1), TypeError, "no_such_option"),
])
def test_refusals_name_the_block_and_leave_the_model_unchanged(options, kwargs, error, match):
    model = Stack(**options)
    with pytest.raises(error, match=match):
        patch_model(model, "bip", **kwargs)
    assert get_handle(model) is None
    assert all(type(b.moe.router) is TokenChoiceTopKRouter for b in model.layers.values())


def test_refusals_of_models():
    with pytest.raises(ValueError, match="no torchtitan MoE block"):
        patch_model(nn.Linear(2, 2))
    model = Stack()
    patch_model(model, "none")
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model, "bip")
    with pytest.raises(ValueError, match="unknown balancer"):
        patch_model(Stack(), "no_such_balancer")
