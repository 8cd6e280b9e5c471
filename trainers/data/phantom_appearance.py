"""How one phantom scan looks: contrast phase and tissue densities, field of view and patient pose, reconstruction
kernel, noise texture and artefacts. Everything here is drawn independently of the findings, so no finding is
predictable from the look of a scan (a model must find the lesion itself).

Per scan (`sample_scan`): contrast phase (non-contrast / arterial / venous) and every tissue's HU, CT table.
Per reconstruction (`sample_recon`): kernel sharpness (soft ↔ sharp lung kernel), point-spread width, edge
enhancement, noise level and texture (blotchy correlated noise for soft kernels, fine grain for sharp ones),
occasional ring or motion artefacts. Per scan (`sample_pose`): the patient's roll about z and offset in the field
of view, z coverage. Per volume (`sample_geometry`): field of view (hence in-plane spacing), slice count and thickness,
truncation of a large patient by the reconstruction circle, array orientation.

`finish_hu` turns a painted canvas into stored HU in the order the physics acts: motion → streaks from dense
material (metal, a dense contrast bolus) → point spread (kernel and slice thickness) → edge enhancement → ring →
noise → reconstruction circle (with the bright rim of truncation) → int16 clipped to the 12-bit CT range.
Findings keep their defining density under all of it: effusions stay fluid, emphysema stays below about -930 HU
(both are checked by the tests), because nothing here shifts tissue densities beyond their table ranges.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from .phantom_canvas import Canvas, Grid, blur_axis, gaussian_blur, uniform


__all__ = [
    "CONTRAST_PHASES",
    "ORIENTATIONS",
    "ORIENTATION_P",
    "finish_hu",
    "kernel_name",
    "sample_geometry",
    "sample_pose",
    "sample_recon",
    "sample_scan",
]

#: Array-axis directions (signs of the affine diagonal in RAS+) → nibabel axis codes; drawn with ORIENTATION_P.
ORIENTATIONS: dict[str, tuple[int, int, int]] = {
    "LPS": (-1, -1, 1),
    "RAS": (1, 1, 1),
    "LPI": (-1, -1, -1),
    "LAS": (-1, 1, 1),
}
ORIENTATION_P = (0.5, 0.25, 0.15, 0.10)

#: Contrast phases and their share among contrast-enhanced scans.
CONTRAST_PHASES = ("non-contrast", "arterial", "venous")
_ENHANCED_P = {"arterial": 0.4, "venous": 0.6}

#: Kernel names per manufacturer, soft → sharp (the metadata CSV's ConvolutionKernel).
_KERNELS = {
    "SIEMENS": ("Br36f", "Br40f", "Br44f", "Bl57f", "Br64f"),
    "PHILIPS": ("A", "B", "C", "YA", "L"),
    "GE MEDICAL SYSTEMS": ("SOFT", "STANDARD", "CHEST", "LUNG", "BONE"),
    "TOSHIBA": ("FC03", "FC08", "FC13", "FC51", "FC52"),
}


def kernel_name(manufacturer: str, sharpness: float) -> str:
    names = _KERNELS[manufacturer]
    return names[min(len(names) - 1, int(sharpness * len(names)))]


def sample_scan(rng: np.random.Generator, A, p_contrast: float) -> SimpleNamespace:
    """Contrast phase and tissue densities (HU) of one scan, and its CT table. Unenhanced values follow the
    anatomy table's ranges; enhancement raises blood, myocardium and organs, never fluid (effusions stay fluid)."""
    if rng.random() < p_contrast:
        phase = "arterial" if rng.random() < _ENHANCED_P["arterial"] else "venous"
    else:
        phase = "non-contrast"
    s = SimpleNamespace(phase=phase, contrast=phase != "non-contrast")
    s.fat_hu = uniform(rng, -115, -85)
    s.muscle_hu = uniform(rng, 38, 58)
    s.lung_hu = uniform(rng, -875, -805)  # inspiration depth
    s.lung_gradient = uniform(rng, 20, 80)  # dependent (posterior) density increase
    if phase == "non-contrast":
        s.blood_hu = uniform(rng, 32, 50)
        s.aorta_hu = s.pa_hu = s.svc_hu = s.blood_hu
        s.myo_hu = s.blood_hu + uniform(rng, 0, 12)
        s.liver_hu = uniform(rng, 50, 66)
        s.spleen_hu = uniform(rng, 42, 52)
        s.kidney_hu = uniform(rng, 28, 38)
        s.enhancement = 0.0
    elif phase == "arterial":
        s.aorta_hu = uniform(rng, 230, 450)
        s.pa_hu = s.aorta_hu * uniform(rng, 0.55, 1.0)
        s.blood_hu = 0.5 * (s.aorta_hu + s.pa_hu)
        # The injected arm's vein is still full of undiluted contrast in about half of arterial scans: dense
        # enough (1900-2800 HU) to cause streaks, as in real scans.
        s.svc_hu = uniform(rng, 1900, 2800) if rng.random() < 0.5 else uniform(rng, 250, 500)
        s.myo_hu = uniform(rng, 80, 120)
        s.liver_hu = uniform(rng, 62, 85)
        s.spleen_hu = uniform(rng, 90, 140)
        s.kidney_hu = uniform(rng, 150, 220)
        s.enhancement = uniform(rng, 10, 25)
    else:
        s.aorta_hu = uniform(rng, 130, 200)
        s.pa_hu = s.aorta_hu * uniform(rng, 0.85, 1.05)
        s.blood_hu = 0.5 * (s.aorta_hu + s.pa_hu)
        s.svc_hu = s.blood_hu + uniform(rng, 0, 40)
        s.myo_hu = uniform(rng, 90, 125)
        s.liver_hu = uniform(rng, 95, 130)
        s.spleen_hu = uniform(rng, 100, 130)
        s.kidney_hu = uniform(rng, 140, 190)
        s.enhancement = uniform(rng, 20, 40)
    s.vessel_hu = 0.5 * (s.pa_hu + s.aorta_hu)  # pulmonary arteries and veins together
    s.node_hu = uniform(rng, 35, 50) + 0.8 * s.enhancement
    s.table = {
        "gap": uniform(rng, 0, 12),
        "thickness": uniform(rng, 6, 16),
        "half_width": uniform(rng, 180, 240),
        "core_hu": uniform(rng, -300, -80),
        "shell_hu": uniform(rng, 100, 400),
    }
    return s


def sample_recon(rng: np.random.Generator, A, scan: SimpleNamespace, sharper: bool) -> SimpleNamespace:
    """Kernel, noise and artefacts of one reconstruction (`sharper`: the second, lung-kernel reconstruction)."""
    r = SimpleNamespace(**vars(scan))
    r.sharpness = uniform(rng, 0.7, 1.0) if sharper else float(rng.beta(1.2, 1.6))
    r.psf_mm = 0.35 + 0.9 * (1.0 - r.sharpness)  # in-plane point-spread sigma
    r.edge_gain = max(0.0, 1.5 * (r.sharpness - 0.5))
    habitus = float(np.clip(A.ab / 165.0, 0.8, 1.35)) ** 1.5
    r.noise_sigma = uniform(rng, 4, 18) * (1.0 + 1.6 * r.sharpness) * habitus
    r.noise_grain = 1.6 * (1.0 - r.sharpness)  # in-plane correlation of the noise (voxels²)
    r.ring = None
    if rng.random() < 0.07:
        r.ring = {"radius_frac": uniform(rng, 0.08, 0.7), "amplitude": uniform(rng, 15, 50) * rng.choice([-1, 1])}
    r.motion = None
    if rng.random() < 0.12:
        r.motion = {
            "kind": str(rng.choice(["doubling", "blur"])),
            "z_frac": (uniform(rng, 0.0, 0.2), uniform(rng, 0.45, 0.75)),  # lower slices: diaphragm and heart
            "shift_mm": uniform(rng, 2, 6),
            "weight": uniform(rng, 0.15, 0.3),
        }
    r.streak = {
        "amplitude": uniform(rng, 80, 300),
        "decay_mm": uniform(rng, 60, 150),
        "lines": int(rng.integers(6, 15)),
        "angle0": uniform(rng, 0, math.pi),
        "signs": rng.choice([-1.0, -1.0, 1.0], size=16),
        "jitter": rng.uniform(-0.15, 0.15, size=16),
    }
    return r


def sample_pose(rng: np.random.Generator, A) -> dict[str, Any]:
    """Where the patient lies for one scan (shared by its reconstructions): roll about z (a few degrees), offset
    of the field-of-view centre from the patient centre (±25 mm left-right, ±35 mm table height), z coverage
    (260–340 mm from above the lung apices into the upper abdomen) and the patient's position in world space."""
    return {
        "theta": float(np.clip(rng.normal(0.0, 3.0), -8.0, 8.0)),
        "offset": (uniform(rng, -25, 25), uniform(rng, -35, 35)),
        "coverage": uniform(rng, 260, 340),
        "top": A.z_ap + uniform(rng, 5, 40),
        "world_c": (uniform(rng, -6, 6), uniform(rng, -60, 60), uniform(rng, -900, -100)),
    }


def sample_geometry(
    rng: np.random.Generator,
    A,
    shape: Sequence[int],
    vary_depth: bool,
    pose: Mapping[str, Any],
    orientation: str | None = None,
) -> SimpleNamespace:
    """Voxel grid, affine and reconstruction geometry of one volume of a scan with the given `pose`.

    In-plane spacing = field of view / min(H, W); the reconstruction circle covers the patient with a margin,
    except in about 1 volume in 12 where a large patient is truncated (the lateral body wall lies outside the
    circle; the thorax and every lesion stay inside). `vary_depth` varies the slice count by ±15 %; the slice
    thickness is 0.9–1.25 × the slice spacing."""
    D, H, W = (int(v) for v in shape)
    nz = max(4, int(round(D * uniform(rng, 0.85, 1.15)))) if vary_depth else D
    off = np.asarray(pose["offset"], float)
    extent = max(A.ab, A.bb) + float(np.hypot(*off)) + 15.0
    thorax = A.ac + 20.0 + float(np.hypot(*off))
    truncated = bool(rng.random() < 1.0 / 12.0) and extent - thorax > 25.0
    if truncated:
        radius = uniform(rng, thorax + 5.0, extent - 15.0)
    else:
        radius = min(uniform(rng, extent, extent + 50.0), 250.0)
        truncated = radius < extent - 15.0
    dxy = 2.0 * radius / min(H, W)
    coverage = pose["coverage"]
    dz = coverage / nz
    thickness = float(np.clip(dz * uniform(rng, 0.9, 1.25), 0.6, 12.0))
    if orientation is None:
        orientation = str(rng.choice(list(ORIENTATIONS), p=ORIENTATION_P))
    signs = ORIENTATIONS[orientation]
    centre = np.array([off[0], off[1], pose["top"] - coverage / 2])  # field-of-view centre, scanner frame
    world_c = np.asarray(pose["world_c"], float)  # patient centre in world space
    n = (W, H, nz)
    sp = (dxy, dxy, dz)
    coords, affine = [], np.eye(4)
    for ax in range(3):
        idx = np.arange(n[ax], dtype=np.float64)
        c = signs[ax] * sp[ax] * (idx - (n[ax] - 1) / 2) + centre[ax]
        coords.append(c)
        affine[ax, ax] = signs[ax] * sp[ax]
        affine[ax, 3] = world_c[ax] + centre[ax] - signs[ax] * sp[ax] * (n[ax] - 1) / 2
    return SimpleNamespace(
        grid=Grid(*coords, theta=pose["theta"]),
        affine=affine,
        orientation=orientation,
        dxy=dxy,
        dz=dz,
        thickness=thickness,
        fov=2.0 * radius,
        circle_radius=radius,
        fov_centre=centre,
        theta=pose["theta"],
        truncated=truncated,
        shape=n,
        world_c=world_c,
    )


def _streaks(hu: np.ndarray, grid: Grid, recon: SimpleNamespace) -> np.ndarray | None:
    """Streaks radiating from dense material (> 1800 HU: metal, an undiluted contrast bolus; calcium and bone
    stay below) in each slice that holds some: alternating dark (photon starvation) and bright lines whose
    strength grows with the dense area and fades with distance."""
    dense = hu > 1800.0
    per_slice = dense.sum(axis=(0, 1))
    if not per_slice.any():
        return None
    p = recon.streak
    out = np.zeros_like(hu)
    xs, ys = grid.xs[:, None], grid.ys[None, :]
    width = max(1.5, 0.8 * grid.spacing[0])
    area_vox = grid.spacing[0] * grid.spacing[1]
    for k in np.flatnonzero(per_slice):
        m = dense[:, :, k]
        w = hu[:, :, k][m] - 1800.0
        i, j = np.nonzero(m)
        cx, cy = float((grid.xs[i] * w).sum() / w.sum()), float((grid.ys[j] * w).sum() / w.sum())
        dx, dy = xs - cx, ys - cy
        r = np.sqrt(dx * dx + dy * dy)
        amp = p["amplitude"] * min(1.0, per_slice[k] * area_vox / 150.0)
        s = np.zeros_like(r)
        for n in range(p["lines"]):
            a = p["angle0"] + math.pi * (n + p["jitter"][n]) / p["lines"]
            d = np.abs(-dx * math.sin(a) + dy * math.cos(a))  # distance to the line through the centroid
            s += p["signs"][n] * np.exp(-((d / width) ** 2))
        out[:, :, k] = amp * s * np.exp(-r / p["decay_mm"])
    return out


def _motion(hu: np.ndarray, grid: Grid, recon: SimpleNamespace) -> np.ndarray:
    """Respiratory/cardiac motion in a range of lower slices: a ghost shifted along y, or a blur along y."""
    m = recon.motion
    nz = hu.shape[2]
    z_lo, z_hi = m["z_frac"]
    # Lower slices: the smallest patient z, wherever they sit in the array.
    order = np.argsort(grid.zs)
    ks = order[int(z_lo * nz) : max(int(z_hi * nz), int(z_lo * nz) + 1)]
    sub = hu[:, :, ks]
    shift = max(1, int(round(m["shift_mm"] / grid.spacing[1])))
    if m["kind"] == "doubling":
        ghost = np.concatenate([sub[:, :1].repeat(shift, axis=1), sub[:, :-shift]], axis=1)[:, : sub.shape[1]]
        sub = (1.0 - m["weight"]) * sub + m["weight"] * ghost
    else:
        sub = gaussian_blur(sub, [0.0, float(shift**2) / 4.0, 0.0])
    out = hu.copy()
    out[:, :, ks] = sub
    return out


def finish_hu(cv: Canvas, recon: SimpleNamespace, geom: SimpleNamespace, rng: np.random.Generator) -> np.ndarray:
    """Painted canvas → stored HU (int16, -1024..3071) for one reconstruction; see the module docstring for the
    order of effects. Also clears the anatomy and lesion ids outside the reconstruction circle (nothing there
    is imaged)."""
    grid = cv.grid
    hu = cv.hu
    if recon.motion is not None:
        hu = _motion(hu, grid, recon)
    streaks = _streaks(cv.hu, grid, recon)
    dxy, dz = grid.spacing[0], grid.spacing[2]
    var_xy = (recon.psf_mm / dxy) ** 2 + 0.2
    var_z = (geom.thickness / dz) ** 2 / 12.0 + 0.2
    hu = gaussian_blur(hu, [var_xy, var_xy, var_z])
    if streaks is not None:
        hu = hu + gaussian_blur(streaks, [0.3, 0.3, 0.0])
    # A sharp kernel's overshoot is about a millimetre wide: voxels coarser than that average most of it away.
    gain = recon.edge_gain * min(1.0, 1.2 / dxy)
    if gain > 0:
        low = gaussian_blur(hu, [1.0, 1.0, 0.0])
        hu = hu + np.float32(gain) * (hu - low)
        del low
    xs = (grid.xs - geom.fov_centre[0])[:, None, None]
    ys = (grid.ys - geom.fov_centre[1])[None, :, None]
    r_iso = np.sqrt(xs * xs + ys * ys)
    if recon.ring is not None:
        r0 = recon.ring["radius_frac"] * geom.circle_radius
        hu = hu + np.float32(recon.ring["amplitude"]) * np.exp(-(((r_iso - r0) / (0.8 * dxy)) ** 2))
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    if recon.noise_grain > 0.05:
        noise = gaussian_blur(noise, [recon.noise_grain, recon.noise_grain, 0.1])
    else:
        noise = noise - 0.35 * blur_axis(blur_axis(noise, 0), 1)  # sharp kernels: high-pass grain
    noise *= np.float32(recon.noise_sigma / max(float(noise.std()), 1e-6))
    hu = hu + noise
    del noise
    outside = np.broadcast_to(r_iso > geom.circle_radius, hu.shape)
    if geom.truncated:
        body = cv.lab > 0
        rim = np.exp(-(geom.circle_radius - r_iso) / 6.0) * np.float32(uniform(rng, 80, 250))
        hu = hu + np.where(body & ~outside, rim, 0.0).astype(np.float32)
    hu = np.where(outside, np.float32(-1024.0), hu)
    cv.lab[outside] = 0
    cv.les[outside] = 0
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def appearance_record(recon: SimpleNamespace, geom: SimpleNamespace) -> dict[str, Any]:
    """JSON-ready summary of how a volume looks (for the manifest)."""
    artefacts = []
    if geom.truncated:
        artefacts.append("truncation")
    if recon.ring is not None:
        artefacts.append("ring")
    if recon.motion is not None:
        artefacts.append(f"motion ({recon.motion['kind']})")
    if recon.svc_hu > 1800:
        artefacts.append("contrast bolus streaks")
    return {
        "contrast_phase": recon.phase,
        "kernel_sharpness": round(recon.sharpness, 3),
        "noise_sigma_hu": round(recon.noise_sigma, 1),
        "slice_thickness_mm": round(geom.thickness, 2),
        "field_of_view_mm": round(geom.fov, 1),
        "patient_roll_deg": round(geom.theta, 2),
        "patient_offset_mm": [round(float(v), 1) for v in geom.fov_centre[:2]],
        "artefacts": artefacts,
    }
