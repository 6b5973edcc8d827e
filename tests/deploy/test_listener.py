"""The PACS listener against a real Orthanc (Debian `orthanc`, started here on loopback)."""

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from operators.sr import read_findings
from tests.conftest import dcmtk
from tests.deploy.pacs import (
    ORTHANC,
    OrthancServer,
    free_port,
    start_listener,
    wait_for,
    wait_listening,
    write_listener_config,
)
from tests.dicom_cases import small_study

pytestmark = pytest.mark.skipif(not Path(ORTHANC).exists(), reason="Debian package orthanc needed")


@pytest.fixture
def site(tmp_path, tiny_package):
    """Orthanc, 10 small CT studies uploaded to it, and a listener config pointing back at it that scores a
    site's findings file beside the model's 30 findings (``findings:``, add mode)."""
    from tests.deploy.test_custom_findings import GOOD

    (tmp_path / "site-findings.yaml").write_text(GOOD)
    lport = free_port()
    orthanc = OrthancServer(tmp_path / "orthanc", lport)
    studies = []
    for i in range(10):
        files = small_study(tmp_path / "studies", f"PACS{i:02d}", n=10, shape=(20, 20))
        studies.append(orthanc.upload(files))
    write_listener_config(
        tmp_path, lport, orthanc, tiny_package, retries=5, backoff_s=0.5, findings=str(tmp_path / "site-findings.yaml")
    )
    yield {
        "orthanc": orthanc,
        "studies": studies,
        "cfg": tmp_path / "listener.yaml",
        "port": lport,
        "log": tmp_path / "listener.log",
        "tmp": tmp_path,
    }
    orthanc.stop()


def _one_sr_each(site) -> bool:
    return all(len(site["orthanc"].srs(s)) == 1 for s in site["studies"])


def test_two_senders_ten_studies_one_sr_each(site):
    proc = start_listener(site["cfg"], site["log"])
    try:
        wait_listening(site["port"], proc)
        # A caller not on the allow-list is rejected, and garbage on the socket does not stop the listener.
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        intruder = AE(ae_title="INTRUDER")
        intruder.add_requested_context(Verification)
        assoc = intruder.associate("127.0.0.1", site["port"], ae_title="CTZEROSHOT")
        assert not assoc.is_established
        with socket.create_connection(("127.0.0.1", site["port"])) as s:
            s.sendall(b"\x01\x00garbage that is not an A-ASSOCIATE-RQ" * 10)
        # Two concurrent senders, five studies each, through Orthanc's REST store.
        errors = []

        def send(chunk):
            try:
                for st in chunk:
                    site["orthanc"].push([st])
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=send, args=(site["studies"][i::2],)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        wait_for(lambda: _one_sr_each(site), 300, "an SR for every study")
        time.sleep(3)  # nothing more arrives
        assert _one_sr_each(site)
        # Orthanc's copy of one SR reads back with highdicom: the model's 30 findings and the site's 2.
        sr_id = site["orthanc"].srs(site["studies"][0])[0]
        (site["tmp"] / "sr.dcm").write_bytes(site["orthanc"].get(f"/instances/{sr_id}/file"))
        found = read_findings(site["tmp"] / "sr.dcm")
        assert len(found) == 32 and found["enlarged_liver"]["code"] == ("SCT", "80515008", "Hepatomegaly")
        assert found["violin_in_pelvis"]["code"][0] == "99CTZS"  # a private code where the file gives none
        log = site["log"].read_text()
        assert "association from INTRUDER@127.0.0.1 rejected" in log
        assert "ORTHANC@127.0.0.1 rejected" not in log
        assert "SYNTHETIC^" not in log and "SYN-PACS" not in log  # no patient names or IDs in the log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def _maps_at_the_pacs(site) -> int:
    """Each SR at Orthanc whose findings reference a map SEG: that SEG is there too. Returns how many."""
    seen = 0
    for study in site["studies"]:
        (sr_id,) = site["orthanc"].srs(study)
        (site["tmp"] / "back.dcm").write_bytes(site["orthanc"].get(f"/instances/{sr_id}/file"))
        for seg in {v["map"]["seg"] for v in read_findings(site["tmp"] / "back.dcm").values() if "map" in v}:
            query = json.dumps({"Level": "Instance", "Query": {"SOPInstanceUID": seg}}).encode()
            assert site["orthanc"].request("POST", "/tools/find", query), f"study {study}: SEG {seg} not at the PACS"
            seen += 1
    return seen


def test_killed_mid_queue_and_restarted_loses_nothing(site):
    """With maps on: each SR and its map SEG (sent first) reach the PACS, across a SIGKILL mid-queue."""
    cfg = yaml.safe_load(site["cfg"].read_text())
    site["cfg"].write_text(yaml.safe_dump({**cfg, "maps": True}))
    proc = start_listener(site["cfg"], site["log"])
    wait_listening(site["port"], proc)
    site["orthanc"].push(site["studies"])  # all 10 spooled (acknowledged) before this returns
    wait_for(lambda: sum(bool(site["orthanc"].srs(s)) for s in site["studies"]) >= 2, 300, "the first SRs")
    os.kill(proc.pid, signal.SIGKILL)  # mid-queue: some studies done, the rest in the spool
    proc.wait()
    done_before = sum(bool(site["orthanc"].srs(s)) for s in site["studies"])
    assert done_before < len(site["studies"]), "the kill came too late to test anything"
    proc = start_listener(site["cfg"], site["log"])
    try:
        wait_listening(site["port"], proc)
        wait_for(lambda: _one_sr_each(site), 300, "an SR for every study after the restart")
        time.sleep(3)
        assert _one_sr_each(site)
        assert "resuming from the spool" in site["log"].read_text()
        assert _maps_at_the_pacs(site) >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_non_ct_study_is_refused_and_does_not_stop_the_listener(site, tmp_path):
    import pydicom

    files = small_study(tmp_path / "mr", "PACSMR", n=10, shape=(20, 20))
    for p in files:
        ds = pydicom.dcmread(p)
        ds.Modality, ds.SOPClassUID = "MR", "1.2.840.10008.5.1.4.1.1.4"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.save_as(p)
    mr = site["orthanc"].upload(files)
    proc = start_listener(site["cfg"], site["log"])
    try:
        wait_listening(site["port"], proc)
        # MR Image Storage is refused at negotiation: Orthanc reports the failed push, nothing is spooled.
        with pytest.raises(urllib.error.HTTPError):
            site["orthanc"].push([mr])
        site["orthanc"].push([site["studies"][0]])
        wait_for(lambda: len(site["orthanc"].srs(site["studies"][0])) == 1, 300, "the CT study's SR")
        assert site["orthanc"].srs(mr) == [] and proc.poll() is None
        spool = Path(site["tmp"]) / "spool"
        assert [p for stage in ("incoming", "failed") for p in (spool / stage).iterdir()] == []
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_dcmtk_jpeg_lossless_sender_echo_parts_and_refusals(site, tmp_path):
    """DCMTK's storescu offering only JPEG Lossless delivers (stored as received), echoscu answers; a study
    sent in two parts gets a corrected SR naming the first; a SOP class the reader cannot use is refused at
    negotiation, a UID that is not a UID with 0xC212."""
    import pydicom
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage

    plain = small_study(tmp_path / "plain", "JPEG01", n=10, shape=(20, 20))
    jpeg = tmp_path / "jpeg"
    jpeg.mkdir()
    for f in plain:
        subprocess.run(["dcmcjpeg", str(f), str(jpeg / f.name)], check=True)  # default: JPEG Lossless SV1
    study = str(pydicom.dcmread(plain[0]).StudyInstanceUID)
    proc = start_listener(site["cfg"], site["log"])
    spool = Path(yaml.safe_load(site["cfg"].read_text())["spool"])
    try:
        wait_listening(site["port"], proc)
        peer = ["-aet", "ORTHANC", "-aec", "CTZEROSHOT", "127.0.0.1", str(site["port"])]
        subprocess.run([dcmtk("echoscu"), *peer], check=True, capture_output=True)
        ordered = sorted(jpeg.iterdir())  # CT0001.dcm ...: in slice order
        # The study in two parts: 8 slices, processed and its SR delivered; then 2 more, which re-open it.
        sent = subprocess.run([dcmtk("storescu"), "-xs", "-R", *peer, *map(str, ordered[:8])], capture_output=True)
        assert sent.returncode == 0, sent.stderr.decode()[-2000:]
        wait_for(lambda: (spool / "done" / study).is_dir(), 300, "the JPEG Lossless study processed and its SR sent")
        first = pydicom.dcmread(next((spool / "out" / study).glob("SR_*.dcm")))
        sent = subprocess.run([dcmtk("storescu"), "-xs", "-R", *peer, *map(str, ordered[8:])], capture_output=True)
        assert sent.returncode == 0, sent.stderr.decode()[-2000:]
        orthanc_study = site["orthanc"].request("POST", "/tools/lookup", study.encode(), "text/plain")[0]["ID"]
        wait_for(lambda: len(site["orthanc"].srs(orthanc_study)) == 2, 300, "the corrected SR delivered")
        wait_for(lambda: (spool / "done" / study).is_dir(), 60, "the re-opened study done again")
        second = pydicom.dcmread(next((spool / "out" / study).glob("SR_*.dcm")))
        assert second.SOPInstanceUID != first.SOPInstanceUID and second.SeriesInstanceUID == first.SeriesInstanceUID
        pred = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert pred.ReferencedSOPInstanceUID == first.SOPInstanceUID  # the corrected SR names the one it replaces
        evidence = lambda sr: sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]  # noqa: E731
        assert len(evidence(first).ReferencedSOPSequence) == 8 and len(evidence(second).ReferencedSOPSequence) == 10
        assert (spool / "out" / study / "superseded" / f"{first.SOPInstanceUID}.dcm").is_file()
        stored = sorted((spool / "done" / study).glob("*.dcm"))
        assert len(stored) == 10  # nothing of the first part was deleted
        assert {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in stored} == {"1.2.840.10008.1.2.4.70"}
        assert {p.read_bytes()[-512:] for p in stored} == {p.read_bytes()[-512:] for p in jpeg.iterdir()}

        ae = AE(ae_title="ORTHANC")
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", site["port"], ae_title="CTZEROSHOT")
        assert assoc.is_established
        accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
        assert accepted == {str(CTImageStorage)}  # MR refused at negotiation
        ds = pydicom.dcmread(plain[0])
        ds.StudyInstanceUID = "../../../../escape"
        status = assoc.send_c_store(ds)
        assoc.release()
        assert status.Status == 0xC212
        assert not (tmp_path / "escape").exists() and not list(spool.parent.glob("escape*"))
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def make_certificates(root: Path) -> dict[str, Path]:
    """A CA and two certificates it signs (listener, PACS), for 127.0.0.1, made with openssl."""
    root.mkdir(parents=True, exist_ok=True)

    def ssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=root)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ct-zeroshot test CA",
        "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    (root / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("listener", "pacs"):
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")  # fmt: skip
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days",
            "2", "-extfile", "san.ext", "-out", f"{name}.crt")  # fmt: skip
    return {p.name: p for p in root.iterdir()}


def test_tls_round_trip_and_plain_callers_refused(tmp_path, tiny_package):
    """Orthanc pushes over DICOM TLS to the listener (which requires a client certificate from the CA),
    the SR comes back over TLS; a caller without TLS gets no association."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    certs = make_certificates(tmp_path / "certs")
    lport = free_port()
    orthanc = OrthancServer(
        tmp_path / "orthanc",
        lport,
        tls={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(certs["pacs.crt"]),
            "DicomTlsPrivateKey": str(certs["pacs.key"]),
            "DicomTlsTrustedCertificates": str(certs["ca.crt"]),
            "DicomTlsRemoteCertificateRequired": True,
        },
    )
    try:
        study = orthanc.upload(small_study(tmp_path / "studies", "TLS01", n=10, shape=(20, 20)))
        tls = {"cert": str(certs["listener.crt"]), "key": str(certs["listener.key"]), "ca": str(certs["ca.crt"])}
        write_listener_config(tmp_path, lport, orthanc, tiny_package, tls=tls)
        proc = start_listener(tmp_path / "listener.yaml", tmp_path / "listener.log")
        try:
            wait_listening(lport, proc)
            plain = AE(ae_title="ORTHANC")
            plain.add_requested_context(Verification)
            assoc = plain.associate("127.0.0.1", lport, ae_title="CTZEROSHOT")
            assert not assoc.is_established  # no TLS, no association
            orthanc.push([study])
            wait_for(lambda: len(orthanc.srs(study)) == 1, 300, "the SR back over TLS")
            log = tmp_path / "listener.log"  # the listener logs the delivery once Orthanc has answered
            wait_for(lambda: "sent to ORTHANC" in log.read_text(), 60, "the delivery logged")
            assert "listening as CTZEROSHOT on 127.0.0.1" in log.read_text() and "(TLS)" in log.read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    finally:
        orthanc.stop()
