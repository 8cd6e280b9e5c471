"""The phantom's findings as a table of finding specs (timm `default_cfgs` style): one `FindingSpec` per CT-RATE
abnormality says what it is, where it lies (anatomy region ids), its density (HU) and size, how often it occurs,
whether follow-up scans change it, the smallest processed volume at which it is visible, and how reports word it
(positive sentences per variant, impression, explicit negative, the keyword pattern a label extractor uses). The
per-finding functions the table names draw its parameters (`sample`), change its size between scans (`scale`),
place it in the patient (`place`, shared by a patient's scans), paint it (`render`) and fill the report templates
(`words`). The renderer paints findings in `layer` order (later wins where lesions overlap), with two anatomy
layers in between: the bronchial tree (`AIRWAY_LAYER`) and the lung vessels (`VESSEL_LAYER`).

Every render returns a reference point (patient frame, mm) inside the lesion; the generator marks that voxel
when a lesion misses every voxel centre of a coarse grid, so each positive label owns at least one voxel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hf_models.configuration_rect import CT_RATE_ABNORMALITIES

from .phantom_anatomy import (
    ABDOMEN,
    AORTA,
    BODY_WALL,
    HEART,
    LEFT_LOBES,
    LIVER,
    LOBE_NAMES,
    LUNG_IDS,
    MEDIASTINUM,
    OESOPHAGUS,
    PLEURA,
    PULMONARY_ARTERY,
    RIBS,
    RIGHT_LOBES,
    STATIONS,
    STERNUM,
    STOMACH,
    TRACHEA,
    cardiothoracic_ratio,
    cavity_rho,
    diaphragm,
    paint_segment,
    paint_spot,
    sample_in_lobe,
)
from .phantom_canvas import Canvas, ellipsoid_q2, tube_masks, uniform


__all__ = [
    "ABNORMALITIES",
    "AIRWAY_LAYER",
    "FINDINGS",
    "FindingSpec",
    "LESION_IDS",
    "LESION_PRIORITY",
    "PREVALENCE",
    "REPORT_KEYWORDS",
    "SIZED",
    "VESSEL_LAYER",
    "join_words",
    "lobe_list",
]

#: The 18 CT-RATE multi-abnormality columns, in the CSV's order.
ABNORMALITIES: tuple[str, ...] = CT_RATE_ABNORMALITIES

#: Lesion-mask value of each abnormality: its 1-based position in `ABNORMALITIES` (0 = no lesion).
LESION_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(ABNORMALITIES)}

#: Anatomy layers painted between the findings (see the module docstring).
AIRWAY_LAYER = 40
VESSEL_LAYER = 50


@dataclass(frozen=True)
class FindingSpec:
    """One row of the findings table.

    Attributes:
        name: the CT-RATE column.
        what: what is drawn, in one line.
        regions: anatomy region ids (`hf_models.anatomy_rect`) of the lesion-mask voxels.
        hu: HU range of the lesion tissue as drawn (before contrast uptake, blur and noise).
        size: `(low, high)` mm at a first scan; `size_of` says what it measures.
        size_of: the measured dimension.
        visible_at: smallest processed volume (D×H×W) at which the lesion itself is visible, and in which window.
        prevalence: probability at a patient's first scan (independent draws).
        layer: paint order; a later layer wins where lesions overlap (`LESION_PRIORITY` is the reverse order).
        sized: follow-up scans may grow, shrink or resolve it (others are chronic and persist unchanged).
        sample: `(rng, A, spec) -> params` at a first scan.
        render: `(canvas, A, f, ctx) -> reference point | None`; `f` = params + placement.
        words: `f -> (variant, fields)` for the report templates.
        positive: findings sentences per variant (`{c}`: comparison with the prior; other fields from `words`).
        impression: impression sentence per variant.
        keywords: regular expression (lower-case text) of the words that assert it in a report.
        section: report section ("mediastinum", "lungs", "pleura").
        appearance: how it looks, for reasoning texts.
        where: region words for reasoning texts (None: the lobes it occupies).
        window: display window of its 2D cases ("lung" or "mediastinum").
        scale: `(params, k) -> params` with the lesion volume scaled by about k (sized findings).
        place: `(rng, A, params_per_scan, ctx) -> placement`, shared by the patient's scans.
        attach: `(params, placement) -> f` (default: the two merged).
        heart: `(f, heart) -> None`: how it changes the heart's geometry before the anatomy is drawn.
        enhancement: share of the scan's contrast enhancement the lesion takes up (0: none; fluids stay fluid).
        negative: explicit negative sentences (each holds a negation cue).
        p_negative: probability of stating the negative when absent.
        resolved: noun of "The previously described ... has resolved." (default: the name, lower case).
    """

    name: str
    what: str
    regions: tuple[int, ...]
    hu: tuple[float, float]
    size: tuple[float, float]
    size_of: str
    visible_at: str
    prevalence: float
    layer: int
    sized: bool
    sample: Callable
    render: Callable
    words: Callable
    positive: Mapping[str, tuple[str, ...]]
    impression: Mapping[str, str]
    keywords: str
    section: str
    appearance: str
    where: str | None
    window: str
    scale: Callable | None = None
    place: Callable | None = None
    attach: Callable | None = None
    heart: Callable | None = None
    enhancement: float = 0.0
    negative: tuple[str, ...] = ()
    p_negative: float = 1.0
    resolved: str | None = field(default=None)


# ----------------------------------------------------------------------------------------------------------------
# Wording helpers
# ----------------------------------------------------------------------------------------------------------------


def join_words(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def lobe_list(lobes) -> str:
    """'right lower lobe', 'right upper and lower lobes', 'right lower lobe and left upper lobe'."""
    lobes = sorted({int(v) for v in lobes})
    parts = []
    for side, ids in (("right", RIGHT_LOBES), ("left", LEFT_LOBES)):
        mine = [LOBE_NAMES[i].split()[1] for i in lobes if i in ids]
        if len(mine) == 1:
            parts.append(f"{side} {mine[0]} lobe")
        elif mine:
            parts.append(f"{side} {join_words(mine)} lobes")
    return join_words(parts)


def _copy(params: Mapping[str, Any]) -> dict[str, Any]:
    """Deep copy of a parameter dict of numbers, strings, lists and dicts."""

    def cp(v):
        if isinstance(v, dict):
            return {k: cp(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [cp(x) for x in v]
        if isinstance(v, np.ndarray):
            return v.copy()
        return v

    return cp(dict(params))


def _rng_pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _enhanced(spec: FindingSpec, hu: float, ctx) -> float:
    return float(hu + spec.enhancement * ctx.scan.enhancement)


def _lobe_words(f) -> tuple[str, dict]:
    return "", {"w": lobe_list([f["lobe"]])}


def _no_words(f) -> tuple[str, dict]:
    return "", {}


# ----------------------------------------------------------------------------------------------------------------
# Placement helpers shared by lung findings
# ----------------------------------------------------------------------------------------------------------------


def _y_min(ctx, lobe: int) -> float:
    """Lesions in a lung with an effusion stay anterior to the fluid (in any scan of the patient)."""
    side = "right" if lobe in RIGHT_LOBES else "left"
    return ctx.effusion_level.get(side, -1e9)


def _polyline_point(pts: np.ndarray, frac: float):
    seg = np.diff(pts, axis=0)
    lens = np.linalg.norm(seg, axis=1)
    cum = np.cumsum(lens)
    target = frac * cum[-1]
    i = min(int(np.searchsorted(cum, target)), len(seg) - 1)
    t = (target - (cum[i] - lens[i])) / max(lens[i], 1e-9)
    return pts[i] + t * seg[i], seg[i] / max(lens[i], 1e-9), i


# ----------------------------------------------------------------------------------------------------------------
# Medical material
# ----------------------------------------------------------------------------------------------------------------


def _sample_material(rng, A, spec):
    return {"kind": str(rng.choice(["pacemaker", "catheter", "sternotomy"], p=[0.45, 0.35, 0.2]))}


def _render_material(cv: Canvas, A, f, ctx):
    grid, k = cv.grid, LESION_IDS["Medical material"]
    hc = np.asarray(A.heart_c)
    kind = f["kind"]
    if kind == "pacemaker":
        # Generator: a dense box in the left pectoral chest wall (patient frame), lead through the SVC into the
        # right ventricle.
        gen = np.array([A.xm - 0.5 * A.ab, A.bb - 0.5 * A.fat - 5.0, A.z_car + 20])
        half = np.maximum([22.0, 4.0, 25.0], 0.55 * np.asarray(grid.spacing))
        box = grid.around(gen, half + 2.0)
        if box is not None:
            sl, X, Y, Z = box
            m = (np.abs(X - gen[0]) < half[0]) & (np.abs(Y - gen[1]) < half[1]) & (np.abs(Z - gen[2]) < half[2])
            cv.paint(sl, m, hu=3000.0, lab=BODY_WALL, les=k)
        lead = [
            gen,
            (A.xm - 45, A.yc + A.bc - 15, A.z_ap - 5),
            (A.xm + 24, A.y_asc, A.z_arch),
            tuple(hc + [30, 0, 0]),
            tuple(hc + [-25, 25, -25]),
        ]
        for p0, p1 in zip(lead[:-1], lead[1:]):
            paint_segment(cv, p0, p1, 1.3, hu=2500.0, les=k)
        return gen
    if kind == "catheter":
        line = [
            (A.xm + 40, A.y_asc - 10, 260.0),
            (A.xm + 28, A.y_asc - 2, A.z_arch + 30),
            (A.xm + 26, A.y_asc, A.heart_c[2] + 0.5 * A.heart_axes[2]),
        ]
        for p0, p1 in zip(line[:-1], line[1:]):
            paint_segment(cv, p0, p1, 1.6, hu=1600.0, les=k)
        return np.asarray(line[1])
    # Sternotomy wires: small dense loops through the sternum.
    y0 = A.yc + A.bc + 5
    for zz in np.linspace(A.z_dL + 20, A.z_ap - 20, 5):
        paint_spot(cv, (A.xm, y0, zz), 4.0, hu=3000.0, les=k)
    return np.array([A.xm, y0, 0.5 * (A.z_dL + A.z_ap)])


def _words_material(f):
    return f["kind"], {}


# ----------------------------------------------------------------------------------------------------------------
# Calcifications
# ----------------------------------------------------------------------------------------------------------------


def _sample_aortic(rng, A, spec):
    return {"n": int(rng.integers(4, 13))}


def _place_aortic(rng, A, params_per_scan, ctx):
    """Curvilinear plaques along the wall of the ascending, arch and descending thoracic aorta."""
    pts = np.array(A.aorta[:7], float)
    spots = []
    for _ in range(12):
        p, d, i = _polyline_point(pts, uniform(rng, 0.12, 0.95))
        r_a = A.aorta_r[min(i, len(A.aorta_r) - 1)]
        perp = np.cross(d, rng.normal(size=3))
        perp /= np.linalg.norm(perp)
        length = uniform(rng, 8, 25)
        c = p + perp * (r_a - 1.0)
        spots.append(
            {
                "p0": c - d * length / 2,
                "p1": c + d * length / 2,
                "r": uniform(rng, *FINDINGS["Arterial wall calcification"].size) / 2,
                "hu": uniform(rng, *FINDINGS["Arterial wall calcification"].hu),
            }
        )
    return {"spots": spots}


def _attach_aortic(params, placement):
    return {**params, "spots": placement["spots"][: params["n"]]}


def _render_aortic(cv: Canvas, A, f, ctx):
    k = LESION_IDS["Arterial wall calcification"]
    ref = None
    for spot in f["spots"]:
        only = (AORTA, MEDIASTINUM, OESOPHAGUS, PLEURA, *LUNG_IDS)
        paint_segment(cv, spot["p0"], spot["p1"], spot["r"], hu=spot["hu"], lab=AORTA, les=k, only=only)
        ref = ref if ref is not None else 0.5 * (np.asarray(spot["p0"]) + np.asarray(spot["p1"]))
    return ref


def _sample_coronary(rng, A, spec):
    return {"n": int(rng.integers(2, 9))}


def _place_coronary(rng, A, params_per_scan, ctx):
    """Plaques on the heart surface along the coronary courses (heart-local directions; each plaque runs a
    short way along the surface)."""
    plaques = []
    for _ in range(8):
        d = np.array([uniform(rng, -0.3, 0.9), uniform(rng, -0.9, 0.9), uniform(rng, 0.0, 0.9)])
        d /= np.linalg.norm(d)
        e = d + rng.normal(0, 0.25, size=3)
        e /= np.linalg.norm(e)
        hu = uniform(rng, *FINDINGS["Coronary artery wall calcification"].hu)
        r = uniform(rng, *FINDINGS["Coronary artery wall calcification"].size) / 2
        plaques.append({"d0": d, "d1": e, "r": r, "hu": hu})
    return {"plaques": plaques}


def _attach_coronary(params, placement):
    return {**params, "plaques": placement["plaques"][: params["n"]]}


def _render_coronary(cv: Canvas, A, f, ctx):
    k = LESION_IDS["Coronary artery wall calcification"]
    hc, haxes, hR = ctx.heart["c"], ctx.heart["axes"], ctx.heart["R"]
    ref = None
    for pl in f["plaques"]:
        p0 = hc + hR @ (np.asarray(pl["d0"]) * haxes)
        p1 = hc + hR @ (np.asarray(pl["d1"]) * haxes)
        only = (HEART, MEDIASTINUM, PLEURA, *LUNG_IDS)
        paint_segment(cv, p0, p1, pl["r"], hu=pl["hu"], lab=HEART, les=k, only=only)
        ref = ref if ref is not None else p0
    return ref


# ----------------------------------------------------------------------------------------------------------------
# Heart and pericardium
# ----------------------------------------------------------------------------------------------------------------


def _sample_cardiomegaly(rng, A, spec):
    """Enlarge the heart until its cardiothoracic ratio reaches a target in `spec.size` (bisection)."""
    target = uniform(rng, *spec.size)
    lo, hi = 1.0, 2.5
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cardiothoracic_ratio(A, mid) < target else (lo, mid)
    return {"scale": 0.5 * (lo + hi), "ratio": target}


def _heart_cardiomegaly(f, heart):
    heart["scale"] = f["scale"]


def _heart_voxels(cv: Canvas, heart, q_max: float, q_min: float = 0.0):
    c, axes, R = heart["c"], heart["axes"], heart["R"]
    box = cv.grid.around(c, max(axes) * q_max * 1.05 + 2)
    if box is None:
        return None, None
    sl, X, Y, Z = box
    q = np.sqrt(ellipsoid_q2(X, Y, Z, c, axes, R))
    return sl, (q < q_max) & (q >= q_min)


def _render_cardiomegaly(cv: Canvas, A, f, ctx):
    sl, m = _heart_voxels(cv, ctx.heart, 1.0)
    if sl is not None:
        cv.paint(sl, m, les=LESION_IDS["Cardiomegaly"], only=(HEART,))
    return ctx.heart["c"]


def _sample_pericardial(rng, A, spec):
    return {"t": uniform(rng, *spec.size), "hu": uniform(rng, *spec.hu)}


def _scale_pericardial(p, k):
    p = _copy(p)
    p["t"] = float(np.clip(p["t"] * k**0.8, 5, 30))
    return p


def _heart_pericardial(f, heart):
    heart["t_pe"] = f["t"]


def _render_pericardial(cv: Canvas, A, f, ctx):
    heart = ctx.heart
    mean_ax = float(np.mean(heart["axes"]))
    sl, m = _heart_voxels(cv, heart, 1.0 + f["t"] / mean_ax, 1.0)
    if sl is not None:
        _, X, Y, Z = (sl, *cv.grid.block(sl))
        allowed = (Z > diaphragm(A, X, Y) - 3) & (cavity_rho(A, X, Y) < 1.0)
        cv.paint(sl, m & allowed, hu=f["hu"], lab=HEART, les=LESION_IDS["Pericardial effusion"])
    return heart["c"] + heart["R"] @ np.array([heart["axes"][0] + f["t"] / 2, 0, 0])


def _words_pericardial(f):
    return "", {"t": int(round(f["t"]))}


# ----------------------------------------------------------------------------------------------------------------
# Mediastinum: hiatal hernia, lymph nodes
# ----------------------------------------------------------------------------------------------------------------


def _sample_hernia(rng, A, spec):
    lo, hi = spec.size
    return {"r": [uniform(rng, lo, hi) / 2, uniform(rng, 0.8 * lo, 0.8 * hi) / 2, uniform(rng, lo, hi) / 2]}


def _place_hernia(rng, A, params_per_scan, ctx):
    r = params_per_scan[0]["r"]
    return {"c": np.array([A.xm - 12, A.y_e + 8, A.z_dL + 0.35 * r[2]]), "air": uniform(rng, 0.1, 0.6)}


def _render_hernia(cv: Canvas, A, f, ctx):
    c, r = np.asarray(f["c"]), np.asarray(f["r"])
    box = cv.grid.around(c, r + 2)
    if box is not None:
        sl, X, Y, Z = box
        q = np.sqrt(ellipsoid_q2(X, Y, Z, c, np.maximum(r, cv.grid.min_radius(1.0))))
        inner = np.where(Y > c[1] + r[1] * (1.0 - 2.0 * f["air"]), -1000.0, 20.0)
        cv.paint(
            sl,
            q < 1.0,
            hu=np.where(q > 0.8, ctx.scan.muscle_hu, inner),
            lab=STOMACH,
            les=LESION_IDS["Hiatal hernia"],
            only=(BODY_WALL, HEART, OESOPHAGUS, LIVER, STOMACH, MEDIASTINUM, PLEURA, ABDOMEN, *LUNG_IDS),
        )
    return c


_NODE_SHIFTS = [np.zeros(3)] + [
    np.array(v, float) * k
    for k in (6.0, 12.0)
    for v in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
]


def _sample_nodes(rng, A, spec):
    k = int(rng.integers(1, 5))
    stations = [str(s) for s in rng.choice(sorted(STATIONS), size=k, replace=False)]
    return {
        "nodes": [{"station": s, "short_axis": uniform(rng, *spec.size)} for s in stations],
        "hu": uniform(rng, *spec.hu),
    }


def _scale_nodes(p, k):
    p = _copy(p)
    for node in p["nodes"]:
        node["short_axis"] = float(np.clip(node["short_axis"] * k ** (1 / 3), 11, 36))
    return p


def _render_nodes(cv: Canvas, A, f, ctx):
    grid = cv.grid
    free = (MEDIASTINUM, PLEURA, *LUNG_IDS)
    hu = _enhanced(FINDINGS["Lymphadenopathy"], f["hu"], ctx)
    ref = None
    for node in f["nodes"]:
        r = node["short_axis"] / 2
        rr = np.maximum(grid.min_radius(r), [r, r, 1.3 * r])
        station = np.asarray(STATIONS[node["station"]](A), float)
        # Nodes sit in fat between the vessels: shift the station point to where the node has most room.
        best, c = -1, station
        for off in _NODE_SHIFTS:
            box = grid.around(station + off, rr + 1)
            if box is None:
                continue
            sl, X, Y, Z = box
            room = int(((ellipsoid_q2(X, Y, Z, station + off, rr) < 1.0) & np.isin(cv.lab[sl], free)).sum())
            if room > best:
                best, c = room, station + off
        box = grid.around(c, rr + 1)
        if box is not None:
            sl, X, Y, Z = box
            cv.paint(
                sl,
                ellipsoid_q2(X, Y, Z, c, rr) < 1.0,
                hu=hu,
                lab=MEDIASTINUM,
                les=LESION_IDS["Lymphadenopathy"],
                only=free,
            )
        ref = ref if ref is not None else c
    return ref


def _words_nodes(f):
    nodes = sorted(f["nodes"], key=lambda n: -n["short_axis"])
    return "", {
        "w": join_words(sorted({n["station"] for n in nodes})),
        "d": int(round(nodes[0]["short_axis"])),
        "b": nodes[0]["station"],
    }


# ----------------------------------------------------------------------------------------------------------------
# Pleura
# ----------------------------------------------------------------------------------------------------------------


def _sample_effusion(rng, A, spec):
    sides = str(rng.choice(["right", "left", "bilateral"], p=[0.4, 0.3, 0.3]))
    sd = ["right", "left"] if sides == "bilateral" else [sides]
    return {"t": {s: uniform(rng, *spec.size) for s in sd}, "hu": uniform(rng, *spec.hu)}


def _scale_effusion(p, k):
    p = _copy(p)
    p["t"] = {side: float(np.clip(t * k, 18, 80)) for side, t in p["t"].items()}
    return p


def effusion_levels(A, params_per_scan) -> dict[str, float]:
    """Patient-frame y below which a lung lesion could meet the fluid, per side (largest effusion of any scan,
    with room for the patient's roll)."""
    out: dict[str, float] = {}
    for p in params_per_scan:
        for side, t in p["t"].items():
            out[side] = max(out.get(side, -1e9), A.yc - A.bc + t + 4 + 0.15 * A.ac)
    return out


def _render_effusion(cv: Canvas, A, f, ctx):
    """Dependent fluid: below a horizontal level in the scanner frame (gravity), deepest at the lung base and
    thinning towards the apex, with a meniscus climbing the lateral chest wall."""
    grid = cv.grid
    sl0, X, Y, Z = grid.full()
    k = LESION_IDS["Pleural effusion"]
    floor = grid.cos * A.yc - math.hypot(grid.sin * A.ac, grid.cos * A.bc)  # lowest point of the cavity
    frac = np.clip((Z - A.z_dR) / (A.z_ap - A.z_dR), 0.0, 1.0)
    rho = None
    ref = None
    for side, t in f["t"].items():
        tz = t * (1.0 - 0.55 * frac)
        if rho is None:
            rho = cavity_rho(A, X, Y)
        sidemask = (X > A.xm) if side == "right" else (X < A.xm)
        fluid = (grid.Ys < floor + tz) | ((rho > 1.0 - 0.35 * tz / A.ac) & (grid.Ys < floor + 1.8 * tz))
        ids = (RIGHT_LOBES if side == "right" else LEFT_LOBES) + (PLEURA,)
        cv.paint(sl0, sidemask & fluid, hu=f["hu"], lab=PLEURA, les=k, only=ids)
        ref = np.array([A.xm + (0.55 if side == "right" else -0.55) * A.ac, A.yc - A.bc + 6, A.z_dR + 10])
    return ref


def _words_effusion(f):
    sides = sorted(f["t"])
    t = int(round(max(f["t"].values())))
    size = "small" if t < 30 else ("moderate" if t < 50 else "large")
    kw = {"z": size, "t": t, "sd": sides[0], "Sd": sides[0].capitalize()}
    return ("bilateral" if len(sides) == 2 else "unilateral"), kw


# ----------------------------------------------------------------------------------------------------------------
# Diffuse lung patterns: mosaic attenuation, emphysema, septal thickening
# ----------------------------------------------------------------------------------------------------------------


def _sample_mosaic(rng, A, spec):
    return {"thr": uniform(rng, -0.3, 0.3), "low": uniform(rng, 40, 80), "high": uniform(rng, 70, 130)}


def _render_mosaic(cv: Canvas, A, f, ctx):
    """Geographic patches: denser (hyperperfused) lung next to lucent lung (air trapping) whose density stays
    above emphysema's (-930 HU) and keeps its vessels."""
    sl0 = (slice(None),) * 3
    lung = cv.region(LUNG_IDS)
    nm = ctx.bank.sample_grid("mosaic", cv.grid, step=12.0, passes=2)
    low = lung & (nm < f["thr"])
    cv.paint(sl0, lung & ~low, hu=cv.hu + f["high"])
    cv.paint(sl0, low, hu=np.maximum(cv.hu - f["low"], -930.0), les=LESION_IDS["Mosaic attenuation pattern"])
    return np.array([A.xm + 0.5 * A.ac, A.yc, A.z_car - 40])


def _sample_emphysema(rng, A, spec):
    return {"thr0": uniform(rng, -0.35, 0.3), "hu": uniform(rng, *spec.hu)}


def _place_emphysema(rng, A, params_per_scan, ctx):
    bullae = []
    for _ in range(int(rng.integers(1, 4))):
        lobe = int(rng.choice((2, 5)))
        r = uniform(rng, *FINDINGS["Emphysema"].size) / 2
        bullae.append({"lobe": lobe, "c": sample_in_lobe(rng, A, lobe, 8.0), "r": r})
    return {"bullae": bullae}


def _render_emphysema(cv: Canvas, A, f, ctx):
    """Low-attenuation clusters without walls, upper-zone predominant, and bullae."""
    sl0, X, Y, Z = cv.grid.full()
    k = LESION_IDS["Emphysema"]
    lung = cv.region(LUNG_IDS)
    ne = ctx.bank.sample_grid("emphysema", cv.grid, step=12.0, passes=1)
    zfrac = np.clip((A.z_ap - Z) / (A.z_ap - A.z_dR), 0, 1)
    cv.paint(sl0, lung & (ne > f["thr0"] + 0.8 * zfrac), hu=f["hu"], les=k)
    ref = None
    for b in f["bullae"]:
        paint_spot(cv, b["c"], b["r"], hu=-995.0, les=k, only=LUNG_IDS)
        ref = ref if ref is not None else np.asarray(b["c"])
    return ref


def _sample_septal(rng, A, spec):
    return {"depth": uniform(rng, *spec.size), "hu": uniform(rng, *spec.hu)}


def _render_septal(cv: Canvas, A, f, ctx):
    sl0, X, Y, Z = cv.grid.full()
    lower = (RIGHT_LOBES[-1], LEFT_LOBES[-1])
    rho = cavity_rho(A, X, Y)
    sub = (rho < 1.0) & (rho > 1.0 - f["depth"] / (0.5 * (A.ac + A.bc))) & cv.region(lower)
    ns = ctx.bank.sample_grid("septal", cv.grid, step=4.0, passes=1)
    lines = sub & (np.abs(ns) < 0.18) & ~cv.airway_wall & ~cv.airway_lumen
    cv.paint(sl0, lines, hu=f["hu"], les=LESION_IDS["Interlobular septal thickening"])
    return np.array([A.xm + 0.8 * A.ac, A.yc - 0.3 * A.bc, A.z_dR - 5])


# ----------------------------------------------------------------------------------------------------------------
# Airways
# ----------------------------------------------------------------------------------------------------------------


def _sample_peribronchial(rng, A, spec):
    return {"wall": uniform(rng, *spec.size)}


def _render_peribronchial(cv: Canvas, A, f, ctx):
    """Thick walls around the lobar, segmental and subsegmental bronchi of both lungs (lumens kept)."""
    k = LESION_IDS["Peribronchial thickening"]
    ref = None
    for p0, p1, r0, r1, lobe, _gen in A.bronchi:
        for sl, m in tube_masks(cv.grid, [p0, p1], [r0, r1], extra=f["wall"]):
            painted = cv.paint(sl, m & ~cv.airway_lumen[sl], hu=ctx.scan.muscle_hu - 10.0, les=k, only=(lobe,))
            cv.airway_wall[sl] |= painted
        ref = ref if ref is not None else np.asarray(p1)
    return ref


def _sample_bronchiectasis(rng, A, spec):
    return {"factor": uniform(rng, *spec.size)}


def _place_bronchiectasis(rng, A, params_per_scan, ctx):
    return {"lobe": int(rng.choice((4, 6, 3, 5), p=[0.35, 0.35, 0.15, 0.15]))}


def _render_bronchiectasis(cv: Canvas, A, f, ctx):
    """Dilated, non-tapering bronchi (wider than their arteries) with thick walls in one lobe."""
    k = LESION_IDS["Bronchiectasis"]
    tubes = []
    for p0, p1, r0, r1, lobe, gen in A.bronchi:
        if lobe != f["lobe"] or gen < 3:
            continue
        r = max(r0, r1) * f["factor"]
        tubes.append((tube_masks(cv.grid, [p0, p1], r, extra=2.0), tube_masks(cv.grid, [p0, p1], r), p1))
    ref = None
    for walls, _, p1 in tubes:
        for sl, m in walls:
            cv.airway_wall[sl] |= cv.paint(
                sl, m & ~cv.airway_lumen[sl], hu=ctx.scan.muscle_hu - 10.0, les=k, only=(f["lobe"],)
            )
        ref = ref if ref is not None else np.asarray(p1)
    for _, lumens, _ in tubes:
        for sl, m in lumens:
            cv.airway_lumen[sl] |= cv.paint(sl, m, hu=-990.0, les=k, only=(f["lobe"],))
    return ref


# ----------------------------------------------------------------------------------------------------------------
# Focal lung lesions
# ----------------------------------------------------------------------------------------------------------------


def _sample_fibrotic(rng, A, spec):
    return {"scar": uniform(rng, *spec.size) / 2, "hu": uniform(rng, *spec.hu)}


def _place_fibrotic(rng, A, params_per_scan, ctx):
    lobe = int(rng.choice((2, 5, 4, 6), p=[0.35, 0.35, 0.15, 0.15]))
    c = sample_in_lobe(rng, A, lobe, 14.0, _y_min(ctx, lobe))
    strands = []
    for _ in range(int(rng.integers(4, 9))):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        strands.append((c + d * uniform(rng, 2, 8), c + d * uniform(rng, 20, 40), uniform(rng, 1.6, 2.6)))
    return {"lobe": lobe, "c": c, "strands": strands}


def _render_fibrotic(cv: Canvas, A, f, ctx):
    k = LESION_IDS["Pulmonary fibrotic sequela"]
    for p0, p1, r in f["strands"]:
        rr = max(r, 0.55 * max(cv.grid.spacing[:2]))
        for sl, m in tube_masks(cv.grid, [p0, p1], rr):
            cv.paint(sl, m, hu=f["hu"], les=k, only=(f["lobe"],))
    paint_spot(cv, f["c"], f["scar"], hu=f["hu"] + 15.0, les=k, only=(f["lobe"],))
    return np.asarray(f["c"])


def _sample_opacity(rng, A, spec):
    return {"r": uniform(rng, *spec.size) / 2, "hu": uniform(rng, *spec.hu)}


def _scale_radius(lo: float, hi: float):
    def scale(p, k):
        p = _copy(p)
        p["r"] = float(np.clip(p["r"] * k ** (1 / 3), lo, hi))
        return p

    return scale


def _place_opacity(rng, A, params_per_scan, ctx):
    lobes = [int(v) for v in rng.choice(LUNG_IDS, size=int(rng.integers(1, 4)), replace=False)]
    return {"blobs": [{"lobe": lb, "c": sample_in_lobe(rng, A, lb, 10.0, _y_min(ctx, lb))} for lb in lobes]}


def _attach_opacity(params, placement):
    return {**params, "blobs": [{**b, "r": params["r"]} for b in placement["blobs"]]}


def _render_opacity(cv: Canvas, A, f, ctx):
    """Ground glass: hazy density raised towards `hu` (vessels stay visible through it), soft edges."""
    ref = None
    for b in f["blobs"]:
        c, r = np.asarray(b["c"]), b["r"]
        box = cv.grid.around(c, 1.45 * r + 2)
        if box is None:
            continue
        sl, X, Y, Z = box
        nl = ctx.bank.sample_grid("lobulation", cv.grid, sl=sl, step=6.0, passes=1)
        d = np.sqrt(ellipsoid_q2(X, Y, Z, c, (r, r, r))) * (1.0 + 0.18 * nl)
        w = np.clip((1.35 - d) / 0.7, 0.0, 1.0)
        inlobe = cv.lab[sl] == b["lobe"]
        cur = cv.hu[sl]
        target = f["hu"] + 30.0 * nl
        cv.paint(sl, inlobe & (w > 0) & ~cv.airway_lumen[sl], hu=np.maximum(cur, cur * (1 - w) + target * w))
        cv.paint(sl, inlobe & (w >= 0.5), les=LESION_IDS["Lung opacity"])
        ref = ref if ref is not None else c
    return ref


def _words_opacity(f):
    return "", {"w": lobe_list([b["lobe"] for b in f["blobs"]])}


def _sample_atelectasis(rng, A, spec):
    lo, hi = spec.size
    return {"th": uniform(rng, 8, 14), "ext": uniform(rng, lo, hi) / 2, "hu": uniform(rng, *spec.hu)}


def _scale_atelectasis(p, k):
    p = _copy(p)
    p["ext"] = float(np.clip(p["ext"] * k**0.5, 15, 70))
    return p


def _place_atelectasis(rng, A, params_per_scan, ctx):
    lobe = int(rng.choice((3, 4, 6, 5), p=[0.2, 0.35, 0.35, 0.1]))
    n = np.array([uniform(rng, -0.3, 0.3), uniform(rng, 0.2, 0.5), 1.0])
    return {"lobe": lobe, "c": sample_in_lobe(rng, A, lobe, 10.0, _y_min(ctx, lobe)), "n": n / np.linalg.norm(n)}


def _render_atelectasis(cv: Canvas, A, f, ctx):
    """A plate of collapsed lung (soft tissue), roughly horizontal, confined to its lobe."""
    c, n = np.asarray(f["c"]), np.asarray(f["n"])
    box = cv.grid.around(c, f["ext"] + 2)
    if box is not None:
        sl, X, Y, Z = box
        dpl = np.abs((X - c[0]) * n[0] + (Y - c[1]) * n[1] + (Z - c[2]) * n[2])
        half = max(f["th"] / 2, 0.55 * float(np.max(np.abs(n) * np.asarray(cv.grid.spacing))))
        dd = np.sqrt(ellipsoid_q2(X, Y, Z, c, (1.0, 1.0, 1.0)))
        hu = _enhanced(FINDINGS["Atelectasis"], f["hu"], ctx)
        cv.paint(sl, (dpl < half) & (dd < f["ext"]), hu=hu, les=LESION_IDS["Atelectasis"], only=(f["lobe"],))
    return c


def _sample_consolidation(rng, A, spec):
    return {"r": uniform(rng, *spec.size) / 2, "hu": uniform(rng, *spec.hu)}


def _place_consolidation(rng, A, params_per_scan, ctx):
    lobe = int(rng.choice(LUNG_IDS, p=[0.15, 0.15, 0.3, 0.15, 0.25]))
    c = sample_in_lobe(rng, A, lobe, 10.0, _y_min(ctx, lobe))
    # Patchy: a few overlapping lobules around the centre, pushed towards the pleura as pneumonia is.
    lobs = [{"d": rng.normal(0, 0.45, size=3), "k": uniform(rng, 0.45, 0.8)} for _ in range(int(rng.integers(2, 5)))]
    return {"lobe": lobe, "c": c, "lobules": lobs}


def _render_consolidation(cv: Canvas, A, f, ctx):
    """Lung replaced by soft tissue within one lobe (lobular, patchy margins), air bronchograms kept."""
    c, r = np.asarray(f["c"]), f["r"]
    k = LESION_IDS["Consolidation"]
    box = cv.grid.around(c, 1.9 * r + 2)
    if box is not None:
        sl, X, Y, Z = box
        nl = ctx.bank.sample_grid("lobulation", cv.grid, sl=sl, step=6.0, passes=1)
        m = np.sqrt(ellipsoid_q2(X, Y, Z, c, (r, r, r))) * (1.0 + 0.2 * nl) < 1.0
        for lob in f["lobules"]:
            cl = c + np.asarray(lob["d"]) * r
            m |= np.sqrt(ellipsoid_q2(X, Y, Z, cl, (lob["k"] * r,) * 3)) * (1.0 + 0.2 * nl) < 1.0
        m &= cv.lab[sl] == f["lobe"]
        hu = _enhanced(FINDINGS["Consolidation"], f["hu"], ctx) + 8.0 * nl
        lumen = cv.airway_lumen[sl]
        cv.paint(sl, m & ~lumen, hu=hu, les=k)
        cv.paint(sl, m & lumen, les=k)  # air bronchograms
    return c


def _sample_nodules(rng, A, spec):
    k = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.35, 0.2, 0.15]))
    return {"r": [uniform(rng, *spec.size) / 2 for _ in range(k)], "hu": uniform(rng, *spec.hu)}


def _scale_nodules(p, k):
    p = _copy(p)
    p["r"] = [float(np.clip(r * k ** (1 / 3), 5.0, 16.0)) for r in p["r"]]
    return p


def _place_nodules(rng, A, params_per_scan, ctx):
    n = max(len(p["r"]) for p in params_per_scan)
    r_max = [max(p["r"][i] for p in params_per_scan if i < len(p["r"])) for i in range(n)]
    nods = []
    for r in r_max:
        lobe = int(rng.choice(LUNG_IDS, p=[0.26, 0.1, 0.22, 0.24, 0.18]))
        nods.append({"lobe": lobe, "c": sample_in_lobe(rng, A, lobe, r + 3, _y_min(ctx, lobe))})
    return {"nodules": nods}


def _attach_nodules(params, placement):
    nods = placement["nodules"]
    return {**params, "nodules": [{**nods[i], "r": r} for i, r in enumerate(params["r"])]}


def _render_nodules(cv: Canvas, A, f, ctx):
    """Round, slightly lobulated soft-tissue nodules surrounded by aerated lung."""
    hu = _enhanced(FINDINGS["Lung nodule"], f["hu"], ctx)
    ref = None
    for nod in f["nodules"]:
        c, r = np.asarray(nod["c"]), nod["r"]
        rr = cv.grid.min_radius(r)
        box = cv.grid.around(c, 1.2 * rr + 2)
        if box is None:
            continue
        sl, X, Y, Z = box
        nl = ctx.bank.sample_grid("lobulation", cv.grid, sl=sl, step=6.0, passes=1)
        m = np.sqrt(ellipsoid_q2(X, Y, Z, c, rr)) * (1.0 + 0.1 * nl) < 1.0
        cv.paint(sl, m, hu=hu + 6.0 * nl, les=LESION_IDS["Lung nodule"], only=(nod["lobe"],))
        ref = ref if ref is not None else c
    return ref


def _words_nodules(f):
    nods = f["nodules"]
    largest = max(int(round(2 * n["r"])) for n in nods)
    fields = {"w": lobe_list([n["lobe"] for n in nods]), "m": largest, "s": "s" if len(nods) > 1 else ""}
    if len(nods) == 1:
        return "single", {**fields, "d": int(round(2 * nods[0]["r"]))}
    sizes = ", ".join(f"{int(round(2 * n['r']))} mm in the {LOBE_NAMES[n['lobe']]}" for n in nods)
    return "multiple", {**fields, "sizes": sizes}


# ----------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------

_BODY = (BODY_WALL, *LUNG_IDS, HEART, AORTA, PULMONARY_ARTERY, TRACHEA, OESOPHAGUS, RIBS, STERNUM, MEDIASTINUM, PLEURA)

_TABLE = [
    FindingSpec(
        name="Medical material",
        what="pacemaker (generator + lead), central venous catheter or sternotomy wires",
        regions=_BODY,
        hu=(1600, 3000),
        size=(3.6, 50),
        size_of="wire diameter to generator length",
        visible_at="32x64x64 (pacemaker, wires; a lone catheter is a thin line that partial volume dims to a few "
        "hundred HU there, clear from 48x128x128), any window; streaks around metal",
        prevalence=0.15,
        layer=62,
        sized=False,
        sample=_sample_material,
        render=_render_material,
        words=_words_material,
        positive={
            "pacemaker": (
                "A cardiac pacemaker is seen in the left pectoral region with its lead extending into the right "
                "heart chambers{c}.",
                "Pacemaker generator in the left anterior chest wall, lead tip in the right ventricle{c}.",
            ),
            "catheter": (
                "A central venous catheter is observed with its tip in the superior vena cava{c}.",
                "Central venous catheter in place, its tip at the cavoatrial junction{c}.",
            ),
            "sternotomy": (
                "Sternotomy wires are observed in the sternum{c}.",
                "Median sternotomy wires are present{c}.",
            ),
        },
        impression={
            "pacemaker": "Cardiac pacemaker{c}.",
            "catheter": "Central venous catheter{c}.",
            "sternotomy": "Postoperative sternotomy wires{c}.",
        },
        keywords=r"pacemaker|catheter|sternotomy|medical material",
        section="mediastinum",
        appearance="a very dense (metallic, over 1000 HU) linear or box-shaped object, often with streak artefacts",
        where="chest wall and mediastinum",
        window="mediastinum",
        resolved="medical material",
    ),
    FindingSpec(
        name="Arterial wall calcification",
        what="4-12 curvilinear calcified plaques (5-8 mm thick, 8-25 mm long) in the wall of the thoracic aorta",
        regions=(AORTA,),
        hu=(800, 1500),
        size=(5, 8),
        size_of="plaque thickness",
        visible_at="32x64x64 as bright spots on the aortic wall (peak about 440 HU there, 1100 at 48x128x128), "
        "mediastinal window; least conspicuous against 230-450 HU blood in the arterial phase",
        prevalence=0.35,
        layer=61,
        sized=False,
        sample=_sample_aortic,
        place=_place_aortic,
        attach=_attach_aortic,
        render=_render_aortic,
        words=_no_words,
        positive={
            "": (
                "Calcific atherosclerotic plaques are observed in the wall of the thoracic aorta{c}.",
                "Atherosclerotic calcifications are seen in the aortic arch and descending aorta{c}.",
                "Calcified atheroma plaques are present in the thoracic aorta{c}.",
            )
        },
        impression={"": "Atherosclerotic calcification of the thoracic aorta{c}."},
        keywords=r"(?=.*aort)(?=.*(calcif|atheroscler|atherom))",
        section="mediastinum",
        appearance="bright (over 400 HU) calcific foci in the wall of the aorta",
        where="thoracic aorta",
        window="mediastinum",
        negative=("No calcific atheroma was observed in the thoracic aorta.",),
        p_negative=0.5,
        resolved="aortic calcification",
    ),
    FindingSpec(
        name="Cardiomegaly",
        what="heart enlarged to a cardiothoracic ratio of 0.54-0.68 (normal hearts stay at or below 0.46)",
        regions=(HEART,),
        hu=(30, 450),
        size=(0.54, 0.68),
        size_of="cardiothoracic ratio (a ratio, not mm)",
        visible_at="32x64x64, any window",
        prevalence=0.30,
        layer=10,
        sized=False,
        sample=_sample_cardiomegaly,
        heart=_heart_cardiomegaly,
        render=_render_cardiomegaly,
        words=_no_words,
        positive={
            "": (
                "Cardiomegaly is present{c}.",
                "The heart is enlarged (cardiomegaly){c}.",
                "The heart is enlarged, consistent with cardiomegaly{c}.",
            )
        },
        impression={"": "Cardiomegaly{c}."},
        keywords=r"cardiomegaly|heart size|heart is enlarged|cardiothoracic",
        section="mediastinum",
        appearance="a heart whose transverse diameter exceeds half of the thoracic diameter",
        where="heart",
        window="mediastinum",
        negative=("Heart size is normal.",),
    ),
    FindingSpec(
        name="Pericardial effusion",
        what="a rim of fluid (0-20 HU, 8-22 mm) around the heart inside the pericardium",
        regions=(HEART,),
        hu=(0, 20),
        size=(8, 22),
        size_of="rim thickness",
        visible_at="32x64x64, mediastinal window (a fluid rim between myocardium and fat; clearest with contrast)",
        prevalence=0.20,
        layer=11,
        sized=True,
        sample=_sample_pericardial,
        scale=_scale_pericardial,
        heart=_heart_pericardial,
        render=_render_pericardial,
        words=_words_pericardial,
        positive={
            "": (
                "Pericardial effusion reaching {t} mm in thickness is observed{c}.",
                "There is pericardial effusion with a maximum thickness of {t} mm{c}.",
            )
        },
        impression={"": "Pericardial effusion{c}."},
        keywords=r"pericardial effusion|pericardial fluid",
        section="mediastinum",
        appearance="a rim of fluid density (0 to 20 HU) surrounding the heart inside the pericardium",
        where="pericardium",
        window="mediastinum",
        negative=("No pericardial effusion was detected.",),
    ),
    FindingSpec(
        name="Coronary artery wall calcification",
        what="2-8 calcified plaques (5-8 mm thick, 5-20 mm long) on the heart surface along the coronaries",
        regions=(HEART,),
        hu=(900, 1600),
        size=(5, 8),
        size_of="plaque thickness",
        visible_at="32x64x64 as faint bright spots on the heart (peak about 430 HU), conspicuous from 48x128x128 "
        "(about 800 HU), mediastinal window; masked by arterial-phase blood",
        prevalence=0.30,
        layer=60,
        sized=False,
        sample=_sample_coronary,
        place=_place_coronary,
        attach=_attach_coronary,
        render=_render_coronary,
        words=_no_words,
        positive={
            "": (
                "Calcific plaques are observed in the coronary arteries{c}.",
                "Coronary artery calcifications are present{c}.",
                "Calcification is seen along the course of the coronary arteries{c}.",
            )
        },
        impression={"": "Coronary artery calcification{c}."},
        keywords=r"coronary",
        section="mediastinum",
        appearance="bright calcific foci along the coronary arteries on the heart surface",
        where="coronary arteries",
        window="mediastinum",
        negative=("No coronary artery calcification was observed.",),
        p_negative=0.5,
        resolved="coronary calcification",
    ),
    FindingSpec(
        name="Hiatal hernia",
        what="an air- and fluid-containing sac (40-68 mm) above the hiatus beside the oesophagus",
        regions=(STOMACH,),
        hu=(-1000, 45),
        size=(40, 68),
        size_of="sac diameter",
        visible_at="32x64x64, mediastinal or lung window",
        prevalence=0.18,
        layer=20,
        sized=False,
        sample=_sample_hernia,
        place=_place_hernia,
        render=_render_hernia,
        words=_no_words,
        positive={
            "": (
                "A hiatal hernia containing air and fluid is observed above the diaphragm{c}.",
                "Hiatal hernia is present at the lower end of the esophagus{c}.",
            )
        },
        impression={"": "Hiatal hernia{c}."},
        keywords=r"hiatal hernia|hiatus hernia",
        section="mediastinum",
        appearance="an air- and fluid-containing structure above the diaphragm next to the esophagus",
        where="esophageal hiatus",
        window="mediastinum",
        negative=("Thoracic esophagus calibration was normal.", "No hiatal hernia was observed."),
    ),
    FindingSpec(
        name="Lymphadenopathy",
        what="1-4 enlarged nodes (15-28 mm short axis) at named mediastinal/hilar stations",
        regions=(MEDIASTINUM,),
        hu=(35, 55),
        size=(15, 28),
        size_of="short-axis diameter",
        visible_at="32x64x64, mediastinal window (against fat; told from vessels only with contrast)",
        prevalence=0.25,
        layer=21,
        sized=True,
        sample=_sample_nodes,
        scale=_scale_nodes,
        render=_render_nodes,
        words=_words_nodes,
        positive={
            "": (
                "Lymph nodes of pathological size are observed in the {w} stations, the largest {d} mm in short axis "
                "in the {b} station{c}.",
                "Mediastinal lymphadenopathy is present ({w}), the largest lymph node measuring {d} mm in short axis "
                "in the {b} station{c}.",
            )
        },
        impression={"": "Mediastinal lymphadenopathy{c}."},
        keywords=r"lymph node|lymphadenopathy",
        section="mediastinum",
        appearance="round soft-tissue nodes larger than 10 mm in short axis in the mediastinum",
        where="mediastinum",
        window="mediastinum",
        enhancement=0.8,
        negative=(
            "No lymph nodes of pathological size and appearance were detected in the mediastinum or hilar regions.",
            "No enlarged lymph nodes were observed in the mediastinum.",
        ),
    ),
    FindingSpec(
        name="Emphysema",
        what="wall-less low-attenuation areas (-1005 to -960 HU), upper-zone predominant, 1-3 bullae, "
        "flattened diaphragm",
        regions=LUNG_IDS,
        hu=(-1005, -960),
        size=(20, 44),
        size_of="bulla diameter",
        visible_at="32x64x64, low-attenuation window (about -1050..-750 HU)",
        prevalence=0.30,
        layer=32,
        sized=False,
        sample=_sample_emphysema,
        place=_place_emphysema,
        render=_render_emphysema,
        words=_no_words,
        positive={
            "": (
                "Centrilobular and paraseptal emphysematous changes are observed in both lungs, more prominent in "
                "the upper lobes{c}.",
                "Emphysema is present in both lungs, predominantly in the upper zones, with bullae{c}.",
            )
        },
        impression={"": "Emphysema{c}."},
        keywords=r"emphysem",
        section="lungs",
        appearance="areas of very low attenuation (about -970 HU) without visible walls in the lungs",
        where="both lungs",
        window="lung",
        negative=("No emphysema was observed.",),
        p_negative=0.4,
    ),
    FindingSpec(
        name="Atelectasis",
        what="a plate of collapsed lung (8-14 mm thick, 30-60 mm across) in one lobe",
        regions=LUNG_IDS,
        hu=(10, 40),
        size=(30, 60),
        size_of="plate extent",
        visible_at="32x64x64, lung window (a soft-tissue plate in aerated lung)",
        prevalence=0.25,
        layer=54,
        sized=True,
        sample=_sample_atelectasis,
        scale=_scale_atelectasis,
        place=_place_atelectasis,
        render=_render_atelectasis,
        words=_lobe_words,
        positive={
            "": (
                "Linear plate-like atelectasis is seen in the {w}{c}.",
                "Subsegmental atelectasis is observed in the {w}{c}.",
            )
        },
        impression={"": "Atelectasis in the {w}{c}."},
        keywords=r"atelecta",
        section="lungs",
        appearance="a linear band of soft-tissue density within the lung",
        where=None,
        window="lung",
        enhancement=0.5,
        negative=("No atelectasis was observed.",),
        p_negative=0.2,
    ),
    FindingSpec(
        name="Lung nodule",
        what="1-4 solid, slightly lobulated nodules (14-30 mm) surrounded by aerated lung",
        regions=LUNG_IDS,
        hu=(20, 60),
        size=(14, 30),
        size_of="diameter",
        visible_at="32x64x64, lung window (a 14 mm nodule is 2-3 voxels across there, 4+ at 48x128x128)",
        prevalence=0.35,
        layer=56,
        sized=True,
        sample=_sample_nodules,
        scale=_scale_nodules,
        place=_place_nodules,
        attach=_attach_nodules,
        render=_render_nodules,
        words=_words_nodules,
        positive={
            "single": (
                "A solid nodule measuring {d} mm is seen in the {w}{c}.",
                "There is a {d} mm soft-tissue nodule in the {w}{c}.",
            ),
            "multiple": ("Multiple solid nodules are observed ({sizes}){c}.",),
        },
        impression={
            "single": "Pulmonary nodule in the {w}, the largest {m} mm{c}.",
            "multiple": "Pulmonary nodules in the {w}, the largest {m} mm{c}.",
        },
        keywords=r"nodul",
        section="lungs",
        appearance="a round soft-tissue density surrounded by aerated lung",
        where=None,
        window="lung",
        enhancement=0.5,
        negative=(
            "No mass or nodule was detected in either lung.",
            "No nodular lesion was observed in the lung parenchyma.",
        ),
    ),
    FindingSpec(
        name="Lung opacity",
        what="1-3 ground-glass patches (36-70 mm, -650 to -400 HU) with vessels visible through them",
        regions=LUNG_IDS,
        hu=(-650, -400),
        size=(36, 70),
        size_of="patch diameter",
        visible_at="32x64x64, lung window (about 350 HU above the lung, vessels kept)",
        prevalence=0.25,
        layer=53,
        sized=True,
        sample=_sample_opacity,
        scale=_scale_radius(12, 45),
        place=_place_opacity,
        attach=_attach_opacity,
        render=_render_opacity,
        words=_words_opacity,
        positive={
            "": (
                "Ground-glass opacities are observed in the {w}{c}.",
                "Patchy ground-glass densities are seen in the {w}{c}.",
            )
        },
        impression={"": "Ground-glass opacities in the {w}{c}."},
        keywords=r"ground-glass|opacit",
        section="lungs",
        appearance="hazy increased lung density (about -500 HU) through which vessels remain visible",
        where=None,
        window="lung",
        negative=("No ground-glass opacity was observed.",),
        resolved="ground-glass opacities",
    ),
    FindingSpec(
        name="Pulmonary fibrotic sequela",
        what="a scar (12-20 mm) with 4-8 irregular strands (3-5 mm thick, 20-40 mm long), mostly upper lobes",
        regions=LUNG_IDS,
        hu=(-60, 40),
        size=(12, 20),
        size_of="scar diameter",
        visible_at="32x64x64 (the scar), lung window; the strands from 48x128x128",
        prevalence=0.25,
        layer=52,
        sized=False,
        sample=_sample_fibrotic,
        place=_place_fibrotic,
        render=_render_fibrotic,
        words=_lobe_words,
        positive={
            "": (
                "Fibrotic sequelae with linear densities are observed in the {w}{c}.",
                "Sequelae fibrotic changes are seen in the {w}{c}.",
            )
        },
        impression={"": "Fibrotic sequelae in the {w}{c}."},
        keywords=r"fibrotic|fibrosis",
        section="lungs",
        appearance="irregular linear densities with volume loss",
        where=None,
        window="lung",
        resolved="fibrotic sequelae",
    ),
    FindingSpec(
        name="Pleural effusion",
        what="dependent fluid (0-25 HU) with a horizontal level and a lateral meniscus, 20-60 mm deep at the base",
        regions=(PLEURA,),
        hu=(0, 25),
        size=(20, 60),
        size_of="depth at the lung base",
        visible_at="32x64x64, mediastinal window",
        prevalence=0.30,
        layer=30,
        sized=True,
        sample=_sample_effusion,
        scale=_scale_effusion,
        render=_render_effusion,
        words=_words_effusion,
        positive={
            "bilateral": (
                "Bilateral {z} pleural effusion is observed, measuring up to {t} mm in thickness{c}.",
                "There is {z} pleural effusion in both hemithoraces, up to {t} mm thick{c}.",
            ),
            "unilateral": (
                "A {z} pleural effusion measuring {t} mm in thickness is observed in the {sd} hemithorax{c}.",
                "{Sd} {z} pleural effusion is present, {t} mm thick{c}.",
            ),
        },
        impression={"bilateral": "Bilateral pleural effusion{c}.", "unilateral": "{Sd} pleural effusion{c}."},
        keywords=r"pleural effusion|pleural fluid",
        section="pleura",
        appearance="dependent fluid density (about 10 HU) layering posteriorly in the pleural space",
        where=None,
        window="mediastinum",
        negative=(
            "No pleural effusion or pneumothorax was detected.",
            "There is no pleural effusion or pneumothorax.",
        ),
    ),
    FindingSpec(
        name="Mosaic attenuation pattern",
        what="geographic patches of denser (70-130 HU above) and lucent (40-80 HU below, not under -930 HU) lung",
        regions=LUNG_IDS,
        hu=(-930, -650),
        size=(20, 60),
        size_of="patch size",
        visible_at="32x64x64 as patches 110-210 HU apart, lung or low-attenuation window; subtle (no sharp edges)",
        prevalence=0.18,
        layer=31,
        sized=False,
        sample=_sample_mosaic,
        render=_render_mosaic,
        words=_no_words,
        positive={
            "": (
                "A mosaic attenuation pattern is observed in both lungs{c}.",
                "Both lungs show mosaic attenuation with geographic areas of low density{c}.",
            )
        },
        impression={"": "Mosaic attenuation pattern{c}."},
        keywords=r"mosaic",
        section="lungs",
        appearance="geographic patches of lower and higher lung density",
        where="both lungs",
        window="lung",
    ),
    FindingSpec(
        name="Peribronchial thickening",
        what="thick walls (3-5 mm) around the lobar to subsegmental bronchi of both lungs",
        regions=LUNG_IDS,
        hu=(20, 50),
        size=(3, 5),
        size_of="wall thickness",
        visible_at="32x64x64 as denser bronchovascular bundles (drawn walls are point-sampled, so coarse grids keep "
        "more of them than a real scan would); the walls themselves from 64x192x192",
        prevalence=0.20,
        layer=41,
        sized=False,
        sample=_sample_peribronchial,
        render=_render_peribronchial,
        words=_no_words,
        positive={
            "": (
                "Peribronchial thickening is observed in both lungs{c}.",
                "Bronchial wall thickening (peribronchial thickening) is present bilaterally{c}.",
            )
        },
        impression={"": "Peribronchial thickening{c}."},
        keywords=r"peribronchial|bronchial wall thickening",
        section="lungs",
        appearance="thickened bronchial walls",
        where="bronchi of both lungs",
        window="lung",
    ),
    FindingSpec(
        name="Consolidation",
        what="lung replaced by soft tissue (20-50 HU) over 60-110 mm of one lobe, patchy margins, air bronchograms",
        regions=LUNG_IDS,
        hu=(20, 50),
        size=(60, 110),
        size_of="extent",
        visible_at="32x64x64, lung or mediastinal window",
        prevalence=0.30,
        layer=55,
        sized=True,
        sample=_sample_consolidation,
        scale=_scale_radius(15, 70),
        place=_place_consolidation,
        render=_render_consolidation,
        words=_lobe_words,
        positive={
            "": (
                "Consolidation with air bronchograms is observed in the {w}{c}.",
                "There is an area of consolidation in the {w}{c}.",
                "Pneumonic consolidation is seen in the {w}{c}.",
            )
        },
        impression={"": "Consolidation in the {w}{c}."},
        keywords=r"consolidat",
        section="lungs",
        appearance="lung replaced by soft-tissue density (0 to 50 HU) with air bronchograms",
        where=None,
        window="lung",
        enhancement=0.6,
        negative=("No consolidation was observed.",),
    ),
    FindingSpec(
        name="Bronchiectasis",
        what="bronchi dilated 2.2-3x (wider than their arteries, not tapering) with thick walls in one lobe",
        regions=LUNG_IDS,
        hu=(-1000, 40),
        size=(2.2, 3.0),
        size_of="dilatation factor of the segmental and subsegmental bronchi",
        visible_at="32x96x96 (dilated air tubes with walls), lung window",
        prevalence=0.18,
        layer=42,
        sized=False,
        sample=_sample_bronchiectasis,
        place=_place_bronchiectasis,
        render=_render_bronchiectasis,
        words=_lobe_words,
        positive={
            "": (
                "Cylindrical bronchiectasis is observed in the {w}{c}.",
                "Bronchiectatic changes are seen in the {w}{c}.",
            )
        },
        impression={"": "Bronchiectasis in the {w}{c}."},
        keywords=r"bronchiectasis|bronchiectatic",
        section="lungs",
        appearance="dilated bronchi wider than the accompanying arteries",
        where=None,
        window="lung",
        negative=("No bronchiectasis was observed.",),
        p_negative=0.2,
    ),
    FindingSpec(
        name="Interlobular septal thickening",
        what="subpleural reticular lines (-300 to -150 HU) in a 18-30 mm band of both lower lobes",
        regions=LUNG_IDS,
        hu=(-300, -150),
        size=(18, 30),
        size_of="depth of the subpleural band",
        visible_at="32x64x64 as a denser subpleural band of the lower lobes, lung window; the lines from 64x256x256",
        prevalence=0.18,
        layer=51,
        sized=False,
        sample=_sample_septal,
        render=_render_septal,
        words=_no_words,
        positive={
            "": (
                "Interlobular septal thickening is observed in the subpleural areas of both lower lobes{c}.",
                "Subpleural interlobular septal thickening is seen in both lower lobes{c}.",
            )
        },
        impression={"": "Interlobular septal thickening{c}."},
        keywords=r"septal thickening",
        section="lungs",
        appearance="fine subpleural lines outlining the secondary pulmonary lobules",
        where="both lower lobes",
        window="lung",
    ),
]

#: The findings table, in the CSV's column order.
FINDINGS: dict[str, FindingSpec] = {spec.name: spec for spec in sorted(_TABLE, key=lambda s: LESION_IDS[s.name])}

#: Prevalence of each abnormality at a patient's first scan (independent draws).
PREVALENCE: dict[str, float] = {name: spec.prevalence for name, spec in FINDINGS.items()}

#: Findings whose size can change between a patient's scans (the others are chronic and persist unchanged).
SIZED: tuple[str, ...] = tuple(name for name, spec in FINDINGS.items() if spec.sized)

#: Overlap priority of the lesion mask, highest first: where lesions overlap the voxel takes the first one's id
#: (it is painted last). Focal, specific findings win over diffuse ones.
LESION_PRIORITY: tuple[str, ...] = tuple(sorted(FINDINGS, key=lambda n: -FINDINGS[n].layer))

#: Report phrases that mention each abnormality (case-insensitive regexes).
REPORT_KEYWORDS: dict[str, str] = {name: spec.keywords for name, spec in FINDINGS.items()}


def _check_table() -> None:
    names = [s.name for s in _TABLE]
    if sorted(names) != sorted(ABNORMALITIES) or len(set(names)) != len(names):
        raise RuntimeError(f"the findings table must hold each of {ABNORMALITIES} once, got {names}")
    layers = [s.layer for s in _TABLE]
    if len(set(layers)) != len(layers) or {AIRWAY_LAYER, VESSEL_LAYER} & set(layers):
        raise RuntimeError(f"finding layers must be distinct and differ from the anatomy layers, got {layers}")


_check_table()
