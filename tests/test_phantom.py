"""Phantom cohort generator (`trainers.data.phantom`, `rect-vlm synth`): layout, determinism, the anatomy and
findings tables and their users, appearance variation, and the consistency of volumes, masks, labels, reports,
prior comparisons and the three other seed formats.

World coordinates: NIfTI affines map to nibabel's RAS+ space, where +x points to the patient's RIGHT (and +y
anterior, +z superior). Patients lie slightly rolled and off-centre, so sides are judged against the patient's
mid-sagittal plane (through the spine and the sternum), never against array indices or the world x axis alone.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from hf_models.anatomy_rect import ANATOMY_REGIONS, NUM_ANATOMY_REGIONS, anatomy_region
from hf_models.configuration_rect import ReCTVisionConfig
from trainers.data import anatomy_terms
from trainers.data import phantom as P
from trainers.data.phantom_anatomy import sample_anatomy
from trainers.data.phantom_appearance import finish_hu, sample_geometry, sample_pose, sample_recon, sample_scan
from trainers.data.phantom_canvas import FieldBank
from trainers.data.phantom_reports import NEGATION


# An independent keyword table (not the generator's) for the report ↔ label checks.
KEYWORDS = {
    "Medical material": r"pacemaker|catheter|sternotomy",
    "Arterial wall calcification": r"(?=.*aort)(?=.*(calcif|atheroscler|atherom))",
    "Cardiomegaly": r"cardiomegaly|heart size|heart is enlarged",
    "Pericardial effusion": r"pericardial effusion",
    "Coronary artery wall calcification": r"coronary",
    "Hiatal hernia": r"hiatal hernia",
    "Lymphadenopathy": r"lymph node|lymphadenopathy",
    "Emphysema": r"emphysem",
    "Atelectasis": r"atelectasis",
    "Lung nodule": r"nodul",
    "Lung opacity": r"ground-glass",
    "Pulmonary fibrotic sequela": r"fibrotic",
    "Pleural effusion": r"pleural effusion",
    "Mosaic attenuation pattern": r"mosaic",
    "Peribronchial thickening": r"peribronchial",
    "Consolidation": r"consolidation",
    "Bronchiectasis": r"bronchiectasis|bronchiectatic",
    "Interlobular septal thickening": r"septal thickening",
}
NEGATED = re.compile(r"\b(no|not|without|normal|resolved)\b", re.I)
LATERAL = (
    "Lung nodule",
    "Pleural effusion",
    "Consolidation",
    "Atelectasis",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Bronchiectasis",
)
LOBE_RE = re.compile(r"\b(right|left) ((?:upper|middle|lower)(?:(?:, | and )(?:upper|middle|lower))*) lobes?\b")

#: The demo's smallest processed size: findings the generator documents as visible there must keep their density.
SHAPE = (32, 96, 96)

# Region ids spelled by name (the anatomy table is the source of truth; these are this test's expectations).
BACKGROUND, BODY_WALL, HEART, LIVER = (anatomy_region(n).id for n in ("background", "body wall", "heart", "liver"))
TRACHEA, SPINE, RIBS, STERNUM = (anatomy_region(n).id for n in ("trachea", "thoracic spine", "ribs", "sternum"))
PLEURA = anatomy_region("pleura").id
THORAX = tuple(
    anatomy_region(n).id
    for n in ("heart", "aorta", "pulmonary artery", "trachea", "oesophagus", "thoracic spine", "mediastinum", "pleura")
) + tuple(P.LUNG_IDS)
#: Thin structures: at coarse voxels their medians are partial volume with the neighbours (see the table's docstring).
THIN = {"aorta", "pulmonary artery", "trachea", "oesophagus", "ribs", "sternum", "pleura", "spleen"}


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+", text.strip()) if s]


def asserting(text: str, label: str) -> list[str]:
    """Sentences that assert `label` (keyword present, no negation cue)."""
    return [s for s in sentences(text) if re.search(KEYWORDS[label], s, re.I) and not NEGATED.search(s)]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def erode(mask: np.ndarray) -> np.ndarray:
    """6-neighbour erosion: the voxels of `mask` whose face neighbours are all in it (the lesion's interior)."""
    out = mask.copy()
    for axis in range(3):
        for shift in (1, -1):
            rolled = np.roll(mask, shift, axis=axis)
            edge = [slice(None)] * 3
            edge[axis] = 0 if shift == 1 else -1
            rolled[tuple(edge)] = False
            out &= rolled
    return out


class Cohort:
    def __init__(self, root: Path):
        self.root = root
        self.labels, self.reports, self.meta, self.cot = {}, {}, {}, {}
        for split in ("train", "valid"):
            d = root / "dataset"
            self.labels.update(
                {
                    r["VolumeName"]: r
                    for r in read_csv(d / "multi_abnormality_labels" / f"{split}_predicted_labels.csv")
                }
            )
            self.reports.update(
                {r["VolumeName"]: r for r in read_csv(d / "radiology_text_reports" / f"{split}_reports.csv")}
            )
            self.meta.update({r["VolumeName"]: r for r in read_csv(d / "metadata" / f"{split}_metadata.csv")})
            for rec in json.loads((d / "cot" / f"{split}_cot.json").read_text()):
                self.cot[rec["volumename"]] = rec
        self.manifest = json.loads((root / "phantom_manifest.json").read_text())
        self.volumes = {v["volume_name"]: v for v in self.manifest["volumes"]}
        self._cache: dict = {}

    @staticmethod
    def rel(name: str) -> str:
        split, pid, scan, _ = name[: -len(".nii.gz")].split("_")
        return f"{split}/{split}_{pid}/{split}_{pid}_{scan}/{name}"

    def load(self, name: str):
        if name not in self._cache:
            rel = self.rel(name)
            img = nib.load(self.root / "dataset" / rel)
            m = self.meta[name]
            hu = np.asarray(img.dataobj).astype(np.float32) * float(m["RescaleSlope"]) + float(m["RescaleIntercept"])
            lab_img = nib.load(self.root / "masks" / "anatomy" / rel)
            les_img = nib.load(self.root / "masks" / "lesion" / rel)
            self._cache[name] = (img, hu, np.asarray(lab_img.dataobj), np.asarray(les_img.dataobj), lab_img, les_img)
        return self._cache[name]

    def positives(self, name: str) -> set[str]:
        return {k for k in P.ABNORMALITIES if self.labels[name][k] == "1"}

    def text(self, name: str) -> str:
        r = self.reports[name]
        return r["Findings_EN"] + " " + r["Impressions_EN"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Cohort:
    root = tmp_path_factory.mktemp("phantom")
    P.generate_cohort(root, n_train=5, n_val=3, seed=7, shape=SHAPE, p_prior=0.6, p_second_recon=0.3, prevalence=0.45)
    return Cohort(root)


def midsagittal_distance(img, lab: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Signed distance (mm, + = patient right) of the voxels of `mask` from the plane through the centroids of the
    spine and the sternum (the patient's mid-sagittal plane, whatever the roll and the array orientation)."""

    def world(m):
        idx = np.argwhere(m).astype(float)
        return idx @ img.affine[:3, :3].T + img.affine[:3, 3]

    spine, sternum = world(lab == SPINE).mean(0), world(lab == STERNUM).mean(0)
    anterior = (sternum - spine)[:2] / np.linalg.norm((sternum - spine)[:2])
    right = np.array([anterior[1], -anterior[0]])  # RAS+: anterior (0, 1) → right (1, 0)
    return (world(mask)[:, :2] - spine[:2]) @ right


# ----------------------------------------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_identical_bytes_different_seed_differs(tmp_path):
    kw = dict(n_train=2, n_val=1, shape=(24, 64, 64), p_prior=0.5, p_second_recon=0.5)
    P.generate_cohort(tmp_path / "a", seed=3, **kw)
    P.generate_cohort(tmp_path / "b", seed=3, num_workers=2, **kw)  # patients in parallel: the same bytes
    P.generate_cohort(tmp_path / "c", seed=4, **kw)
    a, b, c = tree(tmp_path / "a"), tree(tmp_path / "b"), tree(tmp_path / "c")
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    gz = [k for k in a if k.endswith(".nii.gz")]
    assert gz and all(a[k][4:8] == b"\0\0\0\0" for k in gz)  # gzip mtime 0
    common = sorted(set(a) & set(c))
    assert any(a[k] != c[k] for k in common if k.startswith("dataset/train/"))
    assert (
        a["dataset/radiology_text_reports/train_reports.csv"] != c["dataset/radiology_text_reports/train_reports.csv"]
    )


def test_progress_bar_over_patients(tmp_path, capsys):
    P.generate_cohort(tmp_path / "quiet", 1, 1, seed=1, shape=(8, 32, 32), p_prior=0.0)
    assert "phantom cohort" not in capsys.readouterr().err
    P.generate_cohort(tmp_path / "bar", 2, 1, seed=1, shape=(8, 32, 32), p_prior=0.0, progress=True)
    err = capsys.readouterr().err
    assert "phantom cohort" in err and "3/3" in err and "patient" in err


def test_appearance_does_not_depend_on_the_findings(tmp_path):
    """The same patients and scans with every finding and with none look the same (phase, kernel, noise, field
    of view, pose, artefacts): no finding is predictable from how a scan looks."""
    kw = dict(n_train=3, n_val=1, seed=9, shape=(8, 32, 32), p_prior=0.5, p_second_recon=0.5)
    P.generate_cohort(tmp_path / "none", prevalence=0.0, **kw)
    P.generate_cohort(tmp_path / "all", prevalence=1.0, **kw)
    none = json.loads((tmp_path / "none" / "phantom_manifest.json").read_text())["volumes"]
    full = json.loads((tmp_path / "all" / "phantom_manifest.json").read_text())["volumes"]
    assert [v["volume_name"] for v in none] == [v["volume_name"] for v in full]
    assert all(not any(v["labels"].values()) for v in none)
    assert all(all(v["labels"].values()) for v in full if v["scan"] == "a")  # follow-ups may resolve some
    for a, b in zip(none, full):
        assert a["appearance"] == b["appearance"], a["volume_name"]
        assert a["spacing"] == b["spacing"] and a["orientation"] == b["orientation"]


def test_layout(cohort):
    root = cohort.root
    names = list(cohort.labels)
    assert names and set(names) == set(cohort.reports) == set(cohort.meta) == set(cohort.cot)
    with open(root / "dataset/multi_abnormality_labels/train_predicted_labels.csv") as fh:
        assert next(csv.reader(fh)) == ["VolumeName", *P.ABNORMALITIES]
    with open(root / "dataset/radiology_text_reports/train_reports.csv") as fh:
        assert next(csv.reader(fh)) == [
            "VolumeName",
            "ClinicalInformation_EN",
            "Technique_EN",
            "Findings_EN",
            "Impressions_EN",
        ]
    for col in (
        "VolumeName",
        "Manufacturer",
        "PatientSex",
        "PatientAge",
        "ConvolutionKernel",
        "SliceThickness",
        "XYSpacing",
        "ZSpacing",
        "RescaleSlope",
        "RescaleIntercept",
        "Rows",
        "Columns",
        "NumberOfSlices",
    ):
        assert col in cohort.meta[names[0]]
    pattern = re.compile(r"^(train|valid)/\1_(\d+)/\1_\2_([ab])/\1_\2_\3_([12])\.nii\.gz$")
    expected = set()
    for name in names:
        rel = cohort.rel(name)
        assert pattern.match(rel), rel
        expected.add(rel)
        img, hu, lab, les, lab_img, les_img = cohort.load(name)
        m = cohort.meta[name]
        assert img.get_data_dtype() == np.int16 and lab_img.get_data_dtype() == np.uint8
        assert les_img.get_data_dtype() == np.uint8
        assert (
            img.shape
            == (int(m["Columns"]), int(m["Rows"]), int(m["NumberOfSlices"]))
            == (SHAPE[2], SHAPE[1], SHAPE[0])
        )
        assert np.allclose(lab_img.affine, img.affine) and np.allclose(les_img.affine, img.affine)
        xy = json.loads(m["XYSpacing"])
        assert np.allclose(np.abs(np.diag(img.affine)[:3]), [xy[0], xy[1], float(m["ZSpacing"])], rtol=1e-4)
        assert 300 <= xy[0] * SHAPE[2] <= 500  # field of view
        assert 0.89 <= float(m["SliceThickness"]) / float(m["ZSpacing"]) <= 1.26
        assert lab.max() <= P.NUM_REGIONS and les.max() <= len(P.ABNORMALITIES)
    on_disk = {str(p.relative_to(root / "dataset")) for p in (root / "dataset").rglob("*.nii.gz")}
    assert on_disk == expected  # no masks beside the volumes
    for kind in ("anatomy", "lesion"):
        assert {
            str(p.relative_to(root / "masks" / kind)) for p in (root / "masks" / kind).rglob("*.nii.gz")
        } == expected
    axcodes = {"".join(nib.aff2axcodes(cohort.load(n)[0].affine)) for n in names}
    assert len(axcodes) >= 2
    intercepts = {cohort.meta[n]["RescaleIntercept"] for n in names}
    assert intercepts == {"0", "-1024"}
    assert any(n.endswith("_b_1.nii.gz") for n in names) and any(n.endswith("_2.nii.gz") for n in names)


def test_anatomy_table_and_its_users_agree(cohort):
    ids = [row.id for row in ANATOMY_REGIONS]
    assert ids == list(range(len(ids))) and NUM_ANATOMY_REGIONS == len(ids) - 1 == 20
    # The three users: the phantom's masks, the report-term extractor, the model configuration's default.
    assert P.NUM_REGIONS == anatomy_terms.NUM_REGIONS == ReCTVisionConfig().num_regions == NUM_ANATOMY_REGIONS
    assert P.ANATOMY_REGIONS == {row.id: row.name for row in ANATOMY_REGIONS}
    assert {int(k): v["name"] for k, v in cohort.manifest["anatomy_regions"].items()} == P.ANATOMY_REGIONS
    for row in ANATOMY_REGIONS[1:]:
        lo, hi = row.hu_range
        assert -1024 <= lo < hi <= 3071 and row.terms, row
        mentioned = [r + 1 for r, m in enumerate(anatomy_terms.region_mentions(f"The {row.name} is normal.")) if m]
        assert row.id in mentioned, (row.name, mentioned)
        if row.id in P.LUNG_IDS:
            assert mentioned == [row.id]  # a lobe's name names that lobe only
    assert anatomy_terms.region_mentions("Bilateral findings in the right upper and lower lobes.")[:6] == [
        0,
        1,
        0,
        1,
        0,
        0,
    ]
    seen = set()
    for name in cohort.labels:
        lab = cohort.load(name)[2]
        seen |= set(np.unique(lab).tolist())
    assert seen <= set(ids) and len(seen) >= 19


def test_findings_table():
    assert list(P.FINDINGS) == list(P.ABNORMALITIES)
    assert P.LESION_PRIORITY == tuple(sorted(P.FINDINGS, key=lambda n: -P.FINDINGS[n].layer))
    assert P.PREVALENCE == {n: s.prevalence for n, s in P.FINDINGS.items()}
    assert set(P.SIZED) == {n for n, s in P.FINDINGS.items() if s.sized}
    table_ids = {row.id for row in ANATOMY_REGIONS[1:]}

    class Fields(dict):
        def __missing__(self, key):
            return "7"

    for name, spec in P.FINDINGS.items():
        assert spec.regions and set(spec.regions) <= table_ids, name
        assert spec.hu[0] < spec.hu[1] and 0 < spec.size[0] < spec.size[1], name
        assert spec.visible_at and spec.what and 0 < spec.prevalence < 1, name
        assert set(spec.positive) == set(spec.impression), name
        for variant, templates in spec.positive.items():
            for template in (*templates, spec.impression[variant]):
                text = template.format_map(Fields(c="", w="right lower lobe"))
                assert not re.search(NEGATION, text.lower()), (name, text)
                assert {k for k, v in P.extract_labels(text).items() if v} == {name}, (name, text)
                assert re.search(KEYWORDS[name], text, re.I), (name, text)
        for text in spec.negative:
            assert re.search(NEGATION, text.lower()) and not any(P.extract_labels(text).values()), (name, text)


def test_hu_ranges_per_anatomy_region(cohort):
    """Bulky regions on the coarse test grid, against the anatomy table and a few independent expectations."""
    for name in cohort.labels:
        img, hu, lab, les, *_ = cohort.load(name)
        clean = (les == 0) | (les == P.LESION_IDS["Cardiomegaly"])  # an enlarged heart keeps its HU

        def pct(ids, q=50, lab=lab, clean=clean, hu=hu, name=name):
            sel = np.isin(lab, ids) & clean
            assert sel.sum() > 20, (name, ids)
            return float(np.percentile(hu[sel], q))

        assert hu.min() >= -1024 and hu.max() <= 3071
        for row in ANATOMY_REGIONS:
            if row.name in THIN or row.id in P.LUNG_IDS or ((lab == row.id) & clean).sum() <= 50:
                continue
            lo, hi = row.hu_range
            assert lo <= pct([row.id]) <= hi, (name, row.name, pct([row.id]))
        if "Mosaic attenuation pattern" not in cohort.positives(name):  # its dense patches are not lesion voxels
            lo, hi = anatomy_region("right upper lobe").hu_range
            assert lo < pct(P.LUNG_IDS) < hi, name  # aerated lung, vessels included
        assert pct([BACKGROUND]) < -900  # air around the patient
        assert pct([SPINE], 75) > 180 and pct([SPINE], 99) > 400  # spine: cortical rim brighter
        assert pct([RIBS], 95) > 150  # ribs (thin, partial volume at this resolution)
        if (lab == TRACHEA).sum() > 20:
            assert pct([TRACHEA], 10) < -500  # trachea lumen is air


@pytest.mark.slow
def test_every_region_on_a_fine_grid_lies_in_its_table_range(tmp_path):
    """On a fine grid (about 1.9 mm in-plane) bulky regions have their median in their table range; thin ones,
    whose voxels share their neighbours' tissue, have their table range within their interquartile range."""
    P.generate_cohort(tmp_path, 2, 0, seed=2, shape=(48, 224, 224), p_prior=0.0, p_second_recon=0.0, prevalence=0.0)
    for v in json.loads((tmp_path / "phantom_manifest.json").read_text())["volumes"]:
        img = nib.load(tmp_path / v["path"])
        hu = np.asarray(img.dataobj).astype(np.float32) - (1024 if v["raw_storage"] else 0)
        lab = np.asarray(nib.load(tmp_path / v["anatomy_mask"]).dataobj)
        for row in ANATOMY_REGIONS:
            sel = lab == row.id
            if sel.sum() <= 200:
                continue
            lo, hi = row.hu_range
            q25, q50, q75 = np.percentile(hu[sel], [25, 50, 75])
            if row.name in THIN:
                assert q25 <= hi and q75 >= lo, (v["volume_name"], row.name, q25, q75)
            else:
                assert lo <= q50 <= hi, (v["volume_name"], row.name, q50)


def test_appearance_varies(cohort):
    looks = [v["appearance"] for v in cohort.volumes.values()]
    assert len({a["contrast_phase"] for a in looks}) >= 2
    sharp = [a["kernel_sharpness"] for a in looks]
    assert max(sharp) - min(sharp) > 0.4
    fov = [a["field_of_view_mm"] for a in looks]
    assert max(fov) - min(fov) > 40
    assert max(abs(a["patient_roll_deg"]) for a in looks) > 1.0
    # The noise the manifest announces is in the images: the spread of HU inside the liver (eroded, so no edge).
    measured, announced = [], []
    for name, v in cohort.volumes.items():
        _, hu, lab, les, *_ = cohort.load(name)
        liver = erode(erode((lab == LIVER) & (les == 0)))
        if liver.sum() > 30:
            measured.append(float(np.std(hu[liver])))
            announced.append(v["appearance"]["noise_sigma_hu"])
    assert len(measured) >= 5 and max(measured) > 2.0 * min(measured)
    assert np.corrcoef(measured, announced)[0, 1] > 0.5
    # Contrast phases: the aorta is brighter than the myocardium-free heart blood of a non-contrast scan.
    by_phase = defaultdict(list)
    for name, v in cohort.volumes.items():
        _, hu, lab, les, *_ = cohort.load(name)
        by_phase[v["appearance"]["contrast_phase"]].append(float(np.percentile(hu[lab == HEART], 75)))
    if "non-contrast" in by_phase and len(by_phase) > 1:
        enhanced = [x for k, xs in by_phase.items() if k != "non-contrast" for x in xs]
        assert min(enhanced) > max(by_phase["non-contrast"])


#: Defining density of each finding's voxels on the test grid, as (percentile, low, high) HU, this test's own
#: expectations: fluid stays fluid, emphysema's interior stays below -930, dense things stay dense.
DENSITY = {
    "Pleural effusion": [(50, -45, 45)],
    "Pericardial effusion": [(75, -20, 50)],
    "Consolidation": [(50, -300, 120)],
    "Lung nodule": [(100, -320, 400)],
    "Lung opacity": [(50, -760, -300)],
    "Mosaic attenuation pattern": [(50, -930, -700)],
    "Emphysema": [(50, -1024, -895)],
    "Arterial wall calcification": [(100, 150, 3071)],
    "Coronary artery wall calcification": [(100, 150, 3071)],
    "Medical material": [(100, 300, 3071)],
    "Lymphadenopathy": [(100, -20, 200)],
    "Hiatal hernia": [(10, -1024, -200), (90, -50, 200)],
}


def test_labels_masks_and_reports_agree(cohort):
    seen_pos, seen_neg = set(), set()
    for name in cohort.labels:
        _, hu, lab, les, *_ = cohort.load(name)
        pos = cohort.positives(name)
        present = {P.ABNORMALITIES[k - 1] for k in np.unique(les) if k}
        assert present == pos, name
        text = cohort.text(name)
        for label in P.ABNORMALITIES:
            hits = asserting(text, label)
            if label in pos:
                assert hits, (name, label, text)
                seen_pos.add(label)
            else:
                assert not hits, (name, label, hits)
                seen_neg.add(label)
        assert P.extract_labels(text) == {k: int(k in pos) for k in P.ABNORMALITIES}
        # Chain-of-thought answers agree with the labels.
        cot = cohort.cot[name]
        m = re.match(r"Is there (.+) in this chest CT\?", cot["question"])
        if m:
            label = next(k for k in P.ABNORMALITIES if k.lower() == m.group(1))
            assert cot["answer"].endswith("Answer: Yes." if label in pos else "Answer: No.")
        else:
            assert {k for k in P.ABNORMALITIES if asserting(cot["answer"], k)} == pos
        for label in pos:
            mask = les == P.LESION_IDS[label]
            # Where: the lesion's voxels lie in the regions its table row names.
            assert set(np.unique(lab[mask]).tolist()) <= set(P.FINDINGS[label].regions), (name, label)
            # What: the image shows the lesion's defining density where its mask says.
            for q, lo, hi in DENSITY.get(label, []):
                assert lo <= np.percentile(hu[mask], q) <= hi, (name, label, q, np.percentile(hu[mask], q))
            interior = erode(mask)
            if label == "Emphysema":
                assert interior.sum() > 20 and np.median(hu[interior]) < -930, name
            if label == "Pleural effusion" and interior.sum() > 20:
                assert -25 < np.median(hu[interior]) < 40, name
    assert seen_pos == set(P.ABNORMALITIES) and seen_neg == set(P.ABNORMALITIES)


def test_findings_keep_their_density_under_extreme_appearance():
    """One patient with an effusion, emphysema and a nodule, reconstructed with the softest and the sharpest,
    noisiest kernel and with motion, ring and truncation: the lesions keep their defining density."""
    rng = np.random.default_rng(4)
    A = sample_anatomy(rng, emphysema=True)
    Fs = P._assemble(rng, A, [P._initial_params(rng, A, ["Pleural effusion", "Emphysema", "Lung nodule"])])
    F = Fs[0]
    pose = sample_pose(rng, A)
    scan = sample_scan(rng, A, p_contrast=0.0)
    for sharp, noise, artefacts in ((0.0, 6.0, False), (1.0, 60.0, True)):
        geom = sample_geometry(np.random.default_rng(1), A, (48, 128, 128), False, pose)
        recon = sample_recon(np.random.default_rng(2), A, scan, sharper=False)
        recon.sharpness, recon.psf_mm, recon.edge_gain = sharp, 0.35 + 0.9 * (1 - sharp), max(0.0, 1.5 * (sharp - 0.5))
        recon.noise_sigma, recon.noise_grain = noise, 1.6 * (1 - sharp)
        recon.ring = {"radius_frac": 0.3, "amplitude": 50.0} if artefacts else None
        recon.motion = (
            {"kind": "doubling", "z_frac": (0.0, 0.75), "shift_mm": 6.0, "weight": 0.3} if artefacts else None
        )
        cv, _ = P.render_volume(A, F, geom.grid, recon, FieldBank([4, 2]))
        hu = finish_hu(cv, recon, geom, np.random.default_rng(3)).astype(np.float32)
        effusion = cv.les == P.LESION_IDS["Pleural effusion"]
        emphysema = cv.les == P.LESION_IDS["Emphysema"]
        nodule = cv.les == P.LESION_IDS["Lung nodule"]
        assert -45 < np.median(hu[effusion]) < 45 and -25 < np.median(hu[erode(effusion)]) < 40
        assert np.median(hu[erode(emphysema)]) < -930 and np.median(hu[emphysema]) < -900
        assert np.max(hu[nodule]) > -300


def test_cardiomegaly_is_an_enlarged_heart(cohort):
    ratios = {True: [], False: []}
    for name in cohort.labels:
        img, hu, lab, les, *_ = cohort.load(name)
        dx = abs(img.affine[0, 0])
        heart = (lab == HEART) & (les != P.LESION_IDS["Pericardial effusion"])
        thorax = np.isin(lab, THORAX)
        widths = [(heart[:, :, k].any(1).sum(), thorax[:, :, k].any(1).sum()) for k in range(lab.shape[2])]
        ctr = max(h for h, _ in widths) * dx / (max(t for _, t in widths) * dx)
        ratios["Cardiomegaly" in cohort.positives(name)].append(ctr)
    assert ratios[True] and ratios[False]
    assert min(ratios[True]) > 0.5 > max(ratios[False]), ratios


def test_sides_and_lobes_follow_the_affine(cohort):
    checked = 0
    for name in cohort.labels:
        img, hu, lab, les, *_ = cohort.load(name)
        # RAS+: the liver is on the patient's right, the heart's centre on the left.
        assert midsagittal_distance(img, lab, lab == LIVER).mean() > 0
        assert midsagittal_distance(img, lab, lab == HEART).mean() < 0
        assert midsagittal_distance(img, lab, np.isin(lab, P.RIGHT_LOBES)).min() > 0
        assert midsagittal_distance(img, lab, np.isin(lab, P.LEFT_LOBES)).max() < 0
        text = cohort.text(name)
        mentioned = {r + 1 for r, m in enumerate(anatomy_terms.region_mentions(text)) if m}
        for label in LATERAL:
            if label not in cohort.positives(name):
                continue
            mask = les == P.LESION_IDS[label]
            d = midsagittal_distance(img, lab, mask)
            mask_sides = {"right"} if d.min() > 0 else {"left"} if d.max() < 0 else {"right", "left"}
            said = set()
            named_lobes = set()
            for s in asserting(text, label):
                low = s.lower()
                said |= {w for w in ("right", "left") if re.search(rf"\b{w}\b", low)}
                if re.search(r"\b(bilateral|both)\b", low):
                    said |= {"right", "left"}
                for side, parts in LOBE_RE.findall(low):
                    for part in re.split(r", | and ", parts):
                        named_lobes.add(P.LOBE_IDS[f"{side} {part} lobe"])
            assert said == mask_sides, (name, label, said, mask_sides)
            if label != "Pleural effusion":
                lobes = set(np.unique(lab[mask]).tolist())
                assert named_lobes and lobes <= named_lobes, (name, label)
                assert lobes <= mentioned, (name, label)  # the anatomy-term extractor finds them too
            checked += 1
    assert checked >= 5


def test_prior_comparisons_match_lesion_volumes(cohort):
    by_patient = defaultdict(dict)
    for name in cohort.labels:
        split, pid, scan, recon = name[: -len(".nii.gz")].split("_")
        if recon == "1":
            by_patient[(split, pid)][scan] = name

    def volume(name, label):
        img, _, _, les, *_ = cohort.load(name)
        return float((les == P.LESION_IDS[label]).sum() * np.prod(np.abs(np.diag(img.affine)[:3])))

    n = 0
    for scans in by_patient.values():
        if "b" not in scans:
            assert "previous examination" not in cohort.text(scans["a"])
            continue
        a, b = scans["a"], scans["b"]
        assert cohort.meta[a]["StudyDate"] < cohort.meta[b]["StudyDate"]
        for s in sentences(cohort.text(b)):
            low = s.lower()
            labels = [k for k in P.ABNORMALITIES if re.search(KEYWORDS[k], low)]
            if "previous" not in low or not labels:
                continue
            va, vb = volume(a, labels[0]), volume(b, labels[0])
            if "resolved" in low:
                assert va > 0 and vb == 0, (s, va, vb)
            elif re.search(r"\bnew\b", low):
                assert va == 0 and vb > 0, (s, va, vb)
            elif "increased" in low:
                assert vb >= 1.3 * va > 0, (s, va, vb)
            elif "decreased" in low or "regressed" in low:
                assert 0 < vb <= 0.77 * va, (s, va, vb)
            else:
                assert "unchanged" in low or "stable" in low
                assert 0.77 * va < vb < 1.3 * va, (s, va, vb)
            n += 1
    assert n >= 3


def test_other_seed_formats(cohort):
    root = cohort.root
    # OmniAbnorm-CT
    records = json.loads((root / "omniabnorm" / "cot.json").read_text())
    assert records
    n_eff = 0
    for r in records:
        assert {"case_id", "region", "category", "cot_reasoning"} <= set(r)
        assert (
            r["category"] in P.ABNORMALITIES
            and r["cot_reasoning"]
            and all(isinstance(s, str) for s in r["cot_reasoning"])
        )
        img = Image.open(root / "omniabnorm" / "images" / f"{r['case_id']}.jpg")
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (SHAPE[2], SHAPE[1])
        m = np.asarray(Image.open(root / "omniabnorm" / "masks" / f"{r['case_id']}.jpg").convert("L"))
        assert m.shape == (SHAPE[1], SHAPE[2]) and (m > 127).any()
        assert ((m > 40) & (m < 215)).mean() < 0.02  # binarises cleanly
        assert r["category"] in cohort.positives(r["source_volume"])
        if r["category"] == "Pleural effusion" and r["region"] != "both pleural spaces":
            # Radiological display: patient right on the image's left, anterior at the top (judged against the
            # body, which lies off-centre in the field of view).
            rows, cols = np.nonzero(m > 127)
            body_rows, body_cols = np.nonzero(np.asarray(img.convert("L")) > 20)
            assert (cols.mean() < body_cols.mean()) == (r["region"] == "right pleural space")
            assert rows.mean() > body_rows.mean()  # dependent (posterior) fluid
            n_eff += 1
    assert n_eff >= 1
    # Segmentation CSV (paths relative to the cohort root, where the CSV sits)
    rows = read_csv(root / "segmentation.csv")
    assert list(rows[0])[:3] == ["path", "label", "patient_id"]
    assert len(rows) == len(cohort.labels)
    for r in rows:
        name = Path(r["path"]).name
        assert (root / r["path"]).is_file() and r["patient_id"] == "_".join(name.split("_")[:2])
        seg = nib.load(root / r["label"])
        arr = np.asarray(seg.dataobj)
        assert seg.shape == cohort.load(name)[0].shape and set(np.unique(arr)) <= {0, 1}
        assert bool(arr.any()) == ("Pleural effusion" in cohort.positives(name))
    # Libra / LLaVA conversations
    for split in ("train", "valid"):
        convs = json.loads((root / "libra" / f"{split}.json").read_text())
        assert convs
        for c in convs:
            cur, prior = c["image"]
            assert (root / cur).is_file() and (root / prior).is_file()
            name = Path(cur).name
            assert name.endswith("_1.nii.gz")
            has_prior = f"{name.split('_')[0]}_{name.split('_')[1]}_a_1.nii.gz" in cohort.labels and "_b_" in name
            assert (prior != cur) == has_prior
            assert c["conversations"][0]["from"] == "human" and c["conversations"][0]["value"].startswith("<image>\n")
            assert c["conversations"][1] == {"from": "gpt", "value": cohort.reports[name]["Findings_EN"]}


def test_project_readers_parse_the_cohort(cohort):
    readers = pytest.importorskip("trainers.data.readers")
    pytest.importorskip("datasets")
    ds = readers.read_ct_rate(cohort.root, "train", lesion_masks=True)
    assert ds.num_rows == sum(n.startswith("train_") for n in cohort.labels)
    assert readers.read_omniabnorm(cohort.root).num_rows > 0
    assert readers.read_libra(cohort.root / "libra" / "train.json").num_rows > 0
    seg = readers.read_segmentation_csv(cohort.root / "segmentation.csv", val_fraction=0.3)
    assert sum(d.num_rows for d in seg.values()) == len(cohort.labels)


def test_cli_synth(tmp_path):
    from trainers.cli import main

    out = tmp_path / "cli"
    assert (
        main(
            ["synth", "--out", str(out), "--n-train", "1", "--n-val", "1", "--seed", "5", "--shape", "16", "48", "48"]
        )
        == 0
    )
    assert (out / "dataset/train/train_1/train_1_a/train_1_a_1.nii.gz").is_file()
    assert (out / "masks/anatomy/valid/valid_1/valid_1_a/valid_1_a_1.nii.gz").is_file()
    assert nib.load(out / "dataset/valid/valid_1/valid_1_a/valid_1_a_1.nii.gz").shape == (48, 48, 16)
    with pytest.raises(SystemExit):
        main(["synth"])  # --out is required


def test_vary_depth_and_validation(tmp_path):
    s = P.generate_cohort(tmp_path, n_train=2, n_val=0, seed=1, shape=(16, 40, 48), vary_depth=True, p_prior=0.0)
    assert s["volumes"] == 2
    rows = read_csv(tmp_path / "dataset/metadata/train_metadata.csv")
    for r in rows:
        img = nib.load(tmp_path / "dataset" / Cohort.rel(r["VolumeName"]))
        assert img.shape == (48, 40, int(r["NumberOfSlices"]))
        assert 13 <= int(r["NumberOfSlices"]) <= 19
    with pytest.raises(ValueError):
        P.generate_cohort(tmp_path / "x", 1, 0, shape=(2, 40, 40))
    with pytest.raises(ValueError):
        P.generate_cohort(tmp_path / "x", 1, 0, prevalence={"Not a finding": 0.5})
    with pytest.raises(ValueError, match="num_workers"):
        P.generate_cohort(tmp_path / "x", 1, 0, num_workers=0)
