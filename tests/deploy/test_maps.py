"""Where a present finding is: the localisation output, its maps on the CT, the SEG and the SR's references."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from benchmarks.map_regions import region_scores
from operators.contract.dicom_series import scan_tree, series_geometry
from operators.contract.package import load_package
from operators.contract.preprocessing import PreprocessSpec, model_input_affine, preprocess
from operators.contract.scoring import ZeroShotModel
from operators.contract.volume import Volume
from operators.localisation import REGION_FRACTION, finding_directions, map_affine, map_region, on_volume
from operators.pipeline import SeriesToModelInput, StudyWork, infer, select_series, write_report
from operators.sr import read_findings
from tests.dicom_cases import without_stamps
from tests.sr_validators import dciodvfy, have_validators, validate_all

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.mark.parametrize(
    "affine",
    [
        np.diag([-0.8, -0.8, 2.5, 1.0]),  # head first, as a DICOM series reads
        np.array([[0, 0.9, 0, 5], [1.1, 0, 0, -20], [0, 0, -1.5, 40], [0, 0, 0, 1.0]]),  # permuted and flipped
    ],
)
def test_a_map_location_lands_where_the_model_saw_it(affine):
    """A hot location of a coarse map over the model input comes back on the CT volume at that place."""
    spec = PreprocessSpec(spacing=(2.0, 2.0, 3.0), spatial_size=(24, 24, 16))  # inside the CT's field of view
    shape = (90, 80, 60)
    inp = model_input_affine(shape, affine, spec)
    # the model input's voxel centres are where preprocessing samples the CT: check one with a ramp volume
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    ras_x = (ijk @ affine[:3, :3].T + affine[:3, 3])[..., 0].astype(np.float32)
    x = preprocess(Volume(ras_x, affine), spec)[0]
    v = np.array(spec.spatial_size) // 2
    assert x[tuple(v)] * 2000 - 1000 == pytest.approx((inp @ np.r_[v, 1])[0], abs=0.01)
    coarse = np.zeros((4, 4, 4))
    coarse[2, 1, 2] = 1.0
    grid = map_affine(inp, spec.spatial_size, coarse.shape)
    field = on_volume(coarse, grid, shape, affine)
    peak = np.unravel_index(np.argmax(field), field.shape)
    want = np.linalg.solve(affine, grid @ np.r_[2, 1, 2, 1.0])[:3]
    assert np.abs(np.asarray(peak) - want).max() <= 0.5 + 1e-6
    assert 0.75 < field.max() <= 1.0 and field.min() >= 0.0  # the centre lies between CT voxels


def test_a_region_is_the_upper_part_of_its_maps_range_and_is_scored_against_the_lesion():
    """The region holds the voxels at least REGION_FRACTION of the way from the map's lowest value on the CT to its
    highest (a flat map: none); the region benchmark's scores (voxels, slices, Dice, lesion covered) are
    those of the arrays."""
    field = np.linspace(-2.0, 2.0, 5 * 4 * 10).reshape(5, 4, 10)
    region = map_region(field)
    assert np.array_equal(region, field >= -2.0 + REGION_FRACTION * 4.0)
    assert 0 < region.sum() < region.size
    assert not map_region(np.full((5, 4, 10), 0.3)).any()
    region = np.zeros((4, 4, 10), dtype=bool)
    region[:2, :, 3:5] = True  # 16 voxels on 2 of 10 slices
    lesion = np.zeros_like(region)
    lesion[1:3, :, 4] = True  # 8 voxels, 4 of them in the region
    assert region_scores(region, lesion) == pytest.approx(
        {"voxels": 16 / 160, "slices": 0.2, "dice": 2 * 4 / 24, "covered": 0.5}
    )


@pytest.fixture(scope="module")
def mapped(corpus200, tiny_package, tmp_path_factory):
    """One study through the stages with the package's maps, two findings called present (one catalogue code
    of SNOMED, one of the private scheme), the SR and SEG written."""
    pkg = load_package(tiny_package["pkg"])
    model = ZeroShotModel(pkg, device="cpu", maps=True)
    truth = [json.loads(line) for line in (corpus200 / "ground_truth.jsonl").read_text().splitlines()]
    sid = next(t["study id"] for t in truth if t["position"] == "FFS")
    ((uid, series),) = scan_tree(corpus200 / "dicom" / sid).studies().items()
    work = SeriesToModelInput(pkg.spec)(select_series(StudyWork(uid, series)))
    tensor = work.tensor
    work = infer(work, model)
    private = pkg.catalogue.private_scheme.scheme
    assessed = [f for f, ok in zip(pkg.catalogue, work.findings.assessed) if ok]  # not "undetermined"
    chosen = [
        next(f.id for f in assessed if f.code.scheme != private),
        next(f.id for f in assessed if f.code.scheme == private),
    ]
    present = np.isin(np.asarray(work.findings.ids), chosen)
    work.findings = dataclasses.replace(work.findings, present=present)
    out = tmp_path_factory.mktemp("maps")
    work = write_report(work, model, out)
    assert work.status == "ok", work.reason
    return {"work": work, "model": model, "pkg": pkg, "tensor": tensor, "chosen": chosen, "out": out}


def test_the_map_is_each_locations_share_of_the_score(mapped):
    """The localisation output's spatial mean is the embedding, so a finding's map averages to its margin."""
    model, tensor = mapped["model"], mapped["tensor"]
    emb, loc = model.embed_images_with_maps(tensor[None])
    np.testing.assert_allclose(loc[0].mean(axis=(1, 2, 3)), emb[0], atol=1e-5)
    idx = [mapped["work"].findings.ids.index(f) for f in mapped["chosen"]]
    maps = np.einsum("dxyz,fd->fxyz", loc[0].astype(np.float64), finding_directions(mapped["pkg"], idx))
    np.testing.assert_allclose(maps.mean(axis=(1, 2, 3)), mapped["work"].findings.margins[idx], atol=1e-5)


@pytest.mark.skipif(not have_validators(), reason="dciodvfy, dsrdump and PixelMed (pixelmed-apps) needed")
def test_the_seg_and_the_srs_references_validate_in_the_cts_frame(mapped):
    work, pkg = mapped["work"], mapped["pkg"]
    assert work.seg_path is not None and work.seg_path.name == f"SEG_{work.study_uid}.dcm"
    assert not dciodvfy(work.seg_path)
    assert not validate_all([work.sr_path]), validate_all([work.sr_path])
    seg = pydicom.dcmread(work.seg_path)
    headers = work.series_chosen().headers
    ct_for = headers[0].FrameOfReferenceUID
    assert seg.FrameOfReferenceUID == ct_for and seg.StudyInstanceUID == work.study_uid
    assert (seg.Rows, seg.Columns) == (headers[0].Rows, headers[0].Columns)  # what viewers (OHIF) require
    # Each frame starts on a byte, so an archive can serve it alone (WADO-RS frames, as OHIF asks): bit-packed
    # BINARY only where a frame's pixels fill whole bytes, else one byte per pixel (FRACTIONAL, 0 or 1).
    pixels = seg.Rows * seg.Columns
    assert seg.SegmentationType == ("BINARY" if pixels % 8 == 0 else "FRACTIONAL")
    assert pixels * seg.BitsAllocated % 8 == 0
    if seg.SegmentationType == "FRACTIONAL":
        assert seg.SegmentationFractionalType == "OCCUPANCY" and seg.MaximumFractionalValue == 1
        assert set(np.unique(seg.pixel_array)) == {0, 1}
    by_code = {f.code.value: f.id for f in pkg.catalogue}
    segments = {
        int(s.SegmentNumber): by_code[s.SegmentedPropertyTypeCodeSequence[0].CodeValue] for s in seg.SegmentSequence
    }
    assert sorted(segments.values()) == sorted(mapped["chosen"])
    colours = [tuple(s.RecommendedDisplayCIELabValue) for s in seg.SegmentSequence]  # shown as given, distinct
    assert len(set(colours)) == len(colours)
    ct_uids = {h.SOPInstanceUID for h in headers}
    frame_segment = [
        int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber) for f in seg.PerFrameFunctionalGroupsSequence
    ]
    for f in seg.PerFrameFunctionalGroupsSequence:  # each frame derives from a slice of the series
        assert f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID in ct_uids

    findings = read_findings(work.sr_path)
    affine, _ = series_geometry(headers, [str(p) for p in work.series_chosen().paths])
    corners = np.array(
        [
            [i, j, k, 1.0]
            for i in (0, headers[0].Columns - 1)
            for j in (0, headers[0].Rows - 1)
            for k in (0, len(headers) - 1)
        ]
    )
    box = (LPS @ affine @ corners.T).T[:, :3]
    for fid, f in findings.items():
        if fid not in mapped["chosen"]:
            assert "map" not in f and "peak_lps" not in f
            continue
        assert f["present"] and f["frame_of_reference"] == ct_for
        assert f["map"]["seg"] == seg.SOPInstanceUID
        number = next(n for n, name in segments.items() if name == fid)
        assert f["map"]["frames"] == [n for n, s in enumerate(frame_segment, start=1) if s == number]
        peak = np.asarray(f["peak_lps"])
        assert (peak >= box.min(0) - 1e-3).all() and (peak <= box.max(0) + 1e-3).all()  # inside the CT


def test_maps_are_asked_for_by_name_or_made_when_the_package_can(tiny_package, corpus200, tmp_path):
    """--maps with a package without the output is refused before anything is written; by default maps are
    made when the package has the output, and --no-maps (False) turns them off."""
    from operators.contract.package import default_package_dir

    demo = load_package(default_package_dir())
    if demo.image_encoder.localisation is None:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "operators.cli",
                "infer",
                str(corpus200 / "dicom"),
                "--out",
                str(tmp_path / "o"),
                "--maps",
            ],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2 and "no localisation output" in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "o" / "sr").exists() or not any((tmp_path / "o" / "sr").iterdir())
    assert ZeroShotModel(load_package(tiny_package["pkg"]), device="cpu", maps=None).maps
    assert not ZeroShotModel(load_package(tiny_package["pkg"]), device="cpu", maps=False).maps


def test_the_listeners_maps_key_is_checked(tmp_path):
    """``maps:`` must be true or false; true with a package without the localisation output is refused at start."""
    import yaml

    from operators.contract.package import PackageError, default_package_dir
    from operators.listener.config import ListenerConfig
    from operators.listener.service import Listener

    base = {
        "allowed": [{"ae_title": "PACS", "host": "127.0.0.1"}],
        "destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
        "spool": str(tmp_path / "spool"),
    }
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**base, "maps": "yes"}))
    with pytest.raises(ValueError, match="maps: expected a valid boolean, got .yes."):
        ListenerConfig.load(tmp_path / "bad.yaml")
    (tmp_path / "on.yaml").write_text(yaml.safe_dump({**base, "maps": True}))
    cfg = ListenerConfig.load(tmp_path / "on.yaml")
    assert cfg.maps is True
    if load_package(default_package_dir()).image_encoder.localisation is None:  # the embedded demo model
        with pytest.raises(PackageError, match="no localisation output"):
            Listener(cfg)


def _comparable(ds: pydicom.Dataset) -> dict:
    """``ds`` as JSON, less what differs from one build to the next (the clock stamps, the dimension UID)."""
    import copy

    text = json.dumps(without_stamps(copy.deepcopy(ds)).to_json_dict(), sort_keys=True)
    for item in ds.DimensionOrganizationSequence:
        text = text.replace(item.DimensionOrganizationUID, "<dimension organisation>")
    return json.loads(text)


@pytest.mark.parametrize("grid, segments", [("the series' own", 3), ("64 x 64", 3), ("64 x 64", 1)])
def test_the_seg_with_its_frames_packed_here_is_highdicoms_own(mapped, grid, segments):
    """``segmentation_by_frames`` gives highdicom stand-in frames and packs the real ones itself: the result
    equals highdicom's Segmentation of the full pixel array, element for element and byte for byte, for
    overlapping segments with empty planes, bit-packed (a 64 x 64 grid) or one byte per pixel (69 x 69), and
    for one segment (whose groups highdicom shares across the frames)."""
    import highdicom as hd

    from operators.localisation import _resized, segment_description, segmentation_by_frames, segmentation_type

    work, pkg = mapped["work"], mapped["pkg"]
    headers = work.series_chosen().headers
    _, order = series_geometry(headers, [str(p) for p in work.series_chosen().paths])
    source = [headers[k] for k in order]
    if grid != "the series' own":
        source = [_resized(d, 64, 64) for d in source]
    rows, columns = int(source[0].Rows), int(source[0].Columns)
    rng = np.random.default_rng(11)
    regions = np.zeros((3, len(source), rows, columns), dtype=bool)
    regions[0, 2:6, 5:30, 7:40] = True
    regions[1, 4:9, 20:50, 30:60] = True  # overlaps the first on planes 4 and 5
    regions[2, -3:] = rng.random((3, rows, columns)) < 0.3
    regions = regions[:segments]
    findings = list(pkg.catalogue)[:segments]
    kwargs = dict(
        segment_descriptions=[
            segment_description(n, f.display, f.code, pkg.name, pkg.version) for n, f in enumerate(findings, 1)
        ],
        series_instance_uid="1.2.826.0.1.3680043.8.498.21",
        series_number=9001,
        sop_instance_uid="1.2.826.0.1.3680043.8.498.22",
        instance_number=1,
        manufacturer="ct-zeroshot",
        manufacturer_model_name=pkg.name,
        software_versions="1",
        device_serial_number=pkg.uid[:64],
        omit_empty_frames=True,
    )
    fast = segmentation_by_frames(source, regions, **kwargs)
    ref = hd.seg.Segmentation(
        source_images=source,
        pixel_array=np.moveaxis(regions, 0, -1).astype(np.uint8),
        **segmentation_type(rows, columns),
        **kwargs,
    )
    assert fast.SegmentsOverlap == ref.SegmentsOverlap == ("YES" if segments > 1 else "NO")
    assert fast.NumberOfFrames == ref.NumberOfFrames == [4, 4 + 5 + 3][segments > 1]
    assert fast.PixelData == ref.PixelData
    assert _comparable(fast) == _comparable(ref)
    if segments == 1:
        return
    apart = regions.copy()
    apart[1, 4:6] = False  # no plane with both: no overlap
    assert segmentation_by_frames(source, apart, **kwargs).SegmentsOverlap == "NO"
