"""A CT volume in Hounsfield units with its voxel-to-world affine, and NIfTI I/O.

Convention used throughout the project: ``array[i, j, k]`` with a 4x4 ``affine`` that maps
voxel indices to RAS world coordinates in millimetres (NIfTI's convention, and what MONAI's
``MetaTensor.affine`` holds). The DICOM reader (``dicom_series``) produces the same thing, so
both paths meet in one preprocessing definition.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def in_slabs(work: Callable[[range], None], n: int, threads: int) -> None:
    """Run ``work`` over ``range(n)`` cut into ``threads`` contiguous slabs, one thread each (the volume
    code's loops spend their time in numpy, which releases the GIL); inline when one slab is enough.
    An exception in any slab is raised here."""
    from concurrent.futures import ThreadPoolExecutor

    threads = max(1, min(threads, n))
    bounds = np.linspace(0, n, threads + 1).astype(int)
    slabs = [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    if threads == 1:
        work(slabs[0])
        return
    with ThreadPoolExecutor(threads) as pool:
        for done in [pool.submit(work, slab) for slab in slabs]:
            done.result()


class VolumeError(ValueError):
    """A volume could not be read or is not usable; the message names the source."""


@dataclass
class Volume:
    array: np.ndarray  # (I, J, K), Hounsfield units
    affine: np.ndarray  # (4, 4) voxel -> RAS mm
    source: str = ""

    @property
    def spacing(self) -> tuple[float, float, float]:
        x, y, z = (float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))
        return x, y, z

    @property
    def axcodes(self) -> str:
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))


def load_nifti(path: str | Path) -> Volume:
    """Read a 3D NIfTI (a 4D one with a single volume is accepted) as a HU volume."""
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: NIfTI file does not exist")
    try:
        img: Any = nib.load(str(path))  # a spatial image; nibabel's stubs say FileBasedImage
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise VolumeError(f"{path}: cannot be read as NIfTI ({exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"{path}: expected a 3D volume, found shape {tuple(data.shape)}")
    if min(data.shape) < 2:
        raise VolumeError(f"{path}: volume has a degenerate axis, shape {tuple(data.shape)}")
    return Volume(np.asarray(data, dtype=np.float32), np.asarray(img.affine, dtype=np.float64), str(path))


def save_nifti(volume: Volume, path: str | Path, dtype=np.int16) -> None:
    """Write a HU volume as NIfTI-1 with its affine as both qform and sform (scanner space)."""
    import nibabel as nib

    arr = np.asarray(volume.array)
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        arr = np.clip(np.rint(arr), info.min, info.max)
    img = nib.Nifti1Image(arr.astype(dtype), volume.affine)
    img.set_qform(volume.affine, code=1)
    img.set_sform(volume.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
