"""Regenerate a comparison's report (report.md, report.html, plots/) from its run folder.

Reads RUN_DIR/results.json only, so it works on a copied or unpacked run folder without
training anything.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a `moebal compare` output folder")
    parser.add_argument("--simulate", action="store_true",
                        help="first recompute each run's simulated-cluster column from the "
                             "routing trace in its run folder, and rewrite results.json")


def run(args: argparse.Namespace) -> int:
    from moebal.report import write_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"RUN_DIR {str(run_dir)!r} is not a folder")
    if args.simulate:
        from moebal.fileio import atomic_write_json
        from moebal.report.results import RESULTS_FILE, load_results
        from moebal.report.simcolumn import resimulate

        results = load_results(run_dir)
        count = resimulate(run_dir, results)
        if not count:
            raise ValueError(f"no run in {str(run_dir)!r} has a routing trace (runs/*/seed*/trace.npz)")
        atomic_write_json(run_dir / RESULTS_FILE, results)
        print(f"simulated {count} runs' traces")
    written = write_report(run_dir)
    for name in ("report.md", "report.html"):
        print(written[name])
    print(f"{len(written) - 2} plots in {run_dir / 'plots'}")
    return 0
