"""Calibrated certainties: Platt scaling per finding (``training.calibration``), the ``calibrate`` command,
and SRs whose "Certainty of Finding" is a probability of presence that never exceeds the operating point
for a finding called absent."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from operators.contract.package import default_package_dir, load_package
from operators.sr import read_findings
from tests.sr_validators import have_validators, validate_all
from training.calibration import calibrated, fit_platt, reliability


def _logit(p):
    return np.log(p / (1 - p))


def test_platt_recovers_a_known_calibration_and_stays_monotone():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.99, size=(6000, 3))
    truth = 1 / (1 + np.exp(-(2.0 * _logit(p[:, 0]) - 1.0)))
    y = np.stack(
        [
            rng.random(6000) < truth,  # a score that carries the truth
            np.zeros(6000, dtype=bool),  # one class only
            rng.random(6000) < 1 - p[:, 2],  # a score that falls with presence
        ],
        axis=1,
    ).astype(np.int8)
    y[:100, 0] = -1  # unlabelled cells are left out of the fit
    recs = fit_platt(p, y, "test")
    assert recs[0]["a"] == pytest.approx(2.0, abs=0.15) and recs[0]["b"] == pytest.approx(-1.0, abs=0.15)
    assert recs[0]["n"] == 5900 and "note" not in recs[0]
    assert recs[1]["a"] == 0.0 and "single class" in recs[1]["note"]
    assert recs[2]["a"] == 0.0 and "negative" in recs[2]["note"]
    assert recs[2]["b"] == pytest.approx(_logit(y[:, 2].mean()), abs=0.01)  # the prevalence, flat
    cal = calibrated(p, recs)
    order = np.argsort(p[:, 0])
    assert np.all(np.diff(cal[order, 0]) >= 0)
    before, after = reliability(p[:, :1], y[:, :1]), reliability(cal[:, :1], y[:, :1])
    assert after["ece"] < before["ece"] and after["brier"] < before["brier"]


def test_calibrate_writes_a_package_whose_srs_state_calibrated_certainties(tiny_package, tmp_path):
    out = tmp_path / "calibrated"
    cmd = [sys.executable, "-m", "training.cli", "calibrate", "--package", str(tiny_package["pkg"])]
    cmd += ["--data", str(tiny_package["data"]), "--out", str(out), "--quiet"]
    proc = subprocess.run([*cmd, "--evaluate", str(tiny_package["data"])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "calibrated on" in proc.stdout and "ground_truth: Brier" in proc.stdout
    pkg = load_package(out)
    assert all(e.calibration and e.calibration["method"] == "platt" for e in pkg.manifest.findings)
    record = json.loads((out / "manifest.json").read_text())["provenance"]["calibration"]
    assert record["split"] == "validation" and record["evaluation"]["studies"] == 200
    again = subprocess.run(cmd, capture_output=True, text=True)  # out exists: refused, one line, exit 2
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    bad = json.loads((out / "manifest.json").read_text())
    bad["findings"][0]["calibration"]["a"] = -1.0
    (out / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"calibration.*a must be >= 0"):
        load_package(out)


def test_the_demo_srs_never_state_more_certainty_than_the_operating_point_for_an_absent_finding(tmp_path):
    """The embedded demo model on version-3 phantoms (as ``make demo``): every finding coded Absent states a
    certainty at or below its operating point (the calibrated certainty at its threshold), the raw score is
    kept as a parameter, and the SRs pass the three validators."""
    from training.synth.corpus import SynthConfig, generate_corpus

    generate_corpus(SynthConfig(out=str(tmp_path / "corpus"), studies=4, seed=7, dicom=True, version=3), progress=False)
    cmd = [sys.executable, "-m", "operators.cli", "infer", str(tmp_path / "corpus" / "dicom")]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path / "out"), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pkg = load_package(default_package_dir())
    points = {e.finding.id: float(e.calibrated(e.threshold)) * 100 for e in pkg.manifest.findings}
    srs = sorted((tmp_path / "out" / "sr").glob("SR_*.dcm"))
    assert len(srs) == 4
    absent = 0
    for path in srs:
        for fid, f in read_findings(path).items():
            entry = pkg.manifest.findings[pkg.catalogue.ids.index(fid)]
            assert f["certainty"] == pytest.approx(float(entry.calibrated(f["score"])) * 100, abs=2e-3)
            if f["assessed"] and not f["present"]:
                absent += 1
                assert f["certainty"] <= points[fid] + 1e-6, (path.name, fid, f, points[fid])
            if f["present"]:
                assert f["certainty"] >= points[fid] - 1e-6
        params = [str(e.value) for e in pydicom.dcmread(path).iterall() if e.keyword == "TextValue"]
        assert any(v.startswith("certainty=calibrated probability (Platt scaling") for v in params)
    assert absent > 50
    if have_validators():
        problems = validate_all(srs, pixelmed_files=1)
        assert not any(problems.values()), problems


def test_add_text_encoder_gives_a_prompts_only_package_its_runs_encoder(tiny_package, tmp_path):
    """A package exported with ``--text none`` gains its run's text encoder (int8): the deploy side encodes
    the catalogue's prompts near the stored embeddings, and the measure of changed decisions is recorded.
    A package that has one, or a run it did not come from, is refused."""
    from tests.conftest import export_cli

    bare = tmp_path / "bare"
    proc = subprocess.run(
        export_cli(tiny_package["run"], tiny_package["data"], bare, tiny_package["cache"], "--text", "none"),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cmd = [sys.executable, "-m", "training.cli", "add-text-encoder", "--run", str(tiny_package["run"])]
    out = tmp_path / "with-text"
    proc = subprocess.run(
        [*cmd, "--package", str(bare), "--out", str(out), "--data", str(tiny_package["data"]), "--studies", "16"],
        capture_output=True,
        text=True,
    )
    if proc.returncode == 2:  # the barely trained tower may not survive int8: refused, nothing left behind
        assert "of validation decisions (> 1%); ship it unquantised" in proc.stderr, proc.stderr[-2000:]
        assert not out.exists() and not (tmp_path / "with-text.partial").exists()
        proc = subprocess.run(
            [*cmd, "--package", str(bare), "--out", str(out), "--quantize", "none"], capture_output=True, text=True
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from operators.contract.scoring import ZeroShotModel

    pkg = load_package(out)
    record = json.loads((out / "manifest.json").read_text())["provenance"]["text_encoder"]
    assert record["float_vs_stored_cosine_distance_max"] < 1e-4
    if "quantization" in record:
        assert record["quantization"]["bytes_int8"] < record["quantization"]["bytes_float"]
        assert record["quantization"]["decisions"]["studies"] == 16
    prompts = list(pkg.manifest.findings[0].finding.positive_prompts)
    emb = ZeroShotModel(pkg, device="cpu").embed_texts(prompts)
    stored = pkg.prompt_embeddings[: len(prompts)]
    cos = np.sum(emb * stored, axis=1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(stored, axis=1)
    assert cos.min() > 0.9
    again = subprocess.run([*cmd, "--package", str(out), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert again.returncode == 2 and "already has a text encoder" in again.stderr
