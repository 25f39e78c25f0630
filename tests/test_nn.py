"""moebal.nn.MoEGate: the gate linear + moebal's router as one module for plain PyTorch MoE code."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from moebal.nn import GateOutput, MoEGate
from moebal.routing import BALANCERS


def test_plain_gate_is_linear_softmax_topk():
    torch.manual_seed(0)
    gate = MoEGate(16, 8, top_k=2)
    x_TD = torch.randn(32, 16)
    out = gate(x_TD)
    assert isinstance(out, GateOutput)
    logits_TE = x_TD @ gate.weight.T
    torch.testing.assert_close(out.logits_TE, logits_TE)
    probs_TE = logits_TE.softmax(-1)
    ref_w, ref_i = torch.topk(probs_TE, 2)
    order = torch.argsort(out.weights_TK, dim=-1, descending=True)
    assert torch.equal(out.indices_TK.gather(1, order), ref_i)
    torch.testing.assert_close(out.weights_TK.gather(1, order), ref_w)
    assert out.indices_TK.shape == (32, 2) and out.kept_TK.all()
    assert int(out.loads_E.sum()) == 64 and torch.equal(gate.last_loads_E, out.loads_E)
    assert float(out.loss) == 0.0
    assert gate.max_vio() == pytest.approx(float(out.loads_E.max()) / 8 - 1)


def test_norm_topk_prob_and_z_loss():
    gate = MoEGate(8, 4, top_k=2, norm_topk_prob=True, z_loss_coeff=1e-3)
    out = gate(torch.randn(10, 8))
    torch.testing.assert_close(out.weights_TK.sum(-1), torch.ones(10))
    assert out.z_loss.item() > 0 and out.loss.item() == pytest.approx(out.z_loss.item())


def test_topk_scaling_factor_scales_the_weights():
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    plain = MoEGate(8, 4, top_k=2, score_function="sigmoid", norm_topk_prob=True)
    scaled = MoEGate(8, 4, top_k=2, score_function="sigmoid", norm_topk_prob=True,
                     topk_scaling_factor=2.5)
    scaled.load_state_dict(plain.state_dict())
    torch.testing.assert_close(scaled(x).weights_TK, 2.5 * plain(x).weights_TK)
    with pytest.raises(ValueError, match="topk_scaling_factor"):
        MoEGate(8, 4, topk_scaling_factor=0.0)


def test_batch_seq_input_and_gradients_reach_the_weight():
    gate = MoEGate(8, 4, top_k=1, z_loss_coeff=1e-2, bias=True)
    x_BSD = torch.randn(3, 5, 8)
    out = gate(x_BSD)
    assert out.indices_TK.shape == (15, 1)
    (out.weights_TK.sum() + out.loss).backward()
    assert gate.weight.grad is not None and gate.bias.grad is not None
    with pytest.raises(ValueError, match="seq_len=4"):
        gate(x_BSD, seq_len=4)


def test_from_linear_shares_the_weights_and_keeps_the_key():
    linear = nn.Linear(8, 4, bias=False)
    gate = MoEGate.from_linear(linear, top_k=2)
    assert gate.weight is linear.weight
    assert "weight" in gate.state_dict()
    x = torch.randn(6, 8)
    torch.testing.assert_close(gate(x).logits_TE, linear(x))
    with pytest.raises(TypeError):
        MoEGate.from_linear(nn.Conv1d(8, 4, 1))


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(hidden_size=0, num_experts=4), "hidden_size"),
     (dict(hidden_size=8, num_experts=4, top_k=5), "top_k"),
     (dict(hidden_size=8, num_experts=4, balancer="nope"), "nope")],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEGate(**kwargs)


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="topk"):
        MoEGate(8, 4, topk=2)


def test_bad_input_shape():
    gate = MoEGate(8, 4)
    with pytest.raises(ValueError, match=r"\(5, 7\)"):
        gate(torch.randn(5, 7))
    with pytest.raises(TypeError):
        gate([1.0] * 8)


@pytest.mark.parametrize("balancer", sorted(BALANCERS))
def test_every_balancer_routes_and_steps(balancer):
    torch.manual_seed(0)
    gate = MoEGate(8, 4, top_k=2, balancer=balancer)
    x_BSD = torch.randn(2, 16, 8)
    for _ in range(3):
        out = gate(x_BSD)
        assert out.indices_TK.shape == (32, 2)
        assert torch.all(out.indices_TK[:, 0] != out.indices_TK[:, 1])
        gate.step()
    state = gate.state_dict()
    clone = MoEGate(8, 4, top_k=2, balancer=balancer)
    clone.load_state_dict(state)
    for key, value in clone.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_the_core_never_imports_transformers():
    code = (
        "import sys, moebal, moebal.nn, moebal.routing, moebal.metrics, moebal.integrations.hf; "
        "sys.exit('transformers' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
