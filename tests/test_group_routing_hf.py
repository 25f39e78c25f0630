"""patch_model on a transformers DeepSeek-V3 with group-limited routing (n_group > 1):
moebal's router makes the model's own choices."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moebal.integrations.hf import patch_model  # noqa: E402

CONFIG = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
    max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    n_routed_experts=16, moe_intermediate_size=16, n_shared_experts=1,
    first_k_dense_replace=0, n_group=4, topk_group=2, kv_lora_rank=8, q_lora_rank=16,
    qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
)


def tiny(**overrides):
    torch.manual_seed(0)
    return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        **{**CONFIG, **overrides}))


def routers(model):
    return [m for m in model.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]


def tokens():
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))


def test_n_group_is_honoured_with_the_models_choices():
    model = tiny().eval()
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
        handle = patch_model(model, balancer="none")
        out = model(x).logits
    assert torch.equal(out, ref)
    config = handle.routers[0].config
    assert (config.num_groups, config.group_topk, config.group_score) == (4, 2, "top2")
    # the limit is live: without it the same weights route (and compute) otherwise
    free = tiny(topk_group=4).eval()
    with torch.no_grad():
        assert not torch.equal(free(x).logits, ref)
    assert torch.all(handle.loads().sum(1) == x.numel() * 2)
    handle.unpatch()


def test_the_correction_bias_enters_the_group_choice_as_in_deepseek_v3():
    model = tiny().eval()
    gen = torch.Generator().manual_seed(2)
    for r in routers(model):
        r.e_score_correction_bias.copy_(torch.randn(16, generator=gen) * 0.3)
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
        patch_model(model, balancer="loss_free", model_bias="init")
        assert torch.equal(model(x).logits, ref)


def test_a_group_limit_other_than_the_models_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match="group_topk=2"):
        patch_model(model, group_topk=3)
    with pytest.raises(ValueError, match="group_score"):
        patch_model(model, group_score="topk_share")
    patch_model(model, balancer="quantile")  # any balancer composes with the limit
