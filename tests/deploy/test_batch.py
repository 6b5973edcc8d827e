"""Batch inference: any layout, broken studies reported not fatal, resumable, summary tables."""

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pydicom
import pytest

from operators.pipeline import sr_filename
from operators.sr import read_findings
from tests.dicom_cases import broken_studies, only_reports, small_study, study_uid


@pytest.fixture(scope="module")
def archive(corpus200, tmp_path_factory):
    """20 studies: 16 good ones from the corpus in a messy layout, and 4 broken ones."""
    root = tmp_path_factory.mktemp("archive")
    good = []
    for i, sid in enumerate(sorted(p.name for p in (corpus200 / "dicom").iterdir())[:16]):
        files = sorted((corpus200 / "dicom" / sid).iterdir())
        for j, f in enumerate(files):  # slices of one study scattered over two folders
            dst = root / f"disk{j % 2}" / f"batch{i % 3}" / f"{sid}_{j:03d}.dcm"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dst)
        good.append(study_uid(files[0]))
    bad = broken_studies(root / "incoming")
    bad.pop(next(iter(bad)))  # keep 4 of the 5 kinds: 20 studies in all
    for p in (root / "incoming" / "BADMR").iterdir():
        p.unlink()
    (root / "incoming" / "BADMR").rmdir()
    return {"root": root, "good": good, "bad": bad}


def _infer(*args):
    return subprocess.run(
        [sys.executable, "-m", "operators.cli", "infer", *map(str, args), "--quiet"],
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def first_run(archive, tiny_package, tmp_path_factory):
    """The archive through the local engine with 2 workers, once: the tests copy its output folder."""
    out = tmp_path_factory.mktemp("first-run") / "out"
    proc = _infer(archive["root"], "--out", out, "--model", tiny_package["pkg"], "--workers", "2")
    return {"out": out, "proc": proc}


def test_batch_reports_broken_studies_and_resumes(archive, tiny_package, first_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    proc = first_run["proc"]
    assert proc.returncode == 1, proc.stderr[-3000:]  # some failed
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["study_uid"]: r for r in summary["studies"]}
    assert summary["complete"] and len(rows) == 20 and summary["failed"] == len(archive["bad"])
    for uid in archive["good"]:
        assert rows[uid]["status"] == "ok" and (out / "sr" / sr_filename(uid)).is_file()
        assert 0.0 <= rows[uid]["ascites.probability"] <= 1.0 and rows[uid]["ascites.present"] in (0, 1, "not assessed")
        sr = read_findings(out / "sr" / sr_filename(uid))["ascites"]  # the certainty is the SR's, the score too
        assert rows[uid]["ascites.certainty"] == pytest.approx(sr["certainty"] / 100, abs=1e-6)
        assert rows[uid]["ascites.probability"] == pytest.approx(sr["score"], abs=1e-6)
    for uid, reason in archive["bad"].items():
        assert rows[uid]["status"] == "failed" and reason in rows[uid]["error"], rows[uid]
        assert not (out / "sr" / sr_filename(uid)).exists()
        assert f"FAILED {uid}" in proc.stdout
    with open(out / "summary.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 20 and "hepatomegaly.probability" in table[0]
    assert only_reports((p.name for p in (out / "sr").iterdir()), archive["good"])

    before = {p.name: p.stat().st_mtime_ns for p in (out / "sr").iterdir()}
    again = _infer(archive["root"], "--out", out, "--model", tiny_package["pkg"])
    assert again.returncode == 1
    s2 = json.loads((out / "summary.json").read_text())
    assert s2["processed"] == len(archive["bad"]) and s2["resumed"] == len(archive["good"])
    assert {p.name: p.stat().st_mtime_ns for p in (out / "sr").iterdir()} == before  # finished ones untouched
    rows2 = {r["study_uid"]: r for r in s2["studies"]}
    assert all(rows2[u]["ascites.probability"] == rows[u]["ascites.probability"] for u in archive["good"])

    # A run that ended before its summary: the resumed rows are rebuilt from the SRs.
    (out / "summary.json").unlink()
    (out / "summary.csv").unlink()
    assert _infer(archive["root"], "--out", out, "--model", tiny_package["pkg"]).returncode == 1
    rows3 = {r["study_uid"]: r for r in json.loads((out / "summary.json").read_text())["studies"]}
    for u in archive["good"]:
        assert rows3[u]["series_uid"] == rows[u]["series_uid"] and rows3[u]["slices"] == rows[u]["slices"]
        assert rows3[u]["ascites.present"] == rows[u]["ascites.present"]
        assert abs(rows3[u]["ascites.probability"] - rows[u]["ascites.probability"]) < 1e-3
        assert abs(rows3[u]["ascites.certainty"] - rows[u]["ascites.certainty"]) < 1e-3  # rebuilt from the SR

    # Another model's SRs are not mixed into this one's summary: refused without --force.
    other = tmp_path / "other"
    shutil.copytree(tiny_package["pkg"], other)
    import numpy as np

    from operators.contract.package import load_package, write_manifest

    m = load_package(other).manifest
    emb = np.load(other / "prompt_embeddings.npy")
    np.save(other / "prompt_embeddings.npy", emb[:, ::-1].copy())  # other weights, same name and UID
    write_manifest(other, m.with_files({}))
    refused = _infer(archive["root"], "--out", out, "--model", other)
    assert refused.returncode == 2 and "written by another model" in refused.stderr, refused.stderr[-2000:]

    # One run per --out at a time.
    import fcntl

    with open(out / ".infer.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = _infer(archive["root"], "--out", out, "--model", tiny_package["pkg"])
    assert busy.returncode == 2 and "another ct-zeroshot infer is writing into this folder" in busy.stderr


def test_all_good_exits_zero_and_force_redoes(archive, tiny_package, tmp_path):
    sub = tmp_path / "in"
    shutil.copytree(archive["root"] / "disk0" / "batch0", sub / "a")
    shutil.copytree(archive["root"] / "disk1" / "batch0", sub / "b")
    out = tmp_path / "out"
    assert _infer(sub, "--out", out, "--model", tiny_package["pkg"]).returncode == 0
    forced = _infer(sub, "--out", out, "--model", tiny_package["pkg"], "--force")
    assert forced.returncode == 0
    assert json.loads((out / "summary.json").read_text())["resumed"] == 0


def test_ray_engine_without_ray_is_a_clear_error(tmp_path, monkeypatch):
    from operators.batch import BatchError, run_batch

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as without the extra
    with pytest.raises(BatchError, match=r"--engine ray needs Ray: pip install 'ct-zeroshot\[ray\]'"):
        run_batch(tmp_path, tmp_path / "out", engine="ray")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_missing_input_is_a_clear_error(tmp_path, tiny_package):
    proc = _infer(tmp_path / "nope", "--out", tmp_path / "o", "--model", tiny_package["pkg"])
    assert proc.returncode == 2 and "input folder does not exist" in proc.stderr


def test_no_header_value_in_logs_or_summary_unless_allowed(tiny_package, tmp_path):
    """An invalid birth date makes the SR fail (highdicom quotes it): the reason names the error, not the value."""
    files = small_study(tmp_path / "in", "PHI")
    for p in files:
        ds = pydicom.dcmread(p)
        ds["PatientBirthDate"].value = "1954-11-03"  # not a DA value
        ds.save_as(p)
    proc = _infer(tmp_path / "in", "--out", tmp_path / "out", "--model", tiny_package["pkg"])
    assert proc.returncode == 1
    row = json.loads((tmp_path / "out" / "summary.json").read_text())["studies"][0]
    assert row["status"] == "failed" and "SR not written (ValueError; its text withheld" in row["error"]
    for text in (proc.stderr, proc.stdout, (tmp_path / "out" / "summary.json").read_text()):
        assert "1954" not in text


def test_a_site_may_let_header_values_into_its_logs(monkeypatch):
    from operators.contract.phi import ENV, allow_identifiers, describe

    monkeypatch.setenv(ENV, "0")
    exc = ValueError("Unable to convert '1954-11-03' to 'DA' object")
    assert describe(exc) == "ValueError; its text withheld, it may quote header values"
    with warnings.catch_warnings():  # the policy's warning filter stays inside this test
        allow_identifiers(True)  # --log-patient-identifiers; worker processes inherit it from the environment
        assert describe(exc) == "ValueError: Unable to convert '1954-11-03' to 'DA' object"
        allow_identifiers(False)
        assert logging.getLogger("pydicom").level == logging.ERROR  # pydicom's value-quoting warnings off
    logging.getLogger("pydicom").setLevel(logging.NOTSET)


# --engine ray: a local Ray cluster (2 CPUs). Short-lived clusters in tests: no usage report.
RAY_ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_IMPORT_WARNING": "1"}


def _popen_infer(*args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "operators.cli", "infer", *map(str, args), "--quiet"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=RAY_ENV)


def _rows(out: Path) -> dict[str, dict]:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"]
    return {r["study_uid"]: {k: v for k, v in r.items() if k != "seconds"} for r in summary["studies"]}


def _srs(out: Path) -> dict[str, tuple]:
    """SR file -> (SOP Instance UID, findings): what a reader of the SR gets, without its time stamps."""
    return {
        p.name: (pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID, read_findings(p))
        for p in sorted((out / "sr").glob("SR_*.dcm"))
    }


def _busy_workers() -> list[int]:
    """PIDs of Ray actor processes in the middle of a study (Ray titles them by the method they run)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().startswith(b"ray::StudyWorker.process"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


@pytest.mark.long  # minutes: make test-long (CI runs it beside make test)
def test_ray_engine_gives_the_local_engines_srs_and_rows_though_a_worker_is_killed(
    archive, tiny_package, first_run, tmp_path
):
    """One run on a local Ray cluster (2 workers) of the archive with its 4 broken studies, one worker
    SIGKILLed in the middle of a study: the same SRs (UIDs and findings) and the same summary rows as
    the local engine, the broken studies failed as there, the killed worker's study retried."""
    out = tmp_path / "ray"
    pytest.importorskip("ray")
    proc = _popen_infer(
        archive["root"], "--out", out, "--model", tiny_package["pkg"], "--workers", "2", "--engine", "ray"
    )
    killed = None
    deadline = time.time() + 600
    while killed is None and proc.poll() is None and time.time() < deadline:
        for pid in _busy_workers():
            try:
                os.kill(pid, signal.SIGKILL)
                killed = pid
                break
            except OSError:  # it ended meanwhile
                pass
        time.sleep(0.02)
    stdout, err = proc.communicate(timeout=900)
    code = proc.returncode
    assert killed is not None, "no worker was caught in the middle of a study"
    assert code == 1, err[-3000:]  # the broken studies failed, the batch went on
    # Every study ends as with the local engine: the killed worker's study was retried and finished.
    rows = _rows(out)
    assert rows == _rows(first_run["out"]) and len(rows) == 20
    assert sum(r["status"] == "failed" for r in rows.values()) == len(archive["bad"])
    srs = _srs(out)
    assert srs == _srs(first_run["out"]) and len(srs) == 16
    assert json.loads((out / "summary.json").read_text())["engine"] == "ray"
    for uid in archive["bad"]:
        assert f"FAILED {uid}" in stdout
    assert not list((out / "sr").glob(".*.partial"))  # an SR cut off by the kill is never left behind


def _pool_workers(parent: int) -> list[int]:
    """The local engine's worker processes: spawned children of the batch process (not its resource
    tracker)."""
    import psutil

    try:
        children = psutil.Process(parent).children()
    except psutil.NoSuchProcess:
        return []
    out = []
    for child in children:
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "spawn_main" in cmd and "resource_tracker" not in cmd:
            out.append(child.pid)
    return out


@pytest.mark.long  # minutes: make test-long (CI runs it beside make test)
def test_a_local_worker_killed_mid_batch_costs_no_study(archive, tiny_package, first_run, tmp_path):
    """A worker's death breaks the whole process pool: the studies in flight are run again, each alone, and
    the batch ends with the same rows and SRs as the undisturbed run (a study that killed its worker when
    run alone would fail with that reason; the others would go on)."""
    out = tmp_path / "killed"
    proc = _popen_infer(archive["root"], "--out", out, "--model", tiny_package["pkg"], "--workers", "2")
    killed, deadline = None, time.time() + 600
    while killed is None and proc.poll() is None and time.time() < deadline:
        if list((out / "sr").glob("SR_*.dcm")):  # mid-run: the workers are loaded and busy
            for pid in _pool_workers(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed = pid
                    break
                except OSError:
                    pass
        time.sleep(0.05)
    stdout, err = proc.communicate(timeout=900)
    assert killed is not None, "no worker was caught in the middle of the batch"
    assert proc.returncode == 1, err[-3000:]  # the broken studies failed, the batch went on
    assert "a batch worker died" in err
    assert _rows(out) == _rows(first_run["out"]) and _srs(out) == _srs(first_run["out"])


def test_sigterm_ends_the_batch_and_its_workers(archive, tiny_package, tmp_path):
    """A scheduler's SIGTERM stops the batch at once, and no worker (each holding a model) outlives it."""
    import psutil

    out = tmp_path / "term"
    proc = _popen_infer(archive["root"], "--out", out, "--model", tiny_package["pkg"], "--workers", "2")
    workers, deadline = [], time.time() + 600
    while not workers and proc.poll() is None and time.time() < deadline:
        if list((out / "sr").glob("SR_*.dcm")):
            workers = _pool_workers(proc.pid)
        time.sleep(0.05)
    assert workers, "the batch ended before its workers were seen"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    alive = []
    for pid in workers:
        try:
            alive.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass  # already gone
    assert psutil.wait_procs(alive, timeout=10)[1] == [], "a worker outlived the batch"
    assert not (out / "summary.json").exists()  # a cut batch never looks complete


def test_report_compares_the_srs_with_the_phantoms_truth(corpus200, first_run):
    sr = first_run["out"] / "sr"
    n_sr = len(list(sr.glob("SR_*.dcm")))
    truth = {}
    for line in (corpus200 / "ground_truth.jsonl").read_text().splitlines():
        rec = json.loads(line)
        truth[rec["study id"]] = len(rec["findings"])
    proc = subprocess.run(
        [sys.executable, "-m", "operators.cli", "report", str(sr), "--truth", str(corpus200 / "ground_truth.jsonl")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    accessions = [line.split("accession ")[1].rstrip(")") for line in proc.stdout.splitlines() if "accession " in line]
    assert len(accessions) == n_sr == 16
    expected = sum(truth[a] for a in accessions)
    assert f"{expected} truly present" in proc.stdout
    both = subprocess.run(
        [sys.executable, "-m", "operators.cli", "report", str(sr), "--truth", "x", "--labels", "y"],
        capture_output=True,
        text=True,
    )
    assert both.returncode == 2 and "not both" in both.stderr
