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
    generate_corpus(SynthConfig(out=str(out), studies=200, seed=0, profile="tiny", dicom=True, workers=WORKERS),
                    progress=False)
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


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
