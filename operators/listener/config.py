"""The listener's configuration file (YAML): who may send, where SRs go, the spool, the model, health.

Typed with pydantic: a key that is unknown, a value of the wrong type or out of range is refused at load
with one line naming the file, the key, what was expected and the value found (``ConfigError``), never
a traceback; ``ct-zeroshot serve --check CONFIG`` loads it without serving (``operators.listener.check``).
Values are strict: YAML's ``port: "11112"`` (a string) is refused, not coerced.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from ..contract.validation import field_path

# An AE title (PS3.5 6.2, VR AE): 1-16 characters of the default repertoire, no backslash or control
# characters, not only spaces.
_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
Port = Annotated[int, Field(ge=1, le=65535)]
NonNegative = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]


class ConfigError(ValueError):
    """A configuration file that cannot be used: one line, naming the file and each problem's key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Peer(_Section):
    """A DICOM application entity: an allowed caller (``host`` optional) or the C-STORE destination."""

    ae_title: str
    host: str | None = None
    port: Port | None = None

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        if not _AE.match(value) or not value.strip():
            raise ValueError("an AE title: 1 to 16 characters, no backslash or control characters")
        return value.strip()

    def describe(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class DimseDestination(Peer):
    """SRs (and their SEGs) C-STOREd to a DICOM peer: ``kind: dimse`` (the default)."""

    kind: Literal["dimse"] = "dimse"
    host: str
    port: Port


class WebDestination(_Section):
    """SRs (and their SEGs) stored with STOW-RS at a DICOMweb endpoint instead of C-STOREd
    (``operators.dicomweb``): its base URL, ``auth`` none/basic/bearer with ``credentials`` read from a file
    or ``env:VARIABLE`` at each delivery, and ``ca_bundle`` for an https endpoint's certificate."""

    kind: Literal["dicomweb"] = "dicomweb"
    url: str
    auth: Literal["none", "basic", "bearer"] = "none"
    credentials: str | None = None
    ca_bundle: str | None = None
    timeout_s: Positive = 60.0

    @model_validator(mode="after")
    def _usable(self) -> WebDestination:
        from ..dicomweb import StowTarget

        try:  # the URL, the credentials (readable now) and the CA bundle, checked at load
            StowTarget(**self.endpoint())
        except (ValueError, OSError) as exc:
            raise ValueError(str(exc)) from None
        return self

    def endpoint(self) -> dict[str, Any]:
        """The keyword arguments of ``operators.dicomweb.Endpoint``."""
        return self.model_dump(exclude={"kind"})

    def describe(self) -> str:
        return f"STOW-RS {self.url}"


def _destination_kind(value: Any) -> str:
    return value.get("kind", "dimse") if isinstance(value, dict) else getattr(value, "kind", "dimse")


Destination = Annotated[
    Union[Annotated[DimseDestination, Tag("dimse")], Annotated[WebDestination, Tag("dicomweb")]],  # noqa: UP007
    Discriminator(
        _destination_kind,
        custom_error_type="destination_kind",
        custom_error_message="kind must be dimse or dicomweb",
    ),
]


class TLS(_Section):
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

    @model_validator(mode="after")
    def _usable(self) -> TLS:
        for name in ("cert", "key", "ca"):
            if not Path(getattr(self, name)).is_file():
                raise ValueError(f"{name} {getattr(self, name)!r} is not a readable file")
        try:  # a key that does not match its certificate, or a CA file that is not one, fails here
            self.server_context()
        except Exception as exc:  # noqa: BLE001 - ssl raises SSLError, OSError, ValueError
            raise ValueError(f"{type(exc).__name__}: {exc}") from None
        return self

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


class Health(_Section):
    """The HTTP endpoint for operations (``operators.listener.health``): ``/healthz``, ``/readyz`` and
    Prometheus ``/metrics``. Plain HTTP without authentication: bind it to an address only the
    monitoring network reaches (it serves counts and timings, never UIDs or patient data)."""

    bind: str = "127.0.0.1"
    port: Port = 8080


class ListenerConfig(_Section):
    ae_title: str = "CTZEROSHOT"
    bind: str = "127.0.0.1"
    port: Port = 11112
    allowed: list[Peer] = Field(min_length=1)  # the calling AE titles (and hosts) that may send
    destination: Destination  # where SRs go: C-STORE (kind: dimse) or STOW-RS (kind: dicomweb)
    spool: str = "spool"
    model: str | None = None
    idle_timeout_s: NonNegative = 10.0
    retries: Annotated[int, Field(ge=1)] = 5
    backoff_s: NonNegative = 2.0
    log_patient_identifiers: bool = False
    log_format: Literal["text", "json"] = "text"  # json: one JSON object per line (operators.listener.health)
    max_instance_mb: Positive = 512.0  # an instance passing this while received: its association is aborted
    min_free_mb: NonNegative = 1024.0  # an instance leaving the spool's disk less free space is refused (0xA700)
    max_associations: Annotated[int, Field(ge=1)] = 16  # at a time (idle sockets included, until acse_timeout_s)
    acse_timeout_s: NonNegative = 5.0  # a connection that sends no association request within this is closed
    network_timeout_s: NonNegative = 60.0  # an association silent this long is aborted
    # A study whose processing starts this many times without finishing (it raised, or the process died:
    # out of memory, a crashing decoder) goes to failed/.
    max_attempts: Annotated[int, Field(ge=1)] = 3
    redeliver_max_s: NonNegative = 600.0  # undelivered SRs are retried while running, backoff capped here
    # A delivered study's instances stay this long in done/, so late instances re-open it with all of
    # them; then they and its SR files are deleted (out/<study>/sr.json, UIDs only, remains).
    retain_delivered_s: NonNegative = 3600.0
    tls: TLS | None = None  # DICOM over TLS for receiving and sending; plain TCP without it
    findings: str | None = None  # a site's findings file (operators.contract.custom_findings), scored with the model's
    findings_mode: Literal["add", "replace"] = "add"  # add: after the model's own findings; replace: instead of them
    maps: bool = False  # the present findings' localisation maps as a DICOM SEG, sent before each SR
    workers: Annotated[int, Field(ge=1, le=64)] = 1  # complete studies processed at a time
    # The image encoder's device: auto (CUDA when its provider loads, else the CPU), cpu, cuda, or openvino
    # (OpenVINO's CPU runtime, an int8 package's fast path); a device named that cannot run is an error.
    device: Literal["auto", "cpu", "cuda", "openvino"] = "auto"
    health: Health | None = None  # /healthz, /readyz and /metrics over HTTP; none without it
    source: DimseDestination | None = None  # a PACS to C-MOVE studies from (ct-zeroshot move)
    uid_root: str | None = None  # the site's UID root for SR and SEG UIDs (pydicom's public root without one)
    procedure: str | None = None  # SCHEME^VALUE^MEANING for a study without its own Procedure Code Sequence

    @field_validator("uid_root")
    @classmethod
    def _uid_root(cls, value: str | None) -> str | None:
        from ..contract.uids import check_uid_root

        return None if value is None else check_uid_root(value, "an organisation's UID root")

    @field_validator("procedure")
    @classmethod
    def _procedure(cls, value: str | None) -> str | None:
        from ..sr import parse_procedure

        if value is not None:
            parse_procedure(value, "a procedure code")
        return value

    def apply_site_codes(self) -> None:
        """The UID root and procedure code, for this process and the workers it starts (environment)."""
        from ..sr import use_site_codes

        use_site_codes(self.uid_root, self.procedure)

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return Peer._ae_title(value)

    @model_validator(mode="after")
    def _ports_differ(self) -> ListenerConfig:
        if self.health is not None and self.health.port == self.port and self.health.bind == self.bind:
            raise ValueError(f"health.port {self.health.port} is the DICOM port too; give it another")
        return self

    @classmethod
    def load(cls, path: str | Path) -> ListenerConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read listener config ({' '.join(str(exc).split())})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys (see docker/pacs/listener.yaml), got {data!r:.60}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{path}: {describe_errors(exc)}") from None


def describe_errors(exc: ValidationError) -> str:
    """pydantic's errors as one line: ``key.path: what was expected, got value`` for each, joined by ``; ``."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = field_path(err["loc"], tags=("dimse", "dicomweb"))  # the destination's union tags
        if err["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key")
            continue
        if err["type"] == "missing":
            parts.append(f"{loc}: missing (required)")
            continue
        if err["type"] == "too_short" and loc == "allowed":
            parts.append("allowed: must list at least one calling AE title")
            continue
        message = err["msg"].removeprefix("Value error, ").replace("Input should be ", "expected ")
        value = err.get("input")
        shown = "" if isinstance(value, dict) or value is None else f", got {value!r:.80}"
        parts.append(f"{loc}: {message}{shown}" if loc else message)
    return "; ".join(parts)
