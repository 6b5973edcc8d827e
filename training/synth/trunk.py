"""The phantom's trunk: body wall, spine and muscles, thorax, great vessels (a part of ``phantom._Builder``)."""

from __future__ import annotations

import numpy as np

from .tissues import FAT, T


class TrunkMixin:
    """Painting methods of the trunk; the state (canvas, patient, helpers) is ``phantom._Builder``'s."""

    def body(self):
        c, a, b, fat = self.c, self.a, self.b, self.fat
        z_lo, z_hi = self.Z(-0.05), self.Z(1.05)

        def outer(z):
            t = (z - self.z0) / self.L
            widen = 1.0 + 0.06 * np.exp(-(((t - 0.12) / 0.12) ** 2)) - 0.05 * max(t - 0.8, 0) / 0.2
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
            c.sweep(
                self.Z(0.05),
                self.Z(0.62),
                lambda z, sx=sx: (
                    sx * (32 + 18 * (0.62 - (z - self.z0) / self.L)),
                    sy + 2,
                    8 + 22 * (0.62 - (z - self.z0) / self.L),
                    8 + 18 * (0.62 - (z - self.z0) / self.L),
                ),
                T.MUSCLE,
                where=FAT,
            )
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
                loss = self.sev("fracture", *self.v((0.35, 0.5, 0.65), (0.35, 0.5, 0.65), (0.5, 0.62, 0.75)))
                top = lo + (hi - lo) * (1 - loss)
                self.site("fracture", (0.0, sy, (lo + top) / 2))
            with self.lesion("fracture" if i == frac_v else None):  # the compressed vertebral body
                c.sweep(lo, top, lambda z: (0.0, sy, 23, 18), T.CORTICAL_BONE)
                c.sweep(lo + 2.5, top - 2.5, lambda z: (0.0, sy, 20, 15), T.TRABECULAR_BONE)
                if i == frac_v:
                    c.sweep(top - self.v(3.0, 3.0, 6.0), top, lambda z: (0.0, sy, 23, 18), T.SCLEROSIS)
            # Posterior elements.
            c.sweep(lo + 3, hi - 3, lambda z: (0.0, sy + 30, 14, 12, 4.5), T.CORTICAL_BONE)
            c.sweep(lo + 5, hi - 5, lambda z: (0.0, sy + 52, 4, 12), T.CORTICAL_BONE)
        c.sweep(self.Z(-0.05), self.Z(1.05), lambda z: (0.0, sy + 30, 9.5, 7.5), T.CSF)
        mid = self.vertebrae[len(self.vertebrae) // 2]
        self.site("osteopenia", (0.0, sy, (mid[0] + mid[1]) / 2))
        # Ribs (upper scan) and pelvic bones (lower scan).
        for zr in np.arange(self.Z(0.62), self.Z(1.05), 24.0):

            def rib(z, zr=zr):
                o = self.outer(z)
                return (0.0, 0.0, o[2] - self.fat - 6, o[3] - self.fat - 6, 7.0, -np.pi / 2 + 0.5, 1.5 * np.pi - 0.5)

            c.sweep(zr, zr + 8, rib, T.CORTICAL_BONE, where=(T.MUSCLE, T.VISC_FAT, T.SUBQ_FAT))
        for sx in (-1, 1):
            c.sweep(
                self.Z(0.14),
                self.Z(0.36),
                lambda z, sx=sx: (
                    sx * (self.a * 0.45),
                    self.b * 0.15,
                    self.a * 0.42,
                    self.b * 0.5,
                    9.0,
                    (-0.2 if sx > 0 else np.pi - 1.3),
                    (1.3 if sx > 0 else np.pi + 0.2),
                ),
                T.CORTICAL_BONE,
            )
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
        with self.lesion("cardiomegaly"):
            c.ellipsoid(hc, hr, T.MYOCARDIUM, where=(T.VISC_FAT, T.LUNG, T.MUSCLE))
            c.ellipsoid(hc, tuple(0.72 * r for r in hr), T.BLOOD, where=(T.MYOCARDIUM,))
        self.site("cardiomegaly", (hc[0], hc[1], max(hc[2] - hr[2] * 0.5, self.Z(0.92))))
        if "coronary_calcification" in self.f:
            with self.lesion("coronary_calcification"):
                n = int(self.sev("coronary_calcification", 2, 4, 7))
                for _ in range(n):
                    ang = self.u(-2.2, -0.3)
                    zz = hc[2] - self.u(*self.v((0.1, 0.6), (0.1, 0.6), (0.3, 0.8))) * hr[2]  # v3: inside the scan
                    pt = (hc[0] + 0.93 * hr[0] * np.cos(ang), hc[1] + 0.93 * hr[1] * np.sin(ang), zz)
                    c.ellipsoid(pt, self.v((2.5, 2.5, 3.0), (4.0, 4.0, 4.5), (5.5, 5.5, 6.0)), T.CALCIUM)
                    self.site("coronary_calcification", pt)
        if "aortic_valve_calcification" in self.f:
            with self.lesion("aortic_valve_calcification"):
                vc = (hc[0] - 18, hc[1] + 12, hc[2] - self.v(0.2, 0.2, 0.45) * hr[2])
                ring = self.v(9.0, 9.0, 11.0)
                for _ in range(int(self.sev("aortic_valve_calcification", 2, 3, 5))):
                    ang = self.u(0, 2 * np.pi)
                    c.ellipsoid(
                        (vc[0] + ring * np.cos(ang), vc[1] + ring * np.sin(ang), vc[2] + self.u(-3, 3)),
                        self.v((3.0, 3.0, 3.0), (4.5, 4.5, 4.5), (6.0, 6.0, 6.0)),
                        T.CALCIUM,
                    )
                self.site("aortic_valve_calcification", vc)
        if "pleural_effusion" in self.f:
            with self.lesion("pleural_effusion"):
                depth = self.sev("pleural_effusion", 14, 26, 42)
                for sx in self.sides("pleural_effusion"):
                    cx, cy = self.lungs[sx]
                    c.sweep(
                        self.Z(0.74),
                        self.Z(1.05),
                        lambda z, cx=cx: (cx, self.b - self.fat - 12, inner_x * 0.5, 10 + depth),
                        T.FLUID,
                        where=(T.LUNG,),
                    )
                    self.site("pleural_effusion", (cx, cy + 55, self.Z(0.88)))
        if "atelectasis" in self.f:
            with self.lesion("atelectasis"):
                for sx in self.sides("atelectasis"):
                    cx, cy = self.lungs[sx]
                    thick = self.sev("atelectasis", 6, 9, 14)
                    yc = (
                        cy
                        + inner_y * 0.35
                        - (self.sev("pleural_effusion", 14, 26, 42) if "pleural_effusion" in self.f else 0)
                    )
                    c.ellipsoid((cx, yc, self.Z(0.86)), (inner_x * 0.3, thick, 26), T.ATELECTASIS, where=(T.LUNG,))
                    self.site("atelectasis", (cx, yc, self.Z(0.86)))
        if "hiatal_hernia" in self.f:
            with self.lesion("hiatal_hernia"):
                r = self.sev("hiatal_hernia", 16, 24, 34)
                hc2 = (12.0, self.spine_y - 42, self.Z(0.9))
                c.ellipsoid(
                    hc2, (r, r * 0.85, r * 1.1), T.BOWEL_WALL, where=(T.VISC_FAT, T.LUNG, T.MYOCARDIUM, T.BLOOD)
                )
                c.ellipsoid(hc2, (r - 4, r * 0.85 - 4, r * 1.1 - 4), T.BOWEL_FLUID, where=(T.BOWEL_WALL,))
                c.ellipsoid(
                    (hc2[0], hc2[1] - r * 0.45, hc2[2]),
                    (r - 5, r * 0.4, r * 1.1 - 5),
                    T.BOWEL_AIR,
                    where=(T.BOWEL_FLUID,),
                )
                self.site("hiatal_hernia", hc2)

    def vessels(self):
        c, sy = self.c, self.spine_y
        ay = sy - 36
        bif = self.Z(0.38)
        aaa = "abdominal_aortic_aneurysm" in self.f
        ar = self.sev("abdominal_aortic_aneurysm", *self.v((17, 23, 30), (22, 28, 36))) if aaa else 10.5
        zc, zh = self.Z(0.46), self.L * 0.07

        def aorta_r(z):
            return 10.5 + (ar - 10.5) * np.exp(-(((z - zc) / zh) ** 2)) if aaa else 10.5

        def aorta(z):
            t = (z - self.z0) / self.L
            if t > 0.8:  # thoracic aorta curves posterior-left
                g = min((t - 0.8) / 0.2, 1.0)
                return (14 + 10 * g, ay + 22 * g, 11.5, 11.5)
            return (14.0, ay, aorta_r(z), aorta_r(z))

        c.sweep(bif, self.Z(1.05), aorta, T.AORTA, where=(T.VISC_FAT, T.LUNG, T.MUSCLE, T.DISC))
        self.aorta = aorta
        for sx in (-1, 1):
            c.chain(
                np.array([[14, ay, bif], [sx * 45, ay + 10, self.Z(0.22)], [sx * 70, ay + 5, self.Z(0.02)]]),
                6.5,
                T.AORTA,
                where=(T.VISC_FAT, T.MUSCLE),
            )
        if aaa:
            with self.lesion("abdominal_aortic_aneurysm"):  # the sac: its lumen (painted again, unchanged)
                sac = (zc - 1.2 * zh, zc + 1.2 * zh)
                c.sweep(*sac, lambda z: (14.0, ay, aorta_r(z), aorta_r(z)), T.AORTA, where=(T.AORTA,))
                # Mural thrombus: an eccentric crescent of the aneurysm sac.
                c.sweep(
                    zc - 1.2 * zh,
                    zc + 1.2 * zh,
                    lambda z: (14.0, ay, aorta_r(z), aorta_r(z), max(aorta_r(z) - 10.5, 0.1) * 0.6, -np.pi, 0.0),
                    T.THROMBUS,
                    where=(T.AORTA,),
                )
                self.site("abdominal_aortic_aneurysm", (14.0, ay, zc))
        if "atherosclerosis" in self.f:
            with self.lesion("atherosclerosis"):
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
                    c.ellipsoid(pt, self.v((2.5, 2.5, 3.5), (4.0, 4.0, 5.0)), T.CALCIUM)
                    self.site("atherosclerosis", pt)
        # IVC and portal vein.
        self.ivc = (-22.0, sy - 30)
        c.sweep(self.Z(0.36), self.Z(0.82), lambda z: (-22.0, sy - 30, 11.5, 10.0), T.IVC, where=(T.VISC_FAT, T.MUSCLE))
        pv = np.array([[-2.0, -8.0, self.Z(0.58)], [-30.0, -8.0, self.Z(0.64)], [-55.0, -4.0, self.Z(0.69)]])
        self.portal = pv
        c.chain(pv, 7.5, T.PORTAL)
        if "thrombosis" in self.f:
            with self.lesion("thrombosis"):
                if self.rng.random() < 0.6:
                    # version 3: the thrombus distends the vein
                    where = self.v((T.PORTAL,), (T.PORTAL,), (T.PORTAL, T.LIVER, T.VISC_FAT))
                    c.chain(self.v(pv[:2], pv), self.v(6.0, 7.5, 11.0), T.THROMBUS, where=where)
                    self.site("thrombosis", pv[1])
                else:
                    zt = self.Z(0.5)
                    half = self.v(25, 60)
                    rx, ry = self.v((10.0, 8.5), (10.0, 8.5), (15.0, 13.0))
                    where = self.v((T.IVC,), (T.IVC,), (T.IVC, T.VISC_FAT, T.MUSCLE))
                    c.sweep(zt - half, zt + half, lambda z: (-22.0, sy - 30, rx, ry), T.THROMBUS, where=where)
                    self.site("thrombosis", (-22.0, sy - 30, zt))
