"""``ct-zeroshot serve --config FILE``: a DICOM listener that turns received CT studies into SRs for a PACS.

- A pynetdicom storage SCP with its AE title and port. Callers must be on the allow-list (AE title, and
  host where given): others are rejected (AE title) or aborted (host) and logged.
- Every received instance is written to the spool (temporary file, fsync, rename) *before* the C-STORE
  is answered with success, so an acknowledged instance survives a crash.
- A study is complete when no open association has delivered instances of it and ``idle_timeout_s``
  has passed since its last instance (senders split studies across associations; release alone is not
  enough). Complete studies move from ``spool/incoming`` to ``spool/ready`` (a rename), then run
  through the application's stages one at a time; the SR is C-STOREd to the destination with retries
  and exponential backoff, and the study moves to ``spool/done`` (``spool/failed`` with its reason when
  it cannot be processed).
- Restart-safe: on start, studies in ``incoming`` get a fresh idle timer, those in ``ready`` are queued,
  and an SR already written but not sent is sent. SR UIDs derive from study, series and model
  (``pipeline.sr_uids``), so a study processed twice yields the same SR, never two different ones.
- Logs carry Study Instance UIDs, not patient names or IDs (unless ``log_patient_identifiers``).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .files import PARTIAL_SUFFIX, atomic_path

log = logging.getLogger("ct-zeroshot.listener")


@dataclass
class Peer:
    ae_title: str
    host: str | None = None
    port: int | None = None


@dataclass
class ListenerConfig:
    ae_title: str = "CTZEROSHOT"
    bind: str = "127.0.0.1"
    port: int = 11112
    allowed: list[Peer] = field(default_factory=list)
    destination: Peer | None = None
    spool: str = "spool"
    model: str | None = None
    idle_timeout_s: float = 10.0
    retries: int = 5
    backoff_s: float = 2.0
    log_patient_identifiers: bool = False

    @classmethod
    def load(cls, path: str | Path) -> ListenerConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: cannot read listener config ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        try:
            allowed = [Peer(**p) for p in data.pop("allowed", [])]
            dest = data.pop("destination", None)
            cfg = cls(**data, allowed=allowed, destination=Peer(**dest) if dest else None)
        except TypeError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        if not cfg.allowed:
            raise ValueError(f"{path}: 'allowed' must list at least one calling AE title")
        if cfg.destination is None or not cfg.destination.host or not cfg.destination.port:
            raise ValueError(f"{path}: 'destination' needs ae_title, host and port")
        return cfg


def _atomic_write_dataset(ds, path: Path) -> None:
    with atomic_path(path, fsync=True) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


class Listener:
    def __init__(self, cfg: ListenerConfig):
        from .package import default_package_dir, load_package
        from .pipeline import SeriesToModelInput
        from .zeroshot import ZeroShotModel

        self.cfg = cfg
        self.spool = Path(cfg.spool)
        for d in ("incoming", "ready", "done", "failed", "out"):
            (self.spool / d).mkdir(parents=True, exist_ok=True)
        pkg = load_package(cfg.model or default_package_dir())
        self.model = ZeroShotModel(pkg, device="auto")
        self.prep = SeriesToModelInput(pkg.spec)
        self.lock = threading.Lock()
        self.last_seen: dict[str, float] = {}  # study UID -> time of its last instance
        self.open_assoc: dict[int, set[str]] = {}  # association id -> studies it delivered
        self.queue: queue.Queue[str] = queue.Queue()
        self.stop = threading.Event()
        self.server = None
        self.processed: list[dict] = []

    # -- receiving -----------------------------------------------------------------------------
    def _allowed(self, assoc) -> bool:
        req = assoc.requestor
        title = req.ae_title.strip() if isinstance(req.ae_title, str) else req.ae_title.decode().strip()
        return any(p.ae_title == title and (p.host is None or p.host == req.address) for p in self.cfg.allowed)

    def on_rejected(self, event):
        req = event.assoc.requestor
        log.warning(
            "association from %s@%s rejected (calling AE title not on the allow-list)",
            str(req.ae_title).strip(),
            req.address,
        )

    def on_accepted(self, event):
        if not self._allowed(event.assoc):
            req = event.assoc.requestor
            log.warning("association from %s@%s not on the allow-list: aborted", req.ae_title, req.address)
            event.assoc.abort()
            return
        with self.lock:
            self.open_assoc[id(event.assoc)] = set()

    def on_closed(self, event):
        with self.lock:
            studies = self.open_assoc.pop(id(event.assoc), set())
            now = time.monotonic()
            for uid in studies:
                self.last_seen[uid] = now

    def on_store(self, event):
        if id(event.assoc) not in self.open_assoc:
            return 0xC211  # refused: not an accepted caller
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            uid = str(ds.StudyInstanceUID)
            sop = str(ds.SOPInstanceUID)
        except Exception as exc:  # noqa: BLE001 - a malformed dataset must not stop the listener
            log.warning("C-STORE with an unreadable dataset refused (%s)", exc)
            return 0xC210
        folder = self.spool / "incoming" / uid
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _atomic_write_dataset(ds, folder / f"{sop}.dcm")
        except Exception as exc:  # noqa: BLE001
            log.error("study %s: instance %s not spooled (%s)", uid, sop, exc)
            return 0xA700  # out of resources
        with self.lock:
            self.open_assoc.setdefault(id(event.assoc), set()).add(uid)
            self.last_seen[uid] = time.monotonic()
        return 0x0000

    # -- completion and processing --------------------------------------------------------------
    def _watch(self):
        while not self.stop.is_set():
            now = time.monotonic()
            with self.lock:
                busy = set().union(*self.open_assoc.values()) if self.open_assoc else set()
                done = [u for u, t in self.last_seen.items() if u not in busy and now - t >= self.cfg.idle_timeout_s]
                for u in done:
                    del self.last_seen[u]
            for uid in done:
                src, dst = self.spool / "incoming" / uid, self.spool / "ready" / uid
                if dst.exists():  # more instances of a study already queued: merge them in
                    for f in src.iterdir():
                        os.replace(f, dst / f.name)
                    src.rmdir()
                else:
                    os.replace(src, dst)
                log.info("study %s complete (%d instances); queued", uid, len(list(dst.iterdir())))
                if self.cfg.log_patient_identifiers:
                    import pydicom

                    first = pydicom.dcmread(next(dst.iterdir()), stop_before_pixels=True)
                    log.info("study %s: patient %s (%s)", uid, first.get("PatientID", ""), first.get("PatientName", ""))
                self.queue.put(uid)
            self.stop.wait(0.5)

    def _send(self, sr_path: Path, uid: str) -> bool:
        import pydicom
        from pynetdicom import AE

        dest = self.cfg.destination
        if dest is None or dest.host is None or dest.port is None:
            raise RuntimeError("listener has no destination configured")
        ds = pydicom.dcmread(sr_path)
        delay = self.cfg.backoff_s
        for attempt in range(1, self.cfg.retries + 1):
            ae = AE(ae_title=self.cfg.ae_title)
            ae.add_requested_context(str(ds.SOPClassUID), [str(ds.file_meta.TransferSyntaxUID)])
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
            if assoc.is_established:
                status = assoc.send_c_store(ds)
                assoc.release()
                code = getattr(status, "Status", None)
                if code == 0x0000:
                    log.info("study %s: SR %s sent to %s (attempt %d)", uid, ds.SOPInstanceUID, dest.ae_title, attempt)
                    return True
                log.warning(
                    "study %s: %s answered C-STORE with status %s",
                    uid,
                    dest.ae_title,
                    hex(code) if code is not None else "none",
                )
            else:
                log.warning(
                    "study %s: cannot associate with %s@%s:%s (attempt %d of %d)",
                    uid,
                    dest.ae_title,
                    dest.host,
                    dest.port,
                    attempt,
                    self.cfg.retries,
                )
            if attempt < self.cfg.retries and self.stop.wait(delay):
                return False
            delay *= 2
        return False

    def process(self, uid: str) -> dict:
        from .dicom_series import scan_tree
        from .pipeline import StudyWork, run_study, sr_filename

        ready = self.spool / "ready" / uid
        out = self.spool / "out" / uid
        sr = out / sr_filename(uid)
        record: dict[str, Any] = {"study_uid": uid}
        if not sr.exists():  # not processed before a restart
            studies = scan_tree(ready).studies()
            if uid not in studies:
                record.update(status="failed", error="no readable instances")
            else:
                work = run_study(StudyWork(uid, studies[uid]), self.model, self.prep, out)
                record.update(status=work.status, error=work.reason)
        else:
            record.update(status="ok", error="", resumed=True)
        if record["status"] != "ok":
            dst = self.spool / "failed" / uid
            shutil.rmtree(dst, ignore_errors=True)
            os.replace(ready, dst)
            (dst / "reason.txt").write_text(record["error"] + "\n")
            log.error("study %s: failed: %s", uid, record["error"])
        elif self._send(sr, uid):
            record["sent"] = True
            dst = self.spool / "done" / uid
            shutil.rmtree(dst, ignore_errors=True)
            os.replace(ready, dst)
        else:
            record["sent"] = False
            log.error("study %s: SR not delivered after %d attempts; kept for the next start", uid, self.cfg.retries)
        self.processed.append(record)
        return record

    def _work(self):
        while not self.stop.is_set():
            try:
                uid = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self.process(uid)
            except Exception:  # noqa: BLE001 - never let one study end the service
                log.exception("study %s: unexpected error", uid)

    def recover(self) -> None:
        """Pick up what a previous run left: ready studies are queued, incoming ones get a fresh timer."""
        for d in sorted((self.spool / "ready").iterdir()):
            log.info("study %s: resuming from the spool", d.name)
            self.queue.put(d.name)
        now = time.monotonic()
        for d in sorted((self.spool / "incoming").iterdir()):
            for f in d.glob(f".*{PARTIAL_SUFFIX}"):
                f.unlink()  # never acknowledged
            with self.lock:
                self.last_seen[d.name] = now

    # -- service -------------------------------------------------------------------------------
    def start(self):
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=self.cfg.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        ae.require_calling_aet = [p.ae_title for p in self.cfg.allowed]
        handlers = [
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_RELEASED, self.on_closed),
            (evt.EVT_ABORTED, self.on_closed),
        ]
        self.recover()
        self.server = ae.start_server((self.cfg.bind, self.cfg.port), block=False, evt_handlers=handlers)
        self.threads = [
            threading.Thread(target=self._watch, daemon=True, name="completion"),
            threading.Thread(target=self._work, daemon=True, name="pipeline"),
        ]
        for t in self.threads:
            t.start()
        log.info(
            "listening as %s on %s:%d; allowed callers: %s; SRs to %s@%s:%d",
            self.cfg.ae_title,
            self.cfg.bind,
            self.cfg.port,
            ", ".join(p.ae_title for p in self.cfg.allowed),
            self.cfg.destination.ae_title,
            self.cfg.destination.host,
            self.cfg.destination.port,
        )

    def shutdown(self):
        self.stop.set()
        if self.server is not None:
            self.server.shutdown()
        for t in getattr(self, "threads", []):
            t.join(timeout=10)


def serve(config: str | Path) -> int:
    cfg = ListenerConfig.load(config)
    listener = Listener(cfg)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    listener.start()
    done.wait()
    log.info("stopping")
    listener.shutdown()
    (Path(cfg.spool) / "last_run.json").write_text(json.dumps(listener.processed, indent=1))
    return 0
