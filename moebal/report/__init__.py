"""Comparison reports: tables, the papers' claims checked, plots, Markdown and HTML.

``write_report(run_dir)`` turns a comparison run folder's ``results.json`` (schema in
:mod:`moebal.report.results`) into ``report.md``, ``report.html`` and ``plots/*.png``.
"""

from moebal.report.claims import ClaimCheck, check_claims
from moebal.report.document import build_document, write_report
from moebal.report.results import (
    RESULTS_FILE,
    SCHEMA,
    MethodSummary,
    Stat,
    load_results,
    summarize,
    validate_results,
)

__all__ = [
    "RESULTS_FILE",
    "SCHEMA",
    "ClaimCheck",
    "MethodSummary",
    "Stat",
    "build_document",
    "check_claims",
    "load_results",
    "summarize",
    "validate_results",
    "write_report",
]
