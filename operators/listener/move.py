"""``ct-zeroshot move``: ask the listener's ``source`` PACS to send it studies (C-FIND, then C-MOVE), for
sites that do not route studies to it.

The PACS sends each study to the listener's AE title by C-STORE (it must know the listener as a DICOM
node, and the listener must allow the PACS as a caller); from there the study goes the listener's usual
way: spooled, completed, processed, its SR sent to the destination. Studies are named by UID
(``--study``) or found by C-FIND (``--dates``, ``--modality``) in the Study Root information model.
Every UID the PACS answers is checked before it is asked for. pynetdicom does the DIMSE work.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass

from pydicom.dataset import Dataset

from ..contract.uids import is_valid_uid
from .config import ListenerConfig
from .sender import associate, not_established

log = logging.getLogger("ct-zeroshot.listener")

FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model - FIND
MOVE = "1.2.840.10008.5.1.4.1.2.2.2"  # Study Root Query/Retrieve Information Model - MOVE
DATES = re.compile(r"^(\d{8})?-?(\d{8})?$")


class MoveError(RuntimeError):
    """The source PACS could not be asked (no association, a refused query)."""


@dataclass
class MoveResult:
    study_uid: str
    status: int
    completed: int = 0
    failed: int = 0
    warning: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 0x0000 and self.failed == 0


def _associate(cfg: ListenerConfig, context: str):
    src = cfg.source
    if src is None:
        raise ValueError("the listener config names no 'source' PACS to move studies from")
    # a C-MOVE's responses come as the PACS sends: its DIMSE wait is longer than the network timeout
    wait = cfg.network_timeout_s
    assoc = associate(cfg, src, context, timeout_s=wait, dimse_timeout_s=max(wait, 600.0))
    if not assoc.is_established:
        raise MoveError(not_established(src, assoc))
    return assoc


def find_studies(cfg: ListenerConfig, dates: str | None, modality: str = "CT") -> list[str]:
    """Study Instance UIDs of the studies at the source that hold ``modality`` within ``dates``."""
    if dates is not None and (not DATES.match(dates) or dates in ("", "-")):
        raise ValueError(f"--dates {dates!r}: expected YYYYMMDD-YYYYMMDD (either end may be left open)")
    if not re.fullmatch(r"[A-Z]{2}", modality):
        raise ValueError(f"--modality {modality!r}: expected a DICOM modality such as CT")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.ModalitiesInStudy = modality
    query.StudyDate = dates or ""
    assoc = _associate(cfg, FIND)
    found: list[str] = []
    try:
        for status, identifier in assoc.send_c_find(query, FIND):
            code = getattr(status, "Status", None)
            if code is None:
                raise MoveError(f"{cfg.source.describe()}: no answer to the C-FIND")  # type: ignore[union-attr]
            if code in (0xFF00, 0xFF01) and identifier is not None:
                uid = str(identifier.get("StudyInstanceUID", ""))
                if not is_valid_uid(uid):
                    where = cfg.source.describe()  # type: ignore[union-attr]
                    raise MoveError(f"{where}: answered a Study Instance UID that is not one: {uid!r:.80}")
                found.append(uid)
            elif code != 0x0000:
                raise MoveError(f"{cfg.source.describe()}: C-FIND failed with status 0x{code:04X}")  # type: ignore[union-attr]
    finally:
        assoc.release()
    return list(dict.fromkeys(found))


def move_study(cfg: ListenerConfig, study_uid: str) -> MoveResult:
    """C-MOVE one study from the source to the listener's own AE title; the final response's counts."""
    if not is_valid_uid(study_uid):
        raise ValueError(f"{study_uid!r:.80} is not a Study Instance UID")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    assoc = _associate(cfg, MOVE)
    result = MoveResult(study_uid, status=0xC000)
    try:
        for status, _ in assoc.send_c_move(query, cfg.ae_title, MOVE):
            code = getattr(status, "Status", None)
            if code is None:
                break  # the association ended without a final response
            result.status = code
            result.completed = int(status.get("NumberOfCompletedSuboperations", result.completed) or 0)
            result.failed = int(status.get("NumberOfFailedSuboperations", result.failed) or 0)
            result.warning = int(status.get("NumberOfWarningSuboperations", result.warning) or 0)
    finally:
        assoc.release()
    return result


def move(config: str, studies: list[str], dates: str | None, modality: str, out=sys.stdout) -> int:
    """``ct-zeroshot move``: 0 when every study was sent whole, 1 when one was not, 2 for a bad request."""
    cfg = ListenerConfig.load(config)
    if cfg.source is None:
        raise ValueError(f"{config}: names no 'source' PACS to move studies from (source: {{ae_title, host, port}})")
    if not studies and dates is None:
        raise ValueError("name the studies (--study UID) or a date range to find them (--dates)")
    for uid in studies:
        if not is_valid_uid(uid):
            raise ValueError(f"--study {uid!r:.80}: not a Study Instance UID")
    wanted = list(dict.fromkeys([*studies, *(find_studies(cfg, dates, modality) if dates is not None else [])]))
    print(f"{len(wanted)} stud{'y' if len(wanted) == 1 else 'ies'} to move from {cfg.source.describe()} "  # type: ignore[union-attr]
          f"to {cfg.ae_title}", file=out)  # fmt: skip
    bad = 0
    for n, uid in enumerate(wanted, 1):
        r = move_study(cfg, uid)
        bad += not r.ok
        state = "sent" if r.ok else f"NOT SENT (status 0x{r.status:04X}, {r.failed} failed)"
        print(f"[{n}/{len(wanted)}] study {uid}: {state}; {r.completed} instance(s) sent", file=out, flush=True)
    return 1 if bad else 0
