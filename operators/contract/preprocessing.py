"""The one preprocessing definition, shared by deployment and training.

A ``PreprocessSpec`` is what a model package records; ``preprocess`` applies it with MONAI
transforms to a ``Volume`` (HU array plus RAS affine), whether that came from NIfTI or DICOM.
Merlin's chain: Orientation(RAS) -> Spacing(1.5, 1.5, 3 mm, bilinear) -> ScaleIntensityRange
(-1000..1000 HU -> 0..1, clipped) -> SpatialPad -> CenterSpatialCrop to (224, 224, 160).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from .volume import Volume, in_slabs


@dataclass(frozen=True)
class PreprocessSpec:
    orientation: str = "RAS"
    spacing: tuple[float, float, float] = (1.5, 1.5, 3.0)
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    output_range: tuple[float, float] = (0.0, 1.0)
    spatial_size: tuple[int, int, int] = (224, 224, 160)
    interpolation: str = "bilinear"
    # The encoder input is (B, 1, X, Y, Z): X, Y, Z the axes of ``orientation`` in that order.
    axis_order: str = "BCXYZ"

    def __post_init__(self):
        if len(self.orientation) != 3 or set(self.orientation.upper()) - set("RLAPSI"):
            raise ValueError(f"orientation must be three axis codes like 'RAS', got {self.orientation!r}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive millimetre values, got {self.spacing!r}")
        if len(self.spatial_size) != 3 or min(self.spatial_size) < 1:
            raise ValueError(f"spatial_size must be three positive integers, got {self.spatial_size!r}")
        if self.hu_window[0] >= self.hu_window[1]:
            raise ValueError(f"hu_window must be (low, high) with low < high, got {self.hu_window!r}")
        if self.interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {self.interpolation!r}")
        if self.axis_order != "BCXYZ":
            raise ValueError(f"only axis_order 'BCXYZ' is supported, got {self.axis_order!r}")

    @classmethod
    def merlin(cls) -> PreprocessSpec:
        """Merlin's published preprocessing."""
        return cls()

    @classmethod
    def tiny(cls) -> PreprocessSpec:
        """The CPU-scale spec used with the synthetic corpus's tiny profile (5 x 5 x 6 mm voxels)."""
        return cls(spacing=(5.0, 5.0, 6.0), spatial_size=(64, 56, 56))

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys {sorted(unknown)}")
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kw)


_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def build_transform(spec: PreprocessSpec):
    """The MONAI transform chain for ``spec``; input a channel-first MetaTensor with its affine.

    This is the definition. ``preprocess`` computes the same thing faster when orientation and spacing
    amount to a per-axis scale and shift (always, except nearest-neighbour interpolation; see there)."""
    import torch
    from monai.transforms import Compose, Orientation, Spacing

    return Compose(
        [
            Orientation(axcodes=spec.orientation, labels=_LABELS),
            # float32 resampling: half the time of MONAI's float64 default on a 512x512x300 CT, and the
            # tensors agree to ~1e-6 (far inside the 1e-3 the DICOM/NIfTI agreement tests allow).
            Spacing(pixdim=spec.spacing, mode=spec.interpolation, dtype=torch.float32),  # type: ignore[arg-type]
            *_intensity_and_size(spec),
        ]
    )


def _intensity_and_size(spec: PreprocessSpec) -> list:
    from monai.transforms import CenterSpatialCrop, ScaleIntensityRange, SpatialPad

    return [
        ScaleIntensityRange(
            a_min=spec.hu_window[0],
            a_max=spec.hu_window[1],
            b_min=spec.output_range[0],
            b_max=spec.output_range[1],
            clip=True,
        ),
        SpatialPad(spatial_size=spec.spatial_size),
        CenterSpatialCrop(roi_size=spec.spatial_size),
    ]


@dataclass(frozen=True)
class _AxisPlan:
    """Orientation + Spacing as per-axis linear interpolation: output axis ``a`` reads input axis
    ``source[a]`` at the (fractional) input voxel positions ``positions[a]``."""

    affine: np.ndarray  # the output's voxel -> RAS affine
    source: tuple[int, int, int]
    positions: tuple[np.ndarray, np.ndarray, np.ndarray]


def _spaced_grid(shape: tuple[int, ...], affine: np.ndarray, spec: PreprocessSpec) -> tuple[np.ndarray, list[int]]:
    """The voxel -> RAS affine and shape of the chain's Orientation and Spacing output, asked of MONAI
    itself (lazily: no voxel is computed)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    img = MetaTensor(torch.zeros(()).expand(1, *shape), affine=torch.as_tensor(affine, dtype=torch.float64))
    out = Orientation(axcodes=spec.orientation, labels=_LABELS, lazy=True)(img)
    out = Spacing(pixdim=spec.spacing, mode=spec.interpolation, lazy=True)(out)  # type: ignore[arg-type]
    assert isinstance(out, MetaTensor)  # a MetaTensor in, a MetaTensor with the pending grid out
    return np.asarray(out.peek_pending_affine(), dtype=np.float64), [int(v) for v in out.peek_pending_shape()]


def model_input_affine(shape: tuple[int, ...], affine: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The voxel -> RAS affine of the model input ``preprocess`` makes from a volume of this shape and
    affine: the resampled grid shifted by the symmetric pad or the centre crop (``_window_pad_crop``)."""
    dst, size = _spaced_grid(shape, affine, spec)
    out = dst.copy()
    for a, (n, keep) in enumerate(zip(size, spec.spatial_size)):
        shift = -((keep - n) // 2) if n <= keep else n // 2 - keep // 2
        out[:3, 3] += dst[:3, a] * shift
    return out


def _axis_plan(shape: tuple[int, ...], affine: np.ndarray, spec: PreprocessSpec) -> _AxisPlan | None:
    """The output grid of the chain's Orientation and Spacing, asked of MONAI itself (lazily: no
    voxel is computed), as a per-axis plan. None for nearest-neighbour interpolation, or should an
    output axis ever read more than one input axis (Spacing keeps an oblique series' direction cosines,
    so even those map axis to axis): MONAI then does the resampling."""
    if spec.interpolation != "bilinear":
        return None
    dst, size = _spaced_grid(shape, affine, spec)
    xform = np.linalg.solve(np.asarray(affine, dtype=np.float64), dst)  # output voxel -> input voxel
    m = np.abs(xform[:3, :3])
    source = tuple(int(v) for v in np.argmax(m, axis=0))
    if sorted(source) != [0, 1, 2]:
        return None
    off_axis = m.copy()
    off_axis[source, range(3)] = 0.0
    if off_axis.max() > 1e-9 * m.max():
        return None
    positions = tuple(xform[source[a], a] * np.arange(size[a]) + xform[source[a], 3] for a in range(3))
    return _AxisPlan(dst, source, positions)  # type: ignore[arg-type]


def _cropped(plan: _AxisPlan, size: Sequence[int]) -> _AxisPlan:
    """The plan restricted to the output voxels CenterSpatialCrop keeps (the same window as
    ``_window_pad_crop``), so a large field of view is never resampled whole: the values are the same,
    since each output voxel is interpolated on its own."""
    affine = plan.affine.copy()
    positions = []
    for a, (pos, keep) in enumerate(zip(plan.positions, size)):
        if len(pos) > keep:
            start = len(pos) // 2 - keep // 2
            pos = pos[start : start + keep]
            affine[:3, 3] += affine[:3, a] * start
        positions.append(pos)
    return _AxisPlan(affine, plan.source, tuple(positions))  # type: ignore[arg-type]


_RESAMPLE_THREADS = 2  # output planes are split across this many threads (numpy releases the GIL)


def _resample(x: np.ndarray, plan: _AxisPlan) -> np.ndarray:
    """Linear interpolation along one input axis at a time, borders clamped (grid_sample's "border"
    padding, MONAI Spacing's default), then the axes permuted into the output's order.

    Written by hand for speed: trilinear interpolation is separable, so three 1-D passes replace
    grid_sample's eight reads per output voxel. They run one output plane at a time (two input planes
    blended, then its rows, then its columns), so no full-size intermediate volume is ever allocated
    (fresh memory is what costs most on a 512x512x300 CT; docs/performance.md, stage timings). The values agree with
    MONAI's to float32 rounding (test_preprocessing)."""
    axes = sorted(range(3), key=lambda a: plan.source[a])  # the output axes reading input dims 0, 1, 2
    lo, hi, weight = [], [], []
    for dim, a in enumerate(axes):
        n = x.shape[dim]
        pos = np.clip(plan.positions[a], 0.0, n - 1)
        low = np.minimum(np.floor(pos), max(n - 2, 0)).astype(np.intp)
        lo.append(low)
        hi.append(np.minimum(low + 1, n - 1))
        weight.append((pos - low).astype(np.float32))
    out = np.empty((len(lo[0]), len(lo[1]), len(lo[2])), dtype=np.float32)
    w_rows = weight[1][:, None]

    def planes(js: range) -> None:
        plane = np.empty(x.shape[1:], dtype=np.float32)
        for j in js:
            np.subtract(x[hi[0][j]], x[lo[0][j]], out=plane)
            plane *= weight[0][j]
            plane += x[lo[0][j]]
            below = plane[lo[1]]
            rows = below + (plane[hi[1]] - below) * w_rows
            below = rows[:, lo[2]]
            out[j] = below + (rows[:, hi[2]] - below) * weight[2]

    in_slabs(planes, out.shape[0], _RESAMPLE_THREADS)
    return out.transpose(plan.source)


def _window_pad_crop(x: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The chain after Orientation and Spacing (ScaleIntensityRange with clipping, symmetric
    SpatialPad with zeros, CenterSpatialCrop), in numpy: MONAI's values bit for bit (the same float32
    operations in the same order; test_preprocessing), without its per-transform overhead."""
    (a_min, a_max), (b_min, b_max) = spec.hu_window, spec.output_range
    y = (x - np.float32(a_min)) / np.float32(a_max - a_min)
    y = y * np.float32(b_max - b_min) + np.float32(b_min)
    np.clip(y, np.float32(b_min), np.float32(b_max), out=y)
    out = np.zeros((1, *spec.spatial_size), dtype=np.float32)
    src: list[slice] = []
    dst: list[slice] = []
    for n, size in zip(y.shape, spec.spatial_size):
        if n <= size:  # SpatialPad: the extra voxel of an odd pad goes after
            before = (size - n) // 2
            src.append(slice(0, n))
            dst.append(slice(before, before + n))
        else:  # CenterSpatialCrop: the window around n // 2
            start = n // 2 - size // 2
            src.append(slice(start, start + size))
            dst.append(slice(0, size))
    out[0][tuple(dst)] = y[tuple(src)]
    return out


def preprocess(volume: Volume, spec: PreprocessSpec, transform=None) -> np.ndarray:
    """Apply ``spec`` to a HU volume; returns float32 of shape (1, X, Y, Z) in ``output_range``.

    ``transform``: ``build_transform(spec)``, built once by a caller that preprocesses many volumes."""
    import torch
    from monai.data import MetaTensor

    array, affine = volume.array, volume.affine
    if array.flags.f_contiguous and not array.flags.c_contiguous:
        # Fortran order (nibabel's NIfTI arrays, the slice-major DICOM volumes of dicom_series): work
        # on the C-ordered transpose with its axes' affine columns swapped to match. The orientation
        # step puts the axes back, so the tensor is identical, without a 300 MB strided copy first.
        array, affine = array.T, affine[:, [2, 1, 0, 3]]
    array = np.ascontiguousarray(array, dtype=np.float32)
    plan = _axis_plan(array.shape, affine, spec)
    if plan is not None:
        return _window_pad_crop(_resample(array, _cropped(plan, spec.spatial_size)), spec)
    img = MetaTensor(torch.as_tensor(array)[None], affine=torch.as_tensor(affine, dtype=torch.float64))
    out = (transform or build_transform(spec))(img)
    return np.ascontiguousarray(out.detach().cpu().numpy().astype(np.float32, copy=False))
