import os
import shutil
from pathlib import Path

import pytest

from training.synth.corpus import SynthConfig, generate_corpus

WORKERS = min(os.cpu_count() or 1, 2)


@pytest.fixture(scope="session")
def corpus200(tmp_path_factory) -> Path:
    """The issue's reference corpus: 200 tiny studies with DICOM, seed 0."""
    out = tmp_path_factory.mktemp("corpus") / "c200"
    generate_corpus(
        SynthConfig(out=str(out), studies=200, seed=0, profile="tiny", dicom=True, workers=WORKERS), progress=False
    )
    return out


@pytest.fixture
def corpus_copy(corpus200, tmp_path) -> Path:
    """A writable copy of the corpus tables (images linked, not copied) for bad-input tests."""
    out = tmp_path / "copy"
    out.mkdir()
    for name in ("reports_final.csv", "zero_shot_findings_disease_cls.csv"):
        shutil.copy(corpus200 / name, out / name)
    (out / "merlin_data").symlink_to(corpus200 / "merlin_data")
    return out


TINY_TRAIN = [
    "train.batch_size=8",
    "train.steps=6",
    "train.eval_every=3",
    "train.eval_studies=16",
    "optim.warmup_steps=2",
    "text.vocab_size=400",
    "text.hidden=32",
    "text.layers=1",
    "text.heads=2",
    "text.max_length=96",
]


def export_cli(run, data, out, cache, *extra: str) -> list[str]:
    """The ``ct-zeroshot-train export`` command line the tests run."""
    import sys

    args = ["export", "--run", run, "--data", data, "--out", out, "--cache", cache, "--quiet", *extra]
    return [sys.executable, "-m", "training.cli", *map(str, args)]


@pytest.fixture(scope="session")
def tiny_package(corpus200, tmp_path_factory) -> dict:
    """A few-step run on the 200-study corpus, exported by the CLI with validation thresholds: a real
    model package (weights barely trained) for the export, deploy and front-end tests."""
    import subprocess

    from training.config import TrainConfig
    from training.train import train

    root = tmp_path_factory.mktemp("export")
    cache = root / "cache"
    train(corpus200, root / "run", TrainConfig.load("cpu-tiny", TINY_TRAIN), cache_dir=cache, progress=False)
    proc = subprocess.run(
        export_cli(root / "run", corpus200, root / "pkg", cache, "--thresholds", "validation"),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "image parity" in proc.stdout
    return {"root": root, "run": root / "run", "pkg": root / "pkg", "cache": cache, "data": corpus200}


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
