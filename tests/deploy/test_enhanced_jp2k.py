"""Enhanced CT (one multi-frame instance, geometry in functional groups) and JPEG 2000 input: made here from one
classic uncompressed synthetic study, they must give the same volume and the same findings, be taken by the
listener, and a malformed Enhanced CT must be refused by file name."""

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from operators.contract.dicom_series import (
    ENHANCED_CT_IMAGE_STORAGE,
    read_series,
    scan_tree,
    series_to_volume,
)
from operators.contract.volume import VolumeError
from operators.pipeline import SeriesToModelInput, StudyWork, select_series, sr_filename
from training.synth.dicom_writer import make_identity, write_ct_series
from training.synth.raster import Grid

# copied from the classic instances to the Enhanced CT (patient, study, series, frame of reference, equipment)
_COPIED = (
    "SpecificCharacterSet",
    "StudyDate",
    "SeriesDate",
    "StudyTime",
    "SeriesTime",
    "AccessionNumber",
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "InstitutionName",
    "ReferringPhysicianName",
    "StudyDescription",
    "SeriesDescription",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "BodyPartExamined",
    "PatientPosition",
    "StudyID",
    "SeriesNumber",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)


def _item(**values) -> Dataset:
    ds = Dataset()
    for k, v in values.items():
        setattr(ds, k, v)
    return ds


def _reidentify(ds: Dataset, tag: str) -> None:
    """Another study made of the same pixels: new study, series and instance UIDs (derived, reproducible)."""
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(ds.StudyInstanceUID), tag])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(ds.SeriesInstanceUID), tag])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), tag])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def make_enhanced(
    classic: list[Path], out: Path, tag: str, shared: bool = True, frame_order: list[int] | None = None
) -> Path:
    """An Enhanced CT Image Storage instance of the classic series' slices, hand-built: plane position per
    frame; orientation, pixel measures and the CT pixel value transformation in the Shared Functional Groups
    Sequence (``shared``) or repeated in every frame's Per-frame item. ``frame_order``: the classic instances
    in the order the frames are stored (default: as given)."""
    src = [pydicom.dcmread(p) for p in classic]
    src = [src[i] for i in frame_order] if frame_order is not None else src
    first = src[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(ENHANCED_CT_IMAGE_STORAGE)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for k in _COPIED:
        if k in first:
            setattr(ds, k, first[k].value)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = first.StudyInstanceUID, first.SeriesInstanceUID
    ds.SOPInstanceUID = first.SOPInstanceUID
    _reidentify(ds, tag)
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = first.StudyDate, first.StudyTime
    ds.AcquisitionDateTime = f"{first.StudyDate}{first.StudyTime}"
    ds.AcquisitionNumber = 1
    ds.AcquisitionDuration = 1.0
    ds.ContentQualification = "PRODUCT"
    ds.DeviceSerialNumber = "0"
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionContextSequence = Sequence()
    ds.NumberOfFrames = len(src)
    dim_uid = generate_uid(entropy_srcs=[tag, "dimension"])
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=dim_uid)]
    ds.DimensionIndexSequence = [
        _item(
            DimensionOrganizationUID=dim_uid,
            DimensionIndexPointer=0x00200032,  # ImagePositionPatient
            FunctionalGroupPointer=0x00209113,  # PlanePositionSequence
            DimensionDescriptionLabel="Image Position",
        )
    ]
    event = generate_uid(entropy_srcs=[tag, "irradiation"])

    def geometry(s: Dataset) -> dict:
        return {
            "PixelMeasuresSequence": [_item(PixelSpacing=s.PixelSpacing, SliceThickness=s.SliceThickness)],
            "PlaneOrientationSequence": [_item(ImageOrientationPatient=s.ImageOrientationPatient)],
            "PixelValueTransformationSequence": [
                _item(RescaleIntercept=s.RescaleIntercept, RescaleSlope=s.RescaleSlope, RescaleType="HU")
            ],
            "CTImageFrameTypeSequence": [
                _item(
                    FrameType=["ORIGINAL", "PRIMARY", "AXIAL", "NONE"],
                    PixelPresentation="MONOCHROME",
                    VolumetricProperties="VOLUME",
                    VolumeBasedCalculationTechnique="NONE",
                )
            ],
            "IrradiationEventIdentificationSequence": [_item(IrradiationEventUID=event)],
        }

    frames = []
    positions = sorted(float(s.ImagePositionPatient[2]) for s in src)
    for s in src:
        item = _item(
            PlanePositionSequence=[_item(ImagePositionPatient=s.ImagePositionPatient)],
            FrameContentSequence=[
                _item(
                    StackID="1",
                    InStackPositionNumber=positions.index(float(s.ImagePositionPatient[2])) + 1,
                    DimensionIndexValues=[positions.index(float(s.ImagePositionPatient[2])) + 1],
                )
            ],
        )
        if not shared:
            for k, v in geometry(s).items():
                setattr(item, k, v)
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.SharedFunctionalGroupsSequence = [_item(**geometry(first)) if shared else _item()]
    ds.PixelData = b"".join(s.PixelData for s in src)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def make_jpeg2000(paths: list[Path], out_dir: Path, syntax, tag: str) -> list[Path]:
    """The files re-encoded in JPEG 2000 by pydicom (pylibjpeg-openjpeg), under new UIDs: another study.
    JPEG 2000 (.91) with compression ratio 1: lossless, as ``JPEG2000Lossless`` (.90)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for p in paths:
        ds = pydicom.dcmread(p)
        _reidentify(ds, tag)
        if syntax == JPEG2000:
            ds.compress(syntax, j2k_cr=[1])
        else:
            ds.compress(syntax)
        ds.save_as(out_dir / p.name, enforce_file_format=True)
        written.append(out_dir / p.name)
    return written


N_SLICES = 12


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict:
    """One classic uncompressed study (48 x 40 pixels: JPEG 2000 needs 32 or more for its resolution levels,
    and rows != columns catches swapped axes) and the copies, each another study: Enhanced CT (functional
    groups shared, frames stored shuffled; and per frame), JPEG 2000 lossless and .91, an Enhanced CT in
    JPEG 2000 lossless, and one deflated."""
    root = tmp_path_factory.mktemp("enhanced")
    grid = Grid((48, 40, N_SLICES), (4.0, 3.5, 5.0), (-96.0, -70.0, 0.0))
    rng = np.random.default_rng(7)
    hu = rng.normal(0, 60, size=grid.shape).astype(np.float32)
    hu[10:30, 8:30, 3:9] += 400.0  # something for the model to see
    classic = sorted(write_ct_series(hu, grid, root / "tree" / "classic", make_identity("ENH", 0, 60, "F")))
    shuffled = list(rng.permutation(len(classic)))
    tree = root / "tree"
    made = {
        "classic": classic,
        "enhanced": [make_enhanced(classic, tree / "enhanced" / "ct.dcm", "enhanced", frame_order=shuffled)],
        "enhanced_per_frame": [make_enhanced(classic, tree / "per_frame" / "ct.dcm", "per-frame", shared=False)],
        "jpeg2000_lossless": make_jpeg2000(classic, tree / "j2k90", JPEG2000Lossless, "j2k90"),
        "jpeg2000": make_jpeg2000(classic, tree / "j2k91", JPEG2000, "j2k91"),
    }
    enhanced_j2k = tree / "enhanced_j2k" / "ct.dcm"
    ds = pydicom.dcmread(make_enhanced(classic, enhanced_j2k, "enhanced-j2k"))
    ds.compress(JPEG2000Lossless)
    ds.save_as(enhanced_j2k, enforce_file_format=True)
    made["enhanced_jpeg2000"] = [enhanced_j2k]
    deflated = tree / "enhanced_deflated" / "ct.dcm"
    ds = pydicom.dcmread(make_enhanced(classic, deflated, "enhanced-deflated", shared=False))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(deflated, enforce_file_format=True)
    made["enhanced_deflated"] = [deflated]
    uids = {
        name: str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID) for name, files in made.items()
    }
    assert len(set(uids.values())) == len(made)
    return {"root": root, "tree": tree, "files": made, "uids": uids, "hu": hu}


def _pipeline_volume(folder: Path):
    """The pipeline's read: headers from the scan, pixels from the files at the recorded offsets."""
    ((_, series),) = scan_tree(folder).studies().items()
    (s,) = series
    return series_to_volume(s.headers, [str(p) for p in s.paths], offsets=s.pixel_offsets), s


def test_every_copy_reads_as_the_classic_volume(studies):
    classic, s = _pipeline_volume(studies["files"]["classic"][0].parent)
    assert s.slices == N_SLICES and classic.array.shape == (48, 40, N_SLICES)
    expected = np.clip(np.rint(studies["hu"]), -1024, 3071)
    assert np.array_equal(classic.array, expected)
    for name, files in studies["files"].items():
        vol, s = _pipeline_volume(files[0].parent)
        assert s.slices == N_SLICES, name
        assert np.array_equal(vol.array, classic.array), name
        assert np.array_equal(vol.affine, classic.affine), name
        whole = read_series(files)  # full datasets (``load_dicom_folder``, the CLI's convert)
        assert np.array_equal(whole.array, classic.array) and np.array_equal(whole.affine, classic.affine), name
    j2k = pydicom.dcmread(studies["files"]["jpeg2000"][0])
    assert str(j2k.file_meta.TransferSyntaxUID) == JPEG2000


@pytest.fixture(scope="module")
def demo():
    """The embedded demo model (no localisation output) and its package."""
    from operators.contract.package import default_package_dir, load_package
    from operators.contract.scoring import ZeroShotModel

    pkg = load_package(default_package_dir())
    return pkg, ZeroShotModel(pkg, device="cpu", maps=False)


def test_the_batch_gives_the_same_findings_for_every_copy(studies, demo, monkeypatch):
    """``ct-zeroshot infer``'s worker (``batch._process``: selection, reading, the model, the SR, the summary
    row) in this process with the embedded demo model: the same probabilities and slice count for every copy;
    the Enhanced CT's SR names its one instance (Enhanced CT Image Storage) as evidence; a resumed row rebuilt
    from the SR counts the Enhanced CT's frames."""
    from operators import batch
    from operators.sr import read_findings

    pkg, model = demo
    out = studies["root"] / "batch-out"
    monkeypatch.setattr(batch, "_WORKER", {"model": model, "prep": SeriesToModelInput(pkg.spec), "out": out})
    discovered = batch._discover(studies["tree"], "local")
    assert set(discovered) == set(studies["uids"].values())
    probabilities = {}
    for name, uid in studies["uids"].items():
        row = batch._process(uid, discovered[uid])
        assert row["status"] == "ok" and row["slices"] == N_SLICES, (name, row["error"])
        probabilities[name] = np.array([row[f"{fid}.probability"] for fid in pkg.catalogue.ids])
        sr = pydicom.dcmread(out / sr_filename(uid))
        refs = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
        if name.startswith("enhanced"):
            assert [str(r.ReferencedSOPClassUID) for r in refs] == [ENHANCED_CT_IMAGE_STORAGE]
        else:
            assert len(refs) == N_SLICES
        back = read_findings(out / sr_filename(uid))
        assert [back[fid]["score"] for fid in pkg.catalogue.ids] == pytest.approx(probabilities[name], abs=1e-5)
        resumed = batch._resumed_row(out / sr_filename(uid), uid, pkg, None, discovered[uid])
        assert resumed["series_uid"] == row["series_uid"] and resumed["slices"] == N_SLICES, name
    for name, p in probabilities.items():
        assert np.abs(p - probabilities["classic"]).max() <= 1e-5, name
    if shutil.which("dciodvfy") and shutil.which("dsrdump"):  # the SR whose evidence is an Enhanced CT
        from tests.sr_validators import dciodvfy, dsrdump

        sr = out / sr_filename(studies["uids"]["enhanced"])
        assert not dciodvfy(sr) and not dsrdump(sr), (dciodvfy(sr), dsrdump(sr))


def test_the_listener_takes_enhanced_ct_and_jpeg2000_and_reports_them(studies, demo, tmp_path):
    """Over a real association: Enhanced CT Image Storage and the JPEG 2000 transfer syntaxes are accepted
    at negotiation, the instances stored as received; the spooled Enhanced CT in JPEG 2000 gets its SR."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage  # type: ignore[attr-defined]

    from operators.listener.config import DimseDestination, ListenerConfig, Peer
    from operators.listener.service import ACCEPTED_TRANSFER_SYNTAXES, Listener
    from operators.sr import read_findings
    from tests.deploy.pacs import free_port

    assert {JPEG2000Lossless, JPEG2000} <= set(ACCEPTED_TRANSFER_SYNTAXES)
    cfg = ListenerConfig(
        allowed=[Peer(ae_title="SENDER")],
        destination=DimseDestination(ae_title="PACS", host="127.0.0.1", port=free_port()),  # nothing listens there
        spool=str(tmp_path / "spool"),
        retries=1,
        backoff_s=0.01,
        redeliver_max_s=3600.0,
        port=free_port(),
        idle_timeout_s=3600.0,  # completed by the test
    )
    listener = Listener(cfg)  # no model named: the embedded demo model
    try:
        listener.start()
        ae = AE(ae_title="SENDER")
        offered = [
            (EnhancedCTImageStorage, JPEG2000Lossless),
            (EnhancedCTImageStorage, ExplicitVRLittleEndian),
            (CTImageStorage, JPEG2000Lossless),
            (CTImageStorage, JPEG2000),
        ]
        for sop_class, syntax in offered:  # one presentation context each: each is accepted or not on its own
            ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate("127.0.0.1", cfg.port, ae_title=cfg.ae_title)
        assert assoc.is_established
        accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
        assert accepted == set(offered)
        sent = [*studies["files"]["enhanced_jpeg2000"], *studies["files"]["jpeg2000"]]
        try:
            statuses = [assoc.send_c_store(pydicom.dcmread(p)).Status for p in sent]
        finally:
            assoc.release()
        assert statuses == [0x0000] * len(sent)
        uid = studies["uids"]["enhanced_jpeg2000"]
        (held,) = listener.spool.path("incoming", uid).glob("*.dcm")
        assert held.read_bytes()[-4096:] == sent[0].read_bytes()[-4096:]  # stored as received
        listener.spool.complete(uid)
        listener._attempt(uid)  # processed; its delivery fails (nothing listens) and is retried later
        (sr,) = listener.spool.path("out", uid).glob("SR_*.dcm")
    finally:
        listener.shutdown()
    pkg, model = demo
    work = SeriesToModelInput(pkg.spec)(select_series(StudyWork(uid, scan_tree(sent[0]).studies()[uid])))
    expected = model.score(work.tensor)
    back = read_findings(sr)
    assert [back[fid]["score"] for fid in pkg.catalogue.ids] == pytest.approx(expected.probabilities, abs=1e-5)


def _malformed(studies, tmp_path: Path, change) -> Path:
    path = tmp_path / "bad" / "ct.dcm"
    path.parent.mkdir(parents=True)
    shutil.copy(studies["files"]["enhanced"][0], path)
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)
    return path


def _drop_position(ds):
    del ds.PerFrameFunctionalGroupsSequence[4].PlanePositionSequence


def _drop_rescale(ds):
    del ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence


def _short_pixels(ds):
    ds.PixelData = ds.PixelData[: len(ds.PixelData) - 48 * 40 * 2]  # one frame short


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda ds: delattr(ds, "PerFrameFunctionalGroupsSequence"), "without PerFrameFunctionalGroupsSequence"),
        (lambda ds: setattr(ds, "NumberOfFrames", 13), "NumberOfFrames is 13 but PerFrameFunctionalGroupsSequence"),
        (lambda ds: delattr(ds, "NumberOfFrames"), "without NumberOfFrames"),
        (_drop_position, "frame 5: missing ImagePositionPatient (PlanePositionSequence"),
        (_drop_rescale, "frame 1: RescaleSlope is missing"),
        (_short_pixels, "pixel data"),
    ],
    ids=["no-per-frame-groups", "frame-count", "no-frame-count", "no-position", "no-rescale", "short-pixels"],
)
def test_a_malformed_enhanced_ct_is_refused_by_file_name(studies, tmp_path, change, expected):
    """The reader names the file (and frame) and what is missing; the pipeline fails the study with that
    reason (at selection or reading), never with a traceback."""
    path = _malformed(studies, tmp_path, change)
    ((uid, series),) = scan_tree(path.parent).studies().items()
    (s,) = series
    with pytest.raises(VolumeError) as err:
        series_to_volume(s.headers, [str(p) for p in s.paths], offsets=s.pixel_offsets)
    assert str(err.value).startswith(str(path)) and expected in str(err.value), str(err.value)
    work = select_series(StudyWork(uid, series))
    if not work.failed:  # functional groups fine, the pixels not: refused when read
        from operators.contract.package import default_package_dir, load_package

        work = SeriesToModelInput(load_package(default_package_dir()).spec)(work)
    assert work.failed and str(path) in work.reason and expected in work.reason, work.reason


def test_a_seg_of_an_enhanced_ct_references_the_frames_where_the_map_is(studies, demo):
    """Maps on an Enhanced CT (frames stored shuffled; functional groups per frame): the SEG's frames follow the
    source's frame order, and each references the Enhanced CT frame at the position the classic series' SEG
    puts it; the SEG passes dciodvfy."""
    from operators.localisation import FindingMap, StudyMaps, build_seg

    pkg, _ = demo
    positions = {}
    for name in ("classic", "enhanced", "enhanced_per_frame"):
        vol, s = _pipeline_volume(studies["files"][name][0].parent)
        region = np.zeros(vol.array.shape, dtype=bool)
        region[5:20, 10:30, 2:5] = True  # slices 2, 3, 4 of the volume
        maps = StudyMaps([FindingMap(0, pkg.catalogue.ids[0], region, (0.0, 0.0, 0.0))], vol.affine)
        seg, segments = build_seg(s.headers, maps, pkg, generate_uid(), generate_uid())
        assert segments == {0: 1}
        if name != "classic":  # highdicom gets a copy with the groups it reads shared; the header is unchanged
            assert s.headers[0] == pydicom.dcmread(s.paths[0], stop_before_pixels=True)
        frames = seg.PerFrameFunctionalGroupsSequence
        positions[name] = [tuple(float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient) for f in frames]
        pixels = seg.pixel_array.reshape(len(frames), 40, 48)
        assert all(np.array_equal(p, region[:, :, 2].T) for p in pixels)  # the region's in-plane shape
        if name != "classic":
            source = pydicom.dcmread(studies["files"][name][0], stop_before_pixels=True)
            for f, pos in zip(frames, positions[name]):
                ref = f.DerivationImageSequence[0].SourceImageSequence[0]
                assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
                n = int(ref.ReferencedFrameNumber)
                at = source.PerFrameFunctionalGroupsSequence[n - 1].PlanePositionSequence[0].ImagePositionPatient
                assert tuple(float(v) for v in at) == pos
            if shutil.which("dciodvfy"):
                from tests.sr_validators import dciodvfy

                seg.save_as(studies["root"] / f"seg-{name}.dcm")
                assert not dciodvfy(studies["root"] / f"seg-{name}.dcm"), name
    assert len(positions["classic"]) == 3
    assert sorted(positions["enhanced"]) == sorted(positions["enhanced_per_frame"]) == sorted(positions["classic"])
