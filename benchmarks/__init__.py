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


def synth_dicom(folder, studies: int, profile: str, seed: int):
    """``studies`` synthetic studies of ``profile`` with DICOM series in ``folder/corpus`` (all cores), with
    progress; returns the DICOM root ``folder/corpus/dicom``."""
    import os
    from pathlib import Path

    from training.synth.corpus import SynthConfig, generate_corpus

    print(f"generating {studies} {profile} studies with DICOM ...", flush=True)
    cfg = SynthConfig(
        out=str(Path(folder) / "corpus"), studies=studies, seed=seed, profile=profile, dicom=True,
        workers=os.cpu_count() or 1,
    )  # fmt: skip
    generate_corpus(cfg, progress=True)
    return Path(folder) / "corpus" / "dicom"
