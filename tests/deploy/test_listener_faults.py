"""The listener never says yes while it cannot work: a study that kills the process stops being retried, a
full disk after acknowledgement loses nothing, and a dead pipeline thread refuses instances. The listener
runs in this process (no network needed: the destination is a closed port), its spool on disk."""

import errno
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from operators.listener.config import DimseDestination, ListenerConfig, Peer
from operators.listener.service import Listener
from tests.deploy.pacs import free_port
from tests.dicom_cases import small_study, study_uid


@pytest.fixture
def listener(tmp_path, tiny_package):
    cfg = ListenerConfig(
        allowed=[Peer(ae_title="SENDER")],
        destination=DimseDestination(ae_title="PACS", host="127.0.0.1", port=free_port()),  # nothing listens there
        spool=str(tmp_path / "spool"),
        model=str(tiny_package["pkg"]),
        retries=1,
        backoff_s=0.01,
        redeliver_max_s=3600.0,
        max_attempts=2,
        port=free_port(),
        idle_timeout_s=3600.0,  # nothing completes while a test runs
    )
    lst = Listener(cfg)
    yield lst
    lst.shutdown()


def _spooled(listener, root: Path, name: str) -> str:
    """A complete study in the spool's ready/, as the completion thread leaves it."""
    import pydicom

    paths = small_study(root, name)
    uid = study_uid(paths[0])
    for p in paths:
        listener.spool.store(p.read_bytes(), uid, str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID))
    listener.spool.complete(uid)
    return uid


def test_a_study_that_killed_the_process_goes_to_failed_and_the_queue_moves_on(listener, tmp_path):
    """Each start of processing is counted before it runs: a study whose processing killed the process twice
    (max_attempts 2) is not processed a third time, while the study behind it is."""
    deadly, fine = _spooled(listener, tmp_path / "in", "DEADLY"), _spooled(listener, tmp_path / "in", "FINE")
    for _ in range(2):
        listener.spool.attempts(deadly, add=1)  # what two deaths mid-processing leave in the spool
    listener._attempt(deadly)
    assert (
        (listener.spool.path("failed", deadly) / "reason.txt")
        .read_text()
        .startswith("processing did not finish in 2 attempts")
    )
    assert not list(listener.spool.path("out", deadly).glob("SR_*.dcm"))  # not processed again
    listener._attempt(fine)
    assert list(listener.spool.path("out", fine).glob("SR_*.dcm"))
    assert listener.spool.attempts(fine) == 0  # an attempt that ended is not held against the study


def test_a_full_disk_after_acknowledgement_is_retried_not_failed(listener, tmp_path, monkeypatch):
    from operators import sr

    uid = _spooled(listener, tmp_path / "in", "DISKFULL")
    real, calls = sr.write_sr, []

    def full_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(sr, "write_sr", full_once)
    queued = []
    monkeypatch.setattr(listener, "_redeliver_later", queued.append)
    listener._attempt(uid)
    assert queued == [uid] and listener.spool.path("ready", uid).is_dir()  # kept, queued again
    assert not listener.spool.path("failed", uid).exists() and listener.spool.attempts(uid) == 0
    listener._attempt(uid)  # the disk has room again
    assert list(listener.spool.path("out", uid).glob("SR_*.dcm"))


def test_a_dead_pipeline_thread_refuses_instances(listener, tmp_path, monkeypatch):
    def die(uid):
        raise SystemExit("pipeline thread killed")

    monkeypatch.setattr(listener, "_attempt", die)
    listener.queue.put("1.2.3")
    worker = threading.Thread(target=listener._work)
    worker.start()
    worker.join(10)
    assert not worker.is_alive() and listener.broken == "the pipeline thread ended (SystemExit)"
    assoc = SimpleNamespace()
    listener.open_assoc[id(assoc)] = set()
    assert listener.on_store(SimpleNamespace(assoc=assoc)) == 0xA700  # never 0x0000 while nothing would run


def test_a_second_different_instance_under_one_sop_uid_is_refused(listener, tmp_path):
    """Over a real association: the same instance again is taken (a sender's retry), other bytes under its
    SOP Instance UID are refused (0xC213), and the first copy is kept."""
    import pydicom
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    path = small_study(tmp_path / "in", "TWICE")[0]
    first = pydicom.dcmread(path)
    changed = pydicom.dcmread(path)
    changed.PixelData = bytes(len(changed.PixelData))  # other pixels, the same SOP Instance UID
    listener.start()
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(CTImageStorage, first.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", listener.cfg.port, ae_title=listener.cfg.ae_title)
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(ds).Status for ds in (first, first, changed)]
    finally:
        assoc.release()
    assert statuses == [0x0000, 0x0000, 0xC213]
    held = listener.spool.path("incoming", str(first.StudyInstanceUID)) / f"{first.SOPInstanceUID}.dcm"
    assert pydicom.dcmread(held).PixelData == first.PixelData


def test_a_full_spool_disk_refuses_before_acknowledging(listener, tmp_path, monkeypatch):
    """An instance that would leave the spool's disk below min_free_mb is refused (0xA700): nothing is
    acknowledged that may not be written and processed."""
    import shutil

    import pydicom

    from operators.listener import service

    path = small_study(tmp_path / "in", "FULLDISK")[0]
    ds = pydicom.dcmread(path)
    data = path.read_bytes()
    event = SimpleNamespace(assoc=SimpleNamespace(), encoded_dataset=lambda include_meta: data, dataset=ds)
    listener.open_assoc[id(event.assoc)] = set()
    real = shutil.disk_usage(listener.cfg.spool)
    low = real._replace(free=int(listener.cfg.min_free_mb * 1e6) + len(data) // 2)
    monkeypatch.setattr(service.shutil, "disk_usage", lambda p: low)
    assert listener.on_store(event) == 0xA700
    assert not any(listener.spool.root.rglob("*.dcm"))
    monkeypatch.setattr(service.shutil, "disk_usage", lambda p: real)
    assert listener.on_store(event) == 0x0000  # room again: taken


def _served(tmp_path, tiny_package, **kw):
    cfg = ListenerConfig(
        allowed=kw.pop("allowed", [Peer(ae_title="SENDER")]),
        destination=DimseDestination(ae_title="PACS", host="127.0.0.1", port=free_port()),
        spool=str(tmp_path / "spool"),
        model=str(tiny_package["pkg"]),
        port=free_port(),
        idle_timeout_s=3600.0,
        **kw,
    )
    lst = Listener(cfg)
    lst.start()
    return lst


def _echo(port: int) -> bool:
    from pynetdicom import AE

    ae = AE(ae_title="SENDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="CTZEROSHOT")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def _closed_within(sock, seconds: float) -> bool:
    import time

    sock.settimeout(0.2)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if sock.recv(1) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def test_idle_sockets_free_their_association_slots(tmp_path, tiny_package):
    """Sockets that never ask to associate held the fixed slots for 30 s and locked allowed senders out:
    they are closed after acse_timeout_s, and an allowed sender gets through."""
    import socket

    lst = _served(tmp_path, tiny_package, max_associations=2, acse_timeout_s=1.0)
    try:
        idle = [socket.create_connection(("127.0.0.1", lst.cfg.port)) for _ in range(2)]
        assert all(_closed_within(s, 5.0) for s in idle)
        # the slots are given back once the closed associations' threads end: a sender that retries, as
        # senders do, gets through within seconds (not the 30 s a silent socket held a slot before)
        import time

        end, ok = time.monotonic() + 10.0, False
        while not ok and time.monotonic() < end:
            ok = _echo(lst.cfg.port)
            time.sleep(0 if ok else 0.5)
        assert ok
    finally:
        lst.shutdown()


def test_a_connection_from_an_address_no_caller_uses_is_closed_at_once(tmp_path, tiny_package):
    import socket

    lst = _served(tmp_path, tiny_package, allowed=[Peer(ae_title="SENDER", host="10.9.9.9")], acse_timeout_s=30.0)
    try:
        s = socket.create_connection(("127.0.0.1", lst.cfg.port))
        assert _closed_within(s, 3.0)  # long before the 30 s a silent socket would otherwise hold its slot
    finally:
        lst.shutdown()


def test_an_oversized_instance_is_aborted_while_it_is_received(tmp_path, tiny_package, caplog):
    """max_instance_mb was checked after pynetdicom had assembled the whole instance in memory (six 300 MB
    instances killed a 2 GB listener): the association is aborted once the bytes received pass the limit,
    long before the instance is whole; the instance acknowledged before it on the association is kept."""
    import logging
    import re

    import numpy as np
    import pydicom
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    small, other = small_study(tmp_path / "in", "HUGE")[:2]
    first = pydicom.dcmread(small)
    big = pydicom.dcmread(other)
    big.Rows = big.Columns = 2048  # 8 MB of pixels against a 1 MB limit
    big.PixelData = np.zeros((2048, 2048), np.int16).tobytes()
    lst = _served(tmp_path, tiny_package, max_instance_mb=1.0)
    try:
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(CTImageStorage, first.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", lst.cfg.port, ae_title=lst.cfg.ae_title)
        assert assoc.is_established
        with caplog.at_level(logging.WARNING, logger="ct-zeroshot.listener"):
            assert assoc.send_c_store(first).Status == 0x0000
            answer = assoc.send_c_store(big)
            assoc.release()
        assert "Status" not in answer and assoc.is_aborted  # never acknowledged
        spooled = sorted(p.stem for p in lst.spool.root.rglob("*.dcm"))
        assert spooled == [str(first.SOPInstanceUID)]
        said = [r.getMessage() for r in caplog.records if "while being received" in r.getMessage()]
        assert len(said) == 1
        mb = float(re.search(r"\((\d+) MB so far\)", said[0]).group(1))
        assert mb <= 2  # aborted near the limit, not after the 8 MB instance
        assert _echo(lst.cfg.port)  # the listener goes on
    finally:
        lst.shutdown()


def test_a_memory_bomb_through_the_listener_fails_its_study_and_the_next_is_reported(listener, tmp_path):
    """A 64x64 series declaring 470 mm pixels made the resampler allocate ~8 GB and the listener was
    OOM-killed on every restart: it now fails from its headers, before allocation, with the reason, and
    the study queued behind it gets its SR."""
    import pydicom

    bomb = small_study(tmp_path / "in", "BOMB")
    for p in bomb:
        ds = pydicom.dcmread(p)
        ds.PixelSpacing = ["470", "470"]
        ds.save_as(p)
    uid = study_uid(bomb[0])
    for p in bomb:
        listener.spool.store(p.read_bytes(), uid, str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID))
    listener.spool.complete(uid)
    fine = _spooled(listener, tmp_path / "in", "AFTERBOMB")
    listener._attempt(uid)
    reason = (listener.spool.path("failed", uid) / "reason.txt").read_text()
    assert "PixelSpacing (row) 470 mm is outside" in reason
    assert not list(listener.spool.path("out", uid).glob("SR_*.dcm"))
    listener._attempt(fine)
    assert list(listener.spool.path("out", fine).glob("SR_*.dcm"))
