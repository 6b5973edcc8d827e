"""DICOMweb (``dicomweb-client``): a study's SEG and SR stored with STOW-RS, and studies pulled for batch
inference with QIDO-RS (which studies) and WADO-RS (their instances).

An ``Endpoint`` is a DICOMweb service: its base URL (e.g. Orthanc's ``http://pacs:8042/dicom-web``), its
authentication (``basic``: ``user:password``; ``bearer``: a token), read from a file or an environment
variable so that no secret sits on a command line or in a config (and read again at each request, so a
rotated secret is used without a restart), and the CA bundle that verifies its TLS certificate.

A ``StowTarget`` adds retries with a doubling back-off. ``store`` sends a study's files in one request,
the SEG before the SR that references it, and raises ``StowError`` naming the study and the endpoint's
answer (never the files' header values) once the retries are spent.

``retrieve_studies`` (QIDO-RS, then WADO-RS per study) writes each study's instances into a folder of
its own, atomically: a study's folder exists only once all its instances are in it, so an interrupted
retrieval is never mistaken for a whole study and a later run retrieves only what it lacks.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger("ct-zeroshot")

AUTH_KINDS = ("none", "basic", "bearer")
# No retry helps a request the endpoint calls wrong: bad request, unauthorised, forbidden, conflict, too
# large, unsupported media type.
NOT_RETRIED = (400, 401, 403, 409, 413, 415)


class StowError(RuntimeError):
    """The endpoint did not store a study's files."""


class RetrieveError(RuntimeError):
    """The endpoint did not answer a query or a study's retrieval."""


def http_reason(exc: Exception) -> tuple[str, int | None]:
    """An exception of a DICOMweb call as a short reason (its HTTP status, else its type) and the status."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return (f"HTTP {status}" if status else type(exc).__name__), status


@dataclass(frozen=True)
class Endpoint:
    url: str
    auth: str = "none"  # none, basic (user:password) or bearer (a token)
    credentials: str | None = None  # a file holding them, or env:VARIABLE
    ca_bundle: str | None = None  # PEM file of the CAs that sign the endpoint's certificate (https)
    timeout_s: float = 60.0
    retries: int = 3  # attempts per request, with a doubling back-off from backoff_s
    backoff_s: float = 1.0

    def __post_init__(self):
        parts = urlsplit(str(self.url))
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"DICOMweb endpoint {self.url!r}: expected an http(s) URL such as https://pacs/dicom-web")
        if self.auth not in AUTH_KINDS:
            raise ValueError(f"DICOMweb auth {self.auth!r}: expected one of {', '.join(AUTH_KINDS)}")
        if self.auth != "none" and not self.credentials:
            raise ValueError(f"DICOMweb auth {self.auth}: name the credentials (a file, or env:VARIABLE)")
        if self.ca_bundle is not None and not Path(self.ca_bundle).is_file():
            raise FileNotFoundError(f"{self.ca_bundle}: DICOMweb CA bundle not found")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or self.timeout_s <= 0:
            raise ValueError(f"DICOMweb timeout_s must be a number > 0, got {self.timeout_s!r}")
        if self.retries < 1 or self.backoff_s < 0:
            raise ValueError("DICOMweb retries must be >= 1 and backoff_s >= 0")
        self.secret()  # a missing file or variable is an error now, not at the first study

    def secret(self) -> str | None:
        """The credentials, from their file (first line) or environment variable."""
        if self.auth == "none" or not self.credentials:
            return None
        if self.credentials.startswith("env:"):
            name = self.credentials[4:]
            value = os.environ.get(name)
            if not value:
                raise ValueError(f"DICOMweb credentials: environment variable {name} is not set")
            return value.strip()
        path = Path(self.credentials)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: DICOMweb credentials file not found")
        text = path.read_text().strip()
        value = text.splitlines()[0].strip() if text else ""
        if not value:
            raise ValueError(f"{path}: DICOMweb credentials file is empty")
        if self.auth == "basic" and ":" not in value:
            raise ValueError(f"{path}: basic credentials must read user:password")
        return value

    def client(self):
        from dicomweb_client.api import DICOMwebClient

        return DICOMwebClient(self.url.rstrip("/"), session=self.session(), timeout=self.timeout_s)

    def session(self):
        """A ``requests`` session with the endpoint's credentials (read now) and CA bundle."""
        import requests

        session = requests.Session()
        secret = self.secret()
        if self.auth == "basic" and secret:
            user, _, password = secret.partition(":")
            session.auth = (user, password)
        elif self.auth == "bearer" and secret:
            session.headers["Authorization"] = f"Bearer {secret}"
        if self.ca_bundle:
            session.verify = self.ca_bundle
        return session

    def _retrying(self, what: str, fn, error, stop: threading.Event | None = None):
        """``fn(client)``, tried ``retries`` times with a doubling back-off; ``error(reason)`` is raised once
        they are spent, or at once for credentials that cannot be read or a request the endpoint calls wrong
        (``NOT_RETRIED``). ``stop`` (set: the caller is shutting down) ends the back-off early, as a failure.
        The secret is read at each attempt: a rotated one is used."""
        delay, last = self.backoff_s, ""
        for attempt in range(1, self.retries + 1):
            try:
                client = self.client()
            except (OSError, ValueError) as exc:
                raise error(str(exc)) from None
            try:
                return fn(client)
            except _Refused as exc:  # an answer that is a failure (instances not stored): retried
                last = str(exc)
            except Exception as exc:  # noqa: BLE001 - HTTP errors, refused connections, TLS: retried
                last, status = http_reason(exc)
                if status in NOT_RETRIED:
                    break
            log.warning("%s failed (%s), attempt %d of %d", what, last, attempt, self.retries)
            if attempt < self.retries:
                if _wait(delay, stop):
                    break
                delay *= 2
        raise error(last)


class _Refused(Exception):
    """An endpoint's answer that reports a failure (raised inside ``Endpoint._retrying``)."""


@dataclass(frozen=True)
class StowTarget(Endpoint):
    def store(self, files: Sequence[Path], study_uid: str, stop: threading.Event | None = None) -> None:
        """Store ``files`` (in order: a SEG before the SR referencing it) in one STOW-RS request; ``StowError``
        when the endpoint did not (``stop``: see ``Endpoint._retrying``)."""
        import pydicom

        datasets = [pydicom.dcmread(p) for p in files]

        def store(client):
            answer = client.store_instances(datasets, study_instance_uid=study_uid)
            failed = answer.get("FailedSOPSequence", [])
            if failed:
                reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
                raise _Refused(f"{len(failed)} instance(s) refused (failure reason {', '.join(reasons)})")

        self._retrying(
            f"study {study_uid}: STOW-RS to {self.url}",
            store,
            lambda why: StowError(f"study {study_uid}: not stored at {self.url} ({why})"),
            stop,
        )
        log.info("study %s: %d instance(s) stored at %s", study_uid, len(files), self.url)


def _wait(seconds: float, stop: threading.Event | None) -> bool:
    """Sleep ``seconds``; True when ``stop`` was set meanwhile (the caller gives up)."""
    if stop is None:
        time.sleep(seconds)
        return False
    return stop.wait(seconds)


UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
QIDO_PAGE = 500  # studies per QIDO-RS page
DATES = re.compile(r"^(\d{8})?-?(\d{8})?$")


def valid_uid(value) -> bool:
    """A DICOM UID (PS3.5 9.1): digits and dots, no leading zeros, at most 64 characters. Values from a
    server become folder and file names, so nothing else is accepted."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(UID.match(value))


@dataclass(frozen=True)
class StudyQuery:
    """Which studies a QIDO-RS search selects: by modality in study, a StudyDate range (``YYYYMMDD-YYYYMMDD``,
    either end open), and, when given, only these Study Instance UIDs."""

    modality: str = "CT"
    dates: str | None = None
    study_uids: tuple[str, ...] = ()

    def __post_init__(self):
        if not re.fullmatch(r"[A-Z]{2,16}", self.modality or ""):
            raise ValueError(f"QIDO-RS modality {self.modality!r}: expected a DICOM modality such as CT")
        if self.dates is not None and (not self.dates.strip("-") or not DATES.match(self.dates)):
            raise ValueError(f"QIDO-RS dates {self.dates!r}: expected YYYYMMDD-YYYYMMDD (either end may be left out)")
        for uid in self.study_uids:
            if not valid_uid(uid):
                raise ValueError(f"QIDO-RS study UID {uid!r}: not a DICOM UID")

    def filters(self) -> list[dict[str, str]]:
        """One QIDO-RS search's filters per study UID (one search when none is given)."""
        base = {"ModalitiesInStudy": self.modality, **({"StudyDate": self.dates} if self.dates else {})}
        return [{**base, "StudyInstanceUID": uid} for uid in self.study_uids] or [base]


def _values(item: dict, tag: str) -> list:
    return list((item.get(tag) or {}).get("Value") or [])


@dataclass(frozen=True)
class Source(Endpoint):
    """An archive batch inference pulls studies from: QIDO-RS to find them, WADO-RS to retrieve them."""

    def _call(self, what: str, fn):
        """``fn(client)`` with retries; ``RetrieveError`` naming ``what`` and the last answer."""
        return self._retrying(f"{what} at {self.url}", fn, lambda why: RetrieveError(f"{what} at {self.url}: {why}"))

    def studies(self, query: StudyQuery) -> list[str]:
        """The Study Instance UIDs the query selects, sorted; a value that is not a UID is logged and left out.
        Pages of ``QIDO_PAGE`` results, until a page is short or brings nothing new (a server that ignores
        ``offset`` would otherwise answer the first page for ever)."""
        found: set[str] = set()
        for filters in query.filters():
            offset = 0
            while True:
                page = self._call(
                    "QIDO-RS search",
                    lambda c, f=filters, o=offset: c.search_for_studies(
                        search_filters=f, fields=["StudyInstanceUID"], limit=QIDO_PAGE, offset=o
                    ),
                )
                page = page if isinstance(page, list) else []
                before = len(found)
                for item in page:
                    for uid in _values(item, "0020000D")[:1]:
                        if valid_uid(uid):
                            found.add(uid)
                        else:
                            log.warning("QIDO-RS at %s answered a study UID that is not one; left out", self.url)
                if len(page) < QIDO_PAGE or len(found) == before:
                    break
                offset += len(page)
        return sorted(found)

    def retrieve(self, study_uid: str, modality: str, dest: Path) -> int:
        """WADO-RS of the study's series of ``modality`` into ``dest/<study>/`` (atomically); the number of
        instances. Every instance must belong to the study and series it was asked for."""
        import pydicom

        final = dest / study_uid
        work = dest / f".{study_uid}.partial"
        shutil.rmtree(work, ignore_errors=True)  # an interrupted earlier retrieval
        series = self._call(
            f"study {study_uid}: QIDO-RS series search",
            lambda c: c.search_for_series(study_uid, search_filters={"Modality": modality}),
        )
        series_uids = sorted({u for item in series for u in _values(item, "0020000E")[:1] if valid_uid(u)})
        if not series_uids:
            raise RetrieveError(f"study {study_uid}: no {modality} series at {self.url}")
        count = 0
        for series_uid in series_uids:

            def fetch(c, s=series_uid):
                return list(c.iter_series(study_uid, s))

            for ds in self._call(f"study {study_uid}: WADO-RS", fetch):
                sop = str(ds.get("SOPInstanceUID", ""))
                if (
                    str(ds.get("StudyInstanceUID", "")) != study_uid
                    or str(ds.get("SeriesInstanceUID", "")) != series_uid
                ):
                    raise RetrieveError(f"study {study_uid}: WADO-RS at {self.url} sent an instance of another series")
                if not valid_uid(sop):
                    raise RetrieveError(
                        f"study {study_uid}: WADO-RS at {self.url} sent an instance without a valid UID"
                    )
                (work / series_uid).mkdir(parents=True, exist_ok=True)
                if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
                    raise RetrieveError(
                        f"study {study_uid}: WADO-RS at {self.url} sent an instance without its file meta"
                    )
                pydicom.dcmwrite(work / series_uid / f"{sop}.dcm", ds, enforce_file_format=True)
                count += 1
        os.replace(work, final)
        return count


def retrieve_studies(source: Source, query: StudyQuery, dest: Path, progress: bool = True) -> dict[str, str]:
    """Pull the studies ``query`` selects into ``dest/<study>/``; one already there is not pulled again.
    Returns {study UID: why it was not retrieved} for those that failed (the rest of the batch goes on)."""
    from tqdm import tqdm

    dest.mkdir(parents=True, exist_ok=True)
    try:
        uids = source.studies(query)
    except RetrieveError as exc:
        raise RetrieveError(f"cannot list the studies to pull: {exc}") from None
    todo = [u for u in uids if not (dest / u).is_dir()]
    log.info(
        "%d studies at %s match; %d to retrieve, %d retrieved before",
        len(uids),
        source.url,
        len(todo),
        len(uids) - len(todo),
    )
    failed: dict[str, str] = {}
    for uid in tqdm(todo, unit="study", desc="retrieve", disable=not progress):
        try:
            n = source.retrieve(uid, query.modality, dest)
            log.info("study %s: %d instance(s) retrieved", uid, n)
        except (RetrieveError, OSError) as exc:
            shutil.rmtree(dest / f".{uid}.partial", ignore_errors=True)
            reason = (
                str(exc) if isinstance(exc, RetrieveError) else f"study {uid}: cannot write it ({type(exc).__name__})"
            )
            log.error("%s", reason)
            failed[uid] = f"not retrieved: {reason}"
    return failed
