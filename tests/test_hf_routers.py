"""Routers beyond a plain top-k of scores: the block's bias (AFMoE, MiniMax-M2), ERNIE's
statistics bias, Llama 4's dense weights; patched exactly, the model's bias by policy."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moebal.integrations.hf import patch_model  # noqa: E402

from tests.test_hf_families import forward, tiny  # noqa: E402

X = torch.randint(2, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def expert_biases(model, name):
    """The model's own expert-bias tensors (``name``), one per MoE layer."""
    return [t for m in model.modules()
            for t in (m._parameters.get(name), m._buffers.get(name)) if t is not None]


@pytest.mark.parametrize("folder, name", [("afmoe", "expert_bias"),
                                          ("minimax_m2", "e_score_correction_bias"),
                                          ("ernie4_5_moe", "e_score_correction_bias")])
def test_the_models_own_expert_bias_is_honoured_by_policy(folder, name):
    model = tiny(folder)
    torch.manual_seed(3)
    with torch.no_grad():  # some families start their router weights at zero: all ties
        for module in model.modules():
            if type(module).__name__.endswith(("Router", "TokenChoiceRouter")):
                for p in module.parameters():
                    p.normal_(0, 0.5)
    biases = expert_biases(model, name)
    assert biases
    with torch.no_grad():
        for bias in biases:
            bias.copy_(torch.linspace(-0.4, 0.4, bias.numel()).view_as(bias))
        ref = forward(model, X)
    with pytest.raises(ValueError, match=rf"\(\w+\) has a non-zero .*{name}"):
        patch_model(model)
    with torch.no_grad():
        handle = patch_model(model, balancer="loss_free", model_bias="init")
        assert torch.equal(forward(model, X), ref)  # the model's choice, continued
        loads_LE = handle.loads()
        state = handle.state_dict()
        assert torch.equal(state["moebal.0.router.balancer.bias_E"], biases[0].reshape(-1))
        handle.unpatch()
        dropped = patch_model(model, model_bias="drop")
        forward(model, X)
        assert not torch.equal(dropped.loads(), loads_LE)  # routed without it


def test_llama4_dense_weights_are_the_models_and_train_under_a_balancer():
    model = tiny("llama4")
    with torch.no_grad():
        ref = forward(model, X)
        handle = patch_model(model, balancer="none")
        assert torch.equal(forward(model, X), ref)
    handle.unpatch()
    handle = patch_model(model, balancer="bip")
    router = next(m for m in model.modules() if type(m).__name__ == "Llama4Router")
    out = router(torch.randn(5, router.in_features))
    weights_TE, logits_TE = out
    assert weights_TE.shape == logits_TE.shape == (5, router.num_experts)
    assert torch.all((weights_TE != 0).sum(1) == router.top_k)
    model.train()
    model(X, labels=X).loss.backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert torch.all(handle.step().sum(1) == X.numel() * router.top_k)


def test_a_bias_on_the_logits_cannot_start_the_loss_free_bias():
    model = tiny("kolibri1")
    with torch.no_grad():
        for bias in expert_biases(model, "e_score_correction_bias"):
            bias.copy_(torch.linspace(-0.4, 0.4, bias.numel()))
    with pytest.raises(ValueError, match="non-zero e_score_correction_bias"):
        patch_model(model)
    with pytest.raises(ValueError, match=r"\(Kolibri1TopKRouter\) adds its expert bias to the logits"):
        patch_model(model, balancer="loss_free", model_bias="init")
    patch_model(model, model_bias="drop").unpatch()


def test_a_score_function_the_router_does_not_offer_is_refused_by_name():
    """DeepSeek-V4's routed layers score with sqrtsoftplus (its hash layers are refused too);
    with sigmoid they are patched exactly."""
    model = tiny("deepseek_v4", mlp_layer_types=["moe", "moe"])
    with pytest.raises(ValueError, match=r"mlp\.gate \(DeepseekV4TopKRouter\) scores with "
                                         r"SqrtSoftplusActivation"):
        patch_model(model)
    model = tiny("deepseek_v4", mlp_layer_types=["moe", "moe"], scoring_func="sigmoid")
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "DeepseekV4TopKRouter":
                module.weight.normal_(0, 0.5)
        ref = forward(model, X)
        patch_model(model)
        assert torch.equal(forward(model, X), ref)
