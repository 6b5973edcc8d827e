import dataclasses
import json

import numpy as np
import pytest

from operators.contract.dicom_series import load_dicom_folder
from operators.contract.preprocessing import PreprocessSpec, preprocess
from operators.contract.volume import Volume, load_nifti, save_nifti
from training.synth.dicom_writer import make_identity, write_ct_series
from training.synth.raster import Grid


def _studies_by_position(corpus):
    truth = [json.loads(x) for x in (corpus / "ground_truth.jsonl").read_text().splitlines()]
    return {pos: [t["study id"] for t in truth if t["position"] == pos] for pos in ("HFS", "FFS")}


@pytest.mark.parametrize("position", ["HFS", "FFS"])
def test_dicom_and_nifti_paths_agree(corpus200, position):
    spec = PreprocessSpec.tiny()
    for sid in _studies_by_position(corpus200)[position][:2]:
        nii = load_nifti(corpus200 / "merlin_data" / f"{sid}.nii.gz")
        dcm = load_dicom_folder(corpus200 / "dicom" / sid)
        assert dcm.array.shape == nii.array.shape if position == "HFS" else True
        a, b = preprocess(nii, spec), preprocess(dcm, spec)
        assert a.shape == b.shape == (1, *spec.spatial_size)
        assert np.abs(a - b).max() <= 1e-3, f"{sid} ({position}): max diff {np.abs(a - b).max()}"
        assert 0.0 <= a.min() and a.max() <= 1.0 and a.std() > 0.05


def test_feet_first_is_stored_mirrored_but_reads_the_same(corpus200):
    sid = _studies_by_position(corpus200)["FFS"][0]
    dcm = load_dicom_folder(corpus200 / "dicom" / sid)
    nii = load_nifti(corpus200 / "merlin_data" / f"{sid}.nii.gz")
    assert dcm.axcodes == "RPI" and nii.axcodes == "LPS"
    # Same world coordinates for the same voxel after flipping both stored axes.
    assert np.allclose(dcm.array[::-1, :, ::-1], nii.array, atol=0.5)


def test_non_square_pixels(tmp_path):
    """Row and column spacing must not be swapped (a known defect of the App SDK's operator)."""
    rng = np.random.default_rng(0)
    grid = Grid((48, 40, 20), (3.0, 4.5, 5.0), (-70.5, -87.75, -40.0))
    hu = np.full(grid.shape, -1000.0, dtype=np.float32)
    hu[10:20, 5:30, 4:16] = 300.0  # an off-centre block
    hu += rng.normal(0, 5, size=hu.shape).astype(np.float32)
    save_nifti(Volume(hu, grid.affine_ras()), tmp_path / "v.nii.gz")
    write_ct_series(hu, grid, tmp_path / "dcm", make_identity("NS1", 0, 50, "F"), position="HFS")
    dcm = load_dicom_folder(tmp_path / "dcm")
    assert np.allclose(dcm.spacing, (3.0, 4.5, 5.0))
    spec = PreprocessSpec(spacing=(3.0, 3.0, 5.0), spatial_size=(48, 64, 24))
    a = preprocess(load_nifti(tmp_path / "v.nii.gz"), spec)
    b = preprocess(dcm, spec)
    assert np.abs(a - b).max() <= 1e-3
    write_ct_series(hu, grid, tmp_path / "ffs", make_identity("NS2", 0, 50, "F"), position="FFS")
    c = preprocess(load_dicom_folder(tmp_path / "ffs"), spec)
    assert np.abs(a - c).max() <= 1e-3


def test_merlin_spec_shape_and_window():
    spec = PreprocessSpec.merlin()
    assert spec.spacing == (1.5, 1.5, 3.0) and spec.spatial_size == (224, 224, 160)
    aff = np.diag([-0.8, -0.8, 2.5, 1.0])
    hu = np.linspace(-1500, 1500, 64 * 64 * 40, dtype=np.float32).reshape(64, 64, 40)
    out = preprocess(Volume(hu, aff), spec)
    assert out.shape == (1, 224, 224, 160) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0


def test_spec_roundtrip_and_validation():
    spec = PreprocessSpec.tiny()
    assert PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="spacing"):
        PreprocessSpec(spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="orientation"):
        PreprocessSpec(orientation="XYZ")
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        PreprocessSpec.from_dict({"spacing": [1, 1, 1], "colour": "red"})


@pytest.mark.parametrize("position", ["HFS", "FFS"])
def test_deploy_path_matches_nifti_and_reuses_its_buffer(corpus200, position):
    """The application's path (headers from the scan, pixels from the files, axes reversed into the
    model's orientation while copying, one buffer reused across studies) gives the training path's tensor."""
    from operators.contract.dicom_series import scan_tree
    from operators.pipeline import SeriesToModelInput, StudyWork, select_series

    spec = PreprocessSpec.tiny()
    prep = SeriesToModelInput(spec)
    sids = _studies_by_position(corpus200)[position][:2]
    seen, kept = {}, []
    for sid in [sids[0], sids[0], sids[1], sids[0]]:  # the same size twice: the buffer is refilled
        ((uid, series),) = scan_tree(corpus200 / "dicom" / sid).studies().items()
        work = prep(select_series(StudyWork(uid, series)))
        assert not work.failed, work.reason
        nii = preprocess(load_nifti(corpus200 / "merlin_data" / f"{sid}.nii.gz"), spec)
        assert np.abs(work.tensor - nii).max() <= 1e-3
        assert np.array_equal(work.tensor, preprocess(load_dicom_folder(corpus200 / "dicom" / sid), spec))
        if sid in seen:
            assert np.array_equal(work.tensor, seen[sid])
        seen[sid] = work.tensor.copy()
        kept.append((work.tensor, seen[sid]))
    assert prep._buffer is not None
    for handed_out, copy in kept:  # no tensor handed out is a view of the buffer the next study refilled
        assert np.array_equal(handed_out, copy)


def _monai_reference(volume: Volume, spec: PreprocessSpec) -> np.ndarray:
    """The definition: MONAI's whole chain (build_transform) on the C-ordered array."""
    import torch
    from monai.data import MetaTensor

    from operators.contract.preprocessing import build_transform

    img = MetaTensor(
        torch.as_tensor(np.ascontiguousarray(volume.array, dtype=np.float32))[None],
        affine=torch.as_tensor(volume.affine, dtype=torch.float64),
    )
    return build_transform(spec)(img).numpy()


@pytest.mark.parametrize("case", range(8))
def test_per_axis_resampling_equals_monai(case):
    """Axis-aligned volumes of any axis order, direction, memory order and spacing: preprocess's own
    per-axis interpolation gives MONAI's output to float32 rounding, with the same shape."""
    from operators.contract.preprocessing import _axis_plan

    rng = np.random.default_rng(case)
    shape = tuple(int(v) for v in rng.integers(20, 60, size=3))
    perm, signs = rng.permutation(3), rng.choice([-1.0, 1.0], size=3)
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for axis in range(3):
        affine[perm[axis], axis] = signs[axis] * rng.uniform(0.6, 3.0)
    affine[:3, 3] = rng.uniform(-100, 100, size=3)
    hu = rng.normal(0, 400, size=shape).astype(np.float32)
    hu[5:15, 5:15, 5:15] += 800.0  # an edge, where interpolation matters most
    if case % 2:
        hu = np.asfortranarray(hu)
    spec = PreprocessSpec(
        spacing=tuple(rng.uniform(1.0, 4.0, size=3)), spatial_size=(32, 28, 24), hu_window=(-500, 500)
    )
    volume = Volume(hu, affine)
    assert _axis_plan(np.ascontiguousarray(hu).shape, affine, spec) is not None
    ours, reference = preprocess(volume, spec), _monai_reference(volume, spec)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= 2e-5


def test_oblique_volumes_and_nearest_interpolation():
    """MONAI's Spacing keeps an oblique series' direction cosines (it resamples along the voxel axes),
    so the per-axis plan covers it too; nearest-neighbour interpolation has no plan and MONAI
    resamples, exactly as the definition does."""
    from operators.contract.preprocessing import _axis_plan

    rng = np.random.default_rng(1)
    hu = rng.normal(0, 300, size=(30, 30, 20)).astype(np.float32)
    c, s = np.cos(0.3), np.sin(0.3)
    oblique = Volume(hu, np.array([[2 * c, -2 * s, 0, 0], [2 * s, 2 * c, 0, 0], [0, 0, 3, 0], [0, 0, 0, 1.0]]))
    spec = PreprocessSpec(spacing=(2.5, 2.5, 4.0), spatial_size=(24, 24, 16))
    assert _axis_plan(hu.shape, oblique.affine, spec) is not None
    assert np.abs(preprocess(oblique, spec) - _monai_reference(oblique, spec)).max() <= 2e-5
    nearest = dataclasses.replace(spec, interpolation="nearest")
    straight = Volume(hu, np.diag([2.0, 2.0, 3.0, 1.0]))
    assert _axis_plan(hu.shape, straight.affine, nearest) is None
    assert np.array_equal(preprocess(straight, nearest), _monai_reference(straight, nearest))


def test_window_pad_crop_is_monais_bit_for_bit():
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Compose

    from operators.contract.preprocessing import _intensity_and_size, _window_pad_crop

    rng = np.random.default_rng(3)
    for _ in range(40):
        shape = tuple(int(v) for v in rng.integers(5, 40, size=3))
        spec = PreprocessSpec(
            spatial_size=tuple(int(v) for v in rng.integers(5, 40, size=3)),
            hu_window=(float(rng.uniform(-1000, 0)), float(rng.uniform(1, 1500))),
        )
        x = rng.normal(0, 800, size=shape).astype(np.float32)
        reference = Compose(_intensity_and_size(spec))(MetaTensor(torch.as_tensor(x)[None])).numpy()
        assert np.array_equal(_window_pad_crop(x, spec), reference)


def test_only_what_the_crop_keeps_is_resampled():
    """A 500 mm field of view at Merlin's 1.5 mm is 333 voxels across, cropped to 224: only the kept window
    is interpolated, and the tensor equals resampling everything and cropping after, bit for bit."""
    from operators.contract.preprocessing import _axis_plan, _cropped, _resample, _window_pad_crop

    spec = PreprocessSpec.merlin()
    hu = np.random.default_rng(3).normal(0, 300, size=(200, 200, 60)).astype(np.float32)
    affine = np.diag([-2.5, -2.5, 5.0, 1.0])  # 500 x 500 x 300 mm
    plan = _axis_plan(hu.shape, affine, spec)
    assert plan is not None and len(plan.positions[0]) > spec.spatial_size[0]
    cropped = _resample(hu, _cropped(plan, spec.spatial_size))
    assert cropped.shape[:2] == tuple(spec.spatial_size[:2])  # never the whole field of view
    full = _window_pad_crop(_resample(hu, plan), spec)
    assert np.array_equal(preprocess(Volume(hu, affine), spec), full)
