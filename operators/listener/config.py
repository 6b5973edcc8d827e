"""The listener's configuration file (YAML): who may send, where SRs go, the spool, the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class Peer:
    ae_title: str
    host: str | None = None
    port: int | None = None

    def describe(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass
class WebDestination:
    """SRs (and their SEGs) stored with STOW-RS at a DICOMweb endpoint instead of C-STOREd
    (``operators.dicomweb``): its base URL, ``auth`` none/basic/bearer with ``credentials`` read from a file
    or ``env:VARIABLE`` at each delivery, and ``ca_bundle`` for an https endpoint's certificate."""

    url: str
    auth: str = "none"
    credentials: str | None = None
    ca_bundle: str | None = None
    timeout_s: float = 60.0

    def describe(self) -> str:
        return f"STOW-RS {self.url}"


def parse_destination(value) -> Peer | WebDestination:
    """``destination``: ``kind: dimse`` (the default; ae_title, host, port) or ``kind: dicomweb`` (url, ...)."""
    if not isinstance(value, dict):
        raise ValueError(f"destination must be a mapping, got {value!r}")
    fields = dict(value)
    kind = fields.pop("kind", "dimse")
    if kind == "dimse":
        return Peer(**fields)
    if kind == "dicomweb":
        return WebDestination(**fields)
    raise ValueError(f"destination.kind must be dimse or dicomweb, got {kind!r}")


@dataclass
class TLS:
    """DICOM over TLS for both directions (DICOM PS3.15 B.1, the secure transport connection profile).

    The listener presents ``cert``/``key`` to senders and, with ``require_client_cert``, accepts only
    senders whose certificate ``ca`` signed; SRs go to the destination over TLS, presenting the same
    certificate and verifying the destination's against ``ca`` (and its host name, unless
    ``check_hostname`` is false, e.g. for a PACS addressed by IP whose certificate names only a host)."""

    cert: str
    key: str
    ca: str
    require_client_cert: bool = True
    check_hostname: bool = True

    def check(self, where: str) -> None:
        for name in ("cert", "key", "ca"):
            if not Path(getattr(self, name)).is_file():
                raise ValueError(f"{where}: tls.{name} {getattr(self, name)!r} is not a readable file")

    def server_context(self):
        import ssl

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=self.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        ctx.verify_mode = ssl.CERT_REQUIRED if self.require_client_cert else ssl.CERT_OPTIONAL
        return ctx

    def client_context(self):
        import ssl

        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = self.check_hostname
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


@dataclass
class ListenerConfig:
    ae_title: str = "CTZEROSHOT"
    bind: str = "127.0.0.1"
    port: int = 11112
    allowed: list[Peer] = field(default_factory=list)
    destination: Peer | WebDestination | None = None  # where SRs go: C-STORE (Peer) or STOW-RS
    spool: str = "spool"
    model: str | None = None
    idle_timeout_s: float = 10.0
    retries: int = 5
    backoff_s: float = 2.0
    log_patient_identifiers: bool = False
    max_instance_mb: float = 512.0  # an instance passing this while received: its association is aborted
    min_free_mb: float = 1024.0  # an instance that would leave the spool's disk less free space is refused (0xA700)
    max_associations: int = 16  # associations at a time (idle sockets included, until acse_timeout_s)
    acse_timeout_s: float = 5.0  # a connection that sends no association request within this is closed
    network_timeout_s: float = 60.0  # an association silent this long is aborted
    max_attempts: int = 3  # a study whose processing starts this many times without finishing (it raised, or
    # the process died: out of memory, a crashing decoder) goes to failed/
    redeliver_max_s: float = 600.0  # undelivered SRs are retried while running, backoff capped here
    # A delivered study's instances stay this long in done/, so late instances re-open it with all of
    # them; then they and its SR files are deleted (out/<study>/sr.json, UIDs only, remains).
    retain_delivered_s: float = 3600.0
    tls: TLS | None = None  # DICOM over TLS for receiving and sending; plain TCP without it
    findings: str | None = None  # a site's findings file (operators.contract.custom_findings), scored with the model's
    findings_mode: str = "add"  # add: after the model's own findings; replace: instead of them
    maps: bool = False  # the present findings' localisation maps as a DICOM SEG, sent before each SR

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
            tls = data.pop("tls", None)
            cfg = cls(
                **data,
                allowed=allowed,
                destination=parse_destination(dest) if dest is not None else None,
                tls=TLS(**tls) if tls else None,
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from exc
        if not cfg.allowed:
            raise ValueError(f"{path}: 'allowed' must list at least one calling AE title")
        if isinstance(cfg.destination, WebDestination):
            from ..dicomweb import StowTarget

            try:  # the URL, the auth kind, the credentials and the CA bundle, checked now
                StowTarget(**vars(cfg.destination))
            except (ValueError, OSError) as exc:
                raise ValueError(f"{path}: destination: {exc}") from None
        elif cfg.destination is None or not cfg.destination.host or not cfg.destination.port:
            raise ValueError(f"{path}: 'destination' needs ae_title, host and port (or kind: dicomweb and a url)")
        if not isinstance(cfg.maps, bool):
            raise ValueError(f"{path}: maps must be true or false, got {cfg.maps!r}")
        if cfg.findings_mode not in ("add", "replace"):
            raise ValueError(f"{path}: findings_mode must be add or replace, got {cfg.findings_mode!r}")
        for key in ("min_free_mb", "acse_timeout_s", "network_timeout_s"):
            value = getattr(cfg, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{path}: {key} must be a number >= 0, got {value!r}")
        if (
            isinstance(cfg.max_associations, bool)
            or not isinstance(cfg.max_associations, int)
            or cfg.max_associations < 1
        ):
            raise ValueError(f"{path}: max_associations must be an integer >= 1, got {cfg.max_associations!r}")
        if cfg.retain_delivered_s < 0:
            raise ValueError(f"{path}: retain_delivered_s must be >= 0, got {cfg.retain_delivered_s}")
        if cfg.tls is not None:
            cfg.tls.check(str(path))
            try:  # a key that does not match its certificate, or a CA file that is not one, fails here
                cfg.tls.server_context()
            except Exception as exc:  # noqa: BLE001 - ssl raises SSLError, OSError, ValueError
                raise ValueError(f"{path}: tls: {type(exc).__name__}: {exc}") from None
        return cfg
