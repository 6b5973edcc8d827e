"""The listener's spool: where every acknowledged instance lives until its study's SR is delivered.

``incoming/<study>/`` receives instances (temporary file, fsync, rename: an instance is on disk before
its C-STORE is answered); a complete study moves to ``ready/<study>/`` (a rename), its SR is written
to ``out/<study>/``, and the study ends in ``done/<study>/`` or ``failed/<study>/`` (with
``reason.txt``). Study and SOP Instance UIDs name the folders and files, so the spool refuses any
that is not a valid DICOM UID: nothing a sender writes can name a path outside it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..files import PARTIAL_SUFFIX, write_atomic
from ..uids import is_valid_uid

STAGES = ("incoming", "ready", "done", "failed", "out")


class SpoolError(ValueError):
    """A value from a sender that the spool will not use as a name (the message says which)."""


def checked_uid(value: object, what: str) -> str:
    uid = str(value).strip("\0 ") if value is not None else ""
    if not is_valid_uid(uid):
        raise SpoolError(f"{what} {uid[:80]!r} is not a valid DICOM UID")
    return uid


class Spool:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        for d in STAGES:
            (self.root / d).mkdir(parents=True, exist_ok=True)

    def path(self, stage: str, study_uid: str) -> Path:
        return self.root / stage / checked_uid(study_uid, "Study Instance UID")

    def store(self, data: bytes, study_uid: str, sop_uid: str) -> None:
        """Write one received instance (a DICOM file's bytes, as received) durably into ``incoming``,
        before it is acknowledged."""
        folder = self.path("incoming", study_uid)
        name = checked_uid(sop_uid, "SOP Instance UID") + ".dcm"
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / name, data, fsync=True)

    def attempts(self, study_uid: str, add: int = 0) -> int:
        """How many times processing this study raised (kept across restarts in ``out/<study>/``)."""
        path = self.path("out", study_uid) / "attempts"
        n = int(path.read_text()) if path.is_file() else 0
        if add:
            path.parent.mkdir(parents=True, exist_ok=True)
            n += add
            write_atomic(path, f"{n}\n")
        return n

    def complete(self, study_uid: str) -> Path:
        """``incoming`` -> ``ready``; instances of a study already queued are merged in."""
        src, dst = self.path("incoming", study_uid), self.path("ready", study_uid)
        if dst.exists():
            for f in src.iterdir():
                os.replace(f, dst / f.name)
            src.rmdir()
        else:
            os.replace(src, dst)
        return dst

    def finish(self, study_uid: str, reason: str | None = None) -> Path:
        """``ready`` -> ``done`` (``reason`` None) or ``failed`` with ``reason.txt``."""
        dst = self.path("done" if reason is None else "failed", study_uid)
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(self.path("ready", study_uid), dst)
        if reason is not None:
            write_atomic(dst / "reason.txt", reason + "\n")
        return dst

    def studies(self, stage: str) -> list[str]:
        return sorted(d.name for d in (self.root / stage).iterdir() if d.is_dir() and is_valid_uid(d.name))

    def drop_unacknowledged(self, study_uid: str) -> None:
        """Temporary files of instances whose C-STORE was never answered (a crash mid-write)."""
        for f in self.path("incoming", study_uid).glob(f".*{PARTIAL_SUFFIX}"):
            f.unlink()
