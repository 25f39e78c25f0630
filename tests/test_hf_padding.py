"""Padding is not load: tokens the attention mask drops count in no load, loss or state."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moebal.integrations.hf import patch_model  # noqa: E402

from tests.test_hf import tiny, tokens  # noqa: E402

PAD = 0


def padded(x_BS, pad, side):
    """``x_BS`` with ``pad`` padding columns on ``side``, its attention mask and positions."""
    B, S = x_BS.shape
    fill = torch.full((B, pad), PAD, dtype=x_BS.dtype)
    real = torch.ones(B, S, dtype=torch.long)
    none = torch.zeros(B, pad, dtype=torch.long)
    if side == "right":
        return torch.cat([x_BS, fill], 1), torch.cat([real, none], 1), torch.arange(S + pad)[None]
    positions = torch.cat([torch.zeros(pad, dtype=torch.long), torch.arange(S)])[None]
    return torch.cat([fill, x_BS], 1), torch.cat([none, real], 1), positions


def run(model, handle, x, **kwargs):
    out = model(x, labels=x, **kwargs)
    return {"loads": handle.loads(), "aux": handle.aux_loss().item(), "z": handle.z_loss().item(),
            "step": handle.step(), "state": {k: v.clone() for k, v in handle.state_dict().items()},
            "loss": out.loss}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("balancer", ["none", "aux_loss", "bip", "loss_free"])
def test_loads_losses_and_state_equal_those_of_the_unpadded_batch(side, balancer):
    x = tokens(seed=2, batch=2, seq=12)
    results = []
    for batch in ("unpadded", "padded"):
        model = tiny().train()
        options = {"bias_update_rate": 0.1} if balancer == "loss_free" else {}
        handle = patch_model(model, balancer=balancer, z_loss_coeff=1e-2, **options)
        if batch == "unpadded":
            results.append(run(model, handle, x))
        else:
            xp, mask, positions = padded(x, 5, side)
            results.append(run(model, handle, xp, attention_mask=mask, position_ids=positions))
    ref, got = results
    assert torch.equal(got["loads"], ref["loads"])
    assert torch.all(got["loads"].sum(1) == x.numel() * 2)  # the 10 padding tokens count not
    assert torch.equal(got["step"], ref["step"])
    assert got["aux"] == pytest.approx(ref["aux"], rel=1e-5)
    assert got["z"] == pytest.approx(ref["z"], rel=1e-5)
    for key, value in ref["state"].items():
        torch.testing.assert_close(got["state"][key], value, msg=key)


def test_padding_is_routed_and_the_output_of_the_real_tokens_is_unchanged():
    x = tokens(seed=2, batch=2, seq=12)
    xp, mask, _ = padded(x, 4, "right")
    model = tiny().eval()
    with torch.no_grad():
        ref = model(xp, mask).logits  # the positional attention_mask
        handle = patch_model(model, balancer="none")
        out = model(xp, mask).logits
    assert torch.equal(out, ref)  # padding routed as the model routes it
    assert torch.all(handle.loads().sum(1) == x.numel() * 2)
    with torch.no_grad():
        model(xp)  # no mask: every token counts, and the mask of the last call is gone
    assert torch.all(handle.loads().sum(1) == xp.numel() * 2)


def test_checkpointed_recompute_sees_the_padding_of_its_forward():
    x = tokens(seed=2, batch=2, seq=12)
    xp, mask, _ = padded(x, 4, "right")
    grads = []
    for checkpointed in (False, True):
        model = tiny().train()
        if checkpointed:
            model.activation_checkpointing_enable()
        handle = patch_model(model, balancer="bip")
        model(xp, attention_mask=mask, labels=xp).loss.backward()
        assert torch.all(handle.step_loads().sum(1) == x.numel() * 2)
        grads.append([p.grad for p in model.parameters()])
    for g, h in zip(*grads):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_a_trainer_with_a_padding_collator_counts_only_real_tokens(tmp_path):
    pytest.importorskip("accelerate")
    from moebal.integrations.hf_trainer import add_to_trainer

    lengths = [16, 9, 12, 5, 16, 7, 11, 14]
    rows = [tokens(seed=i, batch=1, seq=n)[0].clamp_min(2) for i, n in enumerate(lengths)]

    def collate(examples):
        width = max(len(e) for e in examples)
        ids = torch.full((len(examples), width), PAD)
        mask = torch.zeros(len(examples), width, dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, : len(e)], mask[i, : len(e)] = e, 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    model = tiny()
    handle = patch_model(model, balancer="loss_free")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows,
                                   data_collator=collate)
    add_to_trainer(trainer)
    seen = []
    original = handle.step

    def step():
        loads_LE = original()
        seen.append(loads_LE)
        return loads_LE

    handle.step = step  # what the callback's steps see
    trainer.train()
    assert len(seen) == 2
    real = sum(int(loads_LE.sum(1)[0]) for loads_LE in seen) // 2  # K = 2 slots per token
    assert real == sum(lengths)  # not 4 batches x 2 rows x their padded widths


def test_generate_with_left_padding_counts_only_the_real_prompt_tokens():
    x = tokens(seed=2, batch=2, seq=6)
    xp, mask, _ = padded(x, 3, "left")
    model = tiny().eval()
    ref = model.generate(xp, attention_mask=mask, max_new_tokens=3, do_sample=False)
    handle = patch_model(model, balancer="none")
    first = []
    handle.model.register_forward_hook(lambda m, a, o: first.append(handle.loads()))
    out = model.generate(xp, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref)
    assert torch.all(first[0].sum(1) == x.numel() * 2)  # the prompt: its 12 real tokens
    assert torch.all(first[1].sum(1) == 2 * 2)  # then one new token per row
