"""Replay routing traces on a modelled GPU cluster and compare the balancing systems.

Without --trace, a synthetic trace is generated (Zipf-skewed by default). Every system runs
on the same micro-batches; the table gives the MoE-layer step time, throughput relative to
plain expert parallelism and to Megatron's standard EP x EDP placement, the GPU load
imbalance (max/mean per micro-batch), the tokens moved and the scheduling time charged.
With --sweep, GPU counts 8..1024 and expert counts 64..1024 are simulated instead.
Results go to --out (results.json and PNG plots); --json prints the JSON instead of tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from moebal.fileio import atomic_write_json
from moebal.sim.cost import HARDWARE, CostModel, ModelShape, calibrate, expert_flops_per_token
from moebal.sim.plots import plot_run, plot_sweep
from moebal.sim.simulate import simulate
from moebal.sim.systems import SYSTEMS, Cluster
from moebal.sim.tables import print_sweep, print_table, print_validation
from moebal.sim.trace import GENERATORS, generate_trace, microbatches
from moebal.sim.validate import read_calibration, read_records, validate
from moebal.trace import RoutingTrace, load_trace

SWEEP_GPUS = (8, 32, 64, 256, 1024)
SWEEP_EXPERTS = (64, 256, 1024)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _systems(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SYSTEMS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown systems {bad or text!r}; choose from {','.join(SYSTEMS)}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("work")
    g.add_argument("--trace", nargs="+", type=Path, metavar="NPZ",
                   help="routing trace(s) from `moebal train --trace` (each simulated on its own)")
    g.add_argument("--synthetic", choices=GENERATORS, default="zipf", help="generator when no --trace (default zipf)")
    g.add_argument("--exponent", type=float, default=1.0, help="Zipf exponent of the synthetic popularity")
    g.add_argument("--drift", type=float, default=1.0, help="experts the popularity rotates per step (drift)")
    g.add_argument("--hot-experts", type=int, default=4, help="hot experts per step (burst)")
    g.add_argument("--hot-factor", type=float, default=8.0, help="weight multiplier of hot experts (burst)")
    g.add_argument("--steps", type=int, help="synthetic steps, one micro-batch per GPU each (default 20; sweep 3)")
    g.add_argument("--layers", type=int, help="synthetic MoE layers (default 2; sweep 1)")
    g.add_argument("--tokens-per-gpu", type=int, default=4096,
                   help="tokens per GPU and micro-batch (traces are rescaled to it; 0 keeps a trace's counts)")
    g.add_argument("--trace-pool", type=int, default=1,
                   help="recorded shard vectors summed into one GPU's micro-batch (default 1)")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("cluster")
    g.add_argument("--gpus", type=int, default=32)
    g.add_argument("--experts", type=int, default=64, help="experts (a trace's own count wins)")
    g.add_argument("--top-k", type=int, default=2, help="experts per token (a trace's own K wins)")
    g.add_argument("--ep", type=int, default=4, help="expert-parallel group size (experts per GPU = E / ep)")
    g.add_argument("--sched-group", type=int, default=8, help="GPUs per scheduling group (whole EP groups)")
    g.add_argument("--gpus-per-node", type=int, default=8)

    g = p.add_argument_group("cost model")
    g.add_argument("--hardware", choices=sorted(HARDWARE), default="h100")
    g.add_argument("--rate-tflops", type=float, help="sustained expert FLOP rate (TFLOP/s), overrides --hardware")
    g.add_argument("--calibrate", type=Path, metavar="JSON",
                   help="fit the rate (and overhead) from measured records with tokens and seconds")
    g.add_argument("--intra-gbps", type=float, help="NVLink GB/s per direction per GPU (default 450)")
    g.add_argument("--inter-gbit", type=float, help="network Gb/s per GPU (default 400)")
    g.add_argument("--bw-efficiency", type=float, help="fraction of link rates an all-to-all reaches (default 0.8)")
    g.add_argument("--latency-us", type=float, help="fixed cost of one all-to-all in microseconds (default 20)")
    g.add_argument("--d-model", type=int, default=4096)
    g.add_argument("--ffn-hidden", type=int, default=14336, help="expert hidden size F")
    g.add_argument("--seq-len", type=int, default=4096, help="sequence length (attention share only)")
    g.add_argument("--bytes-per-elem", type=int, default=2, help="bytes per dispatched element (bf16: 2)")
    g.add_argument("--passes", choices=("fwd", "fwd_bwd"), default="fwd_bwd")
    g.add_argument("--sync", choices=("gpu", "stage"), default="gpu",
                   help="layer time: slowest GPU's total (gpu) or sum of per-stage maxima (stage)")
    g.add_argument("--overlap", action="store_true", help="overlap scheduling with the dispatch")
    g.add_argument("--include-attention", action="store_true",
                   help="add each layer's (balanced) attention block to every system")

    g = p.add_argument_group("systems")
    g.add_argument("--systems", type=_systems, default=list(SYSTEMS), help=f"comma list of {','.join(SYSTEMS)}")
    g.add_argument("--rebalance-every", type=int, default=10, help="steps between EPLB/asymmetric re-placements")
    g.add_argument("--warmup", type=int,
                   help="untimed steps before the timed ones whose loads are the re-placing systems' first"
                        " history (default: --rebalance-every; traces use their first micro-batches)")
    g.add_argument("--sched-time-ms", type=float,
                   help="charge this per layer for LP scheduling instead of the measured solve time")

    g = p.add_argument_group("sweep and validation")
    g.add_argument("--sweep", action="store_true", help="sweep GPU and expert counts instead of one run")
    g.add_argument("--sweep-gpus", type=_int_list, default=list(SWEEP_GPUS))
    g.add_argument("--sweep-experts", type=_int_list, default=list(SWEEP_EXPERTS))
    g.add_argument("--validate", type=Path, metavar="JSONL",
                   help="compare predictions with a run's per-rank measurements and exit")

    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=Path("runs/simulate"), help="folder for results.json and plots")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--json", action="store_true", help="print JSON instead of tables")
    g.add_argument("--no-progress", action="store_true")


# ---------------------------------------------------------------------------------------
def build_cost(args) -> tuple[CostModel, dict]:
    hw = HARDWARE[args.hardware]
    notes = {"hardware": args.hardware}
    changes = {}
    if args.rate_tflops is not None:
        changes["rate"] = args.rate_tflops * 1e12
    if args.intra_gbps is not None:
        changes["intra_bw"] = args.intra_gbps * 1e9
    if args.inter_gbit is not None:
        changes["inter_bw"] = args.inter_gbit * 1e9 / 8
    if args.bw_efficiency is not None:
        changes["bw_efficiency"] = args.bw_efficiency
    if args.latency_us is not None:
        changes["latency_s"] = args.latency_us * 1e-6
    shape = ModelShape(args.d_model, args.ffn_hidden, args.top_k, args.bytes_per_elem, args.seq_len)
    if args.calibrate is not None:
        tokens, secs = read_calibration(args.calibrate, args.d_model, args.ffn_hidden, args.passes)
        rate, c0 = calibrate(tokens, secs, expert_flops_per_token(args.d_model, args.ffn_hidden, args.passes))
        changes["rate"] = rate
        changes["compute_overhead_s"] = c0 / (3 if args.passes == "fwd_bwd" else 1)
        notes["calibrated_from"] = str(args.calibrate)
        notes["calibrated_rate_tflops"] = rate / 1e12
        notes["calibrated_overhead_us"] = c0 * 1e6
    hw = hw.replace(**changes)
    cost = CostModel(
        hardware=hw,
        shape=shape,
        gpus_per_node=args.gpus_per_node,
        passes=args.passes,
        sync=args.sync,
        overlap=args.overlap,
        include_attention=args.include_attention,
    )
    return cost, notes


def replay(trace: RoutingTrace, options: Sequence[str] = (), label: str = "trace") -> dict:
    """Replay ``trace`` as ``moebal simulate --trace`` does with the command-line
    ``options`` (``["--gpus", "32", "--ep", "4", ...]``); returns that trace's result dict
    (its ``summary`` has one row per system)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    args = parser.parse_args(list(options))
    args.steps = 20 if args.steps is None else args.steps  # synthetic-only settings
    args.layers = 2 if args.layers is None else args.layers
    _check_args(args)
    cost, _ = build_cost(args)
    return _one(trace, label, args.gpus, args, cost, progress=False)


def _one(trace: RoutingTrace, label: str, gpus: int, args, cost: CostModel, progress: bool,
         synthetic: bool = False) -> dict:
    cluster = Cluster(gpus, trace.num_experts, args.ep, args.sched_group)
    tpg = args.tokens_per_gpu if args.tokens_per_gpu > 0 else None
    mb = microbatches(trace, gpus, tpg, pool=1 if synthetic else args.trace_pool)
    warm = args.warmup
    if warm is None:  # synthetic: the generated warm-up steps; a trace: up to half of it
        warm = args.rebalance_every if synthetic else min(args.rebalance_every, len(mb) // 2)
    if warm >= len(mb):
        raise ValueError(
            f"{label}: {len(mb)} micro-batches of {gpus} GPUs leave none to time after"
            f" --warmup {warm}; lower --warmup"
        )
    hist, mb = mb[:warm], mb[warm:]
    res = simulate(
        mb,
        cluster,
        cost.replace(shape=ModelShape(cost.shape.d_model, cost.shape.ffn_hidden, trace.top_k,
                                      cost.shape.bytes_per_elem, cost.shape.seq_len)),
        args.systems,
        top_k=trace.top_k,
        rebalance_every=args.rebalance_every,
        seed=args.seed,
        sched_time_s=None if args.sched_time_ms is None else args.sched_time_ms * 1e-3,
        history_MLGE=hist,
        progress=progress,
    )
    return {
        "label": label,
        "gpus": gpus,
        "experts": trace.num_experts,
        "top_k": trace.top_k,
        "micro_batches": int(mb.shape[0]),
        "warmup": int(warm),
        "max_vio_batch": _max_vio_batch(mb),
        "layers": int(mb.shape[1]),
        "trace_meta": trace.meta,
        "summary": res.summary(),
        "skipped": res.skipped,
        "series": {
            name: {
                "step_time_M": r.step_time_M.tolist(),
                "imbalance_ML": r.imbalance_ML.tolist(),
                "moved_ML": r.moved_ML.tolist(),
            }
            for name, r in res.systems.items()
        },
    }


def _labelled(path: Path) -> tuple[str, RoutingTrace]:
    """(label, trace): the file name, its folder when the name is the generic ``trace``, and
    the balancer recorded in the trace's metadata."""
    if path.is_file() and not zipfile.is_zipfile(path):
        raise ValueError(f"trace {str(path)!r} is not an .npz archive")
    try:
        trace = load_trace(path)
    except ValueError:
        raise
    except Exception as exc:  # a damaged archive fails inside numpy, zipfile or zlib
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(
            f"cannot read trace {str(path)!r}: damaged or not a trace ({type(exc).__name__}: {first})"
        ) from exc
    label = f"{path.parent.name}/{path.stem}" if path.stem == "trace" and path.parent.name else path.stem
    balancer = trace.meta.get("balancer")
    if balancer:
        label += f" ({balancer})"
    return label, trace


def _max_vio_batch(mb_MLGE: np.ndarray) -> float:
    """Mean over micro-batches and layers of the expert loads' MaxVio (max / mean - 1),
    the loads summed over all GPUs: how unbalanced the routing itself is."""
    loads = mb_MLGE.sum(2).astype(np.float64)
    mean = loads.mean(-1)
    ok = mean > 0
    return float((loads.max(-1)[ok] / mean[ok] - 1).mean()) if ok.any() else 0.0


def _synthetic(args, gpus: int, experts: int) -> RoutingTrace:
    return generate_trace(
        args.synthetic,
        steps=args.steps + (args.rebalance_every if args.warmup is None else args.warmup),
        layers=args.layers,
        shards=gpus,
        experts=experts,
        tokens_per_shard=args.tokens_per_gpu if args.tokens_per_gpu > 0 else 4096,
        top_k=args.top_k,
        exponent=args.exponent,
        drift=args.drift,
        hot_experts=min(args.hot_experts, experts),
        hot_factor=args.hot_factor,
        seed=args.seed,
    )


def _check_out_dir(out: Path) -> None:
    """Refuse an ``--out`` that cannot become a writable folder, before anything runs."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    parent = out
    while not parent.exists():  # the folder is created later: look at what exists now
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {str(out)!r}: {str(parent)!r} is not a folder")
    try:  # an unnamed file (O_TMPFILE where the system has it), gone once closed
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise ValueError(f"--out {str(out)!r}: {str(parent)!r} is not writable ({exc.strerror})") from exc


def _write_results(out: Path, result: dict) -> Path:
    path = out / "results.json"
    try:
        return atomic_write_json(path, result)
    except OSError as exc:
        raise ValueError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc


def _check_args(args) -> None:
    for name in ("steps", "layers", "gpus", "trace_pool", "experts", "top_k", "ep", "sched_group", "gpus_per_node",
                 "rebalance_every", "d_model", "ffn_hidden", "seq_len", "bytes_per_elem"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.tokens_per_gpu < 0:
        raise ValueError(f"--tokens-per-gpu must be >= 0, got {args.tokens_per_gpu}")
    if args.sched_time_ms is not None and args.sched_time_ms < 0:
        raise ValueError(f"--sched-time-ms must be >= 0, got {args.sched_time_ms}")


def run(args) -> int:
    if args.steps is None:
        args.steps = 3 if args.sweep else 20
    if args.layers is None:
        args.layers = 1 if args.sweep else 2
    _check_args(args)
    cost, notes = build_cost(args)
    if args.validate is not None:
        return _run_validate(args, cost)
    _check_out_dir(args.out)
    progress = not args.no_progress and not args.json
    if args.sweep:
        return _run_sweep(args, cost, notes, progress)
    return _run_single(args, cost, notes, progress)


def _run_validate(args, cost: CostModel) -> int:
    out = validate(read_records(args.validate), cost)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print_validation(out)
    return 0


def _sweep_configs(args) -> list[tuple[str, Optional[RoutingTrace], int, int]]:
    """(label, trace or None for a synthetic one, GPUs, experts) of every sweep point."""
    if args.trace:
        return [(label, tr, g, tr.num_experts) for label, tr in (_labelled(p) for p in args.trace)
                for g in args.sweep_gpus]
    return [(f"{args.synthetic} {g} GPUs x {e} experts", None, g, e)
            for e in args.sweep_experts for g in args.sweep_gpus]


def _run_sweep(args, cost: CostModel, notes: dict, progress: bool) -> int:
    combos = _sweep_configs(args)
    if progress:
        from tqdm import tqdm

        combos = tqdm(combos, desc="sweep", unit="config")
    runs, flat, skipped = [], [], []
    for label, tr, g, e in combos:
        if tr is None and e < args.top_k:
            skipped.append({"label": label, "reason": f"top-k {args.top_k} > {e} experts"})
            continue
        try:
            Cluster(g, e, args.ep, args.sched_group)
            r = _one(tr if tr is not None else _synthetic(args, g, e), label, g, args, cost, False,
                     synthetic=tr is None)
        except ValueError as exc:
            skipped.append({"label": label, "reason": str(exc)})
            continue
        runs.append(r)
        flat.extend({"gpus": g, "experts": r["experts"], **row} for row in r["summary"])
    result = {"args": _args_dict(args), "cost": _cost_dict(cost), "notes": notes,
              "sweep": flat, "skipped_configs": skipped,
              "runs": [{k: v for k, v in r.items() if k != "series"} for r in runs]}
    _write_results(args.out, result)
    if not args.no_plots and flat:
        plot_sweep(flat, args.out)
    if args.json:
        print(json.dumps(result, indent=1, default=float))
    else:
        print_sweep(flat, skipped)
        print(f"\nresults: {args.out / 'results.json'}")
    return 0


def _run_single(args, cost: CostModel, notes: dict, progress: bool) -> int:
    if args.trace:
        inputs = [_labelled(p) for p in args.trace]
    else:
        label = f"{args.synthetic} (exponent {args.exponent:g})" if args.synthetic != "uniform" else "uniform"
        inputs = [(label, _synthetic(args, args.gpus, args.experts))]
    runs = [_one(tr, label, args.gpus, args, cost, progress, synthetic=not args.trace) for label, tr in inputs]
    result = {"args": _args_dict(args), "cost": _cost_dict(cost), "notes": notes, "runs": runs}
    _write_results(args.out, result)
    if not args.no_plots:
        plot_run(runs, args.out)
    if args.json:
        print(json.dumps(result, indent=1, default=float))
    else:
        for r in runs:
            print_table(r)
        print(f"\nresults: {args.out / 'results.json'}" + ("" if args.no_plots else f" and plots in {args.out}/"))
    return 0


def _args_dict(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if k == "trace" and v else v)
            for k, v in vars(args).items() if not k.startswith("_") and not callable(v)}


def _cost_dict(cost: CostModel) -> dict:
    hw, sh = cost.hardware, cost.shape
    return {
        "hardware": hw.name, "rate_tflops": hw.rate / 1e12, "compute_overhead_us": hw.compute_overhead_s * 1e6,
        "intra_gbps": hw.intra_bw / 1e9, "inter_gbit": hw.inter_bw * 8 / 1e9, "bw_efficiency": hw.bw_efficiency,
        "latency_us": hw.latency_s * 1e6, "d_model": sh.d_model, "ffn_hidden": sh.ffn_hidden,
        "bytes_per_elem": sh.bytes_per_elem, "seq_len": sh.seq_len, "gpus_per_node": cost.gpus_per_node,
        "passes": cost.passes, "sync": cost.sync, "overlap": cost.overlap,
        "include_attention": cost.include_attention,
    }


def main(argv: Optional[list[str]] = None) -> int:  # python -m moebal.sim.cli
    parser = argparse.ArgumentParser(prog="moebal simulate", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
