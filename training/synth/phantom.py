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

from enum import IntEnum

import numpy as np
from scipy import ndimage

from .patient import Patient
from .raster import Canvas, Grid


class T(IntEnum):
    """Tissue labels."""

    AIR = 0
    SUBQ_FAT = 1
    MUSCLE = 2
    VISC_FAT = 3
    LIVER = 4
    GALLBLADDER = 5
    SPLEEN = 6
    PANCREAS = 7
    ADRENAL = 8
    CORTEX = 9
    MEDULLA = 10
    SINUS_FAT = 11
    URINE = 12
    BOWEL_WALL = 13
    BOWEL_AIR = 14
    BOWEL_FLUID = 15
    STOOL = 16
    AORTA = 17
    IVC = 18
    PORTAL = 19
    CORTICAL_BONE = 20
    TRABECULAR_BONE = 21
    DISC = 22
    LUNG = 23
    MYOCARDIUM = 24
    BLOOD = 25
    BLADDER = 26
    PROSTATE = 27
    UTERUS = 28
    NODE = 29
    FLUID = 30
    CYST = 31
    CALCIUM = 32
    STONE = 33
    METAL = 34
    THROMBUS = 35
    METASTASIS = 36
    EDEMA_WALL = 37
    STRANDING = 38
    FREE_AIR = 39
    ATELECTASIS = 40
    SUBQ_EDEMA = 41
    BILE = 42
    HYPODENSITY = 43
    SCLEROSIS = 44
    CSF = 45
    TABLE = 46


# Mean HU of each tissue in a portal-venous phase CT (before per-patient modulation).
HU = {
    T.AIR: -1000, T.SUBQ_FAT: -105, T.MUSCLE: 52, T.VISC_FAT: -95, T.LIVER: 108, T.GALLBLADDER: 8,
    T.SPLEEN: 118, T.PANCREAS: 95, T.ADRENAL: 60, T.CORTEX: 175, T.MEDULLA: 130, T.SINUS_FAT: -70,
    T.URINE: 6, T.BOWEL_WALL: 85, T.BOWEL_AIR: -960, T.BOWEL_FLUID: 18, T.STOOL: -180, T.AORTA: 190,
    T.IVC: 140, T.PORTAL: 175, T.CORTICAL_BONE: 900, T.TRABECULAR_BONE: 230, T.DISC: 85, T.LUNG: -860,
    T.MYOCARDIUM: 95, T.BLOOD: 185, T.BLADDER: 8, T.PROSTATE: 48, T.UTERUS: 95, T.NODE: 52, T.FLUID: 12,
    T.CYST: 4, T.CALCIUM: 750, T.STONE: 520, T.METAL: 2800, T.THROMBUS: 45, T.METASTASIS: 42,
    T.EDEMA_WALL: 18, T.STRANDING: -35, T.FREE_AIR: -990, T.ATELECTASIS: 58, T.SUBQ_EDEMA: -20, T.BILE: 10,
    T.HYPODENSITY: 22, T.SCLEROSIS: 480, T.CSF: 12, T.TABLE: 160,
}
CONTRAST_ENHANCED = {T.LIVER, T.SPLEEN, T.PANCREAS, T.CORTEX, T.MEDULLA, T.AORTA, T.IVC, T.PORTAL,
                     T.MYOCARDIUM, T.BLOOD, T.BOWEL_WALL, T.UTERUS, T.ATELECTASIS}
FAT = (T.VISC_FAT,)
SOFT_SPACE = (T.VISC_FAT, T.FLUID, T.STRANDING)


class _Builder:
    def __init__(self, patient: Patient, grid: Grid, rng: np.random.Generator):
        self.p, self.rng, self.grid = patient, rng, grid
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

    def sev(self, fid: str, mild: float, moderate: float, severe: float) -> float:
        return {"mild": mild, "moderate": moderate, "severe": severe}[self.f[fid].severity]

    def site(self, fid: str, xyz) -> None:
        if fid in self.f and self.f[fid].site is None:
            self.f[fid].site = tuple(float(v) for v in xyz)

    def sides(self, fid: str) -> list[float]:
        """+1 for patient left (LPS +x), -1 for right."""
        side = self.f[fid].side or "bilateral"
        return {"left": [1.0], "right": [-1.0], "bilateral": [-1.0, 1.0]}[side]

    # -- anatomy -----------------------------------------------------------------------------
    def body(self):
        c, a, b, fat = self.c, self.a, self.b, self.fat
        z_lo, z_hi = self.Z(-0.05), self.Z(1.05)

        def outer(z):
            t = (z - self.z0) / self.L
            widen = 1.0 + 0.06 * np.exp(-((t - 0.12) / 0.12) ** 2) - 0.05 * max(t - 0.8, 0) / 0.2
            return (0.0, 0.0, a * widen, b)

        c.sweep(z_lo, z_hi, outer, T.SUBQ_FAT)
        c.sweep(z_lo, z_hi, lambda z: (0.0, 0.0, outer(z)[2] - fat, b - fat, 9.0), T.MUSCLE)
        c.sweep(z_lo, z_hi, lambda z: (0.0, 0.0, outer(z)[2] - fat - 9.0, b - fat - 9.0), T.VISC_FAT)
        # Patient table under the back (supine): a thin curved plate.
        c.sweep(z_lo, z_hi, lambda z: (0.0, b + 5.0, a * 1.2, 20.0, 6.0, 0.35, np.pi - 0.35), T.TABLE)
        self.outer = outer

    def spine_and_muscles(self):
        c, sy = self.c, self.spine_y
        # Paraspinal muscles and psoas.
        c.sweep(self.Z(-0.05), self.Z(1.05), lambda z: (0.0, sy + 48, 48, 26), T.MUSCLE, where=FAT)
        for sx in (-1, 1):
            c.sweep(self.Z(0.05), self.Z(0.62), lambda z, sx=sx: (
                sx * (32 + 18 * (0.62 - (z - self.z0) / self.L)), sy + 2,
                8 + 22 * (0.62 - (z - self.z0) / self.L), 8 + 18 * (0.62 - (z - self.z0) / self.L)),
                T.MUSCLE, where=FAT)
        # Vertebral bodies with discs, canal and spinous processes.
        height, disc = 26.0, 7.0
        z = self.Z(-0.02)
        self.vertebrae = []
        while z < self.Z(1.05):
            self.vertebrae.append((z, z + height))
            z += height + disc
        frac_v = None
        if "fracture" in self.f:
            cands = [i for i, (lo, hi) in enumerate(self.vertebrae) if self.Z(0.4) < lo < self.Z(0.85)]
            frac_v = int(self.rng.choice(cands)) if cands else None
        c.sweep(self.Z(-0.05), self.Z(1.05), lambda z: (0.0, sy, 24, 19), T.DISC, where=FAT + (T.MUSCLE,))
        for i, (lo, hi) in enumerate(self.vertebrae):
            top = hi
            if i == frac_v:
                loss = self.sev("fracture", 0.35, 0.5, 0.65)
                top = lo + (hi - lo) * (1 - loss)
                self.site("fracture", (0.0, sy, (lo + top) / 2))
            c.sweep(lo, top, lambda z: (0.0, sy, 23, 18), T.CORTICAL_BONE)
            c.sweep(lo + 2.5, top - 2.5, lambda z: (0.0, sy, 20, 15), T.TRABECULAR_BONE)
            if i == frac_v:
                c.sweep(top - 3.0, top, lambda z: (0.0, sy, 23, 18), T.SCLEROSIS)
            # Posterior elements.
            c.sweep(lo + 3, hi - 3, lambda z: (0.0, sy + 30, 14, 12, 4.5), T.CORTICAL_BONE)
            c.sweep(lo + 5, hi - 5, lambda z: (0.0, sy + 52, 4, 12), T.CORTICAL_BONE)
        c.sweep(self.Z(-0.05), self.Z(1.05), lambda z: (0.0, sy + 30, 9.5, 7.5), T.CSF)
        mid = self.vertebrae[len(self.vertebrae) // 2]
        self.site("osteopenia", (0.0, sy, (mid[0] + mid[1]) / 2))
        # Ribs (upper scan) and pelvic bones (lower scan).
        for k, zr in enumerate(np.arange(self.Z(0.62), self.Z(1.05), 24.0)):
            def rib(z, zr=zr):
                o = self.outer(z)
                return (0.0, 0.0, o[2] - self.fat - 6, o[3] - self.fat - 6, 7.0, -np.pi / 2 + 0.5, 1.5 * np.pi - 0.5)
            c.sweep(zr, zr + 8, rib, T.CORTICAL_BONE, where=(T.MUSCLE, T.VISC_FAT, T.SUBQ_FAT))
        for sx in (-1, 1):
            c.sweep(self.Z(0.14), self.Z(0.36), lambda z, sx=sx: (
                sx * (self.a * 0.45), self.b * 0.15, self.a * 0.42, self.b * 0.5, 9.0,
                (-0.2 if sx > 0 else np.pi - 1.3), (1.3 if sx > 0 else np.pi + 0.2)), T.CORTICAL_BONE)
            c.ellipsoid((sx * self.a * 0.62, self.b * 0.05, self.Z(0.03)), (24, 24, 24), T.CORTICAL_BONE)
            c.ellipsoid((sx * self.a * 0.62, self.b * 0.05, self.Z(0.03)), (20, 20, 20), T.TRABECULAR_BONE)

    def thorax(self):
        c, s = self.c, self.s
        lung_where = (T.VISC_FAT,)
        self.lungs = {}
        inner_x, inner_y = self.a - self.fat - 12, self.b - self.fat - 12
        for sx in (-1, 1):
            cx, cy = sx * inner_x * 0.52, inner_y * 0.15

            def lung(z, cx=cx, cy=cy):
                t = (z - self.Z(0.74)) / (self.L * 0.3)
                if t <= 0:
                    return None
                g = min(1.0, np.sqrt(t * 3))
                return (cx, cy + 20 * (1 - g), (0.2 + 0.25 * g) * inner_x, (0.3 + 0.5 * g) * inner_y)
            c.sweep(self.Z(0.74), self.Z(1.05), lung, T.LUNG, where=lung_where)
            self.lungs[sx] = (cx, cy)
        # Heart with blood pool; cardiomegaly enlarges it.
        k = 1.0 + (self.sev("cardiomegaly", 0.28, 0.38, 0.5) if "cardiomegaly" in self.f else 0.0)
        hc = (22.0 + self.jx, -48.0, self.Z(1.0) + 8)
        hr = (62 * k * s, 46 * k * s, 52 * k * s)
        c.ellipsoid(hc, hr, T.MYOCARDIUM, where=(T.VISC_FAT, T.LUNG, T.MUSCLE))
        c.ellipsoid(hc, tuple(0.72 * r for r in hr), T.BLOOD, where=(T.MYOCARDIUM,))
        self.site("cardiomegaly", (hc[0], hc[1], max(hc[2] - hr[2] * 0.5, self.Z(0.92))))
        if "coronary_calcification" in self.f:
            n = int(self.sev("coronary_calcification", 2, 4, 7))
            for _ in range(n):
                ang = self.u(-2.2, -0.3)
                zz = hc[2] - self.u(0.1, 0.6) * hr[2]
                pt = (hc[0] + 0.93 * hr[0] * np.cos(ang), hc[1] + 0.93 * hr[1] * np.sin(ang), zz)
                c.ellipsoid(pt, (2.5, 2.5, 3.0), T.CALCIUM)
                self.site("coronary_calcification", pt)
        if "aortic_valve_calcification" in self.f:
            vc = (hc[0] - 18, hc[1] + 12, hc[2] - 0.2 * hr[2])
            for _ in range(int(self.sev("aortic_valve_calcification", 2, 3, 5))):
                ang = self.u(0, 2 * np.pi)
                c.ellipsoid((vc[0] + 9 * np.cos(ang), vc[1] + 9 * np.sin(ang), vc[2] + self.u(-3, 3)),
                            (3.0, 3.0, 3.0), T.CALCIUM)
            self.site("aortic_valve_calcification", vc)
        if "pleural_effusion" in self.f:
            depth = self.sev("pleural_effusion", 14, 26, 42)
            for sx in self.sides("pleural_effusion"):
                cx, cy = self.lungs[sx]
                c.sweep(self.Z(0.74), self.Z(1.05), lambda z, cx=cx: (
                    cx, self.b - self.fat - 12, inner_x * 0.5, 10 + depth), T.FLUID, where=(T.LUNG,))
                self.site("pleural_effusion", (cx, cy + 55, self.Z(0.88)))
        if "atelectasis" in self.f:
            for sx in self.sides("atelectasis"):
                cx, cy = self.lungs[sx]
                thick = self.sev("atelectasis", 6, 9, 14)
                yc = cy + inner_y * 0.35 - (self.sev("pleural_effusion", 14, 26, 42) if "pleural_effusion" in self.f else 0)
                c.ellipsoid((cx, yc, self.Z(0.86)), (inner_x * 0.3, thick, 26), T.ATELECTASIS, where=(T.LUNG,))
                self.site("atelectasis", (cx, yc, self.Z(0.86)))
        if "hiatal_hernia" in self.f:
            r = self.sev("hiatal_hernia", 16, 24, 34)
            hc2 = (12.0, self.spine_y - 42, self.Z(0.9))
            c.ellipsoid(hc2, (r, r * 0.85, r * 1.1), T.BOWEL_WALL, where=(T.VISC_FAT, T.LUNG, T.MYOCARDIUM, T.BLOOD))
            c.ellipsoid(hc2, (r - 4, r * 0.85 - 4, r * 1.1 - 4), T.BOWEL_FLUID, where=(T.BOWEL_WALL,))
            c.ellipsoid((hc2[0], hc2[1] - r * 0.45, hc2[2]), (r - 5, r * 0.4, r * 1.1 - 5), T.BOWEL_AIR,
                        where=(T.BOWEL_FLUID,))
            self.site("hiatal_hernia", hc2)

    def vessels(self):
        c, sy = self.c, self.spine_y
        ay = sy - 36
        bif = self.Z(0.38)
        aaa = "abdominal_aortic_aneurysm" in self.f
        ar = self.sev("abdominal_aortic_aneurysm", 17, 23, 30) if aaa else 10.5
        zc, zh = self.Z(0.46), self.L * 0.07

        def aorta_r(z):
            return 10.5 + (ar - 10.5) * np.exp(-((z - zc) / zh) ** 2) if aaa else 10.5

        def aorta(z):
            t = (z - self.z0) / self.L
            if t > 0.8:  # thoracic aorta curves posterior-left
                g = min((t - 0.8) / 0.2, 1.0)
                return (14 + 10 * g, ay + 22 * g, 11.5, 11.5)
            return (14.0, ay, aorta_r(z), aorta_r(z))
        c.sweep(bif, self.Z(1.05), aorta, T.AORTA, where=(T.VISC_FAT, T.LUNG, T.MUSCLE, T.DISC))
        self.aorta = aorta
        for sx in (-1, 1):
            c.chain(np.array([[14, ay, bif], [sx * 45, ay + 10, self.Z(0.22)], [sx * 70, ay + 5, self.Z(0.02)]]),
                    6.5, T.AORTA, where=(T.VISC_FAT, T.MUSCLE))
        if aaa:
            # Mural thrombus: an eccentric crescent of the aneurysm sac.
            c.sweep(zc - 1.2 * zh, zc + 1.2 * zh, lambda z: (
                14.0, ay, aorta_r(z), aorta_r(z), max(aorta_r(z) - 10.5, 0.1) * 0.6, -np.pi, 0.0), T.THROMBUS,
                where=(T.AORTA,))
            self.site("abdominal_aortic_aneurysm", (14.0, ay, zc))
        if "atherosclerosis" in self.f:
            n = int(self.sev("atherosclerosis", 5, 10, 18))
            for _ in range(n):
                z = self.u(self.Z(0.1), self.Z(0.8))
                if z > bif:
                    cx, cy, rx, _ = aorta(z)
                else:
                    sx = 1 if self.rng.random() < 0.5 else -1
                    t = (bif - z) / (bif - self.Z(0.02))
                    cx, cy, rx = 14 + (sx * 70 - 14) * t, ay + 5, 6.5
                ang = self.u(0, 2 * np.pi)
                pt = (cx + rx * np.cos(ang), cy + rx * np.sin(ang), z)
                c.ellipsoid(pt, (2.5, 2.5, 3.5), T.CALCIUM)
                self.site("atherosclerosis", pt)
        # IVC and portal vein.
        self.ivc = (-22.0, sy - 30)
        c.sweep(self.Z(0.36), self.Z(0.82), lambda z: (-22.0, sy - 30, 11.5, 10.0), T.IVC, where=(T.VISC_FAT, T.MUSCLE))
        pv = np.array([[-2.0, -8.0, self.Z(0.58)], [-30.0, -8.0, self.Z(0.64)], [-55.0, -4.0, self.Z(0.69)]])
        self.portal = pv
        c.chain(pv, 7.5, T.PORTAL)
        if "thrombosis" in self.f:
            if self.rng.random() < 0.6:
                c.chain(pv[:2] * [1, 1, 1], 6.0, T.THROMBUS, where=(T.PORTAL,))
                self.site("thrombosis", pv[1])
            else:
                zt = self.Z(0.5)
                c.sweep(zt - 25, zt + 25, lambda z: (-22.0, sy - 30, 10.0, 8.5), T.THROMBUS, where=(T.IVC,))
                self.site("thrombosis", (-22.0, sy - 30, zt))

    def liver_biliary(self):
        c, s = self.c, self.s
        k = 1.0 + (self.sev("hepatomegaly", 0.22, 0.32, 0.45) if "hepatomegaly" in self.f else 0.0)
        center = (-62.0 + self.jx, -2.0 + self.jy, self.Z(0.8) - (k - 1) * 40)
        radii = (88 * s * min(k, 1.15), 78 * s * min(k, 1.12), 80 * s * k)
        where = (T.VISC_FAT, T.LUNG, T.MUSCLE, T.IVC, T.PORTAL)
        c.ellipsoid(center, radii, T.LIVER, where=where)
        c.ellipsoid((8.0, -52.0, self.Z(0.82)), (58 * s * min(k, 1.15), 30 * s, 42 * s * k), T.LIVER, where=where)
        self.liver = (center, radii)
        self.site("hepatomegaly", (center[0], center[1], center[2] - radii[2] * 0.7))
        self.site("hepatic_steatosis", center)
        # Re-draw the portal vein inside the liver hilum.
        c.chain(self.portal[1:], 7.5, T.PORTAL, where=(T.LIVER,))
        if "biliary_ductal_dilation" in self.f:
            r = self.sev("biliary_ductal_dilation", 3.5, 5.0, 7.0)
            hilum = np.array([-42.0, -16.0, self.Z(0.7)])
            for _ in range(5):
                d = self.rng.normal(size=3)
                d[0] = -abs(d[0]) - 0.5
                d /= np.linalg.norm(d)
                tip = hilum + d * self.u(45, 70)
                c.chain(np.array([hilum, (hilum + tip) / 2, tip]), [r, r * 0.8, r * 0.6], T.BILE, where=(T.LIVER, T.PORTAL))
            c.chain(np.array([hilum, [-30.0, -10.0, self.Z(0.6)]]), r + 2, T.BILE, where=(T.LIVER, T.VISC_FAT))
            self.site("biliary_ductal_dilation", hilum)
        if "metastatic_disease" in self.f:
            n = int(self.sev("metastatic_disease", 3, 6, 10))
            for _ in range(n):
                off = self.rng.normal(size=3)
                off *= self.u(0.0, 0.65) / np.linalg.norm(off)  # inside the liver
                pt = tuple(center[i] + off[i] * radii[i] for i in range(3))
                rr = self.u(6, 16)
                c.ellipsoid(pt, (rr, rr, rr), T.METASTASIS, where=(T.LIVER,))
                self.site("metastatic_disease", pt)
        # Gallbladder below the liver.
        gb = (-48.0 + self.jx * 0.5, -48.0, self.Z(0.66))
        if "surgically_absent_gallbladder" in self.f:
            for dz in (-8.0, 6.0):
                c.ellipsoid((gb[0], gb[1] + 6, gb[2] + 20 + dz), (2.0, 2.0, 2.5), T.METAL)
            self.site("surgically_absent_gallbladder", (gb[0], gb[1], gb[2] + 20))
        else:
            c.ellipsoid(gb, (19 * s, 17 * s, 34 * s), T.GALLBLADDER, where=(T.LIVER, T.VISC_FAT, T.PORTAL))
            if "gallstones" in self.f:
                n = int(self.sev("gallstones", 1, 3, 6))
                rr = self.sev("gallstones", 4.0, 5.0, 6.5)
                for _ in range(n):
                    pt = (gb[0] + self.u(-7, 7), gb[1] + self.u(4, 10), gb[2] + self.u(-22, 8))
                    c.ellipsoid(pt, (rr, rr, rr), T.STONE, where=(T.GALLBLADDER,))
                    self.site("gallstones", pt)

    def upper_organs(self):
        c, s = self.c, self.s
        k = 1.0 + (self.sev("splenomegaly", 0.35, 0.55, 0.8) if "splenomegaly" in self.f else 0.0)
        sc = (92.0 + self.jx * 0.5, 48.0, self.Z(0.78) - (k - 1) * 45)
        c.ellipsoid(sc, (30 * s * min(k, 1.3), 55 * s * min(k, 1.25), 52 * s * k), T.SPLEEN,
                    where=(T.VISC_FAT, T.LUNG, T.MUSCLE))
        self.spleen = sc
        self.site("splenomegaly", sc)
        # Stomach with air-fluid level (supine: anterior is up).
        st = (48.0, -30.0, self.Z(0.76))
        c.ellipsoid(st, (48 * s, 34 * s, 42 * s), T.BOWEL_WALL, where=(T.VISC_FAT,))
        c.ellipsoid(st, (43 * s, 29 * s, 37 * s), T.BOWEL_FLUID, where=(T.BOWEL_WALL,))
        c.ellipsoid((st[0], st[1] - 18 * s, st[2]), (40 * s, 12 * s, 34 * s), T.BOWEL_AIR, where=(T.BOWEL_FLUID,))
        # Pancreas along a curve from head to tail.
        pr = 14.0 * s * (self.sev("pancreatic_atrophy", 0.6, 0.5, 0.4) if "pancreatic_atrophy" in self.f else 1.0)
        path = np.array([[-28.0, -16.0, self.Z(0.6)], [0.0, -20.0, self.Z(0.62)], [35.0, -12.0, self.Z(0.64)],
                         [70.0, 18.0, self.Z(0.66)]])
        c.chain(path, [pr * 1.2, pr, pr * 0.9, pr * 0.8], T.PANCREAS, where=(T.VISC_FAT,))
        self.site("pancreatic_atrophy", path[1])
        for sx in (-1, 1):
            c.ellipsoid((sx * 34.0, self.spine_y - 8, self.Z(0.7)), (4.5, 13, 16), T.ADRENAL, where=(T.VISC_FAT,))

    def kidneys(self):
        c, s = self.c, self.s
        self.kid = {}
        for sx in (-1, 1):
            kc = (sx * 70.0, self.spine_y + 2, self.Z(0.55 if sx < 0 else 0.57))
            kr = (27 * s, 24 * s, 54 * s)
            self.kid[sx] = (kc, kr)
            c.ellipsoid(kc, kr, T.CORTEX, where=(T.VISC_FAT, T.MUSCLE, T.LIVER, T.SPLEEN))
            c.ellipsoid(kc, tuple(0.75 * r for r in kr), T.MEDULLA, where=(T.CORTEX,))
            hil = (kc[0] - sx * 10, kc[1] - 4, kc[2])
            c.ellipsoid(hil, (10, 9, 22), T.SINUS_FAT, where=(T.MEDULLA, T.CORTEX))
            c.ellipsoid(hil, (4, 4, 6), T.URINE, where=(T.SINUS_FAT,))
        if "hydronephrosis" in self.f:
            g = self.sev("hydronephrosis", 1.0, 1.4, 1.9)
            for sx in self.sides("hydronephrosis"):
                kc, kr = self.kid[sx]
                hil = (kc[0] - sx * 8, kc[1] - 3, kc[2])
                c.ellipsoid(hil, (11 * g, 10 * g, 16 * g), T.URINE, where=(T.SINUS_FAT, T.MEDULLA, T.CORTEX))
                for dz in (-1, 1):
                    c.ellipsoid((kc[0], kc[1], kc[2] + dz * 28), (7 * g, 7 * g, 8 * g), T.URINE, where=(T.MEDULLA,))
                # Dilated ureter.
                c.chain(np.array([[hil[0], hil[1], hil[2] - 10], [sx * 40.0, self.spine_y - 5, self.Z(0.3)]]),
                        4.0 * g, T.URINE, where=(T.VISC_FAT, T.MUSCLE))
                self.site("hydronephrosis", hil)
        if "renal_cyst" in self.f:
            for sx in self.sides("renal_cyst"):
                kc, kr = self.kid[sx]
                rr = self.sev("renal_cyst", 10, 16, 24)
                pt = (kc[0] + sx * kr[0] * 0.7, kc[1] + self.u(-8, 8), kc[2] + self.u(-0.5, 0.5) * kr[2])
                c.ellipsoid(pt, (rr, rr, rr), T.CYST, where=(T.CORTEX, T.MEDULLA, T.VISC_FAT, T.SINUS_FAT))
                self.site("renal_cyst", pt)
        if "renal_hypodensities" in self.f:
            n = int(self.sev("renal_hypodensities", 2, 3, 5))
            for sx in self.sides("renal_hypodensities"):
                kc, kr = self.kid[sx]
                for _ in range(n):
                    off = self.rng.uniform(-0.6, 0.6, size=3)
                    pt = tuple(kc[i] + off[i] * kr[i] for i in range(3))
                    c.ellipsoid(pt, (4.0, 4.0, 4.5), T.HYPODENSITY, where=(T.CORTEX, T.MEDULLA))
                    self.site("renal_hypodensities", pt)

    def bowel(self):
        c, s, rng = self.c, self.s, self.rng
        obstructed = "bowel_obstruction" in self.f
        edema = "submucosal_edema" in self.f
        # Colon frame: ascending, transverse, descending, sigmoid, rectum.
        cr = 14.0 if obstructed else 21.0
        colon = np.array([
            [-82.0, 8.0, self.Z(0.3)], [-86.0, 0.0, self.Z(0.6)], [-40.0, -60.0, self.Z(0.63)], [40.0, -62.0, self.Z(0.64)],
            [86.0, 0.0, self.Z(0.62)], [84.0, 8.0, self.Z(0.3)], [40.0, -10.0, self.Z(0.18)], [0.0, 40.0, self.Z(0.12)],
            [0.0, 52.0, self.Z(-0.05)]])
        wall = 2.5
        if edema:
            wall = self.sev("submucosal_edema", 6.0, 8.0, 10.0)
        c.chain(colon, cr, T.BOWEL_WALL, where=(T.VISC_FAT, T.MUSCLE))
        if edema:
            c.chain(colon, cr - 2.0, T.EDEMA_WALL, where=(T.BOWEL_WALL,))
            self.site("submucosal_edema", colon[2])
        c.chain(colon, cr - wall, T.BOWEL_AIR, where=(T.BOWEL_WALL, T.EDEMA_WALL))
        for p in colon[[0, 4, 6]]:
            c.ellipsoid(p + [0, 6, 0], (cr - wall - 2, 8, 22), T.STOOL, where=(T.BOWEL_AIR,))
        # Small-bowel loops in the mid abdomen.
        n_loops = 14 if obstructed else 10
        r_loop = self.sev("bowel_obstruction", 17, 20, 24) if obstructed else 11.0
        for _ in range(n_loops):
            p0 = np.array([self.u(-55, 55), self.u(-70, 5), self.u(self.Z(0.22), self.Z(0.56))])
            d = rng.normal(size=3)
            d[2] *= 0.3
            d /= np.linalg.norm(d)
            pts = np.array([p0, p0 + d * self.u(30, 60), p0 + d * self.u(60, 90) + rng.normal(size=3) * 15])
            c.chain(pts, r_loop, T.BOWEL_WALL, where=(T.VISC_FAT,))
            c.chain(pts, r_loop - 2.5, T.BOWEL_FLUID, where=(T.BOWEL_WALL,))
            if obstructed:  # air-fluid levels: gas rises anteriorly
                c.chain(pts - [0, r_loop * 0.55, 0], (r_loop - 3) * 0.5, T.BOWEL_AIR, where=(T.BOWEL_FLUID,))
        if obstructed:
            self.site("bowel_obstruction", (0.0, -30.0, self.Z(0.4)))
        # Appendix from the caecum.
        base = np.array([-78.0, 10.0, self.Z(0.28)])
        tip = base + [20.0, 8.0, -45.0]
        if "appendicitis" in self.f:
            ar = self.sev("appendicitis", 6.5, 8.0, 10.0)
            c.ellipsoid((base + tip) / 2, (26, 24, 34), T.STRANDING, where=(T.VISC_FAT,))
            c.chain(np.array([base, tip]), ar, T.BOWEL_WALL, where=(T.VISC_FAT, T.STRANDING, T.MUSCLE))
            c.chain(np.array([base, tip]), ar - 3.0, T.BOWEL_FLUID, where=(T.BOWEL_WALL,))
            self.site("appendicitis", (base + tip) / 2)
        else:
            c.chain(np.array([base, tip]), 3.0, T.BOWEL_WALL, where=(T.VISC_FAT,))

    def pelvis(self):
        c, s = self.c, self.s
        fill = self.p.body["bladder_fill"]
        bl = (0.0, -38.0, self.Z(0.1))
        c.ellipsoid(bl, (38 * fill, 32 * fill, 30 * fill), T.BLADDER, where=(T.VISC_FAT, T.MUSCLE, T.BOWEL_WALL, T.BOWEL_AIR))
        if self.p.sex == "M":
            pr = self.sev("prostatomegaly", 26, 32, 40) if "prostatomegaly" in self.f else 17.0
            pc = (0.0, -20.0, self.Z(0.0) + pr * 0.6)
            c.ellipsoid(pc, (pr, pr * 0.85, pr), T.PROSTATE)
            self.site("prostatomegaly", pc)
        else:
            c.ellipsoid((0.0, -5.0, self.Z(0.16)), (30 * s, 22 * s, 38 * s), T.UTERUS, where=(T.VISC_FAT, T.BOWEL_WALL))

    def nodes_and_peritoneum(self):
        c, rng = self.c, self.rng
        sy = self.spine_y
        if "lymphadenopathy" in self.f:
            n = int(self.sev("lymphadenopathy", 4, 7, 11))
            rr = self.sev("lymphadenopathy", 8.0, 11.0, 15.0)
        else:
            n, rr = 5, 3.5
        for _ in range(n):
            z = self.u(self.Z(0.3), self.Z(0.62))
            sx = -1 if rng.random() < 0.5 else 1
            pt = (14 + sx * self.u(16, 32), sy - 36 + self.u(-12, 12), z) if rng.random() < 0.6 else \
                (self.u(-40, 40), self.u(-40, 0), z)
            c.ellipsoid(pt, (rr, rr * 0.9, rr * 1.1), T.NODE, where=(T.VISC_FAT,))
            self.site("lymphadenopathy", pt)
        if "metastatic_disease" in self.f and rng.random() < 0.5:
            for _ in range(int(self.sev("metastatic_disease", 1, 2, 4))):
                lo, hi = self.vertebrae[int(rng.integers(2, len(self.vertebrae) - 2))]
                pt = (self.u(-8, 8), sy + self.u(-6, 6), (lo + hi) / 2)
                c.ellipsoid(pt, (8, 8, 8), T.METASTASIS, where=(T.TRABECULAR_BONE,))
        if "ascites" in self.f:
            g = self.sev("ascites", 8.0, 16.0, 26.0)
            (lc, lr) = self.liver
            c.ellipsoid(lc, tuple(r + g for r in lr), T.FLUID, where=(T.VISC_FAT,))
            c.ellipsoid(self.spleen, (30 + g, 55 + g, 52 + g), T.FLUID, where=(T.VISC_FAT,))
            for sx in (-1, 1):
                c.sweep(self.Z(0.2), self.Z(0.62), lambda z, sx=sx: (sx * (self.a - self.fat - 30), 5.0, 12 + g, 35 + g),
                        T.FLUID, where=(T.VISC_FAT,))
            c.ellipsoid((0.0, -20.0, self.Z(0.14)), (60 + g, 40 + g, 30 + g), T.FLUID, where=(T.VISC_FAT,))
            self.site("ascites", (lc[0] - lr[0] * 0.8, lc[1], lc[2] - lr[2] * 0.3))
        if "free_air" in self.f:
            n = int(self.sev("free_air", 1, 2, 4))
            rr = self.sev("free_air", 7.0, 12.0, 20.0)
            for _ in range(n):
                z = self.u(self.Z(0.4), self.Z(0.75))
                x = self.u(-50, 50)
                y = -(self.b - self.fat - 9.0) + rr * 0.5
                c.ellipsoid((x, y, z), (rr * 1.8, rr * 0.6, rr * 1.2), T.FREE_AIR, where=(T.VISC_FAT, T.FLUID, T.LIVER))
                self.site("free_air", (x, y, z))
        if "anasarca" in self.f:
            self.site("anasarca", (self.a - self.fat / 2, 0.0, self.Z(0.45)))

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


def build_phantom(patient: Patient, grid: Grid, rng: np.random.Generator, noise_sd: float = 12.0,
                  blur_vox: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Return (HU volume float32, tissue labels uint8), both indexed [x, y, z] in LPS order on ``grid``."""
    b = _Builder(patient, grid, rng)
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
    return hu, b.c.labels
