"""DICOM CT series: finding them in a folder tree and turning one into a ``Volume``.

Written here rather than taken from the App SDK's ``DICOMSeriesToVolumeOperator`` because
that operator swaps the in-plane spacings for non-square pixels, converts only the first
series of the first study and silently drops instances that share a position (see
``shared/reference/deploy.md``). pydicom does the decoding (compressed transfer syntaxes
through its pixel-data plugins); this module only does geometry and checks.
"""

from __future__ import annotations

import os
import stat
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .phi import describe
from .plausibility import check_geometry, check_hounsfield, check_rescale
from .uids import is_valid_uid
from .volume import Volume, VolumeError, in_slabs

# Orientation cosines must agree across a series to this tolerance.
_IOP_TOL = 1e-3
# Slice gaps may vary by this fraction of the median gap before the series is refused.
_GAP_TOL = 0.05
_PERPENDICULAR_TOL = 1e-3  # cosine between the stacking direction and the slice normal
_ASSEMBLY_THREADS = 2  # a worker's share of the cores for decoding (see series_to_volume)


@dataclass
class SeriesFiles:
    study_uid: str
    series_uid: str
    modality: str
    paths: list[Path] = field(default_factory=list)
    headers: list[Dataset] = field(default_factory=list)
    # Where each file's Pixel Data element starts (the position the header read stopped at), for
    # ``read_frame``'s direct read of native pixel data; None where unknown.
    pixel_offsets: list[int | None] = field(default_factory=list)
    # Damaged DICOM files (the DICOM preamble, but no readable header) in a folder that holds this series:
    # one may be a slice of it, so the series cannot be called complete (the first or last slice of a
    # stack leaves no gap to see).
    damaged: list[tuple[Path, str]] = field(default_factory=list)


@dataclass
class ScanResult:
    series: dict[tuple[str, str], SeriesFiles]  # by (StudyInstanceUID, SeriesInstanceUID)
    unreadable: list[tuple[Path, str]]  # (path, reason) for files that are not usable DICOM

    def studies(self) -> dict[str, list[SeriesFiles]]:
        out: dict[str, list[SeriesFiles]] = defaultdict(list)
        for s in self.series.values():
            out[s.study_uid].append(s)
        return dict(out)


def scan_tree(root: str | Path) -> ScanResult:
    """Group every DICOM file under ``root`` by study and series (any folder layout)."""
    root = Path(root)
    if not root.exists():
        raise VolumeError(f"{root}: input folder does not exist")
    files = [root.resolve()] if root.is_file() else sorted(Path(dp) / f for dp, _, fs in os.walk(root) for f in fs)
    return scan_files(files)


def scan_files(files: Iterable[str | Path]) -> ScanResult:
    """Read the headers of ``files`` and group them by (Study, Series Instance UID): two studies that
    share a series UID stay two studies. A file whose UIDs are not valid DICOM UIDs is unreadable."""
    series: dict[tuple[str, str], SeriesFiles] = {}
    unreadable: list[tuple[Path, str]] = []
    for path in map(Path, files):
        kind = _not_regular(path)
        if kind:
            unreadable.append((path, kind))
            continue
        try:
            with open(path, "rb") as fh:
                ds = pydicom.dcmread(fh, stop_before_pixels=True)
                offset = fh.tell()  # pydicom stops before the Pixel Data tag
            study_uid, series_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        except Exception as exc:  # pydicom raises InvalidDicomError, EOFError, AttributeError...
            unreadable.append((path, f"not a readable DICOM instance ({describe(exc)})"))
            continue
        bad = [
            k for k, v in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid)) if not is_valid_uid(v)
        ]
        if bad:
            unreadable.append((path, f"{' and '.join(bad)} not a valid DICOM UID"))
            continue
        key = (study_uid, series_uid)
        s = series.setdefault(key, SeriesFiles(study_uid, series_uid, str(ds.get("Modality", ""))))
        s.paths.append(path)
        s.headers.append(ds)
        s.pixel_offsets.append(offset)
    _attach_damaged(series, unreadable)
    return ScanResult(series, unreadable)


def _not_regular(path: Path) -> str | None:
    """Why ``path`` is not read: a link (it may point out of the input tree, or at a device) or not a regular
    file (a FIFO would block the scan forever, a device never ends); None for a regular file."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot be examined ({exc.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link: not followed"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a FIFO, device or socket): not read"
    return None


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _attach_damaged(series: dict[tuple[str, str], SeriesFiles], unreadable: list[tuple[Path, str]]) -> None:
    """An unreadable file that is DICOM by its preamble is attributed to every series with an instance in
    its folder (a file with no preamble, e.g. a README, is only listed as unreadable)."""
    damaged = [(p, why) for p, why in unreadable if _not_regular(p) is None and _has_dicom_preamble(p)]
    if not damaged:
        return
    folders: dict[Path, list[SeriesFiles]] = defaultdict(list)
    for s in series.values():
        for parent in {p.parent for p in s.paths}:
            folders[parent].append(s)
    for path, why in damaged:
        for s in folders.get(path.parent, []):
            s.damaged.append((path, why))


_NATIVE_LE = {ImplicitVRLittleEndian: 8, ExplicitVRLittleEndian: 12}  # bytes of the Pixel Data tag, VR, length
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


def read_frame(path: str | Path, header: Dataset, offset: int | None, scratch: np.ndarray | None = None) -> np.ndarray:
    """The pixels of a single-frame instance as pydicom decodes them (``pydicom.pixels.pixel_array``).

    Native (uncompressed) little-endian 16-bit grey pixel data, the common CT case, is read straight
    from ``offset`` (where the header scan stopped: the Pixel Data element) with ``numpy.fromfile``:
    300 slices of 512x512 in 0.05 s against pydicom's 0.4 s, which parses each file again (docs/performance.md,
    stage timings). The element's tag and length are checked first; unused high bits are handled as
    pydicom does (shifted out, sign-extended for signed data). Anything else (compressed transfer
    syntaxes, other bit depths, colour, multi-frame, an unexpected element) goes to pydicom.

    ``scratch``: a uint8 buffer of at least rows x columns x 2 bytes that a native frame is read into
    (no fresh array per frame); the result is then a view of it, valid until its next use."""
    meta = getattr(header, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts == DeflatedExplicitVRLittleEndian:  # pixel_array(path) reads the stream as stored, not inflated
        return pydicom.dcmread(str(path)).pixel_array
    rows, cols = int(header.get("Rows", 0)), int(header.get("Columns", 0))
    stored = int(header.get("BitsStored", 0) or 0)
    head = _NATIVE_LE.get(ts) if ts is not None else None
    if (
        offset is None
        or head is None
        or header.get("BitsAllocated") != 16
        or not 1 <= stored <= 16
        or header.get("SamplesPerPixel", 1) != 1
        or int(header.get("NumberOfFrames", 1) or 1) != 1
        or header.get("PixelRepresentation") not in (0, 1)
        or rows <= 0
        or cols <= 0
    ):
        return pixel_array(str(path))
    with open(path, "rb") as fh:
        fh.seek(offset)
        element = fh.read(head)
        if element[:4] == _PIXEL_DATA_TAG and int.from_bytes(element[-4:], "little") == rows * cols * 2:
            dtype = np.dtype("<i2" if header.PixelRepresentation == 1 else "<u2")
            if scratch is not None and scratch.dtype == np.uint8 and scratch.size >= rows * cols * 2:
                arr = scratch[: rows * cols * 2].view(dtype)
                got = fh.readinto(scratch[: rows * cols * 2].data)
                arr = arr if got == rows * cols * 2 else arr[:0]
            else:
                arr = np.fromfile(fh, dtype=dtype, count=rows * cols)
            if arr.size == rows * cols:
                arr = arr.reshape(rows, cols)
                if stored < 16:
                    np.left_shift(arr, 16 - stored, out=arr)
                    np.right_shift(arr, 16 - stored, out=arr)
                return arr
    return pixel_array(str(path))


def _floats(ds: Dataset, keyword: str, n: int, where: str) -> np.ndarray:
    value = ds.get(keyword)
    if value is None:
        raise VolumeError(f"{where}: missing {keyword}")
    try:
        arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{where}: malformed {keyword} {value!r}") from exc
    if arr.shape != (n,):
        raise VolumeError(f"{where}: {keyword} should have {n} values, has {arr.size}")
    return arr


_REQUIRED = ("Rows", "Columns", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient")


def series_geometry(headers: Sequence[Dataset], names: Sequence[str]) -> tuple[np.ndarray, list[int]]:
    """Check a series' geometry; return its RAS affine and the slice order (indices into headers)."""
    for h, n in zip(headers, names):
        missing = [k for k in _REQUIRED if k not in h]
        if missing:
            raise VolumeError(f"{n}: missing {', '.join(missing)} (truncated or not an image instance)")
    if len(headers) < 2:
        raise VolumeError(f"{names[0] if names else '<series>'}: series has a single slice; a volume needs at least 2")
    iops = np.stack([_floats(h, "ImageOrientationPatient", 6, n) for h, n in zip(headers, names)])
    if np.abs(iops - iops[0]).max() > _IOP_TOL:
        raise VolumeError(f"{names[0]}: slices of the series have different ImageOrientationPatient")
    sizes = {(int(h.Rows), int(h.Columns)) for h in headers}
    if len(sizes) != 1:
        raise VolumeError(f"{names[0]}: slices of the series have different sizes {sorted(sizes)}")
    spacings = np.stack([_floats(h, "PixelSpacing", 2, n) for h, n in zip(headers, names)])
    if np.abs(spacings - spacings[0]).max() > 1e-4:
        raise VolumeError(f"{names[0]}: slices of the series have different PixelSpacing")
    row_dir, col_dir = iops[0, :3], iops[0, 3:]
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    ipps = np.stack([_floats(h, "ImagePositionPatient", 3, n) for h, n in zip(headers, names)])
    pos = ipps @ normal
    order = [int(i) for i in np.argsort(pos, kind="stable")]
    gaps = np.diff(pos[order])
    dup = np.flatnonzero(gaps < 1e-3)
    if dup.size:
        a, b = order[dup[0]], order[dup[0] + 1]
        raise VolumeError(
            f"{names[a]} and {names[b]}: two slices share position {pos[a]:.3f} mm along the normal "
            "(multi-phase or duplicated series); refusing to guess which to keep"
        )
    gap = float(np.median(gaps))
    if np.abs(gaps - gap).max() > _GAP_TOL * gap:
        raise VolumeError(f"{names[order[0]]}: uneven slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm)")
    dr, dc = spacings[0]  # PixelSpacing = (row spacing, column spacing)
    rows, cols = sizes.pop()
    check_geometry(rows, cols, len(headers), float(dr), float(dc), gap, names[order[0]])  # before any allocation
    _check_stacking(headers, ipps[order], iops[0], normal, names[order[0]])
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dc  # i: along a row, i.e. across columns
    lps[:3, 1] = col_dir * dr  # j: down a column, i.e. across rows
    lps[:3, 2] = normal * gap  # k: slice index in the sorted order
    lps[:3, 3] = ipps[order[0]]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, order


def _number(ds: Dataset, keyword: str, name: str) -> float | None:
    """A numeric header value (None when absent); refused, without quoting it, when it is not a number."""
    if ds.get(keyword) is None:
        return None
    try:
        return float(ds.get(keyword))
    except (TypeError, ValueError):
        raise VolumeError(f"{name}: {keyword} is not a number") from None


def _rescale(ds: Dataset, name: str) -> tuple[float, float]:
    """The slice's RescaleSlope and RescaleIntercept, present and plausible (``plausibility``)."""
    slope, intercept = _number(ds, "RescaleSlope", name), _number(ds, "RescaleIntercept", name)
    check_rescale(slope, intercept, name)
    assert slope is not None and intercept is not None
    return slope, intercept


def _check_stacking(headers: Sequence[Dataset], ipps: np.ndarray, iop: np.ndarray, normal, first: str) -> None:
    """One frame of reference, and slices stacked along their normal: a gantry-tilted or sheared stack
    would get a wrong affine from (row, column, normal) axes, so it is refused with the angle.
    highdicom's volume check confirms what the checks above pass, on the positions and orientation
    already parsed (``get_volume_positions``: its per-dataset twin, ``get_series_volume_positions``,
    looks up each header's IOD and cost 0.29 s per 300-slice series)."""
    from highdicom.spatial import get_volume_positions

    frames = {str(h.get("FrameOfReferenceUID", "")) for h in headers}
    if len(frames) != 1:
        n = len(frames - {""})
        missing = " (some slices have none)" if "" in frames else ""
        raise VolumeError(f"{first}: slices of the series have {n} different FrameOfReferenceUIDs{missing}")
    span = ipps[-1] - ipps[0]
    cos = float(abs(span @ normal) / max(np.linalg.norm(span), 1e-9))
    if cos < 1 - _PERPENDICULAR_TOL:
        angle = float(np.degrees(np.arccos(min(1.0, cos))))
        raise VolumeError(
            f"{first}: slices are not stacked along their normal ({angle:.1f} degrees off: gantry tilt or "
            "shear); refusing a volume whose affine would be wrong"
        )
    spacing, _ = get_volume_positions(ipps.tolist(), iop.tolist(), rtol=_GAP_TOL, perpendicular_tol=_PERPENDICULAR_TOL)
    if spacing is None:
        raise VolumeError(f"{first}: highdicom does not accept the slices as one regular 3D volume")


def series_to_volume(
    datasets: Sequence[Dataset],
    names: Sequence[str] | None = None,
    offsets: Sequence[int | None] | None = None,
    out: np.ndarray | None = None,
) -> Volume:
    """Build a HU volume with its RAS affine: array[i=column, j=row, k=slice].
    ``datasets``: full datasets, or headers only with ``offsets``: instance n's pixels are then read
    from the file ``names[n]`` (``read_frame``, from where the header scan stopped).

    The array is the (I, J, K) view of a slice-major buffer (K, J, I): each decoded frame is copied
    once, whole, into its plane, instead of strided across the volume (a 512x512x300 series: 0.42 s ->
    ~0.15 s; docs/performance.md, stage timings). ``preprocess`` reads that layout without a copy. ``out``: a float32
    C-ordered (K, J, I) buffer to fill when it has the right shape (a worker reusing one buffer across
    studies skips faulting in a new one per study)."""
    names = (
        list(names)
        if names is not None
        else [str(getattr(d, "filename", f"instance {n}")) for n, d in enumerate(datasets)]
    )
    affine, order = series_geometry(datasets, names)
    first = datasets[order[0]]
    rows, cols = int(first.Rows), int(first.Columns)
    shape = (len(order), rows, cols)
    ok = out is not None and out.shape == shape and out.dtype == np.float32 and out.flags.c_contiguous
    buf: np.ndarray = out if (ok and out is not None) else np.empty(shape, dtype=np.float32)

    def assemble(planes: range) -> None:
        scratch = np.empty(rows * cols * 2, dtype=np.uint8)  # this thread's native frame, reused
        for k in planes:
            idx = order[k]
            ds = datasets[idx]
            try:
                pix = read_frame(names[idx], ds, offsets[idx], scratch) if offsets is not None else ds.pixel_array
            except Exception as exc:
                raise VolumeError(f"{names[idx]}: pixel data cannot be decoded ({describe(exc)})") from exc
            if pix.shape != (rows, cols):
                raise VolumeError(
                    f"{names[idx]}: expected one {rows}x{cols} frame like the first slice, found pixels {pix.shape}"
                )
            # integer -> float32 within the first operation; the rescale runs in float32
            slope, intercept = _rescale(ds, names[idx])
            if slope != 1.0:
                np.multiply(pix, np.float32(slope), out=buf[k], casting="unsafe")
                buf[k] += np.float32(intercept)
            else:
                np.add(pix, np.float32(intercept), out=buf[k], casting="unsafe")
            low[k], high[k] = buf[k].min(), buf[k].max()

    low = np.empty(len(order), dtype=np.float64)  # each plane's value range after rescale
    high = np.empty(len(order), dtype=np.float64)
    # reading native pixel data and the conversions run in numpy without the GIL, so the slabs overlap
    in_slabs(assemble, len(order), _ASSEMBLY_THREADS)
    check_hounsfield(float(low.min()), float(high.max()), names[order[0]])
    return Volume(buf.transpose(2, 1, 0), affine, str(Path(names[order[0]]).parent))


def read_series(paths: Iterable[str | Path]) -> Volume:
    """Read and convert a series given as files; errors name the offending file."""
    paths = [Path(p) for p in paths]
    datasets = []
    for p in paths:
        try:
            datasets.append(pydicom.dcmread(p))
        except Exception as exc:
            raise VolumeError(f"{p}: not a readable DICOM instance ({type(exc).__name__}: {exc})") from exc
    return series_to_volume(datasets, [str(p) for p in paths])


def load_dicom_folder(folder: str | Path) -> Volume:
    """Read the single series held in ``folder`` (a DICOM folder of one study and series)."""
    scan = scan_tree(folder)
    if scan.unreadable:
        p, why = scan.unreadable[0]
        raise VolumeError(f"{p}: {why}")
    if not scan.series:
        raise VolumeError(f"{folder}: no DICOM instances found")
    if len(scan.series) > 1:
        raise VolumeError(f"{folder}: holds {len(scan.series)} series; point to a folder with exactly one")
    (s,) = scan.series.values()
    return read_series(s.paths)
