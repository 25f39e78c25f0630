import pytest
import torch

from moebal.routing import Router, RouterConfig


def test_plain_topk_matches_torch_topk():
    torch.manual_seed(0)
    logits = torch.randn(64, 8)
    out = Router(RouterConfig(num_experts=8, top_k=2))(logits)
    ref = torch.topk(torch.softmax(logits, -1), 2).indices
    assert torch.equal(out.indices_TK.sort(1).values, ref.sort(1).values)
    assert int(out.loads_E.sum()) == 64 * 2


def test_capacity_drops_keep_highest_probs():
    logits = torch.zeros(10, 4)
    logits[:, 0] = torch.arange(1.0, 11.0)  # every token prefers expert 0, later ones more
    router = Router(RouterConfig(num_experts=4, top_k=1, capacity_factor=1.0))
    out = router(logits)
    cap = router.capacity(10)
    assert int(out.loads_E[0]) == cap
    kept_tokens = torch.nonzero(out.kept_TK[:, 0]).flatten().tolist()
    assert kept_tokens == list(range(10 - cap, 10))
    assert torch.all(out.weights_TK[~out.kept_TK] == 0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_experts=0), dict(num_experts=4, top_k=5), dict(num_experts=4, balancer="nope"),
     dict(num_experts=4, capacity_factor=0.0), dict(num_experts=4, score_function="relu")],
)
def test_bad_config_names_the_value(kwargs):
    with pytest.raises(ValueError) as err:
        RouterConfig(**kwargs)
    bad = [v for k, v in kwargs.items() if k != "num_experts"] or [kwargs["num_experts"]]
    assert repr(bad[-1]) in str(err.value)


@pytest.mark.parametrize(
    "logits",
    [torch.randn(4, 8, 2), torch.randint(0, 3, (4, 8)), torch.randn(4, 7),
     torch.tensor([[float("nan")] * 8])],
)
def test_bad_logits_raise(logits):
    with pytest.raises(ValueError):
        Router(RouterConfig(num_experts=8, top_k=2))(logits)


def test_empty_batch():
    out = Router(RouterConfig(num_experts=8, top_k=2))(torch.randn(0, 8))
    assert out.indices_TK.shape == (0, 2) and int(out.loads_E.sum()) == 0
