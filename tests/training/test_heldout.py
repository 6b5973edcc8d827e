"""The held-out protocol: a package evaluated once on a corpus with its own seed, the figures in its manifest."""

import json
import shutil
import subprocess
import sys

import pytest

from operators.contract.package import load_package
from training.heldout import HeldOutError, evaluate_heldout
from training.synth.corpus import SynthConfig, generate_corpus


@pytest.fixture(scope="module")
def heldout_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout") / "c"
    generate_corpus(SynthConfig(out=str(out), studies=24, seed=1), progress=False)
    return out


def test_heldout_writes_the_figures_into_a_copy_of_the_package(tiny_package, heldout_corpus, tmp_path):
    pkg = tiny_package["pkg"]
    before = (pkg / "manifest.json").read_bytes()
    out = tmp_path / "released"
    report = tmp_path / "heldout"
    proc = subprocess.run(
        [sys.executable, "-m", "training.cli", "heldout", "--package", str(pkg), "--data", str(heldout_corpus),
         "--development", str(tiny_package["data"]), "--out", str(out), "--report", str(report), "--quiet"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (pkg / "manifest.json").read_bytes() == before  # the input package is untouched
    released = load_package(out)
    ev = released.manifest.model.evaluation
    assert ev["corpus"]["seed"] == 1 and ev["corpus"]["studies"] == 24
    assert ev["development_corpus"]["seed"] == 0
    assert ev["ground_truth"]["studies"] == 24
    assert 0 <= ev["ground_truth"]["macro_auroc"] <= 1 and ev["ground_truth"]["calls_per_true_finding"] >= 0
    assert len(ev["per_finding"]) == len(released.catalogue)
    calls = sum(v["calls"] for v in ev["per_finding"].values())
    present = sum(v["present"] for v in ev["per_finding"].values())
    assert ev["ground_truth"]["calls_per_true_finding"] == pytest.approx(calls / present)
    assert json.loads((tmp_path / "heldout.json").read_text()) == ev
    md = (tmp_path / "heldout.md").read_text()
    assert "ct-zeroshot-train heldout --package" in md and "seed 1" in md
    # a released model is evaluated once
    with pytest.raises(HeldOutError, match="evaluated once"):
        evaluate_heldout(out, heldout_corpus, tiny_package["data"], tmp_path / "again", progress=False)
    # the evaluated package runs like any package: the SR side reads the same manifest
    assert released.uid == load_package(pkg).uid


def test_heldout_refuses_the_development_seed_and_a_corpus_without_truth(tiny_package, heldout_corpus, tmp_path):
    with pytest.raises(HeldOutError, match="own seed"):
        evaluate_heldout(
            tiny_package["pkg"], tiny_package["data"], tiny_package["data"], tmp_path / "o", progress=False
        )
    no_truth = tmp_path / "no_truth"
    shutil.copytree(heldout_corpus, no_truth)
    (no_truth / "ground_truth.jsonl").unlink()
    with pytest.raises(HeldOutError, match="no ground_truth.jsonl"):
        evaluate_heldout(tiny_package["pkg"], no_truth, tiny_package["data"], tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
