"""Phantom chest-CT cohorts in the CT-RATE layout: the library's embedded default data set.

No real CT can be downloaded where this library is developed and tested, so `generate_cohort` draws analytic
chest phantoms (body wall, ribs, spine, sternum, five lung lobes with vessels and a bronchial tree, heart, great
vessels, trachea, oesophagus, liver, stomach, spleen, kidneys) with realistic Hounsfield units, places the 18
CT-RATE abnormalities in them (each with a lesion mask), images them with a widely varying scanner, and writes
everything the four seed formats need, from the same phantoms:

    DIR/dataset/{split}/{split}_{p}/{split}_{p}_{scan}/{split}_{p}_{scan}_{recon}.nii.gz     volumes (int16)
    DIR/dataset/radiology_text_reports/{split}_reports.csv       VolumeName, ClinicalInformation_EN,
                                                                 Technique_EN, Findings_EN, Impressions_EN
    DIR/dataset/multi_abnormality_labels/{split}_predicted_labels.csv   VolumeName + the 18 labels (0/1)
    DIR/dataset/metadata/{split}_metadata.csv                    VolumeName, Manufacturer, …, ConvolutionKernel,
                                                                 SliceThickness, RescaleSlope, RescaleIntercept,
                                                                 XYSpacing, ZSpacing, …, ContrastAgent
    DIR/dataset/cot/{split}_cot.json                             [{volumename, question, answer}]
    DIR/masks/anatomy/{split}/…same relative path….nii.gz        uint8 region ids (`hf_models.anatomy_rect`)
    DIR/masks/lesion/{split}/…same relative path….nii.gz         uint8 abnormality ids (LESION_IDS)
    DIR/omniabnorm/images/{case_id}.jpg, masks/{case_id}.jpg, cot.json    OmniAbnorm-CT style 2D cases
    DIR/segmentation.csv  (path, label, patient_id, split)       seed-002 segmentation CSV; the binary masks
    DIR/segmentation/labels/{split}/{volume}.nii.gz              of SEGMENTATION_TARGET (pleural effusion)
    DIR/libra/{split}.json                                       Libra/LLaVA conversations, [current, prior]
    DIR/phantom_manifest.json                                    ground truth per volume (finding parameters,
                                                                 appearance, prior comparisons, lesion volumes),
                                                                 the anatomy table and the findings table

`{split}` is `train` or `valid`; `{scan}` is `a` (earlier) / `b` (later follow-up of the same patient);
`{recon}` numbers reconstructions of one scan (`_2`: a sharp lung kernel on another voxel grid). Every path inside
a CSV/JSON is relative to DIR. The segmentation CSV sits in DIR itself because the seed-002 reader resolves its
paths against the CSV's own folder.

The generator is split by concern: `phantom_canvas` (voxel grid in scanner and patient frames, canvas, smooth
random fields), `phantom_anatomy` (the patient and its normal anatomy; region ids from the anatomy table
`hf_models.anatomy_rect.ANATOMY_REGIONS`), `phantom_findings` (the findings table `FINDINGS`: one `FindingSpec`
per abnormality with what, where, HU, size, prevalence, visibility and report sentences, and the per-finding
functions it dispatches to), `phantom_appearance` (scanner and patient pose), `phantom_reports` (texts and the
label extractor), and this module (patients → scans → volumes → files).

Conventions (read these before using the data):

- Arrays are NIfTI `(x, y, z)` = `(Columns, Rows, NumberOfSlices)` = `(W, H, D)` of `--shape D H W`.
  Affines are diagonal (no obliquity) and map voxels to nibabel's RAS+ world: **+x is the patient's RIGHT**,
  +y anterior, +z superior (so patient-left is world x below the midline). Array orientations vary per volume
  (`ORIENTATIONS`): LPS (x and y flipped, the DICOM/CT-RATE layout), RAS, LPI (z flipped too) and LAS.
  Left/right words in the reports are the patient's, so they agree with the affine, never with array indices.
- Patients lie off-centre in the field of view (±25 mm left-right, ±35 mm table height) and rolled about the
  long axis (normal, 3° SD, at most 8°): the patient's left-right axis is the world x axis only to within that
  roll (judge sides against the patient's mid-sagittal plane, e.g. through spine and sternum).
- About 1 volume in 3 stores raw scanner values, HU + 1024, with RescaleSlope 1 / RescaleIntercept -1024 in the
  metadata CSV, as CT-RATE ships; the others store HU (slope 1, intercept 0). The NIfTI headers carry no scaling.
- Spacing: in-plane spacing = field of view / min(H, W), the field of view being the reconstruction circle's diameter
  (clearing the body by 15–65 mm, at most 500 mm; about 1 volume in 12 truncates a large patient's lateral body wall,
  never the thorax or a lesion); slice spacing = z coverage (260–340 mm, lung apices to upper abdomen) / D, D varying
  by ±15 % with `vary_depth`; slice thickness 0.9–1.25 × the spacing. Small `--shape`s therefore give coarse voxels
  over the same anatomy. Outside the reconstruction circle the volume is -1024 HU and the masks 0.
- Lesion masks hold one abnormality id per voxel; where two abnormalities overlap the one earlier in
  `LESION_PRIORITY` (the findings table's paint order, reversed) wins. Every positive label has at least one voxel
  of its id; every negative label has none.
- Deterministic: the same arguments give byte-identical files (gzip mtime 0, fixed JPEG settings, fixed row
  order). Patients draw from their own random streams, so adding patients does not change the existing ones.

Appearance (`phantom_appearance`), drawn independently of the findings (a test renders the same cohort with every
finding and with none and gets identical appearance records), so a model can only find a finding by its lesion:
contrast phase (non-contrast, arterial, venous: `p_contrast` of scans are enhanced, 40 : 60) with tissue densities
to match (arterial aorta 230–450 HU, sometimes an undiluted bolus in the superior vena cava), reconstruction kernel
(soft ↔ sharp: point spread, edge enhancement, noise texture from blotchy to fine grain), noise (about 4–70 HU per
voxel, median near 18, larger for sharp kernels and big patients), body habitus (thorax size, 3–45 mm subcutaneous
fat, body outline), CT table, field of view and pose as above, and artefacts: streaks from metal or a dense bolus,
ring (7 %), respiratory motion ghosting or blur in the lower slices (12 %), truncation (8 %).

Findings (the table `FINDINGS`, in `phantom_findings`; independent draws with `PREVALENCE`, 15–35 %; every one is
drawn, none is always negative). `bench/phantom.py` renders each finding in the same patient and scan with and
without it: at 32×64×64 every finding changes at least 3 voxels by more than 3× the noise and 5 % of its reading
window in every patient drawn (mosaic attenuation in most), with median peak contrasts from about 350 HU (ground
glass) to 1000 HU (metal). Visible means the lesion is in the image; how hard it is to tell from normal anatomy at
a given size differs, and each row's `visible_at` says it:

- from 32×64×64, unmistakable: cardiomegaly (cardiothoracic ratio 0.54–0.68; normal hearts ≤ 0.46), pleural
  effusion (dependent fluid, 0–25 HU, 20–60 mm deep at the base with a meniscus), pericardial effusion (a
  8–22 mm fluid rim), emphysema (wall-less areas of -1005 to -960 HU, upper-zone predominant, bullae, flattened
  diaphragm; low-attenuation window), consolidation (soft tissue over 60–110 mm of one lobe with air
  bronchograms), hiatal hernia (air/fluid sac), lymphadenopathy (15–28 mm nodes), lung nodule (14–30 mm, solid),
  ground-glass opacity (-650 to -400 HU patches with vessels kept), atelectasis (a soft-tissue plate), pacemaker
  and sternotomy wires (with streaks);
- from 32×64×64 but subtle: mosaic attenuation (geographic patches 110–210 HU apart, lucent ones above -930 HU),
  interlobular septal thickening (a denser subpleural band of the lower lobes; the lines need about 64×256×256),
  fibrotic sequela (the scar; the strands from 48×128×128), peribronchial thickening (denser bronchovascular
  bundles; the walls themselves need about 64×192×192);
- from 48×128×128 for a sure read: coronary and aortic calcification (5–8 mm thick plaques of 800–1600 HU;
  partial volume dims them to about 430 HU at 32×64×64, and arterial-phase blood masks them), a lone central
  catheter, bronchiectasis (dilated air tubes, clear from 32×96×96).

Follow-up scans change sized findings (grow / shrink / resolve / appear) and their reports compare with the prior
using the measured lesion volumes. What a phantom cannot give: fine textures (centrilobular holes, individual
septal lines at coarse grids), compressive atelectasis next to an effusion, pneumothorax, and real anatomical
variety; its drawn walls and wires are point-sampled on the voxel grid (thin structures keep more contrast at
coarse grids than partial volume would leave them), except small spots and plaques whose density is diluted to
their true volume.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gzip
import io
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from hf_models.anatomy_rect import ANATOMY_REGIONS as ANATOMY_TABLE
from hf_models.anatomy_rect import NUM_ANATOMY_REGIONS

from .phantom_anatomy import (
    LEFT_LOBES,
    LOBE_IDS,
    LUNG_IDS,
    RIGHT_LOBES,
    draw_anatomy,
    draw_bronchial_tree,
    draw_lung_vessels,
    heart_geometry,
    sample_anatomy,
)
from .phantom_appearance import (
    ORIENTATIONS,
    appearance_record,
    finish_hu,
    kernel_name,
    sample_geometry,
    sample_pose,
    sample_recon,
    sample_scan,
)
from .phantom_canvas import Canvas, FieldBank, Grid
from .phantom_findings import (
    ABNORMALITIES,
    AIRWAY_LAYER,
    FINDINGS,
    LESION_IDS,
    LESION_PRIORITY,
    PREVALENCE,
    REPORT_KEYWORDS,
    SIZED,
    VESSEL_LAYER,
    FindingSpec,
    effusion_levels,
)
from .phantom_reports import CLINICAL, FOLLOW_UP, cot_entry, extract_labels, omni_cot, region_of, write_report


__all__ = [
    "ABNORMALITIES",
    "ANATOMY_REGIONS",
    "DEFAULT_SHAPE",
    "FINDINGS",
    "FindingSpec",
    "LEFT_LOBES",
    "LESION_IDS",
    "LESION_PRIORITY",
    "LOBE_IDS",
    "LUNG_IDS",
    "NUM_REGIONS",
    "ORIENTATIONS",
    "PREVALENCE",
    "REPORT_KEYWORDS",
    "RIGHT_LOBES",
    "SEGMENTATION_TARGET",
    "SIZED",
    "extract_labels",
    "generate_cohort",
    "render_volume",
    "volume_relative_path",
]

#: Anatomy-mask region id → name, from the anatomy table (`hf_models.anatomy_rect.ANATOMY_REGIONS`).
ANATOMY_REGIONS: dict[int, str] = {row.id: row.name for row in ANATOMY_TABLE}
NUM_REGIONS = NUM_ANATOMY_REGIONS

#: The abnormality whose binary masks back the seed-002 segmentation CSV.
SEGMENTATION_TARGET = "Pleural effusion"

#: Default `--shape` (D, H, W): 64 slices of 128 x 128.
DEFAULT_SHAPE = (64, 128, 128)


def volume_relative_path(split: str, patient: int, scan: str, recon: int) -> str:
    """`train, 3, 'b', 1` → `train/train_3/train_3_b/train_3_b_1.nii.gz` (CT-RATE's tree below `dataset/`)."""
    name = f"{split}_{patient}_{scan}_{recon}.nii.gz"
    return f"{split}/{split}_{patient}/{split}_{patient}_{scan}/{name}"


# ----------------------------------------------------------------------------------------------------------------
# Findings of a patient: presence, parameters per scan, placement shared by the scans
# ----------------------------------------------------------------------------------------------------------------


def _copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_copy(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.copy()
    return obj


def _sample_presence(rng, prevalence: Mapping[str, float]) -> list[str]:
    return [name for name in ABNORMALITIES if rng.random() < prevalence[name]]


def _initial_params(rng, A, present: Iterable[str]) -> dict[str, Any]:
    present = set(present)
    return {name: spec.sample(rng, A, spec) for name, spec in FINDINGS.items() if name in present}


def _evolve(rng, A, S_a: dict[str, Any], prevalence: Mapping[str, float]) -> dict[str, Any]:
    """Parameters at the follow-up scan: sized findings grow / shrink / stay / resolve, new ones appear; chronic
    findings persist unchanged (emphysema never appears or disappears: it changes the patient's anatomy)."""
    S_b: dict[str, Any] = {}
    fresh = _initial_params(rng, A, ABNORMALITIES)
    for name, spec in FINDINGS.items():
        if name in S_a:
            if spec.sized:
                plan = str(rng.choice(["increased", "decreased", "unchanged", "resolved"], p=[0.32, 0.28, 0.28, 0.12]))
                if name in ("Lung nodule", "Lymphadenopathy") and plan == "resolved":
                    plan = "unchanged"
                if plan == "increased":
                    S_b[name] = spec.scale(S_a[name], float(rng.uniform(2.4, 3.2)))
                elif plan == "decreased":
                    S_b[name] = spec.scale(S_a[name], float(rng.uniform(0.3, 0.42)))
                elif plan == "unchanged":
                    S_b[name] = _copy(S_a[name])
            else:
                S_b[name] = _copy(S_a[name])
        else:
            p_new = 0.0 if name == "Emphysema" else (0.14 if spec.sized else 0.05) * prevalence[name] / 0.25
            if rng.random() < p_new:
                S_b[name] = fresh[name]
    # Nodules: the same lesions (count) as the prior when both scans have them.
    if "Lung nodule" in S_a and "Lung nodule" in S_b:
        S_b["Lung nodule"]["r"] = S_b["Lung nodule"]["r"][: len(S_a["Lung nodule"]["r"])]
    return S_b


def _assemble(rng, A, params_per_scan: list[dict]) -> list[dict]:
    """Place each finding once per patient (the same lesion in the prior and the follow-up) and attach the
    placement to each scan's parameters → per-scan finding dicts `F` (name → parameters + placement)."""
    ctx = SimpleNamespace(
        effusion_level=effusion_levels(A, [S["Pleural effusion"] for S in params_per_scan if "Pleural effusion" in S])
    )
    placements: dict[str, Any] = {}
    for name, spec in FINDINGS.items():
        present = [S[name] for S in params_per_scan if name in S]
        if present and spec.place is not None:
            placements[name] = spec.place(rng, A, present, ctx)
    out = []
    for S in params_per_scan:
        F: dict[str, Any] = {}
        for name, spec in FINDINGS.items():
            if name not in S:
                continue
            params, placement = _copy(S[name]), placements.get(name, {})
            F[name] = spec.attach(params, placement) if spec.attach is not None else {**params, **placement}
        out.append(F)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Rendering one volume
# ----------------------------------------------------------------------------------------------------------------


def render_volume(A, F: Mapping[str, Any], grid: Grid, recon: SimpleNamespace, bank: FieldBank):
    """Paint one phantom volume: normal anatomy, then the findings of `F` in layer order (the table's `layer`),
    with the bronchial tree and the lung vessels as the anatomy layers in between.

    Returns the canvas (float HU before kernel/noise, anatomy and lesion ids) and a reference point (patient
    frame, mm) per finding."""
    heart: dict[str, Any] = {"scale": None, "t_pe": 0.0}
    for name, f in F.items():
        if FINDINGS[name].heart is not None:
            FINDINGS[name].heart(f, heart)
    heart["c"], heart["axes"], heart["R"] = heart_geometry(A, heart["scale"])
    cv = Canvas(grid)
    draw_anatomy(cv, A, recon, heart)
    ctx = SimpleNamespace(scan=recon, bank=bank, heart=heart)
    steps = [(FINDINGS[name].layer, name) for name in F] + [(AIRWAY_LAYER, "airways"), (VESSEL_LAYER, "vessels")]
    refs: dict[str, np.ndarray] = {}
    for _, step in sorted(steps):
        if step == "airways":
            draw_bronchial_tree(cv, A, recon)
        elif step == "vessels":
            draw_lung_vessels(cv, A, recon, bank, exclude=cv.les == LESION_IDS["Emphysema"])
        else:
            ref = FINDINGS[step].render(cv, A, F[step], ctx)
            if ref is not None:
                refs[step] = np.asarray(ref, float)
    return cv, refs


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
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# ----------------------------------------------------------------------------------------------------------------
# Cohort
# ----------------------------------------------------------------------------------------------------------------

_MANUFACTURERS = [
    ("SIEMENS", "SOMATOM Definition Edge"),
    ("PHILIPS", "Ingenuity CT"),
    ("GE MEDICAL SYSTEMS", "Revolution EVO"),
    ("TOSHIBA", "Aquilion PRIME"),
]

_SERIES = {"non-contrast": "CHEST WO CONTRAST", "arterial": "CHEST CTA ARTERIAL", "venous": "CHEST W CONTRAST"}


def _lesion_stats(les: np.ndarray, grid: Grid) -> dict[str, Any]:
    vox = float(np.prod(grid.spacing))
    counts = np.bincount(les.ravel(), minlength=len(ABNORMALITIES) + 1)
    out = {}
    for name, k in LESION_IDS.items():
        if counts[k] == 0:
            continue
        idx = np.nonzero(les == k)
        xs = grid.patient_x(idx[0], idx[1])
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


def _generate_patient(job: tuple) -> dict[str, Any]:
    """Draw, render and write one patient's volumes (all scans and reconstructions); return its rows for the CSV
    and JSON files. Patients are independent (own random streams, own files), so they can run in parallel."""
    out, split, split_code, pid, cfg = job
    seed, shape, prev, p_prior, p_second_recon = cfg.seed, cfg.shape, cfg.prev, cfg.p_prior, cfg.p_second_recon
    p_raw, p_contrast, vary_depth, seg_target = cfg.p_raw, cfg.p_contrast, cfg.vary_depth, cfg.seg_target
    data = out / "dataset"
    rows: dict[str, Any] = {k: [] for k in ("rep", "lab", "meta", "cot", "libra", "manifest", "omni", "seg")}
    rows["volumes"] = 0
    rng = np.random.default_rng([seed, split_code, pid, 1])
    present_a = _sample_presence(rng, prev)
    # Scan count, scanner and date before anything that depends on the findings: how the scans look must
    # not depend on them.
    scans = ["a", "b"] if rng.random() < p_prior else ["a"]
    manufacturer = _MANUFACTURERS[int(rng.integers(len(_MANUFACTURERS)))]
    date = _dt.date(2018, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 1400)))
    A = sample_anatomy(rng, "Emphysema" in present_a)
    bank = FieldBank([seed, split_code, pid, 2])
    S_a = _initial_params(rng, A, present_a)
    sizes = [S_a] + ([_evolve(rng, A, S_a, prev)] if len(scans) == 2 else [])
    Fs = _assemble(rng, A, sizes)
    scan_vol_stats: list[dict] = []
    for si, (scan_letter, F) in enumerate(zip(scans, Fs)):
        srng = np.random.default_rng([seed, split_code, pid, 3, si])
        scan_look = sample_scan(srng, A, p_contrast)
        pose = sample_pose(srng, A)
        contrast = scan_look.contrast
        n_recon = 2 if srng.random() < p_second_recon else 1
        if si == 1:
            date = date + _dt.timedelta(days=int(srng.integers(60, 700)))
        clinical = str(srng.choice(CLINICAL)) if si == 0 else str(srng.choice(FOLLOW_UP))
        recon_records = []
        for recon in range(1, n_recon + 1):
            vrng = np.random.default_rng([seed, split_code, pid, 4, si, recon])
            geom = sample_geometry(vrng, A, shape, vary_depth, pose)
            look = sample_recon(vrng, A, scan_look, sharper=recon == 2)
            cv, refs = render_volume(A, F, geom.grid, look, bank)
            hu = finish_hu(cv, look, geom, vrng)
            # Guarantee: every positive finding owns at least one voxel (tiny grids can miss a lesion).
            fallback = []
            for name in F:
                k = LESION_IDS[name]
                if not (cv.les == k).any():
                    ref = refs.get(name, np.zeros(3))
                    cv.les[geom.grid.nearest_index(ref)] = k
                    fallback.append(name)
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
            rows["seg"].append([f"dataset/{rel}", seg_rel, f"{split}_{pid}", split])
            stats = _lesion_stats(cv.les, geom.grid)
            kernel = kernel_name(manufacturer[0], look.sharpness)
            rows["meta"].append(
                [
                    volname,
                    manufacturer[0],
                    manufacturer[1],
                    _SERIES[look.phase],
                    A.sex,
                    f"{A.age:03d}Y",
                    date.strftime("%Y%m%d"),
                    kernel,
                    round(geom.thickness, 4),
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
                    appearance=appearance_record(look, geom),
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
                    level, width = (-600.0, 1500.0) if FINDINGS[name].window == "lung" else (40.0, 400.0)
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
                    region = region_of(name, F[name])
                    area_mm2 = float(area[kz]) * geom.dxy * geom.dxy
                    rows["omni"].append(
                        {
                            "case_id": case_id,
                            "region": region,
                            "category": name,
                            "cot_reasoning": omni_cot(name, region, area_mm2),
                            "split": split,
                            "source_volume": volname,
                            "slice_index": kz,
                        }
                    )
            del cv, hu, stored
            rows["volumes"] += 1
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
            phase=scan_look.phase,
            clinical=clinical,
            slice_label=int(round(recon_records[0]["geom"].dz)) or 1,
        )
        report = write_report(rrng, A, F, changes, scan_ns)
        for rec in recon_records:
            volname = rec["volname"]
            rows["rep"].append(
                [
                    volname,
                    report["ClinicalInformation_EN"],
                    report["Technique_EN"],
                    report["Findings_EN"],
                    report["Impressions_EN"],
                ]
            )
            rows["lab"].append([volname] + [int(n in F) for n in ABNORMALITIES])
            rows["cot"].append(cot_entry(rrng, volname, F, report))
            rows["manifest"].append(
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
                    "appearance": rec["appearance"],
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
        rows["libra"].append(
            {
                "id": recon_records[0]["volname"].replace(".nii.gz", ""),
                "image": [cur, prior],
                "conversations": [
                    {"from": "human", "value": human},
                    {"from": "gpt", "value": report["Findings_EN"]},
                ],
            }
        )
    return rows


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
    p_contrast: float = 0.5,
    prevalence: float | Mapping[str, float] | None = None,
    vary_depth: bool = False,
    seg_target: str = SEGMENTATION_TARGET,
    progress: bool = False,
    num_workers: int = 1,
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
        p_contrast: fraction of contrast-enhanced scans (arterial or venous phase, 40 : 60).
        prevalence: one number for every abnormality, or a per-name mapping (default `PREVALENCE`).
        vary_depth: vary the number of slices per volume by ±15 % (as real scans do) instead of exactly D.
        seg_target: abnormality whose binary masks back the segmentation CSV.
        progress: show a tqdm progress bar over patients (both splits).
        num_workers: processes drawing patients in parallel; the files are byte-identical for any value.

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
    if int(num_workers) < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
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
    cfg = SimpleNamespace(
        seed=seed,
        shape=shape,
        prev=prev,
        p_prior=p_prior,
        p_second_recon=p_second_recon,
        p_raw=p_raw,
        p_contrast=p_contrast,
        vary_depth=vary_depth,
        seg_target=seg_target,
    )
    splits = (("train", n_train), ("valid", n_val))
    jobs = [(out, split, code, pid, cfg) for code, (split, n_pat) in enumerate(splits) for pid in range(1, n_pat + 1)]
    results: dict[tuple[str, int], dict[str, Any]] = {}
    with tqdm(total=len(jobs), desc="phantom cohort", unit="patient", disable=not progress) as bar:
        if num_workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=num_workers) as pool:
                for job, rows in zip(jobs, pool.map(_generate_patient, jobs, chunksize=1)):
                    results[(job[1], job[3])] = rows
                    bar.update(1)
        else:
            for job in jobs:
                results[(job[1], job[3])] = _generate_patient(job)
                bar.update(1)
    for split, n_pat in splits:
        rep_rows, lab_rows, meta_rows, cot, libra = [], [], [], [], []
        for pid in range(1, n_pat + 1):
            rows = results[(split, pid)]
            rep_rows += rows["rep"]
            lab_rows += rows["lab"]
            meta_rows += rows["meta"]
            cot += rows["cot"]
            libra += rows["libra"]
            manifest_vols += rows["manifest"]
            omni_records += rows["omni"]
            seg_rows += rows["seg"]
            n_volumes += rows["volumes"]
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
            "anatomy_regions": {
                str(row.id): {"name": row.name, "description": row.description, "hu_range": list(row.hu_range)}
                for row in ANATOMY_TABLE
            },
            "findings": {
                name: {
                    "what": spec.what,
                    "regions": list(spec.regions),
                    "hu": list(spec.hu),
                    "size_mm": list(spec.size),
                    "size_of": spec.size_of,
                    "visible_at": spec.visible_at,
                }
                for name, spec in FINDINGS.items()
            },
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
