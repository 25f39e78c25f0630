"""Benchmark programs: CLI commands that print a table (and JSON with --json)."""
