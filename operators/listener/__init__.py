"""``ct-zeroshot serve --config FILE``: a DICOM listener that turns received CT studies into SRs for a
PACS. ``config`` reads the YAML file, ``spool`` keeps what was acknowledged, ``sender`` delivers SRs,
``service`` receives (pynetdicom handlers), decides when a study is complete and runs the pipeline,
``health`` serves /healthz, /readyz and /metrics and writes the audit."""

from .config import ListenerConfig, Peer
from .service import Listener, check, serve

__all__ = ["Listener", "ListenerConfig", "Peer", "check", "serve"]
