"""Train a tiny torchtitan MoE with moebal's BIP balancer on the default corpus.

    PYTHONPATH=. python examples/train_torchtitan_bip.py --steps 30
    PYTHONPATH=. python examples/train_torchtitan_bip.py --steps 30 --balancer none

Needs ``pip install 'moebal[torchtitan]'`` and the default corpus (see README). The MoE
blocks are torchtitan's own (``MoE.Config`` from ``torchtitan.models.common.config_utils``,
qwen3-style: softmax scores, renormalised top-k); :func:`moebal.integrations.torchtitan.
patch_model` puts BIP in their routers and ``handle.register_step_pre_hook`` steps it before
every optimizer step, the way torchtitan steps its own expert bias.

torchtitan has no attention backend with a CPU backward, so on CPU (the default here) the
model is a token embedding, ``--layers`` residual MoE blocks and an LM head: no attention,
only what moebal changes. With ``--model qwen3`` on a CUDA machine the whole
``debugmodel_moe`` decoder of torchtitan's qwen3 (cut to ``--layers`` blocks) trains instead.
Prints loss and per-layer MaxVio every ``--log-every`` steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import torch
from torch import nn


def moe_stack(vocab: int, dim: int, layers: int, experts: int, top_k: int) -> nn.Module:
    from torchtitan.models.common.config_utils import (
        make_moe_config,
        make_routed_experts_config,
        make_router_config,
    )

    init = {"weight": functools.partial(nn.init.normal_, std=0.02)}
    expert_init = {k: functools.partial(nn.init.normal_, std=0.02)
                   for k in ("w1_EFD", "w2_EDF", "w3_EFD")}

    def block():
        config = make_moe_config(
            num_experts=experts,
            router=make_router_config(dim=dim, num_experts=experts, gate_param_init=init,
                                      top_k=top_k, score_func="softmax", route_norm=True),
            routed_experts=make_routed_experts_config(
                dim=dim, hidden_dim=2 * dim, num_experts=experts, top_k=top_k,
                param_init=expert_init, comm_backend="standard"))
        moe = config.build()
        moe.init_states(buffer_device=torch.device("cpu"))
        return moe

    class MoEOnlyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.layers = nn.ModuleList([block() for _ in range(layers)])
            self.norms = nn.ModuleList([nn.RMSNorm(dim) for _ in range(layers)])
            self.head = nn.Linear(dim, vocab, bias=False)

        def forward(self, tokens_BS):
            h = self.embed(tokens_BS)
            for norm, moe in zip(self.norms, self.layers):
                h = h + moe(norm(h))
            return self.head(h)

    return MoEOnlyLM()


def qwen3_decoder(layers: int, device: torch.device) -> tuple[nn.Module, int]:
    from torchtitan.models.qwen3 import model_registry

    config = model_registry("debugmodel_moe").model
    config = dataclasses.replace(config, layers=config.layers[:layers])
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device=device)
    model.init_weights(buffer_device=device)
    return model, config.vocab_size


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--balancer", default="bip")
    p.add_argument("--model", choices=("moe-stack", "qwen3"), default="moe-stack")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from moebal.data import BatchSampler, DataConfig, load_corpus
    from moebal.integrations.torchtitan import patch_model

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.model == "qwen3" and device.type != "cuda":
        raise SystemExit("--model qwen3 needs a CUDA device (torchtitan's attention has no CPU "
                         "backward); use the default --model moe-stack on CPU")
    corpus = load_corpus(DataConfig(vocab_size=args.vocab_size))
    if args.model == "qwen3":
        model, vocab = qwen3_decoder(args.layers, device)
        if corpus.vocab_size > vocab:
            raise SystemExit(f"the corpus vocabulary ({corpus.vocab_size}) exceeds the model's "
                             f"({vocab}); pass --vocab-size {vocab}")
    else:
        model = moe_stack(corpus.vocab_size, args.dim, args.layers, args.experts, args.top_k)
        model.to(device)
    handle = patch_model(model, args.balancer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    handle.register_step_pre_hook(optimizer)
    sampler = BatchSampler(corpus.train, seq_len=args.seq_len, seed=args.seed)
    positions = torch.arange(args.seq_len, device=device).repeat(args.batch, 1)
    print(f"{args.model}, {handle.num_layers} MoE layers, balancer {args.balancer}, {device}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = (torch.as_tensor(a, dtype=torch.int64, device=device)
                for a in sampler.next_batch(args.batch))
        if args.model == "qwen3":
            logits = model(x, positions=positions,
                           attention_masks=model.get_attention_masks(positions))
        else:
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        (loss + handle.loss().to(loss.device)).backward()
        optimizer.step()  # the balancers step first (pre-hook)
        if step % args.log_every == 0 or step == args.steps:
            vio = " ".join(f"{v:.3f}" for v in handle.max_vio())
            print(f"step {step:4d}  loss {loss.item():.4f}  MaxVio per layer [{vio}]  "
                  f"{time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
