"""copy.deepcopy of a patched transformers model: the copy routes identically, on its own."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moebal.integrations.hf import get_handle, patch_model  # noqa: E402

from tests.test_hf import tiny, tokens  # noqa: E402


def balancer_state(handle):
    return {k: v.clone() for k, v in handle.state_dict().items()}


def train_forward(model):
    x = tokens(seed=3)
    model.train()(x, labels=x).loss.backward()


@pytest.mark.parametrize(
    "family, balancer",
    [("mixtral", "bip"), ("qwen3_moe", "loss_free"), ("mixtral", "aux_loss"),
     pytest.param("deepseek_v3", "loss_free", marks=pytest.mark.slow)],
)
def test_deepcopy_after_a_training_forward_routes_identically_and_independently(family, balancer):
    model = tiny(family)
    options = {"bias_update_rate": 0.05} if balancer == "loss_free" else {}
    handle = patch_model(model, balancer=balancer, **options)
    train_forward(model)
    handle.step()
    train_forward(model)  # the last routing holds the autograd graph of this forward

    clone = copy.deepcopy(model)
    clone_handle = get_handle(clone)
    assert clone_handle is not None and clone_handle is not handle
    assert clone_handle.model is clone and clone_handle.balancer == balancer
    assert torch.equal(clone_handle.loads(), handle.loads())
    assert torch.equal(clone_handle.step_loads(), handle.step_loads())
    state = balancer_state(handle)
    for key, value in state.items():
        assert torch.equal(clone_handle.state_dict()[key], value), key

    x = tokens(seed=7)
    with torch.no_grad():
        ref = model.eval()(x).logits
        out = clone.eval()(x).logits
    assert torch.equal(out, ref)
    assert torch.equal(clone_handle.loads(), handle.loads())

    # the copy trains on its own: its routing, loss and balancer state are its own
    loads_before, loss_before = handle.loads(), handle.loss().detach()
    y = tokens(seed=11, batch=3)
    out = clone.train()(y, labels=y)
    assert torch.all(clone_handle.loads().sum(1) == y.numel() * 2)
    assert torch.equal(handle.loads(), loads_before)
    assert torch.equal(handle.loss(), loss_before)
    if balancer == "aux_loss":
        assert clone_handle.aux_loss().grad_fn is not None
        assert clone_handle.aux_loss().item() != loss_before.item()
    out.loss.backward()
    clone_handle.step()
    for key, value in state.items():
        assert torch.equal(handle.state_dict()[key], value), key  # the original is untouched
    assert torch.all(handle.step_loads().sum(1) == tokens().numel() * 2)  # its own count
    if balancer != "aux_loss":
        assert any(not torch.equal(clone_handle.state_dict()[k], v) for k, v in state.items())

    clone_handle.unpatch()  # undoes the copy only
    assert get_handle(clone) is None and get_handle(model) is handle
    assert not hasattr(clone, "moebal") and hasattr(model, "moebal")
    with torch.no_grad():
        model.eval()(x)


def test_deepcopy_before_any_forward_and_after_unpatch():
    model = tiny()
    plain = copy.deepcopy(model)
    handle = patch_model(model, balancer="bip", z_loss_coeff=1e-2)
    clone = copy.deepcopy(model)
    clone_handle = get_handle(clone)
    x = tokens()
    out = clone.train()(x, labels=x)  # the copy's hooks feed the copy's routers and loss
    assert clone_handle.loss().item() > 0 and int(handle.loads().sum()) == 0
    ref = model.train()(x, labels=x)  # the same state, the same batch: the same routing
    assert torch.equal(out.loss, ref.loss) and torch.equal(clone_handle.loss(), handle.loss())
    with torch.no_grad():
        ref = model.eval()(x).logits
        assert torch.equal(clone.eval()(x).logits, ref)
    assert torch.equal(clone_handle.loads(), handle.loads())

    train_forward(model)
    handle.unpatch()
    unpatched = copy.deepcopy(model)
    assert get_handle(unpatched) is None and not hasattr(unpatched, "moebal")
    with torch.no_grad():
        assert torch.equal(unpatched.eval()(x).logits, plain.eval()(x).logits)
    patch_model(unpatched, balancer="bip").unpatch()
