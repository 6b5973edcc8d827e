"""The listening service: receiving, completion and processing (``ct-zeroshot serve``).

- A pynetdicom storage SCP with its AE title and port. Callers must be on the allow-list (AE title, and
  host where given): others are rejected (AE title) or aborted (host) and logged.
- Every received instance is written to the spool (temporary file, fsync, rename) *before* the C-STORE
  is answered with success, so an acknowledged instance survives a crash.
- A study is complete when no open association has delivered instances of it and ``idle_timeout_s``
  has passed since its last instance (senders split studies across associations; release alone is not
  enough). Complete studies move from ``spool/incoming`` to ``spool/ready`` (a rename), then run
  through the application's stages (``workers`` studies at a time, each study by one worker); the SR is
  C-STOREd (or stored with STOW-RS) to the destination with retries and exponential backoff, and the
  study moves to ``spool/done``
  (``spool/failed`` with its reason when it cannot be processed); ``retain_delivered_s`` after delivery
  its instances and SR files are deleted.
- Restart-safe: on start, studies in ``incoming`` get a fresh idle timer, those in ``ready`` are queued,
  and an SR already written but not sent is sent. SR UIDs derive from study, series and model
  (``pipeline.sr_uids``), so a study processed twice yields the same SR, never two different ones.
- Logs carry Study Instance UIDs, not patient names or IDs (unless ``log_patient_identifiers``).
- Operations (``health``): ``/healthz``, ``/readyz``, Prometheus ``/metrics``, JSON logs and one audit line
  per study outcome in ``SPOOL/audit.jsonl`` (``operators.listener.health``).
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from ..contract.phi import allow_identifiers, describe
from .config import ListenerConfig
from .health import Audit, HealthServer, Metrics, Readiness, destination_answers, spool_writable, use_log_format
from .sender import make_sender
from .spool import InstanceConflict, Spool, SpoolError, offered_references, sr_identity

log = logging.getLogger("ct-zeroshot.listener")

ACCEPTED_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction (DCMTK storescu -xs)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, non-hierarchical
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Image Compression (Lossless Only), pylibjpeg-openjpeg
    "1.2.840.10008.1.2.4.91",  # JPEG 2000 Image Compression (lossless or lossy, as the sender encoded it)
)


def load_model(cfg: ListenerConfig):
    """The configured package (the embedded demo model without one) with the site's findings and maps."""
    from ..contract.package import load_package, named_or_demo
    from ..contract.scoring import ZeroShotModel

    pkg = load_package(named_or_demo(cfg.model))
    return ZeroShotModel(pkg, device=cfg.device, findings=cfg.findings, findings_mode=cfg.findings_mode, maps=cfg.maps)


def check(config: str | Path, out=None) -> int:
    """``serve --check``: the config (a ``ConfigError`` is raised as for ``serve``), then the model loads,
    the spool is writable, the DICOM (and health) ports can be bound and the destination answers. One line
    per check; 0 when all pass, 1 otherwise. Nothing is received, written or sent but a C-ECHO."""
    import socket
    import sys

    out = out or sys.stdout
    cfg = ListenerConfig.load(config)
    print(f"ok    config: {config}", file=out)
    results: list[bool] = []

    def say(ok: bool, what: str, detail: str) -> None:
        results.append(ok)
        print(f"{'ok  ' if ok else 'FAIL'}  {what}: {detail}", file=out)

    try:
        model = load_model(cfg)
        pkg = model.package
        say(True, "model", f"{pkg.name} {pkg.version}, {len(pkg.manifest.findings)} findings, device {model.device}")
    except Exception as exc:  # noqa: BLE001 - every check runs; each failure is one line
        say(False, "model", describe(exc))
    ok, why = spool_writable(cfg.spool)
    say(ok, "spool", why)
    binds = [("DICOM port", cfg.bind, cfg.port)]
    if cfg.health is not None:
        binds.append(("health port", cfg.health.bind, cfg.health.port))
    for what, host, port in binds:
        try:
            with socket.create_server((host, port)):
                pass
            say(True, what, f"{host}:{port} free")
        except OSError as exc:
            say(False, what, f"{host}:{port} cannot be bound ({exc.strerror or type(exc).__name__})")
    ok, why = destination_answers(cfg)
    say(ok, "destination", why)
    return 0 if all(results) else 1


class TransientError(RuntimeError):
    """Processing failed for a reason of the machine's (storage), not the study's: try again later."""


class Listener:
    """Receives (pynetdicom handlers ``on_*``), decides when a study is complete (``_watch``), runs the
    pipeline in ``workers`` threads (``_work`` -> ``process``) and hands SRs to the ``Sender``."""

    def __init__(self, cfg: ListenerConfig, metrics: Metrics | None = None):
        from ..pipeline import SeriesToModelInput, log_model

        self.cfg = cfg
        allow_identifiers(cfg.log_patient_identifiers)  # header values in logs only where allowed
        cfg.apply_site_codes()
        self.spool = Spool(cfg.spool)
        self.model = load_model(cfg)
        pkg = self.model.package
        log_model(self.model)
        self.metrics = metrics or Metrics()
        self.metrics.model.labels(name=pkg.name, version=pkg.version).set(1)
        self.audit = Audit(cfg.spool)
        self.callers: dict[str, set[str]] = {}  # study UID -> calling AE titles that sent it (since start)
        self.completed_at: dict[str, float] = {}  # study UID -> when it was queued (for the latency metric)
        self.busy = 0  # workers processing a study now
        # Each worker decodes into its own buffer (SeriesToModelInput reuses its last volume's memory); all
        # are built now, so the first study does not wait for MONAI's import and the transform's build.
        self._preps: queue.Queue = queue.Queue()
        for _ in range(cfg.workers):
            self._preps.put(SeriesToModelInput(self.model.package.spec))
        self._mine = threading.local()
        self.lock = threading.Lock()
        self.last_seen: dict[str, float] = {}  # study UID -> time of its last instance
        self.open_assoc: dict[int, set[str]] = {}  # association id -> studies it delivered
        self.receiving: dict[int, int] = {}  # association id -> bytes of the instance being received
        self.queue: queue.Queue[str] = queue.Queue()
        self.stop = threading.Event()
        self.sender = make_sender(cfg, self.stop)
        self.server = None
        self.processed: list[dict] = []
        self.retry_round: dict[str, int] = {}  # study UID -> times it was queued again
        self.broken: str | None = None  # why the pipeline thread ended (then nothing more is accepted)
        # One lock per study: its spool moves (completion, processing, purge) never run at the same time,
        # e.g. a second part completing while the first is being processed waits for it.
        self.study_locks: dict[str, threading.Lock] = {}

    def _prep(self):
        """This worker's preprocessing (taken from those built at start on its first study)."""
        if not hasattr(self._mine, "prep"):
            try:
                self._mine.prep = self._preps.get_nowait()
            except queue.Empty:  # a thread beyond the workers (tests call process directly)
                from ..pipeline import SeriesToModelInput

                self._mine.prep = SeriesToModelInput(self.model.package.spec)
        return self._mine.prep

    def _study_lock(self, uid: str) -> threading.Lock:
        with self.lock:
            return self.study_locks.setdefault(uid, threading.Lock())

    # -- receiving -----------------------------------------------------------------------------
    def _allowed(self, assoc) -> bool:
        req = assoc.requestor
        title = req.ae_title.strip() if isinstance(req.ae_title, str) else req.ae_title.decode().strip()
        return any(p.ae_title == title and (p.host is None or p.host == req.address) for p in self.cfg.allowed)

    def _free_bytes(self) -> int | None:
        try:
            return shutil.disk_usage(self.cfg.spool).free
        except OSError:
            return None  # the store itself reports a missing spool

    def on_conn_open(self, event):
        """Before any association request: a connection from an address no allowed caller may use is closed
        at once, so it cannot hold an association slot (only when every allowed caller names its host)."""
        hosts = {p.host for p in self.cfg.allowed}
        if None in hosts:
            return
        address = event.address[0] if event.address else None
        if address not in hosts:
            log.warning("connection from %s closed: no allowed caller uses that address", address)
            # before the association starts: it waits no time for a request, then closes its socket
            event.assoc.acse_timeout = 0.001

    def _message_done(self, assoc) -> None:
        """A message (C-STORE, C-ECHO) was received whole: the next one on ``assoc`` counts from 0."""
        with self.lock:
            self.receiving.pop(id(assoc), None)

    def on_echo(self, event):
        self._message_done(event.assoc)
        return 0x0000

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

    def on_data(self, event):
        """While an instance is received: its P-DATA bytes are counted per association, and once they pass
        ``max_instance_mb`` the association is aborted, so an oversized instance is never held whole in
        memory (pynetdicom assembles a C-STORE before its handler runs). Nothing of it was acknowledged;
        the instances acknowledged before it on the association are kept."""
        data = event.data
        if data[:1] != b"\x04":  # only P-DATA-TF carries a message
            return
        key = id(event.assoc)
        limit = self.cfg.max_instance_mb * 1e6 + 65536  # the command set and PDU headers ride along
        with self.lock:
            received = self.receiving.get(key, 0) + len(data)
            self.receiving[key] = received
        if received > limit and not getattr(event.assoc, "_sent_abort", False):
            req = event.assoc.requestor
            log.warning(
                "association from %s@%s aborted: an instance passed max_instance_mb %s while being received "
                "(%.0f MB so far); nothing of it was acknowledged",
                str(req.ae_title).strip(),
                req.address,
                self.cfg.max_instance_mb,
                received / 1e6,
            )
            event.assoc.abort()

    def on_closed(self, event):
        with self.lock:
            self.receiving.pop(id(event.assoc), None)
            studies = self.open_assoc.pop(id(event.assoc), set())
            now = time.monotonic()
            for uid in studies:
                self.last_seen[uid] = now

    def on_store(self, event):
        """Refuse what cannot be spooled safely; write the rest as received, then acknowledge."""
        self._message_done(event.assoc)
        status = self._store(event)
        if status == 0x0000:
            self.metrics.instances.inc()
        return status

    def _store(self, event) -> int:
        if id(event.assoc) not in self.open_assoc:
            return self._refuse(0xC211, "not_allowed")  # refused: not an accepted caller
        if self.broken:
            return self._refuse(0xA700, "pipeline_ended")  # never acknowledge what would not be processed
        try:
            data = event.encoded_dataset(include_meta=True)  # the bytes as received, with file meta
        except Exception as exc:  # noqa: BLE001 - a malformed dataset must not stop the listener
            log.warning("C-STORE with an unreadable dataset refused (%s)", type(exc).__name__)
            return self._refuse(0xC210, "unreadable")
        if len(data) > self.cfg.max_instance_mb * 1e6:
            log.warning("C-STORE of %.0f MB refused (max_instance_mb %s)", len(data) / 1e6, self.cfg.max_instance_mb)
            return self._refuse(0xA700, "too_large")  # out of resources
        free = self._free_bytes()
        if free is not None and free - len(data) < self.cfg.min_free_mb * 1e6:
            log.warning(
                "C-STORE refused: the spool's disk would keep %.0f MB free, below min_free_mb %s",
                (free - len(data)) / 1e6,
                self.cfg.min_free_mb,
            )
            return self._refuse(0xA700, "disk_full")  # never acknowledge what may not be written or processed
        try:
            ds = event.dataset
            uid, sop = ds.get("StudyInstanceUID"), ds.get("SOPInstanceUID")
        except Exception as exc:  # noqa: BLE001
            log.warning("C-STORE with an unreadable dataset refused (%s)", type(exc).__name__)
            return self._refuse(0xC210, "unreadable")
        try:
            self.spool.store(data, uid, sop)
        except InstanceConflict as exc:
            log.warning("C-STORE refused: %s", exc)
            return self._refuse(0xC213, "conflict")  # a second, different instance under one SOP Instance UID
        except SpoolError as exc:
            log.warning("C-STORE refused: %s", exc)
            return self._refuse(0xC212, "bad_uids")  # the dataset does not match the SOP class (its UIDs are unusable)
        except Exception as exc:  # noqa: BLE001
            log.error("study %s: instance %s not spooled (%s)", uid, sop, type(exc).__name__)
            return self._refuse(0xA700, "not_spooled")  # out of resources
        title = str(getattr(getattr(event.assoc, "requestor", None), "ae_title", "")).strip()
        with self.lock:
            self.open_assoc.setdefault(id(event.assoc), set()).add(str(uid))
            self.last_seen[str(uid)] = time.monotonic()
            self.callers.setdefault(str(uid), set()).add(title)
        return 0x0000

    def _refuse(self, status: int, reason: str) -> int:
        self.metrics.refused.labels(reason=reason).inc()
        return status

    # -- completion and processing --------------------------------------------------------------
    def _watch(self):
        purged_at = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if now - purged_at >= min(5.0, self.cfg.retain_delivered_s):
                purged_at = now
                try:
                    self._purge_delivered()
                except Exception as exc:  # noqa: BLE001 - a purge that fails is tried again; receiving goes on
                    log.error("purge of delivered studies failed (%s)", describe(exc))
            with self.lock:
                busy = set().union(*self.open_assoc.values()) if self.open_assoc else set()
                done = [u for u, t in self.last_seen.items() if u not in busy and now - t >= self.cfg.idle_timeout_s]
                for u in done:
                    del self.last_seen[u]
            for uid in done:
                busy_study = self._study_lock(uid)
                if not busy_study.acquire(blocking=False):  # being processed: complete it right after
                    with self.lock:
                        self.last_seen.setdefault(uid, now - self.cfg.idle_timeout_s)
                    continue
                try:
                    self._queue_complete(uid)
                except Exception:  # noqa: BLE001 - one study's trouble must not stop the completion thread
                    log.exception("study %s: could not be queued", uid)
                finally:
                    busy_study.release()
            self.stop.wait(0.5)

    def _queue_complete(self, uid: str) -> None:
        dst, reopened = self.spool.complete(uid)
        log.info(
            "study %s complete (%d instances)%s; queued",
            uid,
            len(list(dst.glob("*.dcm"))),
            "; re-opened: instances arrived after it was processed, a corrected SR follows" if reopened else "",
        )
        if self.cfg.log_patient_identifiers:
            import pydicom

            first = pydicom.dcmread(next(dst.iterdir()), stop_before_pixels=True)
            log.info("study %s: patient %s (%s)", uid, first.get("PatientID", ""), first.get("PatientName", ""))
        self.metrics.studies_received.inc()
        with self.lock:
            self.completed_at[uid] = time.time()
        self.queue.put(uid)

    def process(self, uid: str) -> dict:
        from ..contract.dicom_series import scan_tree
        from ..pipeline import StudyWork, run_study, seg_filename, sr_filename

        ready = self.spool.path("ready", uid)
        out = self.spool.path("out", uid)
        sr = out / sr_filename(uid)
        record: dict[str, Any] = {"study_uid": uid}
        state, covers = self.spool.sr_state(uid), self.spool.instances_digest(uid)
        released = self.spool.released(uid, state)
        if sr.exists() and state.get("instances") == covers and sr_identity(sr)["sop"] == state.get("sop"):
            record.update(status="ok", error="", resumed=True)  # built from these instances: (re)send it
        elif released:
            record.update(
                status="failed",
                error=f"{released} of the {len(state.get('covered', []))} instances its delivered SR covered were "
                "deleted after retain_delivered_s; send the whole study again for a corrected SR",
            )
        else:  # a study never processed, or one that received instances after its SR: (re)build
            studies = scan_tree(ready).studies()
            if uid not in studies:
                record.update(status="failed", error="no readable instances")
            else:
                work = StudyWork(uid, studies[uid], **self._revision(uid, state, sr))
                (out / seg_filename(uid)).unlink(missing_ok=True)  # an earlier SR's maps: never sent with this one
                work = run_study(work, self.model, self._prep(), out)
                self.metrics.observe_stages(work.timings)
                if work.transient:  # storage failed, not the study: kept in ready/ and tried again
                    raise TransientError(work.reason)
                record.update(status=work.status, error=work.reason)
                if work.sr_path is not None:
                    built = {k: v for k, v in state.items() if k != "purged"}
                    self.spool.set_sr_state(
                        uid,
                        {
                            **built,
                            **sr_identity(work.sr_path),
                            "instances": covers,
                            "covered": self.spool.instance_uids(uid),
                            "revision": work.revision,
                        },
                    )
                    record.update(revision=work.revision)
        if record["status"] != "ok":
            self.spool.finish(uid, record["error"])
            self.metrics.failed.inc()
            log.error("study %s: failed: %s", uid, record["error"])
            self._outcome(uid, "failed", error=record["error"])
            self.processed.append(record)
            return record
        # Offered before it is sent: a later correction names every SR the destination may hold.
        state = self.spool.sr_state(uid)
        offer = {k: state[k] for k in ("sop", "series", "sop_class")}
        offered = [o for o in state.get("offered", []) if o.get("sop") != offer["sop"]] + [offer]
        self.spool.set_sr_state(uid, {**state, "offered": offered})
        seg = out / seg_filename(uid)  # the SR's maps go first: the SR references them
        files = [*([seg] if seg.exists() else []), sr]
        t = time.perf_counter()
        sent = self.sender.send_study(files, uid)
        self.metrics.delivery.observe(time.perf_counter() - t)
        self.metrics.attempts.labels(outcome="stored" if sent else "not_stored").inc()
        if sent:
            record["sent"] = True
            state = self.spool.sr_state(uid)
            delivered = list(dict.fromkeys([*state.get("delivered", []), state.get("sop")]))
            self.spool.set_sr_state(uid, {**state, "delivered": delivered, "delivered_at": time.time()})
            self.spool.finish(uid)
            with self.lock:
                completed = self.completed_at.get(uid)
            if completed is not None:
                self.metrics.latency.observe(max(0.0, time.time() - completed))
            self.metrics.reported.inc()
            self._outcome(uid, "reported", files=files, state=state)
        else:
            record["sent"] = False
            log.error("study %s: SR not delivered after %d attempts; retried later", uid, self.cfg.retries)
            self._outcome(uid, "not_delivered", files=files, state=state)
        self.processed.append(record)
        return record

    def _outcome(self, uid: str, outcome: str, error: str = "", files=(), state: dict | None = None) -> None:
        """The audit line of a study's outcome: who sent it, when it was complete, what was sent (UIDs)."""
        import pydicom

        sent: list[dict[str, Any]] = []
        for f in files:
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "Modality"])
                sent.append({"modality": str(ds.get("Modality", "")), "sop_instance_uid": str(ds.SOPInstanceUID)})
            except Exception:  # noqa: BLE001 - the audit names what it can read
                sent.append({"file": f.name, "unreadable": True})
        with self.lock:
            callers = sorted(self.callers.get(uid, ()))
            completed = self.completed_at.get(uid)
            if outcome in ("failed", "reported"):  # the study's last line until it is sent again
                self.callers.pop(uid, None)
                self.completed_at.pop(uid, None)
        self.audit.record(
            study_uid=uid,
            outcome=outcome,
            calling_ae=callers,  # empty for a study received before a restart
            completed=None if completed is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(completed)),
            destination=self.cfg.destination.describe(),
            sent=sent,
            revision=(state or {}).get("revision", 0),
            error=error,
        )

    def update_gauges(self) -> None:
        """The gauges a scrape reads: studies receiving, waiting (ready/), the queue and busy workers."""
        try:
            self.metrics.receiving.set(len(self.spool.studies("incoming")))
            self.metrics.waiting.set(len(self.spool.studies("ready")))
        except OSError:
            pass  # a spool that cannot be listed: /readyz says so
        self.metrics.queue_depth.set(self.queue.qsize())
        self.metrics.busy.set(self.busy)

    def _revision(self, uid: str, state: dict, sr: Path) -> dict:
        """The revision of the SR about to be built and the SRs it corrects: every one offered to the
        destination (a crash between its C-STORE and the record of delivery leaves it there unrecorded).
        An SR built earlier is kept under ``out/<study>/superseded/`` until the study is purged."""
        if not state and not sr.exists():
            return {}
        if sr.exists():
            kept = sr.parent / "superseded"
            kept.mkdir(exist_ok=True)
            shutil.copy2(sr, kept / f"{sr_identity(sr)['sop']}.dcm")
        return {"revision": int(state.get("revision", 0)) + 1, "predecessors": offered_references(uid, state)}

    def _purge_delivered(self) -> None:
        """Studies whose SR was delivered ``retain_delivered_s`` ago: instances and SR files deleted."""
        now = time.time()
        for uid in self.spool.studies("done"):
            at = self.spool.sr_state(uid).get("delivered_at")
            if at is None or now - float(at) < self.cfg.retain_delivered_s:
                continue
            busy_study = self._study_lock(uid)
            if not busy_study.acquire(blocking=False):
                continue
            try:
                if not self.spool.path("done", uid).is_dir():
                    continue  # re-opened meanwhile
                self.spool.purge(uid, now)
            finally:
                busy_study.release()
            log.info("study %s: SR delivered %.0f s ago; its instances and SR files deleted", uid, now - at)

    def _work(self):
        """A pipeline thread (``workers`` of them, each taking one queued study at a time; a study's lock keeps
        two from ever working on one study). Nothing a study does ends it; should it end anyway, ``broken``
        says why: the listener then refuses every instance (0xA700) and ``serve`` exits for its supervisor,
        so it never acknowledges what it will not process."""
        try:
            while not self.stop.is_set():
                try:
                    uid = self.queue.get(timeout=0.5)
                except queue.Empty:
                    continue
                with self.lock:
                    self.busy += 1
                try:
                    self._attempt(uid)
                except Exception as exc:  # noqa: BLE001 - the spool itself failed (storage): tried again later
                    log.error("study %s: its spool could not be updated (%s); tried again later", uid, describe(exc))
                    self._redeliver_later(uid)
                finally:
                    with self.lock:
                        self.busy -= 1
        except BaseException as exc:
            self.broken = f"the pipeline thread ended ({type(exc).__name__})"
            log.critical("%s: no more instances are accepted", self.broken)
            raise

    def _attempt(self, uid: str) -> None:
        """Process one queued study. The attempt is recorded *before* processing, so a study that kills the
        process (out of memory, a crashing decoder) is counted too and goes to ``failed/`` after
        ``max_attempts`` instead of being re-queued by every restart; a storage failure is not the
        study's: it is tried again without counting."""
        with self._study_lock(uid):
            if not self.spool.path("ready", uid).is_dir():
                return  # queued twice (a retry and a re-opening): already processed
            n = self.spool.attempts(uid, add=1)
            if n > self.cfg.max_attempts:
                self._give_up(uid, f"processing did not finish in {n - 1} attempts (the process died or it raised)")
                return
            try:
                record = self.process(uid)
            except TransientError as exc:
                self.spool.attempts(uid, reset=True)
                log.error("study %s: %s; kept, tried again later", uid, exc)
                self._redeliver_later(uid)
                return
            except Exception as exc:  # noqa: BLE001 - never let one study end the service
                reason = f"unexpected {describe(exc)} while processing (attempt {n} of {self.cfg.max_attempts})"
                log.error("study %s: %s", uid, reason)
                if n >= self.cfg.max_attempts:
                    self._give_up(uid, reason)
                else:
                    self._redeliver_later(uid)
                return
            self.spool.attempts(uid, reset=True)
        if record["status"] == "ok" and not record.get("sent"):
            self._redeliver_later(uid)

    def _give_up(self, uid: str, reason: str) -> None:
        log.error("study %s: %s; moved to failed/", uid, reason)
        self.spool.finish(uid, reason)
        self.metrics.failed.inc()
        self._outcome(uid, "failed", error=reason)
        self.processed.append({"study_uid": uid, "status": "failed", "error": reason})

    def _redeliver_later(self, uid: str) -> None:
        """Queue the study again after a growing delay, for as long as the listener runs."""
        delay = min(
            self.cfg.redeliver_max_s, self.cfg.backoff_s * 2 ** (self.cfg.retries + self.retry_round.get(uid, 0))
        )
        self.retry_round[uid] = self.retry_round.get(uid, 0) + 1
        log.info("study %s: queued again in %.0f s", uid, delay)
        timer = threading.Timer(delay, lambda: None if self.stop.is_set() else self.queue.put(uid))
        timer.daemon = True
        timer.start()

    def recover(self) -> None:
        """Pick up what a previous run left: ready studies are queued, incoming ones get a fresh timer."""
        for uid in self.spool.studies("ready"):
            log.info("study %s: resuming from the spool", uid)
            self.queue.put(uid)
        now = time.monotonic()
        for uid in self.spool.studies("incoming"):
            self.spool.drop_unacknowledged(uid)
            with self.lock:
                self.last_seen[uid] = now

    # -- service -------------------------------------------------------------------------------
    def start(self):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            CTImageStorage,
            EnhancedCTImageStorage,
            Verification,
        )

        ae = AE(ae_title=self.cfg.ae_title)
        # What the series reader decodes: CT images (one frame each) and Enhanced CT images (multi-frame),
        # uncompressed, losslessly compressed or JPEG 2000 (pydicom with the pylibjpeg plugins); anything
        # else is refused at negotiation instead of being acknowledged and failing later.
        ae.add_supported_context(CTImageStorage, list(ACCEPTED_TRANSFER_SYNTAXES))
        ae.add_supported_context(EnhancedCTImageStorage, list(ACCEPTED_TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)
        ae.require_calling_aet = [p.ae_title for p in self.cfg.allowed]
        ae.maximum_associations = self.cfg.max_associations
        ae.acse_timeout = self.cfg.acse_timeout_s  # a socket that never asks to associate frees its slot
        ae.network_timeout = self.cfg.network_timeout_s
        handlers = [
            (evt.EVT_CONN_OPEN, self.on_conn_open),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_DATA_RECV, self.on_data),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_RELEASED, self.on_closed),
            (evt.EVT_ABORTED, self.on_closed),
        ]
        self.recover()
        # The threads run before the port accepts, and the list is published only once they all run: /healthz
        # (every listed thread alive) and /readyz (server accepting) never see a half-started listener.
        threads = [threading.Thread(target=self._watch, daemon=True, name="completion")] + [
            threading.Thread(target=self._work, daemon=True, name=f"pipeline-{i + 1}") for i in range(self.cfg.workers)
        ]
        for t in threads:
            t.start()
        self.threads = threads
        try:
            self.server = ae.start_server(
                (self.cfg.bind, self.cfg.port),
                block=False,
                evt_handlers=handlers,
                ssl_context=self.cfg.tls.server_context() if self.cfg.tls else None,
            )
        except BaseException:
            self.shutdown()
            raise
        log.info(
            "listening as %s on %s:%d%s; allowed callers: %s; SRs to %s; %d worker(s)",
            self.cfg.ae_title,
            self.cfg.bind,
            self.cfg.port,
            " (TLS)" if self.cfg.tls else "",
            ", ".join(p.ae_title for p in self.cfg.allowed),
            self.cfg.destination.describe(),
            self.cfg.workers,
        )

    def shutdown(self):
        self.stop.set()
        if self.server is not None:
            self.server.shutdown()
        for t in getattr(self, "threads", []):
            t.join(timeout=10)


def serve(config: str | Path) -> int:
    """Run the listener until SIGINT/SIGTERM (0) or until its pipeline ends (1). With ``health`` configured,
    ``/readyz`` answers from before the model loads (not ready) until the end."""
    cfg = ListenerConfig.load(config)
    use_log_format(cfg.log_format)
    metrics = Metrics()
    readiness = Readiness(cfg, metrics)
    health = HealthServer(cfg, readiness) if cfg.health is not None else None
    if health is not None:
        health.start()
    try:
        try:
            listener = Listener(cfg, metrics)
        except Exception as exc:
            readiness.loading_error = f"the model could not be loaded ({type(exc).__name__})"
            raise
        readiness.listener = listener
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        listener.start()
        while not done.wait(1.0) and listener.broken is None:
            pass
        log.info("stopping%s", f": {listener.broken}" if listener.broken else "")
        listener.shutdown()
        (Path(cfg.spool) / "last_run.json").write_text(json.dumps(listener.processed, indent=1))
        return 1 if listener.broken else 0
    finally:
        if health is not None:
            health.stop()
