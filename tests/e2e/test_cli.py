import subprocess
import sys

import numpy as np


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, **kw)


def test_synth_command(tmp_path):
    p = run("training.cli", "synth", str(tmp_path / "c"), "--studies", "3", "--seed", "1", "--dicom", "--quiet")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "c" / "corpus.json").exists() and len(list((tmp_path / "c" / "dicom").iterdir())) == 3
    again = run("training.cli", "synth", str(tmp_path / "c"), "--studies", "3", "--quiet")
    assert again.returncode == 2 and "already holds a corpus" in again.stderr


def test_preprocess_and_findings_commands(corpus200, tmp_path):
    sid = sorted((corpus200 / "dicom").iterdir())[0].name
    p = run(
        "operators.cli",
        "preprocess",
        str(corpus200 / "dicom" / sid),
        "--spec",
        "tiny",
        "--out",
        str(tmp_path / "x.npy"),
    )
    assert p.returncode == 0, p.stderr
    assert np.load(tmp_path / "x.npy").shape == (1, 64, 56, 56)
    p = run("operators.cli", "preprocess", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "y.npy"))
    assert p.returncode == 2 and "missing.nii.gz: NIfTI file does not exist" in p.stderr
    p = run("operators.cli", "findings")
    assert p.returncode == 0 and p.stdout.count("\n") == 31


def test_operators_never_import_training():
    code = (
        "import sys, operators.cli, operators.contract.preprocessing, operators.contract.dicom_series, "
        "operators.contract.findings, operators.app, operators.pipeline, operators.contract.package, "
        "operators.contract.scoring, operators.sr, operators.batch, operators.listener; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('training', 'transformers', 'tokenizers')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_version_and_plain_help():
    for mod, prog in (("training.cli", "ct-zeroshot-train"), ("operators.cli", "ct-zeroshot")):
        p = run(mod, "--version")
        assert p.returncode == 0 and p.stdout.strip().startswith(prog + " 0."), p.stdout + p.stderr
        h = run(mod, "--help")
        assert h.returncode == 0 and "``" not in h.stdout and "Current stack size" not in h.stderr
