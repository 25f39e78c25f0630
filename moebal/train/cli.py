"""Train the MoE language model under one balancer and record loss, perplexity and balance.

Examples:
  moebal train                                  # tiny preset, default corpus, no balancer
  moebal train --preset small --balancer loss_free --seed 1
  moebal train --data my_texts/ --vocab-size 4096 --set lr=3e-3 --set router.aux_loss_coeff=0.01
  moebal train --out runs/x --resume            # continue an interrupted run
The run folder gets config.json, metrics.jsonl, checkpoint.pt, result.json (and trace.npz
with --trace); see docs/training.md and docs/traces.md.

Checkpoints: checkpoint.pt is written after the last step, every checkpoint_every steps
(default 0 = off for micro and tiny, 200 for small, 1000 for the paper presets), every
checkpoint_interval_s seconds of wall time (default 600; --set checkpoint_interval_s=60),
and on Ctrl-C (SIGINT) or SIGTERM: the step in progress finishes, the checkpoint is
written, and the command exits with 130 (SIGINT) or 143 (SIGTERM); a second Ctrl-C stops
at once. --resume continues exactly where the checkpoint stands; a run folder is locked
while a run uses it. See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
from typing import Any, Callable, Optional, Sequence

from moebal.train.errors import RunInterrupted
from moebal.train.presets import PRESETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help="model + training preset (default: tiny)")
    parser.add_argument("--balancer", default=None,
                        help="routing balancer (default: the preset's, 'none')")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=None, help="seed of weights and data order")
    parser.add_argument("--out", default=None,
                        help="run folder (default: runs/<preset>-<balancer>-seed<seed>)")
    parser.add_argument("--data", default=None,
                        help="a text file, a folder of .txt files or a .jsonl file "
                             "(default: Shakespeare + Wikipedia summaries)")
    parser.add_argument("--text-field", default="text", help="JSONL field with the text")
    parser.add_argument("--tokenizer", default=None,
                        help="a tokenizer.json (HF tokenizers) instead of training BPE")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="BPE vocabulary to train (default: the preset's)")
    parser.add_argument("--cache-dir", default=None,
                        help="tokenized-corpus cache (default: $MOEBAL_CACHE or ~/.cache/moebal)")
    parser.add_argument("--trace", action="store_true",
                        help="save per-step, per-layer, per-shard expert counts to trace.npz")
    parser.add_argument("--trace-shards", type=int, default=None,
                        help="data-parallel shards of the batch in the trace (default 8)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint")
    parser.add_argument("--force", action="store_true",
                        help="overwrite a run already in --out")
    parser.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a ModelConfig/TrainConfig field (router.<option> for "
                             "router options); repeatable")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    from moebal.parallel.cli import add_parallel_arguments

    add_parallel_arguments(parser)


def configs_from_args(args: argparse.Namespace):
    """(ModelConfig, TrainConfig, DataConfig) from the parsed arguments."""
    from moebal.data import DataConfig
    from moebal.train.presets import apply_overrides, get_preset

    model_cfg, train_cfg = get_preset(args.preset)
    model_cfg, train_cfg = apply_overrides(model_cfg, train_cfg, args.overrides)
    model_changes = {}
    if args.balancer is not None:
        model_changes["balancer"] = args.balancer
    train_changes = {
        k: v for k, v in (("steps", args.steps), ("seed", args.seed), ("device", args.device),
                          ("trace_shards", args.trace_shards))
        if v is not None
    }
    if args.trace:
        train_changes["trace"] = True
    model_cfg = dataclasses.replace(model_cfg, **model_changes)
    train_cfg = dataclasses.replace(train_cfg, **train_changes)
    data_cfg = DataConfig(
        path=args.data,
        text_field=args.text_field,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size if args.vocab_size is not None else model_cfg.vocab_size,
        cache_dir=args.cache_dir,
    )
    data_cfg.validate()
    return model_cfg, train_cfg, data_cfg


def run(args: argparse.Namespace) -> int:
    from moebal.parallel import cli as parallel_cli
    from moebal.train.run import train

    # --nproc N: checked, then re-run under torchrun
    launched = parallel_cli.launch_if_asked(args, configs_from_args)
    if launched is not None:
        return launched
    try:
        model_cfg, train_cfg, data_cfg = configs_from_args(args)
    except TypeError as exc:  # a wrongly typed --set value: bad input like any other
        raise ValueError(str(exc)) from None
    out = args.out or f"runs/{args.preset}-{model_cfg.balancer}-seed{train_cfg.seed}"
    if parallel_cli.under_torchrun():
        result = parallel_cli.train_from_args(args, model_cfg, train_cfg, data_cfg, out)
        if result is None:  # not rank 0: rank 0 reports
            return 0
    else:
        result = train(model_cfg, train_cfg, out, data=data_cfg, preset=args.preset,
                       resume=args.resume, force=args.force, progress=not args.quiet)

    def fmt(x: float, spec: str = ".3f") -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    print(f"run folder       {out}")
    asked = data_cfg.vocab_size if data_cfg.tokenizer is None else None
    got = result.model_config.get("vocab_size")
    if asked is not None and got is not None and got < asked:
        print(f"vocabulary       {got:,} tokens (asked for {asked:,}: the text has no more "
              f"distinct merges)")
    print(f"steps            {result.steps} ({result.tokens:,} tokens, "
          f"{result.params:,} params, {result.active_params:,} active)")
    print(f"val perplexity   {fmt(result.val_ppl, '.2f')} (loss {fmt(result.val_loss)})")
    print(f"MaxVio_global    {fmt(result.max_vio_global)}")
    print(f"AvgMaxVio        {fmt(result.avg_max_vio)}   SupMaxVio {fmt(result.sup_max_vio)}")
    print(f"time             {fmt(result.train_seconds, '.1f')} s training, "
          f"{fmt(result.wall_seconds, '.1f')} s wall, {fmt(result.tokens_per_s, ',.0f')} tokens/s, "
          f"router {fmt(100 * result.router_time_share, '.1f')}% of the step")
    if result.diverged_step is not None:
        print(f"moebal: the loss diverged at step {result.diverged_step}", file=sys.stderr)
        return 1
    return 0


def resume_command(command: Sequence[str]) -> str:
    """``command`` with --resume instead of --force (what continues an interrupted run)."""
    words = [w for w in command if w not in ("--force", "--resume")]
    return shlex.join([*words, "--resume"])


def run_command(run: Callable[[argparse.Namespace], Any], args: argparse.Namespace,
                command: Sequence[str]) -> int:
    """``run(args)`` with the command line's error handling: bad input is one line and
    exit 2; a run stopped by a signal says where its checkpoint is and how to continue,
    and exits with 128 + the signal number."""
    try:
        return int(run(args) or 0)
    except ValueError as exc:  # bad input: one clear line, no traceback
        print(f"moebal: error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:
        hint = f"; continue with: {resume_command(command)}" if exc.checkpoint else ""
        print(f"moebal: {exc}{hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # with a message: runs that checkpointed (compare --jobs)
        detail = f": {exc}; continue with: {resume_command(command)}" if str(exc) else ""
        print(f"moebal: interrupted{detail}", file=sys.stderr)
        return 130


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m moebal.train`` (what torchrun launches)."""
    parser = argparse.ArgumentParser(prog="python -m moebal.train", description=__doc__)
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    return run_command(run, args, ["python", "-m", "moebal.train", *argv])
