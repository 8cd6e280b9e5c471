"""Phantom chest-CT cohorts in the CT-RATE layout: the library's embedded default data set.

No real CT can be downloaded where this library is developed and tested, so `generate_cohort` draws analytic
chest phantoms (body wall, ribs, spine, sternum, five lung lobes with vessels and a bronchial tree, heart,
great vessels, trachea, oesophagus, liver, stomach, spleen, kidneys) with realistic Hounsfield units, places
the 18 CT-RATE abnormalities in them (each visible, each with a lesion mask), and writes everything the four
seed formats need, from the same phantoms:

    DIR/dataset/{split}/{split}_{p}/{split}_{p}_{scan}/{split}_{p}_{scan}_{recon}.nii.gz     volumes (int16)
    DIR/dataset/radiology_text_reports/{split}_reports.csv       VolumeName, ClinicalInformation_EN,
                                                                 Technique_EN, Findings_EN, Impressions_EN
    DIR/dataset/multi_abnormality_labels/{split}_predicted_labels.csv   VolumeName + the 18 labels (0/1)
    DIR/dataset/metadata/{split}_metadata.csv                    VolumeName, Manufacturer, …, RescaleSlope,
                                                                 RescaleIntercept, XYSpacing, ZSpacing, …
    DIR/dataset/cot/{split}_cot.json                             [{volumename, question, answer}]
    DIR/masks/anatomy/{split}/…same relative path….nii.gz        uint8 region ids (ANATOMY_REGIONS)
    DIR/masks/lesion/{split}/…same relative path….nii.gz         uint8 abnormality ids (LESION_IDS)
    DIR/omniabnorm/images/{case_id}.jpg, masks/{case_id}.jpg, cot.json    OmniAbnorm-CT style 2D cases
    DIR/segmentation.csv  (path, label, patient_id, split)       seed-002 segmentation CSV; the binary masks
    DIR/segmentation/labels/{split}/{volume}.nii.gz              of SEGMENTATION_TARGET (pleural effusion)
    DIR/libra/{split}.json                                       Libra/LLaVA conversations, [current, prior]
    DIR/phantom_manifest.json                                    ground truth per volume (finding parameters,
                                                                 prior comparisons, lesion volumes)

`{split}` is `train` or `valid`; `{scan}` is `a` (earlier) / `b` (later follow-up of the same patient);
`{recon}` numbers reconstructions of one scan (`_2`: a sharper kernel on another voxel grid). Every path inside
a CSV/JSON is relative to DIR. The segmentation CSV sits in DIR itself because the seed-002 reader resolves its
paths against the CSV's own folder.

Conventions (read these before using the data):

- Arrays are NIfTI `(x, y, z)` = `(Columns, Rows, NumberOfSlices)` = `(W, H, D)` of `--shape D H W`.
  Affines are diagonal (no obliquity) and map voxels to nibabel's RAS+ world: **+x is the patient's RIGHT**,
  +y anterior, +z superior (so patient-left is world x below the midline). Array orientations vary per volume
  (`ORIENTATIONS`): LPS (x and y flipped, the DICOM/CT-RATE layout), RAS, LPI (z flipped too) and LAS.
  Left/right words in the reports are the patient's, so they agree with the affine, never with array indices.
- About 1 volume in 3 stores raw scanner values, HU + 1024, with RescaleSlope 1 / RescaleIntercept -1024 in the
  metadata CSV, as CT-RATE ships; the others store HU (slope 1, intercept 0). The NIfTI headers carry no scaling.
- Spacing: in-plane spacing = field of view (333–460 mm, the body always fits) / W, i.e. 0.65–0.9 mm at the
  native 512 matrix; slice spacing = z coverage (275–320 mm, lung apices to upper abdomen) / D, i.e. 1–5 mm at
  60–300 slices. Small `--shape`s therefore give coarse voxels over the same anatomy.
- Lesion masks hold one abnormality id per voxel; where two abnormalities overlap the one earlier in
  `LESION_PRIORITY` wins (it is painted last). Every positive label has at least one voxel of its id; every
  negative label has none.
- Deterministic: the same arguments give byte-identical files (gzip mtime 0, fixed JPEG settings, fixed row
  order). Patients draw from their own random streams, so adding patients does not change the existing ones.

Findings (all 18 are drawn; none is always negative; independent draws with `PREVALENCE`, 15–35 %):
the five "easy" ones stay visible after downsampling to 32 x 64 x 64 — cardiomegaly (heart axes x1.3–1.5,
cardiothoracic ratio > 0.5 vs about 0.4), pleural effusion (dependent fluid, about 12 HU, layering posteriorly
with a horizontal level, 26–52 mm deep), lung nodules (1–4 solid, 16–28 mm), emphysema (about -975 HU
low-attenuation clusters, upper-zone predominant, bullae, flattened diaphragm), consolidation (soft-tissue
density filling much of one lobe, air bronchograms kept). The others: pericardial effusion (fluid rim),
lymphadenopathy (14–24 mm nodes at named stations), hiatal hernia (air/fluid sac above the hiatus), arterial
and coronary calcification (bright wall foci), medical material (pacemaker + lead, central catheter or
sternotomy wires), atelectasis (plate-like band), lung opacity (ground glass, about -520 HU, vessels kept),
fibrotic sequela (strands + scar), mosaic attenuation (geographic low/high density), peribronchial thickening
(thick segmental bronchial walls), bronchiectasis (dilated, non-tapering bronchi in one lobe), interlobular
septal thickening (subpleural reticular lines in the lower lobes). Follow-up scans change sized findings
(grow / shrink / resolve / appear) and their reports compare with the prior using the measured lesion volumes.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gzip
import io
import json
import math
import re
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from hf_models.configuration_rect import CT_RATE_ABNORMALITIES


__all__ = [
    "ABNORMALITIES",
    "ANATOMY_REGIONS",
    "DEFAULT_SHAPE",
    "LESION_IDS",
    "LESION_PRIORITY",
    "LOBE_IDS",
    "NUM_REGIONS",
    "ORIENTATIONS",
    "PREVALENCE",
    "REPORT_KEYWORDS",
    "SEGMENTATION_TARGET",
    "extract_labels",
    "generate_cohort",
    "volume_relative_path",
]

# ----------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------

#: The 18 CT-RATE multi-abnormality columns, in the CSV's order.
ABNORMALITIES: tuple[str, ...] = CT_RATE_ABNORMALITIES

#: Lesion-mask value of each abnormality: its 1-based position in `ABNORMALITIES` (0 = no lesion).
LESION_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(ABNORMALITIES)}

#: Overlap priority of the lesion mask, highest first: where lesions overlap the voxel takes the first one's id.
#: (Focal, specific findings win over diffuse ones; most pairs cannot overlap at all, e.g. lung lesions are only
#: drawn on lung voxels and a pleural effusion relabels its voxels to the pleural space.)
LESION_PRIORITY: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Coronary artery wall calcification",
    "Lung nodule",
    "Consolidation",
    "Atelectasis",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Interlobular septal thickening",
    "Bronchiectasis",
    "Peribronchial thickening",
    "Emphysema",
    "Mosaic attenuation pattern",
    "Pleural effusion",
    "Lymphadenopathy",
    "Hiatal hernia",
    "Pericardial effusion",
    "Cardiomegaly",
)

#: Anatomy-mask region ids (uint8; 0 is background, 1..20 are the `num_regions=20` regions of the encoder).
ANATOMY_REGIONS: dict[int, str] = {
    0: "background (air outside the body, CT table)",
    1: "body wall and soft tissue (skin, subcutaneous fat, muscle, breasts, diaphragm, neck)",
    2: "right upper lobe",
    3: "right middle lobe",
    4: "right lower lobe",
    5: "left upper lobe",
    6: "left lower lobe",
    7: "heart and pericardial sac",
    8: "aorta and arch branches",
    9: "pulmonary artery",
    10: "trachea and main bronchi",
    11: "oesophagus",
    12: "thoracic spine (vertebrae, discs, spinal canal)",
    13: "ribs and costal cartilage",
    14: "sternum",
    15: "liver",
    16: "stomach (including a hiatal hernia)",
    17: "spleen",
    18: "mediastinum (fat, lymph nodes, superior vena cava, pericardial fat)",
    19: "pleural space (pleura; pleural effusion)",
    20: "other upper abdomen (abdominal fat, bowel, kidneys)",
}
NUM_REGIONS = 20

LOBE_IDS: dict[str, int] = {
    "right upper lobe": 2,
    "right middle lobe": 3,
    "right lower lobe": 4,
    "left upper lobe": 5,
    "left lower lobe": 6,
}
LOBE_NAMES = {v: k for k, v in LOBE_IDS.items()}
LUNG_IDS = (2, 3, 4, 5, 6)
RIGHT_LOBES = (2, 3, 4)
LEFT_LOBES = (5, 6)

#: The abnormality whose binary masks back the seed-002 segmentation CSV.
SEGMENTATION_TARGET = "Pleural effusion"

#: Default `--shape` (D, H, W): 64 slices of 128 x 128.
DEFAULT_SHAPE = (64, 128, 128)

#: Array-axis directions (signs of the affine diagonal in RAS+) → nibabel axis codes; drawn with ORIENTATION_P.
ORIENTATIONS: dict[str, tuple[int, int, int]] = {
    "LPS": (-1, -1, 1),
    "RAS": (1, 1, 1),
    "LPI": (-1, -1, -1),
    "LAS": (-1, 1, 1),
}
ORIENTATION_P = (0.5, 0.25, 0.15, 0.10)

#: Prevalence of each abnormality at a patient's first scan (independent draws).
PREVALENCE: dict[str, float] = {
    "Medical material": 0.15,
    "Arterial wall calcification": 0.35,
    "Cardiomegaly": 0.30,
    "Pericardial effusion": 0.18,
    "Coronary artery wall calcification": 0.30,
    "Hiatal hernia": 0.18,
    "Lymphadenopathy": 0.25,
    "Emphysema": 0.30,
    "Atelectasis": 0.25,
    "Lung nodule": 0.35,
    "Lung opacity": 0.25,
    "Pulmonary fibrotic sequela": 0.25,
    "Pleural effusion": 0.30,
    "Mosaic attenuation pattern": 0.18,
    "Peribronchial thickening": 0.20,
    "Consolidation": 0.30,
    "Bronchiectasis": 0.18,
    "Interlobular septal thickening": 0.18,
}

#: Findings whose size can change between a patient's scans (the others are chronic and persist unchanged).
SIZED = (
    "Pleural effusion",
    "Lung nodule",
    "Consolidation",
    "Lung opacity",
    "Atelectasis",
    "Lymphadenopathy",
    "Pericardial effusion",
)

#: Report phrases that mention each abnormality (case-insensitive regexes). A sentence with a match and no
#: `NEGATION` cue asserts the finding; see `extract_labels`.
REPORT_KEYWORDS: dict[str, str] = {
    "Medical material": r"pacemaker|catheter|sternotomy|medical material",
    "Arterial wall calcification": r"(?=.*aort)(?=.*(calcif|atheroscler|atherom))",
    "Cardiomegaly": r"cardiomegaly|heart size|heart is enlarged|cardiothoracic",
    "Pericardial effusion": r"pericardial effusion|pericardial fluid",
    "Coronary artery wall calcification": r"coronary",
    "Hiatal hernia": r"hiatal hernia|hiatus hernia",
    "Lymphadenopathy": r"lymph node|lymphadenopathy",
    "Emphysema": r"emphysem",
    "Atelectasis": r"atelecta",
    "Lung nodule": r"nodul",
    "Lung opacity": r"ground-glass|opacit",
    "Pulmonary fibrotic sequela": r"fibrotic|fibrosis",
    "Pleural effusion": r"pleural effusion|pleural fluid",
    "Mosaic attenuation pattern": r"mosaic",
    "Peribronchial thickening": r"peribronchial|bronchial wall thickening",
    "Consolidation": r"consolidat",
    "Bronchiectasis": r"bronchiectasis|bronchiectatic",
    "Interlobular septal thickening": r"septal thickening",
}
NEGATION = r"\b(no|not|without|normal|resolved|absent|unremarkable)\b"

_SENTENCE_SPLIT = re.compile(r"(?<=\.)\s+")


def split_sentences(text: str) -> list[str]:
    """Report text → sentences (the generator never writes decimals or abbreviations, so '. ' splits)."""
    return [s.strip() for s in _SENTENCE_SPLIT.split(text.strip()) if s.strip()]


def extract_labels(text: str) -> dict[str, int]:
    """The 18 labels asserted by a report written with this module's phrasing (keyword and no negation cue in
    one sentence). Exact on generated reports; a rough rule-based extractor on anything else."""
    out = {name: 0 for name in ABNORMALITIES}
    for sentence in split_sentences(text):
        low = sentence.lower()
        if re.search(NEGATION, low):
            continue
        for name, pattern in REPORT_KEYWORDS.items():
            if re.search(pattern, low):
                out[name] = 1
    return out


def volume_relative_path(split: str, patient: int, scan: str, recon: int) -> str:
    """`train, 3, 'b', 1` → `train/train_3/train_3_b/train_3_b_1.nii.gz` (CT-RATE's tree below `dataset/`)."""
    name = f"{split}_{patient}_{scan}_{recon}.nii.gz"
    return f"{split}/{split}_{patient}/{split}_{patient}_{scan}/{name}"


# ----------------------------------------------------------------------------------------------------------------
# Small numerical helpers
# ----------------------------------------------------------------------------------------------------------------


def _u(rng: np.random.Generator, a: float, b: float) -> float:
    return float(rng.uniform(a, b))


def _blur_axis(a: np.ndarray, axis: int, w: float = 0.25) -> np.ndarray:
    """[w, 1 - 2w, w] along one axis with edge replication (w = 0.25: the [1, 2, 1] / 4 kernel)."""
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


def _interp_matrix(q: np.ndarray, lo: float, step: float, m: int) -> np.ndarray:
    """Rows of linear-interpolation weights taking a regular coarse axis (lo + step * i) to positions q."""
    t = np.clip((np.asarray(q, np.float64) - lo) / step, 0.0, m - 1 - 1e-6)
    i0 = np.floor(t).astype(np.int64)
    w = (t - i0).astype(np.float32)
    out = np.zeros((t.size, m), np.float32)
    rows = np.arange(t.size)
    out[rows, i0] = 1.0 - w
    out[rows, np.minimum(i0 + 1, m - 1)] += w
    return out


def _rot_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _frame_from_axis(u: Sequence[float]) -> np.ndarray:
    """Orthonormal frame (columns u, v, w) whose first axis is u."""
    u = np.asarray(u, float)
    u = u / np.linalg.norm(u)
    v = np.cross([0.0, 0.0, 1.0], u)
    if np.linalg.norm(v) < 1e-6:
        v = np.array([1.0, 0.0, 0.0])
    v = v / np.linalg.norm(v)
    w = np.cross(u, v)
    return np.stack([u, v, w], axis=1)


def _ell_q2(X, Y, Z, c, axes, R=None):
    """Squared normalised radius of points in an ellipsoid (centre c, semi-axes, rotation R columns)."""
    dx, dy, dz = X - c[0], Y - c[1], Z - c[2]
    if R is None:
        return (dx / axes[0]) ** 2 + (dy / axes[1]) ** 2 + (dz / axes[2]) ** 2
    q = 0.0
    for i in range(3):
        qi = dx * R[0, i] + dy * R[1, i] + dz * R[2, i]
        q = q + (qi / axes[i]) ** 2
    return q


def _segment_dist(X, Y, Z, p0, p1):
    """Distance to segment p0-p1 and the projection parameter t in [0, 1]."""
    d = np.asarray(p1, float) - np.asarray(p0, float)
    l2 = max(float(d @ d), 1e-9)
    ax, ay, az = X - p0[0], Y - p0[1], Z - p0[2]
    t = np.clip((ax * d[0] + ay * d[1] + az * d[2]) / l2, 0.0, 1.0)
    dist2 = (ax - t * d[0]) ** 2 + (ay - t * d[1]) ** 2 + (az - t * d[2]) ** 2
    return np.sqrt(dist2), t


def _round(obj: Any, nd: int = 2) -> Any:
    """JSON-friendly, rounded copy (numpy scalars/arrays → python)."""
    if isinstance(obj, dict):
        return {k: _round(v, nd) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v, nd) for v in obj]
    if isinstance(obj, np.ndarray):
        return _round(obj.tolist(), nd)
    if isinstance(obj, (np.floating, float)):
        return round(float(obj), nd)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    return obj


# ----------------------------------------------------------------------------------------------------------------
# Grid, canvas and smooth random fields
# ----------------------------------------------------------------------------------------------------------------


class Grid:
    """Voxel-centre coordinates in the patient frame (mm; RAS directions, origin at the patient centre) along
    the three array axes. Affines are diagonal, so every world axis depends on one array axis only."""

    def __init__(self, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray):
        self.xs = np.asarray(xs, np.float32)
        self.ys = np.asarray(ys, np.float32)
        self.zs = np.asarray(zs, np.float32)
        self.shape = (self.xs.size, self.ys.size, self.zs.size)
        self.spacing = tuple(float(abs(c[1] - c[0])) if c.size > 1 else 1.0 for c in (self.xs, self.ys, self.zs))

    def full(self):
        return (slice(None),) * 3, self.xs[:, None, None], self.ys[None, :, None], self.zs[None, None, :]

    def box(self, lo, hi):
        """Sub-block covering the patient-frame box [lo, hi], as (slices, X, Y, Z), or None when empty."""
        slices = []
        for c, a, b in zip((self.xs, self.ys, self.zs), lo, hi):
            idx = np.flatnonzero((c >= a) & (c <= b))
            if idx.size == 0:
                return None
            slices.append(slice(int(idx[0]), int(idx[-1]) + 1))
        sl = tuple(slices)
        return sl, self.xs[sl[0]][:, None, None], self.ys[sl[1]][None, :, None], self.zs[sl[2]][None, None, :]

    def around(self, c, r):
        r = np.broadcast_to(np.asarray(r, float), (3,))
        c = np.asarray(c, float)
        return self.box(c - r, c + r)

    def nearest_index(self, p) -> tuple[int, int, int]:
        return tuple(int(np.argmin(np.abs(c - v))) for c, v in zip((self.xs, self.ys, self.zs), p))

    def min_radius(self, r: float) -> np.ndarray:
        """Per-axis radii no smaller than about half a voxel, so small lesions always hit a voxel centre."""
        return np.maximum(r, 0.55 * np.asarray(self.spacing))


class Canvas:
    """HU volume + anatomy ids + lesion ids, painted in order (later paints win)."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.hu = np.full(grid.shape, -1000.0, np.float32)
        self.lab = np.zeros(grid.shape, np.uint8)
        self.les = np.zeros(grid.shape, np.uint8)

    def paint(self, sl, mask, hu=None, lab=None, les=None, only=None):
        """Paint the voxels of `mask` inside block `sl` (optionally only those whose anatomy id is in `only`).
        Painting anatomy without a lesion id clears the lesion id (a structure drawn over a lesion replaces it).
        """
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


class FieldBank:
    """Smooth unit-variance random fields defined in the patient frame, shared by all scans of one patient
    (so vessels and lesion textures stay put between a prior and a follow-up scan)."""

    LO = np.array([-240.0, -190.0, -205.0])
    HI = np.array([240.0, 190.0, 180.0])

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
                    a = _blur_axis(a, ax)
            a /= np.float32(a.std())
            self._cache[key] = np.ascontiguousarray(a)
        return self._cache[key]

    def sample(self, name: str, xs, ys, zs, step: float = 6.0, passes: int = 2) -> np.ndarray:
        """Trilinear samples on the separable grid xs × ys × zs (separable matrix products, no gathers)."""
        a = self._coarse(name, step, passes)
        ws = []
        for ax, q in enumerate((xs, ys, zs)):
            w = _interp_matrix(np.ravel(q), self.LO[ax], step, a.shape[ax])
            cols = np.flatnonzero(w.any(0))
            c0, c1 = int(cols[0]), int(cols[-1]) + 1
            ws.append(w[:, c0:c1])
            a = a[(slice(None),) * ax + (slice(c0, c1),)]  # only the coarse nodes the samples touch
        wx, wy, wz = ws
        f = np.tensordot(wx, a, axes=(1, 0))  # (nx, My, Mz)
        f = np.tensordot(f, wy, axes=(1, 1))  # (nx, Mz, ny)
        f = np.tensordot(f, wz, axes=(1, 1))  # (nx, ny, nz)
        return f.astype(np.float32, copy=False)

    def sample_grid(self, name: str, grid: Grid, sl=None, **kw) -> np.ndarray:
        if sl is None:
            return self.sample(name, grid.xs, grid.ys, grid.zs, **kw)
        return self.sample(name, grid.xs[sl[0]], grid.ys[sl[1]], grid.zs[sl[2]], **kw)


# ----------------------------------------------------------------------------------------------------------------
# Patient anatomy (analytic, patient frame in mm: +x patient right, +y anterior, +z superior)
# ----------------------------------------------------------------------------------------------------------------


def _diaphragm(A, X, Y):
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


def _lobe_map(A, X, Y, Z) -> np.ndarray:
    """Lobe id (2..6) of each point by the analytic lung model (0 outside the lungs); fissures: oblique
    (posterior-superior to anterior-inferior) on both sides, horizontal on the right."""
    X, Y, Z = np.broadcast_arrays(X, Y, Z)
    rho2 = (X / A.ac) ** 2 + ((Y - A.yc) / A.bc) ** 2
    thor = (rho2 < 1.0) & (Z > _diaphragm(A, X, Y))
    hw = _med_halfwidth(A, Y, Z)
    right = thor & (X > A.xm + hw) & (Z < _apex(A, X, Y, +1))
    left = thor & (X < A.xm - hw) & (Z < _apex(A, X, Y, -1))
    zob_r = A.zob_r + A.sob * (A.yc - Y)
    zob_l = A.zob_l + A.sob * (A.yc - Y)
    out = np.zeros(X.shape, np.uint8)
    up_r = right & (Z >= zob_r)
    out[up_r & (Z >= A.zhz)] = 2
    out[up_r & (Z < A.zhz)] = 3
    out[right & (Z < zob_r)] = 4
    out[left & (Z >= zob_l)] = 5
    out[left & (Z < zob_l)] = 6
    return out


def _heart_geometry(A, F: Mapping[str, Any]):
    axes = np.array(A.heart_axes, float)
    c = np.array(A.heart_c, float)
    if "Cardiomegaly" in F:
        k = F["Cardiomegaly"]["scale"]
        big = axes * np.array([k, 0.5 + 0.5 * k, 1.0 + 0.55 * (k - 1.0)])
        c = c + np.array([-(big[0] - axes[0]) * 0.55, (big[1] - axes[1]) * 0.25, (big[2] - axes[2]) * 0.62])
        axes = big
    return c, axes, np.asarray(A.heart_R)


def _in_heart_zone(A, x, y, z, scale: float = 1.75):
    return _ell_q2(x, y, z, A.heart_c, np.asarray(A.heart_axes) * scale, np.asarray(A.heart_R)) < 1.0


def _lung_candidates(A, rng, n: int, margin: float):
    x = rng.uniform(-A.ac, A.ac, n)
    y = rng.uniform(A.yc - A.bc, A.yc + A.bc, n)
    z = rng.uniform(A.z_dR - 60, A.z_ap, n)
    lob = _lobe_map(A, x, y, z)
    ok = (lob > 0) & ~_in_heart_zone(A, x, y, z) & (np.abs(x - A.xm) > 42 + margin)
    return x[ok], y[ok], z[ok], lob[ok]


_OFFSETS = np.concatenate(
    [
        np.eye(3),
        -np.eye(3),
        np.array([[1, 1, 1], [-1, -1, 1], [1, -1, -1], [-1, 1, -1], [1, -1, 1], [-1, 1, 1], [1, 1, -1], [-1, -1, -1]])
        / math.sqrt(3),
    ]
)


def _sample_in_lobe(rng, A, lobe: int, margin: float, y_min: float = -1e9, z_max: float = 1e9) -> np.ndarray:
    """A point of `lobe` whose neighbourhood (radius `margin`) lies in the same lobe, away from the heart and
    mediastinum, anterior to `y_min` (clear of a dependent pleural effusion)."""
    m = margin
    for attempt in range(40):
        x, y, z, lob = _lung_candidates(A, rng, 3000, 0.0)
        sel = (lob == lobe) & (y - m > y_min) & (z < z_max)
        if sel.any():
            p = np.stack([x[sel], y[sel], z[sel]], 1)[:300]
            q = p[:, None, :] + _OFFSETS[None] * m
            ql = _lobe_map(A, q[..., 0], q[..., 1], q[..., 2])
            good = (ql == lobe).all(1) & ~_in_heart_zone(A, q[..., 0], q[..., 1], q[..., 2]).any(1)
            if good.any():
                return p[int(np.argmax(good))]
        if attempt % 4 == 3:
            m *= 0.8
            y_min -= 10
    # Fallback: any point of the lobe (tiny lobes in extreme anatomy).
    for _ in range(50):
        x, y, z, lob = _lung_candidates(A, rng, 4000, 0.0)
        if (lob == lobe).any():
            i = int(np.argmax(lob == lobe))
            return np.array([x[i], y[i], z[i]])
    raise RuntimeError(f"lobe {lobe} not found in phantom anatomy")


def _lobe_centroid(rng, A, lobe: int) -> np.ndarray:
    pts = []
    while sum(len(p) for p in pts) < 200:
        x, y, z, lob = _lung_candidates(A, rng, 4000, 0.0)
        sel = lob == lobe
        pts.append(np.stack([x[sel], y[sel], z[sel]], 1))
    return np.concatenate(pts).mean(0)


def _sample_anatomy(rng: np.random.Generator, emphysema: bool) -> SimpleNamespace:
    A = SimpleNamespace()
    A.sex = "F" if rng.random() < 0.45 else "M"
    A.age = int(rng.integers(30, 86))
    f = 0.95 if A.sex == "F" else 1.0
    A.ab = _u(rng, 145, 175) * f  # body half-width
    A.bb = _u(rng, 105, 128) * f  # body half AP depth
    A.fat = _u(rng, 6, 20)
    A.ac = A.ab - A.fat - 20  # thoracic cavity (inside the ribs) half-width
    A.bc = A.bb - A.fat - 25  # … half AP depth (posterior wall holds the paraspinal muscles)
    A.yc = 13.0 + _u(rng, -2, 2)
    A.xm = _u(rng, -4, 4)  # mediastinal midline
    A.yv = A.yc - A.bc + 10  # vertebral-body centre
    A.z_ap = _u(rng, 115, 135)
    A.z_dR = _u(rng, -85, -65) - (14.0 if emphysema else 0.0)  # hyperinflation flattens the domes
    A.z_dL = A.z_dR - _u(rng, 8, 18)
    A.z_car = A.z_ap - _u(rng, 85, 100)
    A.z_arch = A.z_car + _u(rng, 15, 24)
    A.zob_r = 0.5 * (A.z_car + A.z_dR) - _u(rng, 0, 10)
    A.zob_l = A.zob_r + _u(rng, 4, 12)
    A.sob = _u(rng, 0.75, 0.95)
    A.zhz = A.z_car - _u(rng, 12, 25)
    A.rib_pitch = _u(rng, 24, 29)
    A.rib_off = _u(rng, 0, 30)
    A.disk_off = _u(rng, 0, 27)
    A.lung_hu = _u(rng, -885, -850)
    A.z_breast = A.z_car - _u(rng, 30, 60)
    # Heart: long axis towards the left, anterior and inferior.
    s_body = float(np.clip(A.ac / 125.0, 0.85, 1.12))
    hs = _u(rng, 0.93, 1.04) * s_body
    A.heart_axes = [55.0 * hs, 44.0 * hs, 48.0 * hs]
    phi, tau = math.radians(_u(rng, 28, 42)), math.radians(_u(rng, 12, 25))
    A.heart_R = _frame_from_axis([-math.cos(phi) * math.cos(tau), math.sin(phi) * math.cos(tau), -math.sin(tau)])
    A.heart_c = [A.xm - 24.0 + _u(rng, -4, 4), A.yc + 0.22 * A.bc + _u(rng, -4, 4), A.z_dL + 0.62 * A.heart_axes[2]]
    # Airway and mediastinal landmarks.
    A.y_e = A.yv + 26.0  # oesophagus
    A.y_t = A.yv + 44.0  # trachea
    A.x_t = A.xm + _u(rng, -3, 3)
    A.r_t = _u(rng, 8, 10)
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
    p_br = A.aorta[2]
    p_cc = A.aorta[3]
    p_sc = A.aorta[4]
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
    A.spleen_c = (A.xm - 0.66 * A.ac, A.yc - 0.45 * A.bc, A.z_dL - 45)
    A.spleen_r = (0.16 * A.ac, 0.48 * A.bc, 46.0)
    A.nodes_normal = [str(s) for s in rng.choice(sorted(_STATIONS), size=4, replace=False)]
    # Bronchial tree: lobar → segmental → subsegmental segments (p0, p1, r0, r1, lobe, generation).
    bronchi = []
    for lobe in LUNG_IDS:
        hil = A.hilum_R if lobe in RIGHT_LOBES else A.hilum_L
        cen = _lobe_centroid(rng, A, lobe)
        lob_end = hil + 0.35 * (cen - hil)
        bronchi.append((hil, lob_end, 4.8, 4.0, lobe, 2))
        for _ in range(3):
            tgt = _sample_in_lobe(rng, A, lobe, 6.0)
            seg_end = lob_end + 0.6 * (tgt - lob_end)
            bronchi.append((lob_end, seg_end, 3.2, 2.3, lobe, 3))
            for _ in range(2):
                t2 = _sample_in_lobe(rng, A, lobe, 4.0)
                d = t2 - seg_end
                if np.linalg.norm(d) > 70:
                    d = d * 70 / np.linalg.norm(d)
                bronchi.append((seg_end, seg_end + 0.75 * d, 1.9, 1.1, lobe, 4))
    A.bronchi = [
        (np.asarray(p0, float), np.asarray(p1, float), r0, r1, lobe, g) for p0, p1, r0, r1, lobe, g in bronchi
    ]
    return A


_STATIONS: dict[str, Any] = {
    "right paratracheal": lambda A: (A.x_t + 17, A.y_t + 4, A.z_car + 25),
    "left paratracheal": lambda A: (A.x_t - 15, A.y_t + 2, A.z_car + 30),
    "subcarinal": lambda A: (A.x_t, A.y_t - 8, A.z_car - 22),
    "prevascular": lambda A: (A.xm - 4, A.y_asc + 24, A.z_arch + 4),
    "aortopulmonary window": lambda A: (A.xm - 22, A.y_t + 16, A.z_arch - 14),
    "right hilar": lambda A: tuple(A.hilum_R + [6, 12, -8]),
    "left hilar": lambda A: tuple(A.hilum_L + [-6, 12, -6]),
}


# ----------------------------------------------------------------------------------------------------------------
# Findings: presence, sizes and placement (patient frame), and their evolution between scans
# ----------------------------------------------------------------------------------------------------------------


def _place_lung_lesions(rng, A, sizes: Mapping[str, Any], eff_level: Mapping[str, float]) -> dict[str, Any]:
    """Placement shared by all scans of a patient (same lesion in the prior and the follow-up)."""

    def y_min(lobe):
        side = "right" if lobe in RIGHT_LOBES else "left"
        return eff_level.get(side, -1e9)

    P: dict[str, Any] = {}
    if "Lung nodule" in sizes:
        nods = []
        for r in sizes["Lung nodule"]["r_max"]:
            lobe = int(rng.choice(LUNG_IDS, p=[0.26, 0.1, 0.22, 0.24, 0.18]))
            nods.append({"lobe": lobe, "c": _sample_in_lobe(rng, A, lobe, r + 3, y_min(lobe))})
        P["Lung nodule"] = nods
    if "Consolidation" in sizes:
        lobe = int(rng.choice(LUNG_IDS, p=[0.15, 0.15, 0.3, 0.15, 0.25]))
        P["Consolidation"] = {"lobe": lobe, "c": _sample_in_lobe(rng, A, lobe, 10.0, y_min(lobe))}
    if "Lung opacity" in sizes:
        lobes = [int(v) for v in rng.choice(LUNG_IDS, size=int(rng.integers(1, 3)), replace=False)]
        P["Lung opacity"] = [{"lobe": lb, "c": _sample_in_lobe(rng, A, lb, 10.0, y_min(lb))} for lb in lobes]
    if "Atelectasis" in sizes:
        lobe = int(rng.choice((3, 4, 6, 5), p=[0.2, 0.35, 0.35, 0.1]))
        n = np.array([_u(rng, -0.3, 0.3), _u(rng, 0.2, 0.5), 1.0])
        P["Atelectasis"] = {
            "lobe": lobe,
            "c": _sample_in_lobe(rng, A, lobe, 10.0, y_min(lobe)),
            "n": n / np.linalg.norm(n),
        }
    if "Pulmonary fibrotic sequela" in sizes:
        lobe = int(rng.choice((2, 5, 4, 6), p=[0.35, 0.35, 0.15, 0.15]))
        c = _sample_in_lobe(rng, A, lobe, 12.0, y_min(lobe))
        strands = []
        for _ in range(int(rng.integers(4, 8))):
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            strands.append((c + d * _u(rng, 2, 8), c + d * _u(rng, 18, 32)))
        P["Pulmonary fibrotic sequela"] = {"lobe": lobe, "c": c, "strands": strands}
    if "Bronchiectasis" in sizes:
        P["Bronchiectasis"] = {"lobe": int(rng.choice((4, 6, 3, 5), p=[0.35, 0.35, 0.15, 0.15]))}
    return P


def _effusion_t(rng) -> float:
    return _u(rng, 26, 52)


def _sample_presence(rng, prevalence: Mapping[str, float]) -> set[str]:
    return {name for name in ABNORMALITIES if rng.random() < prevalence[name]}


def _initial_sizes(rng, A, present: set[str]) -> dict[str, Any]:
    S: dict[str, Any] = {}
    for name in ABNORMALITIES:
        if name not in present:
            continue
        if name == "Medical material":
            S[name] = {"kind": str(rng.choice(["pacemaker", "catheter", "sternotomy"], p=[0.45, 0.35, 0.2]))}
        elif name == "Arterial wall calcification":
            S[name] = {"n": int(rng.integers(4, 11))}
        elif name == "Cardiomegaly":
            S[name] = {"scale": _u(rng, 1.32, 1.48)}
        elif name == "Pericardial effusion":
            S[name] = {"t": _u(rng, 8, 16)}
        elif name == "Coronary artery wall calcification":
            S[name] = {"n": int(rng.integers(3, 8))}
        elif name == "Hiatal hernia":
            S[name] = {"r": [_u(rng, 24, 34), _u(rng, 20, 28), _u(rng, 22, 32)]}
        elif name == "Lymphadenopathy":
            k = int(rng.integers(1, 4))
            stations = [str(s) for s in rng.choice(sorted(_STATIONS), size=k, replace=False)]
            S[name] = {"nodes": [{"station": s, "short_axis": _u(rng, 14, 24)} for s in stations]}
        elif name == "Emphysema":
            S[name] = {"thr0": _u(rng, 0.0, 0.35)}
        elif name == "Atelectasis":
            S[name] = {"th": _u(rng, 6, 10), "ext": _u(rng, 28, 45)}
        elif name == "Lung nodule":
            k = int(rng.choice([1, 2, 3, 4], p=[0.2, 0.35, 0.3, 0.15]))
            S[name] = {"r": [_u(rng, 8.0, 14.0) for _ in range(k)]}
        elif name == "Lung opacity":
            S[name] = {"r": _u(rng, 15, 26)}
        elif name == "Pulmonary fibrotic sequela":
            S[name] = {}
        elif name == "Pleural effusion":
            sides = str(rng.choice(["right", "left", "bilateral"], p=[0.4, 0.3, 0.3]))
            sd = ["right", "left"] if sides == "bilateral" else [sides]
            S[name] = {"t": {s: _effusion_t(rng) for s in sd}}
        elif name == "Mosaic attenuation pattern":
            S[name] = {"thr": _u(rng, -0.3, 0.1)}
        elif name == "Peribronchial thickening":
            S[name] = {"wall": _u(rng, 2.5, 3.5)}
        elif name == "Consolidation":
            S[name] = {"r": _u(rng, 40, 58)}
        elif name == "Bronchiectasis":
            S[name] = {"factor": _u(rng, 2.0, 2.6)}
        elif name == "Interlobular septal thickening":
            S[name] = {"depth": _u(rng, 18, 28)}
    return S


def _scale_size(name: str, s: dict, k: float) -> dict:
    s = json.loads(json.dumps(s))  # deep copy
    if name == "Pleural effusion":
        s["t"] = {side: float(np.clip(t * k, 18, 75)) for side, t in s["t"].items()}
    elif name == "Lung nodule":
        s["r"] = [float(np.clip(r * k ** (1 / 3), 5.0, 19)) for r in s["r"]]
    elif name in ("Consolidation", "Lung opacity"):
        s["r"] = float(np.clip(s["r"] * k ** (1 / 3), 12, 80))
    elif name == "Atelectasis":
        s["ext"] = float(np.clip(s["ext"] * k**0.5, 15, 65))
    elif name == "Lymphadenopathy":
        for node in s["nodes"]:
            node["short_axis"] = float(np.clip(node["short_axis"] * k ** (1 / 3), 11, 34))
    elif name == "Pericardial effusion":
        s["t"] = float(np.clip(s["t"] * k**0.8, 5, 28))
    return s


def _evolve(rng, A, S_a: dict[str, Any], prevalence) -> dict[str, Any]:
    """Sizes at the follow-up scan: sized findings grow / shrink / stay / resolve, new ones appear; chronic
    findings persist unchanged (emphysema never appears or disappears: it changes the patient's anatomy)."""
    S_b: dict[str, Any] = {}
    fresh = _initial_sizes(rng, A, set(ABNORMALITIES))
    for name in ABNORMALITIES:
        if name in S_a:
            if name in SIZED:
                plan = str(rng.choice(["increased", "decreased", "unchanged", "resolved"], p=[0.32, 0.28, 0.28, 0.12]))
                if name in ("Lung nodule", "Lymphadenopathy") and plan == "resolved":
                    plan = "unchanged"
                if plan == "increased":
                    S_b[name] = _scale_size(name, S_a[name], _u(rng, 2.4, 3.2))
                elif plan == "decreased":
                    S_b[name] = _scale_size(name, S_a[name], _u(rng, 0.3, 0.42))
                elif plan == "unchanged":
                    S_b[name] = json.loads(json.dumps(S_a[name]))
            else:
                S_b[name] = json.loads(json.dumps(S_a[name]))
        else:
            p_new = 0.0 if name == "Emphysema" else (0.14 if name in SIZED else 0.05) * prevalence[name] / 0.25
            if rng.random() < p_new:
                S_b[name] = fresh[name]
    # Nodules: keep the same lesions (count) as the prior when both scans have them.
    if "Lung nodule" in S_a and "Lung nodule" in S_b:
        S_b["Lung nodule"]["r"] = S_b["Lung nodule"]["r"][: len(S_a["Lung nodule"]["r"])]
    return S_b


def _assemble(rng, A, sizes_per_scan: list[dict]) -> list[dict]:
    """Attach patient-level placements to each scan's sizes → per-scan finding parameter dicts."""
    union: dict[str, Any] = {}
    for S in sizes_per_scan:
        for name, s in S.items():
            union.setdefault(name, s)
    # r_max of nodules across scans (placement margin)
    if "Lung nodule" in union:
        n = max(len(S["Lung nodule"]["r"]) for S in sizes_per_scan if "Lung nodule" in S)
        r_max = []
        for i in range(n):
            r_max.append(
                max(
                    S["Lung nodule"]["r"][i]
                    for S in sizes_per_scan
                    if "Lung nodule" in S and i < len(S["Lung nodule"]["r"])
                )
            )
        union["Lung nodule"] = {"r_max": r_max}
    eff_level: dict[str, float] = {}
    for S in sizes_per_scan:
        for side, t in S.get("Pleural effusion", {}).get("t", {}).items():
            eff_level[side] = max(eff_level.get(side, -1e9), A.yc - A.bc + t + 4)
    P = _place_lung_lesions(rng, A, union, eff_level)
    # Mediastinal / cardiac placements.
    if "Hiatal hernia" in union:
        r = union["Hiatal hernia"]["r"]
        P["Hiatal hernia"] = {"c": np.array([A.xm - 12, A.y_e + 8, A.z_dL + 0.35 * r[2]])}
    if "Arterial wall calcification" in union:
        P["Arterial wall calcification"] = _aortic_spots(rng, A, 12)
    if "Coronary artery wall calcification" in union:
        dirs = []
        for _ in range(10):
            d = np.array([_u(rng, -0.3, 0.9), _u(rng, -0.9, 0.9), _u(rng, 0.0, 0.9)])  # heart-local u, v, w
            dirs.append(d / np.linalg.norm(d))
        P["Coronary artery wall calcification"] = {"dirs": dirs, "r": [_u(rng, 2.0, 3.5) for _ in range(10)]}
    if "Emphysema" in union:
        lobe = int(rng.choice((2, 5)))
        P["Emphysema"] = {"bullae": [{"lobe": lobe, "c": _sample_in_lobe(rng, A, lobe, 8.0), "r": _u(rng, 10, 18)}]}
    out = []
    for S in sizes_per_scan:
        F: dict[str, Any] = {}
        for name in ABNORMALITIES:
            if name not in S:
                continue
            f = dict(json.loads(json.dumps(S[name])))
            if name == "Lung nodule":
                f["nodules"] = [
                    {"lobe": P[name][i]["lobe"], "c": P[name][i]["c"], "r": r} for i, r in enumerate(S[name]["r"])
                ]
            elif name == "Arterial wall calcification":
                f["spots"] = P[name][: f["n"]]
            elif name == "Coronary artery wall calcification":
                f["dirs"] = P[name]["dirs"][: f["n"]]
                f["rs"] = P[name]["r"][: f["n"]]
            elif name == "Lung opacity":
                f["blobs"] = [{"lobe": b["lobe"], "c": b["c"], "r": S[name]["r"]} for b in P[name]]
            elif name in P:
                f.update(P[name] if isinstance(P[name], dict) else {"items": P[name]})
            F[name] = f
        out.append(F)
    return out


def _polyline_point(pts: np.ndarray, frac: float) -> tuple[np.ndarray, np.ndarray]:
    seg = np.diff(pts, axis=0)
    lens = np.linalg.norm(seg, axis=1)
    target = frac * lens.sum()
    i = int(np.searchsorted(np.cumsum(lens), target))
    i = min(i, len(seg) - 1)
    t = (target - (np.cumsum(lens)[i] - lens[i])) / max(lens[i], 1e-9)
    return pts[i] + t * seg[i], seg[i] / max(lens[i], 1e-9), i


def _aortic_spots(rng, A, n: int) -> list[dict]:
    pts = np.array(A.aorta[:7], float)  # ascending, arch, descending thoracic aorta
    spots = []
    for _ in range(n):
        p, d, i = _polyline_point(pts, _u(rng, 0.15, 0.95))
        r_a = A.aorta_r[min(i, len(A.aorta_r) - 1)]
        perp = np.cross(d, rng.normal(size=3))
        perp /= np.linalg.norm(perp)
        spots.append({"c": p + perp * (r_a - 1.0), "r": _u(rng, 2.2, 3.8), "hu": _u(rng, 550, 950)})
    return spots


# ----------------------------------------------------------------------------------------------------------------
# Rendering one volume
# ----------------------------------------------------------------------------------------------------------------


def _tube_masks(grid: Grid, pts, radii, extra: float = 0.0):
    pts = np.asarray(pts, float)
    radii = np.broadcast_to(np.asarray(radii, float), (len(pts),))
    out = []
    for p0, p1, r0, r1 in zip(pts[:-1], pts[1:], radii[:-1], radii[1:]):
        rmax = max(r0, r1) + extra + 1.0
        box = grid.box(np.minimum(p0, p1) - rmax, np.maximum(p0, p1) + rmax)
        if box is None:
            continue
        sl, X, Y, Z = box
        dist, t = _segment_dist(X, Y, Z, p0, p1)
        out.append((sl, dist < r0 + (r1 - r0) * t + extra))
    return out


def _paint_spot(cv: Canvas, c, r: float, **kw):
    rr = cv.grid.min_radius(r)
    box = cv.grid.around(c, rr + 1.0)
    if box is None:
        return
    sl, X, Y, Z = box
    cv.paint(sl, _ell_q2(X, Y, Z, c, rr) < 1.0, **kw)


_NODE_SHIFTS = [np.zeros(3)] + [
    np.array(v, float) * k
    for k in (6.0, 12.0)
    for v in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
]


def _render(A, F: Mapping[str, Any], grid: Grid, scan: SimpleNamespace, bank: FieldBank) -> tuple[Canvas, dict]:
    """Paint one phantom volume on `grid`; returns the canvas (float HU, before blur/noise) and reference
    points of each finding (used to guarantee that every positive finding owns at least one voxel)."""
    cv = Canvas(grid)
    sl0, X, Y, Z = grid.full()
    refs: dict[str, np.ndarray] = {}
    blood = scan.blood_hu

    # --- body, table, cavity ---
    cv.paint(sl0, (Y > -A.bb - 26) & (Y < -A.bb - 16) & (np.abs(X) < 230), hu=-120.0)
    cv.paint(sl0, (X / A.ab) ** 2 + (Y / A.bb) ** 2 < 1.0, hu=-100.0, lab=1)
    cv.paint(sl0, (X / (A.ab - A.fat)) ** 2 + (Y / (A.bb - A.fat)) ** 2 < 1.0, hu=45.0)
    if A.sex == "F":
        for s in (1, -1):
            c = (A.xm + s * 0.45 * A.ab, A.bb - 22, A.z_breast)
            box = grid.around(c, (62, 40, 56))
            if box is not None:
                sl, Xs, Ys, Zs = box
                cv.paint(sl, (_ell_q2(Xs, Ys, Zs, c, (58, 36, 52)) < 1.0) & (Ys > 0), hu=-65.0, lab=1, only=(0,))
    rho2 = (X / A.ac) ** 2 + ((Y - A.yc) / A.bc) ** 2
    cav = rho2 < 1.0
    zd = _diaphragm(A, X, Y)
    cv.paint(sl0, cav & (Z > zd) & (Z < A.z_ap + 5), hu=-90.0, lab=18)
    cv.paint(sl0, cav & (Z <= zd), hu=-45.0, lab=20)
    cv.paint(sl0, cav & (Z <= zd) & (Z > zd - 5), hu=40.0, lab=1)

    # --- ribs, costal cartilage, sternum ---
    shell_t = 9.0 / (0.5 * (A.ac + A.bc))
    rho = np.sqrt(rho2)
    in_shell = (rho >= 1.0) & (rho < 1.0 + shell_t)
    ant = (np.sin(np.arctan2((Y - A.yc) / A.bc, X / A.ac)) + 1.0) / 2.0
    phase = np.mod(Z + 40.0 * ant + A.rib_off, A.rib_pitch)
    dzr = np.abs(phase - A.rib_pitch / 2)
    ribz = (dzr < 4.5) & (Z < A.z_ap + 22)
    axm = np.abs(X - A.xm)
    rib = in_shell & ribz & ~((ant > 0.88) & (axm < 42)) & ~((ant < 0.2) & (axm < 20))
    edge = np.maximum(np.abs(rho - 1.0 - shell_t / 2) / (shell_t / 2), dzr / 4.5) > 0.55
    cv.paint(sl0, rib, hu=np.where(edge, 780.0, 230.0), lab=13)
    cv.paint(sl0, in_shell & ribz & (ant > 0.88) & (axm < 42) & (axm >= 15), hu=120.0, lab=13)
    st_hw = np.where(Z > A.z_arch, 24.0, 15.0)
    y0 = A.yc + A.bc - 1
    st = (axm < st_hw) & (Y > y0) & (Y < y0 + 12) & (Z > A.z_dL + 5) & (Z < A.z_ap - 5)
    st_core = (axm < st_hw - 3) & (Y > y0 + 2.5) & (Y < y0 + 9.5)
    cv.paint(sl0, st, hu=np.where(st_core, 250.0, 720.0), lab=14)

    # --- lungs and pleura ---
    lobes = _lobe_map(A, X, Y, Z)
    lung = lobes > 0
    base = A.lung_hu + 45.0 * np.clip(0.5 - (Y - A.yc) / (2 * A.bc), 0, 1) ** 2
    cv.paint(sl0, lung, hu=base, lab=lobes)
    cv.paint(sl0, lung & (rho > 1.0 - 3.0 / (0.5 * (A.ac + A.bc))), hu=-80.0, lab=19)
    del lobes, lung

    # --- upper abdomen ---
    cv.paint(sl0, cav & (Z <= zd) & ((X - A.xm) > -18.0 - 0.55 * (Y - A.yc)), hu=scan.liver_hu, lab=15, only=(20,))
    box = grid.around(A.stomach_c, np.array(A.stomach_r) + 2)
    if box is not None:
        sl, Xs, Ys, Zs = box
        q = _ell_q2(Xs, Ys, Zs, A.stomach_c, A.stomach_r)
        inner = np.where(Ys > A.stomach_c[1] + 0.3 * A.stomach_r[1], -1000.0, 25.0)
        cv.paint(sl, q < 1.0, hu=np.where(q > 0.8, 45.0, inner), lab=16, only=(20, 15))
    box = grid.around(A.spleen_c, max(A.spleen_r) + 2)
    if box is not None:
        sl, Xs, Ys, Zs = box
        cv.paint(
            sl, _ell_q2(Xs, Ys, Zs, A.spleen_c, A.spleen_r, _rot_z(35)) < 1.0, hu=scan.spleen_hu, lab=17, only=(20, 15)
        )
    for s in (1, -1):
        c = (A.xm + s * 0.45 * A.ac, A.yv + 8, A.z_dL - 125)
        box = grid.around(c, (0.2 * A.ac + 2, 26, 57))
        if box is not None:
            sl, Xs, Ys, Zs = box
            cv.paint(sl, _ell_q2(Xs, Ys, Zs, c, (0.2 * A.ac, 24, 55)) < 1.0, hu=scan.kidney_hu, lab=20, only=(20, 15))

    # --- heart (pericardial fat, pericardial effusion, myocardium, blood pool) ---
    c, axes, R = _heart_geometry(A, F)
    t_pe = F.get("Pericardial effusion", {}).get("t", 0.0)
    mean_ax = float(np.mean(axes))
    box = grid.around(c, max(axes) * 1.1 + t_pe + 8)
    if box is not None:
        sl, Xs, Ys, Zs = box
        q = np.sqrt(_ell_q2(Xs, Ys, Zs, c, axes, R))
        allowed = (Zs > _diaphragm(A, Xs, Ys) - 3) & ((Xs / A.ac) ** 2 + ((Ys - A.yc) / A.bc) ** 2 < 1.0)
        q_pe = 1.0 + t_pe / mean_ax
        q_fat = q_pe + 3.5 / mean_ax
        cv.paint(sl, allowed & (q < q_fat) & (q >= q_pe), hu=-95.0, lab=18)
        if t_pe:
            cv.paint(sl, allowed & (q < q_pe) & (q >= 1.0), hu=12.0, lab=7, les=LESION_IDS["Pericardial effusion"])
            refs["Pericardial effusion"] = c + R @ np.array([axes[0] + t_pe / 2, 0, 0])
        les = LESION_IDS["Cardiomegaly"] if "Cardiomegaly" in F else None
        cv.paint(sl, allowed & (q < 1.0), hu=scan.myo_hu, lab=7, les=les)
        cv.paint(sl, allowed & (q < 1.0 - 11.0 / mean_ax), hu=blood)
        refs["Cardiomegaly"] = c

    # --- great vessels, airways, oesophagus, spine ---
    for sl, m in _tube_masks(grid, A.aorta, A.aorta_r):
        cv.paint(sl, m, hu=blood, lab=8)
    for pts, r in A.arch_branches:
        for sl, m in _tube_masks(grid, pts, r):
            cv.paint(sl, m, hu=blood, lab=8)
    for pts, r in (A.pa_trunk, A.pa_right, A.pa_left):
        for sl, m in _tube_masks(grid, pts, r):
            cv.paint(sl, m, hu=blood, lab=9)
    for sl, m in _tube_masks(grid, A.svc, 9.0):
        cv.paint(sl, m, hu=blood + (60.0 if scan.contrast else 0.0), lab=18)
    lumens = []
    for pts, r, w in [(A.trachea, A.r_t, 2.5)] + [(p, r, 2.0) for p, r in A.main_bronchi]:
        for sl, m in _tube_masks(grid, pts, r, extra=w):
            cv.paint(sl, m, hu=55.0, lab=10)
        lumens += _tube_masks(grid, pts, r)
    for sl, m in lumens:
        cv.paint(sl, m, hu=-1000.0, lab=10)
    for sl, m in _tube_masks(grid, A.oesophagus, 8.0):
        cv.paint(sl, m, hu=38.0, lab=11)
    if A.oes_air:
        for sl, m in _tube_masks(grid, A.oesophagus[:2], 2.5):
            cv.paint(sl, m, hu=-950.0, lab=11)
    vb = ((X - A.xm) / 20.0) ** 2 + ((Y - A.yv) / 16.0) ** 2
    y_can = A.yv - 26.0
    can = ((X - A.xm) / 9.0) ** 2 + ((Y - y_can) / 9.0) ** 2
    cv.paint(sl0, (np.abs(Y - (A.yv - 24)) < 5) & (axm < 42) & (Z < A.z_ap + 40), hu=600.0, lab=12)
    cv.paint(sl0, (axm < 4) & (Y < A.yv - 30) & (Y > -A.bb + 8), hu=600.0, lab=12)
    cv.paint(sl0, ((X - A.xm) / 15.0) ** 2 + ((Y - y_can) / 15.0) ** 2 < 1.0, hu=650.0, lab=12)
    cv.paint(sl0, can < 1.0, hu=20.0, lab=12)
    cv.paint(sl0, vb < 1.0, hu=np.where(vb > 0.62, 780.0, 230.0), lab=12)
    disk = np.mod(Z - A.disk_off, 27.0) < 5.5
    cv.paint(sl0, (vb < 0.8) & disk, hu=85.0)

    # --- lymph nodes, hiatal hernia ---
    for st in A.nodes_normal:
        _paint_spot(cv, _STATIONS[st](A), 3.5, hu=38.0, lab=18, only=(18,) + LUNG_IDS)
    if "Hiatal hernia" in F:
        hh = F["Hiatal hernia"]
        c, r = np.asarray(hh["c"]), np.asarray(hh["r"])
        box = grid.around(c, r + 2)
        if box is not None:
            sl, Xs, Ys, Zs = box
            q = np.sqrt(_ell_q2(Xs, Ys, Zs, c, np.maximum(r, grid.min_radius(1.0))))
            inner = np.where(Ys > c[1] + 0.15 * r[1], -1000.0, 20.0)
            cv.paint(
                sl,
                q < 1.0,
                hu=np.where(q > 0.8, 45.0, inner),
                lab=16,
                les=LESION_IDS["Hiatal hernia"],
                only=(1, 7, 11, 15, 16, 18, 19, 20) + LUNG_IDS,
            )
        refs["Hiatal hernia"] = c
    if "Lymphadenopathy" in F:
        for node in F["Lymphadenopathy"]["nodes"]:
            r = node["short_axis"] / 2
            rr = np.maximum(grid.min_radius(r), [r, r, 1.3 * r])
            free = (18, 19) + LUNG_IDS
            # Nodes sit in fat between the vessels: shift the station point to where the node has most room.
            best, c = -1, np.asarray(_STATIONS[node["station"]](A), float)
            for off in _NODE_SHIFTS:
                cand = np.asarray(_STATIONS[node["station"]](A), float) + off
                box = grid.around(cand, rr + 1)
                if box is None:
                    continue
                sl, Xs, Ys, Zs = box
                room = int(((_ell_q2(Xs, Ys, Zs, cand, rr) < 1.0) & np.isin(cv.lab[sl], free)).sum())
                if room > best:
                    best, c = room, cand
            box = grid.around(c, rr + 1)
            if box is not None:
                sl, Xs, Ys, Zs = box
                cv.paint(
                    sl, _ell_q2(Xs, Ys, Zs, c, rr) < 1.0, hu=42.0, lab=18, les=LESION_IDS["Lymphadenopathy"], only=free
                )
            refs.setdefault("Lymphadenopathy", c)

    # --- lungs: effusion, parenchymal patterns, airways, vessels, focal lesions ---
    if "Pleural effusion" in F:
        for side, t in F["Pleural effusion"]["t"].items():
            ylev = A.yc - A.bc + t
            sidemask = (X > A.xm) if side == "right" else (X < A.xm)
            ids = (RIGHT_LOBES if side == "right" else LEFT_LOBES) + (19,)
            cv.paint(sl0, sidemask & (Y < ylev), hu=12.0, lab=19, les=LESION_IDS["Pleural effusion"], only=ids)
            refs["Pleural effusion"] = np.array(
                [A.xm + (0.55 if side == "right" else -0.55) * A.ac, A.yc - A.bc + 6, A.z_dR + 10]
            )
    lungmask = np.isin(cv.lab, LUNG_IDS)
    if "Mosaic attenuation pattern" in F:
        nm = bank.sample_grid("mosaic", grid, step=10.0, passes=2)
        low = lungmask & (nm < F["Mosaic attenuation pattern"]["thr"])
        cv.paint(sl0, lungmask & ~low, hu=cv.hu + 30.0)
        cv.paint(sl0, low, hu=cv.hu - 65.0, les=LESION_IDS["Mosaic attenuation pattern"])
        refs["Mosaic attenuation pattern"] = np.array([A.xm + 0.5 * A.ac, A.yc, A.z_car - 40])
        del nm, low
    if "Emphysema" in F:
        ne = bank.sample_grid("emphysema", grid, step=7.0, passes=1)
        zfrac = np.clip((A.z_ap - Z) / (A.z_ap - A.z_dR), 0, 1)
        emph = lungmask & (ne > F["Emphysema"]["thr0"] + 0.8 * zfrac)
        cv.paint(sl0, emph, hu=-975.0, les=LESION_IDS["Emphysema"])
        for b in F["Emphysema"]["bullae"]:
            _paint_spot(cv, b["c"], b["r"], hu=-990.0, les=LESION_IDS["Emphysema"], only=LUNG_IDS)
            refs["Emphysema"] = np.asarray(b["c"])
        del ne, emph
    airway = np.zeros(grid.shape, bool)
    pb = F.get("Peribronchial thickening")
    be = F.get("Bronchiectasis")
    walls, lumen_list = [], []
    for p0, p1, r0, r1, lobe, gen in A.bronchi:
        wall, les_w, les_l = 0.3 * r0 + 0.3, None, None
        if pb is not None and gen in (2, 3):
            wall, les_w = pb["wall"], LESION_IDS["Peribronchial thickening"]
            refs["Peribronchial thickening"] = p1
        if be is not None and lobe == be["lobe"] and gen >= 3:
            r0 = r1 = max(r0, r1) * be["factor"]
            wall, les_w = 2.0, LESION_IDS["Bronchiectasis"]
            les_l = les_w
            refs["Bronchiectasis"] = p1
        walls.append((_tube_masks(grid, [p0, p1], [r0, r1], extra=wall), les_w, lobe))
        lumen_list.append((_tube_masks(grid, [p0, p1], [r0, r1]), les_l, lobe))
    for masks, les_w, lobe in walls:
        for sl, m in masks:
            airway[sl] |= cv.paint(sl, m, hu=30.0, les=les_w, only=(lobe,))
    for masks, les_l, lobe in lumen_list:
        for sl, m in masks:
            cv.paint(sl, m, hu=-990.0, les=les_l, only=(lobe,))
    lumen = lungmask & (cv.hu < -985)  # airway lumen (and bullae) for air bronchograms
    d_hil = np.minimum(
        np.sqrt((X - A.hilum_R[0]) ** 2 + (Y - A.hilum_R[1]) ** 2 + (Z - A.hilum_R[2]) ** 2),
        np.sqrt((X - A.hilum_L[0]) ** 2 + (Y - A.hilum_L[1]) ** 2 + (Z - A.hilum_L[2]) ** 2),
    )
    e = 0.11 + 0.30 * np.exp(-d_hil / 60.0)
    del d_hil
    n1 = bank.sample_grid("vessel-1", grid, step=6.0, passes=2)
    ves = np.abs(n1) < e
    del n1
    n2 = bank.sample_grid("vessel-2", grid, step=6.0, passes=2)
    ves &= np.abs(n2) < e
    del n2, e
    ves &= lungmask & ~airway & (cv.les != LESION_IDS["Emphysema"])  # emphysema destroys the capillary bed
    cv.paint(sl0, ves, hu=scan.vessel_hu)
    del ves
    if "Interlobular septal thickening" in F:
        depth = F["Interlobular septal thickening"]["depth"]
        ns = bank.sample_grid("septal", grid, step=4.0, passes=1)
        sub = lungmask & (rho < 1.0) & (rho > 1.0 - depth / (0.5 * (A.ac + A.bc))) & np.isin(cv.lab, (4, 6))
        cv.paint(sl0, sub & (np.abs(ns) < 0.15) & ~airway, hu=-260.0, les=LESION_IDS["Interlobular septal thickening"])
        refs["Interlobular septal thickening"] = np.array([A.xm + 0.8 * A.ac, A.yc - 0.3 * A.bc, A.z_dR - 5])
        del ns, sub
    if "Pulmonary fibrotic sequela" in F:
        fs = F["Pulmonary fibrotic sequela"]
        for p0, p1 in fs["strands"]:
            rr = max(1.8, 0.55 * max(grid.spacing[:2]))
            for sl, m in _tube_masks(grid, [p0, p1], rr):
                cv.paint(sl, m, hu=15.0, les=LESION_IDS["Pulmonary fibrotic sequela"], only=(fs["lobe"],))
        _paint_spot(cv, fs["c"], 5.0, hu=25.0, les=LESION_IDS["Pulmonary fibrotic sequela"], only=(fs["lobe"],))
        refs["Pulmonary fibrotic sequela"] = np.asarray(fs["c"])
    if "Lung opacity" in F:
        for b in F["Lung opacity"]["blobs"]:
            c, r = np.asarray(b["c"]), b["r"]
            box = grid.around(c, 1.45 * r + 2)
            if box is None:
                continue
            sl, Xs, Ys, Zs = box
            nl = bank.sample_grid("lobulation", grid, sl=sl, step=6.0, passes=1)
            d = np.sqrt(_ell_q2(Xs, Ys, Zs, c, (r, r, r))) * (1.0 + 0.18 * nl)
            w = np.clip((1.35 - d) / 0.7, 0.0, 1.0)
            inlobe = cv.lab[sl] == b["lobe"]
            cur = cv.hu[sl]
            cv.paint(sl, inlobe & (w > 0) & ~lumen[sl], hu=np.maximum(cur, cur * (1 - w) + (-520.0 + 30 * nl) * w))
            cv.paint(sl, inlobe & (w >= 0.5), les=LESION_IDS["Lung opacity"])
            refs["Lung opacity"] = c
    if "Atelectasis" in F:
        at = F["Atelectasis"]
        c, n = np.asarray(at["c"]), np.asarray(at["n"])
        box = grid.around(c, at["ext"] + 2)
        if box is not None:
            sl, Xs, Ys, Zs = box
            dpl = np.abs((Xs - c[0]) * n[0] + (Ys - c[1]) * n[1] + (Zs - c[2]) * n[2])
            half = max(at["th"] / 2, 0.55 * float(np.max(np.abs(n) * np.asarray(grid.spacing))))
            dd = np.sqrt(_ell_q2(Xs, Ys, Zs, c, (1.0, 1.0, 1.0)))
            cv.paint(sl, (dpl < half) & (dd < at["ext"]), hu=22.0, les=LESION_IDS["Atelectasis"], only=(at["lobe"],))
        refs["Atelectasis"] = c
    if "Consolidation" in F:
        co = F["Consolidation"]
        c, r = np.asarray(co["c"]), co["r"]
        box = grid.around(c, 1.3 * r + 2)
        if box is not None:
            sl, Xs, Ys, Zs = box
            nl = bank.sample_grid("lobulation", grid, sl=sl, step=6.0, passes=1)
            m = (np.sqrt(_ell_q2(Xs, Ys, Zs, c, (r, r, r))) * (1.0 + 0.2 * nl) < 1.0) & (cv.lab[sl] == co["lobe"])
            cv.paint(sl, m & ~lumen[sl], hu=28.0 + 8.0 * nl, les=LESION_IDS["Consolidation"])
            cv.paint(sl, m & lumen[sl], les=LESION_IDS["Consolidation"])  # air bronchograms
        refs["Consolidation"] = c
    if "Lung nodule" in F:
        for nod in F["Lung nodule"]["nodules"]:
            c, r = np.asarray(nod["c"]), nod["r"]
            rr = grid.min_radius(r)
            box = grid.around(c, 1.2 * rr + 2)
            if box is None:
                continue
            sl, Xs, Ys, Zs = box
            nl = bank.sample_grid("lobulation", grid, sl=sl, step=6.0, passes=1)
            m = np.sqrt(_ell_q2(Xs, Ys, Zs, c, rr)) * (1.0 + 0.1 * nl) < 1.0
            cv.paint(sl, m, hu=36.0 + 6.0 * nl, les=LESION_IDS["Lung nodule"], only=(nod["lobe"],))
            refs.setdefault("Lung nodule", c)

    # --- calcifications and devices (drawn last: highest lesion priority) ---
    if "Coronary artery wall calcification" in F:
        cc = F["Coronary artery wall calcification"]
        hc, haxes, hR = _heart_geometry(A, F)
        for d, r in zip(cc["dirs"], cc["rs"]):
            p = hc + hR @ (np.asarray(d) * haxes)
            _paint_spot(cv, p, r, hu=720.0, les=LESION_IDS["Coronary artery wall calcification"])
            refs.setdefault("Coronary artery wall calcification", p)
    if "Arterial wall calcification" in F:
        for spot in F["Arterial wall calcification"]["spots"]:
            _paint_spot(cv, spot["c"], spot["r"], hu=spot["hu"], les=LESION_IDS["Arterial wall calcification"])
            refs.setdefault("Arterial wall calcification", np.asarray(spot["c"]))
    if "Medical material" in F:
        kind = F["Medical material"]["kind"]
        k = LESION_IDS["Medical material"]
        wire_r = max(1.3, 0.55 * max(grid.spacing[:2]))
        hc = np.asarray(A.heart_c)
        if kind == "pacemaker":
            gen = np.array([A.xm - 0.5 * A.ab, A.bb - A.fat * 0.5 - 4, A.z_car + 20])
            half = np.maximum([22.0, 4.0, 25.0], 0.55 * np.asarray(grid.spacing))
            box = grid.around(gen, half)
            if box is not None:
                sl, Xs, Ys, Zs = box
                cv.paint(sl, np.ones((1, 1, 1), bool), hu=3000.0, les=k)
            lead = [
                gen,
                (A.xm - 45, A.yc + A.bc - 15, A.z_ap - 5),
                (A.xm + 24, A.y_asc, A.z_arch),
                tuple(hc + [30, 0, 0]),
                tuple(hc + [-25, 25, -25]),
            ]
            for sl, m in _tube_masks(grid, lead, wire_r):
                cv.paint(sl, m, hu=2500.0, les=k)
            refs["Medical material"] = gen
        elif kind == "catheter":
            line = [
                (A.xm + 40, A.y_asc - 10, 260.0),
                (A.xm + 28, A.y_asc - 2, A.z_arch + 30),
                (A.xm + 26, A.y_asc, A.heart_c[2] + 0.5 * A.heart_axes[2]),
            ]
            for sl, m in _tube_masks(grid, line, max(1.6, wire_r)):
                cv.paint(sl, m, hu=1400.0, les=k)
            refs["Medical material"] = np.asarray(line[1])
        else:  # sternotomy wires: small dense loops through the sternum
            y0 = A.yc + A.bc + 5
            for zz in np.linspace(A.z_dL + 20, A.z_ap - 20, 5):
                _paint_spot(cv, (A.xm, y0, zz), 4.0, hu=3000.0, les=k)
            refs["Medical material"] = np.array([A.xm, y0, 0.5 * (A.z_dL + A.z_ap)])
    return cv, refs


def _finish_hu(cv: Canvas, scan: SimpleNamespace, rng: np.random.Generator) -> np.ndarray:
    """Point-spread blur (about 2 mm wide, so its weight per voxel shrinks as voxels grow; halved in-plane for the
    sharp kernel) + noise → int16 HU (clipped to the 12-bit CT range)."""
    hu = cv.hu
    for ax, sp in enumerate(cv.grid.spacing):
        w = 0.25 * min(1.0, 2.0 / sp) * (0.5 if scan.sharp and ax < 2 else 1.0)
        hu = _blur_axis(hu, ax, w)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(scan.sigma)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


# ----------------------------------------------------------------------------------------------------------------
# Geometry of one volume
# ----------------------------------------------------------------------------------------------------------------


def _sample_geometry(rng, A, shape: Sequence[int], vary_depth: bool, orientation: str | None = None):
    D, H, W = (int(v) for v in shape)
    nz = max(4, int(round(D * _u(rng, 0.85, 1.15)))) if vary_depth else D
    fov = _u(rng, max(333.0, 2 * A.ab + 24), 460.0)
    dxy = fov / max(H, W)
    coverage = _u(rng, 275, 320)
    top = A.z_ap + _u(rng, 12, 35)
    dz = coverage / nz
    if orientation is None:
        orientation = str(rng.choice(list(ORIENTATIONS), p=ORIENTATION_P))
    signs = ORIENTATIONS[orientation]
    centre_pat = np.array([_u(rng, -8, 8), _u(rng, -12, 12), top - coverage / 2])
    world_c = np.array([_u(rng, -6, 6), _u(rng, -60, 60), _u(rng, -900, -100)])  # patient centre in world
    n = (W, H, nz)
    sp = (dxy, dxy, dz)
    coords, affine = [], np.eye(4)
    for ax in range(3):
        idx = np.arange(n[ax], dtype=np.float64)
        pat = signs[ax] * sp[ax] * (idx - (n[ax] - 1) / 2) + centre_pat[ax]
        coords.append(pat)
        affine[ax, ax] = signs[ax] * sp[ax]
        affine[ax, 3] = world_c[ax] + centre_pat[ax] - signs[ax] * sp[ax] * (n[ax] - 1) / 2
    grid = Grid(*coords)
    return SimpleNamespace(
        grid=grid, affine=affine, orientation=orientation, dxy=dxy, dz=dz, fov=fov, shape=n, world_c=world_c
    )


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _lobe_list(lobes: Iterable[int]) -> str:
    """'right lower lobe', 'right upper and lower lobes', 'right lower lobe and left upper lobe'."""
    lobes = sorted(set(int(v) for v in lobes))
    parts = []
    for side, ids in (("right", RIGHT_LOBES), ("left", LEFT_LOBES)):
        mine = [LOBE_NAMES[i].split()[1] for i in lobes if i in ids]
        if len(mine) == 1:
            parts.append(f"{side} {mine[0]} lobe")
        elif mine:
            parts.append(f"{side} {_join(mine)} lobes")
    return _join(parts)


_CMP = {
    "increased": [
        ", increased compared to the previous examination",
        ", which has increased since the previous examination",
    ],
    "decreased": [
        ", decreased compared to the previous examination",
        ", which has regressed since the previous examination",
    ],
    "unchanged": [", unchanged compared to the previous examination", ", stable compared to the previous examination"],
    "new": [", which is new compared to the previous examination", ", new since the previous examination"],
}


def _cmp_phrase(rng, change: str | None) -> str:
    if change is None:
        return ""
    return str(rng.choice(_CMP[change]))


def _positive(rng, name: str, f: Mapping[str, Any], cmp: str) -> tuple[str, str]:
    """(findings sentence, impression sentence) asserting one abnormality, with an optional comparison."""
    pick = lambda options: str(rng.choice(options))  # noqa: E731
    if name == "Medical material":
        kind = f["kind"]
        if kind == "pacemaker":
            s = pick(
                [
                    "A cardiac pacemaker is seen in the left pectoral region with its lead "
                    "extending into the right heart chambers{c}.",
                    "Pacemaker generator in the left anterior chest wall, lead tip in the right ventricle{c}.",
                ]
            )
            imp = "Cardiac pacemaker{c}."
        elif kind == "catheter":
            s = pick(
                [
                    "A central venous catheter is observed with its tip in the superior vena cava{c}.",
                    "Central venous catheter in place, its tip at the cavoatrial junction{c}.",
                ]
            )
            imp = "Central venous catheter{c}."
        else:
            s = pick(["Sternotomy wires are observed in the sternum{c}.", "Median sternotomy wires are present{c}."])
            imp = "Postoperative sternotomy wires{c}."
        return s.format(c=cmp), imp.format(c=cmp)
    if name == "Arterial wall calcification":
        s = pick(
            [
                "Calcific atherosclerotic plaques are observed in the wall of the thoracic aorta{c}.",
                "Atherosclerotic calcifications are seen in the aortic arch and descending aorta{c}.",
                "Calcified atheroma plaques are present in the thoracic aorta{c}.",
            ]
        )
        return s.format(c=cmp), f"Atherosclerotic calcification of the thoracic aorta{cmp}."
    if name == "Cardiomegaly":
        s = pick(
            [
                "Cardiomegaly is present{c}.",
                "The heart is enlarged (cardiomegaly){c}.",
                "The heart is enlarged, consistent with cardiomegaly{c}.",
            ]
        )
        return s.format(c=cmp), f"Cardiomegaly{cmp}."
    if name == "Pericardial effusion":
        t = int(round(f["t"]))
        s = pick(
            [
                "Pericardial effusion reaching {t} mm in thickness is observed{c}.",
                "There is pericardial effusion with a maximum thickness of {t} mm{c}.",
            ]
        )
        return s.format(t=t, c=cmp), f"Pericardial effusion{cmp}."
    if name == "Coronary artery wall calcification":
        s = pick(
            [
                "Calcific plaques are observed in the coronary arteries{c}.",
                "Coronary artery calcifications are present{c}.",
                "Calcification is seen along the course of the coronary arteries{c}.",
            ]
        )
        return s.format(c=cmp), f"Coronary artery calcification{cmp}."
    if name == "Hiatal hernia":
        s = pick(
            [
                "A hiatal hernia containing air and fluid is observed above the diaphragm{c}.",
                "Hiatal hernia is present at the lower end of the esophagus{c}.",
            ]
        )
        return s.format(c=cmp), f"Hiatal hernia{cmp}."
    if name == "Lymphadenopathy":
        nodes = sorted(f["nodes"], key=lambda n: -n["short_axis"])
        big = nodes[0]
        where = _join(sorted({n["station"] for n in nodes}))
        s = pick(
            [
                "Lymph nodes of pathological size are observed in the {w} stations, the largest "
                "{d} mm in short axis in the {b} station{c}.",
                "Mediastinal lymphadenopathy is present ({w}), the largest lymph node measuring "
                "{d} mm in short axis in the {b} station{c}.",
            ]
        )
        return (
            s.format(w=where, d=int(round(big["short_axis"])), b=big["station"], c=cmp),
            f"Mediastinal lymphadenopathy{cmp}.",
        )
    if name == "Emphysema":
        s = pick(
            [
                "Centrilobular and paraseptal emphysematous changes are observed in both "
                "lungs, more prominent in the upper lobes{c}.",
                "Emphysema is present in both lungs, predominantly in the upper zones, with bullae{c}.",
            ]
        )
        return s.format(c=cmp), f"Emphysema{cmp}."
    if name == "Atelectasis":
        where = _lobe_list([f["lobe"]])
        s = pick(
            [
                "Linear plate-like atelectasis is seen in the {w}{c}.",
                "Subsegmental atelectasis is observed in the {w}{c}.",
            ]
        )
        return s.format(w=where, c=cmp), f"Atelectasis in the {where}{cmp}."
    if name == "Lung nodule":
        nods = f["nodules"]
        if len(nods) == 1:
            n = nods[0]
            s = pick(
                [
                    "A solid nodule measuring {d} mm is seen in the {w}{c}.",
                    "There is a {d} mm soft-tissue nodule in the {w}{c}.",
                ]
            )
            s = s.format(d=int(round(2 * n["r"])), w=_lobe_list([n["lobe"]]), c=cmp)
        else:
            sizes = ", ".join(f"{int(round(2 * n['r']))} mm in the {LOBE_NAMES[n['lobe']]}" for n in nods)
            s = f"Multiple solid nodules are observed ({sizes}){cmp}."
        largest = max(int(round(2 * n["r"])) for n in nods)
        return (
            s,
            f"Pulmonary nodule{'s' if len(nods) > 1 else ''} in the "
            f"{_lobe_list([n['lobe'] for n in nods])}, the largest {largest} mm{cmp}.",
        )
    if name == "Lung opacity":
        where = _lobe_list([b["lobe"] for b in f["blobs"]])
        s = pick(
            [
                "Ground-glass opacities are observed in the {w}{c}.",
                "Patchy ground-glass densities are seen in the {w}{c}.",
            ]
        )
        return s.format(w=where, c=cmp), f"Ground-glass opacities in the {where}{cmp}."
    if name == "Pulmonary fibrotic sequela":
        where = _lobe_list([f["lobe"]])
        s = pick(
            [
                "Fibrotic sequelae with linear densities are observed in the {w}{c}.",
                "Sequelae fibrotic changes are seen in the {w}{c}.",
            ]
        )
        return s.format(w=where, c=cmp), f"Fibrotic sequelae in the {where}{cmp}."
    if name == "Pleural effusion":
        sides = sorted(f["t"])
        t = int(round(max(f["t"].values())))
        size = "small" if t < 30 else ("moderate" if t < 50 else "large")
        if len(sides) == 2:
            s = pick(
                [
                    "Bilateral {z} pleural effusion is observed, measuring up to {t} mm in thickness{c}.",
                    "There is {z} pleural effusion in both hemithoraces, up to {t} mm thick{c}.",
                ]
            )
            imp = "Bilateral pleural effusion{c}."
        else:
            s = pick(
                [
                    "A {z} pleural effusion measuring {t} mm in thickness is observed in the {sd} hemithorax{c}.",
                    "{Sd} {z} pleural effusion is present, {t} mm thick{c}.",
                ]
            )
            imp = "{Sd} pleural effusion{c}."
        kw = dict(z=size, t=t, c=cmp, sd=sides[0], Sd=_cap(sides[0]))
        return _cap(s.format(**kw)), imp.format(**kw)
    if name == "Mosaic attenuation pattern":
        s = pick(
            [
                "A mosaic attenuation pattern is observed in both lungs{c}.",
                "Both lungs show mosaic attenuation with geographic areas of low density{c}.",
            ]
        )
        return s.format(c=cmp), f"Mosaic attenuation pattern{cmp}."
    if name == "Peribronchial thickening":
        s = pick(
            [
                "Peribronchial thickening is observed in both lungs{c}.",
                "Bronchial wall thickening (peribronchial thickening) is present bilaterally{c}.",
            ]
        )
        return s.format(c=cmp), f"Peribronchial thickening{cmp}."
    if name == "Consolidation":
        where = _lobe_list([f["lobe"]])
        s = pick(
            [
                "Consolidation with air bronchograms is observed in the {w}{c}.",
                "There is an area of consolidation in the {w}{c}.",
                "Pneumonic consolidation is seen in the {w}{c}.",
            ]
        )
        return s.format(w=where, c=cmp), f"Consolidation in the {where}{cmp}."
    if name == "Bronchiectasis":
        where = _lobe_list([f["lobe"]])
        s = pick(
            ["Cylindrical bronchiectasis is observed in the {w}{c}.", "Bronchiectatic changes are seen in the {w}{c}."]
        )
        return s.format(w=where, c=cmp), f"Bronchiectasis in the {where}{cmp}."
    if name == "Interlobular septal thickening":
        s = pick(
            [
                "Interlobular septal thickening is observed in the subpleural areas of both lower lobes{c}.",
                "Subpleural interlobular septal thickening is seen in both lower lobes{c}.",
            ]
        )
        return s.format(c=cmp), f"Interlobular septal thickening{cmp}."
    raise KeyError(name)


def _resolved(name: str) -> str:
    if name == "Medical material":
        return "The previously noted medical material is no longer present."
    noun = {
        "Lung opacity": "ground-glass opacities",
        "Pulmonary fibrotic sequela": "fibrotic sequelae",
        "Lymphadenopathy": "lymphadenopathy",
    }.get(name, name.lower())
    return f"The previously described {noun} has resolved."


_SECTIONS = {
    "mediastinum": [
        "Medical material",
        "Cardiomegaly",
        "Pericardial effusion",
        "Arterial wall calcification",
        "Coronary artery wall calcification",
        "Lymphadenopathy",
        "Hiatal hernia",
    ],
    "lungs": [
        "Emphysema",
        "Mosaic attenuation pattern",
        "Lung nodule",
        "Consolidation",
        "Lung opacity",
        "Atelectasis",
        "Pulmonary fibrotic sequela",
        "Bronchiectasis",
        "Peribronchial thickening",
        "Interlobular septal thickening",
    ],
    "pleura": ["Pleural effusion"],
}


def _write_report(rng, A, F: Mapping[str, Any], changes: Mapping[str, str], scan: SimpleNamespace) -> dict[str, Any]:
    """CT-RATE style report; returns the CSV fields plus the sentences per section (for the CoT)."""
    pick = lambda options: str(rng.choice(options))  # noqa: E731
    sec: dict[str, list[str]] = {
        "airways": [],
        "mediastinum": [],
        "lungs": [],
        "pleura": [],
        "abdomen": [],
        "bones": [],
    }
    impressions: list[str] = []
    sec["airways"].append(
        pick(
            [
                "Trachea and both main bronchi are in the midline and patent.",
                "Trachea and main bronchi are open, and no obstructive pathology was detected in their lumens.",
                "The trachea and both main bronchi are patent.",
            ]
        )
    )
    if scan.contrast:
        sec["mediastinum"].append("Thoracic main vascular structures are opacified with contrast material.")
    else:
        sec["mediastinum"].append(
            pick(
                [
                    "Mediastinal structures were evaluated as suboptimal since contrast material was not given.",
                    "Examination was performed without intravenous contrast.",
                ]
            )
        )
    for section, names in _SECTIONS.items():
        for name in names:
            if name in F:
                s, imp = _positive(rng, name, F[name], _cmp_phrase(rng, changes.get(name)))
                sec[section].append(s)
                impressions.append(imp)
            elif changes.get(name) == "resolved":
                sec[section].append(_resolved(name))
    # Explicit negatives (CT-RATE style), merged where both are negative.
    neg = lambda n: n not in F and changes.get(n) != "resolved"  # noqa: E731
    med, lungs = sec["mediastinum"], sec["lungs"]
    if neg("Cardiomegaly") and neg("Pericardial effusion"):
        med.append(
            pick(
                [
                    "Heart size is normal and no pericardial effusion was observed.",
                    "Heart contour and heart size are normal; no pericardial effusion was detected.",
                ]
            )
        )
    elif neg("Cardiomegaly"):
        med.append("Heart size is normal.")
    elif neg("Pericardial effusion"):
        med.append("No pericardial effusion was detected.")
    med.append(
        pick(
            [
                "Calibration of the thoracic main vascular structures is natural.",
                "Thoracic aorta diameter is within normal limits.",
            ]
        )
    )
    if neg("Arterial wall calcification") and rng.random() < 0.5:
        med.append("No calcific atheroma was observed in the thoracic aorta.")
    if neg("Coronary artery wall calcification") and rng.random() < 0.5:
        med.append("No coronary artery calcification was observed.")
    if neg("Lymphadenopathy"):
        med.append(
            pick(
                [
                    "No lymph nodes of pathological size and appearance were detected in "
                    "the mediastinum or hilar regions.",
                    "No enlarged lymph nodes were observed in the mediastinum.",
                ]
            )
        )
    if neg("Hiatal hernia"):
        med.append(pick(["Thoracic esophagus calibration was normal.", "No hiatal hernia was observed."]))
    if neg("Emphysema") and rng.random() < 0.4:
        lungs.append("No emphysema was observed.")
    if neg("Lung nodule"):
        lungs.append(
            pick(
                [
                    "No mass or nodule was detected in either lung.",
                    "No nodular lesion was observed in the lung parenchyma.",
                ]
            )
        )
    if neg("Consolidation") and neg("Lung opacity"):
        lungs.append(
            pick(
                [
                    "No pneumonic consolidation or ground-glass opacity was observed.",
                    "No consolidation or ground-glass opacity was detected in either lung.",
                ]
            )
        )
    elif neg("Consolidation"):
        lungs.append("No consolidation was observed.")
    elif neg("Lung opacity"):
        lungs.append("No ground-glass opacity was observed.")
    if not any(n in F for n in _SECTIONS["lungs"]):
        lungs.insert(0, "Both lungs are well aerated.")
    if neg("Pleural effusion"):
        sec["pleura"].append(
            pick(
                ["No pleural effusion or pneumothorax was detected.", "There is no pleural effusion or pneumothorax."]
            )
        )
    else:
        sec["pleura"].append("No pneumothorax was detected.")
    sec["abdomen"].append(
        pick(
            [
                "Upper abdominal organs included in the sections are unremarkable.",
                "Liver and spleen are of normal size in the sections included.",
                "The upper abdominal organs within the scan range show no significant pathology.",
            ]
        )
    )
    sec["bones"].append(
        pick(
            [
                "No lytic or destructive lesion was detected in the bone structures.",
                "Degenerative changes are observed in the thoracic spine."
                if A.age > 55
                else "Vertebral body heights are preserved.",
                "Bone structures in the scan range are intact.",
            ]
        )
    )
    findings = " ".join(s for part in sec.values() for s in part)
    if not impressions:
        impressions = [
            pick(["No significant pathology was detected in the chest CT.", "Chest CT within normal limits."])
        ]
    thk = scan.slice_label
    technique = (
        f"{'Contrast-enhanced' if scan.contrast else 'Non-contrast'} chest CT was performed in the axial "
        f"plane with {thk} mm slice spacing; images were evaluated in lung and mediastinal windows."
    )
    return {
        "ClinicalInformation_EN": scan.clinical,
        "Technique_EN": technique,
        "Findings_EN": findings,
        "Impressions_EN": " ".join(impressions),
        "sections": sec,
        "impressions": impressions,
    }


_CLINICAL = [
    "Cough.",
    "Shortness of breath.",
    "Chest pain.",
    "Fever and cough for one week.",
    "Not given.",
    "Screening.",
    "Dyspnea on exertion.",
    "Weight loss.",
    "Preoperative evaluation.",
    "Hemoptysis.",
]

_APPEARANCE = {
    "Medical material": "a very dense (metallic, over 1000 HU) linear or box-shaped object",
    "Arterial wall calcification": "bright (over 400 HU) calcific foci in the wall of the aorta",
    "Cardiomegaly": "a heart whose transverse diameter exceeds half of the thoracic diameter",
    "Pericardial effusion": "a rim of fluid density (0 to 20 HU) surrounding the heart inside the pericardium",
    "Coronary artery wall calcification": "bright calcific foci along the coronary arteries on the heart surface",
    "Hiatal hernia": "an air- and fluid-containing structure above the diaphragm next to the esophagus",
    "Lymphadenopathy": "round soft-tissue nodes larger than 10 mm in short axis in the mediastinum",
    "Emphysema": "areas of very low attenuation (about -950 HU) without visible walls in the lungs",
    "Atelectasis": "a linear band of soft-tissue density within the lung",
    "Lung nodule": "a round soft-tissue density surrounded by aerated lung",
    "Lung opacity": "hazy increased lung density (about -500 HU) through which vessels remain visible",
    "Pulmonary fibrotic sequela": "irregular linear densities with volume loss",
    "Pleural effusion": "dependent fluid density (about 10 HU) layering posteriorly in the pleural space",
    "Mosaic attenuation pattern": "geographic patches of lower and higher lung density",
    "Peribronchial thickening": "thickened bronchial walls",
    "Consolidation": "lung replaced by soft-tissue density (0 to 40 HU) with air bronchograms",
    "Bronchiectasis": "dilated bronchi wider than the accompanying arteries",
    "Interlobular septal thickening": "fine subpleural lines outlining the secondary pulmonary lobules",
}

_REGION_WORDS = {
    "Medical material": "chest wall and mediastinum",
    "Arterial wall calcification": "thoracic aorta",
    "Cardiomegaly": "heart",
    "Pericardial effusion": "pericardium",
    "Coronary artery wall calcification": "coronary arteries",
    "Hiatal hernia": "esophageal hiatus",
    "Lymphadenopathy": "mediastinum",
    "Emphysema": "both lungs",
    "Mosaic attenuation pattern": "both lungs",
    "Peribronchial thickening": "bronchi of both lungs",
    "Interlobular septal thickening": "both lower lobes",
}

_LUNG_WINDOW = {
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
}


def _region_of(name: str, f: Mapping[str, Any]) -> str:
    if name == "Pleural effusion":
        sides = sorted(f["t"])
        return "both pleural spaces" if len(sides) == 2 else f"{sides[0]} pleural space"
    if name == "Lung nodule":
        return _lobe_list([n["lobe"] for n in f["nodules"]])
    if name == "Lung opacity":
        return _lobe_list([b["lobe"] for b in f["blobs"]])
    if name in ("Consolidation", "Atelectasis", "Pulmonary fibrotic sequela", "Bronchiectasis"):
        return _lobe_list([f["lobe"]])
    return _REGION_WORDS[name]


def _cot_entry(rng, volname: str, F: Mapping[str, Any], report: Mapping[str, Any]) -> dict[str, str]:
    sec = report["sections"]
    if rng.random() < 0.7:
        question = str(
            rng.choice(
                [
                    "What are the abnormal findings in this chest CT? Think step by step.",
                    "Describe the findings of this chest CT scan, reasoning through each anatomical region.",
                    "Analyse this chest CT systematically and give your impression.",
                ]
            )
        )
        steps = [
            ("Airways", sec["airways"]),
            ("Mediastinum and heart", sec["mediastinum"]),
            ("Lungs", sec["lungs"]),
            ("Pleura", sec["pleura"]),
            ("Upper abdomen and bones", sec["abdomen"] + sec["bones"]),
        ]
        answer = " ".join(f"Step {i + 1} ({title}): {' '.join(s)}" for i, (title, s) in enumerate(steps))
        answer += " Conclusion: " + " ".join(report["impressions"])
    else:
        name = str(rng.choice(ABNORMALITIES))
        question = f"Is there {name.lower()} in this chest CT? Explain your reasoning step by step."
        region = _REGION_WORDS.get(name, "lungs")
        steps = [f"Step 1: Identify the relevant anatomy ({region if name in _REGION_WORDS else 'lung parenchyma'})."]
        steps.append(f"Step 2: Look for the characteristic appearance: {_APPEARANCE[name]}.")
        if name in F:
            s, _ = _positive(rng, name, F[name], "")
            steps.append(f"Step 3: {s}")
            steps.append("Answer: Yes.")
        else:
            steps.append(f"Step 3: No such appearance is present, so there is no {name.lower()}.")
            steps.append("Answer: No.")
        answer = " ".join(steps)
    return {"volumename": volname, "question": question, "answer": answer}


def _omni_cot(name: str, f: Mapping[str, Any], region: str, area_mm2: float) -> list[str]:
    return [
        f"Locate the region: the abnormality lies in the {region}.",
        f"Describe the appearance: {_APPEARANCE[name]}.",
        f"Estimate the extent: the lesion covers about {int(round(area_mm2))} square millimetres on this axial slice.",
        f"Compare with normal anatomy: the {region} normally shows no such density.",
        f"Conclusion: the findings are consistent with {name.lower()}.",
    ]


# ----------------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------------


def _nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=3, mtime=0)


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(r)
    _write_bytes(path, buf.getvalue().encode("utf-8"))


def _write_json(path: Path, obj: Any) -> None:
    _write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def _jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue()


def _display_slice(arr3: np.ndarray, grid: Grid, k: int) -> np.ndarray:
    """Axial slice k in radiological display: rows anterior → posterior, columns patient right → left."""
    s = arr3[:, :, k]
    if grid.xs[0] < grid.xs[-1]:  # array x runs towards patient right → flip so columns run right → left
        s = s[::-1, :]
    if grid.ys[0] < grid.ys[-1]:  # array y runs towards anterior → flip so rows run anterior → posterior
        s = s[:, ::-1]
    return np.ascontiguousarray(s.T)


# ----------------------------------------------------------------------------------------------------------------
# Cohort
# ----------------------------------------------------------------------------------------------------------------

_MANUFACTURERS = [
    ("SIEMENS", "SOMATOM Definition Edge", ("Br40f", "Br60f")),
    ("PHILIPS", "Ingenuity CT", ("B", "L")),
    ("GE MEDICAL SYSTEMS", "Revolution EVO", ("STANDARD", "LUNG")),
    ("TOSHIBA", "Aquilion PRIME", ("FC08", "FC52")),
]


def _lesion_stats(les: np.ndarray, grid: Grid, affine: np.ndarray) -> dict[str, Any]:
    vox = float(np.prod(grid.spacing))
    counts = np.bincount(les.ravel(), minlength=len(ABNORMALITIES) + 1)
    out = {}
    for name, k in LESION_IDS.items():
        if counts[k] == 0:
            continue
        idx = np.nonzero(les == k)
        xs = grid.xs[idx[0]]
        out[name] = {
            "voxels": int(counts[k]),
            "volume_mm3": round(counts[k] * vox, 1),
            "right_voxels": int((xs > 0).sum()),
            "left_voxels": int((xs < 0).sum()),
        }
    return out


def _change_word(v_a: float, v_b: float) -> str | None:
    if v_a <= 0 and v_b > 0:
        return "new"
    if v_a > 0 and v_b <= 0:
        return "resolved"
    if v_a <= 0:
        return None
    r = v_b / v_a
    if r >= 1.3:
        return "increased"
    if r <= 0.77:
        return "decreased"
    return "unchanged"


def generate_cohort(
    out_dir: str | Path,
    n_train: int = 8,
    n_val: int = 4,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    *,
    p_prior: float = 0.35,
    p_second_recon: float = 0.15,
    p_raw: float = 1.0 / 3.0,
    p_contrast: float = 0.25,
    prevalence: float | Mapping[str, float] | None = None,
    vary_depth: bool = False,
    seg_target: str = SEGMENTATION_TARGET,
    progress: bool = False,
) -> dict[str, Any]:
    """Write a phantom chest-CT cohort (CT-RATE layout + OmniAbnorm, segmentation CSV, Libra JSON) to `out_dir`.

    Args:
        out_dir: cohort root (DIR in the module docstring); created if missing, files are overwritten.
        n_train, n_val: patients per split (a patient has one or two scans, each one or two reconstructions).
        seed: the same seed (and arguments) gives byte-identical files.
        shape: (D, H, W) voxels of each volume; NIfTI arrays are stored as (W, H, D).
        p_prior: fraction of patients with a follow-up scan `b` (compared with scan `a` in its report).
        p_second_recon: fraction of scans with a second reconstruction `_2`.
        p_raw: fraction of volumes stored as raw values (HU + 1024, RescaleIntercept -1024).
        p_contrast: fraction of contrast-enhanced scans.
        prevalence: one number for every abnormality, or a per-name mapping (default `PREVALENCE`).
        vary_depth: vary the number of slices per volume by ±15 % (as real scans do) instead of exactly D.
        seg_target: abnormality whose binary masks back the segmentation CSV.
        progress: show a tqdm progress bar over patients (both splits).

    Returns:
        A summary: counts, label prevalence, paths, elapsed seconds.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be (D, H, W) with every size >= 4, got {shape}")
    if seg_target not in LESION_IDS:
        raise ValueError(f"seg_target must be one of {ABNORMALITIES}, got {seg_target!r}")
    if prevalence is None:
        prev = dict(PREVALENCE)
    elif isinstance(prevalence, Mapping):
        prev = {**PREVALENCE, **{k: float(v) for k, v in prevalence.items()}}
    else:
        prev = {k: float(prevalence) for k in ABNORMALITIES}
    unknown = set(prev) - set(ABNORMALITIES)
    if unknown:
        raise ValueError(f"unknown abnormalities in prevalence: {sorted(unknown)}")

    data = out / "dataset"
    manifest_vols: list[dict] = []
    omni_records: list[dict] = []
    seg_rows: list[list] = []
    per_split: dict[str, dict[str, list]] = {}
    n_volumes = 0
    bar = tqdm(total=n_train + n_val, desc="phantom cohort", unit="patient", disable=not progress)
    for split_code, (split, n_pat) in enumerate((("train", n_train), ("valid", n_val))):
        rep_rows, lab_rows, meta_rows, cot, libra = [], [], [], [], []
        for pid in range(1, n_pat + 1):
            rng = np.random.default_rng([seed, split_code, pid, 1])
            present_a = _sample_presence(rng, prev)
            A = _sample_anatomy(rng, "Emphysema" in present_a)
            bank = FieldBank([seed, split_code, pid, 2])
            S_a = _initial_sizes(rng, A, present_a)
            scans = ["a", "b"] if rng.random() < p_prior else ["a"]
            sizes = [S_a] + ([_evolve(rng, A, S_a, prev)] if len(scans) == 2 else [])
            Fs = _assemble(rng, A, sizes)
            manufacturer = _MANUFACTURERS[int(rng.integers(len(_MANUFACTURERS)))]
            date = _dt.date(2018, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 1400)))
            scan_vol_stats: list[dict] = []
            for si, (scan_letter, F) in enumerate(zip(scans, Fs)):
                srng = np.random.default_rng([seed, split_code, pid, 3, si])
                contrast = bool(srng.random() < p_contrast)
                n_recon = 2 if srng.random() < p_second_recon else 1
                if si == 1:
                    date = date + _dt.timedelta(days=int(srng.integers(60, 700)))
                clinical = (
                    str(srng.choice(_CLINICAL))
                    if si == 0
                    else str(srng.choice(["Follow-up.", "Control examination.", "Follow-up of known findings."]))
                )
                recon_records = []
                for recon in range(1, n_recon + 1):
                    vrng = np.random.default_rng([seed, split_code, pid, 4, si, recon])
                    geom = _sample_geometry(vrng, A, shape, vary_depth)
                    sharp = recon == 2
                    scan = SimpleNamespace(
                        contrast=contrast,
                        sharp=sharp,
                        blood_hu=_u(vrng, 170, 240) if contrast else _u(vrng, 35, 48),
                        myo_hu=_u(vrng, 95, 120) if contrast else _u(vrng, 40, 50),
                        liver_hu=_u(vrng, 95, 115) if contrast else _u(vrng, 52, 64),
                        spleen_hu=_u(vrng, 105, 125) if contrast else _u(vrng, 44, 52),
                        kidney_hu=_u(vrng, 140, 180) if contrast else _u(vrng, 28, 36),
                        sigma=_u(vrng, 9, 18) * (1.5 if sharp else 1.0),
                    )
                    scan.vessel_hu = scan.blood_hu
                    cv, refs = _render(A, F, geom.grid, scan, bank)
                    # Guarantee: every positive finding owns at least one voxel (tiny grids can miss a lesion).
                    fallback = []
                    for name in F:
                        k = LESION_IDS[name]
                        if not (cv.les == k).any():
                            ref = refs.get(name, np.zeros(3))
                            cv.les[geom.grid.nearest_index(ref)] = k
                            fallback.append(name)
                    hu = _finish_hu(cv, scan, vrng)
                    raw = bool(vrng.random() < p_raw)
                    stored = (hu.astype(np.int32) + 1024).astype(np.int16) if raw else hu
                    rel = volume_relative_path(split, pid, scan_letter, recon)
                    volname = rel.rsplit("/", 1)[1]
                    _write_bytes(data / rel, _nifti_bytes(stored, geom.affine))
                    _write_bytes(out / "masks" / "anatomy" / rel, _nifti_bytes(cv.lab, geom.affine))
                    _write_bytes(out / "masks" / "lesion" / rel, _nifti_bytes(cv.les, geom.affine))
                    seg_rel = f"segmentation/labels/{split}/{volname}"
                    seg_mask = (cv.les == LESION_IDS[seg_target]).astype(np.uint8)
                    _write_bytes(out / seg_rel, _nifti_bytes(seg_mask, geom.affine))
                    seg_rows.append([f"dataset/{rel}", seg_rel, f"{split}_{pid}", split])
                    stats = _lesion_stats(cv.les, geom.grid, geom.affine)
                    kernel = manufacturer[2][1 if sharp else 0]
                    meta_rows.append(
                        [
                            volname,
                            manufacturer[0],
                            manufacturer[1],
                            f"CHEST {'W' if contrast else 'WO'} CONTRAST",
                            A.sex,
                            f"{A.age:03d}Y",
                            date.strftime("%Y%m%d"),
                            kernel,
                            round(geom.dz, 4),
                            round(geom.fov, 2),
                            f"[{geom.dxy:.6f}, {geom.dxy:.6f}]",
                            round(geom.dz, 6),
                            1,
                            -1024 if raw else 0,
                            "HU",
                            geom.shape[1],
                            geom.shape[0],
                            geom.shape[2],
                            "".join(nib.aff2axcodes(geom.affine)),
                            "YES" if contrast else "NO",
                            120,
                        ]
                    )
                    recon_records.append(
                        dict(
                            volname=volname,
                            rel=rel,
                            geom=geom,
                            stats=stats,
                            cv=None,
                            raw=raw,
                            fallback=fallback,
                            contrast=contrast,
                        )
                    )
                    if recon == 1:
                        # OmniAbnorm-style 2D cases: the axial slice with the largest area of each finding.
                        for name in F:
                            k = LESION_IDS[name]
                            area = (cv.les == k).sum(axis=(0, 1))
                            if area.max() == 0:
                                continue
                            kz = int(np.argmax(area))
                            level, width = (-600.0, 1500.0) if name in _LUNG_WINDOW else (40.0, 400.0)
                            img = _display_slice(hu, geom.grid, kz).astype(np.float32)
                            img = np.clip((img - (level - width / 2)) / width * 255.0, 0, 255).round().astype(np.uint8)
                            msk = (_display_slice(cv.les, geom.grid, kz) == k).astype(np.uint8) * 255
                            case_id = f"{split}_{pid}_{scan_letter}_{k:02d}"
                            _write_bytes(
                                out / "omniabnorm" / "images" / f"{case_id}.jpg",
                                _jpeg_bytes(Image.fromarray(img, "L").convert("RGB"), 95),
                            )
                            _write_bytes(
                                out / "omniabnorm" / "masks" / f"{case_id}.jpg",
                                _jpeg_bytes(Image.fromarray(msk, "L"), 100),
                            )
                            region = _region_of(name, F[name])
                            area_mm2 = float(area[kz]) * geom.dxy * geom.dxy
                            omni_records.append(
                                {
                                    "case_id": case_id,
                                    "region": region,
                                    "category": name,
                                    "cot_reasoning": _omni_cot(name, F[name], region, area_mm2),
                                    "split": split,
                                    "source_volume": volname,
                                    "slice_index": kz,
                                }
                            )
                    del cv, hu, stored
                    n_volumes += 1
                scan_vol_stats.append(recon_records[0]["stats"])
                # Prior comparisons from the measured lesion volumes (first reconstructions of both scans).
                changes: dict[str, str] = {}
                if si == 1:
                    prev_stats = scan_vol_stats[0]
                    for name in ABNORMALITIES:
                        v_a = prev_stats.get(name, {}).get("volume_mm3", 0.0)
                        v_b = recon_records[0]["stats"].get(name, {}).get("volume_mm3", 0.0)
                        word = _change_word(v_a, v_b)
                        if word == "resolved" and name in F:
                            word = None
                        if word in ("increased", "decreased") and name not in SIZED:
                            word = None  # chronic findings: no size claim when the grids disagree
                        if word is not None:
                            changes[name] = word
                rrng = np.random.default_rng([seed, split_code, pid, 5, si])
                scan_ns = SimpleNamespace(
                    contrast=contrast, clinical=clinical, slice_label=int(round(recon_records[0]["geom"].dz)) or 1
                )
                report = _write_report(rrng, A, F, changes, scan_ns)
                for rec in recon_records:
                    volname = rec["volname"]
                    rep_rows.append(
                        [
                            volname,
                            report["ClinicalInformation_EN"],
                            report["Technique_EN"],
                            report["Findings_EN"],
                            report["Impressions_EN"],
                        ]
                    )
                    lab_rows.append([volname] + [int(n in F) for n in ABNORMALITIES])
                    cot.append(_cot_entry(rrng, volname, F, report))
                    manifest_vols.append(
                        {
                            "volume_name": volname,
                            "split": split,
                            "patient": pid,
                            "scan": scan_letter,
                            "path": f"dataset/{rec['rel']}",
                            "anatomy_mask": f"masks/anatomy/{rec['rel']}",
                            "lesion_mask": f"masks/lesion/{rec['rel']}",
                            "orientation": rec["geom"].orientation,
                            "raw_storage": rec["raw"],
                            "contrast": rec["contrast"],
                            "spacing": [rec["geom"].dxy, rec["geom"].dxy, rec["geom"].dz],
                            "labels": {n: int(n in F) for n in ABNORMALITIES},
                            "findings": _round(F),
                            "comparison": changes,
                            "lesion_stats": rec["stats"],
                            "fallback_voxels": rec["fallback"],
                            "patient_centre_world": _round(rec["geom"].world_c, 3),
                        }
                    )
                cur = f"dataset/{recon_records[0]['rel']}"
                prior = f"dataset/{volume_relative_path(split, pid, scans[0], 1)}" if si == 1 else cur
                human = str(
                    rrng.choice(
                        [
                            "<image>\nProvide a detailed description of the findings in this chest CT.",
                            "<image>\nDescribe the findings of the chest CT scan.",
                            "<image>\nWrite the findings section of the radiology report for this chest CT.",
                        ]
                    )
                )
                if si == 1:
                    human += " Compare with the prior examination."
                libra.append(
                    {
                        "id": recon_records[0]["volname"].replace(".nii.gz", ""),
                        "image": [cur, prior],
                        "conversations": [
                            {"from": "human", "value": human},
                            {"from": "gpt", "value": report["Findings_EN"]},
                        ],
                    }
                )
            bar.update(1)
        _write_csv(
            data / "radiology_text_reports" / f"{split}_reports.csv",
            ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"],
            rep_rows,
        )
        _write_csv(
            data / "multi_abnormality_labels" / f"{split}_predicted_labels.csv",
            ["VolumeName", *ABNORMALITIES],
            lab_rows,
        )
        _write_csv(data / "metadata" / f"{split}_metadata.csv", METADATA_COLUMNS, meta_rows)
        _write_json(data / "cot" / f"{split}_cot.json", cot)
        _write_json(out / "libra" / f"{split}.json", libra)
        per_split[split] = {
            "volumes": len(rep_rows),
            "patients": n_pat,
            "positives": {n: int(sum(r[1 + i] for r in lab_rows)) for i, n in enumerate(ABNORMALITIES)},
        }
    bar.close()
    _write_csv(out / "segmentation.csv", ["path", "label", "patient_id", "split"], seg_rows)
    _write_json(out / "omniabnorm" / "cot.json", omni_records)
    _write_json(
        out / "phantom_manifest.json",
        {
            "generator": "trainers.data.phantom",
            "seed": seed,
            "shape_DHW": list(shape),
            "array_layout": "NIfTI (x, y, z) = (W, H, D); affines map to RAS+ world (+x = patient right)",
            "abnormalities": list(ABNORMALITIES),
            "lesion_ids": LESION_IDS,
            "lesion_priority": list(LESION_PRIORITY),
            "anatomy_regions": {str(k): v for k, v in ANATOMY_REGIONS.items()},
            "segmentation_target": seg_target,
            "volumes": manifest_vols,
        },
    )
    return {
        "out_dir": str(out),
        "seed": seed,
        "shape": list(shape),
        "volumes": n_volumes,
        "splits": per_split,
        "omniabnorm_cases": len(omni_records),
        "segmentation_csv": str(out / "segmentation.csv"),
        "segmentation_target": seg_target,
        "seconds": round(time.perf_counter() - t0, 2),
    }


METADATA_COLUMNS = [
    "VolumeName",
    "Manufacturer",
    "ManufacturerModelName",
    "SeriesDescription",
    "PatientSex",
    "PatientAge",
    "StudyDate",
    "ConvolutionKernel",
    "SliceThickness",
    "ReconstructionDiameter",
    "XYSpacing",
    "ZSpacing",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "Rows",
    "Columns",
    "NumberOfSlices",
    "Orientation",
    "ContrastAgent",
    "KVP",
]
