"""Hostile and broken headers: memory bombs through geometry, meaningless pixel values, bad headers among
good studies. Each study fails with its reason and gets no SR; the others are reported."""

import re

import numpy as np
import pydicom
import pytest

from operators.contract.dicom_series import scan_tree
from operators.contract.package import load_package
from operators.contract.scoring import ZeroShotModel
from operators.pipeline import SeriesToModelInput, StudyWork, run_study, sr_filename
from tests.deploy.test_app import run_app
from tests.dicom_cases import small_study, study_uid


def _edit(paths, **values):
    """Set (or, with None, delete) header keywords in every file of a series."""
    for p in paths:
        ds = pydicom.dcmread(p)
        for k, v in values.items():
            if v is None:
                if k in ds:
                    delattr(ds, k)
            else:
                setattr(ds, k, v)
        ds.save_as(p)


# (header edits, text the reason contains)
CASES = {
    "fov-470mm-pixels": ({"PixelSpacing": ["470", "470"]}, "PixelSpacing (row) 470 mm is outside"),
    "slices-1e5mm-apart": ({}, "slice spacing 100000 mm is outside"),
    "negative-spacing": ({"PixelSpacing": ["-4", "-4"]}, "PixelSpacing (row) -4 mm is outside"),
    "micro-spacing": ({"PixelSpacing": ["1e-6", "1e-6"]}, "PixelSpacing (row) 1e-06 mm is outside"),
    "zero-spacing": ({"PixelSpacing": ["0", "0"]}, "PixelSpacing (row) 0 mm is outside"),
    "slope-0": ({"RescaleSlope": "0"}, "RescaleSlope is not positive"),
    "slope-1e30": ({"RescaleSlope": "1e30"}, "values after rescale leave the physical range"),
    "intercept-1e38": ({"RescaleIntercept": "1e38"}, "values after rescale leave the physical range"),
    "no-rescale": ({"RescaleSlope": None, "RescaleIntercept": None}, "RescaleSlope is missing (Type 1 for CT)"),
}


def _make(root, name):
    paths = small_study(root, name.upper().replace("-", ""))
    edits, _ = CASES[name]
    _edit(paths, **edits)
    if name == "slices-1e5mm-apart":
        for i, p in enumerate(sorted(paths, key=lambda q: pydicom.dcmread(q).InstanceNumber)):
            ds = pydicom.dcmread(p)
            ds.ImagePositionPatient = [-46.0, -46.0, i * 1e5]
            ds.save_as(p)
    return paths


@pytest.fixture(scope="module")
def model(tiny_package):
    return ZeroShotModel(load_package(tiny_package["pkg"]), device="cpu")


@pytest.mark.parametrize("name", list(CASES))
def test_implausible_series_fail_with_their_reason_and_no_sr(name, model, tmp_path):
    """Each would have been reported 'ok' (or would have allocated many GB while resampling)."""
    paths = _make(tmp_path / "in", name)
    ((uid, series),) = scan_tree(tmp_path / "in").studies().items()
    work = run_study(StudyWork(uid, series), model, SeriesToModelInput(model.package.spec), tmp_path / "out")
    assert work.failed and CASES[name][1] in work.reason, work.reason
    assert not (tmp_path / "out" / sr_filename(uid)).exists()
    assert str(pydicom.dcmread(paths[0]).PatientName) not in work.reason


def test_a_plausible_series_still_reads(model, tmp_path):
    small_study(tmp_path / "in", "GOOD")
    ((uid, series),) = scan_tree(tmp_path / "in").studies().items()
    work = run_study(StudyWork(uid, series), model, SeriesToModelInput(model.package.spec), tmp_path / "out")
    assert not work.failed, work.reason
    assert (tmp_path / "out" / sr_filename(uid)).exists()


@pytest.mark.parametrize("which", ["first", "last"])
def test_a_damaged_end_slice_fails_the_series_instead_of_a_shorter_volume(which, model, tmp_path):
    """The first or last slice of a stack leaves no gap when it is lost: a file that is DICOM by its preamble
    but whose header cannot be read, beside the series' instances, fails the study; a stray non-DICOM file
    (a README) does not."""
    paths = sorted(small_study(tmp_path / "in", "ENDS"), key=lambda q: pydicom.dcmread(q).InstanceNumber)
    (tmp_path / "in" / "README.txt").write_text("exported by the modality\n")
    ((uid, series),) = scan_tree(tmp_path / "in").studies().items()
    clean = run_study(StudyWork(uid, series), model, SeriesToModelInput(model.package.spec), tmp_path / "out0")
    assert not clean.failed, clean.reason
    victim = paths[0] if which == "first" else paths[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[:132] + b"\xff" * 64)  # the preamble, then a header no parser reads
    scan = scan_tree(tmp_path / "in")
    ((uid, series),) = scan.studies().items()
    assert len(series[0].paths) == len(paths) - 1 and {p for p, _ in series[0].damaged} == {victim}
    assert len(scan.unreadable) == 2  # the damaged slice and the README; only the slice is attributed
    work = run_study(StudyWork(uid, series), model, SeriesToModelInput(model.package.spec), tmp_path / "out")
    assert work.failed and "damaged DICOM file" in work.reason and victim.name in work.reason, work.reason
    assert not (tmp_path / "out" / sr_filename(uid)).exists()


def test_two_patients_under_one_study_uid_fail_the_study(model, tmp_path):
    """A merge or UID collision: an SR would attach a finding to the wrong patient's record. The reason counts
    the patients and names none."""
    a = small_study(tmp_path / "in", "MERGEA")
    b = small_study(tmp_path / "in", "MERGEB", n=10)
    study = pydicom.dcmread(a[0]).StudyInstanceUID
    _edit(b, StudyInstanceUID=study, PatientID="OTHER-PATIENT-77")
    ((uid, series),) = scan_tree(tmp_path / "in").studies().items()
    assert len(series) == 2
    work = run_study(StudyWork(uid, series), model, SeriesToModelInput(model.package.spec), tmp_path / "out")
    assert work.failed and "2 different patients" in work.reason, work.reason
    assert "OTHER-PATIENT-77" not in work.reason and str(pydicom.dcmread(a[0]).PatientID) not in work.reason
    assert not (tmp_path / "out" / sr_filename(uid)).exists()


def test_bad_headers_among_good_studies_in_the_app(tiny_package, tmp_path):
    """A non-numeric SliceThickness or SeriesNumber is a tie-break that sorts last, not an error; a memory
    bomb and a zero spacing fail their studies; the graph goes on and the good studies get their SRs. No
    header value reaches the log."""
    root = tmp_path / "in"
    good = [small_study(root, "GOODA"), small_study(root, "GOODB")]
    odd = small_study(root, "ODDHEADERS")
    for p in odd:  # as a file would hold them: pydicom itself refuses to set such values
        ds = pydicom.dcmread(p)
        for keyword, vr, raw in (("SliceThickness", "DS", b"thick "), ("SeriesNumber", "IS", b"seven ")):
            tag = pydicom.tag.Tag(keyword)
            ds[tag] = pydicom.dataelem.RawDataElement(tag, vr, len(raw), raw, 0, False, True)
        ds.save_as(p)
    bombs = [_make(root, "fov-470mm-pixels"), _make(root, "zero-spacing")]
    proc = run_app("-i", root, "-o", tmp_path / "out", "-m", tiny_package["pkg"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for paths in [*good, odd]:
        assert (tmp_path / "out" / sr_filename(study_uid(paths[0]))).exists()
    for paths in bombs:
        assert not (tmp_path / "out" / sr_filename(study_uid(paths[0]))).exists()
        assert f"not reported: study {study_uid(paths[0])}" in proc.stderr
    assert "3 of 5 studies reported" in proc.stderr
    assert "thick" not in proc.stderr and "seven" not in proc.stderr


# -- every byte that decides an output is checked, and a package that cannot run is refused at load -------


def _rewrite_encoder(src, dst, edit, external: bool = False):
    """A copy of package ``src`` whose image encoder ``edit`` changed, re-hashed into its manifest (as
    anyone can do: the loader must catch what checksums cannot)."""
    import hashlib
    import json
    import shutil

    import onnx

    shutil.copytree(src, dst)
    model = onnx.load(dst / "image_encoder.onnx")
    edit(model)
    if external:
        onnx.save_model(model, dst / "image_encoder.onnx", save_as_external_data=True, location="weights.bin")
    else:
        onnx.save_model(model, dst / "image_encoder.onnx")
    manifest = json.loads((dst / "manifest.json").read_text())
    data = (dst / "image_encoder.onnx").read_bytes()
    manifest["files"]["image_encoder.onnx"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return dst


def _rename_input(model):
    model.graph.input[0].name = "volume"
    for node in model.graph.node:
        node.input[:] = ["volume" if i == "image" else i for i in node.input]


def _nan_output(model):
    from onnx import helper, numpy_helper

    out = model.graph.output[0]
    model.graph.initializer.append(numpy_helper.from_array(np.array([np.nan], dtype=np.float32), "nan_factor"))
    raw = out.name + "_before_nan"
    for node in model.graph.node:
        node.output[:] = [raw if o == out.name else o for o in node.output]
    model.graph.node.append(helper.make_node("Mul", [raw, "nan_factor"], [out.name]))


def _narrow_output(model):
    from onnx import helper, numpy_helper

    out = model.graph.output[0]
    raw = out.name + "_wide"
    for node in model.graph.node:
        node.output[:] = [raw if o == out.name else o for o in node.output]
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], dtype=np.int64), "s0"),
            numpy_helper.from_array(np.array([8], dtype=np.int64), "s1"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "ax"),
        ]
    )
    model.graph.node.append(helper.make_node("Slice", [raw, "s0", "s1", "ax"], [out.name]))
    del out.type.tensor_type.shape.dim[:]


@pytest.mark.parametrize(
    "edit,reason",
    [
        (_rename_input, "the manifest names input 'image'"),
        (_nan_output, "gives non-finite embeddings for a zero volume"),
        (_narrow_output, "gives embeddings of shape (1, 8)"),
    ],
)
def test_a_package_whose_encoder_cannot_serve_is_refused_at_load(tiny_package, tmp_path, edit, reason):
    pkg = _rewrite_encoder(tiny_package["pkg"], tmp_path / "pkg", edit)
    small_study(tmp_path / "in", "GOOD")
    proc = run_app("-i", tmp_path / "in", "-o", tmp_path / "out", "-m", pkg)
    assert proc.returncode == 2 and reason in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    from operators.batch import run_batch
    from operators.contract.package import PackageError

    with pytest.raises(PackageError, match=re.escape(reason)):
        run_batch(tmp_path / "in", tmp_path / "batch", model=str(pkg), workers=1, progress=False)
    assert not (tmp_path / "batch").exists()


def test_encoder_weights_outside_the_checksums_are_refused(tiny_package, tmp_path):
    """ONNX external data: the weights live in a file beside the encoder, which the manifest does not list;
    swapping that file would change every probability under the same manifest."""
    pkg = _rewrite_encoder(tiny_package["pkg"], tmp_path / "pkg", lambda m: None, external=True)
    assert (pkg / "weights.bin").is_file()
    from operators.contract.package import PackageError

    with pytest.raises(PackageError, match="weights.bin: in the package but not listed in the manifest"):
        load_package(pkg)
    (pkg / "weights.bin").unlink()
    (pkg / "notes").mkdir()
    (pkg / "notes" / "x.txt").write_text("anything")
    with pytest.raises(PackageError, match="notes/x.txt: in the package but not listed"):
        load_package(pkg)
