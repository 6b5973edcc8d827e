import shutil

import numpy as np
import pydicom
import pytest

from operators.contract.dicom_series import load_dicom_folder, read_series, scan_tree
from operators.contract.volume import VolumeError
from tests.dicom_cases import small_study
from training.synth.dicom_writer import make_identity, write_ct_series
from training.synth.raster import Grid


@pytest.fixture
def series(tmp_path):
    grid = Grid((24, 24, 8), (4.0, 4.0, 5.0), (-46.0, -46.0, 0.0))
    hu = np.random.default_rng(0).normal(0, 50, size=grid.shape).astype(np.float32)
    paths = write_ct_series(hu, grid, tmp_path / "s", make_identity("BAD", 0, 60, "M"))
    return tmp_path / "s", sorted(paths), hu


def test_reads_good_series(series):
    folder, paths, hu = series
    vol = load_dicom_folder(folder)
    assert vol.array.shape == hu.shape
    assert np.abs(vol.array - np.clip(np.rint(hu), -1024, 3071)).max() == 0


def test_single_slice(series):
    _, paths, _ = series
    with pytest.raises(VolumeError, match="single slice"):
        read_series(paths[:1])


def test_duplicate_positions(series, tmp_path):
    folder, paths, _ = series
    ds = pydicom.dcmread(paths[1])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / "dup.dcm")
    with pytest.raises(VolumeError, match="share position"):
        load_dicom_folder(folder)


def test_mixed_sizes(series):
    folder, paths, _ = series
    ds = pydicom.dcmread(paths[2])
    ds.Rows = 12
    ds.PixelData = ds.PixelData[: 12 * 24 * 2]
    ds.save_as(paths[2])
    with pytest.raises(VolumeError, match="different sizes"):
        load_dicom_folder(folder)


def test_native_decode_names_a_file_truncated_after_the_scan(series):
    """The pipeline's path (headers from the scan, pixels read at the recorded offsets into each thread's
    scratch buffer): a file cut short inside its pixel data is refused by name, not half-read."""
    from operators.contract.dicom_series import series_to_volume

    _, paths, _ = series
    (s,) = scan_tree(paths[0].parent).series.values()
    names = [str(p) for p in s.paths]
    whole = series_to_volume(s.headers, names, offsets=s.pixel_offsets)
    assert np.array_equal(whole.array, load_dicom_folder(paths[0].parent).array)
    data = s.paths[4].read_bytes()
    s.paths[4].write_bytes(data[: len(data) - 100])
    with pytest.raises(VolumeError, match=s.paths[4].name):
        series_to_volume(s.headers, names, offsets=s.pixel_offsets)


def test_uneven_spacing(series):
    folder, paths, _ = series
    paths[3].unlink()
    with pytest.raises(VolumeError, match="uneven slice spacing"):
        load_dicom_folder(folder)


def test_non_dicom_and_truncated_files_are_named(series):
    folder, paths, _ = series
    (folder / "notes.txt").write_text("not dicom")
    with pytest.raises(VolumeError, match="notes.txt"):
        load_dicom_folder(folder)
    (folder / "notes.txt").unlink()
    data = paths[4].read_bytes()
    paths[4].write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match=paths[4].name):
        load_dicom_folder(folder)


def test_scan_tree_groups_by_uid_not_folder(series, tmp_path):
    folder, paths, _ = series
    mixed = tmp_path / "mixed"
    (mixed / "a").mkdir(parents=True)
    (mixed / "b").mkdir()
    for i, p in enumerate(paths):
        shutil.copy(p, mixed / ("a" if i % 2 else "b") / p.name)
    (mixed / "readme.txt").write_text("hello")
    scan = scan_tree(mixed)
    assert len(scan.series) == 1 and len(next(iter(scan.series.values())).paths) == len(paths)
    assert [p.name for p, _ in scan.unreadable] == ["readme.txt"]
    with pytest.raises(VolumeError, match="does not exist"):
        scan_tree(tmp_path / "nope")


def test_links_and_special_files_in_the_input_tree_are_listed_not_read(series, tmp_path):
    """A FIFO would block the scan forever, /dev/zero never ends, a link may lead out of the input tree: none
    is opened; the series beside them reads."""
    import os
    import time

    folder, paths, _ = series
    tree = tmp_path / "tree"
    shutil.copytree(folder, tree)
    outside = tmp_path / "outside.dcm"
    shutil.copy(paths[0], outside)
    os.mkfifo(tree / "pipe")
    (tree / "zero").symlink_to("/dev/zero")
    (tree / "elsewhere.dcm").symlink_to(outside)
    t = time.monotonic()
    scan = scan_tree(tree)
    assert time.monotonic() - t < 30  # the scan returns (a blocked FIFO read would never)
    why = {p.name: reason for p, reason in scan.unreadable}
    assert why == {
        "pipe": "not a regular file (a FIFO, device or socket): not read",
        "zero": "a symbolic link: not followed",
        "elsewhere.dcm": "a symbolic link: not followed",
    }
    ((_, s),) = scan.series.items()
    assert len(s.paths) == len(paths) and not s.damaged
    assert len(scan_tree(tree / paths[0].name).series) == 1  # a file named as the input is read


def test_two_studies_sharing_a_series_uid_stay_two_studies(tmp_path):
    a = small_study(tmp_path, "a", n=4)
    b = small_study(tmp_path, "bb", n=4)
    shared = str(pydicom.dcmread(a[0]).SeriesInstanceUID)
    for p in b:
        ds = pydicom.dcmread(p)
        ds.SeriesInstanceUID = shared
        ds.save_as(p)
    scan = scan_tree(tmp_path)
    studies = scan.studies()
    assert len(studies) == 2 and all(len(s) == 1 and len(s[0].paths) == 4 for s in studies.values())


def test_an_instance_whose_uid_is_not_a_uid_is_unreadable(tmp_path):
    paths = small_study(tmp_path, "s", n=4)
    ds = pydicom.dcmread(paths[0])
    ds.StudyInstanceUID = "../../x"
    ds.save_as(paths[0])
    scan = scan_tree(tmp_path)
    assert [(p, r) for p, r in scan.unreadable] == [(paths[0], "StudyInstanceUID not a valid DICOM UID")]


def _edit(paths, change):
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        change(k, ds)
        ds.save_as(p)


def test_a_gantry_tilted_stack_is_refused_with_its_angle(series):
    folder, paths, _ = series
    ordered = sorted(paths, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    tilt = np.tan(np.radians(15))  # each slice shifted along y by its height x tan(15 degrees)
    _edit(ordered, lambda k, ds: ds.__setattr__("ImagePositionPatient", [-46.0, -46.0 + 5.0 * k * tilt, 5.0 * k]))
    with pytest.raises(VolumeError, match=r"not stacked along their normal \(15\.0 degrees off"):
        load_dicom_folder(folder)


def test_one_frame_of_reference_per_series(series):
    folder, paths, _ = series
    _edit(paths[:1], lambda k, ds: ds.__setattr__("FrameOfReferenceUID", pydicom.uid.generate_uid()))
    with pytest.raises(VolumeError, match="2 different FrameOfReferenceUIDs"):
        load_dicom_folder(folder)


def test_a_rescale_slope_that_is_not_a_number_is_named(series):
    folder, paths, _ = series
    ds = pydicom.dcmread(paths[2])
    tag = pydicom.tag.Tag("RescaleSlope")
    ds[tag] = pydicom.dataelem.RawDataElement(tag, "DS", 4, b"abc ", 0, False, True)  # as a file would hold it
    ds.save_as(paths[2])
    with pytest.raises(VolumeError, match=f"{paths[2].name}: RescaleSlope is not a number"):
        load_dicom_folder(folder)


@pytest.mark.parametrize(
    "syntax,stored,signed",
    [
        (pydicom.uid.ExplicitVRLittleEndian, 12, 0),
        (pydicom.uid.ExplicitVRLittleEndian, 12, 1),
        (pydicom.uid.ExplicitVRLittleEndian, 16, 1),
        (pydicom.uid.ImplicitVRLittleEndian, 12, 0),
        (pydicom.uid.ImplicitVRLittleEndian, 16, 0),
        (pydicom.uid.RLELossless, 12, 1),
    ],
)
def test_read_frame_equals_pydicom(series, tmp_path, monkeypatch, syntax, stored, signed):
    """The direct read of native pixel data gives pydicom's array bit for bit, unused high bits holding
    garbage included; compressed data goes to pydicom (the only case it is called for here)."""
    from operators.contract import dicom_series

    _, paths, _ = series
    ds = pydicom.dcmread(paths[0])
    rng = np.random.default_rng(stored + signed)
    raw = rng.integers(0, 2**16, size=(ds.Rows, ds.Columns), dtype=np.uint16)  # every bit set somewhere
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = stored, stored - 1, signed
    ds.PixelData = raw.astype("<u2").tobytes()
    if syntax.is_compressed:
        ds.PixelRepresentation = 0
        ds.compress(syntax, encoding_plugin="pydicom")
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / "frame.dcm"
    ds.save_as(path, enforce_file_format=True)
    expected = pydicom.pixels.pixel_array(str(path))
    scan = scan_tree(path)
    ((_, s),) = scan.series.items()
    called = []
    real = dicom_series.pixel_array
    monkeypatch.setattr(dicom_series, "pixel_array", lambda p: called.append(p) or real(p))
    got = dicom_series.read_frame(path, s.headers[0], s.pixel_offsets[0])
    assert got.dtype == expected.dtype and np.array_equal(got, expected)
    assert bool(called) == syntax.is_compressed
    # into a reused buffer (series_to_volume's per-thread scratch): the same pixels; too small, ignored
    for scratch in (np.full(ds.Rows * ds.Columns * 2 + 7, 0xAB, dtype=np.uint8), np.zeros(10, dtype=np.uint8)):
        again = dicom_series.read_frame(path, s.headers[0], s.pixel_offsets[0], scratch)
        assert again.dtype == expected.dtype and np.array_equal(again, expected)


def test_read_frame_falls_back_when_the_offset_is_wrong(series):
    from operators.contract.dicom_series import read_frame

    _, paths, _ = series
    s = next(iter(scan_tree(paths[0]).series.values()))
    expected = pydicom.pixels.pixel_array(str(paths[0]))
    for offset in (None, 0, s.pixel_offsets[0] + 2):
        assert np.array_equal(read_frame(paths[0], s.headers[0], offset), expected)


def test_a_deflated_series_reads_as_its_original(tmp_path):
    """Deflated Explicit VR Little Endian, which the listener accepts: the same volume as the original (its
    pixels are inflated by pydicom, not read at the header scan's offset in the compressed stream)."""
    from operators.contract.dicom_series import scan_tree, series_to_volume

    paths = small_study(tmp_path / "plain", "DEFLATE")
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
        (tmp_path / "deflated").mkdir(exist_ok=True)
        ds.save_as(tmp_path / "deflated" / p.name, enforce_file_format=True)
    volumes = []
    for folder in ("plain", "deflated"):
        ((_, series),) = scan_tree(tmp_path / folder).studies().items()
        s = series[0]
        volumes.append(series_to_volume(s.headers, [str(p) for p in s.paths], offsets=s.pixel_offsets))
    assert str(pydicom.dcmread(next((tmp_path / "deflated").iterdir())).file_meta.TransferSyntaxUID) == (
        pydicom.uid.DeflatedExplicitVRLittleEndian
    )
    assert np.array_equal(volumes[0].array, volumes[1].array) and np.allclose(volumes[0].affine, volumes[1].affine)
