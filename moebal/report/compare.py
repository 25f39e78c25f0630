"""Train the same MoE model under each balancer and compare them with the papers' metrics.

Same model, data, seeds and number of steps for every method; only the balancer changes.
Writes a run folder (--out, default runs/compare):

    results.json            every number of the comparison (see moebal.report.results)
    report.md, report.html  held-out and training balance, the papers' claims checked
                            with paired statistics over the seeds, the plots
    plots/*.png
    runs/<method>/seed<k>/  one training run each: config.json, metrics.jsonl,
                            result.json, run.json (its row in results.json),
                            trace.npz (its routing trace: the report's simulated
                            cluster column), and checkpoint.pt while it trains (kept
                            with --keep-checkpoints)

An interrupted comparison (Ctrl-C, SIGTERM: the run in progress checkpoints first)
continues with --resume: finished runs are read back, an unfinished one continues from its
last checkpoint (or starts again when that checkpoint is damaged), the others start. A run
whose loss stops being finite is stopped and marked failed with its step, for good; the
others go on. The command exits with 1 when every run failed.

The plan is built and checked in :mod:`moebal.report.plan`, run in
:mod:`moebal.report.runner`; this module is the command line.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from moebal.report.plan import (
    DEFAULT_BALANCERS,
    DEFAULT_OUT,
    DEFAULT_PRESET,
    Plan,
    make_plan,
    parse_balancers,
)
from moebal.report.runner import run_comparison

__all__ = ["Plan", "add_arguments", "command_line", "make_plan", "parse_balancers", "run",
           "run_comparison"]


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--balancers", default=",".join(DEFAULT_BALANCERS),
                        help="comma-separated balancers or variants to compare (default: "
                             "%(default)s; also global_aux_loss, loss_free_softmax, sinkhorn, "
                             "optimal; see docs/compare.md for each variant's setting)")
    parser.add_argument("--sweep", action="append", default=[], metavar="VARIANT[.OPTION=V1,V2]",
                        help="also train a grid of one option of a compared variant: VARIANT "
                             "alone sweeps its default grid (aux_loss: aux_loss_coeff 1e-4, "
                             "1e-3, 1e-2; loss_free: bias_update_rate 1e-4, 1e-3, 1e-2; bip: "
                             "bip_iters 2, 4, 8); the report gives the best by validation "
                             "beside the paper setting. Repeatable")
    parser.add_argument("--jobs", type=_jobs, default=1, metavar="N",
                        help="train N runs at a time, each in its own process (default: "
                             "%(default)s); 'auto': on a CPU one per core the runs' threads "
                             "leave (each run uses one thread unless --set threads=N), on a "
                             "GPU one")
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="train each balancer with seeds 0..N-1 (default: %(default)s)")
    parser.add_argument("--preset", default=DEFAULT_PRESET,
                        help="model + training preset: micro, tiny, small, paper-16e, "
                             "paper-64e (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="optimizer steps per run (default: the preset's)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="run folder (default: %(default)s)")
    parser.add_argument("--data", default=None,
                        help="training text: a file, a folder of .txt files or a .jsonl "
                             "(default: the built-in corpus)")
    parser.add_argument("--tokenizer", default=None,
                        help="a tokenizer.json to use instead of training BPE")
    parser.add_argument("--text-field", default="text", help="JSONL text field (default: text)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="BPE vocabulary to train (default: the preset's)")
    parser.add_argument("--cache-dir", default=None,
                        help="tokenized-corpus cache (default: $MOEBAL_CACHE or ~/.cache/moebal)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda when available (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="change a model/training setting of the preset for every run, "
                             "e.g. --set batch_size=8 --set router.score_function=sigmoid")
    parser.add_argument("--balancer-option", dest="balancer_options", action="append",
                        default=[], metavar="METHOD.OPTION=VALUE",
                        help="change one balancer's coefficient, e.g. "
                             "--balancer-option aux_loss.aux_loss_coeff=0.001")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted comparison in --out")
    parser.add_argument("--force", action="store_true",
                        help="start over in --out, replacing its results")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each finished run's checkpoint.pt (default: deleted once "
                             "the run is recorded)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _jobs(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {text!r}")
    return value


def auto_jobs(plan) -> int:
    """``--jobs auto``: on a CPU as many runs as the cores hold at the plan's threads per
    run (at most the number of runs); on a GPU one."""
    if plan.device != "cpu":
        return 1
    threads = plan.train.threads or os.cpu_count() or 1
    return max(1, min(len(plan.runs()), (os.cpu_count() or 1) // threads))


def command_line(args: argparse.Namespace) -> str:
    """The full command that reproduces this comparison (every setting spelled out)."""
    parts = ["moebal", "compare", "--preset", args.preset, "--balancers", args.balancers,
             "--seeds", str(args.seeds)]
    if args.steps is not None:
        parts += ["--steps", str(args.steps)]
    parts += ["--device", args.device, "--out", args.out]
    for flag, value in (("--data", args.data), ("--tokenizer", args.tokenizer)):
        if value is not None:
            parts += [flag, value]
    if args.text_field != "text":
        parts += ["--text-field", args.text_field]
    if args.vocab_size is not None:
        parts += ["--vocab-size", str(args.vocab_size)]
    for item in args.overrides:
        parts += ["--set", item]
    for item in args.balancer_options:
        parts += ["--balancer-option", item]
    for item in args.sweep:
        parts += ["--sweep", item]
    if args.keep_checkpoints:
        parts.append("--keep-checkpoints")
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    args.balancers = ",".join(parse_balancers(args.balancers))
    plan = make_plan(
        balancers=args.balancers,
        seeds=args.seeds,
        preset=args.preset,
        steps=args.steps,
        overrides=args.overrides,
        balancer_options=args.balancer_options,
        sweep=args.sweep,
        data=args.data,
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        vocab_size=args.vocab_size,
        cache_dir=args.cache_dir,
        device=args.device,
        command=command_line(args),
    )
    results = run_comparison(
        plan, args.out, resume=args.resume, force=args.force,
        keep_checkpoints=args.keep_checkpoints, progress=not args.no_progress,
        jobs=auto_jobs(plan) if args.jobs == "auto" else args.jobs,
    )
    failed = [r for r in results["runs"] if r["status"] == "failed"]
    out = Path(args.out)
    print(f"report: {out / 'report.md'} and {out / 'report.html'}")
    for r in failed:
        print(f"failed: {r['method']} seed {r['seed']} at step {r['failure']['step']}: "
              f"{r['failure']['reason']}")
    if failed and len(failed) == len(results["runs"]):
        print("moebal: every run failed", file=sys.stderr)
        return 1
    return 0
