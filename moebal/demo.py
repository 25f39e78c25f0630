"""Stream skewed batches through every balancer and print how balanced each keeps them.

Each batch's logits are ``randn(T, E) + skew_E`` with ``skew_E`` rising evenly from 0 to
``--skew`` across the experts, so plain top-k overloads the last experts. Every balancer
routes the same stream in training mode (one ``Router.step()`` per batch) and the table
gives MaxVio_batch at the first and last batch, AvgMaxVio and SupMaxVio over the stream
(see ``moebal.metrics``) and the mean wall time per batch.

The auxiliary-loss balancers act only through the gradient of their loss on the gate, and
nothing here trains: on this stream they route exactly as plain top-k (their rows show the
routing cost of computing the loss). The exact optimum is a slow reference: by default it
routes only the first 10 batches (``--optimal-batches``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Iterator, Optional, Sequence

import torch
from tqdm import tqdm

from moebal.metrics import BalanceTracker
from moebal.routing import BALANCERS, Router, RouterConfig

# the order of the table: references first, then losses, then the choice-changing methods
DEFAULT_ORDER = (
    "none", "aux_loss", "seq_aux_loss", "global_aux_loss", "loss_free", "quantile", "bip",
    "sinkhorn", "optimal",
)


def skewed_stream(
    num_batches: int,
    tokens: int,
    experts: int,
    skew: float = 2.0,
    seed: int = 0,
) -> Iterator[torch.Tensor]:
    """``num_batches`` logits tensors ``randn(tokens, experts) + linspace(0, skew, experts)``."""
    gen = torch.Generator().manual_seed(seed)
    skew_E = torch.linspace(0.0, float(skew), experts)
    for _ in range(num_batches):
        yield torch.randn(tokens, experts, generator=gen) + skew_E


def run_stream(
    balancer: str,
    *,
    batches: int,
    tokens: int,
    experts: int,
    top_k: int,
    skew: float,
    seed: int,
    seq_len: Optional[int] = None,
    config: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Route the skewed stream with one balancer; returns its MaxVio figures and timing."""
    router = Router(
        RouterConfig(num_experts=experts, top_k=top_k, balancer=balancer, **(config or {}))
    )
    router.train()
    tracker = BalanceTracker(num_layers=1, num_experts=experts)
    seconds = 0.0
    for logits_TE in skewed_stream(batches, tokens, experts, skew, seed):
        start = time.perf_counter()
        out = router(logits_TE, seq_len=seq_len)
        router.step()
        seconds += time.perf_counter() - start
        tracker.record(out.loads_E.unsqueeze(0), routed_slots=out.routed_slots)
    vio = tracker.max_vio_batch
    return {
        "balancer": balancer,
        "max_vio_first": float(vio[0]),
        "max_vio_last": float(vio[-1]),
        "avg_max_vio": tracker.avg_max_vio,
        "sup_max_vio": tracker.sup_max_vio,
        "ms_per_batch": 1e3 * seconds / batches,
        "batches": batches,
        "max_vio_batch": [float(v) for v in vio],
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("balancer", "MaxVio first", "MaxVio last", "AvgMaxVio", "SupMaxVio", "ms/batch")
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    most = max(r["batches"] for r in rows)
    for r in rows:
        name = r["balancer"] if r["batches"] == most else f"{r['balancer']} ({r['batches']} batches)"
        lines.append(
            f"| {name} | {r['max_vio_first']:.3f} | {r['max_vio_last']:.3f} | "
            f"{r['avg_max_vio']:.3f} | {r['sup_max_vio']:.3f} | {r['ms_per_batch']:.2f} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch (T)")
    parser.add_argument("--experts", type=int, default=16, help="experts (E)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (K)")
    parser.add_argument("--batches", type=int, default=50, help="batches in the stream")
    parser.add_argument("--skew", type=float, default=2.0, help="logit skew of the last expert")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence for seq_aux_loss (default: one sequence)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--balancers", nargs="+", default=None, metavar="NAME",
                        help=f"subset to run (default: all of {', '.join(DEFAULT_ORDER)})")
    parser.add_argument("--optimal-batches", type=int, default=10,
                        help="batches the exact optimum routes (it is slow; default 10)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _check_args(args: argparse.Namespace) -> None:
    for name in ("tokens", "experts", "top_k", "batches"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.top_k > args.experts:
        raise ValueError(f"--top-k={args.top_k} exceeds --experts={args.experts}")
    if args.seq_len is not None and (args.seq_len < 1 or args.tokens % args.seq_len):
        raise ValueError(f"--seq-len={args.seq_len} does not divide --tokens={args.tokens}")
    for name in args.balancers or ():
        if name not in BALANCERS:
            raise ValueError(f"unknown balancer {name!r}; known: {sorted(BALANCERS)}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.optimal_batches < 1:
        raise ValueError(f"--optimal-batches must be >= 1, got {args.optimal_batches}")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    names = args.balancers or [n for n in DEFAULT_ORDER if n in BALANCERS]
    names += [n for n in sorted(BALANCERS) if args.balancers is None and n not in names]
    rows = []
    for name in tqdm(names, desc="balancers", disable=args.json or not sys.stderr.isatty()):
        batches = min(args.batches, args.optimal_batches) if name == "optimal" else args.batches
        rows.append(
            run_stream(
                name, batches=batches, tokens=args.tokens, experts=args.experts,
                top_k=args.top_k, skew=args.skew, seed=args.seed, seq_len=args.seq_len,
            )
        )
    setup = {
        "tokens": args.tokens, "experts": args.experts, "top_k": args.top_k,
        "batches": args.batches, "skew": args.skew, "seed": args.seed,
        "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps({"setup": setup, "results": rows}, indent=2))
    else:
        print(
            f"skewed stream: {args.batches} batches of {args.tokens} tokens, {args.experts} "
            f"experts, top-{args.top_k}, logits randn + linspace(0, {args.skew:g}) per expert"
        )
        print(format_table(rows))
        print("aux_loss, seq_aux_loss, global_aux_loss balance only by training the gate; "
              "nothing trains here, so they route as plain top-k.")
    return 0
