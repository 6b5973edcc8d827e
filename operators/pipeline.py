"""One study through the pipeline: series selection -> volume -> zero-shot -> SR, as plain functions.

The MONAI Deploy operators (``operators/ops``), the batch front end and the PACS listener all call
these stages, so they cannot drift. A stage that fails marks the study failed with a reason naming
the study and, where there is one, the file; later stages pass it through; nothing is written for it.

**Series selection rule** (documented in docs/deploy.md). A series is *eligible* when it is CT Image
Storage or Enhanced CT Image Storage, Modality CT, ImageType ORIGINAL\\PRIMARY and not LOCALIZER, axial
(slice normal within ~25 degrees of the patient's head-feet axis) and has at least ``MIN_SLICES`` slices
(instances; an Enhanced CT's frames). Among eligible series the model sees the one with the most slices
(the longest or thinnest coverage); ties go to the thinner SliceThickness, then the lower SeriesNumber,
then the Series Instance UID. A study without an eligible series ends with the reason for each series it
has.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from .contract.dicom_series import CT_STORAGE_CLASSES, SeriesFiles, series_frames, series_to_volume
from .contract.package import is_embedded_demo
from .contract.phi import describe
from .contract.preprocessing import build_transform, preprocess
from .contract.scoring import Findings, ZeroShotModel
from .contract.uids import derived_uid
from .contract.volume import VolumeError

log = logging.getLogger("ct-zeroshot")

MIN_SLICES = 8
AXIAL_COS = 0.9  # |slice normal . z| at least this: within ~25 degrees of axial


@dataclass
class StudyWork:
    """A study on its way through the stages; ``status`` is ok until a stage fails."""

    study_uid: str
    series: list[SeriesFiles]
    status: str = "ok"
    reason: str = ""
    chosen: SeriesFiles | None = None
    tensor: np.ndarray | None = None
    findings: Findings | None = None
    sr_path: Path | None = None
    # With maps (``ZeroShotModel.maps``): the CT volume's grid (shape, voxel -> RAS affine), the localisation
    # features of the one encoder pass, and the SEG written beside the SR
    grid: tuple | None = None
    localisation: np.ndarray | None = None
    seg_path: Path | None = None
    timings: dict = field(default_factory=dict)
    transient: bool = False  # failed for a reason of the machine's (storage), not the study's
    # A corrected SR (the listener re-opened the study): its revision (0: the first SR) and the earlier
    # delivered SR it supersedes (its Predecessor Documents Sequence).
    revision: int = 0
    predecessors: list = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.status != "ok"

    def series_chosen(self) -> SeriesFiles:
        """The selected series (a stage after selection runs only on a study that has one)."""
        if self.chosen is None:
            raise RuntimeError(f"study {self.study_uid}: no series selected")
        return self.chosen

    def fail(self, reason: str, transient: bool = False) -> StudyWork:
        """Mark the study failed. ``transient``: the machine failed, not the study (storage): a front end
        that keeps the study (the listener) tries it again instead of giving it up."""
        self.status, self.reason, self.transient = "failed", reason, transient
        self.tensor = None
        log.error("study %s: %s", self.study_uid, reason)
        return self


def series_problem(s: SeriesFiles) -> str | None:
    """Why a series is not eligible, or None."""
    ds = s.headers[0]
    desc = f"series {s.series_uid} ({len(s.paths)} instances)"
    if s.modality != "CT":
        return f"{desc}: modality {s.modality or 'missing'}, not CT"
    if str(ds.get("SOPClassUID", "")) not in CT_STORAGE_CLASSES:
        shown = ds.get("SOPClassUID", "missing")
        return f"{desc}: SOP class {shown} is not CT Image Storage or Enhanced CT Image Storage"
    if s.slices != len(s.paths):
        desc = f"series {s.series_uid} ({len(s.paths)} instances, {s.slices} frames)"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return f"{desc}: a localizer"
    if image_type[:2] != ["ORIGINAL", "PRIMARY"]:
        shown = "\\".join(image_type) or "missing"
        return f"{desc}: ImageType {shown} is not ORIGINAL\\PRIMARY"
    try:  # an Enhanced CT's orientation is in its functional groups; a malformed one is refused by file name
        iop = _first_frame(s).get("ImageOrientationPatient")
    except VolumeError as exc:
        return f"{desc}: {exc}"
    if iop is None or len(iop) != 6:
        return f"{desc}: no ImageOrientationPatient"
    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    if abs(normal[2]) < AXIAL_COS * max(float(np.linalg.norm(normal)), 1e-9):
        return f"{desc}: not axial (slice normal {np.round(normal, 3).tolist()})"
    if s.slices < MIN_SLICES:
        return f"{desc}: {s.slices} slice(s), a volume needs at least {MIN_SLICES}"
    return None


def _first_frame(s: SeriesFiles):
    """The header of the series' first slice: its first instance, or an Enhanced CT's first frame (with the
    orientation and slice thickness of its functional groups: ``dicom_series.series_frames``)."""
    return series_frames(s.headers[:1], [str(s.paths[0])]).headers[0]


def patients_in(series: list[SeriesFiles]) -> int:
    """How many patients the instances of a study name (Patient ID with its issuer, and birth date): more
    than one under one Study Instance UID is a merge or UID collision, and an SR would attach the result to
    the wrong patient's record."""
    seen = set()
    for s in series:
        for ds in s.headers:
            seen.add(
                (
                    str(ds.get("PatientID", "")),
                    str(ds.get("IssuerOfPatientID", "")),
                    str(ds.get("PatientBirthDate", "")),
                )
            )
    return len(seen)


def select_series(work: StudyWork) -> StudyWork:
    t = time.perf_counter()
    n = patients_in(work.series)
    if n > 1:  # the values are PHI: the reason gives their number only
        return work.fail(
            f"instances of {n} different patients (Patient ID, issuer, birth date) under one Study Instance UID"
        )
    eligible, reasons = [], []
    for s in work.series:
        why = series_problem(s)
        (reasons.append(why) if why else eligible.append(s))
    work.timings["select_s"] = time.perf_counter() - t
    if not eligible:
        return work.fail("no eligible series: " + "; ".join(reasons) if reasons else "no series")

    def key(s: SeriesFiles):
        ds = _first_frame(s)  # a tie-break only: a value that is absent or not a number sorts last
        return (
            -s.slices,
            _number_or(ds, "SliceThickness", 1e9),
            _number_or(ds, "SeriesNumber", 1 << 30),
            s.series_uid,
        )

    work.chosen = sorted(eligible, key=key)[0]
    log.info(
        "study %s: series %s (%d slices) chosen of %d (%d eligible)",
        work.study_uid,
        work.chosen.series_uid,
        work.chosen.slices,
        len(work.series),
        len(eligible),
    )
    return work


def _number_or(ds, keyword: str, default: float) -> float:
    try:
        value = float(ds.get(keyword))
    except (TypeError, ValueError):
        return default
    return value if np.isfinite(value) else default


def contained(stage: Callable[[StudyWork], StudyWork], name: str) -> Callable[[StudyWork], StudyWork]:
    """``stage`` whose unexpected error fails the study it was working on (reason: the stage and the
    error's type; its text only where identifiers may be logged) instead of leaving the stage: one bad
    study never stops the application's graph, a batch or the listener."""

    def run(work: StudyWork) -> StudyWork:
        try:
            return stage(work)
        except Exception as exc:  # noqa: BLE001 - contained here by design, the reason recorded
            return work.fail(f"{name} failed ({describe(exc)})")

    return run


class SeriesToModelInput:
    """Decodes the chosen series into a volume with its geometry and applies the package's
    preprocessing (the MONAI transform built once): ``StudyWork`` in, ``work.tensor`` set."""

    def __init__(self, spec):
        self.spec = spec
        self.transform = build_transform(spec)
        # The last volume's memory, reused when the next series has the same size (faulting in a fresh
        # 300 MB array costs as much as decoding; docs/performance.md, stage timings). One per worker, never shared.
        self._buffer: np.ndarray | None = None

    def __call__(self, work: StudyWork) -> StudyWork:
        if work.failed:
            return work
        # Geometry from the headers the scan already read; pixels read straight from each file
        # (dicom_series.read_frame), without holding every full dataset and its cached array.
        chosen = work.series_chosen()
        if chosen.damaged:  # a slice may be missing where no gap shows it: not a complete series
            path, why = chosen.damaged[0]
            return work.fail(
                f"{path}: a damaged DICOM file beside the series' {len(chosen.paths)} instances ({why}); the "
                "series may be missing a slice"
            )
        names = [str(p) for p in chosen.paths]
        offsets = chosen.pixel_offsets or [None] * len(names)
        t = time.perf_counter()
        try:
            vol = series_to_volume(
                chosen.headers,
                names,
                offsets=offsets,
                out=self._buffer,
            )
            self._buffer = vol.array.T  # the slice-major buffer; preprocessing copies out of it
        except VolumeError as exc:
            return work.fail(str(exc))
        work.timings["decode_volume_s"] = time.perf_counter() - t
        t = time.perf_counter()
        work.grid = (vol.array.shape, vol.affine)
        work.tensor = preprocess(vol, self.spec, self.transform)
        if np.may_share_memory(work.tensor, self._buffer):  # never hand on a view of the reused buffer
            work.tensor = work.tensor.copy()
        work.timings["preprocess_s"] = time.perf_counter() - t
        return work


def infer(work: StudyWork, model: ZeroShotModel) -> StudyWork:
    if work.failed:
        return work
    if work.tensor is None:
        raise RuntimeError(f"study {work.study_uid}: no model input")
    t = time.perf_counter()
    if model.maps:
        emb, loc = model.embed_images_with_maps(work.tensor[None])
        work.localisation = loc[0]
    else:
        emb = model.embed_images(work.tensor[None])
    work.timings["encoder_s"] = time.perf_counter() - t
    t = time.perf_counter()
    work.findings = model.decide(emb)[0]
    work.timings["decide_s"] = time.perf_counter() - t
    work.tensor = None
    return work


def sr_uids(study_uid: str, series_uid: str, model_identity: str, revision: int = 0) -> tuple[str, str]:
    """(series UID, SOP instance UID) of the SR, derived from the study, the series and the model
    (``ModelPackage.identity``: UID and weights' digest): the same study scored again by the same model
    gets the same SR identity (a PACS dedupes it); other weights get other UIDs. ``revision`` n > 0: the
    n-th corrected SR of a study that received more instances after its SR (a new SOP Instance UID)."""
    src = [study_uid, series_uid, model_identity]
    rev = [f"revision {revision}"] if revision else []  # corrected SRs join the first one's series
    return derived_uid(*src, "series"), derived_uid(*src, *rev, "instance")


def sr_filename(study_uid: str) -> str:
    return f"SR_{study_uid}.dcm"


def seg_filename(study_uid: str) -> str:
    return f"SEG_{study_uid}.dcm"


def write_maps(work: StudyWork, model: ZeroShotModel, out_dir: str | Path, sr_sop_uid: str) -> dict:
    """The present findings' maps as a DICOM SEG beside the SR (``operators.localisation``); returns the SR's
    locations (finding index -> ``sr.Location``). The SEG's UIDs derive from the SR's, so the same study and
    model give the same SEG."""
    from .contract.preprocessing import model_input_affine
    from .localisation import build_seg, study_maps
    from .sr import Location, write_sr

    if work.localisation is None or work.grid is None or work.findings is None:
        return {}
    t = time.perf_counter()
    shape, affine = work.grid
    maps = study_maps(
        work.localisation,
        work.findings,
        model.package,
        model_input_affine(shape, affine, model.package.spec),
        shape,
        affine,
    )
    work.timings["maps_s"] = time.perf_counter() - t
    t = time.perf_counter()
    built = build_seg(
        work.series_chosen().headers,
        maps,
        model.package,
        derived_uid(sr_sop_uid, "seg series"),
        derived_uid(sr_sop_uid, "seg"),
    )
    if built is None:
        return {}
    seg, segments = built
    work.seg_path = write_sr(seg, out_dir, seg_filename(work.study_uid))
    work.timings["seg_s"] = time.perf_counter() - t
    by_index = {m.index: m for m in maps.maps}
    return {i: Location(seg, n, by_index[i].peak_lps) for i, n in segments.items()}


def _discard_seg(work: StudyWork) -> None:
    """A SEG written for an SR that was not: never left looking like a finished study's output."""
    if work.seg_path is not None:
        work.seg_path.unlink(missing_ok=True)
        work.seg_path = None


def write_report(work: StudyWork, model: ZeroShotModel, out_dir: str | Path) -> StudyWork:
    from .sr import build_sr, write_sr  # highdicom: imported when the first SR is written

    if work.failed:
        return work
    chosen, findings = work.series_chosen(), work.findings
    if findings is None:
        raise RuntimeError(f"study {work.study_uid}: no findings to report")
    t = time.perf_counter()
    try:
        series_uid, sop_uid = sr_uids(work.study_uid, chosen.series_uid, model.package.identity, work.revision)

        def build(locations: dict):
            return build_sr(
                chosen.headers,
                findings,
                model.package,
                series_uid,
                sop_uid,
                work.predecessors,
                device=model.device,
                locations=locations,
            )

        try:  # the maps add to the SR; a study never loses its SR to them
            locations = write_maps(work, model, out_dir, sop_uid)
            sr = build(locations)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a header highdicom's SEG will not copy
            if work.localisation is None:
                raise
            log.warning("study %s: maps not written (%s); the SR without them", work.study_uid, describe(exc))
            _discard_seg(work)
            sr = build({})
        work.sr_path = write_sr(sr, out_dir, sr_filename(work.study_uid))
    except OSError as exc:  # the output's storage (full, read-only): the machine's failure, not the study's
        _discard_seg(work)
        return work.fail(f"SR not written ({describe(exc)})", transient=True)
    except Exception as exc:  # noqa: BLE001 - an SR that cannot be built must not stop the batch
        _discard_seg(work)
        return work.fail(f"SR not written ({describe(exc)})")
    # the SR alone: its maps and their SEG are timed on their own (maps_s, seg_s)
    work.timings["sr_s"] = time.perf_counter() - t - work.timings.get("maps_s", 0.0) - work.timings.get("seg_s", 0.0)
    present = [fid for fid, p in zip(findings.ids, findings.present) if p]
    log.info(
        "study %s: SR %s; present: %s; timings %s",
        work.study_uid,
        work.sr_path.name,
        ", ".join(present) or "none",
        {k: round(v, 3) for k, v in work.timings.items()},
    )
    return work


def run_study(work: StudyWork, model: ZeroShotModel, prep: SeriesToModelInput, out_dir: str | Path) -> StudyWork:
    """All stages for one study (the batch and listener path; the app runs them as operators)."""
    t = time.perf_counter()
    work = contained(select_series, "series selection")(work)
    work = contained(prep, "reading the series")(work)
    work = contained(partial(infer, model=model), "inference")(work)
    work = contained(partial(write_report, model=model, out_dir=out_dir), "writing the SR")(work)
    work.timings["total_s"] = time.perf_counter() - t
    return work


def log_model(model: ZeroShotModel) -> None:
    """The model, the device it runs on (and what was asked for), its intended use; a warning when the
    embedded demo model decides."""
    package = model.package
    log.info(
        "model %s %s (%s); device %s (requested %s; ONNX Runtime providers: %s); intended use: %s",
        package.name,
        package.version,
        package.root,
        model.device,
        model.requested_device,
        ", ".join(model.providers),
        package.intended_use,
    )
    if is_embedded_demo(package):
        log.warning("the embedded demo model decides: it knows synthetic phantoms, not patients")
