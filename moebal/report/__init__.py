"""Comparison reports: tables, the papers' claims checked with paired statistics, plots,
Markdown and HTML.

``write_report(run_dir)`` turns a comparison run folder's ``results.json`` (schema in
:mod:`moebal.report.results`) into ``report.md``, ``report.html`` and ``plots/*.png``.
"""

from moebal.report.claims import VERDICTS, ClaimCheck, check_claims
from moebal.report.document import build_document, write_report
from moebal.report.results import (
    RESULTS_FILE,
    SCHEMA,
    MethodSummary,
    Stat,
    Variant,
    load_results,
    summarize,
    validate_results,
    variants_of,
)
from moebal.report.stats import Paired, minimum_detectable_effect, paired_difference

__all__ = [
    "RESULTS_FILE",
    "SCHEMA",
    "ClaimCheck",
    "VERDICTS",
    "MethodSummary",
    "Paired",
    "Stat",
    "Variant",
    "build_document",
    "check_claims",
    "load_results",
    "minimum_detectable_effect",
    "paired_difference",
    "summarize",
    "validate_results",
    "variants_of",
    "write_report",
]
