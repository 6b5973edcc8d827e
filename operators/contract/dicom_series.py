"""DICOM CT series: finding them in a folder tree and turning one into a ``Volume``.

Written here rather than taken from the App SDK's ``DICOMSeriesToVolumeOperator`` because
that operator swaps the in-plane spacings for non-square pixels, converts only the first
series of the first study and silently drops instances that share a position (see
``shared/reference/deploy.md``). pydicom does the decoding (compressed transfer syntaxes
through its pixel-data plugins: JPEG Lossless, JPEG-LS and RLE through pylibjpeg, JPEG 2000
through pylibjpeg-openjpeg); this module only does geometry and checks.

Two kinds of CT instances are read: CT Image Storage (one slice per instance) and Enhanced CT Image
Storage (one multi-frame instance per series as a rule; any number of them). An Enhanced CT's frames
become slices like a classic series' instances (``series_frames``): each frame's position, orientation,
pixel spacing and rescale come from its item of the Per-frame Functional Groups Sequence or, where the
macro is shared, from the Shared Functional Groups Sequence; the rest of the code (geometry, checks,
volume) sees one classic header per frame, so an Enhanced CT gives the same ``Volume`` as the classic
series it was made from.
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
from pydicom.pixels import iter_pixels, pixel_array
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

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
CT_STORAGE_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE)  # the SOP classes a series may be read from
_MULTI_FRAME_CLASSES = frozenset({ENHANCED_CT_IMAGE_STORAGE})  # their geometry is in functional groups


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

    @property
    def slices(self) -> int:
        """The image frames the instances declare: one per single-frame instance, NumberOfFrames per
        multi-frame one (0 where that is not a count; ``series_frames`` checks it). Never raises."""
        return sum(declared_frames(h) for h in self.headers)


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

# A frame's attributes in a multi-frame instance: keyword -> the functional group (sequence) that holds it, in
# the frame's Per-frame Functional Groups item or, when shared by all frames, the Shared Functional Groups item.
_FRAME_GROUPS = {
    "ImagePositionPatient": "PlanePositionSequence",
    "ImageOrientationPatient": "PlaneOrientationSequence",
    "PixelSpacing": "PixelMeasuresSequence",
    "SliceThickness": "PixelMeasuresSequence",
    "RescaleSlope": "PixelValueTransformationSequence",
    "RescaleIntercept": "PixelValueTransformationSequence",
}
_FRAME_GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")  # refused when missing
# The instance's own attributes each of its frames carries (a classic slice has them at the top level)
_INSTANCE_KEYWORDS = ("Rows", "Columns", "FrameOfReferenceUID", "SOPClassUID", "SOPInstanceUID")


def is_multi_frame(header: Dataset) -> bool:
    """Whether the instance is of a multi-frame CT class whose geometry is in functional groups (Enhanced CT)."""
    return str(header.get("SOPClassUID", "")) in _MULTI_FRAME_CLASSES


def declared_frames(header: Dataset) -> int:
    """The frames an instance declares: 1 for a single-frame class, NumberOfFrames for a multi-frame one (0
    where that is missing or not a count). Never raises: ``instance_frames`` is the check."""
    if not is_multi_frame(header):
        return 1
    try:
        n = int(header.get("NumberOfFrames"))
    except (TypeError, ValueError):
        return 0
    return max(n, 0)


@dataclass
class SeriesFrames:
    """A series as slices: one header per frame (an instance's own header for a single-frame instance; for a
    multi-frame one, a header with the classic single-frame attributes taken from its functional groups),
    the name each is known by in messages, and where its pixels are: (index of the instance in the series,
    0-based frame in that instance, or None for a single-frame instance)."""

    headers: list[Dataset]
    names: list[str]
    refs: list[tuple[int, int | None]]


def series_frames(headers: Sequence[Dataset], names: Sequence[str]) -> SeriesFrames:
    """The series' frames (``SeriesFrames``), instance by instance, each multi-frame instance's frames in
    its order; a multi-frame instance whose functional groups are missing or malformed is refused by name."""
    out = SeriesFrames([], [], [])
    for i, (h, name) in enumerate(zip(headers, names)):
        if not is_multi_frame(h):
            out.headers.append(h)
            out.names.append(name)
            out.refs.append((i, None))
            continue
        for f, frame in enumerate(instance_frames(h, name)):
            out.headers.append(frame)
            out.names.append(f"{name} frame {f + 1}")
            out.refs.append((i, f))
    return out


def instance_frames(header: Dataset, name: str) -> list[Dataset]:
    """One classic header per frame of a multi-frame (Enhanced CT) instance: Rows, Columns, frame of
    reference and SOP identity from the instance; position, orientation, pixel spacing, slice thickness
    and rescale from the frame's Per-frame Functional Groups item, else the Shared Functional Groups item.
    Refused, naming the file (and frame) and what is missing: NumberOfFrames absent or not a count, a Per-frame
    Functional Groups Sequence absent or of another length than NumberOfFrames, a frame without position,
    orientation or pixel spacing. The elements are taken as they are (their values are checked where used)."""
    try:
        declared = header.get("NumberOfFrames")
        if declared is None:
            raise VolumeError(f"{name}: multi-frame CT without NumberOfFrames")
        try:
            n = int(declared)
        except (TypeError, ValueError):
            raise VolumeError(f"{name}: NumberOfFrames is not a number") from None
        if n < 1:
            raise VolumeError(f"{name}: NumberOfFrames is {n}; a multi-frame CT needs at least one frame")
        per_frame = header.get("PerFrameFunctionalGroupsSequence")
        if per_frame is None:
            raise VolumeError(
                f"{name}: multi-frame CT without PerFrameFunctionalGroupsSequence (each frame's position unknown)"
            )
        if len(per_frame) != n:
            raise VolumeError(
                f"{name}: NumberOfFrames is {n} but PerFrameFunctionalGroupsSequence has {len(per_frame)} items"
            )
        shared_seq = header.get("SharedFunctionalGroupsSequence") or []
        if len(shared_seq) > 1:
            raise VolumeError(f"{name}: SharedFunctionalGroupsSequence has {len(shared_seq)} items; it has one")
        shared = shared_seq[0] if shared_seq else Dataset()
        frames = []
        for f, item in enumerate(per_frame, start=1):
            frame = Dataset()
            for keyword in _INSTANCE_KEYWORDS:
                if keyword in header:
                    frame.add(header[keyword])
            for keyword, group in _FRAME_GROUPS.items():
                element = _group_element(item, shared, group, keyword)
                if element is not None:
                    frame.add(element)
                elif keyword in _FRAME_GEOMETRY:
                    raise VolumeError(
                        f"{name} frame {f}: missing {keyword} ({group} in neither its "
                        "PerFrameFunctionalGroupsSequence item nor the SharedFunctionalGroupsSequence)"
                    )
            frames.append(frame)
        return frames
    except VolumeError:
        raise
    except Exception as exc:  # a sequence pydicom cannot parse, an item that is not a dataset...
        raise VolumeError(f"{name}: malformed multi-frame functional groups ({describe(exc)})") from exc


def _group_element(item: Dataset, shared: Dataset, group: str, keyword: str):
    """``keyword``'s element in functional group ``group``: the frame's own item first, then the shared one."""
    for where in (item, shared):
        seq = where.get(group)
        if seq and keyword in seq[0] and seq[0][keyword].value is not None:
            return seq[0][keyword]
    return None


def series_geometry(headers: Sequence[Dataset], names: Sequence[str]) -> tuple[np.ndarray, list[int]]:
    """Check a series' geometry; return its RAS affine and the slice order: indices into the series' frames
    (``series_frames``), which for single-frame instances are the instances themselves (indices into headers)."""
    frames = series_frames(headers, names)
    return _frame_geometry(frames.headers, frames.names)


def _frame_geometry(headers: Sequence[Dataset], names: Sequence[str]) -> tuple[np.ndarray, list[int]]:
    """``series_geometry`` of the frames' headers (one classic header per slice)."""
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


def _pixel_source(path: str, header: Dataset) -> str | Dataset:
    """What ``iter_pixels`` decodes a multi-frame instance's pixels from: the file, or the dataset read whole
    for a deflated one (pydicom's file route reads the deflated stream as stored, as in ``read_frame``)."""
    meta = getattr(header, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return pydicom.dcmread(path)
    return path


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
    studies skips faulting in a new one per study).

    A multi-frame (Enhanced CT) instance's frames are decoded one after the other by pydicom
    (``pydicom.pixels.iter_pixels``: from the file ``names[n]`` with ``offsets``, else from the dataset), each
    into its plane and rescaled by its own functional groups; it must hold NumberOfFrames frames."""
    names = (
        list(names)
        if names is not None
        else [str(getattr(d, "filename", f"instance {n}")) for n, d in enumerate(datasets)]
    )
    frames = series_frames(datasets, names)
    affine, order = _frame_geometry(frames.headers, frames.names)
    first = frames.headers[order[0]]
    rows, cols = int(first.Rows), int(first.Columns)
    shape = (len(order), rows, cols)
    ok = out is not None and out.shape == shape and out.dtype == np.float32 and out.flags.c_contiguous
    buf: np.ndarray = out if (ok and out is not None) else np.empty(shape, dtype=np.float32)
    low = np.empty(len(order), dtype=np.float64)  # each plane's value range after rescale
    high = np.empty(len(order), dtype=np.float64)

    def place(k: int, pix: np.ndarray, header: Dataset, name: str) -> None:
        """Frame ``pix`` (as stored) into plane k, rescaled to HU by ``header``'s slope and intercept."""
        if pix.shape != (rows, cols):
            raise VolumeError(
                f"{name}: expected one {rows}x{cols} frame like the first slice, found pixels {pix.shape}"
            )
        # integer -> float32 within the first operation; the rescale runs in float32
        slope, intercept = _rescale(header, name)
        if slope != 1.0:
            np.multiply(pix, np.float32(slope), out=buf[k], casting="unsafe")
            buf[k] += np.float32(intercept)
        else:
            np.add(pix, np.float32(intercept), out=buf[k], casting="unsafe")
        low[k], high[k] = buf[k].min(), buf[k].max()

    # planes of single-frame instances, and where each multi-frame instance's frames start in ``frames``
    singles = [k for k, f in enumerate(order) if frames.refs[f][1] is None]
    starts: dict[int, int] = {}
    for f, (idx, frame) in enumerate(frames.refs):
        if frame is not None:
            starts.setdefault(idx, f)

    def assemble(part: range) -> None:
        scratch = np.empty(rows * cols * 2, dtype=np.uint8)  # this thread's native frame, reused
        for k in (singles[p] for p in part):
            f = order[k]
            idx = frames.refs[f][0]
            ds = datasets[idx]
            try:
                pix = read_frame(names[idx], ds, offsets[idx], scratch) if offsets is not None else ds.pixel_array
            except Exception as exc:
                raise VolumeError(f"{names[idx]}: pixel data cannot be decoded ({describe(exc)})") from exc
            place(k, pix, frames.headers[f], frames.names[f])

    # reading native pixel data and the conversions run in numpy without the GIL, so the slabs overlap
    in_slabs(assemble, len(singles), _ASSEMBLY_THREADS)
    if starts:
        plane = np.empty(len(order), dtype=np.int64)  # frame index -> its plane
        plane[np.asarray(order)] = np.arange(len(order))
        for idx, start in starts.items():
            n = declared_frames(datasets[idx])
            decoded = 0
            try:
                source = datasets[idx] if offsets is None else _pixel_source(names[idx], datasets[idx])
                for pix in iter_pixels(source):
                    if decoded >= n:
                        raise VolumeError(f"{names[idx]}: pixel data holds more frames than NumberOfFrames {n}")
                    f = start + decoded
                    place(int(plane[f]), pix, frames.headers[f], frames.names[f])
                    decoded += 1
            except VolumeError:
                raise
            except Exception as exc:
                raise VolumeError(
                    f"{names[idx]}: pixel data cannot be decoded at frame {decoded + 1} of {n} ({describe(exc)})"
                ) from exc
            if decoded != n:
                raise VolumeError(f"{names[idx]}: pixel data holds {decoded} frames; NumberOfFrames is {n}")
    check_hounsfield(float(low.min()), float(high.max()), names[frames.refs[order[0]][0]])
    return Volume(buf.transpose(2, 1, 0), affine, str(Path(names[frames.refs[order[0]][0]]).parent))


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
