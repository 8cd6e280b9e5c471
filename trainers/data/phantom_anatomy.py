"""Analytic chest anatomy of one phantom patient (patient frame, mm: +x patient right, +y anterior, +z superior).

`sample_anatomy` draws a patient (sex, age, body habitus, thoracic and mediastinal landmarks, bronchial tree);
`draw_anatomy` paints the normal anatomy of one scan onto a `Canvas` with that scan's tissue densities (contrast
phase); `draw_bronchial_tree` and `draw_lung_vessels` are separate layers because findings are painted between
them (emphysema destroys vessels, consolidation keeps air bronchograms). Region ids come from the anatomy table
`hf_models.anatomy_rect.ANATOMY_REGIONS`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import numpy as np

from hf_models.anatomy_rect import ANATOMY_REGIONS, anatomy_region

from .phantom_canvas import Canvas, FieldBank, ellipsoid_q2, frame_from_axis, rot_z, tube_masks, uniform


def _rid(name: str) -> int:
    return anatomy_region(name).id


#: Region ids by the table's names (the renderer never spells a number).
BACKGROUND = _rid("background")
BODY_WALL = _rid("body wall")
HEART = _rid("heart")
AORTA = _rid("aorta")
PULMONARY_ARTERY = _rid("pulmonary artery")
TRACHEA = _rid("trachea")
OESOPHAGUS = _rid("oesophagus")
SPINE = _rid("thoracic spine")
RIBS = _rid("ribs")
STERNUM = _rid("sternum")
LIVER = _rid("liver")
STOMACH = _rid("stomach")
SPLEEN = _rid("spleen")
MEDIASTINUM = _rid("mediastinum")
PLEURA = _rid("pleura")
ABDOMEN = _rid("upper abdomen")

LOBE_IDS: dict[str, int] = {
    row.name: row.id
    for row in ANATOMY_REGIONS
    if row.name.endswith(" lobe") and row.name.startswith(("right", "left"))
}
LOBE_NAMES = {v: k for k, v in LOBE_IDS.items()}
LUNG_IDS = tuple(sorted(LOBE_IDS.values()))
RIGHT_LOBES = tuple(v for k, v in sorted(LOBE_IDS.items(), key=lambda kv: kv[1]) if k.startswith("right"))
LEFT_LOBES = tuple(v for k, v in sorted(LOBE_IDS.items(), key=lambda kv: kv[1]) if k.startswith("left"))
#: Everything inside the thorax (for cardiothoracic measurements).
THORAX_IDS = (*LUNG_IDS, HEART, AORTA, PULMONARY_ARTERY, TRACHEA, OESOPHAGUS, SPINE, MEDIASTINUM, PLEURA)


# ----------------------------------------------------------------------------------------------------------------
# Analytic surfaces
# ----------------------------------------------------------------------------------------------------------------


def diaphragm(A, X, Y):
    """Height of the diaphragm surface: two domes, lower laterally and posteriorly (costophrenic recesses)."""
    qy = ((Y - A.yc - 0.1 * A.bc) / A.bc) ** 2
    zr = A.z_dR - 38.0 * np.minimum(((X - A.xm - 0.40 * A.ac) / (0.62 * A.ac)) ** 2 + qy, 1.8)
    zl = A.z_dL - 38.0 * np.minimum(((X - A.xm + 0.42 * A.ac) / (0.62 * A.ac)) ** 2 + qy, 1.8)
    return np.maximum(zr, zl)


def _apex(A, X, Y, side: int):
    xs = A.xm + side * 0.45 * A.ac
    q = ((X - xs) / (0.55 * A.ac)) ** 2 + ((Y - (A.yc - 0.15 * A.bc)) / (0.85 * A.bc)) ** 2
    return A.z_ap - 45.0 * q


def _med_halfwidth(A, Y, Z):
    hw = np.where(Y < A.yv + 28, 24.0, 9.0)
    return np.where((Z > A.z_arch - 5) & (Y >= A.yv + 28) & (Y < A.yv + 28 + 0.9 * A.bc), 28.0, hw)


def cavity_rho(A, X, Y):
    """Normalised radius of the thoracic cavity ellipse (1 at the inner chest wall)."""
    return np.sqrt((X / A.ac) ** 2 + ((Y - A.yc) / A.bc) ** 2)


def lobe_map(A, X, Y, Z) -> np.ndarray:
    """Lobe id of each point by the analytic lung model (0 outside the lungs); fissures: oblique
    (posterior-superior to anterior-inferior) on both sides, horizontal on the right."""
    X, Y, Z = np.broadcast_arrays(X, Y, Z)
    rho2 = (X / A.ac) ** 2 + ((Y - A.yc) / A.bc) ** 2
    thor = (rho2 < 1.0) & (Z > diaphragm(A, X, Y))
    hw = _med_halfwidth(A, Y, Z)
    right = thor & (X > A.xm + hw) & (Z < _apex(A, X, Y, +1))
    left = thor & (X < A.xm - hw) & (Z < _apex(A, X, Y, -1))
    zob_r = A.zob_r + A.sob * (A.yc - Y)
    zob_l = A.zob_l + A.sob * (A.yc - Y)
    out = np.zeros(X.shape, np.uint8)
    up_r = right & (Z >= zob_r)
    out[up_r & (Z >= A.zhz)] = LOBE_IDS["right upper lobe"]
    out[up_r & (Z < A.zhz)] = LOBE_IDS["right middle lobe"]
    out[right & (Z < zob_r)] = LOBE_IDS["right lower lobe"]
    out[left & (Z >= zob_l)] = LOBE_IDS["left upper lobe"]
    out[left & (Z < zob_l)] = LOBE_IDS["left lower lobe"]
    return out


def heart_geometry(A, scale: float | None = None):
    """Centre, semi-axes and axis frame of the heart; `scale` enlarges it (cardiomegaly) mostly to the left,
    anteriorly and upwards, as a dilated heart grows off the diaphragm."""
    axes = np.array(A.heart_axes, float)
    c = np.array(A.heart_c, float)
    if scale is not None:
        big = axes * np.array([scale, 0.5 + 0.5 * scale, 1.0 + 0.55 * (scale - 1.0)])
        c = c + np.array([-(big[0] - axes[0]) * 0.55, (big[1] - axes[1]) * 0.25, (big[2] - axes[2]) * 0.62])
        axes = big
    return c, axes, np.asarray(A.heart_R)


def cardiothoracic_ratio(A, scale: float | None = None) -> float:
    """Widest left-right extent of the heart ellipsoid over the inner width of the thorax."""
    _, axes, R = heart_geometry(A, scale)
    return float(np.sqrt(np.sum((R[0] * axes) ** 2)) / A.ac)


def _in_heart_zone(A, x, y, z, scale: float = 1.75):
    return ellipsoid_q2(x, y, z, A.heart_c, np.asarray(A.heart_axes) * scale, np.asarray(A.heart_R)) < 1.0


def _lung_candidates(A, rng, n: int):
    x = rng.uniform(-A.ac, A.ac, n)
    y = rng.uniform(A.yc - A.bc, A.yc + A.bc, n)
    z = rng.uniform(A.z_dR - 60, A.z_ap, n)
    lob = lobe_map(A, x, y, z)
    ok = (lob > 0) & ~_in_heart_zone(A, x, y, z) & (np.abs(x - A.xm) > 42)
    return x[ok], y[ok], z[ok], lob[ok]


_OFFSETS = np.concatenate(
    [
        np.eye(3),
        -np.eye(3),
        np.array([[1, 1, 1], [-1, -1, 1], [1, -1, -1], [-1, 1, -1], [1, -1, 1], [-1, 1, 1], [1, 1, -1], [-1, -1, -1]])
        / math.sqrt(3),
    ]
)


def sample_in_lobe(rng, A, lobe: int, margin: float, y_min: float = -1e9, z_max: float = 1e9) -> np.ndarray:
    """A point of `lobe` whose neighbourhood (radius `margin`) lies in the same lobe, away from the heart and
    mediastinum, anterior to `y_min` (clear of a dependent pleural effusion)."""
    m = margin
    for attempt in range(40):
        x, y, z, lob = _lung_candidates(A, rng, 3000)
        sel = (lob == lobe) & (y - m > y_min) & (z < z_max)
        if sel.any():
            p = np.stack([x[sel], y[sel], z[sel]], 1)[:300]
            q = p[:, None, :] + _OFFSETS[None] * m
            ql = lobe_map(A, q[..., 0], q[..., 1], q[..., 2])
            good = (ql == lobe).all(1) & ~_in_heart_zone(A, q[..., 0], q[..., 1], q[..., 2]).any(1)
            if good.any():
                return p[int(np.argmax(good))]
        if attempt % 4 == 3:
            m *= 0.8
            y_min -= 10
    # Fallback: any point of the lobe (tiny lobes in extreme anatomy).
    for _ in range(50):
        x, y, z, lob = _lung_candidates(A, rng, 4000)
        if (lob == lobe).any():
            i = int(np.argmax(lob == lobe))
            return np.array([x[i], y[i], z[i]])
    raise RuntimeError(f"lobe {lobe} not found in phantom anatomy")


def _lobe_centroid(rng, A, lobe: int) -> np.ndarray:
    pts = []
    while sum(len(p) for p in pts) < 200:
        x, y, z, lob = _lung_candidates(A, rng, 4000)
        sel = lob == lobe
        pts.append(np.stack([x[sel], y[sel], z[sel]], 1))
    return np.concatenate(pts).mean(0)


#: Mediastinal lymph-node stations (where a normal node sits and where lymphadenopathy is drawn).
STATIONS: dict[str, Any] = {
    "right paratracheal": lambda A: (A.x_t + 17, A.y_t + 4, A.z_car + 25),
    "left paratracheal": lambda A: (A.x_t - 15, A.y_t + 2, A.z_car + 30),
    "subcarinal": lambda A: (A.x_t, A.y_t - 8, A.z_car - 22),
    "prevascular": lambda A: (A.xm - 4, A.y_asc + 24, A.z_arch + 4),
    "aortopulmonary window": lambda A: (A.xm - 22, A.y_t + 16, A.z_arch - 14),
    "right hilar": lambda A: tuple(A.hilum_R + [6, 12, -8]),
    "left hilar": lambda A: tuple(A.hilum_L + [-6, 12, -6]),
}


# ----------------------------------------------------------------------------------------------------------------
# Patient
# ----------------------------------------------------------------------------------------------------------------


def sample_anatomy(rng: np.random.Generator, emphysema: bool) -> SimpleNamespace:
    """One patient: sex, age, body habitus (thorax size, subcutaneous fat, body shape), landmarks, bronchial tree.
    `emphysema` flattens the diaphragm (hyperinflation), the one finding that changes the patient's anatomy."""
    A = SimpleNamespace()
    A.sex = "F" if rng.random() < 0.45 else "M"
    A.age = int(rng.integers(30, 86))
    f = 0.94 if A.sex == "F" else 1.0
    # Habitus: thorax size and subcutaneous fat vary independently (a small obese patient, a large thin one).
    A.ac = uniform(rng, 106, 146) * f  # thoracic cavity (inside the ribs) half-width
    A.bc = A.ac * uniform(rng, 0.60, 0.75)  # … half AP depth
    A.fat = 3.0 + 42.0 * float(rng.beta(1.4, 3.2))  # subcutaneous fat thickness
    A.ab = A.ac + A.fat + uniform(rng, 16, 26)  # body half-width
    A.bb = A.bc + A.fat + 25.0  # body half AP depth (the posterior wall holds the paraspinal muscles)
    A.body_p = uniform(rng, 2.0, 2.7)  # superellipse exponent of the body outline (round ↔ boxy)
    A.yc = 13.0 + uniform(rng, -2, 2)
    A.xm = uniform(rng, -4, 4)  # mediastinal midline
    A.yv = A.yc - A.bc + 10  # vertebral-body centre
    A.z_ap = uniform(rng, 115, 135)
    A.z_dR = uniform(rng, -85, -65) - (14.0 if emphysema else 0.0)  # hyperinflation flattens the domes
    A.z_dL = A.z_dR - uniform(rng, 8, 18)
    A.z_car = A.z_ap - uniform(rng, 85, 100)
    A.z_arch = A.z_car + uniform(rng, 15, 24)
    A.zob_r = 0.5 * (A.z_car + A.z_dR) - uniform(rng, 0, 10)
    A.zob_l = A.zob_r + uniform(rng, 4, 12)
    A.sob = uniform(rng, 0.75, 0.95)
    A.zhz = A.z_car - uniform(rng, 12, 25)
    A.rib_pitch = uniform(rng, 24, 29)
    A.rib_off = uniform(rng, 0, 30)
    A.disk_off = uniform(rng, 0, 27)
    A.z_breast = A.z_car - uniform(rng, 30, 60)
    A.breast = uniform(rng, 0.6, 1.3)  # breast size factor
    A.bone = float(np.clip(1.1 - (A.age - 30) * 0.006 + rng.normal(0, 0.06), 0.7, 1.2))  # bone density factor
    # Heart: long axis towards the left, anterior and inferior.
    s_body = float(np.clip(A.ac / 125.0, 0.78, 1.2))  # the heart scales with the thorax (cardiothoracic ratio)
    hs = uniform(rng, 0.90, 1.05) * s_body
    A.heart_axes = [55.0 * hs, 44.0 * hs, 48.0 * hs]
    phi, tau = math.radians(uniform(rng, 28, 42)), math.radians(uniform(rng, 12, 25))
    A.heart_R = frame_from_axis([-math.cos(phi) * math.cos(tau), math.sin(phi) * math.cos(tau), -math.sin(tau)])
    # A normal heart: cardiothoracic ratio at most 0.46 (cardiomegaly, drawn as a finding, starts above 0.5).
    ctr = float(np.sqrt(np.sum((A.heart_R[0] * np.array(A.heart_axes)) ** 2)) / A.ac)
    if ctr > 0.46:
        A.heart_axes = [a * 0.46 / ctr for a in A.heart_axes]
    A.heart_c = [
        A.xm - 24.0 + uniform(rng, -4, 4),
        A.yc + 0.22 * A.bc + uniform(rng, -4, 4),
        A.z_dL + 0.62 * A.heart_axes[2],
    ]
    A.myo_t = uniform(rng, 9, 13)  # myocardial wall thickness
    # Airway and mediastinal landmarks.
    A.y_e = A.yv + 26.0  # oesophagus
    A.y_t = A.yv + 44.0  # trachea
    A.x_t = A.xm + uniform(rng, -3, 3)
    A.r_t = uniform(rng, 8, 10)
    A.hilum_R = np.array([A.xm + 0.40 * A.ac, A.y_t - 4, A.z_car - 18])
    A.hilum_L = np.array([A.xm - 0.42 * A.ac, A.y_t - 8, A.z_car - 28])
    A.y_asc = A.heart_c[1] + 8.0
    age_k = 1.0 + max(A.age - 50, 0) / 200.0
    A.r_aorta = (15.0 * age_k, 13.0 * age_k, 12.0 * age_k)
    top = 260.0
    asc_x = A.xm + 12.0
    yd, xd = A.yv + 10.0, A.xm - 34.0
    A.aorta = [
        (asc_x - 4, A.y_asc - 4, A.heart_c[2] + 0.25 * A.heart_axes[2]),
        (asc_x, A.y_asc, A.z_arch - 8),
        (asc_x - 6, A.y_asc - 12, A.z_arch + 8),
        (A.xm - 10, 0.5 * (A.y_asc + yd), A.z_arch + 14),
        (xd + 8, yd + 12, A.z_arch + 6),
        (xd, yd, A.z_arch - 10),
        (xd, yd, A.z_dL - 10),
        (A.xm - 14, A.yv + 30, A.z_dL - 45),
        (A.xm - 12, A.yv + 30, -300.0),
    ]
    A.aorta_r = [A.r_aorta[0]] * 2 + [A.r_aorta[1]] * 3 + [A.r_aorta[2]] * 4
    p_br, p_cc, p_sc = A.aorta[2], A.aorta[3], A.aorta[4]
    A.arch_branches = [
        ([p_br, (A.xm + 18, A.y_asc - 2, top)], 6.0),
        ([p_cc, (A.xm - 8, p_cc[1] + 6, top)], 4.5),
        ([p_sc, (A.xm - 34, p_sc[1], top)], 5.0),
    ]
    bif = np.array([A.xm - 6, A.y_t + 14, A.z_car - 10])
    rvot = np.array([A.xm - 12, A.y_asc + 16, A.heart_c[2] + 0.45 * A.heart_axes[2]])
    A.pa_trunk = ([rvot, bif], 13.0)
    A.pa_right = (
        [bif, (A.xm + 20, A.y_t + 8, A.z_car - 14), A.hilum_R + [4, 10, -6], A.hilum_R + [28, 8, -26]],
        [10.0, 9.0, 7.0, 4.5],
    )
    A.pa_left = (
        [bif, (A.xm - 30, A.y_t + 4, A.z_car - 4), A.hilum_L + [-2, 2, 6], A.hilum_L + [-26, 0, -18]],
        [10.0, 9.0, 7.0, 4.5],
    )
    A.svc = [(A.xm + 30, A.y_asc - 4, top), (A.xm + 26, A.y_asc, A.heart_c[2] + 0.35 * A.heart_axes[2])]
    A.oesophagus = [
        (A.xm - 6, A.y_e, top),
        (A.xm - 8, A.y_e, A.z_dL + 22),
        (A.xm - 30, A.y_e + 14, A.z_dL - 12),
        (A.xm - 0.45 * A.ac, A.yc + 0.1 * A.bc, A.z_dL - 40),
    ]
    A.oes_air = bool(rng.random() < 0.5)
    A.trachea = [(A.x_t, A.y_t, top), (A.x_t, A.y_t, A.z_car)]
    A.main_bronchi = [
        ([(A.x_t, A.y_t, A.z_car), tuple(A.hilum_R)], 7.0),
        ([(A.x_t, A.y_t, A.z_car), tuple(A.hilum_L)], 6.2),
    ]
    A.stomach_c = (A.xm - 0.45 * A.ac, A.yc + 0.15 * A.bc, A.z_dL - 40)
    A.stomach_r = (0.30 * A.ac, 0.40 * A.bc, 38.0)
    A.stomach_air = uniform(rng, 0.0, 0.6)  # fraction of the stomach's AP depth filled with air
    A.spleen_c = (A.xm - 0.66 * A.ac, A.yc - 0.45 * A.bc, A.z_dL - 45)
    A.spleen_r = (0.16 * A.ac, 0.48 * A.bc, 46.0)
    A.nodes_normal = [str(s) for s in rng.choice(sorted(STATIONS), size=4, replace=False)]
    # Bronchial tree: lobar → segmental → subsegmental segments (p0, p1, r0, r1, lobe, generation).
    bronchi = []
    for lobe in LUNG_IDS:
        hil = A.hilum_R if lobe in RIGHT_LOBES else A.hilum_L
        cen = _lobe_centroid(rng, A, lobe)
        lob_end = hil + 0.35 * (cen - hil)
        bronchi.append((hil, lob_end, 4.8, 4.0, lobe, 2))
        for _ in range(3):
            tgt = sample_in_lobe(rng, A, lobe, 6.0)
            seg_end = lob_end + 0.6 * (tgt - lob_end)
            bronchi.append((lob_end, seg_end, 3.2, 2.3, lobe, 3))
            for _ in range(2):
                t2 = sample_in_lobe(rng, A, lobe, 4.0)
                d = t2 - seg_end
                if np.linalg.norm(d) > 70:
                    d = d * 70 / np.linalg.norm(d)
                bronchi.append((seg_end, seg_end + 0.75 * d, 1.9, 1.1, lobe, 4))
    A.bronchi = [
        (np.asarray(p0, float), np.asarray(p1, float), r0, r1, lobe, g) for p0, p1, r0, r1, lobe, g in bronchi
    ]
    return A


# ----------------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------------


def paint_spot(cv: Canvas, c, r, hu: float | None = None, **kw):
    """Paint an ellipsoid (radius r: scalar or per axis) that always holds a voxel centre. When the grid is too
    coarse for it, it is inflated to the voxels it touches and its density is diluted to keep its total
    (partial volume), so a 4 mm wire in a 6 mm voxel is a bright voxel, not a 6 mm block of metal."""
    r = np.broadcast_to(np.asarray(r, float), (3,))
    rr = cv.grid.min_radius(r)
    box = cv.grid.around(c, rr + 1.0)
    if box is None:
        return None
    sl, X, Y, Z = box
    m = ellipsoid_q2(X, Y, Z, c, rr) < 1.0
    fraction = float(np.prod(r) / np.prod(rr))  # true volume / inflated volume
    if hu is not None and fraction < 1.0:
        hu = cv.hu[sl] + (np.float32(hu) - cv.hu[sl]) * np.float32(fraction)
    return cv.paint(sl, m, hu=hu, **kw)


def paint_segment(cv: Canvas, p0, p1, r: float, hu: float | None = None, **kw):
    """Paint a straight tube of radius r from p0 to p1 that always holds voxel centres along its length. On a grid
    too coarse for it the tube is inflated to the voxels it touches (a chain of ellipsoids of at least half a
    voxel diagonal) and its density diluted by the ratio of its true to its inflated cross-section (partial
    volume)."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    rr = cv.grid.min_radius(r)
    length = float(np.linalg.norm(p1 - p0))
    u = (p1 - p0) / length if length > 1e-6 else np.array([0.0, 0.0, 1.0])
    perp2 = float(np.sum(rr**2 * (1.0 - u**2)) / 2.0)  # mean squared inflated radius across the tube
    fraction = min(1.0, r * r / perp2)
    box = cv.grid.box(np.minimum(p0, p1) - rr - 1.0, np.maximum(p0, p1) + rr + 1.0)
    if box is None:
        return None
    sl, X, Y, Z = box
    n = max(2, int(math.ceil(length / (0.5 * float(rr.min())))) + 1)
    m = np.zeros(np.broadcast_shapes(X.shape, Y.shape, Z.shape), bool)
    for t in np.linspace(0.0, 1.0, n):
        m |= ellipsoid_q2(X, Y, Z, p0 + t * (p1 - p0), rr) < 1.0
    if hu is not None and fraction < 1.0:
        hu = cv.hu[sl] + (np.float32(hu) - cv.hu[sl]) * np.float32(fraction)
    return cv.paint(sl, m, hu=hu, **kw)


def draw_anatomy(cv: Canvas, A, scan, heart: Mapping[str, Any]) -> None:
    """Paint the normal anatomy with the scan's tissue densities (`scan`: the appearance record).

    `heart` holds the heart's `c`, `axes`, `R` (see `heart_geometry`) and `t_pe`, the pericardial space left
    free for an effusion (mm; 0 without one)."""
    grid = cv.grid
    sl0, X, Y, Z = grid.full()

    # --- table (scanner frame: it does not roll with the patient), body, cavity ---
    t = scan.table
    y_back = -math.hypot(A.bb * grid.cos, A.ab * grid.sin)
    top = y_back - t["gap"]
    table = (grid.Ys < top) & (grid.Ys > top - t["thickness"]) & (np.abs(grid.xs[:, None, None]) < t["half_width"])
    shell = table & ((grid.Ys > top - 1.5) | (grid.Ys < top - t["thickness"] + 1.5))
    cv.paint(sl0, table, hu=t["core_hu"])
    cv.paint(sl0, shell, hu=t["shell_hu"])
    p = A.body_p
    cv.paint(sl0, np.abs(X / A.ab) ** p + np.abs(Y / A.bb) ** p < 1.0, hu=scan.fat_hu, lab=BODY_WALL)
    ai, bi = A.ab - A.fat, A.bb - A.fat
    cv.paint(sl0, np.abs(X / ai) ** p + np.abs(Y / bi) ** p < 1.0, hu=scan.muscle_hu)
    if A.sex == "F":
        for s in (1, -1):
            c = (A.xm + s * 0.45 * A.ab, A.bb - 22, A.z_breast)
            r = np.array([58, 36, 52]) * A.breast
            box = grid.around(c, r + 4)
            if box is not None:
                sl, Xs, Ys, Zs = box
                cv.paint(
                    sl,
                    (ellipsoid_q2(Xs, Ys, Zs, c, r) < 1.0) & (Ys > 0),
                    hu=scan.fat_hu + 35.0,
                    lab=BODY_WALL,
                    only=(BACKGROUND,),
                )
    rho = cavity_rho(A, X, Y)
    cav = rho < 1.0
    zd = diaphragm(A, X, Y)
    cv.paint(sl0, cav & (Z > zd) & (Z < A.z_ap + 5), hu=scan.fat_hu + 10.0, lab=MEDIASTINUM)
    cv.paint(sl0, cav & (Z <= zd), hu=scan.fat_hu + 55.0, lab=ABDOMEN)
    cv.paint(sl0, cav & (Z <= zd) & (Z > zd - 5), hu=scan.muscle_hu, lab=BODY_WALL)

    # --- ribs, costal cartilage, sternum ---
    cortex, marrow = 780.0 * A.bone, 230.0 * A.bone
    shell_t = 9.0 / (0.5 * (A.ac + A.bc))
    in_shell = (rho >= 1.0) & (rho < 1.0 + shell_t)
    ant = (np.sin(np.arctan2((Y - A.yc) / A.bc, X / A.ac)) + 1.0) / 2.0
    phase = np.mod(Z + 40.0 * ant + A.rib_off, A.rib_pitch)
    dzr = np.abs(phase - A.rib_pitch / 2)
    ribz = (dzr < 4.5) & (Z < A.z_ap + 22)
    axm = np.abs(X - A.xm)
    rib = in_shell & ribz & ~((ant > 0.88) & (axm < 42)) & ~((ant < 0.2) & (axm < 20))
    edge = np.maximum(np.abs(rho - 1.0 - shell_t / 2) / (shell_t / 2), dzr / 4.5) > 0.55
    cv.paint(sl0, rib, hu=np.where(edge, cortex, marrow), lab=RIBS)
    cv.paint(sl0, in_shell & ribz & (ant > 0.88) & (axm < 42) & (axm >= 15), hu=120.0, lab=RIBS)
    st_hw = np.where(Z > A.z_arch, 24.0, 15.0)
    y0 = A.yc + A.bc - 1
    st = (axm < st_hw) & (Y > y0) & (Y < y0 + 12) & (Z > A.z_dL + 5) & (Z < A.z_ap - 5)
    st_core = (axm < st_hw - 3) & (Y > y0 + 2.5) & (Y < y0 + 9.5)
    cv.paint(sl0, st, hu=np.where(st_core, marrow + 20.0, cortex - 60.0), lab=STERNUM)
    del in_shell, ant, phase, dzr, ribz, rib, edge, st, st_core

    # --- lungs and pleura (posterior, dependent lung is denser) ---
    lobes = lobe_map(A, X, Y, Z)
    lung = lobes > 0
    base = scan.lung_hu + scan.lung_gradient * np.clip(0.5 - (Y - A.yc) / (2 * A.bc), 0, 1) ** 2
    cv.paint(sl0, lung, hu=base, lab=lobes)
    cv.paint(sl0, lung & (rho > 1.0 - 3.0 / (0.5 * (A.ac + A.bc))), hu=scan.fat_hu + 20.0, lab=PLEURA)
    del lobes, lung, base

    # --- upper abdomen ---
    liver = cav & (Z <= zd) & ((X - A.xm) > -18.0 - 0.55 * (Y - A.yc))
    cv.paint(sl0, liver, hu=scan.liver_hu, lab=LIVER, only=(ABDOMEN,))
    del liver
    box = grid.around(A.stomach_c, np.array(A.stomach_r) + 2)
    if box is not None:
        sl, Xs, Ys, Zs = box
        q = ellipsoid_q2(Xs, Ys, Zs, A.stomach_c, A.stomach_r)
        air_y = A.stomach_c[1] + A.stomach_r[1] * (1.0 - 2.0 * A.stomach_air)
        inner = np.where(Ys > air_y, -1000.0, 25.0)
        cv.paint(sl, q < 1.0, hu=np.where(q > 0.8, scan.muscle_hu, inner), lab=STOMACH, only=(ABDOMEN, LIVER))
    box = grid.around(A.spleen_c, max(A.spleen_r) + 2)
    if box is not None:
        sl, Xs, Ys, Zs = box
        m = ellipsoid_q2(Xs, Ys, Zs, A.spleen_c, A.spleen_r, rot_z(35)) < 1.0
        cv.paint(sl, m, hu=scan.spleen_hu, lab=SPLEEN, only=(ABDOMEN, LIVER))
    for s in (1, -1):
        c = (A.xm + s * 0.45 * A.ac, A.yv + 8, A.z_dL - 125)
        box = grid.around(c, (0.2 * A.ac + 2, 26, 57))
        if box is not None:
            sl, Xs, Ys, Zs = box
            m = ellipsoid_q2(Xs, Ys, Zs, c, (0.2 * A.ac, 24, 55)) < 1.0
            cv.paint(sl, m, hu=scan.kidney_hu, lab=ABDOMEN, only=(ABDOMEN, LIVER))

    # --- heart: pericardial fat, (space for an effusion), myocardium, blood pool ---
    c, axes, R, t_pe = heart["c"], heart["axes"], heart["R"], heart["t_pe"]
    mean_ax = float(np.mean(axes))
    box = grid.around(c, max(axes) * 1.1 + t_pe + 8)
    if box is not None:
        sl, Xs, Ys, Zs = box
        q = np.sqrt(ellipsoid_q2(Xs, Ys, Zs, c, axes, R))
        allowed = (Zs > diaphragm(A, Xs, Ys) - 3) & (cavity_rho(A, Xs, Ys) < 1.0)
        q_pe = 1.0 + t_pe / mean_ax
        q_fat = q_pe + 3.5 / mean_ax
        cv.paint(sl, allowed & (q < q_fat) & (q >= q_pe), hu=scan.fat_hu, lab=MEDIASTINUM)
        cv.paint(sl, allowed & (q < 1.0), hu=scan.myo_hu, lab=HEART)
        cv.paint(sl, allowed & (q < 1.0 - A.myo_t / mean_ax), hu=scan.blood_hu)

    # --- great vessels, airways, oesophagus, spine ---
    for sl, m in tube_masks(grid, A.aorta, A.aorta_r):
        cv.paint(sl, m, hu=scan.aorta_hu, lab=AORTA)
    for pts, r in A.arch_branches:
        for sl, m in tube_masks(grid, pts, r):
            cv.paint(sl, m, hu=scan.aorta_hu, lab=AORTA)
    for pts, r in (A.pa_trunk, A.pa_right, A.pa_left):
        for sl, m in tube_masks(grid, pts, r):
            cv.paint(sl, m, hu=scan.pa_hu, lab=PULMONARY_ARTERY)
    for sl, m in tube_masks(grid, A.svc, 9.0):
        cv.paint(sl, m, hu=scan.svc_hu, lab=MEDIASTINUM)
    lumens = []
    for pts, r, w in [(A.trachea, A.r_t, 2.5)] + [(p, r, 2.0) for p, r in A.main_bronchi]:
        for sl, m in tube_masks(grid, pts, r, extra=w):
            cv.paint(sl, m, hu=scan.muscle_hu, lab=TRACHEA)
        lumens += tube_masks(grid, pts, r)
    for sl, m in lumens:
        cv.paint(sl, m, hu=-1000.0, lab=TRACHEA)
    for sl, m in tube_masks(grid, A.oesophagus, 8.0):
        cv.paint(sl, m, hu=scan.muscle_hu - 8.0, lab=OESOPHAGUS)
    if A.oes_air:
        for sl, m in tube_masks(grid, A.oesophagus[:2], 2.5):
            cv.paint(sl, m, hu=-950.0, lab=OESOPHAGUS)
    vb = ((X - A.xm) / 20.0) ** 2 + ((Y - A.yv) / 16.0) ** 2
    y_can = A.yv - 26.0
    can = ((X - A.xm) / 9.0) ** 2 + ((Y - y_can) / 9.0) ** 2
    cv.paint(sl0, (np.abs(Y - (A.yv - 24)) < 5) & (axm < 42) & (Z < A.z_ap + 40), hu=0.8 * cortex, lab=SPINE)
    cv.paint(sl0, (axm < 4) & (Y < A.yv - 30) & (Y > -A.bb + 8), hu=0.8 * cortex, lab=SPINE)
    cv.paint(sl0, ((X - A.xm) / 15.0) ** 2 + ((Y - y_can) / 15.0) ** 2 < 1.0, hu=0.85 * cortex, lab=SPINE)
    cv.paint(sl0, can < 1.0, hu=20.0, lab=SPINE)
    cv.paint(sl0, vb < 1.0, hu=np.where(vb > 0.62, cortex, marrow), lab=SPINE)
    disk = np.mod(Z - A.disk_off, 27.0) < 5.5
    cv.paint(sl0, (vb < 0.8) & disk, hu=85.0)
    del vb, can, disk, rho, cav, zd, axm

    # --- normal lymph nodes ---
    for st in A.nodes_normal:
        paint_spot(cv, STATIONS[st](A), 3.5, hu=scan.node_hu, lab=MEDIASTINUM, only=(MEDIASTINUM, *LUNG_IDS))


def draw_bronchial_tree(cv: Canvas, A, scan) -> None:
    """Segmental and subsegmental bronchi inside their lobes: walls (soft tissue), then air lumens. Records the
    walls and lumens on the canvas for later layers."""
    walls, lumens = [], []
    for p0, p1, r0, r1, lobe, _gen in A.bronchi:
        walls.append((tube_masks(cv.grid, [p0, p1], [r0, r1], extra=0.3 * r0 + 0.3), lobe))
        lumens.append((tube_masks(cv.grid, [p0, p1], [r0, r1]), lobe))
    for masks, lobe in walls:
        for sl, m in masks:
            cv.airway_wall[sl] |= cv.paint(sl, m, hu=scan.muscle_hu - 15.0, only=(lobe,))
    for masks, lobe in lumens:
        for sl, m in masks:
            cv.airway_lumen[sl] |= cv.paint(sl, m, hu=-990.0, only=(lobe,))


def draw_lung_vessels(cv: Canvas, A, scan, bank: FieldBank, exclude: np.ndarray | None = None) -> None:
    """Pulmonary vessels: branching tubes from the intersection of two smooth random fields' zero sets, thicker
    near the hila; never inside airway walls/lumens or `exclude` (emphysema destroys the capillary bed)."""
    grid = cv.grid
    _, X, Y, Z = grid.full()
    d_hil = np.minimum(
        np.sqrt((X - A.hilum_R[0]) ** 2 + (Y - A.hilum_R[1]) ** 2 + (Z - A.hilum_R[2]) ** 2),
        np.sqrt((X - A.hilum_L[0]) ** 2 + (Y - A.hilum_L[1]) ** 2 + (Z - A.hilum_L[2]) ** 2),
    )
    e = 0.11 + 0.30 * np.exp(-d_hil / 60.0)
    del d_hil
    ves = np.abs(bank.sample_grid("vessel-1", grid, step=6.0, passes=2)) < e
    ves &= np.abs(bank.sample_grid("vessel-2", grid, step=6.0, passes=2)) < e
    ves &= cv.region(LUNG_IDS) & ~cv.airway_wall & ~cv.airway_lumen
    if exclude is not None:
        ves &= ~exclude
    cv.paint((slice(None),) * 3, ves, hu=scan.vessel_hu)
