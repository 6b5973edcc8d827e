"""The MONAI Deploy application end to end: DICOM tree in, validated TID 1500 SRs out, bad input handled."""

import json
import os
import resource
import shutil
import subprocess
import sys

import pydicom
import pytest

from operators.contract.dicom_series import scan_tree
from operators.contract.package import load_package
from operators.contract.scoring import ZeroShotModel
from operators.pipeline import SeriesToModelInput, StudyWork, select_series, sr_filename
from operators.sr import group_order, read_findings, read_intended_use
from tests.dicom_cases import broken_studies, only_reports, small_study, study_uid
from tests.sr_validators import dciodvfy, have_validators, validate_all


def _stack():
    resource.setrlimit(resource.RLIMIT_STACK, (32 * 1024 * 1024, resource.getrlimit(resource.RLIMIT_STACK)[1]))


def run_app(*args, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "operators", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        preexec_fn=_stack,
        timeout=600,
    )


@pytest.fixture(scope="module")
def tree(corpus200, tmp_path_factory):
    """Three good studies (HFS and FFS, nested in an odd layout) and one study per kind of bad input."""
    root = tmp_path_factory.mktemp("input")
    truth = [json.loads(line) for line in (corpus200 / "ground_truth.jsonl").read_text().splitlines()]
    hfs = [t["study id"] for t in truth if t["position"] == "HFS"][:2]
    ffs = [t["study id"] for t in truth if t["position"] == "FFS"][:1]
    good = {}
    for i, sid in enumerate(hfs + ffs):
        dst = root / f"site{i % 2}" / "deep" / sid
        shutil.copytree(corpus200 / "dicom" / sid, dst)
        good[study_uid(next(dst.iterdir()))] = sid
    bad = broken_studies(root)
    (root / "site0" / "README.txt").write_text("not DICOM: must be named in the log, not stop the run")
    return {"root": root, "good": good, "bad": bad}


@pytest.fixture(scope="module")
def app_run(tree, tiny_package, tmp_path_factory):
    out = tmp_path_factory.mktemp("sr-out")
    before = sorted((p, p.stat().st_mtime_ns) for p in tree["root"].rglob("*"))
    proc = run_app("-i", tree["root"], "-o", out, "-m", tiny_package["pkg"])
    after = sorted((p, p.stat().st_mtime_ns) for p in tree["root"].rglob("*"))
    assert before == after  # inputs are never modified
    return {"proc": proc, "out": out}


def test_one_sr_per_good_study_and_nothing_else(app_run, tree):
    proc, out = app_run["proc"], app_run["out"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert only_reports((p.name for p in out.iterdir()), tree["good"])


def test_every_bad_study_is_named_with_its_reason(app_run, tree):
    log = app_run["proc"].stderr
    for uid, reason in tree["bad"].items():
        lines = [line for line in log.splitlines() if f"study {uid}:" in line and "ERROR" in line]
        assert lines and reason in lines[0], f"{uid}: expected {reason!r} in {lines}"
    assert "README.txt: skipped: not a readable DICOM instance" in log
    assert f"{len(tree['good'])} of {len(tree['good']) + len(tree['bad'])} studies reported" in log


@pytest.mark.skipif(not have_validators(), reason="dciodvfy, dsrdump and PixelMed (pixelmed-apps) needed")
def test_srs_pass_dciodvfy_dsrdump_and_pixelmed(app_run):
    # all three SRs through dciodvfy and dsrdump; PixelMed on two of them (one round of its two at a time);
    # the map SEGs (the package has the localisation output) through dciodvfy
    problems = validate_all(sorted(app_run["out"].glob("SR_*.dcm")), pixelmed_files=2)
    problems.update({str(p): found for p in app_run["out"].glob("SEG_*.dcm") if (found := dciodvfy(p))})
    assert not problems, json.dumps(problems, indent=1)[:4000]


def test_sr_reads_back_with_the_operators_probabilities(app_run, tree, tiny_package):
    pkg = load_package(tiny_package["pkg"])
    model = ZeroShotModel(pkg, device="cpu")
    prep = SeriesToModelInput(pkg.spec)
    scan = scan_tree(tree["root"]).studies()
    for uid in tree["good"]:
        work = prep(select_series(StudyWork(uid, scan[uid])))
        expected = model.score(work.tensor)
        sr = pydicom.dcmread(app_run["out"] / sr_filename(uid))
        assert sr.StudyInstanceUID == uid and sr.PatientID == work.chosen.headers[0].PatientID
        assert sr.SpecificCharacterSet == "ISO_IR 192" and sr.CompletionFlag == "COMPLETE"
        assert sr.SeriesInstanceUID != work.chosen.series_uid
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.SeriesInstanceUID == work.chosen.series_uid
        back = read_findings(app_run["out"] / sr_filename(uid))
        located = {j for j, f in enumerate(pkg.catalogue) if "map" in back[f.id]}
        # all 30: those with a map's peak first, then the others, each in catalogue order
        assert list(back) == [pkg.catalogue.ids[j] for j in group_order(len(pkg.catalogue), located)]
        for j, f in enumerate(pkg.catalogue):
            assert back[f.id]["code"] == (f.code.scheme, f.code.value, f.code.meaning)
            assert back[f.id]["score"] == pytest.approx(expected.probabilities[j], abs=1e-6)
            # the certainty: the package's calibrated probability (tiny_package is exported with validation
            # thresholds, which calibrates), never above its operating point for a finding called absent
            certainty, is_calibrated = expected.certainty(j)
            assert is_calibrated and back[f.id]["certainty"] == pytest.approx(certainty * 100, abs=1e-3)
            point = pkg.manifest.findings[j].calibrated(pkg.thresholds[j]) * 100
            if back[f.id]["assessed"] and not back[f.id]["present"]:
                assert back[f.id]["certainty"] <= point + 1e-6
            assert back[f.id]["present"] == bool(expected.present[j])


def test_map_environment_variables_and_stable_sr_identity(app_run, tree, tiny_package, tmp_path):
    """As the MAP runs it: no flags, HOLOSCAN_* paths. Same study + model -> same SR UIDs."""
    out = tmp_path / "out"
    proc = run_app(
        env={
            "HOLOSCAN_INPUT_PATH": str(tree["root"]),
            "HOLOSCAN_OUTPUT_PATH": str(out),
            "HOLOSCAN_MODEL_PATH": str(tiny_package["pkg"].parent),
        },
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for uid in tree["good"]:
        a = pydicom.dcmread(app_run["out"] / sr_filename(uid))
        b = pydicom.dcmread(out / sr_filename(uid))
        assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
        assert a.ContentSequence == b.ContentSequence  # tracking UIDs derived, not random: the same document
    use = load_package(tiny_package["pkg"]).intended_use
    assert use.startswith("Research and software testing only") and "phantoms" in use  # trained on the corpus
    assert read_intended_use(a) == use


def test_nothing_processable_exits_nonzero(tree, tiny_package, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_app("-i", tmp_path / "empty", "-o", tmp_path / "o1", "-m", tiny_package["pkg"])
    assert proc.returncode == 1 and "no DICOM studies found" in proc.stderr
    bad_only = tmp_path / "bad"
    small_study(bad_only, "ONLYONE", n=1)
    proc = run_app("-i", bad_only, "-o", tmp_path / "o2", "-m", tiny_package["pkg"])
    assert proc.returncode == 1 and "0 of 1 studies reported" in proc.stderr
    assert not list((tmp_path / "o2").glob("*"))


def test_a_tampered_model_is_refused(tiny_package, tree, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_package["pkg"], pkg)
    (pkg / "prompt_embeddings.npy").unlink()
    proc = run_app("-i", tree["root"], "-o", tmp_path / "o", "-m", pkg)
    assert proc.returncode == 2 and "prompt_embeddings.npy: listed in the manifest but missing" in proc.stderr


@pytest.mark.skipif(not (shutil.which("dcmcjpeg") and shutil.which("dcmcrle")), reason="DCMTK needed")
def test_jpeg_lossless_and_rle_give_the_same_findings(tree, tiny_package, tmp_path):
    uid, sid = next(iter(tree["good"].items()))
    src = next(p for p in tree["root"].rglob(sid) if p.is_dir())
    outs = {}
    for name, tool, ts in (
        ("jpegll", ["dcmcjpeg", "+e1"], "1.2.840.10008.1.2.4.70"),
        ("rle", ["dcmcrle"], "1.2.840.10008.1.2.5"),
    ):
        dst = tmp_path / name / sid
        dst.mkdir(parents=True)
        for f in sorted(src.iterdir()):
            subprocess.run([*tool, str(f), str(dst / f.name)], check=True, capture_output=True)
        assert str(pydicom.dcmread(next(dst.iterdir())).file_meta.TransferSyntaxUID) == ts
        out = tmp_path / f"out-{name}"
        proc = run_app("-i", dst, "-o", out, "-m", tiny_package["pkg"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[name] = read_findings(out / sr_filename(uid))
    plain = tmp_path / "plain"
    shutil.copytree(src, plain / sid)
    proc = run_app("-i", plain, "-o", tmp_path / "out-plain", "-m", tiny_package["pkg"])
    assert proc.returncode == 0
    ref = read_findings(tmp_path / "out-plain" / sr_filename(uid))
    for name, got in outs.items():
        assert got == ref, name


# -- safe defaults: a named model or device that cannot be used is an error, never a fallback -------------


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_a_missing_named_model_exits_2_naming_the_path(tree, tmp_path, how):
    missing = tmp_path / "nonexistent" / "models"
    if how == "flag":
        proc = run_app("-i", tree["root"], "-o", tmp_path / "o", "-m", missing, cwd=tmp_path)
    else:
        env = {"HOLOSCAN_INPUT_PATH": str(tree["root"]), "HOLOSCAN_OUTPUT_PATH": str(tmp_path / "o")}
        proc = run_app(env={**env, "HOLOSCAN_MODEL_PATH": str(missing)}, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{missing}: model path does not exist" in proc.stderr
    assert "embedded demo model" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_a_named_model_that_does_not_load_exits_2(tree, tmp_path):
    bad = tmp_path / "pkg"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    proc = run_app("-i", tree["root"], "-o", tmp_path / "o", "-m", bad)
    assert proc.returncode == 2 and f"model package {bad}" in proc.stderr, proc.stderr[-2000:]
    assert "embedded demo model" not in proc.stderr


def _cuda_loads() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(_cuda_loads(), reason="this ONNX Runtime has a CUDA provider")
def test_device_cuda_without_a_cuda_provider_exits_2(tree, tiny_package, tmp_path):
    proc = run_app("-i", tree["root"], "-o", tmp_path / "o", "-m", tiny_package["pkg"], "--device", "cuda")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "device cuda: this ONNX Runtime has no CUDA provider" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(_cuda_loads(), reason="this ONNX Runtime has a CUDA provider")
def test_a_cuda_provider_that_does_not_load_is_an_error_for_cuda_and_the_cpu_for_auto(tiny_package, monkeypatch):
    """A CUDA build whose libraries are missing lists the provider and then runs on the CPU: ONNX Runtime's own
    fallback, reproduced here by listing the provider on a CPU build (the session then really falls back)."""
    import onnxruntime as ort

    from operators.contract.scoring import DeviceError

    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    pkg = load_package(tiny_package["pkg"])
    with pytest.raises(DeviceError, match="the CUDA provider did not load for .*image_encoder.onnx"):
        ZeroShotModel(pkg, device="cuda")
    model = ZeroShotModel(pkg, device="auto")
    assert model.device == "cpu" and model.requested_device == "auto"


def test_the_demo_model_only_when_none_is_named_and_the_sr_says_so(tree, app_run, tmp_path):
    """No model named: the embedded demo model, with a warning in the log and a statement in the SR; a named
    model's SR does not carry it. Both SRs say which device ran the image encoder."""
    uid, sid = next(iter(tree["good"].items()))
    src = next(p for p in tree["root"].rglob(sid) if p.is_dir())
    one = tmp_path / "in" / sid
    shutil.copytree(src, one)
    proc = run_app("-i", one.parent, "-o", tmp_path / "demo", cwd=tmp_path)  # no -m, no ./models, no variable
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no model named: using the embedded demo model" in proc.stderr
    assert "device cpu (requested auto" in proc.stderr
    demo = _contribution(tmp_path / "demo" / sr_filename(uid))
    assert "image encoder on the CPU, by the embedded demo model" in demo
    named = _contribution(app_run["out"] / sr_filename(uid))  # the same study, the model named with -m
    assert "image encoder on the CPU" in named and "embedded demo model" not in named


def _contribution(path) -> str:
    """The Contribution Description of the SR's algorithm (the equipment that states the intended use)."""
    items = pydicom.dcmread(path).ContributingEquipmentSequence
    return next(
        str(e.ContributionDescription) for e in items if "Intended use: " in e.get("ContributionDescription", "")
    )
