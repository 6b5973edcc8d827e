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
    max_instance_mb: float = 512.0  # a C-STORE larger than this is refused (out of resources)
    max_attempts: int = 3  # a study whose processing raises this many times goes to failed/
    redeliver_max_s: float = 600.0  # undelivered SRs are retried while running, backoff capped here

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
