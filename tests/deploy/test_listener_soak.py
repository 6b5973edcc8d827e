"""Soak test of the PACS listener (marked slow: `make test-slow` runs it, not `make test`).

20 small CT studies of 16 slices from 3 concurrent DCMTK senders (every third study in two parts, the
first a complete series of 8-12 slices, so it may get an SR of its own before the rest arrives, a
random pause between them), the listener SIGKILLed at 3 random moments and restarted, and the PACS (Orthanc) down
for a while. Then, after the retention time: every study has exactly one current SR in Orthanc (no
other SR of the study names it as a predecessor), and it covers all of the study's instances; the spool
holds no delivered work (``out/<study>/sr.json`` only); nothing was written outside the spool. Last, an
instance that arrives after its study was purged fails that study (no SR from it alone), and the whole
study sent again gets a corrected SR. ``$SOAK_WORKERS`` sets the listener's workers (default 1). The counts
go to ``$SOAK_RESULT`` (default ``runs/soak/listener.json``;
the figures in ``results/soak/listener.json`` come from ``SOAK_RESULT=results/soak/listener.json``).
"""

import io
import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest

from tests.conftest import dcmtk
from tests.deploy import pacs
from tests.dicom_cases import small_study

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(pacs.ORTHANC).exists(), reason="Debian package orthanc needed"),
]
SEED = int(os.environ.get("SOAK_SEED", "7"))
RESULT = Path(os.environ.get("SOAK_RESULT", "runs/soak/listener.json"))  # results/soak/listener.json: see docs/pacs.md
WORKERS = int(os.environ.get("SOAK_WORKERS", "1"))  # the listener's workers: 2 is soaked too (docs/pacs.md)
RETAIN_S = 90.0  # longer than a second part can be late here (a 20 s pause plus restarts under load)


class Listener:
    """The listener subprocess, killed and started again by the test."""

    def __init__(self, cfg: Path, log: Path, cwd: Path, port: int):
        self.cfg, self.log, self.cwd, self.port = cfg, log, cwd, port
        self.proc = None
        self.starts = 0

    def start(self):
        self.proc = pacs.start_listener(self.cfg, self.log, cwd=self.cwd)
        self.starts += 1
        pacs.wait_listening(self.port, self.proc)

    def kill(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


def send(files: list[Path], aet: str, port: int, give_up_s: float = 240) -> int:
    """storescu the files until it succeeds (a modality retries a failed transfer); the attempts."""
    t, attempts = time.time(), 0
    while time.time() - t < give_up_s:
        attempts += 1
        cmd = [dcmtk("storescu"), "-aet", aet, "-aec", "CTZEROSHOT", "127.0.0.1", str(port), *map(str, files)]
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            return attempts
        time.sleep(1.0)
    raise TimeoutError(f"{aet}: could not deliver {len(files)} instances in {give_up_s} s")


def orthanc_srs(orthanc: pacs.OrthancServer, study_uid: str) -> list[pydicom.Dataset]:
    found = orthanc.request("POST", "/tools/lookup", study_uid.encode(), "text/plain")
    if not found:
        return []
    return [pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{i}/file"))) for i in orthanc.srs(found[0]["ID"])]


def predecessors(sr: pydicom.Dataset) -> set[str]:
    return {
        ref.ReferencedSOPInstanceUID
        for item in sr.get("PredecessorDocumentsSequence", [])
        for series in item.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }


def evidence(sr: pydicom.Dataset) -> set[str]:
    return {
        ref.ReferencedSOPInstanceUID
        for item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in item.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }


def current(srs: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The SRs no other SR of the study names as a predecessor."""
    named = set().union(*(predecessors(sr) for sr in srs)) if srs else set()
    return [sr for sr in srs if sr.SOPInstanceUID not in named]


def test_soak(tmp_path, tiny_package):
    rng = random.Random(SEED)
    t_start = time.time()
    lport = pacs.free_port()
    orthanc = pacs.OrthancServer(tmp_path / "orthanc", lport)
    studies: dict[str, list[Path]] = {}
    for i in range(20):
        files = small_study(tmp_path / "studies", f"SOAK{i:02d}", n=16, shape=(20, 20))
        studies[str(pydicom.dcmread(files[0]).StudyInstanceUID)] = files
    uids = list(studies)
    sop = {u: {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in studies[u]} for u in uids}
    senders = ["SEND1", "SEND2", "SEND3"]
    cfg = pacs.write_listener_config(
        tmp_path,
        lport,
        orthanc,
        tiny_package,
        allowed=[{"ae_title": a, "host": "127.0.0.1"} for a in senders],
        retries=2,
        backoff_s=0.5,
        redeliver_max_s=4.0,
        retain_delivered_s=RETAIN_S,
        workers=WORKERS,
    )
    spool = tmp_path / "spool"
    (tmp_path / "cwd").mkdir()
    before = {p.name for p in tmp_path.iterdir()}
    listener = Listener(cfg, tmp_path / "listener.log", tmp_path / "cwd", lport)
    listener.start()
    # Who sends what: study i by sender i % 3; every third study in two parts with a pause between.
    plans: dict[str, list[tuple[str, list[Path], float]]] = {a: [] for a in senders}
    two_parts = 0
    for i, u in enumerate(uids):
        files = studies[u]
        if i % 3 == 0:
            k = rng.randint(8, 12)  # a first part the pipeline accepts (MIN_SLICES 8)
            plans[senders[i % 3]] += [(u, files[:k], rng.uniform(4.0, 20.0)), (u, files[k:], 0.0)]
            two_parts += 1
        else:
            plans[senders[i % 3]].append((u, files, rng.uniform(0.0, 2.0)))
    attempts: list[int] = []
    errors: list[BaseException] = []

    def run_sender(aet):
        try:
            for _, files, pause in plans[aet]:
                attempts.append(send(files, aet, lport))
                time.sleep(pause)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run_sender, args=(a,)) for a in senders]
    for t in threads:
        t.start()
    # Faults at random moments: 3 SIGKILLs (restart after a pause), the PACS down for 15 s.
    t0 = time.time()
    events = [(rng.uniform(2.0, 40.0), "kill") for _ in range(3)]
    down = rng.uniform(5.0, 30.0)
    events += [(down, "pacs down"), (down + 15.0, "pacs up")]
    faults = []
    for at, what in sorted(events):
        time.sleep(max(0.0, at - (time.time() - t0)))
        stages = {s: len(os.listdir(spool / s)) for s in ("incoming", "ready", "done")}
        faults.append({"at_s": round(time.time() - t0, 1), "event": what, "spool_studies": stages})
        if what == "kill":
            listener.kill()
            time.sleep(rng.uniform(0.5, 3.0))
            listener.start()
        elif what == "pacs down":
            orthanc.stop()
        else:
            orthanc.start()
    for t in threads:
        t.join()
    assert not errors, errors

    def settled() -> bool:
        for u in uids:
            cur = current(orthanc_srs(orthanc, u))
            if len(cur) != 1 or evidence(cur[0]) != sop[u]:
                return False
        return True

    try:
        pacs.wait_for(settled, 600, "exactly one current SR covering every instance, for every study")
        pacs.wait_for(lambda: not os.listdir(spool / "done"), RETAIN_S + 60, "delivered studies purged")
        all_srs = {u: orthanc_srs(orthanc, u) for u in uids}
        for u in uids:
            cur = current(all_srs[u])
            assert len(cur) == 1 and evidence(cur[0]) == sop[u], u
            assert all(evidence(sr) <= sop[u] for sr in all_srs[u])
        for stage in ("incoming", "ready", "done", "failed"):
            assert os.listdir(spool / stage) == [], stage
        assert sorted(os.listdir(spool / "out")) == sorted(uids)
        assert all(os.listdir(spool / "out" / u) == ["sr.json"] for u in uids)
        assert os.listdir(tmp_path / "cwd") == []  # nothing written where the listener ran
        assert {p.name for p in tmp_path.iterdir()} == before | {"listener.log", "spool"}
        settled_s = time.time() - t0
        srs_total = sum(len(v) for v in all_srs.values())

        # A late instance of a purged study: the study fails (no SR from one slice), Orthanc unchanged;
        # the whole study sent again: a corrected SR naming the earlier ones, the only current one.
        late = uids[1]
        old = current(all_srs[late])[0]
        send(studies[late][-1:], "SEND1", lport)
        pacs.wait_for(lambda: (spool / "failed" / late / "reason.txt").is_file(), 120, "the late instance refused")
        reason = (spool / "failed" / late / "reason.txt").read_text()
        assert "send the whole study again" in reason, reason
        assert len(orthanc_srs(orthanc, late)) == len(all_srs[late])
        send(studies[late], "SEND1", lport)
        pacs.wait_for(
            lambda: current(orthanc_srs(orthanc, late))[0].SOPInstanceUID != old.SOPInstanceUID, 120, "resent"
        )
        cur = current(orthanc_srs(orthanc, late))
        assert len(cur) == 1 and evidence(cur[0]) == sop[late] and old.SOPInstanceUID in predecessors(cur[0])
        log = (tmp_path / "listener.log").read_text()
        assert "SYNTHETIC^" not in log and "SYN-" not in log  # no patient names or IDs in the log
    finally:
        listener.stop()
        orthanc.stop()
    counts = {
        "seed": SEED,
        "workers": WORKERS,
        "studies": len(uids),
        "instances": sum(len(v) for v in sop.values()),
        "studies_in_two_parts": two_parts,
        "senders": len(senders),
        "storescu_runs": len(attempts),
        "storescu_retries": sum(attempts) - len(attempts),
        "listener_sigkills": sum(f["event"] == "kill" for f in faults),
        "listener_starts": listener.starts,
        "pacs_down_s": 15.0,
        "faults": faults,
        "srs_in_orthanc": srs_total,
        "studies_with_an_sr_of_their_first_part": sum(len(v) > 1 for v in all_srs.values()),
        "corrected_srs": sum(bool(predecessors(sr)) for v in all_srs.values() for sr in v),
        "studies_with_one_current_sr_covering_all": len(uids),
        "seconds_to_settle": round(settled_s, 1),
        "retain_delivered_s": RETAIN_S,
        "late_instance_after_purge": "study failed, no SR; whole study resent: corrected SR",
        "seconds": round(time.time() - t_start, 1),
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(counts, indent=1) + "\n")
