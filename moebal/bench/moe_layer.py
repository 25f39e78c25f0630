"""Time forward+backward of one MoE layer against a dense SwiGLU FFN of the same active size.

The MoE layer is the model's: gate, router (any balancer) and grouped-mm experts, plus
shared experts if configured. The dense FFN has hidden size (top_k + shared) * expert_hidden,
so both do the same matmul FLOPs per token; the ratio is the price of routing, sorting,
gathering and scattering. Both run on the same tokens in one process, interleaved, and the
table gives the median over repeats of the per-repeat ratio MoE / dense, in wall-clock
time and in process CPU time (on a shared machine, CPU time leaves out the time this
process waited for a core). ``--profile`` adds the top operators of the MoE layer.

Shapes: ``tiny`` is the tiny training preset's FFN (batch_size x seq_len tokens),
``default`` the ModelConfig defaults (d 256, 16 experts top-2, F 256) on 16 x 256 tokens,
``8k`` is 8192 tokens x d 512 x 16 experts top-2, expert hidden 512.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from moebal.model import MoELayer, ModelConfig, SwiGLU
from moebal.routing import BALANCERS, RoutingLog


@dataclass
class Case:
    name: str
    config: ModelConfig
    batch: int  # sequences; tokens = batch * config.seq_len

    @property
    def tokens(self) -> int:
        return self.batch * self.config.seq_len


def tiny_case() -> Case:
    """The tiny preset's shapes (batch_size sequences of seq_len), or the ModelConfig
    defaults with 16 sequences where the training presets are not installed."""
    try:
        from moebal.train.presets import get_preset

        model, train = get_preset("tiny")
        return Case("tiny", model, int(train.batch_size))
    except ImportError:
        return Case("tiny", ModelConfig(), 16)


def cases(names: list[str], balancer: str, router_options: dict[str, Any]) -> list[Case]:
    out = []
    for name in names:
        if name == "tiny":
            case = tiny_case()
        elif name == "default":
            case = Case("default", ModelConfig(), 16)
        elif name == "8k":
            case = Case("8k", ModelConfig(d_model=512, n_heads=8, num_experts=16, top_k=2,
                                          expert_hidden=512, seq_len=1024), 8)
        else:
            raise ValueError(f"unknown case {name!r}; known: tiny, default, 8k")
        opts = {**case.config.router_options, **router_options}
        try:
            case.config = ModelConfig.from_dict(
                {**case.config.to_dict(), "balancer": balancer, "router_options": opts}
            )
        except TypeError as exc:  # e.g. a router option of the wrong type
            raise ValueError(f"bad router option in {router_options!r}: {exc}") from exc
        out.append(case)
    return out


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (Linux only).

    By default glibc serves large blocks with fresh mmaps and gives freed heap tops back to
    the OS, so every new large tensor is page-faulted in again. Raising the trim threshold
    to 1 GiB and fixing the mmap threshold at its 32 MiB maximum keeps that memory in the
    heap. Process-wide, for both layers alike. Returns whether glibc took both settings.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)) and bool(
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_case(case: Case, repeats: int, warmup: int, device: torch.device,
               dtype: Optional[torch.dtype], profile: bool, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    c = case.config
    T, D = case.tokens, c.d_model
    moe = MoELayer(c).to(device).train()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=c.init_std)
    dense_hidden = (c.top_k + c.num_shared_experts) * c.expert_hidden
    dense = SwiGLU(D, dense_hidden).to(device)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=c.init_std)
    x_TD = torch.randn(T, D, device=device, requires_grad=True)
    g_TD = torch.randn(T, D, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def run_moe() -> None:
        log = RoutingLog()
        with autocast:
            y_TD = moe(x_TD, seq_len=c.seq_len, log=log)
            loss = log.routings[0].loss
        log.commit()
        outputs, grads = [y_TD], [g_TD.to(y_TD.dtype)]
        if loss.requires_grad:
            outputs.append(loss)
            grads.append(torch.ones_like(loss))
        torch.autograd.backward(outputs, grads)
        moe.router.step()

    def run_dense() -> None:
        with autocast:
            y_TD = dense(x_TD)
        y_TD.backward(g_TD.to(y_TD.dtype))

    for _ in range(warmup):
        run_moe()
        run_dense()
    moe_t, dense_t = [], []  # (wall, cpu) per repeat
    for i in tqdm(range(repeats), desc=f"moe-layer {case.name}", leave=False, unit="rep"):
        order = [(run_moe, moe_t), (run_dense, dense_t)]
        for fn, sink in order if i % 2 == 0 else order[::-1]:
            x_TD.grad = None
            sink.append(_timed(fn, device))
    moe_s, moe_cpu = [w for w, _ in moe_t], [c for _, c in moe_t]
    dense_s, dense_cpu = [w for w, _ in dense_t], [c for _, c in dense_t]
    ratios = [m / d for m, d in zip(moe_s, dense_s)]
    cpu_ratios = [m / d for m, d in zip(moe_cpu, dense_cpu) if d > 0]
    result = {
        "case": case.name,
        "tokens": T,
        "d_model": D,
        "num_experts": c.num_experts,
        "top_k": c.top_k,
        "expert_hidden": c.expert_hidden,
        "num_shared_experts": c.num_shared_experts,
        "dense_hidden": dense_hidden,
        "balancer": c.balancer,
        "router_options": c.router_options,
        "moe_ms": 1e3 * statistics.median(moe_s),
        "dense_ms": 1e3 * statistics.median(dense_s),
        "ratio_median": statistics.median(ratios),
        "ratio_of_medians": statistics.median(moe_s) / statistics.median(dense_s),
        "moe_cpu_ms": 1e3 * statistics.median(moe_cpu),
        "dense_cpu_ms": 1e3 * statistics.median(dense_cpu),
        "cpu_ratio_median": statistics.median(cpu_ratios) if cpu_ratios else None,
        "moe_ms_all": [1e3 * t for t in moe_s],
        "dense_ms_all": [1e3 * t for t in dense_s],
    }
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(3):
                run_moe()
        sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        result["profile"] = prof.key_averages().table(sort_by=sort_key, row_limit=20)
    return result


def format_table(results: list[dict[str, Any]]) -> str:
    head = ("case", "tokens", "D", "E", "K", "F", "dense F", "MoE ms", "dense ms",
            "ratio", "CPU-time ratio")
    rows = [head]
    for r in results:
        rows.append((
            r["case"], str(r["tokens"]), str(r["d_model"]), str(r["num_experts"]),
            str(r["top_k"]), str(r["expert_hidden"]), str(r["dense_hidden"]),
            f"{r['moe_ms']:.1f}", f"{r['dense_ms']:.1f}", f"{r['ratio_median']:.2f}x",
            "-" if r["cpu_ratio_median"] is None else f"{r['cpu_ratio_median']:.2f}x",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [" | ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _router_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"router option must be key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed: Any = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key, parsed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", default="tiny,default,8k",
                        help="comma-separated shapes: tiny (the tiny preset), default (ModelConfig "
                             "defaults, 16 x 256 tokens), 8k (default: all three)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per layer")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--balancer", default="none", help="router balancer (default: none)")
    parser.add_argument("--router-option", action="append", default=[], type=_router_option,
                        metavar="KEY=VALUE",
                        help="extra RouterConfig option, e.g. capacity_factor=1.25 (repeatable)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16"],
                        help="autocast dtype (default: float32, no autocast)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true",
                        help="also print the MoE layer's top operators (torch.profiler)")
    parser.add_argument("--keep-heap", action="store_true",
                        help="keep freed memory in glibc's heap (mallopt) so that large "
                             "tensors are not page-faulted in afresh (Linux)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats}, "
                         f"{args.warmup}")
    if args.balancer not in BALANCERS:
        raise ValueError(f"unknown balancer {args.balancer!r}; known: {sorted(BALANCERS)}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    keep_heap = keep_freed_memory() if args.keep_heap else False
    if args.keep_heap and not keep_heap:
        print("moebal: --keep-heap: glibc malloc settings not available here", file=sys.stderr)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device!r}: CUDA is not available")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    results = [
        bench_case(case, args.repeats, args.warmup, device, dtype, args.profile, args.seed)
        for case in cases(names, args.balancer, dict(args.router_option))
    ]
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": str(device), "dtype": args.dtype or "float32",
            "repeats": args.repeats, "load_average": list(os.getloadavg()),
            "keep_heap": keep_heap}
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=2))
        return 0
    print(f"MoE layer vs dense SwiGLU FFN, forward+backward, median of {args.repeats} "
          f"interleaved repeats (torch {meta['torch']}, {meta['threads']} threads, "
          f"{meta['device']}, {meta['dtype']}, balancer {args.balancer}"
          f"{', heap kept' if keep_heap else ''})")
    print(format_table(results))
    print(f"ratio = median over repeats of MoE time / dense time (wall clock); CPU-time "
          f"ratio likewise with process CPU time. Load average at the end: "
          f"{meta['load_average'][0]:.1f}")
    for r in results:
        if "profile" in r:
            print(f"\nMoE layer operators, case {r['case']}:\n{r['profile']}")
    return 0
