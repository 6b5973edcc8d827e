"""The listener's spool: where every acknowledged instance lives until its study's SR is delivered.

``incoming/<study>/`` receives instances (temporary file, fsync, rename: an instance is on disk before
its C-STORE is answered); a complete study moves to ``ready/<study>/`` (a rename), its SR is written
to ``out/<study>/``, and the study ends in ``done/<study>/`` or ``failed/<study>/`` (with
``reason.txt``). A delivered study is purged after the listener's retention time: its instances and SR
files are deleted, ``out/<study>/sr.json`` (UIDs and times only) remains. Study and SOP Instance UIDs
name the folders and files, so the spool refuses any that is not a valid DICOM UID: nothing a sender
writes can name a path outside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ..contract.files import PARTIAL_SUFFIX, write_atomic
from ..contract.uids import is_valid_uid

STAGES = ("incoming", "ready", "done", "failed", "out")
SR_STATE = "sr.json"


class SpoolError(ValueError):
    """A value from a sender that the spool will not use as a name (the message says which)."""


def checked_uid(value: object, what: str) -> str:
    uid = str(value).strip("\0 ") if value is not None else ""
    if not is_valid_uid(uid):
        raise SpoolError(f"{what} {uid[:80]!r} is not a valid DICOM UID")
    return uid


def _dataset_part(data: bytes) -> bytes:
    """A DICOM file's bytes after its file meta group (which names the sending application and may differ
    between two senders of the same instance); the whole bytes when they are not a DICOM file."""
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        return data
    return data[144 + int.from_bytes(data[140:144], "little") :]


class InstanceConflict(SpoolError):
    """An instance under a SOP Instance UID the spool already holds with other bytes."""


class Spool:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        for d in STAGES:
            (self.root / d).mkdir(parents=True, exist_ok=True)

    def path(self, stage: str, study_uid: str) -> Path:
        return self.root / stage / checked_uid(study_uid, "Study Instance UID")

    def store(self, data: bytes, study_uid: str, sop_uid: str) -> None:
        """Write one received instance (a DICOM file's bytes, as received) durably into ``incoming``,
        before it is acknowledged. The same instance received again is taken (a sender's retry, or another
        sender: the file meta group aside, the bytes are the same); another one under a SOP Instance UID
        the spool holds is refused (``InstanceConflict``): a changed instance
        needs a new UID, and keeping either copy silently would lose the other."""
        folder = self.path("incoming", study_uid)
        name = checked_uid(sop_uid, "SOP Instance UID") + ".dcm"
        for stage in ("incoming", "ready", "done", "failed"):
            held = self.path(stage, study_uid) / name
            if held.is_file() and _dataset_part(held.read_bytes()) != _dataset_part(data):
                raise InstanceConflict(
                    f"study {study_uid}: instance {sop_uid} was received before with other content ({stage}/); "
                    "a changed instance needs a new SOP Instance UID"
                )
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / name, data, fsync=True)

    def attempts(self, study_uid: str, add: int = 0, reset: bool = False) -> int:
        """How many times processing this study started and did not finish (kept across restarts in
        ``out/<study>/``): counted before each attempt, reset when one ends."""
        path = self.path("out", study_uid) / "attempts"
        if reset:
            path.unlink(missing_ok=True)
            return 0
        try:
            n = int(path.read_text()) if path.is_file() else 0
        except ValueError:
            n = 0  # a count cut by a crash
        if add:
            path.parent.mkdir(parents=True, exist_ok=True)
            n += add
            write_atomic(path, f"{n}\n")
        return n

    def complete(self, study_uid: str) -> tuple[Path, bool]:
        """``incoming`` -> ``ready``: (the ready folder, whether the study was re-opened). Instances of a
        study already queued are merged in; a study already done or failed is re-opened: its instances
        come back into ``ready`` and it is processed again with all of them. Nothing is deleted; an
        instance received again replaces its earlier copy."""
        dst = self.path("ready", study_uid)
        reopened = False
        for stage in ("done", "failed"):
            old = self.path(stage, study_uid)
            if old.is_dir():
                _merge(old, dst)
                reopened = True
        _merge(self.path("incoming", study_uid), dst)  # last: the newest copies win
        return dst, reopened

    def finish(self, study_uid: str, reason: str | None = None) -> Path:
        """``ready`` -> ``done`` (``reason`` None) or ``failed`` with ``reason.txt``."""
        dst = self.path("done" if reason is None else "failed", study_uid)
        _merge(self.path("ready", study_uid), dst)  # a study is re-opened out of done/failed: dst is new
        if reason is not None:
            write_atomic(dst / "reason.txt", reason + "\n")
        return dst

    # -- the SR of a study: what it covers and whether it was delivered (out/<study>/sr.json) --------
    def sr_state(self, study_uid: str) -> dict:
        path = self.path("out", study_uid) / SR_STATE
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            return {}  # a state file cut by a crash: the SR is rebuilt, which is always safe

    def set_sr_state(self, study_uid: str, state: dict) -> None:
        self.path("out", study_uid).mkdir(parents=True, exist_ok=True)
        write_atomic(self.path("out", study_uid) / SR_STATE, json.dumps(state, indent=1), fsync=True)

    def released(self, study_uid: str, state: dict) -> int:
        """How many instances an earlier SR of this (purged) study covered that ``ready/`` lacks now."""
        if not state.get("purged"):
            return 0
        return len(set(state.get("covered", [])) - set(self.instance_uids(study_uid)))

    def instance_uids(self, study_uid: str, stage: str = "ready") -> list[str]:
        """The SOP Instance UIDs a stage holds of a study (the file names), sorted."""
        return sorted(f.name[: -len(".dcm")] for f in self.path(stage, study_uid).glob("*.dcm"))

    def instances_digest(self, study_uid: str) -> str:
        """Which instances ``ready/<study>`` holds (their SOP Instance UIDs, the file names)."""
        names = [u + ".dcm" for u in self.instance_uids(study_uid)]
        return hashlib.sha256("\n".join(names).encode()).hexdigest()[:32] + f"/{len(names)}"

    def purge(self, study_uid: str, when: float) -> None:
        """Delete a delivered study's instances (``done/``) and SR files (``out/``), keeping ``sr.json``
        marked ``purged``: marked first, so a crash half-way leaves a study that is purged again, and a
        late instance finds the record that says its study's earlier instances are gone."""
        self.set_sr_state(study_uid, {**self.sr_state(study_uid), "purged": when})
        shutil.rmtree(self.path("done", study_uid), ignore_errors=True)
        out = self.path("out", study_uid)
        shutil.rmtree(out / "superseded", ignore_errors=True)
        for f in out.iterdir():
            if f.name != SR_STATE:
                f.unlink()

    def studies(self, stage: str) -> list[str]:
        return sorted(d.name for d in (self.root / stage).iterdir() if d.is_dir() and is_valid_uid(d.name))

    def drop_unacknowledged(self, study_uid: str) -> None:
        """Temporary files of instances whose C-STORE was never answered (a crash mid-write)."""
        for f in self.path("incoming", study_uid).glob(f".*{PARTIAL_SUFFIX}"):
            f.unlink()


def sr_identity(path: Path) -> dict[str, str]:
    """An SR file's SOP Instance, Series Instance and SOP Class UIDs (what a later SR needs to name it)."""
    import pydicom

    tags = ["SOPInstanceUID", "SeriesInstanceUID", "SOPClassUID"]
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
    return {"sop": str(ds.SOPInstanceUID), "series": str(ds.SeriesInstanceUID), "sop_class": str(ds.SOPClassUID)}


def offered_references(study_uid: str, state: dict) -> list:
    """Every SR of the study offered to the destination (``sr.json``'s ``offered``), as the references a
    corrected SR's Predecessor Documents Sequence needs (highdicom reads these four UIDs)."""
    from pydicom import Dataset

    refs = []
    for o in state.get("offered", []):
        ref = Dataset()
        ref.StudyInstanceUID, ref.SeriesInstanceUID = study_uid, o["series"]
        ref.SOPClassUID, ref.SOPInstanceUID = o["sop_class"], o["sop"]
        refs.append(ref)
    return refs


def _merge(src: Path, dst: Path) -> None:
    """Move the instances (``*.dcm``) of ``src`` into ``dst`` (a rename when ``dst`` does not exist yet)
    and remove ``src`` with what else it held (a failure's ``reason.txt``)."""
    if not src.is_dir():
        return
    if not dst.exists():
        os.replace(src, dst)
        (dst / "reason.txt").unlink(missing_ok=True)
        return
    for f in src.glob("*.dcm"):
        os.replace(f, dst / f.name)
    shutil.rmtree(src)
