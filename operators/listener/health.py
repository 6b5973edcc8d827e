"""What an operations team watches: ``/healthz``, ``/readyz`` and Prometheus ``/metrics`` over HTTP, JSON
logs, and an audit record per study.

- ``/healthz``: 200 while the process serves (its completion and pipeline threads alive), 503 once the
  pipeline thread ended (``serve`` then exits for its supervisor).
- ``/readyz``: 200 when the model is loaded, the listener accepts associations, the spool is writable
  and the destination answers (C-ECHO, or an HTTP answer from the DICOMweb endpoint that is not a refusal
  of the credentials; checked at most every ``READY_CACHE_S``); 503 otherwise, with each check in the
  JSON body. While the model loads, 503 with ``model: loading``.
- ``/metrics``: counters of instances and studies received, studies reported, failed and waiting, the
  queue depth, per-stage seconds, SR delivery attempts and latency, with the model's name and version
  (``ctzs_model_info``). Counts, never UIDs: nothing in the metrics identifies a patient or a study.
- Audit: one JSON line per study outcome in ``SPOOL/audit.jsonl`` (calling AE titles, times, SR and SEG
  UIDs, outcome), appended and fsynced.

The HTTP server is the standard library's (``http.server``): three read-only routes, no framework needed;
the metrics are ``prometheus_client``'s, in the listener's own registry.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .config import DimseDestination, ListenerConfig, WebDestination

if TYPE_CHECKING:
    from .service import Listener

log = logging.getLogger("ct-zeroshot.listener")

READY_CACHE_S = 10.0  # the destination is asked at most this often (a scrape every second costs no C-ECHO)
_STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """The listener's Prometheus metrics, in a registry of its own (two listeners in one process, as in the
    tests, do not share counters)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.instances = Counter("ctzs_instances_received", "Instances received and spooled (acknowledged)", registry=r)
        self.refused = Counter("ctzs_instances_refused", "C-STOREs refused, by reason", ["reason"], registry=r)
        self.studies_received = Counter(
            "ctzs_studies_received", "Studies complete and queued (a re-opened study counts again)", registry=r
        )
        self.reported = Counter("ctzs_studies_reported", "Studies whose SR the destination stored", registry=r)
        self.failed = Counter("ctzs_studies_failed", "Studies moved to failed/", registry=r)
        self.waiting = Gauge(
            "ctzs_studies_waiting", "Studies in ready/: queued, processing or awaiting redelivery", registry=r
        )
        self.receiving = Gauge("ctzs_studies_receiving", "Studies in incoming/ (not yet complete)", registry=r)
        self.queue_depth = Gauge("ctzs_queue_depth", "Studies queued for a worker now", registry=r)
        self.busy = Gauge("ctzs_workers_busy", "Workers processing a study now", registry=r)
        self.stage = Histogram(
            "ctzs_stage_seconds", "Seconds per pipeline stage", ["stage"], buckets=_STAGE_BUCKETS, registry=r
        )
        self.attempts = Counter(
            "ctzs_sr_delivery_attempts", "Deliveries of a study's SR (and SEG), by outcome", ["outcome"], registry=r
        )
        self.delivery = Histogram(
            "ctzs_sr_delivery_seconds",
            "Seconds one delivery took (all its retries)",
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "ctzs_study_latency_seconds",
            "Seconds from a study's completion to its SR stored at the destination",
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.model = Gauge("ctzs_model_info", "The model package served", ["name", "version"], registry=r)
        self.ready = Gauge("ctzs_ready", "1 when /readyz is ready", registry=r)

    def observe_stages(self, timings: dict[str, float]) -> None:
        for key, seconds in timings.items():
            self.stage.labels(stage=key.removesuffix("_s")).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def spool_writable(spool: str | Path) -> tuple[bool, str]:
    """Whether a file can be created (and removed) in the spool, or in the folder that would hold it."""
    folder = Path(spool)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        fd, name = tempfile.mkstemp(prefix=".ready-", dir=folder)
        os.close(fd)
        os.unlink(name)
        return True, f"{folder} writable"
    except OSError as exc:
        return False, f"{folder} not writable ({exc.strerror or type(exc).__name__})"


def destination_answers(cfg: ListenerConfig, timeout_s: float = 10.0) -> tuple[bool, str]:
    """C-ECHO to a DIMSE destination; for DICOMweb, an HTTP request to its base URL that gets an answer
    other than a server error or a refusal of the credentials."""
    dest = cfg.destination
    if isinstance(dest, DimseDestination):
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        from .sender import associate, not_established

        try:
            assoc = associate(cfg, dest, Verification, timeout_s=timeout_s, dimse_timeout_s=timeout_s)
        except Exception as exc:  # noqa: BLE001 - a TLS handshake failure raises from associate
            return False, f"{dest.describe()}: no association ({type(exc).__name__})"
        if not assoc.is_established:
            return False, not_established(dest, assoc)
        status = assoc.send_c_echo()
        assoc.release()
        code = getattr(status, "Status", None)
        return (code == 0, f"{dest.describe()}: C-ECHO " + ("success" if code == 0 else f"status {code}"))
    assert isinstance(dest, WebDestination)
    import requests

    from ..dicomweb import Endpoint

    endpoint = Endpoint(**dest.endpoint())
    try:
        session = endpoint.session()
        answer = session.get(f"{dest.url.rstrip('/')}/studies", params={"limit": "1"}, timeout=timeout_s)
    except (requests.RequestException, OSError, ValueError) as exc:
        return False, f"{dest.describe()}: no answer ({type(exc).__name__})"
    ok = answer.status_code < 500 and answer.status_code not in (401, 403)
    return ok, f"{dest.describe()}: HTTP {answer.status_code}"


class Readiness:
    """The answers of ``/healthz`` and ``/readyz``; the listener is attached once its model is loaded."""

    def __init__(self, cfg: ListenerConfig, metrics: Metrics):
        self.cfg, self.metrics = cfg, metrics
        self.listener: Listener | None = None
        self.loading_error: str | None = None
        self._destination: tuple[float, bool, str] | None = None
        self._lock = threading.Lock()

    def alive(self) -> tuple[bool, dict[str, Any]]:
        lst = self.listener
        if self.loading_error:
            return False, {"error": self.loading_error}
        if lst is not None and lst.broken:
            return False, {"error": lst.broken}
        threads = [] if lst is None else [t for t in getattr(lst, "threads", []) if not t.is_alive()]
        if threads:
            return False, {"error": f"thread(s) ended: {', '.join(t.name for t in threads)}"}
        return True, {"status": "alive"}

    def _destination_check(self) -> tuple[bool, str]:
        with self._lock:
            now = time.monotonic()
            if self._destination is None or now - self._destination[0] >= READY_CACHE_S:
                ok, why = destination_answers(self.cfg, timeout_s=5.0)
                self._destination = (now, ok, why)
            return self._destination[1], self._destination[2]

    def ready(self) -> tuple[bool, dict[str, Any]]:
        lst = self.listener
        checks: dict[str, Any] = {}
        if lst is None:
            checks["model"] = {"ok": False, "detail": self.loading_error or "loading"}
        else:
            package = lst.model.package
            checks["model"] = {"ok": True, "detail": f"{package.name} {package.version}"}
            listening = lst.server is not None and lst.broken is None
            checks["listening"] = {"ok": listening, "detail": lst.broken or ("accepting" if listening else "starting")}
        ok, why = spool_writable(self.cfg.spool)
        checks["spool"] = {"ok": ok, "detail": why}
        ok, why = self._destination_check()
        checks["destination"] = {"ok": ok, "detail": why}
        ready = all(c["ok"] for c in checks.values())
        self.metrics.ready.set(1 if ready else 0)
        return ready, {"ready": ready, "checks": checks}


class HealthServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` on the configured address, in a daemon thread."""

    def __init__(self, cfg: ListenerConfig, readiness: Readiness):
        assert cfg.health is not None
        readiness_ = readiness

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    if readiness_.listener is not None:
                        readiness_.listener.update_gauges()
                    self._answer(200, readiness_.metrics.render(), CONTENT_TYPE_LATEST)
                    return
                if path in ("/healthz", "/readyz"):
                    ok, body = readiness_.alive() if path == "/healthz" else readiness_.ready()
                    self._answer(200 if ok else 503, json.dumps(body).encode(), "application/json")
                    return
                self._answer(404, b'{"error": "not found: /healthz, /readyz, /metrics"}', "application/json")

            def _answer(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # probes every few seconds: not worth a log line each
                pass

        self.httpd = ThreadingHTTPServer((cfg.health.bind, cfg.health.port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="health")

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> None:
        self.thread.start()
        log.info("health and metrics on http://%s:%d/ (/healthz, /readyz, /metrics)", *self.httpd.server_address[:2])

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message (and the exception's type and
    text when there is one). Written here: the stdlib ``logging`` needs only this one small class."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def use_log_format(kind: str) -> None:
    """``log_format`` of the config: ``json`` swaps the root handlers' formatter; ``text`` leaves them."""
    if kind == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())


class Audit:
    """``SPOOL/audit.jsonl``: one line per study outcome, appended and fsynced (one writer at a time)."""

    def __init__(self, spool: str | Path):
        self.path = Path(spool) / "audit.jsonl"
        self._lock = threading.Lock()

    def record(self, **fields: Any) -> None:
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}) + "\n"
        with self._lock:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(line)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:  # the audit must not stop the service; the failure is logged
                log.error("audit record not written to %s (%s)", self.path, exc.strerror or type(exc).__name__)
