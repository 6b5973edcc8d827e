"""Where a present finding is: maps from the image tower's localisation output, on the source CT, as DICOM SEG.

The package's image encoder may give, in the same pass as the embedding, a ``localisation`` output
(B, D, x, y, z): the joint-space features of each location of the last feature map, whose spatial mean
is the embedding (``training.onnx_export.localisation_features``). Merlin's rule scores a finding by the
margin ``e . (p+ - p-)`` (the means of its positive and negative prompt embeddings), which is linear in
``e``; so ``localisation . (p+ - p-)`` is a map whose mean is the finding's margin: each location's share
of the score. For a finding called present:

- the map is resampled (trilinear, borders clamped) from the model-input grid to the source CT's voxels;
- its **region** is the upper part of the map on the CT: where it reaches ``REGION_FRACTION`` of the way from
  its lowest value there to its highest (a finding called present at a threshold under 0.5 may have no
  positive location; its map still says where its score was highest): one binary segment of a DICOM
  Segmentation of the series, in its frame of reference;
- its **peak** (the centre of the map's highest location, inside the CT) is given in patient coordinates
  (LPS mm), which the SR carries as a SCOORD3D point.

The maps are as coarse as the tower's last feature map (the input size over the tower's stride, e.g.
7 x 7 x 5 locations for Merlin's 224 x 224 x 160 input): they say which part of the abdomen carried the
score, not a lesion's outline. Occlusion (``ct-zeroshot-train pointing --method occlusion``) stays the
model-agnostic check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from .contract.dicom_series import is_multi_frame, series_geometry
from .contract.package import ModelPackage
from .contract.scoring import Findings

# A segment holds the voxels this far from the map's lowest value on the CT to its highest: the upper fifth of the
# range, the fraction with the best Dice against focal lesions on validation studies
# (``python -m benchmarks.map_regions``, results/maps/region-fraction.md; the upper half took 58 % of the
# volume and every slice, and held no more of the lesion than its share of the volume)
REGION_FRACTION = 0.8
REGION_GRID = 128  # the region is computed on blocks of voxels, about this many per in-plane axis
SEG_SERIES_NUMBER = 9101
SEG_SERIES_DESCRIPTION = "ct-zeroshot AI finding maps"
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


class MapError(ValueError):
    """A localisation map cannot be placed on the CT (a grid that is not axis-aligned or not the series')."""


@dataclass
class FindingMap:
    """One present finding's map on the CT: its region (bool [i, j, k] on the volume grid) and peak."""

    index: int  # the finding's position in ``Findings``
    finding: str
    region: np.ndarray
    peak_lps: tuple[float, float, float]  # patient coordinates (mm) of the map's highest location, in the CT


@dataclass
class StudyMaps:
    """The present findings' maps of one study and the volume grid they are on."""

    maps: list[FindingMap]
    volume_affine: np.ndarray  # voxel -> RAS of the CT volume (``dicom_series.series_to_volume``)


def finding_directions(package: ModelPackage, indices: Sequence[int]) -> np.ndarray:
    """(F, D): each finding's ``mean(positive prompts) - mean(negative prompts)`` (Merlin's margin is the
    image embedding's dot product with it)."""
    emb, rows = np.asarray(package.prompt_embeddings, dtype=np.float64), package.rows
    return np.stack(
        [
            emb[rows[i].positive[0] : rows[i].positive[1]].mean(0)
            - emb[rows[i].negative[0] : rows[i].negative[1]].mean(0)
            for i in indices
        ]
    )


def coarse_maps(
    localisation: np.ndarray, package: ModelPackage, indices: Sequence[int], input_affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Findings ``indices``' maps on the tower's last feature map, (F, x, y, z), and that grid's voxel -> RAS
    affine, from one study's ``localisation`` (D, x, y, z) and its model input's affine."""
    coarse = np.einsum(
        "dxyz,fd->fxyz", np.asarray(localisation, dtype=np.float64), finding_directions(package, indices)
    )
    return coarse, map_affine(input_affine, package.spec.spatial_size, localisation.shape[1:])


def map_affine(input_affine: np.ndarray, input_size: Sequence[int], map_shape: Sequence[int]) -> np.ndarray:
    """Map voxel -> RAS: location u of an axis of n input voxels cut into m covers input voxels
    [u n/m, (u+1) n/m), centred at (u + 1/2) n/m - 1/2."""
    scale = np.asarray(input_size, dtype=np.float64) / np.asarray(map_shape, dtype=np.float64)
    a = np.eye(4)
    a[:3, :3] = np.diag(scale)
    a[:3, 3] = scale / 2 - 0.5
    return np.asarray(input_affine, dtype=np.float64) @ a


def _interpolation_matrix(positions: np.ndarray, n: int) -> np.ndarray:
    """(len(positions), n): linear interpolation weights at fractional indices, clamped to [0, n - 1]."""
    pos = np.clip(positions, 0.0, n - 1)
    low = np.minimum(np.floor(pos), max(n - 2, 0)).astype(np.intp)
    frac = pos - low
    w = np.zeros((len(pos), n), dtype=np.float64)
    rows = np.arange(len(pos))
    w[rows, low] += 1.0 - frac
    w[rows, np.minimum(low + 1, n - 1)] += frac
    return w


def on_volume(values: np.ndarray, values_affine: np.ndarray, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """A map (x, y, z) with its voxel -> RAS affine, resampled to a volume grid (``shape``, ``affine``).

    Both grids come from the same series by axis flips, permutations and scalings (the preprocessing's
    Orientation and Spacing keep the direction cosines), so each volume axis reads one map axis and
    trilinear interpolation is three small matrix products (written by hand: a general resampler such as
    scipy's ``affine_transform`` reads eight neighbours per voxel of a 512 x 512 x 300 volume)."""
    xform = np.linalg.solve(np.asarray(values_affine, dtype=np.float64), np.asarray(affine, dtype=np.float64))
    m = np.abs(xform[:3, :3])
    source = [int(v) for v in np.argmax(m, axis=0)]  # the map axis each volume axis reads
    off_axis = m.copy()
    off_axis[source, range(3)] = 0.0
    if sorted(source) != [0, 1, 2] or off_axis.max() > 1e-6 * m.max():
        raise MapError("the map's grid is not axis-aligned with the volume's")
    weights = [
        _interpolation_matrix(xform[source[a], a] * np.arange(shape[a]) + xform[source[a], 3], values.shape[source[a]])
        for a in range(3)
    ]
    v = np.transpose(np.asarray(values, dtype=np.float64), source)  # map axes in the volume's order
    v = np.einsum("ia,abc->ibc", weights[0], v)
    v = np.einsum("jb,ibc->ijc", weights[1], v)
    return v.astype(np.float32) @ weights[2].T.astype(np.float32)  # (I, J, c) @ (c, K): float32, no copy after


def map_region(field: np.ndarray, fraction: float = REGION_FRACTION) -> np.ndarray:
    """Where ``field`` (a map resampled onto the CT) reaches ``fraction`` of the way from its lowest value on the
    CT to its highest: a map's highest location may lie partly outside the CT (the model's input reaches
    past it), so the range is the CT's. Nowhere for a flat field (it says nowhere in particular)."""
    low, top = float(field.min()), float(field.max())
    if top > low:
        return field >= low + fraction * (top - low)
    return np.zeros(field.shape, dtype=bool)


def finding_map_on_volume(
    coarse: np.ndarray, grid: np.ndarray, shape: Sequence[int], affine: np.ndarray, fine: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One finding's map (x, y, z on ``grid``) on a volume grid: (field, region, peak voxel).

    The region is the upper part of the map's range (``REGION_FRACTION``); the peak is the centre of the map's
    highest location (trilinear interpolation peaks there, and beyond the outermost centres it is flat), moved
    inside the volume where that location reaches past it, as fractional voxel indices.

    The map is interpolated at the centres of blocks of ``step`` x ``step`` voxels in the first two axes, so
    about ``REGION_GRID`` per axis (a 512 x 512 slice: 4 x 4 blocks, 2.8 mm at 0.7 mm pixels, against map
    locations of centimetres), and each block takes its centre's value: a sixteenth of the work. The field is
    then on the blocks' grid; ``fine`` interpolates at every voxel."""
    step = 1 if fine else max(1, min(int(shape[0]), int(shape[1])) // REGION_GRID)
    if step > 1:
        coarse_shape = (-(-int(shape[0]) // step), -(-int(shape[1]) // step), int(shape[2]))
        blocks = np.asarray(affine, dtype=np.float64) @ np.diag([step, step, 1.0, 1.0])
        blocks[:3, 3] += (np.asarray(affine)[:3, 0] + np.asarray(affine)[:3, 1]) * (step - 1) / 2
        field = on_volume(coarse, grid, coarse_shape, blocks)
    else:
        field = on_volume(coarse, grid, shape, affine)
    region = map_region(field)
    if step > 1:
        # repeated to voxels in (slice, row, column) memory order, so each slice of the region is one block of
        # memory (the SEG's frames, ``build_seg``); ``region`` is its (column, row, slice) view
        zyx = np.ascontiguousarray(region.transpose(2, 1, 0))
        region = np.repeat(np.repeat(zyx, step, axis=1), step, axis=2)[:, : shape[1], : shape[0]].transpose(2, 1, 0)
    u = np.unravel_index(int(np.argmax(coarse)), coarse.shape)
    to_volume = np.linalg.solve(np.asarray(affine, dtype=np.float64), grid)  # map voxel -> volume voxel
    voxel = np.clip((to_volume @ np.r_[np.asarray(u, dtype=np.float64), 1.0])[:3], 0.0, np.asarray(shape) - 1.0)
    return field, region, voxel


def study_maps(
    localisation: np.ndarray,
    findings: Findings,
    package: ModelPackage,
    input_affine: np.ndarray,
    volume_shape: Sequence[int],
    volume_affine: np.ndarray,
) -> StudyMaps:
    """The present findings' maps on the CT volume's grid, from one study's ``localisation`` (D, x, y, z)."""
    present = [i for i, p in enumerate(findings.present) if p]
    maps: list[FindingMap] = []
    if present:
        coarse, grid = coarse_maps(localisation, package, present, input_affine)
        for i, m in zip(present, coarse):
            _, region, voxel = finding_map_on_volume(m, grid, volume_shape, volume_affine)
            lps = (_LPS @ volume_affine @ np.r_[voxel, 1.0])[:3]
            maps.append(FindingMap(i, findings.ids[i], region, (float(lps[0]), float(lps[1]), float(lps[2]))))
    return StudyMaps(maps, np.asarray(volume_affine, dtype=np.float64))


def segmentation_type(rows: int, columns: int) -> dict:
    """highdicom's segmentation type for frames of ``rows`` x ``columns``. BINARY frames are bit-packed end
    to end: when a frame's pixels are not a whole number of bytes, frames start mid-byte, and archives
    cannot cut them out (Orthanc's WADO-RS answers 400 for a frame of a 69 x 69 SEG, so OHIF cannot load
    it). Such grids get one byte per pixel: FRACTIONAL, occupancy 0 or 1, the same region."""
    import highdicom as hd

    if rows * columns % 8 == 0:
        return {"segmentation_type": hd.seg.SegmentationTypeValues.BINARY}
    return {
        "segmentation_type": hd.seg.SegmentationTypeValues.FRACTIONAL,
        "fractional_type": hd.seg.SegmentationFractionalTypeValues.OCCUPANCY,
        "max_fractional_value": 1,
    }


# Segment colours a viewer shows (Recommended Display CIELab Value), by segment number: distinct hues in
# sRGB, so that neighbouring findings' regions differ where they overlap; a viewer without them picks its own.
SEGMENT_COLOURS = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
)


def segment_description(number: int, label: str, code, algorithm: str, version: str, family=None):
    """A highdicom segment for a finding: category morphologically abnormal structure, type its code; made by
    an automatic algorithm of ``family`` (default: artificial intelligence); its display colour by number."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.seg.SegmentDescription(
        segment_number=number,
        display_color=hd.color.CIELabColor.from_rgb(*SEGMENT_COLOURS[(number - 1) % len(SEGMENT_COLOURS)]),
        segment_label=label[:64],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=hd.sr.CodedConcept(code.value, code.scheme, code.meaning),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm[:64], version=version[:64], family=family or codes.DCM.ArtificialIntelligence
        ),
    )


def _header_with(ds: Dataset, *elements) -> Dataset:
    """A copy of the header ``ds`` (the same, still unparsed, elements in a dictionary of its own) with
    ``elements`` added as new elements: setting an attribute instead would change the value of the element
    ``ds`` shares, so ``ds`` itself is never changed."""
    out = Dataset(dict(ds.items()))
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    for elem in elements:
        out.add(elem)
    return out


def _with_shared_geometry(ds: Dataset) -> Dataset:
    """``ds`` as highdicom (0.28) reads a multi-frame source image: it takes the pixel measures and the plane
    orientation from the Shared Functional Groups only (and may add to the items it takes). It gets a copy of
    ``ds`` (the same elements in a dictionary of its own) whose shared item is a deep copy, given the first
    frame's groups where an Enhanced CT has them per frame (equal for all frames: ``series_geometry`` checked
    it); ``ds`` itself is never changed."""
    import copy

    from pydicom.dataelem import DataElement

    shared_seq = ds.get("SharedFunctionalGroupsSequence") or []
    item = copy.deepcopy(shared_seq[0]) if shared_seq else Dataset()
    for group in ("PixelMeasuresSequence", "PlaneOrientationSequence"):
        if group not in item:
            item[group] = copy.deepcopy(ds.PerFrameFunctionalGroupsSequence[0][group])
    return _header_with(ds, DataElement(0x52009229, "SQ", [item]))  # SharedFunctionalGroupsSequence


STAND_IN = 8  # rows and columns of the stand-in frames highdicom is given (a whole number of bytes per frame)


def _resized(ds: Dataset, rows: int, columns: int) -> Dataset:
    """A copy of the header ``ds`` with other Rows and Columns (``_header_with``)."""
    from pydicom.dataelem import DataElement

    return _header_with(ds, DataElement(0x00280010, "US", rows), DataElement(0x00280011, "US", columns))


def segmentation_by_frames(source_images: Sequence[Dataset], regions: np.ndarray, **kwargs) -> Dataset:
    """highdicom's Segmentation of ``source_images`` for ``regions`` (segment, plane, row, column; planes in
    the order of the source images, or of the one multi-frame image's frames), its frames packed here.

    highdicom's constructor checks and encodes the pixel array voxel by voxel (emptiness per plane and per
    segment, the overlap sum over segments, a copy per frame): 4.6 of the 5 seconds of a 3-segment SEG of a
    512 x 512 x 300 CT. So highdicom builds the whole document from stand-in frames of ``STAND_IN`` pixels
    square whose occupancy is the regions' (a frame per non-empty plane and segment, as it would keep them),
    and the real frames are packed into its Pixel Data in the order of its per-frame groups; Rows, Columns
    and Segments Overlap are then set from the regions. ``tests/deploy/test_maps.py`` checks the result
    equals highdicom's own, element for element and byte for byte."""
    import highdicom as hd

    from .contract.dicom_series import is_multi_frame

    regions = np.asarray(regions, dtype=bool)
    n_seg, planes, rows, columns = regions.shape
    seg_type = segmentation_type(rows, columns)
    occupied = regions.reshape(n_seg, planes, -1).any(axis=2)  # (segment, plane)
    stand_in = np.zeros((planes, STAND_IN, STAND_IN, n_seg), dtype=np.uint8)
    stand_in[:, 0, 0, :] = occupied.T
    small = [_resized(d, STAND_IN, STAND_IN) for d in source_images]
    seg = hd.seg.Segmentation(source_images=small, pixel_array=stand_in, **seg_type, **kwargs)

    multi = is_multi_frame(source_images[0])
    plane_of = {str(d.SOPInstanceUID): k for k, d in enumerate(source_images)}
    binary = seg_type["segmentation_type"] == hd.seg.SegmentationTypeValues.BINARY
    chunks = []
    shared = seg.SharedFunctionalGroupsSequence[0]
    for item in seg.PerFrameFunctionalGroupsSequence:
        # a group the frames have in common (one segment) is in the shared item
        segment = (item if "SegmentIdentificationSequence" in item else shared).SegmentIdentificationSequence[0]
        s = int(segment.ReferencedSegmentNumber) - 1
        src = (item if "DerivationImageSequence" in item else shared).DerivationImageSequence[0].SourceImageSequence[0]
        k = int(src.ReferencedFrameNumber) - 1 if multi else plane_of[str(src.ReferencedSOPInstanceUID)]
        frame = regions[s, k]
        chunks.append(np.packbits(frame, axis=None, bitorder="little") if binary else frame.astype(np.uint8))
    data = b"".join(c.tobytes() for c in chunks)
    seg.Rows, seg.Columns = rows, columns
    seg.PixelData = data + b"\0" * (len(data) % 2)
    overlap, seen = False, regions[0].copy()
    for r in regions[1:]:
        overlap = overlap or bool(np.logical_and(seen, r).any())
        seen |= r
    seg.SegmentsOverlap = "YES" if overlap else "NO"
    return seg


def build_seg(
    source: Sequence[Dataset],
    maps: StudyMaps,
    package: ModelPackage,
    series_instance_uid: str,
    sop_instance_uid: str,
) -> tuple[Dataset, dict[int, int]] | None:
    """The maps' regions as one binary DICOM Segmentation of the source series (one segment per finding
    with a region, frames aligned with the series' instances, or with the frames of an Enhanced CT: a single
    multi-frame source image, whose frame order the SEG's frames follow); and finding index -> segment number.
    None when no finding has a region. A series of several multi-frame instances is refused (``MapError``):
    highdicom derives a SEG from one multi-frame image or from single-frame ones."""
    from . import __version__

    with_region = [m for m in maps.maps if m.region.any()]
    if not with_region:
        return None
    names = [str(getattr(d, "filename", f"instance {n}")) for n, d in enumerate(source)]
    affine, order = series_geometry(source, names)
    if not np.allclose(affine, maps.volume_affine, atol=1e-4):
        raise MapError("the maps' volume grid is not the source series' grid")
    # the volume's [i = column, j = row, k = slice] -> frames (slice in the series' order, row, column),
    # segment-major, each frame one block of memory (a copy without transposing when the region is laid out
    # by slice, as ``finding_map_on_volume`` makes it)
    regions = np.empty((len(with_region), *maps.maps[0].region.shape[::-1]), dtype=bool)  # segment, k, row, col
    for n, m in enumerate(with_region):
        regions[n] = m.region.transpose(2, 1, 0)
    if not any(is_multi_frame(d) for d in source):
        source_images = [source[k] for k in order]  # order: indices of the instances, one frame each
    elif len(source) == 1:
        # order: indices of the frames; highdicom pairs SEG frame n with the source's frame n, so the planes
        # go back to the source's frame order
        source_images = [_with_shared_geometry(source[0])]
        regions = regions[:, np.argsort(np.asarray(order))]
    else:
        raise MapError(
            f"a series of {len(source)} instances with multi-frame ones: highdicom derives a SEG from one "
            "multi-frame image or from single-frame ones"
        )
    catalogue = package.catalogue
    descriptions = []
    for n, m in enumerate(with_region, start=1):
        finding = catalogue.by_id(m.finding)
        descriptions.append(segment_description(n, finding.display, finding.code, package.name, package.version))
    seg = segmentation_by_frames(
        source_images,
        regions,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid,
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer="ct-zeroshot",
        manufacturer_model_name=package.name[:64],
        software_versions=__version__,
        device_serial_number=package.uid[:64],
        series_description=SEG_SERIES_DESCRIPTION,
        content_label="FINDINGMAPS",
        content_description=f"present findings' map regions (upper {1 - REGION_FRACTION:.0%} of the range)",
        omit_empty_frames=True,
    )
    ps = catalogue.private_scheme
    if any(catalogue.by_id(m.finding).code.scheme == ps.scheme for m in with_region):  # declared, as in the SR
        item = Dataset()
        item.CodingSchemeDesignator, item.CodingSchemeName, item.CodingSchemeVersion = ps.scheme, ps.meaning, ps.value
        seg.CodingSchemeIdentificationSequence = [item]
    return seg, {m.index: n for n, m in enumerate(with_region, start=1)}
