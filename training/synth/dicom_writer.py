"""Write a synthetic HU volume as a real CT Image Storage series (one file per slice).

Geometry follows the patient position: head-first supine (HFS) series have
ImageOrientationPatient 1\\0\\0\\0\\1\\0, feet-first supine (FFS) -1\\0\\0\\0\\1\\0 (rows run toward the
patient's right), so the same anatomy is stored mirrored and in the opposite slice order, as a
scanner would store it. Pixel data: 16-bit unsigned, 12 bits stored, RescaleIntercept -1024.
Identities are synthetic. UIDs derive from the corpus seed and study id, so a corpus is
byte-for-byte reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from operators import __version__

from .raster import Grid

UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's prefix for generated UIDs


@dataclass(frozen=True)
class SeriesIdentity:
    study_id: str
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    age: int
    study_date: str
    study_time: str
    study_uid: str
    series_uid: str
    frame_uid: str
    accession: str


def make_identity(study_id: str, seed: int, age: int, sex: str) -> SeriesIdentity:
    rng = np.random.default_rng([seed, int.from_bytes(study_id.encode(), "little") % (2**32)])
    study_day = date(2020, 1, 1) + timedelta(days=int(rng.integers(0, 5 * 365)))
    birth = study_day - timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
    ent = [str(seed), study_id]
    return SeriesIdentity(
        study_id=study_id,
        patient_name=f"SYNTHETIC^{study_id}",
        patient_id=f"SYN-{study_id}",
        birth_date=birth.strftime("%Y%m%d"),
        sex=sex,
        age=age,
        study_date=study_day.strftime("%Y%m%d"),
        study_time=f"{int(rng.integers(7, 20)):02d}{int(rng.integers(0, 60)):02d}00",
        study_uid=generate_uid(UID_PREFIX, ent + ["study"]),
        series_uid=generate_uid(UID_PREFIX, ent + ["series"]),
        frame_uid=generate_uid(UID_PREFIX, ent + ["frame"]),
        accession=study_id[-16:],
    )


def _slice_order(nz: int, position: str) -> list[int]:
    """The z index of each instance, in instance order: head to feet (HFS) or feet to head (FFS)."""
    return list(range(nz))[::-1] if position == "HFS" else list(range(nz))


def _as_stored(volume: np.ndarray, position: str) -> np.ndarray:
    """[x, y, z] as the series stores it: FFS columns run toward patient right."""
    return volume if position == "HFS" else volume[::-1]


def write_lesion_seg(
    masks: dict[str, np.ndarray], ct_paths: list[Path], out: str | Path, position: str, seed: int = 0
) -> Path | None:
    """The phantom's lesion masks (finding id -> bool [x, y, z] on the series' grid) as a DICOM
    Segmentation of the CT series ``ct_paths`` (as ``write_ct_series`` returned them): one segment per
    finding, coded as the catalogue codes it, in the series' frame of reference. None without masks."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from operators.contract.findings import load_catalogue
    from operators.localisation import segment_description, segmentation_type

    if not masks:
        return None
    by_id = {f.id: f for f in load_catalogue()}
    ids = [fid for fid in by_id if fid in masks]  # catalogue order
    source = [pydicom.dcmread(p) for p in ct_paths]
    slices = _slice_order(masks[ids[0]].shape[2], position)
    if len(slices) != len(source):
        raise ValueError(f"{len(source)} CT instances for masks of {len(slices)} slices")
    stack = np.stack([_as_stored(masks[fid], position) for fid in ids], axis=-1)  # x, y, z, segment
    frames = np.stack([stack[:, :, k, :].transpose(1, 0, 2) for k in slices])  # frame, row = y, column = x
    descriptions = [
        segment_description(
            n,
            by_id[fid].display,
            by_id[fid].code,
            "ct-zeroshot synthetic phantom",
            __version__,
            codes.DCM.AnalyticalAlgorithm,
        )
        for n, fid in enumerate(ids, start=1)
    ]
    ref = source[0]
    seg = hd.seg.Segmentation(
        source_images=source,
        pixel_array=frames,
        **segmentation_type(frames.shape[1], frames.shape[2]),  # frames that archives can serve one by one
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(UID_PREFIX, [str(seed), ref.StudyInstanceUID, "lesion-seg"]),
        series_number=90,
        sop_instance_uid=generate_uid(UID_PREFIX, [str(seed), ref.StudyInstanceUID, "lesion-seg", "1"]),
        instance_number=1,
        manufacturer="ct-zeroshot",
        manufacturer_model_name="synthetic abdominal phantom",
        software_versions=__version__,
        device_serial_number="0",
        series_description="LESION MASKS (PHANTOM TRUTH)",
        omit_empty_frames=True,
    )
    out = Path(out)
    seg.save_as(out)
    return out


def write_ct_series(
    hu: np.ndarray, grid: Grid, out_dir: str | Path, ident: SeriesIdentity, position: str = "HFS", seed: int = 0
) -> list[Path]:
    """Write ``hu`` (indexed [x, y, z] in LPS on ``grid``) as a CT series; returns the file paths."""
    if position not in ("HFS", "FFS"):
        raise ValueError(f"position must be HFS or FFS, got {position!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nx, ny, nz = hu.shape
    dx, dy, dz = grid.spacing
    stored = _as_stored(np.clip(np.rint(hu) + 1024, 0, 4095).astype(np.uint16), position)
    slices = _slice_order(nz, position)
    if position == "HFS":
        iop = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        x0 = grid.origin[0]
    else:
        iop = [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        x0 = grid.origin[0] + (nx - 1) * dx
    paths = []
    for inst, k in enumerate(slices, start=1):
        z = grid.origin[2] + k * dz
        sop_uid = generate_uid(UID_PREFIX, [str(seed), ident.study_id, "sop", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out_dir / f"CT{inst:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ident.study_date
        ds.StudyTime = ident.study_time
        ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = ident.study_time
        ds.AccessionNumber = ident.accession
        ds.Modality = "CT"
        ds.Manufacturer = "ct-zeroshot"
        ds.ManufacturerModelName = "synthetic abdominal phantom"
        ds.SoftwareVersions = __version__
        ds.InstitutionName = "Synthetic"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT ABDOMEN PELVIS WITH IV CONTRAST"
        ds.SeriesDescription = f"AXIAL {dz:g}MM PORTAL VENOUS"
        ds.PatientName = ident.patient_name
        ds.PatientID = ident.patient_id
        ds.PatientBirthDate = ident.birth_date
        ds.PatientSex = ident.sex
        ds.PatientAge = f"{ident.age:03d}Y"
        ds.BodyPartExamined = "ABDOMEN"
        ds.SliceThickness = f"{dz:g}"
        ds.KVP = "120"
        ds.ContrastBolusAgent = "IV iodinated contrast"
        ds.PatientPosition = position
        ds.StudyInstanceUID = ident.study_uid
        ds.SeriesInstanceUID = ident.series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = inst
        ds.ImagePositionPatient = [f"{x0:.4f}", f"{grid.origin[1]:.4f}", f"{z:.4f}"]
        ds.ImageOrientationPatient = [f"{v:g}" for v in iop]
        ds.FrameOfReferenceUID = ident.frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.PixelSpacing = [f"{dy:.6g}", f"{dx:.6g}"]  # (between rows, between columns)
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows = y, columns = x
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
