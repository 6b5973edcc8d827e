"""Benchmark programs: they measure the deploy and training sides, so they belong to neither.

Run from the repository root as ``python -m benchmarks.<name>`` (the Makefile's ``bench-*`` targets)."""


def bench_parser(module: str, doc: str | None):
    """The benchmarks' common command line: ``python -m benchmarks.MODULE --out DIR ...``."""
    import argparse

    p = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{module}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="results/bench", help="folder for the results (default: results/bench)")
    return p
