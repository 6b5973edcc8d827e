"""Benchmark programs: they measure the deploy and training sides, so they belong to neither.

Run from the repository root as ``python -m benchmarks.<name>`` (the Makefile's ``bench-*`` targets)."""
