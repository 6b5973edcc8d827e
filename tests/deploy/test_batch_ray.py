"""``infer --engine ray`` on a local Ray cluster (2 CPUs): the local engine's SRs and summary rows, and a
worker killed mid-study costs a retry of that study, not the batch."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from operators.sr import read_findings
from tests.deploy.test_batch import archive  # noqa: F401  (the 20-study archive with 4 broken studies)

ray = pytest.importorskip("ray")

# Short-lived local clusters in the tests: no dashboard, no usage report, quick shutdown.
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_IMPORT_WARNING": "1"}


def _infer(*args, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "operators.cli", "infer", *map(str, args), "--quiet"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, **kw)


def _finish(proc: subprocess.Popen, timeout=900) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _rows(out: Path) -> dict[str, dict]:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"]
    return {r["study_uid"]: {k: v for k, v in r.items() if k != "seconds"} for r in summary["studies"]}


def _srs(out: Path) -> dict[str, tuple]:
    """SR file -> (SOP Instance UID, findings): what a reader of the SR gets, without its time stamps."""
    import pydicom

    return {
        p.name: (pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID, read_findings(p))
        for p in sorted((out / "sr").glob("*.dcm"))
    }


@pytest.fixture(scope="module")
def local_run(archive, tiny_package, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("local") / "out"
    code, _, err = _finish(_infer(archive["root"], "--out", out, "--model", tiny_package["pkg"], "--workers", "2"))
    assert code == 1, err[-3000:]  # the broken studies failed
    return out


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


def test_ray_engine_gives_the_local_engines_srs_and_rows_though_a_worker_is_killed(
    archive,  # noqa: F811
    tiny_package,
    local_run,
    tmp_path,
):
    """One run on a local Ray cluster (2 workers) of the archive with its 4 broken studies, one worker
    SIGKILLed in the middle of a study: the same SRs (UIDs and findings) and the same summary rows as
    the local engine, the broken studies failed as there, the killed worker's study retried."""
    out = tmp_path / "ray"
    proc = _infer(archive["root"], "--out", out, "--model", tiny_package["pkg"], "--workers", "2", "--engine", "ray")
    killed = None
    deadline = time.time() + 600
    while killed is None and proc.poll() is None and time.time() < deadline:
        for pid in _busy_workers():
            try:
                if (Path("/proc") / str(pid) / "cmdline").read_bytes().startswith(b"ray::StudyWorker.process"):
                    os.kill(pid, signal.SIGKILL)
                    killed = pid
                    break
            except OSError:
                pass
        time.sleep(0.02)
    code, stdout, err = _finish(proc)
    assert killed is not None, "no worker was caught in the middle of a study"
    assert code == 1, err[-3000:]  # the broken studies failed, the batch went on
    # Every study ends as with the local engine: the killed worker's study was retried and finished.
    rows = _rows(out)
    assert rows == _rows(local_run) and len(rows) == 20
    assert sum(r["status"] == "failed" for r in rows.values()) == len(archive["bad"])
    assert _srs(out) == _srs(local_run) and len(_srs(out)) == 16
    assert json.loads((out / "summary.json").read_text())["engine"] == "ray"
    for uid in archive["bad"]:
        assert f"FAILED {uid}" in stdout
    assert not list((out / "sr").glob(".*.partial"))  # an SR cut off by the kill is never left behind
