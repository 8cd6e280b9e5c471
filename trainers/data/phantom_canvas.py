"""The drawing surface of the phantom generator: voxel grid with patient pose, painted canvas, smooth random fields.

Two frames, both in mm with RAS directions (+x patient right, +y anterior, +z superior):

- the *scanner* frame: axes of the voxel array (the affine is diagonal in it), origin at the patient centre;
- the *patient* frame: the scanner frame rotated by the patient's roll `theta` about z (a patient lying slightly
  turned on the table). All anatomy and lesions are defined in the patient frame; gravity (the level of a pleural
  effusion, the table) acts along the scanner's y.

`Grid` gives both for every voxel centre; `Canvas` holds the HU, anatomy-id and lesion-id volumes painted in order
(later paints win); `FieldBank` gives smooth random fields fixed in the patient frame, so a patient's vessels and
lesion textures stay put between a prior and a follow-up scan.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np


__all__ = [
    "Canvas",
    "FieldBank",
    "Grid",
    "blur_axis",
    "ellipsoid_q2",
    "frame_from_axis",
    "gaussian_blur",
    "rot_z",
    "segment_distance",
    "tube_masks",
    "uniform",
]


def uniform(rng: np.random.Generator, a: float, b: float) -> float:
    return float(rng.uniform(a, b))


def blur_axis(a: np.ndarray, axis: int, w: float = 0.25) -> np.ndarray:
    """[w, 1 - 2w, w] along one axis with edge replication (w = 0.25: the [1, 2, 1] / 4 kernel; variance 2w
    voxels²)."""
    a = np.moveaxis(a, axis, 0)
    w = np.float32(w)
    out = a * (np.float32(1.0) - 2 * w)
    if a.shape[0] > 1:
        out[1:] += a[:-1] * w
        out[:1] += a[:1] * w
        out[:-1] += a[1:] * w
        out[-1:] += a[-1:] * w
    else:
        out += a * (2 * w)
    return np.moveaxis(out, 0, axis)


def gaussian_blur(a: np.ndarray, variances: Sequence[float]) -> np.ndarray:
    """Approximately Gaussian blur with the given variance (voxels²) per axis: repeated [w, 1 - 2w, w] passes
    (each adds 2w ≤ 0.5 voxels²)."""
    out = a
    for axis, var in enumerate(variances):
        if var <= 1e-4:
            continue
        passes = max(1, math.ceil(var / 0.5))
        for _ in range(passes):
            out = blur_axis(out, axis, var / (2 * passes))
    return out


def interp_matrix(q: np.ndarray, lo: float, step: float, m: int) -> np.ndarray:
    """Rows of linear-interpolation weights taking a regular coarse axis (lo + step * i) to positions q."""
    t = np.clip((np.asarray(q, np.float64) - lo) / step, 0.0, m - 1 - 1e-6)
    i0 = np.floor(t).astype(np.int64)
    w = (t - i0).astype(np.float32)
    out = np.zeros((t.size, m), np.float32)
    rows = np.arange(t.size)
    out[rows, i0] = 1.0 - w
    out[rows, np.minimum(i0 + 1, m - 1)] += w
    return out


def rot_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def frame_from_axis(u: Sequence[float]) -> np.ndarray:
    """Orthonormal frame (columns u, v, w) whose first axis is u."""
    u = np.asarray(u, float)
    u = u / np.linalg.norm(u)
    v = np.cross([0.0, 0.0, 1.0], u)
    if np.linalg.norm(v) < 1e-6:
        v = np.array([1.0, 0.0, 0.0])
    v = v / np.linalg.norm(v)
    w = np.cross(u, v)
    return np.stack([u, v, w], axis=1)


def ellipsoid_q2(X, Y, Z, c, axes, R=None):
    """Squared normalised radius of points in an ellipsoid (centre c, semi-axes, rotation R columns)."""
    dx, dy, dz = X - c[0], Y - c[1], Z - c[2]
    if R is None:
        return (dx / axes[0]) ** 2 + (dy / axes[1]) ** 2 + (dz / axes[2]) ** 2
    q = 0.0
    for i in range(3):
        qi = dx * R[0, i] + dy * R[1, i] + dz * R[2, i]
        q = q + (qi / axes[i]) ** 2
    return q


def segment_distance(X, Y, Z, p0, p1):
    """Distance to segment p0-p1 and the projection parameter t in [0, 1]."""
    d = np.asarray(p1, float) - np.asarray(p0, float)
    l2 = max(float(d @ d), 1e-9)
    ax, ay, az = X - p0[0], Y - p0[1], Z - p0[2]
    t = np.clip((ax * d[0] + ay * d[1] + az * d[2]) / l2, 0.0, 1.0)
    dist2 = (ax - t * d[0]) ** 2 + (ay - t * d[1]) ** 2 + (az - t * d[2]) ** 2
    return np.sqrt(dist2), t


class Grid:
    """Voxel-centre coordinates of one volume.

    Args:
        xs, ys, zs: scanner-frame coordinates (mm from the patient centre, RAS directions) of the voxel centres
            along the three array axes (the affine is diagonal, so each depends on one array axis).
        theta: the patient's roll about z in degrees (patient point p lies at scanner point `rot_z(theta) @ p`).

    Attributes:
        X, Y, Z: patient-frame coordinates, broadcastable to `shape` (`X`, `Y` are `(nx, ny, 1)` when rotated,
            else `(nx, 1, 1)` and `(1, ny, 1)`; `Z` is `(1, 1, nz)`).
        Ys: scanner-frame y, `(1, ny, 1)` (gravity acts along it).
    """

    def __init__(self, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray, theta: float = 0.0):
        self.xs = np.asarray(xs, np.float32)
        self.ys = np.asarray(ys, np.float32)
        self.zs = np.asarray(zs, np.float32)
        self.shape = (self.xs.size, self.ys.size, self.zs.size)
        self.spacing = tuple(float(abs(c[1] - c[0])) if c.size > 1 else 1.0 for c in (self.xs, self.ys, self.zs))
        self.theta = float(theta)
        self.rotated = abs(self.theta) > 1e-9
        self.cos, self.sin = math.cos(math.radians(self.theta)), math.sin(math.radians(self.theta))
        if self.rotated:
            xs2, ys2 = self.xs[:, None], self.ys[None, :]
            self.X = (self.cos * xs2 + self.sin * ys2).astype(np.float32)[:, :, None]
            self.Y = (-self.sin * xs2 + self.cos * ys2).astype(np.float32)[:, :, None]
        else:
            self.X = self.xs[:, None, None]
            self.Y = self.ys[None, :, None]
        self.Z = self.zs[None, None, :]
        self.Ys = self.ys[None, :, None]

    def to_scanner(self, p) -> np.ndarray:
        p = np.asarray(p, float)
        return np.array([self.cos * p[0] - self.sin * p[1], self.sin * p[0] + self.cos * p[1], p[2]])

    def block(self, sl):
        """Patient-frame (X, Y, Z) of the voxels of block `sl`."""
        if self.rotated:
            return self.X[sl[0], sl[1]], self.Y[sl[0], sl[1]], self.Z[:, :, sl[2]]
        return self.X[sl[0]], self.Y[:, sl[1]], self.Z[:, :, sl[2]]

    def full(self):
        return (slice(None),) * 3, self.X, self.Y, self.Z

    def box(self, lo, hi):
        """Sub-block covering the patient-frame box [lo, hi], as (slices, X, Y, Z), or None when empty."""
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        if self.rotated:
            corners = np.array([[x, y, 0.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])])
            s = np.array([self.to_scanner(c) for c in corners])
            lo = np.array([s[:, 0].min(), s[:, 1].min(), lo[2]])
            hi = np.array([s[:, 0].max(), s[:, 1].max(), hi[2]])
        slices = []
        for c, a, b in zip((self.xs, self.ys, self.zs), lo, hi):
            idx = np.flatnonzero((c >= a) & (c <= b))
            if idx.size == 0:
                return None
            slices.append(slice(int(idx[0]), int(idx[-1]) + 1))
        sl = tuple(slices)
        return (sl, *self.block(sl))

    def around(self, c, r):
        r = np.broadcast_to(np.asarray(r, float), (3,))
        c = np.asarray(c, float)
        return self.box(c - r, c + r)

    def nearest_index(self, p) -> tuple[int, int, int]:
        s = self.to_scanner(p)
        return tuple(int(np.argmin(np.abs(c - v))) for c, v in zip((self.xs, self.ys, self.zs), s))

    def patient_x(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Patient-frame x of voxels (i, j, ·)."""
        return self.X[i, j, 0] if self.rotated else self.xs[i]

    def min_radius(self, r: float) -> np.ndarray:
        """Per-axis radii no smaller than half a voxel diagonal (√3/2 voxel per axis), so an ellipsoid with these
        radii holds a voxel centre wherever it lies."""
        return np.maximum(r, 0.87 * np.asarray(self.spacing))


class Canvas:
    """HU volume + anatomy ids + lesion ids, painted in order (later paints win), plus the airway wall and lumen
    masks the bronchial tree leaves for later layers (vessels avoid walls; consolidation keeps air bronchograms)."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.hu = np.full(grid.shape, -1000.0, np.float32)
        self.lab = np.zeros(grid.shape, np.uint8)
        self.les = np.zeros(grid.shape, np.uint8)
        self.airway_wall = np.zeros(grid.shape, bool)
        self.airway_lumen = np.zeros(grid.shape, bool)

    def paint(self, sl, mask, hu=None, lab=None, les=None, only=None):
        """Paint the voxels of `mask` inside block `sl` (optionally only those whose anatomy id is in `only`).
        Painting anatomy without a lesion id clears the lesion id (a structure drawn over a lesion replaces it).
        Returns the painted voxels of the block."""
        region = self.lab[sl]
        m = np.broadcast_to(mask, region.shape)
        if only is not None:
            m = m & np.isin(region, only)
        if not m.any():
            return m
        if lab is not None and les is None:
            les = 0
        for arr, v in ((self.hu, hu), (self.lab, lab), (self.les, les)):
            if v is None:
                continue
            view = arr[sl]
            if np.ndim(v) == 0:
                view[m] = v
            else:
                view[m] = np.broadcast_to(v, region.shape)[m]
        return m

    def region(self, ids) -> np.ndarray:
        return np.isin(self.lab, ids)


def tube_masks(grid: Grid, pts, radii, extra: float = 0.0):
    """Masks of a polyline tube (radius varies linearly along each segment), as [(block slices, mask)]."""
    pts = np.asarray(pts, float)
    radii = np.broadcast_to(np.asarray(radii, float), (len(pts),))
    out = []
    for p0, p1, r0, r1 in zip(pts[:-1], pts[1:], radii[:-1], radii[1:]):
        rmax = max(r0, r1) + extra + 1.0
        box = grid.box(np.minimum(p0, p1) - rmax, np.maximum(p0, p1) + rmax)
        if box is None:
            continue
        sl, X, Y, Z = box
        dist, t = segment_distance(X, Y, Z, p0, p1)
        out.append((sl, dist < r0 + (r1 - r0) * t + extra))
    return out


class FieldBank:
    """Smooth unit-variance random fields defined in the patient frame, shared by all scans of one patient."""

    # The thorax of the largest patient (the fields are only read inside the lungs; outside they are clamped).
    LO = np.array([-175.0, -140.0, -205.0])
    HI = np.array([175.0, 150.0, 180.0])

    def __init__(self, entropy: Sequence[int]):
        self.entropy = [int(e) for e in entropy]
        self._cache: dict[tuple, np.ndarray] = {}

    def _coarse(self, name: str, step: float, passes: int) -> np.ndarray:
        key = (name, step, passes)
        if key not in self._cache:
            n = tuple(int(v) for v in np.ceil((self.HI - self.LO) / step).astype(int) + 1)
            rng = np.random.default_rng([*self.entropy, zlib.crc32(name.encode())])
            a = rng.standard_normal(n, dtype=np.float32)
            for _ in range(passes):
                for ax in range(3):
                    a = blur_axis(a, ax)
            a /= np.float32(a.std())
            self._cache[key] = np.ascontiguousarray(a)
        return self._cache[key]

    def sample(self, name: str, X, Y, Z, step: float = 6.0, passes: int = 2) -> np.ndarray:
        """Trilinear samples at patient-frame points (X, Y, Z broadcastable to (nx, ny, nz))."""
        a = self._coarse(name, step, passes)
        wz = interp_matrix(np.ravel(Z), self.LO[2], step, a.shape[2])
        cols = np.flatnonzero(wz.any(0))
        z0, z1 = int(cols[0]), int(cols[-1]) + 1
        wz, a = wz[:, z0:z1], a[:, :, z0:z1]
        if X.shape[1] == 1 and Y.shape[0] == 1:
            # Separable (unrotated) grid: matrix products only, no gathers.
            ws = []
            for ax, q in enumerate((X, Y)):
                w = interp_matrix(np.ravel(q), self.LO[ax], step, a.shape[ax])
                cols = np.flatnonzero(w.any(0))
                c0, c1 = int(cols[0]), int(cols[-1]) + 1
                ws.append(w[:, c0:c1])
                a = a[(slice(None),) * ax + (slice(c0, c1),)]
            f = np.tensordot(ws[0], a, axes=(1, 0))  # (nx, My, Mz)
            f = np.tensordot(f, ws[1], axes=(1, 1))  # (nx, Mz, ny)
            f = np.tensordot(f, wz, axes=(1, 1))  # (nx, ny, nz)
            return f.astype(np.float32, copy=False)
        # Rotated grid: bilinear gathers in the axial plane, then one matrix product along z.
        Xb, Yb = np.broadcast_arrays(X[..., 0], Y[..., 0])
        out = []
        for q, ax in ((Xb, 0), (Yb, 1)):
            t = np.clip((q - self.LO[ax]) / step, 0.0, a.shape[ax] - 1 - 1e-6)
            i0 = np.floor(t).astype(np.int64)
            out.append((i0, (t - i0).astype(np.float32)))
        (ix, fx), (iy, fy) = out
        ix1, iy1 = np.minimum(ix + 1, a.shape[0] - 1), np.minimum(iy + 1, a.shape[1] - 1)
        fx, fy = fx[..., None], fy[..., None]
        g = (a[ix, iy] * (1 - fx) + a[ix1, iy] * fx) * (1 - fy) + (a[ix, iy1] * (1 - fx) + a[ix1, iy1] * fx) * fy
        return np.tensordot(g, wz, axes=(2, 1)).astype(np.float32, copy=False)

    def sample_grid(self, name: str, grid: Grid, sl=None, **kw) -> np.ndarray:
        X, Y, Z = (grid.X, grid.Y, grid.Z) if sl is None else grid.block(sl)
        return self.sample(name, X, Y, Z, **kw)
