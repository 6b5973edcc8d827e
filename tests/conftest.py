import os
import shutil
import sys
from pathlib import Path

import pytest

from training.synth.corpus import SynthConfig, generate_corpus

WORKERS = min(os.cpu_count() or 1, 2)


def shared(tmp_path_factory, name: str, build) -> Path:
    """A session fixture's folder, built once per test run by ``build(folder)``. Under pytest-xdist
    (``make test`` runs three workers) the workers share it: the first builds it under a file lock while
    the other waits, and ``.complete`` marks it built (a folder left by a failed build is redone)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's temporary root, common to its workers
    out = base / name
    with FileLock(str(base / f"{name}.lock")):
        if not (out / ".complete").exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            build(out)
            (out / ".complete").touch()
    return out


@pytest.fixture(scope="session")
def corpus200(tmp_path_factory) -> Path:
    """The issue's reference corpus: 200 tiny studies with DICOM, seed 0."""

    def build(root: Path) -> None:
        config = SynthConfig(
            out=str(root / "c200"), studies=200, seed=0, profile="tiny", dicom=True, workers=WORKERS, masks=False
        )  # lesion masks: tests/training/test_synth.py makes its own
        generate_corpus(config, progress=False)

    return shared(tmp_path_factory, "corpus200", build) / "c200"


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

    def build(root: Path) -> None:
        cache = root / "cache"
        train(corpus200, root / "run", TrainConfig.load("cpu-tiny", TINY_TRAIN), cache_dir=cache, progress=False)
        proc = subprocess.run(
            export_cli(root / "run", corpus200, root / "pkg", cache, "--thresholds", "validation"),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "image parity" in proc.stdout

    root = shared(tmp_path_factory, "tiny_package", build)
    cache = root / "cache"
    return {"root": root, "run": root / "run", "pkg": root / "pkg", "cache": cache, "data": corpus200}


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def dcmtk(tool: str) -> str:
    """The path of DCMTK's ``tool`` (storescu, echoscu...): the first on PATH outside this Python's
    environment, whose bin folder may hold pynetdicom's console scripts of the same names."""
    own = Path(sys.prefix, "bin").resolve()
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != own)
    found = shutil.which(tool, path=path)
    if found is None:
        raise FileNotFoundError(f"DCMTK's {tool} is not installed (apt-get install dcmtk)")
    return found
