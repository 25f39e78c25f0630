"""Benchmark programs: CLI commands that print a table (and JSON with --json)."""
"""Benchmark programs: each prints a table (or JSON with --json); none asserts a time."""
