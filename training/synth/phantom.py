"""Procedural abdominal CT phantoms in Hounsfield units, with visible signatures of the 30 findings.

``build_phantom(patient, grid, rng)`` paints tissues into a label volume (``raster.Canvas``),
then turns labels into HU with per-patient attenuation, smooth partial-volume blur and noise.
Anatomy is laid out in patient millimetres (LPS) relative to the scan range, so the tiny and
full profiles differ only in sampling. Each finding records where it is (``FindingInstance.site``)
for the montage. Signatures follow the radiology: steatosis lowers liver attenuation, organ
enlargement scales the organ, fluid collections are water density, calcifications and stones are
dense foci, free air is non-dependent gas outside bowel, and so on; sizes are chosen so that the
tiny profile (5 mm voxels) still resolves them.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
from scipy import ndimage

from .organs import OrgansMixin
from .patient import Patient
from .raster import Canvas, Grid
from .tissues import CONTRAST_ENHANCED, HU, T
from .trunk import TrunkMixin


class _Builder(TrunkMixin, OrgansMixin):
    """Paints one phantom: the state and helpers here, the anatomy in ``trunk`` and ``organs``."""

    def __init__(self, patient: Patient, grid: Grid, rng: np.random.Generator, version: int = 1):
        self.p, self.rng, self.grid = patient, rng, grid
        self.version = version  # phantom version (build_phantom): 2 and 3 draw the focal findings more conspicuous
        self.c = Canvas(grid, fill=int(T.AIR))
        b = patient.body
        self.a, self.b, self.fat = b["half_width"], b["half_depth"], b["fat"]
        self.L = b["length"]
        self.z0 = grid.origin[2] + 0.5 * (grid.shape[2] - 1) * grid.spacing[2] - self.L / 2
        self.s = b["organ_scale"]
        self.jx, self.jy = b["jitter_x"], b["jitter_y"]
        self.hu = {t: float(v) for t, v in HU.items()}
        # Vertebral column: centre line and body radii.
        self.spine_y = self.b * 0.42
        self.f = patient.findings

    # -- helpers -----------------------------------------------------------------------------
    def Z(self, frac: float) -> float:
        return self.z0 + frac * self.L

    def u(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def v(self, *by_version):
        """The value for this phantom's version: ``v(v1, v2[, v3])``; a version past the last given takes the last."""
        return by_version[min(self.version, len(by_version)) - 1]

    def sev(self, fid: str, mild: float, moderate: float, severe: float) -> float:
        return {"mild": mild, "moderate": moderate, "severe": severe}[self.f[fid].severity]

    def site(self, fid: str, xyz) -> None:
        if fid in self.f and self.f[fid].site is None:
            self.f[fid].site = tuple(float(v) for v in xyz)

    def stated_radius(self, fid: str, default: float) -> float:
        """From version 4, half the size the report states for ``fid`` (``{mm}`` in its sentence), when it
        states one; else ``default``."""
        mm = self.f[fid].details.get("report_mm") if fid in self.f else None
        return default if self.version < 4 or mm is None else mm / 2.0

    @contextmanager
    def lesion(self, fid: str | None):
        """What is painted inside the block is ``fid``'s lesion (recorded only when the patient has it).
        Recording draws nothing from the generator: the phantom is the same with or without masks."""
        before = self.c.recording
        self.c.recording = fid if fid in self.f else None
        try:
            yield
        finally:
            self.c.recording = before

    def lesion_masks(self) -> dict[str, np.ndarray]:
        """Per finding the patient has, the voxels that show it (after ``to_hu``): what its painting left
        visible, or for a finding that changes a tissue's attenuation instead, that tissue."""
        by_tissue = {"hepatic_steatosis": (T.LIVER,), "osteopenia": (T.TRABECULAR_BONE,), "anasarca": (T.SUBQ_EDEMA,)}
        out = {}
        for fid in self.f:
            mask = self.c.recorded(fid)
            if mask is None and fid in by_tissue:
                mask = np.isin(self.c.labels, [int(t) for t in by_tissue[fid]])
            if mask is not None and mask.any():
                out[fid] = mask
        return out

    def sides(self, fid: str) -> list[float]:
        """+1 for patient left (LPS +x), -1 for right."""
        side = self.f[fid].side or "bilateral"
        return {"left": [1.0], "right": [-1.0], "bilateral": [-1.0, 1.0]}[side]

    # -- anatomy -----------------------------------------------------------------------------

    # -- labels to HU --------------------------------------------------------------------------
    def to_hu(self, noise_sd: float, blur_vox: float) -> np.ndarray:
        hu = self.hu
        k = self.p.body["contrast"]
        for t in CONTRAST_ENHANCED:
            hu[t] = 40 + (hu[t] - 40) * k
        if "hepatic_steatosis" in self.f:
            hu[T.LIVER] -= self.sev("hepatic_steatosis", 38, 62, 90)
        if "osteopenia" in self.f:
            hu[T.TRABECULAR_BONE] = self.sev("osteopenia", 135, 105, 75)
            hu[T.CORTICAL_BONE] = self.sev("osteopenia", 650, 560, 480)
        elif self.p.age > 60:
            hu[T.TRABECULAR_BONE] -= (self.p.age - 60) * 1.2
        lut = np.zeros(256, dtype=np.float32)
        for t, v in hu.items():
            lut[int(t)] = v
        labels = self.c.labels
        if "anasarca" in self.f:
            # Reticular edema of the subcutaneous fat.
            g = self.sev("anasarca", 0.45, 0.6, 0.75)
            field = _smooth_noise(labels.shape, self.grid.spacing, 12.0, self.rng)
            sub = labels == T.SUBQ_FAT
            labels[sub & (field < np.quantile(field[sub], g))] = T.SUBQ_EDEMA
        vol = lut[labels]
        # Organ texture, partial-volume blur, quantum noise.
        vol += 6.0 * _smooth_noise(labels.shape, self.grid.spacing, 8.0, self.rng) * (labels != T.AIR)
        if blur_vox > 0:
            vol = ndimage.gaussian_filter(vol, sigma=blur_vox, mode="nearest")
        vol += self.rng.normal(0.0, noise_sd, size=vol.shape).astype(np.float32) * (labels != T.AIR)
        vol[labels == T.AIR] = -1000.0 + self.rng.normal(0, 3, size=int((labels == T.AIR).sum()))
        return np.clip(vol, -1024, 3071).astype(np.float32)


def _smooth_noise(shape, spacing, scale_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length ``scale_mm`` (cheap: coarse grid, upsampled)."""
    step = [max(1, int(scale_mm / s)) for s in spacing]
    coarse = [max(2, n // st + 2) for n, st in zip(shape, step)]
    field = rng.normal(size=coarse).astype(np.float32)
    zoom = [n / c for n, c in zip(shape, coarse)]
    out = ndimage.zoom(field, zoom, order=1, mode="nearest", grid_mode=True)[: shape[0], : shape[1], : shape[2]]
    out = out - out.mean()
    return out / (out.std() + 1e-6)


def build_phantom(
    patient: Patient,
    grid: Grid,
    rng: np.random.Generator,
    noise_sd: float = 12.0,
    blur_vox: float = 0.5,
    version: int = 1,
    masks: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (HU volume float32, tissue labels uint8), both indexed [x, y, z] in LPS order on ``grid``;
    ``masks``, when given, receives each present finding's lesion mask (bool, same grid).

    ``version`` 2 draws the small focal findings larger (same patients and findings: the patient and
    the report come from their own draws): at the tiny profile's 5 mm voxels, version 1's
    calcifications, renal hypodensities, metastases, thrombi and duct dilations were not learnable even
    with the labels as the loss. ``version`` 3 goes further for the findings that version 2 left below
    0.70 with the labels (docs/corpus.md): each focal lesion spans several 5 mm
    voxels, and the findings that looked like normal anatomy at that size get the sign a radiologist
    reads them by (enlarged nodes in the retroperitoneum where no bowel lies, a distended thrombosed
    vein, an appendicolith, free air over the liver). ``version`` 4 keeps version 3's signs and is harder
    where version 3 was easy: the patient's anatomy varies more (``patient.vary_anatomy``), the scanner's
    noise and kernel vary per study (``corpus.make_grid``), renal hypodensities are subcentimeter as their
    reports say, and a renal cyst or the largest node is painted at the size its report states."""
    b = _Builder(patient, grid, rng, version)
    b.body()
    b.spine_and_muscles()
    b.thorax()
    b.vessels()
    b.liver_biliary()
    b.upper_organs()
    b.kidneys()
    b.bowel()
    b.pelvis()
    b.nodes_and_peritoneum()
    hu = b.to_hu(noise_sd, blur_vox)
    if masks is not None:
        masks.update(b.lesion_masks())
    return hu, b.c.labels
