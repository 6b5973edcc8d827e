"""Reading training data: the Merlin release format and a plain manifest.

Merlin release (a folder)::

    merlin_data/<study id>.nii.gz
    reports_final.xlsx or reports_final.csv      study id, Findings, Split[, Few Shot]
    zero_shot_findings_disease_cls.csv           study id + the 30 finding columns (1 / 0 / -1), optional

Manifest (a CSV file) for users' own data: columns ``image`` (a NIfTI file or a folder holding one
DICOM series; relative paths are relative to the manifest), ``report`` and ``split``; optional
``study id`` and finding columns named as in the catalogue.

Every problem is reported with the file (and row or study) it comes from. The readers refuse a bad row
(``strict``, the default of ``read_*``); ``load_studies`` skips it instead and records it in a
``DataReport`` (counts and reasons per file), as a release of thousands of studies holds a few bad ones.
A problem with a whole file (missing, unreadable, missing columns) is always an error.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from operators.contract.findings import load_catalogue

from .reports import ParsedReport, ReportError, parse_report, section_status

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}


@dataclass
class DataReport:
    """Rows (and images) left out of a data set, each with its file, line or study, and reason."""

    skipped: list[dict] = field(default_factory=list)

    def add(self, where: str, study: str | None, reason: str) -> None:
        self.skipped.append({"where": where, "study": study, "reason": reason})

    def to_dict(self) -> dict:
        """What ``RUN/data_report.json`` holds: counts per file and the rows themselves."""
        per_file: dict[str, int] = {}
        for row in self.skipped:
            f = row["where"].split(" line ")[0]
            per_file[f] = per_file.get(f, 0) + 1
        return {"skipped": len(self.skipped), "per_file": per_file, "rows": self.skipped}

    def summary(self) -> str:
        if not self.skipped:
            return "no rows skipped"
        first = self.skipped[0]
        return f"{len(self.skipped)} row(s) skipped, e.g. {first['where']}: {first['reason']}"


class DataError(ValueError):
    """Input data cannot be used; the message names the file and the problem."""


@dataclass
class Study:
    study_id: str
    split: str
    report: str
    image: Path  # NIfTI file or DICOM series folder
    labels: np.ndarray | None = None  # int8 (n_findings,), 1 / 0 / -1, catalogue order
    few_shot: bool = False
    source: str = ""  # where the record came from, for messages
    _parsed: ParsedReport | None = field(default=None, repr=False)

    @property
    def parsed(self) -> ParsedReport:
        if self._parsed is None:
            self._parsed = parse_report(self.report, f"{self.source}: study {self.study_id}")
        return self._parsed

    @property
    def findings_text(self) -> str:
        return self.parsed.findings

    @property
    def sections(self) -> dict[str, str]:
        return self.parsed.sections

    @cached_property
    def section_status(self) -> dict[str, str]:
        return section_status(self.parsed)

    @property
    def is_dicom(self) -> bool:
        return self.image.is_dir()


def _read_csv(path: Path, required: list[str]) -> list[dict[str, str]]:
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, strict=True)
            if reader.fieldnames is None:
                raise DataError(f"{path}: empty CSV (no header row)")
            header = [h.strip() for h in reader.fieldnames]
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing}; found {header}")
            rows = []
            for row in reader:
                if None in row:
                    raise DataError(f"{path}: line {reader.line_num} has more fields than the header")
                rows.append({(k or "").strip(): (v if v is not None else "") for k, v in row.items()})
            return rows
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from exc


def _read_xlsx(path: Path, required: list[str]) -> list[dict[str, str]]:
    try:
        from openpyxl import load_workbook
    except ImportError as exc:
        raise DataError(f"{path}: reading .xlsx needs openpyxl (pip install 'ct-zeroshot[train]')") from exc
    try:
        wb = load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as an Excel workbook ({exc})") from exc
    rows_iter = wb.worksheets[0].iter_rows(values_only=True)
    try:
        header = [str(h).strip() if h is not None else "" for h in next(rows_iter)]
    except StopIteration:
        raise DataError(f"{path}: empty workbook") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {header}")
    return [
        {h: ("" if v is None else str(v)) for h, v in zip(header, r)}
        for r in rows_iter
        if any(v is not None for v in r)
    ]


def _split(value: str, where: str) -> str:
    s = _SPLIT_ALIASES.get(value.strip().lower())
    if s is None:
        raise DataError(f"{where}: unknown split {value!r}; expected one of {SPLITS}")
    return s


def _labels(row: dict[str, str], where: str, ids: list[str] | None = None) -> np.ndarray:
    ids = load_catalogue().ids if ids is None else ids
    out = np.empty(len(ids), dtype=np.int8)
    for i, fid in enumerate(ids):
        raw = row.get(fid, "").strip()
        try:
            v = int(float(raw))
        except ValueError:
            raise DataError(f"{where}: label {fid!r} is {raw!r}; expected 1, 0 or -1") from None
        if v not in (1, 0, -1):
            raise DataError(f"{where}: label {fid!r} is {v}; expected 1, 0 or -1")
        out[i] = v
    return out


def _row(strict: bool, report: DataReport | None, where: str, sid: str | None, make):
    """``make()``'s study, or, when it raises ``DataError`` and not ``strict``, None with the row recorded."""
    try:
        return make()
    except DataError as exc:
        if strict or report is None:
            raise
        report.add(where, sid, str(exc).removeprefix(f"{where}: "))
        return None


def read_merlin_release(
    root: str | Path, check_images: bool = True, strict: bool = True, report: DataReport | None = None
) -> list[Study]:
    """Studies of a Merlin-format release (the official one or the synthetic corpus); with ``strict`` off,
    bad rows are recorded in ``report`` and left out (a study whose label row is bad with them)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    required = ["study id", "Findings", "Split"]
    if (root / "reports_final.csv").exists():
        rpath = root / "reports_final.csv"
        rows = _read_csv(rpath, required)
    elif (root / "reports_final.xlsx").exists():
        rpath = root / "reports_final.xlsx"
        rows = _read_xlsx(rpath, required)
    else:
        raise DataError(f"{root}: no reports_final.csv or reports_final.xlsx")
    labels: dict[str, np.ndarray] = {}
    bad_labels: set[str] = set()
    lpath = root / "zero_shot_findings_disease_cls.csv"
    if lpath.exists():
        for n, row in enumerate(_read_csv(lpath, ["study id", *load_catalogue().ids]), start=2):
            lsid = row["study id"].strip()
            where = f"{lpath} line {n}"
            got = _row(strict, report, where, lsid, lambda row=row, where=where: _labels(row, where))
            if got is None:
                bad_labels.add(lsid)
            else:
                labels[lsid] = got
    studies, seen = [], set()
    for n, row in enumerate(rows, start=2):
        sid = row["study id"].strip()
        where = f"{rpath} line {n}"

        def make(sid=sid, where=where, row=row):
            if not sid:
                raise DataError(f"{where}: empty study id")
            if sid in seen:
                raise DataError(f"{where}: duplicate study id {sid!r}")
            seen.add(sid)
            image = root / "merlin_data" / f"{sid}.nii.gz"
            if check_images and not image.exists():
                raise DataError(f"{where}: image {image} does not exist")
            if not row["Findings"].strip():
                raise DataError(f"{where}: empty report")
            return _checked(
                Study(
                    sid,
                    _split(row["Split"], where),
                    row["Findings"],
                    image,
                    labels.get(sid),
                    row.get("Few Shot", "").strip() in ("1", "True", "true", "yes"),
                    str(rpath),
                ),
                where,
            )

        study = _row(strict, report, where, sid or None, make)
        if study is not None and sid not in bad_labels:  # a study whose label row was left out goes with it
            studies.append(study)
    if not studies:
        raise DataError(f"{rpath}: no studies")
    return studies


def _checked(study: Study, where: str) -> Study:
    """Parse the report now, so a bad one is refused at load time rather than mid-training."""
    try:
        study.parsed  # noqa: B018
    except ReportError as exc:
        raise DataError(f"{where}: {exc}") from None
    return study


def read_manifest(
    path: str | Path, check_images: bool = True, strict: bool = True, report: DataReport | None = None
) -> list[Study]:
    """Studies listed in a manifest CSV (image, report, split[, study id, finding columns]); with ``strict``
    off, bad rows are recorded in ``report`` and left out."""
    path = Path(path)
    rows = _read_csv(path, ["image", "report", "split"])
    has_labels = bool(rows) and all(fid in rows[0] for fid in load_catalogue().ids)
    studies, seen = [], set()
    for n, row in enumerate(rows, start=2):
        where = f"{path} line {n}"

        def make(where=where, row=row):
            image = Path(row["image"].strip())
            if not row["image"].strip():
                raise DataError(f"{where}: empty image path")
            if not image.is_absolute():
                image = path.parent / image
            if check_images and not image.exists():
                raise DataError(f"{where}: image {image} does not exist")
            sid = row.get("study id", "").strip() or image.name.split(".")[0]
            if sid in seen:
                raise DataError(f"{where}: duplicate study id {sid!r}")
            seen.add(sid)
            if not row["report"].strip():
                raise DataError(f"{where}: empty report")
            return _checked(
                Study(
                    sid,
                    _split(row["split"], where),
                    row["report"],
                    image,
                    _labels(row, where) if has_labels else None,
                    False,
                    str(path),
                ),
                where,
            )

        study = _row(strict, report, where, row.get("study id", "").strip() or None, make)
        if study is not None:
            studies.append(study)
    if not studies:
        raise DataError(f"{path}: no studies")
    return studies


def read_label_csv(path: str | Path, ids: list[str]) -> dict[str, np.ndarray]:
    """A site's labels for its own findings: a CSV of ``study id`` and one column per finding id (1 / 0 / -1,
    -1 = not assessable), as the release's label file is for the catalogue. Every row is checked; a bad
    one is an error naming the line (an evaluation is not run on part of its labels)."""
    path = Path(path)
    out: dict[str, np.ndarray] = {}
    for n, row in enumerate(_read_csv(path, ["study id", *ids]), start=2):
        sid = row["study id"].strip()
        where = f"{path} line {n}"
        if not sid:
            raise DataError(f"{where}: empty study id")
        if sid in out:
            raise DataError(f"{where}: duplicate study id {sid!r}")
        out[sid] = _labels(row, where, ids)
    if not out:
        raise DataError(f"{path}: no label rows")
    return out


def load_studies(
    source: str | Path, check_images: bool = True, strict: bool = False, report: DataReport | None = None
) -> list[Study]:
    """A Merlin-format folder or a manifest CSV. Bad rows are left out and recorded in ``report`` (a
    warning says how many), unless ``strict``: then the first is an error."""
    import logging

    source = Path(source)
    report = report if report is not None else DataReport()
    if source.is_dir():
        studies = read_merlin_release(source, check_images, strict, report)
    elif source.suffix.lower() == ".csv":
        studies = read_manifest(source, check_images, strict, report)
    else:
        raise DataError(f"{source}: expected a Merlin-format folder or a manifest .csv")
    if report.skipped:
        logging.getLogger("ct-zeroshot.training").warning("%s: %s", source, report.summary())
    return studies


def load_volume(study: Study):
    """The study's HU volume (NIfTI or DICOM series) as an ``operators.contract.volume.Volume``."""
    from operators.contract.dicom_series import load_dicom_folder
    from operators.contract.volume import load_nifti

    return load_dicom_folder(study.image) if study.image.is_dir() else load_nifti(study.image)
