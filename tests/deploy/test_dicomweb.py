"""DICOMweb out: batch inference stores each study's SEG and SR with STOW-RS into Orthanc's DICOMweb plugin
(Debian `orthanc-dicomweb`), with basic auth; a study not stored is stored by the next run."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from operators.dicomweb import StowTarget
from operators.sr import read_findings
from tests.deploy.pacs import DICOMWEB_PLUGIN, ORTHANC, OrthancServer, free_port

pytestmark = pytest.mark.skipif(
    not (Path(ORTHANC).exists() and Path(DICOMWEB_PLUGIN).exists()), reason="Debian orthanc and orthanc-dicomweb needed"
)


def _infer(*args):
    return subprocess.run(
        [sys.executable, "-m", "operators.cli", "infer", *map(str, args)], capture_output=True, text=True
    )


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="") as fh:
        return {r["study_uid"]: r for r in csv.DictReader(fh)}


def test_stow_rs_stores_srs_and_maps_with_auth_and_the_next_run_stores_what_failed(corpus200, tiny_package, tmp_path):
    archive = tmp_path / "in"
    for sid in sorted(p.name for p in (corpus200 / "dicom").iterdir())[:3]:
        shutil.copytree(corpus200 / "dicom" / sid, archive / sid)
    orthanc = OrthancServer(tmp_path / "orthanc", free_port(), dicomweb=True)
    try:
        (tmp_path / "wrong").write_text("ci:not-the-password\n")
        (tmp_path / "right").write_text("ci:ci\n")
        out = tmp_path / "out"
        stow = ["--stow", orthanc.dicomweb_url, "--stow-auth", "basic"]
        first = _infer(
            archive, "--out", out, "--model", tiny_package["pkg"], *stow, "--stow-credentials", tmp_path / "wrong"
        )
        assert first.returncode == 1, first.stderr[-3000:]
        rows = _rows(out)
        assert len(rows) == 3 and all(r["status"] == "ok" and "HTTP 401" in r["stored"] for r in rows.values())
        assert first.stdout.count("NOT STORED") == 3
        assert orthanc.get("/instances") == []  # nothing stored, nothing half-stored

        again = _infer(
            archive, "--out", out, "--model", tiny_package["pkg"], *stow, "--stow-credentials", "env:STOW_CREDS"
        )
        assert again.returncode == 2 and "STOW_CREDS is not set" in again.stderr  # refused before anything runs

        import os

        env = {**os.environ, "STOW_CREDS": "ci:ci"}
        third = subprocess.run(
            [
                sys.executable,
                "-m",
                "operators.cli",
                "infer",
                str(archive),
                "--out",
                str(out),
                "--model",
                str(tiny_package["pkg"]),
                *stow,
                "--stow-credentials",
                "env:STOW_CREDS",
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        assert third.returncode == 0, third.stderr[-3000:]
        rows = _rows(out)
        assert all(r["stored"] == "yes" for r in rows.values()), rows
        summary = json.loads((out / "summary.json").read_text())
        assert summary["resumed"] == 3 and summary["stow"] == {"url": orthanc.dicomweb_url, "not_stored": 0}
        for r in rows.values():  # each SR (and the SEG it references) is at the PACS, as written
            sr = out / "sr" / r["sr"]
            assert orthanc.find_instance(str(pydicom.dcmread(sr, stop_before_pixels=True).SOPInstanceUID))
            for seg in {v["map"]["seg"] for v in read_findings(sr).values() if "map" in v}:
                assert orthanc.find_instance(seg) and r["seg"]
    finally:
        orthanc.stop()


def test_stow_targets_are_checked_before_use(tmp_path):
    with pytest.raises(ValueError, match="expected an http"):
        StowTarget("ftp://pacs/dicom-web")
    with pytest.raises(ValueError, match="name the credentials"):
        StowTarget("https://pacs/dicom-web", auth="bearer")
    with pytest.raises(FileNotFoundError, match="credentials file not found"):
        StowTarget("https://pacs/dicom-web", auth="bearer", credentials=str(tmp_path / "none"))
    (tmp_path / "c").write_text("no-colon\n")
    with pytest.raises(ValueError, match="user:password"):
        StowTarget("https://pacs/dicom-web", auth="basic", credentials=str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="CA bundle not found"):
        StowTarget("https://pacs/dicom-web", ca_bundle=str(tmp_path / "ca.pem"))
    (tmp_path / "t").write_text("TOKEN123\n")
    client = StowTarget("https://pacs/dicom-web", auth="bearer", credentials=str(tmp_path / "t")).client()
    assert client._session.headers["Authorization"] == "Bearer TOKEN123"


def _listener_site(tmp_path, tiny_package, n=4):
    """Orthanc with its DICOMweb plugin, ``n`` small CT studies in it, and a listener config that takes them
    from Orthanc by C-STORE and sends each SR, and the SEG of its maps, back by STOW-RS with basic auth."""
    from tests.deploy.pacs import write_listener_config
    from tests.dicom_cases import small_study

    lport = free_port()
    orthanc = OrthancServer(tmp_path / "orthanc", lport, dicomweb=True)
    studies = [orthanc.upload(small_study(tmp_path / "studies", f"WEB{i:02d}", n=10, shape=(20, 20))) for i in range(n)]
    secret = tmp_path / "stow-credentials"
    dest = {"kind": "dicomweb", "url": orthanc.dicomweb_url, "auth": "basic", "credentials": str(secret)}
    cfg = write_listener_config(
        tmp_path, lport, orthanc, tiny_package, destination=dest, maps=True, retries=2, backoff_s=0.2
    )
    return orthanc, studies, cfg, lport, secret


def test_listener_stows_srs_and_maps_and_a_restart_sends_what_was_refused(tmp_path, tiny_package):
    """Wrong credentials: every SR is refused (HTTP 401) and kept; the listener is killed; with the right
    credentials, the restarted listener stores every SR and its SEG. Nothing acknowledged is lost."""
    import os
    import signal
    import time

    from tests.deploy.pacs import start_listener, wait_for, wait_listening

    orthanc, studies, cfg, lport, secret = _listener_site(tmp_path, tiny_package)
    log = tmp_path / "listener.log"
    secret.write_text("ci:wrong\n")
    proc = start_listener(cfg, log)
    try:
        wait_listening(lport, proc)
        orthanc.push(studies)  # acknowledged: in the spool before this returns
        wait_for(lambda: log.read_text().count("HTTP 401") >= 2, 300, "the endpoint's refusals")
        assert not any(orthanc.srs(s) for s in studies)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        secret.write_text("ci:ci\n")
        proc = start_listener(cfg, log)
        wait_listening(lport, proc)

        def delivered():
            return all(len(orthanc.srs(s)) == 1 for s in studies)

        wait_for(delivered, 300, "an SR for every study after the restart")
        time.sleep(2)
        assert delivered()
        text = log.read_text()
        assert "resuming from the spool" in text and "SRs to STOW-RS " + orthanc.dicomweb_url in text
        assert "SYNTHETIC^" not in text  # no patient names in the log
        maps = 0
        for study in studies:  # each SR's SEG came with it
            (sr_id,) = orthanc.srs(study)
            (tmp_path / "back.dcm").write_bytes(orthanc.get(f"/instances/{sr_id}/file"))
            for seg in {v["map"]["seg"] for v in read_findings(tmp_path / "back.dcm").values() if "map" in v}:
                assert orthanc.find_instance(seg), f"study {study}: SEG {seg} not stored"
                maps += 1
        assert maps >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        orthanc.stop()


def test_listener_dicomweb_destination_is_checked_at_start(tmp_path):
    from operators.listener.config import ListenerConfig

    base = {"allowed": [{"ae_title": "PACS"}], "spool": str(tmp_path / "spool")}
    cases = {
        "kind must be dimse or dicomweb": {"kind": "dicomwebb", "url": "http://pacs/dicom-web"},
        "expected an http": {"kind": "dicomweb", "url": "pacs:8042"},
        "credentials file not found": {
            "kind": "dicomweb",
            "url": "https://pacs/dicom-web",
            "auth": "bearer",
            "credentials": str(tmp_path / "nothing"),
        },
        "destination.port: unknown key": {"kind": "dicomweb", "url": "https://pacs/dicom-web", "port": 4242},
    }
    import yaml

    for expected, dest in cases.items():
        (tmp_path / "l.yaml").write_text(yaml.safe_dump({**base, "destination": dest}))
        with pytest.raises(ValueError, match=expected) as err:
            ListenerConfig.load(tmp_path / "l.yaml")
        assert str(err.value).startswith(str(tmp_path / "l.yaml"))


def _dated_study(root: Path, name: str, date: str) -> list[Path]:
    from tests.dicom_cases import small_study

    files = small_study(root, name, n=10, shape=(20, 20))
    for p in files:
        ds = pydicom.dcmread(p)
        ds.StudyDate = date
        ds.save_as(p)
    return files


def test_infer_pulls_studies_by_qido_and_wado_and_resumes(tmp_path, tiny_package):
    """Studies selected by date range (QIDO-RS) are retrieved (WADO-RS, basic auth) and run; the SR written
    back to the archive is not pulled as input; a rerun retrieves nothing again; --study picks one."""
    orthanc = OrthancServer(tmp_path / "orthanc", free_port(), dicomweb=True)
    try:
        uids = {}
        for name, date in (("JAN", "20260115"), ("MAR", "20260320"), ("DEC", "20251201")):
            files = _dated_study(tmp_path / "studies", name, date)
            orthanc.upload(files)
            uids[name] = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        (tmp_path / "creds").write_text("ci:ci\n")
        out = tmp_path / "out"
        source = ["--source-auth", "basic", "--source-credentials", tmp_path / "creds"]
        # An interrupted earlier retrieval left half a study: it is not taken for one, and is redone.
        (out / "retrieved" / f".{uids['MAR']}.partial" / "x").mkdir(parents=True)
        args = [orthanc.dicomweb_url, "--out", out, "--model", tiny_package["pkg"], "--no-maps", *source]
        first = _infer(
            *args,
            "--dates",
            "20260101-20261231",
            "--stow",
            orthanc.dicomweb_url,
            "--stow-auth",
            "basic",
            "--stow-credentials",
            tmp_path / "creds",
        )
        assert first.returncode == 0, first.stderr[-3000:]
        rows = _rows(out)
        assert set(rows) == {uids["JAN"], uids["MAR"]} and all(
            r["status"] == "ok" and r["stored"] == "yes" for r in rows.values()
        )
        retrieved = out / "retrieved"
        assert sorted(p.name for p in retrieved.iterdir()) == sorted([uids["JAN"], uids["MAR"]])
        for uid in (uids["JAN"], uids["MAR"]):  # the CT series only: the SR stored back is not input
            (series,) = (retrieved / uid).iterdir()
            assert len(list(series.iterdir())) == 10
        summary = json.loads((out / "summary.json").read_text())
        assert summary["input"] == orthanc.dicomweb_url and summary["processed"] == 2
        again = _infer(*args, "--dates", "20260101-", "--verbose")
        assert again.returncode == 0, again.stderr[-3000:]
        assert "2 to retrieve" not in again.stderr and "0 to retrieve, 2 retrieved before" in again.stderr
        assert json.loads((out / "summary.json").read_text())["resumed"] == 2
        one = _infer(*args, "--study", uids["DEC"])
        assert one.returncode == 0, one.stderr[-3000:]
        assert set(_rows(out)) == {uids["JAN"], uids["MAR"], uids["DEC"]}
        # Refused before anything is retrieved: a bad date range, a study UID that is not one.
        bad = _infer(*args, "--dates", "2026-01-01")
        assert bad.returncode == 2 and "expected YYYYMMDD-YYYYMMDD" in bad.stderr
        bad = _infer(*args, "--study", "1.2.3/../../etc")
        assert bad.returncode == 2 and "not a DICOM UID" in bad.stderr
        wrong = tmp_path / "wrong"
        wrong.write_text("ci:no\n")
        denied = _infer(
            orthanc.dicomweb_url,
            "--out",
            tmp_path / "out2",
            "--model",
            tiny_package["pkg"],
            "--source-auth",
            "basic",
            "--source-credentials",
            wrong,
        )
        assert denied.returncode == 2 and "HTTP 401" in denied.stderr
    finally:
        orthanc.stop()
