"""Time every balancer against plain softmax + top-k, as ratios within one run.

For each size (tokens, experts, top-k) the same skewed float32 logits go through plain
``torch.topk(torch.softmax(logits), k)`` (the baseline) and through a training-mode
``Router`` of every balancer, forward plus ``Router.step()``. The methods are interleaved
(each repeat times every method once, in a shuffled order) so that load on a shared
machine falls on all of them alike; the table gives each method's median time and its
ratio to the baseline's median. The logits do not require grad: this is the routing
decision's cost, not the backward pass. ``--peers`` adds the routers of Megatron-core and
torchtitan that are importable (:mod:`moebal.bench.peers`), timed interleaved with moebal's
on the same logits.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm import tqdm

from moebal.bench.peers import peer_methods
from moebal.demo import skewed_stream
from moebal.routing import BALANCERS, Router, RouterConfig
from moebal.routing.select import bracket_kth_largest, sample_bracket, topk_kth_largest

DEFAULT_SIZES = ((16384, 64, 8), (16384, 16, 2), (4096, 256, 8))
# ratio targets of the issue (at the balancers' default settings)
TARGETS = {"loss_free": 1.1, "aux_loss": 1.2, "quantile": 1.5, "bip": 2.0,
           "quantile:quantile_mode=histogram": 1.3}
BASELINE = "softmax+topk"


def _parse_size(text: str) -> tuple[int, int, int]:
    try:
        T, E, K = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be TOKENSxEXPERTSxTOPK, got {text!r}")
    if T < 1 or E < 1 or not 1 <= K <= E:
        raise argparse.ArgumentTypeError(f"size {text!r} needs tokens, experts >= 1, 1 <= top-k <= experts")
    return T, E, K


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"quantile:quantile_mode=histogram,quantile_bins=500"`` -> the balancer's name and
    its flat options (ints and floats as numbers, the rest as text)."""
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, text = item.partition("=")
        if not eq:
            raise ValueError(f"balancer option {item!r} in {spec!r} is not NAME=VALUE")
        for kind in (int, float):
            try:
                options[key] = kind(text)
                break
            except ValueError:
                continue
        else:
            options[key] = text
    if name not in BALANCERS:
        raise ValueError(f"unknown balancer {name!r}; known: {sorted(BALANCERS)}")
    return name, options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", nargs="+", type=_parse_size, default=None,
                        metavar="TxExK",
                        help="sizes, e.g. 16384x64x8 (default: 16384x64x8 16384x16x2 4096x256x8)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per method first")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--balancers", nargs="+", default=None, metavar="NAME",
                        help="balancers to time, each NAME or NAME:OPTION=VALUE,... with "
                             "flat option names (default: all but optimal)")
    parser.add_argument("--optimal-repeats", type=int, default=3,
                        help="timed calls of the exact optimum, run separately at the "
                             "smallest size (0 = skip it)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: CPU time of the calling thread, which "
                             "load from other processes does not inflate (needs --threads 1)")
    parser.add_argument("--peers", action="store_true",
                        help="also time the routers of Megatron-core and torchtitan (those "
                             "importable) on the same logits")
    parser.add_argument("--selection", action="store_true",
                        help="also time the expert-side selection alone (the (c+1)-th largest "
                             "over tokens), by the sampled bracket and by torch.topk")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _router_call(router: Router) -> Callable[[torch.Tensor], Any]:
    def call(logits_TE: torch.Tensor) -> Any:
        out = router(logits_TE)
        router.step()
        return out

    return call


def _baseline(top_k: int) -> Callable[[torch.Tensor], Any]:
    def call(logits_TE: torch.Tensor) -> Any:
        return torch.topk(torch.softmax(logits_TE, dim=-1), top_k, dim=-1)

    return call


def selection_methods(
    batches: Sequence[torch.Tensor], top_k: int
) -> dict[str, Callable[[torch.Tensor], Any]]:
    """The expert side of quantile balancing alone, on each batch's ``[E, T]`` matrix
    ``l_ij - alpha_i`` (built beforehand, untimed): its (c+1)-th largest along the tokens,
    ``c = T K / E``, by the sampled bracket (whatever the thread count; ``kth_largest``
    takes it on one thread only) and by ``torch.topk``."""
    T, E = batches[0].shape
    k = T * top_k // E + 1
    x_of = {}
    for logits_TE in batches:
        alpha_T = torch.topk(logits_TE, top_k + 1, dim=1).values[:, top_k]
        x_of[id(logits_TE)] = (logits_TE.t() - alpha_T).contiguous()
    return {
        "select: bracket": lambda b: bracket_kth_largest(
            x_of[id(b)], k, *sample_bracket(x_of[id(b)], k)),
        "select: torch.topk": lambda b: topk_kth_largest(x_of[id(b)], k),
    }


def time_methods(
    methods: dict[str, Callable[[torch.Tensor], Any]],
    batches: Sequence[torch.Tensor],
    repeats: int,
    warmup: int,
    seed: int = 0,
    progress: Optional[tqdm] = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds of each call of each method; methods interleaved in a shuffled order."""
    rng = random.Random(seed)
    names = list(methods)
    for r in range(warmup):
        for name in names:
            methods[name](batches[r % len(batches)])
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        rng.shuffle(names)
        batch = batches[r % len(batches)]
        for name in names:
            start = clock()
            methods[name](batch)
            times[name].append(clock() - start)
        if progress is not None:
            progress.update(1)
    return times


def bench_size(
    tokens: int, experts: int, top_k: int, balancers: Sequence[str], repeats: int,
    warmup: int, seed: int, progress: Optional[tqdm] = None,
    clock: Callable[[], float] = time.perf_counter, peers: bool = False,
    selection: bool = False,
) -> list[dict[str, Any]]:
    batches = list(skewed_stream(8, tokens, experts, skew=2.0, seed=seed))
    methods: dict[str, Callable[[torch.Tensor], Any]] = {BASELINE: _baseline(top_k)}
    for spec in balancers:
        name, options = parse_method(spec)
        config = RouterConfig.from_options(experts, name, top_k=top_k, **options)
        methods[spec] = _router_call(Router(config).train())
    if peers:
        methods.update(peer_methods(experts, top_k)[0])
    if selection:
        methods.update(selection_methods(batches, top_k))
    times = time_methods(methods, batches, repeats, warmup, seed, progress, clock)
    base = statistics.median(times[BASELINE])
    rows = []
    for name in methods:
        med = statistics.median(times[name])
        rows.append({
            "tokens": tokens, "experts": experts, "top_k": top_k, "method": name,
            "median_ms": 1e3 * med, "ratio": med / base, "target": TARGETS.get(name),
            "repeats": len(times[name]),
        })
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("T x E x K", "method", "median ms", "ratio", "target")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        target = "" if r["target"] is None else f"<= {r['target']:g}x"
        lines.append(
            f"| {r['tokens']}x{r['experts']}x{r['top_k']} | {r['method']} | "
            f"{r['median_ms']:.2f} | {r['ratio']:.2f}x | {target} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1 or args.warmup < 0 or args.optimal_repeats < 0:
        raise ValueError(
            f"--repeats must be >= 1 and --warmup, --optimal-repeats >= 0, got "
            f"{args.repeats}, {args.warmup}, {args.optimal_repeats}"
        )
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.clock == "cpu" and args.threads != 1:
        raise ValueError(f"--clock cpu times one thread: it needs --threads 1, got {args.threads}")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    for spec in args.balancers or ():
        name, options = parse_method(spec)
        RouterConfig.from_options(8, name, **options)  # a bad option fails before timing
    torch.set_num_threads(args.threads)
    sizes = args.sizes or list(DEFAULT_SIZES)
    balancers = args.balancers or [n for n in BALANCERS if n != "optimal"]
    show = not args.json and sys.stderr.isatty()
    missing = peer_methods(1, 1)[1] if args.peers else {}
    for peer, why in missing.items():
        print(f"moebal: --peers: {peer} is not importable, left out ({why})", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(sizes) * args.repeats, desc="bench router", disable=not show) as bar:
        for T, E, K in sizes:
            rows += bench_size(
                T, E, K, balancers, args.repeats, args.warmup, args.seed, bar, clock,
                args.peers, args.selection,
            )
    if args.optimal_repeats and args.balancers is None:
        # the exact optimum is a reference: timed on its own, at the smallest size
        T, E, K = min(sizes, key=lambda s: s[0] * s[1] * s[2])
        rows += bench_size(T, E, K, ["optimal"], args.optimal_repeats, 1, args.seed, None, clock)
    setup = {"threads": torch.get_num_threads(), "repeats": args.repeats, "clock": args.clock,
             "torch": torch.__version__, "dtype": "float32", "peers_missing": missing}
    if args.json:
        print(json.dumps({"setup": setup, "results": rows}, indent=2))
    else:
        print(f"router time vs plain softmax+topk, float32, {setup['threads']} threads, "
              f"{args.clock} clock, median of {args.repeats} interleaved repeats")
        print(format_table(rows))
    return 0
