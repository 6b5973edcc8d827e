"""The phantom's abdominal and pelvic organs, bowel, nodes and peritoneum (a part of ``phantom._Builder``)."""

from __future__ import annotations

import numpy as np

from .tissues import T


class OrgansMixin:
    """Painting methods of the organs; the state (canvas, patient, helpers) is ``phantom._Builder``'s."""

    def liver_biliary(self):
        c, s = self.c, self.s
        k = 1.0 + (self.sev("hepatomegaly", 0.22, 0.32, 0.45) if "hepatomegaly" in self.f else 0.0)
        center = (-62.0 + self.jx, -2.0 + self.jy, self.Z(0.8) - (k - 1) * 40)
        radii = (88 * s * min(k, 1.15), 78 * s * min(k, 1.12), 80 * s * k)
        where = (T.VISC_FAT, T.LUNG, T.MUSCLE, T.IVC, T.PORTAL)
        with self.lesion("hepatomegaly"):
            c.ellipsoid(center, radii, T.LIVER, where=where)
            c.ellipsoid((8.0, -52.0, self.Z(0.82)), (58 * s * min(k, 1.15), 30 * s, 42 * s * k), T.LIVER, where=where)
        self.liver = (center, radii)
        self.site("hepatomegaly", (center[0], center[1], center[2] - radii[2] * 0.7))
        self.site("hepatic_steatosis", center)
        # Re-draw the portal vein inside the liver hilum.
        c.chain(self.portal[1:], 7.5, T.PORTAL, where=(T.LIVER,))
        if "biliary_ductal_dilation" in self.f:
            with self.lesion("biliary_ductal_dilation"):
                r = self.sev("biliary_ductal_dilation", *self.v((3.5, 5.0, 7.0), (6.0, 8.0, 10.0), (8.0, 10.0, 12.0)))
                hilum = np.array([-42.0, -16.0, self.Z(0.7)])
                for _ in range(5):
                    d = self.rng.normal(size=3)
                    d[0] = -abs(d[0]) - 0.5
                    d /= np.linalg.norm(d)
                    tip = hilum + d * self.u(45, 70)
                    c.chain(
                        np.array([hilum, (hilum + tip) / 2, tip]),
                        [r, r * 0.8, r * 0.6],
                        T.BILE,
                        where=(T.LIVER, T.PORTAL),
                    )
                c.chain(np.array([hilum, [-30.0, -10.0, self.Z(0.6)]]), r + 2, T.BILE, where=(T.LIVER, T.VISC_FAT))
                self.site("biliary_ductal_dilation", hilum)
        if "metastatic_disease" in self.f:
            with self.lesion("metastatic_disease"):
                n = int(self.sev("metastatic_disease", 3, 6, 10))
                for _ in range(n):
                    off = self.rng.normal(size=3)
                    off *= self.u(0.0, 0.65) / np.linalg.norm(off)  # inside the liver
                    pt = tuple(center[i] + off[i] * radii[i] for i in range(3))
                    rr = self.u(6, 16) + self.v(0.0, 6.0, 10.0)
                    c.ellipsoid(pt, (rr, rr, rr), T.METASTASIS, where=(T.LIVER,))
                    self.site("metastatic_disease", pt)
        # Gallbladder below the liver.
        gb = (-48.0 + self.jx * 0.5, -48.0, self.Z(0.66))
        if "surgically_absent_gallbladder" in self.f:
            with self.lesion("surgically_absent_gallbladder"):
                for dz in (-8.0, 6.0):
                    c.ellipsoid((gb[0], gb[1] + 6, gb[2] + 20 + dz), (2.0, 2.0, 2.5), T.METAL)
                self.site("surgically_absent_gallbladder", (gb[0], gb[1], gb[2] + 20))
        else:
            c.ellipsoid(gb, (19 * s, 17 * s, 34 * s), T.GALLBLADDER, where=(T.LIVER, T.VISC_FAT, T.PORTAL))
            if "gallstones" in self.f:
                with self.lesion("gallstones"):
                    n = int(self.sev("gallstones", 1, 3, 6))
                    rr = self.sev("gallstones", 4.0, 5.0, 6.5) + self.v(0.0, 2.5)
                    for _ in range(n):
                        pt = (gb[0] + self.u(-7, 7), gb[1] + self.u(4, 10), gb[2] + self.u(-22, 8))
                        c.ellipsoid(pt, (rr, rr, rr), T.STONE, where=(T.GALLBLADDER,))
                        self.site("gallstones", pt)

    def upper_organs(self):
        c, s = self.c, self.s
        k = 1.0 + (self.sev("splenomegaly", 0.35, 0.55, 0.8) if "splenomegaly" in self.f else 0.0)
        sc = (92.0 + self.jx * 0.5, 48.0, self.Z(0.78) - (k - 1) * 45)
        with self.lesion("splenomegaly"):
            c.ellipsoid(
                sc,
                (30 * s * min(k, 1.3), 55 * s * min(k, 1.25), 52 * s * k),
                T.SPLEEN,
                where=(T.VISC_FAT, T.LUNG, T.MUSCLE),
            )
        self.spleen = sc
        self.site("splenomegaly", sc)
        # Stomach with air-fluid level (supine: anterior is up).
        st = (48.0, -30.0, self.Z(0.76))
        c.ellipsoid(st, (48 * s, 34 * s, 42 * s), T.BOWEL_WALL, where=(T.VISC_FAT,))
        c.ellipsoid(st, (43 * s, 29 * s, 37 * s), T.BOWEL_FLUID, where=(T.BOWEL_WALL,))
        c.ellipsoid((st[0], st[1] - 18 * s, st[2]), (40 * s, 12 * s, 34 * s), T.BOWEL_AIR, where=(T.BOWEL_FLUID,))
        # Pancreas along a curve from head to tail.
        atrophy = self.v((0.6, 0.5, 0.4), (0.45, 0.35, 0.28))
        pr = 14.0 * s * (self.sev("pancreatic_atrophy", *atrophy) if "pancreatic_atrophy" in self.f else 1.0)
        path = np.array(
            [
                [-28.0, -16.0, self.Z(0.6)],
                [0.0, -20.0, self.Z(0.62)],
                [35.0, -12.0, self.Z(0.64)],
                [70.0, 18.0, self.Z(0.66)],
            ]
        )
        with self.lesion("pancreatic_atrophy"):
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
            with self.lesion("hydronephrosis"):
                g = self.sev("hydronephrosis", *self.v((1.0, 1.4, 1.9), (1.6, 2.0, 2.5), (2.0, 2.4, 3.0)))
                for sx in self.sides("hydronephrosis"):
                    kc, kr = self.kid[sx]
                    hil = (kc[0] - sx * 8, kc[1] - 3, kc[2])
                    c.ellipsoid(hil, (11 * g, 10 * g, 16 * g), T.URINE, where=(T.SINUS_FAT, T.MEDULLA, T.CORTEX))
                    for dz in (-1, 1):
                        c.ellipsoid((kc[0], kc[1], kc[2] + dz * 28), (7 * g, 7 * g, 8 * g), T.URINE, where=(T.MEDULLA,))
                    # Dilated ureter.
                    c.chain(
                        np.array([[hil[0], hil[1], hil[2] - 10], [sx * 40.0, self.spine_y - 5, self.Z(0.3)]]),
                        4.0 * g,
                        T.URINE,
                        where=(T.VISC_FAT, T.MUSCLE),
                    )
                    self.site("hydronephrosis", hil)
        if "renal_cyst" in self.f:
            with self.lesion("renal_cyst"):
                for sx in self.sides("renal_cyst"):
                    kc, kr = self.kid[sx]
                    rr = self.sev("renal_cyst", *self.v((10, 16, 24), (14, 20, 28), (20, 26, 34)))
                    rr = self.stated_radius("renal_cyst", rr)
                    pt = (kc[0] + sx * kr[0] * 0.7, kc[1] + self.u(-8, 8), kc[2] + self.u(-0.5, 0.5) * kr[2])
                    c.ellipsoid(pt, (rr, rr, rr), T.CYST, where=(T.CORTEX, T.MEDULLA, T.VISC_FAT, T.SINUS_FAT))
                    self.site("renal_cyst", pt)
        if "renal_hypodensities" in self.f:
            with self.lesion("renal_hypodensities"):
                n = int(self.sev("renal_hypodensities", 2, 3, 5))
                for sx in self.sides("renal_hypodensities"):
                    kc, kr = self.kid[sx]
                    for _ in range(n):
                        off = self.rng.uniform(-0.6, 0.6, size=3)
                        pt = tuple(kc[i] + off[i] * kr[i] for i in range(3))
                        radii = self.v((4.0, 4.0, 4.5), (7.0, 7.0, 7.5), (9.0, 9.0, 10.0))
                        if self.version >= 4:  # the reports call them subcentimeter or small: 6-9 mm across
                            radii = (self.u(3.0, 4.5),) * 3
                        c.ellipsoid(pt, radii, T.HYPODENSITY, where=(T.CORTEX, T.MEDULLA))
                        self.site("renal_hypodensities", pt)

    def bowel(self):
        c, rng = self.c, self.rng
        obstructed = "bowel_obstruction" in self.f
        edema = "submucosal_edema" in self.f
        # Colon frame: ascending, transverse, descending, sigmoid, rectum.
        cr = 14.0 if obstructed else 21.0
        colon = np.array(
            [
                [-82.0, 8.0, self.Z(0.3)],
                [-86.0, 0.0, self.Z(0.6)],
                [-40.0, -60.0, self.Z(0.63)],
                [40.0, -62.0, self.Z(0.64)],
                [86.0, 0.0, self.Z(0.62)],
                [84.0, 8.0, self.Z(0.3)],
                [40.0, -10.0, self.Z(0.18)],
                [0.0, 40.0, self.Z(0.12)],
                [0.0, 52.0, self.Z(-0.05)],
            ]
        )
        wall = 2.5
        if edema:
            wall = self.sev("submucosal_edema", 6.0, 8.0, 10.0)
        c.chain(colon, cr, T.BOWEL_WALL, where=(T.VISC_FAT, T.MUSCLE))
        if edema:
            with self.lesion("submucosal_edema"):
                c.chain(colon, cr - 2.0, T.EDEMA_WALL, where=(T.BOWEL_WALL,))
            self.site("submucosal_edema", colon[2])
        c.chain(colon, cr - wall, T.BOWEL_AIR, where=(T.BOWEL_WALL, T.EDEMA_WALL))
        for p in colon[[0, 4, 6]]:
            c.ellipsoid(p + [0, 6, 0], (cr - wall - 2, 8, 22), T.STOOL, where=(T.BOWEL_AIR,))
        # Small-bowel loops in the mid abdomen.
        n_loops = 14 if obstructed else 10
        r_loop = self.sev("bowel_obstruction", 17, 20, 24) if obstructed else 11.0
        with self.lesion("bowel_obstruction"):
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
            with self.lesion("appendicitis"):
                ar = self.sev("appendicitis", *self.v((6.5, 8.0, 10.0), (6.5, 8.0, 10.0), (9.0, 11.0, 13.0)))
                self.hu[T.STRANDING] = self.v(-35.0, -35.0, -5.0)  # only the inflamed fat is stranding
                inflamed = self.v((26, 24, 34), (26, 24, 34), (34, 32, 42))
                c.ellipsoid((base + tip) / 2, inflamed, T.STRANDING, where=(T.VISC_FAT,))
                c.chain(np.array([base, tip]), ar, T.BOWEL_WALL, where=(T.VISC_FAT, T.STRANDING, T.MUSCLE))
                c.chain(np.array([base, tip]), ar - 3.0, T.BOWEL_FLUID, where=(T.BOWEL_WALL,))
                if self.version >= 3:  # an appendicolith near the base
                    c.ellipsoid(
                        base + (tip - base) * 0.3, (5.0, 5.0, 5.0), T.STONE, where=(T.BOWEL_FLUID, T.BOWEL_WALL)
                    )
                self.site("appendicitis", (base + tip) / 2)
        else:
            c.chain(np.array([base, tip]), 3.0, T.BOWEL_WALL, where=(T.VISC_FAT,))

    def pelvis(self):
        c, s = self.c, self.s
        fill = self.p.body["bladder_fill"]
        bl = (0.0, -38.0, self.Z(0.1))
        c.ellipsoid(
            bl, (38 * fill, 32 * fill, 30 * fill), T.BLADDER, where=(T.VISC_FAT, T.MUSCLE, T.BOWEL_WALL, T.BOWEL_AIR)
        )
        if self.p.sex == "M":
            pr = self.sev("prostatomegaly", *self.v((26, 32, 40), (32, 40, 48))) if "prostatomegaly" in self.f else 17.0
            pc = (0.0, -20.0, self.Z(0.0) + pr * 0.6)
            with self.lesion("prostatomegaly"):
                c.ellipsoid(pc, (pr, pr * 0.85, pr), T.PROSTATE)
            self.site("prostatomegaly", pc)
        else:
            c.ellipsoid((0.0, -5.0, self.Z(0.16)), (30 * s, 22 * s, 38 * s), T.UTERUS, where=(T.VISC_FAT, T.BOWEL_WALL))

    def nodes_and_peritoneum(self):
        c, rng = self.c, self.rng
        sy = self.spine_y
        if "lymphadenopathy" in self.f:
            n = int(self.sev("lymphadenopathy", 4, 7, 11))
            rr = self.sev("lymphadenopathy", *self.v((8.0, 11.0, 15.0), (11.0, 14.0, 18.0), (14.0, 18.0, 22.0)))
            rr = self.stated_radius("lymphadenopathy", rr)  # version 4: the largest node at the report's size
        else:
            n, rr = 5, 3.5
        with self.lesion("lymphadenopathy"):
            for _ in range(n):
                z = self.u(self.Z(0.3), self.Z(0.62))
                sx = -1 if rng.random() < 0.5 else 1
                pt = (
                    (14 + sx * self.u(16, 32), sy - 36 + self.u(-12, 12), z)
                    if rng.random() < self.v(0.6, 0.6, 0.9)  # version 3: mostly para-aortic, where no bowel lies
                    else (self.u(-40, 40), self.u(-40, 0), z)
                )
                c.ellipsoid(pt, (rr, rr * 0.9, rr * 1.1), T.NODE, where=(T.VISC_FAT,))
                self.site("lymphadenopathy", pt)
        if "metastatic_disease" in self.f and rng.random() < 0.5:
            with self.lesion("metastatic_disease"):
                for _ in range(int(self.sev("metastatic_disease", 1, 2, 4))):
                    lo, hi = self.vertebrae[int(rng.integers(2, len(self.vertebrae) - 2))]
                    pt = (self.u(-8, 8), sy + self.u(-6, 6), (lo + hi) / 2)
                    c.ellipsoid(pt, (8, 8, 8), T.METASTASIS, where=(T.TRABECULAR_BONE,))
        if "ascites" in self.f:
            with self.lesion("ascites"):
                g = self.sev("ascites", 8.0, 16.0, 26.0)
                (lc, lr) = self.liver
                c.ellipsoid(lc, tuple(r + g for r in lr), T.FLUID, where=(T.VISC_FAT,))
                c.ellipsoid(self.spleen, (30 + g, 55 + g, 52 + g), T.FLUID, where=(T.VISC_FAT,))
                for sx in (-1, 1):
                    c.sweep(
                        self.Z(0.2),
                        self.Z(0.62),
                        lambda z, sx=sx: (sx * (self.a - self.fat - 30), 5.0, 12 + g, 35 + g),
                        T.FLUID,
                        where=(T.VISC_FAT,),
                    )
                c.ellipsoid((0.0, -20.0, self.Z(0.14)), (60 + g, 40 + g, 30 + g), T.FLUID, where=(T.VISC_FAT,))
                self.site("ascites", (lc[0] - lr[0] * 0.8, lc[1], lc[2] - lr[2] * 0.3))
        if "free_air" in self.f:
            with self.lesion("free_air"):
                n = int(self.sev("free_air", 1, 2, 4))
                rr = self.sev("free_air", *self.v((7.0, 12.0, 20.0), (7.0, 12.0, 20.0), (14.0, 20.0, 28.0)))
                for _ in range(n):
                    z = self.u(self.Z(0.4), self.Z(0.75))
                    x = self.u(*self.v((-50, 50), (-50, 50), (-80, 20)))  # version 3: over the liver
                    y = -(self.b - self.fat - 9.0) + rr * 0.5
                    c.ellipsoid(
                        (x, y, z), (rr * 1.8, rr * 0.6, rr * 1.2), T.FREE_AIR, where=(T.VISC_FAT, T.FLUID, T.LIVER)
                    )
                    self.site("free_air", (x, y, z))
        if "anasarca" in self.f:
            self.site("anasarca", (self.a - self.fat / 2, 0.0, self.Z(0.45)))
