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
