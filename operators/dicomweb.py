"""DICOMweb out: a study's SEG and SR stored with STOW-RS (``dicomweb-client``) to a configured endpoint.

A ``StowTarget`` is the endpoint (its base URL, e.g. Orthanc's ``http://pacs:8042/dicom-web``), its
authentication (``basic``: ``user:password``; ``bearer``: a token), read from a file or an environment
variable so that no secret sits on a command line or in a config, the CA bundle that verifies its TLS
certificate, and retries with a doubling back-off. ``store`` sends a study's files in one request, the SEG
before the SR that references it, and raises ``StowError`` naming the study and the endpoint's answer
(never the files' header values) once the retries are spent.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger("ct-zeroshot")

AUTH_KINDS = ("none", "basic", "bearer")


class StowError(RuntimeError):
    """The endpoint did not store a study's files."""


@dataclass(frozen=True)
class StowTarget:
    url: str
    auth: str = "none"  # none, basic (user:password) or bearer (a token)
    credentials: str | None = None  # a file holding them, or env:VARIABLE
    ca_bundle: str | None = None  # PEM file of the CAs that sign the endpoint's certificate (https)
    retries: int = 3
    backoff_s: float = 1.0
    timeout_s: float = 60.0

    def __post_init__(self):
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"STOW-RS endpoint {self.url!r}: expected an http(s) URL such as https://pacs/dicom-web")
        if self.auth not in AUTH_KINDS:
            raise ValueError(f"STOW-RS auth {self.auth!r}: expected one of {', '.join(AUTH_KINDS)}")
        if self.auth != "none" and not self.credentials:
            raise ValueError(f"STOW-RS auth {self.auth}: name the credentials (a file, or env:VARIABLE)")
        if self.ca_bundle is not None and not Path(self.ca_bundle).is_file():
            raise FileNotFoundError(f"{self.ca_bundle}: STOW-RS CA bundle not found")
        if self.retries < 1 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise ValueError("STOW-RS retries must be >= 1, backoff_s >= 0 and timeout_s > 0")
        self.secret()  # a missing file or variable is an error now, not at the first study

    def secret(self) -> str | None:
        """The credentials, from their file (first line) or environment variable."""
        if self.auth == "none" or not self.credentials:
            return None
        if self.credentials.startswith("env:"):
            name = self.credentials[4:]
            value = os.environ.get(name)
            if not value:
                raise ValueError(f"STOW-RS credentials: environment variable {name} is not set")
            return value.strip()
        path = Path(self.credentials)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: STOW-RS credentials file not found")
        text = path.read_text().strip()
        value = text.splitlines()[0].strip() if text else ""
        if not value:
            raise ValueError(f"{path}: STOW-RS credentials file is empty")
        if self.auth == "basic" and ":" not in value:
            raise ValueError(f"{path}: basic credentials must read user:password")
        return value

    def client(self):
        import requests
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        secret = self.secret()
        if self.auth == "basic" and secret:
            user, _, password = secret.partition(":")
            session.auth = (user, password)
        elif self.auth == "bearer" and secret:
            session.headers["Authorization"] = f"Bearer {secret}"
        if self.ca_bundle:
            session.verify = self.ca_bundle
        return DICOMwebClient(self.url.rstrip("/"), session=session, timeout=self.timeout_s)

    def store(self, files: Sequence[Path], study_uid: str) -> None:
        """Store ``files`` (in order: a SEG before the SR referencing it) in one STOW-RS request."""
        import pydicom

        datasets = [pydicom.dcmread(p) for p in files]
        delay, last = self.backoff_s, ""
        for attempt in range(1, self.retries + 1):
            try:
                answer = self.client().store_instances(datasets, study_instance_uid=study_uid)
                failed = answer.get("FailedSOPSequence", [])
                if not failed:
                    log.info(
                        "study %s: %d instance(s) stored at %s (attempt %d)", study_uid, len(files), self.url, attempt
                    )
                    return
                reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
                last = f"{len(failed)} instance(s) refused (failure reason {', '.join(reasons)})"
            except Exception as exc:  # noqa: BLE001 - HTTP errors, refused connections, TLS: retried
                status = getattr(getattr(exc, "response", None), "status_code", None)
                last = f"HTTP {status}" if status else type(exc).__name__
                if status in (400, 401, 403, 409, 413, 415):  # the request itself is wrong: no retry helps
                    break
            log.warning(
                "study %s: STOW-RS to %s failed (%s), attempt %d of %d",
                study_uid,
                self.url,
                last,
                attempt,
                self.retries,
            )
            if attempt < self.retries:
                time.sleep(delay)
                delay *= 2
        raise StowError(f"study {study_uid}: not stored at {self.url} ({last})")
