"""What a CT series may be, checked before anything is allocated for it or reported from it.

A header can claim any geometry and any rescale: a 64x64 series that declares 470 mm pixels, or slices
1e5 mm apart, would make the resampler allocate its whole field of view at the package's spacing (many
GB) before cropping; a RescaleSlope of 0 turns every volume into one value that the model still scores.
So a series whose geometry is beyond what a CT scanner produces, whose rescale is missing or not
positive, or whose values after rescale are beyond a physical Hounsfield range is refused with the
reason (a ``VolumeError``: the study fails and gets no SR). The bounds, stated here once:

- pixel spacing and slice spacing in [0.05, 10] mm and [0.05, 20] mm;
- at most 2048 rows and columns, 4096 slices and 2**30 voxels (4 GiB as float32);
- a field of view of at most 1000 mm across and 2500 mm along the table;
- RescaleSlope and RescaleIntercept present (Type 1 in the CT Image module), finite, the slope > 0;
- after rescale, every value in [-3100, 35000] HU (air and the -3024 padding outside a reconstruction
  circle at the low end, dense metal at the high end), and not one constant value.
"""

from __future__ import annotations

import math

from .volume import VolumeError

PIXEL_SPACING_MM = (0.05, 10.0)
SLICE_SPACING_MM = (0.05, 20.0)
MAX_MATRIX = 2048
MAX_SLICES = 4096
MAX_VOXELS = 2**30
MAX_FOV_MM = 1000.0
MAX_LENGTH_MM = 2500.0
HU_RANGE = (-3100.0, 35000.0)


def check_geometry(
    rows: int, cols: int, slices: int, row_mm: float, col_mm: float, slice_mm: float, where: str
) -> None:
    """Refuse a series grid no CT produces (before its volume is allocated or resampled)."""
    lo, hi = PIXEL_SPACING_MM
    for name, v in (("row", row_mm), ("column", col_mm)):
        if not (math.isfinite(v) and lo <= v <= hi):
            raise VolumeError(f"{where}: PixelSpacing ({name}) {v:g} mm is outside a CT's [{lo:g}, {hi:g}] mm")
    lo, hi = SLICE_SPACING_MM
    if not (math.isfinite(slice_mm) and lo <= slice_mm <= hi):
        raise VolumeError(f"{where}: slice spacing {slice_mm:g} mm is outside a CT's [{lo:g}, {hi:g}] mm")
    if rows > MAX_MATRIX or cols > MAX_MATRIX:
        raise VolumeError(f"{where}: {rows}x{cols} pixels per slice; at most {MAX_MATRIX}x{MAX_MATRIX} are accepted")
    if slices > MAX_SLICES or rows * cols * slices > MAX_VOXELS:
        raise VolumeError(
            f"{where}: {slices} slices of {rows}x{cols}; at most {MAX_SLICES} slices and {MAX_VOXELS} voxels"
        )
    fov = max(rows * row_mm, cols * col_mm)
    if fov > MAX_FOV_MM:
        raise VolumeError(f"{where}: a field of view of {fov:.0f} mm; at most {MAX_FOV_MM:.0f} mm are accepted")
    length = (slices - 1) * slice_mm
    if length > MAX_LENGTH_MM:
        raise VolumeError(f"{where}: {length:.0f} mm along the table; at most {MAX_LENGTH_MM:.0f} mm are accepted")


def check_rescale(slope: float | None, intercept: float | None, where: str) -> None:
    """Refuse a missing, non-finite or non-positive rescale (values are never logged)."""
    for name, v in (("RescaleSlope", slope), ("RescaleIntercept", intercept)):
        if v is None:
            raise VolumeError(f"{where}: {name} is missing (Type 1 for CT)")
        if not math.isfinite(v):
            raise VolumeError(f"{where}: {name} is not finite")
    assert slope is not None
    if slope <= 0:
        raise VolumeError(f"{where}: RescaleSlope is not positive; the pixels would not be Hounsfield units")


def check_hounsfield(low: float, high: float, where: str) -> None:
    """Refuse a volume whose rescaled values leave a physical HU range, or that holds a single value."""
    lo, hi = HU_RANGE
    if not (math.isfinite(low) and math.isfinite(high)) or low < lo or high > hi:
        raise VolumeError(f"{where}: values after rescale leave the physical range [{lo:g}, {hi:g}] HU")
    if high - low < 1.0:
        raise VolumeError(f"{where}: the volume holds a single value after rescale; nothing to read")
