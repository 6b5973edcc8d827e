"""Small DICOM CT studies for front-end tests, good and broken in the ways real archives are."""

from pathlib import Path

import numpy as np
import pydicom

from training.synth.dicom_writer import make_identity, write_ct_series
from training.synth.raster import Grid

# Set from the clock by highdicom: the only elements allowed to differ between two builds of a document.
STAMPS = ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime", "ContributionDateTime")


def without_stamps(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` with its clock stamps (``STAMPS``) removed, at every depth (in place)."""
    for elem in list(ds):
        if elem.keyword in STAMPS:
            del ds[elem.tag]
        elif elem.VR == "SQ":
            for item in elem.value:
                without_stamps(item)
    return ds


def small_study(root: Path, name: str, n: int = 12, shape=(24, 24)) -> list[Path]:
    grid = Grid((*shape, n), (4.0, 4.0, 5.0), (-46.0, -46.0, 0.0))
    hu = np.random.default_rng(len(name)).normal(0, 40, size=grid.shape).astype(np.float32)
    return sorted(write_ct_series(hu, grid, root / name, make_identity(name, 0, 60, "F")))


def study_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def broken_studies(root: Path) -> dict[str, str]:
    """One study per kind of bad input; returns {StudyInstanceUID: text the failure reason contains}."""
    bad = {}
    mr = small_study(root, "BADMR")
    for p in mr:
        ds = pydicom.dcmread(p)
        ds.Modality, ds.SOPClassUID = "MR", "1.2.840.10008.5.1.4.1.1.4"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.save_as(p)
    bad[study_uid(mr[0])] = "modality MR, not CT"
    one = small_study(root, "BADONE", n=1)
    bad[study_uid(one[0])] = "1 slice(s)"
    mixed = small_study(root, "BADMIXED")
    ds = pydicom.dcmread(mixed[3])
    ds.Rows = 12
    ds.PixelData = ds.PixelData[: 12 * 24 * 2]
    ds.save_as(mixed[3])
    bad[study_uid(mixed[0])] = "different sizes"
    dup = small_study(root, "BADDUP")
    ds = pydicom.dcmread(dup[2])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(dup[0].parent / "dup.dcm")
    bad[study_uid(dup[0])] = "share position"
    trunc = small_study(root, "BADTRUNC")
    data = trunc[5].read_bytes()
    trunc[5].write_bytes(data[: len(data) // 2])
    bad[study_uid(trunc[0])] = trunc[5].name
    return bad


def only_reports(names, study_uids) -> bool:
    """An output folder holds one SR per study and, beside an SR, at most its study's map SEG; nothing else."""
    names, uids = sorted(names), set(study_uids)
    srs = [n for n in names if n.startswith("SR_")]
    segs = [n for n in names if n.startswith("SEG_")]
    return (
        srs == sorted(f"SR_{u}.dcm" for u in uids)
        and {n[len("SEG_") :] for n in segs} <= {n[len("SR_") :] for n in srs}
        and len(srs) + len(segs) == len(names)
    )
