"""``moebal bench router --peers``: the peers that import are timed, the others named."""

from __future__ import annotations

import json

import torch

from moebal.bench.peers import peer_methods
from moebal.cli import main

PEER_METHODS = {"megatron-core": {"megatron aux", "megatron bias"},
                "torchtitan": {"torchtitan bias"}}


def test_peers_timed_or_named(capsys):
    argv = ["bench", "router", "--sizes", "256x8x2", "--repeats", "1", "--warmup", "0",
            "--optimal-repeats", "0", "--threads", "1", "--balancers", "loss_free",
            "--peers", "--selection", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    methods = {r["method"] for r in out["results"]}
    missing = out["setup"]["peers_missing"]
    for peer, names in PEER_METHODS.items():
        if peer in missing:
            assert not names & methods and f"{peer} is not importable" in captured.err
        else:
            assert names <= methods
    assert {"softmax+topk", "loss_free", "select: bracket", "select: torch.topk"} <= methods


def test_peer_methods_route_the_given_logits():
    methods, _ = peer_methods(8, 2)
    logits_TE = torch.randn(64, 8)
    want_TE = torch.zeros(64, 8, dtype=torch.bool).scatter_(
        1, torch.topk(logits_TE, 2, dim=1).indices, True)
    for name, call in methods.items():  # zero bias: plain top-k of the softmax
        first, second = call(logits_TE)
        chosen = second if second.dtype == torch.bool else torch.zeros_like(want_TE).scatter_(
            1, second.view(64, 2), True)
        assert torch.equal(chosen, want_TE), name
