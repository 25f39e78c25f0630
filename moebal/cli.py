"""The ``moebal`` command line.

Each command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only maps command names to those modules, so adding a
command is one line in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from moebal.train.cli import run_command

# command words -> (module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("demo",): ("moebal.demo", "route a skewed stream with every balancer, print MaxVio"),
    ("bench", "router"): ("moebal.bench.router", "time every balancer against plain top-k"),
    ("compare",): ("moebal.report.compare", "train the model under each balancer and compare them"),
    ("report",): ("moebal.report.command", "regenerate a comparison's report from its run folder"),
    ("train",): ("moebal.train.cli", "train the MoE language model under one balancer"),
    ("bench", "schedule"): ("moebal.bench.schedule", "time the token scheduler against HiGHS"),
    ("simulate",): ("moebal.sim.cli", "replay routing traces on a modelled GPU cluster and compare balancing systems"),
    ("bench", "moe-layer"): ("moebal.bench.moe_layer", "time an MoE layer against a dense FFN"),
}


def build_parser() -> argparse.ArgumentParser:
    from moebal import __version__

    parser = argparse.ArgumentParser(
        prog="moebal",
        description="Load balancing for Mixture-of-Experts models.",
    )
    parser.add_argument("--version", action="version", version=f"moebal {__version__}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, (module_name, help_text) in COMMANDS.items():
        subparsers = top
        for i, word in enumerate(words[:-1]):
            key = " ".join(words[: i + 1])
            if key not in groups:
                group_parser = subparsers.add_parser(word, help=f"{word} commands")
                groups[key] = group_parser.add_subparsers(
                    dest=f"{word}_command", metavar="COMMAND", required=True
                )
            subparsers = groups[key]
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(
            words[-1], help=help_text, description=(module.__doc__ or help_text).strip()
        )
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    return run_command(args._run, args, ["moebal", *argv])


if __name__ == "__main__":
    sys.exit(main())
