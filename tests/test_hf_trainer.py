"""MoebalCallback: balancer steps once per optimizer step, MaxVio per layer in the logs."""

import types

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.trainer_callback import CallbackHandler, TrainerControl, TrainerState  # noqa: E402

from moebal.integrations.hf import patch_model  # noqa: E402
from moebal.integrations.hf_trainer import MoebalCallback  # noqa: E402
from moebal.metrics import max_violation_per_layer  # noqa: E402

CONFIG = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1,
)


def tiny():
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(**CONFIG))


def batch(seed):
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))


def test_callback_follows_the_trainer_event_order_with_gradient_accumulation():
    """The Trainer's events, in its order, for 2 optimizer steps of 2 micro-batches each."""
    model = tiny().train()
    handle = patch_model(model)
    callback = MoebalCallback()
    handler = CallbackHandler([callback], model, None, None, None)
    args = types.SimpleNamespace()
    state, control = TrainerState(), TrainerControl()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handler.on_train_begin(args, state, control)
    assert callback.handle is handle  # found on the model the Trainer trains
    expected = []
    for step in range(2):
        handler.on_step_begin(args, state, control)
        loads = torch.zeros(2, 4, dtype=torch.int64)
        for micro in range(2):
            x = batch(10 * step + micro)
            model(x, labels=x).loss.backward()
            loads += handle.loads()
            if micro == 0:
                handler.on_substep_end(args, state, control)
        expected.append(loads)
        handler.on_pre_optimizer_step(args, state, control)
        opt.step()
        handler.on_optimizer_step(args, state, control)
        opt.zero_grad()
        state.global_step += 1
        handler.on_step_end(args, state, control)
        assert int(handle.step_loads().sum()) == 0  # the step consumed the loads
    logs = {"loss": 1.0}
    state.log_history.append({**logs, "step": state.global_step})
    handler.on_log(args, state, control, logs)

    assert callback.tracker.steps == [1, 2]
    want = np.stack([max_violation_per_layer(loads) for loads in expected])
    assert callback.tracker.history == pytest.approx(want)
    mean_L = want.mean(0)
    assert logs["moebal/max_vio/layer_0"] == pytest.approx(float(mean_L[0]), abs=1e-6)
    assert logs["moebal/max_vio"] == pytest.approx(float(mean_L.mean()), abs=1e-6)
    assert state.log_history[-1]["moebal/max_vio"] == logs["moebal/max_vio"]
    assert all(r._explicit_steps for r in handle.routers)
    eval_logs = {"eval_loss": 1.0}
    handler.on_log(args, state, control, eval_logs)
    assert "moebal/max_vio" not in eval_logs


def test_callback_needs_a_patched_model():
    callback = MoebalCallback()
    with pytest.raises(ValueError, match="not patched"):
        callback.on_train_begin(None, TrainerState(), TrainerControl(), model=tiny())
    with pytest.raises(TypeError):
        MoebalCallback(handle="handle")


@pytest.mark.slow
def test_a_real_trainer_run_logs_max_vio_per_optimizer_step(tmp_path):
    pytest.importorskip("accelerate")
    from moebal.integrations.hf_trainer import add_to_trainer

    model = tiny()
    patch_model(model)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            x = batch(i)[0]
            return {"input_ids": x, "labels": x}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data())
    callback = add_to_trainer(trainer)
    trainer.train()
    assert callback.tracker.steps == [1, 2, 3]
    logged = [r for r in trainer.state.log_history if "moebal/max_vio" in r]
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert "moebal/max_vio/layer_1" in logged[0]
