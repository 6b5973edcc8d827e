"""Rasterising analytic shapes onto a tissue-label grid.

The phantom is described in patient millimetres (DICOM LPS: +x patient left, +y posterior,
+z superior) as a list of shapes; this module paints them into a ``uint8`` label volume of any
sampling, so the tiny and the full profile show the same anatomy. Every shape is clamped to at
least ``MIN_VOXELS`` voxels per axis so that small findings (stones, calcified foci) survive
coarse sampling instead of vanishing between voxel centres.

Written by hand because no library rasterises a procedural anatomy description; the
primitives are deliberately few (ellipsoids, swept ellipses/annuli, chains of spheres).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache

import numpy as np

MIN_VOXELS = 0.6  # minimum semi-axis, in voxels


@dataclass(frozen=True)
class Grid:
    """Voxel centres: x_i = origin[0] + i*spacing[0], etc. (LPS mm)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def axis(self, a: int) -> np.ndarray:
        return self.origin[a] + self.spacing[a] * np.arange(self.shape[a])

    def index_range(self, a: int, lo: float, hi: float) -> slice:
        i0 = int(np.floor((lo - self.origin[a]) / self.spacing[a]))
        i1 = int(np.ceil((hi - self.origin[a]) / self.spacing[a])) + 1
        return slice(max(i0, 0), min(max(i1, 0), self.shape[a]))

    def affine_lps(self) -> np.ndarray:
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = self.origin
        return aff

    def affine_ras(self) -> np.ndarray:
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps()


Where = Iterable[int] | None


@cache
def _allowed(where: tuple[int, ...]) -> np.ndarray:
    """A 256-entry table, True at the labels a shape may paint over (a lookup is ~10x faster than ``np.isin``)."""
    table = np.zeros(256, dtype=bool)
    table[np.asarray(where, dtype=np.intp)] = True
    return table


class Canvas:
    """A label volume plus the grid it samples."""

    def __init__(self, grid: Grid, fill: int = 0):
        self.grid = grid
        self.labels = np.full(grid.shape, fill, dtype=np.uint8)
        self._ax = [grid.axis(a) for a in range(3)]
        self.recording: str | None = None  # while set, what is painted is recorded under this name
        self.painted: dict[str, tuple[np.ndarray, set[int]]] = {}  # name -> (voxels written, labels written)

    def _apply(self, sl: tuple[slice, slice, slice], mask: np.ndarray, label: int, where: Where) -> None:
        if not mask.any():
            return
        region = self.labels[sl]
        if where is not None:
            mask = mask & _allowed(tuple(where))[region]
        region[mask] = label
        if self.recording is not None:
            voxels, labels = self.painted.setdefault(self.recording, (np.zeros(self.labels.shape, bool), set()))
            voxels[sl] |= np.broadcast_to(mask, region.shape)
            labels.add(int(label))

    def recorded(self, name: str) -> np.ndarray | None:
        """The voxels painted under ``name`` that still hold what it painted (later shapes may cover some)."""
        if name not in self.painted:
            return None
        voxels, labels = self.painted[name]
        return voxels & _allowed(tuple(sorted(labels)))[self.labels]

    def _min_r(self, r: float, a: int) -> float:
        return max(float(r), MIN_VOXELS * self.grid.spacing[a])

    def ellipsoid(self, center, radii, label: int, where: Where = None, shell: float | None = None) -> None:
        """Axis-aligned ellipsoid; with ``shell`` (mm) only a wall of that thickness."""
        r = [self._min_r(radii[a], a) for a in range(3)]
        sl = tuple(self.grid.index_range(a, center[a] - r[a], center[a] + r[a]) for a in range(3))
        if any(s.stop <= s.start for s in sl):
            return
        x = (self._ax[0][sl[0]] - center[0])[:, None, None] / r[0]
        y = (self._ax[1][sl[1]] - center[1])[None, :, None] / r[1]
        z = (self._ax[2][sl[2]] - center[2])[None, None, :] / r[2]
        d = x * x + y * y + z * z
        mask = d <= 1.0
        if shell is not None:
            ri = [max(r[a] - shell, 1e-3) for a in range(3)]
            xi = (self._ax[0][sl[0]] - center[0])[:, None, None] / ri[0]
            yi = (self._ax[1][sl[1]] - center[1])[None, :, None] / ri[1]
            zi = (self._ax[2][sl[2]] - center[2])[None, None, :] / ri[2]
            mask &= (xi * xi + yi * yi + zi * zi) > 1.0
        self._apply(sl, mask, label, where)

    def sweep(
        self, z_lo: float, z_hi: float, section: Callable[[float], tuple | None], label: int, where: Where = None
    ) -> None:
        """Paint, slice by slice, the 2D shape ``section(z)`` returns.

        ``section(z)`` returns ``(cx, cy, rx, ry)`` for a filled ellipse, ``(cx, cy, rx, ry, t)``
        for an elliptic annulus of thickness ``t``, ``(cx, cy, rx, ry, t, a0, a1)`` for the part of
        that annulus from angle ``a0`` counter-clockwise to ``a1`` (radians, atan2(y, x), may wrap),
        or None to skip the slice.
        """
        zs = self.grid.index_range(2, z_lo, z_hi)
        if zs.stop - zs.start == 0:
            # Keep a thin structure alive on a coarse z grid: paint the nearest slice.
            k = int(round(((z_lo + z_hi) / 2 - self.grid.origin[2]) / self.grid.spacing[2]))
            if not 0 <= k < self.grid.shape[2]:
                return
            zs = slice(k, k + 1)
        for k in range(zs.start, zs.stop):
            z = self._ax[2][k]
            if not (z_lo - 0.5 * self.grid.spacing[2] <= z <= z_hi + 0.5 * self.grid.spacing[2]):
                continue
            sec = section(float(np.clip(z, z_lo, z_hi)))
            if sec is None:
                continue
            cx, cy, rx, ry = sec[:4]
            rx, ry = self._min_r(rx, 0), self._min_r(ry, 1)
            xs = self.grid.index_range(0, cx - rx, cx + rx)
            ys = self.grid.index_range(1, cy - ry, cy + ry)
            if xs.stop <= xs.start or ys.stop <= ys.start:
                continue
            dx = (self._ax[0][xs] - cx)[:, None]
            dy = (self._ax[1][ys] - cy)[None, :]
            mask = (dx / rx) ** 2 + (dy / ry) ** 2 <= 1.0
            if len(sec) >= 5:
                t = max(sec[4], MIN_VOXELS * min(self.grid.spacing[:2]) * 1.5)
                irx, iry = max(rx - t, 1e-3), max(ry - t, 1e-3)
                mask &= (dx / irx) ** 2 + (dy / iry) ** 2 > 1.0
            if len(sec) >= 7:
                ang = np.arctan2(np.broadcast_to(dy, mask.shape), np.broadcast_to(dx, mask.shape))
                a0, a1 = sec[5], sec[6]
                mask &= np.mod(ang - a0, 2 * np.pi) <= (a1 - a0)
            self._apply((xs, ys, slice(k, k + 1)), mask[:, :, None], label, where)

    def chain(self, points: np.ndarray, radius: float | np.ndarray, label: int, where: Where = None) -> None:
        """A tube along a polyline, drawn as overlapping spheres (for oblique or curved tubes)."""
        pts = np.asarray(points, dtype=float)
        rad = np.broadcast_to(np.asarray(radius, dtype=float), (len(pts),))
        dense, dense_r = [pts[0]], [rad[0]]
        for p0, p1, r0, r1 in zip(pts[:-1], pts[1:], rad[:-1], rad[1:]):
            n = max(int(np.ceil(np.linalg.norm(p1 - p0) / max(0.4 * min(r0, r1), 0.5))), 1)
            for t in np.arange(1, n + 1) / n:
                dense.append(p0 + t * (p1 - p0))
                dense_r.append(r0 + t * (r1 - r0))
        for p, r in zip(dense, dense_r):
            self.ellipsoid(p, (r, r, r), label, where)
