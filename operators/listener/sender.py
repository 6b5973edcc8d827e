"""Delivering a study's SR (and the SEG of its maps, first) to the destination: C-STORE to a DICOM peer,
or STOW-RS to a DICOMweb endpoint, with retries and exponential backoff either way."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from .config import DimseDestination, ListenerConfig, WebDestination

log = logging.getLogger("ct-zeroshot.listener")


def associate(
    cfg: ListenerConfig,
    peer: DimseDestination,
    context: str,
    transfer_syntaxes: list[str] | None = None,
    timeout_s: float | None = None,
    dimse_timeout_s: float | None = None,
    tls=None,
):
    """An association from the listener's AE title to ``peer`` requesting one presentation context, over TLS
    when the config has it (``tls``: the ``tls_args`` made once by a caller that associates repeatedly).
    The caller checks ``is_established`` (``not_established`` says why not)."""
    from pynetdicom import AE

    ae = AE(ae_title=cfg.ae_title)
    if transfer_syntaxes:
        ae.add_requested_context(context, transfer_syntaxes)
    else:
        ae.add_requested_context(context)
    if timeout_s is not None:
        ae.acse_timeout = ae.network_timeout = timeout_s
    if dimse_timeout_s is not None:
        ae.dimse_timeout = dimse_timeout_s
    if tls is None and cfg.tls is not None:
        tls = (cfg.tls.client_context(), peer.host)
    return ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls)


def not_established(peer: DimseDestination, assoc) -> str:
    return f"{peer.describe()}: association {'rejected' if assoc.is_rejected else 'not established'}"


def make_sender(cfg: ListenerConfig, stop: threading.Event) -> Sender | WebSender:
    return WebSender(cfg, stop) if isinstance(cfg.destination, WebDestination) else Sender(cfg, stop)


class WebSender:
    """STOW-RS: a study's files in one request (``operators.dicomweb.StowTarget``); the credentials are read
    at each attempt, so a secret rotated while an SR waits is used for its next delivery."""

    def __init__(self, cfg: ListenerConfig, stop: threading.Event):
        from ..dicomweb import StowTarget

        dest = cfg.destination
        if not isinstance(dest, WebDestination):
            raise ValueError("listener has no DICOMweb destination configured")
        self.stop = stop
        self.target = StowTarget(**dest.endpoint(), retries=cfg.retries, backoff_s=cfg.backoff_s)

    def send_study(self, files: Sequence[Path], uid: str) -> bool:
        """True once the endpoint stored every file; False after the last retry (or on stop)."""
        from ..dicomweb import StowError

        try:
            self.target.store(files, uid, stop=self.stop)
            return True
        except (StowError, OSError) as exc:
            log.warning("%s", exc)
            return False


class Sender:
    def __init__(self, cfg: ListenerConfig, stop: threading.Event):
        dest = cfg.destination
        if not isinstance(dest, DimseDestination):
            raise ValueError("listener has no DICOM destination configured")
        self.cfg, self.dest, self.stop = cfg, dest, stop
        # one TLS context for every delivery (its certificate files are read once)
        self.tls = (cfg.tls.client_context(), dest.host) if cfg.tls else None

    def send_study(self, files: Sequence[Path], uid: str) -> bool:
        """Each file C-STOREd in order (a SEG before the SR referencing it); False at the first not delivered."""
        return all(self.send(f, uid) for f in files)

    def send(self, sr_path: Path, uid: str) -> bool:
        """True once the destination answered success; False after the last retry (or on stop)."""
        import pydicom
        from pynetdicom.status import code_to_category

        dest, cfg = self.dest, self.cfg
        assert dest.host is not None and dest.port is not None  # checked in __init__
        ds = pydicom.dcmread(sr_path)
        delay = cfg.backoff_s
        for attempt in range(1, cfg.retries + 1):
            syntax = [str(ds.file_meta.TransferSyntaxUID)]
            assoc = associate(cfg, dest, str(ds.SOPClassUID), syntax, tls=self.tls)
            if assoc.is_established:
                status = assoc.send_c_store(ds)
                assoc.release()
                code = getattr(status, "Status", None)
                category = code_to_category(code) if code is not None else "none"
                if category in ("Success", "Warning"):  # a warning (e.g. 0xB000 coercion) is a stored SR
                    shown = "" if category == "Success" else f", with warning status {hex(code or 0)}"
                    log.info(
                        "study %s: %s %s sent to %s (attempt %d%s)",
                        uid,
                        "SEG" if ds.get("Modality") == "SEG" else "SR",
                        ds.SOPInstanceUID,
                        dest.ae_title,
                        attempt,
                        shown,
                    )
                    return True
                shown = hex(code) if code is not None else "none"
                log.warning("study %s: %s answered C-STORE with status %s", uid, dest.ae_title, shown)
            else:
                log.warning(
                    "study %s: cannot associate with %s@%s:%s (attempt %d of %d)",
                    uid,
                    dest.ae_title,
                    dest.host,
                    dest.port,
                    attempt,
                    cfg.retries,
                )
            if attempt < cfg.retries and self.stop.wait(delay):
                return False
            delay *= 2
        return False
