"""Phantom cohort generator (`trainers.data.phantom`, `rect-vlm synth`): layout, determinism, and the
consistency of volumes, masks, labels, reports, prior comparisons and the three other seed formats.

World coordinates: NIfTI affines map to nibabel's RAS+ space, where +x points to the patient's RIGHT (and +y
anterior, +z superior). So a lesion on the patient's left has a world x below the midline, whatever the array
orientation (LPS, RAS, LPI, LAS) of the file.
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

from trainers.data import phantom as P


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

SHAPE = (32, 72, 72)


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+", text.strip()) if s]


def asserting(text: str, label: str) -> list[str]:
    """Sentences that assert `label` (keyword present, no negation cue)."""
    return [s for s in sentences(text) if re.search(KEYWORDS[label], s, re.I) and not NEGATED.search(s)]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


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


def world_x(img, mask: np.ndarray) -> np.ndarray:
    idx = np.nonzero(mask)
    return img.affine[0, 0] * idx[0] + img.affine[0, 3]  # diagonal affines


# ----------------------------------------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_identical_bytes_different_seed_differs(tmp_path):
    kw = dict(n_train=2, n_val=1, shape=(24, 64, 64), p_prior=0.5, p_second_recon=0.5)
    P.generate_cohort(tmp_path / "a", seed=3, **kw)
    P.generate_cohort(tmp_path / "b", seed=3, **kw)
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
        assert 330 <= xy[0] * SHAPE[2] <= 461  # field of view
        assert lab.max() <= P.NUM_REGIONS and les.max() <= len(P.ABNORMALITIES)
    on_disk = {str(p.relative_to(root / "dataset")) for p in (root / "dataset").rglob("*.nii.gz")}
    assert on_disk == expected  # no masks beside the volumes
    for kind in ("anatomy", "lesion"):
        assert {
            str(p.relative_to(root / "masks" / kind)) for p in (root / "masks" / kind).rglob("*.nii.gz")
        } == expected
    axcodes = {"".join(nib.aff2axcodes(cohort.load(n)[0].affine)) for n in names}
    assert {"LPS", "RAS"} <= axcodes | {"LPS", "RAS"} and len(axcodes) >= 2
    intercepts = {cohort.meta[n]["RescaleIntercept"] for n in names}
    assert intercepts == {"0", "-1024"}
    assert any(n.endswith("_b_1.nii.gz") for n in names) and any(n.endswith("_2.nii.gz") for n in names)


def test_hu_ranges_per_anatomy_region(cohort):
    for name in cohort.labels:
        img, hu, lab, les, *_ = cohort.load(name)
        clean = (les == 0) | (les == P.LESION_IDS["Cardiomegaly"])  # an enlarged heart keeps its HU
        contrast = cohort.meta[name]["ContrastAgent"] == "YES"

        def med(ids, q=50, lab=lab, clean=clean, hu=hu, name=name):
            sel = np.isin(lab, ids) & clean
            assert sel.sum() > 20, (name, ids)
            return float(np.percentile(hu[sel], q))

        assert hu.min() >= -1024 and hu.max() <= 3071
        assert med([0]) < -900  # air around the patient
        assert -930 < med(P.LUNG_IDS) < -740, name  # aerated lung (vessels included; diseased lungs are denser)
        assert -130 < med([1]) < 70  # body wall: fat and muscle
        assert 20 < med([15]) < 140  # liver
        assert (20 if not contrast else 60) < med([7]) < (70 if not contrast else 260)  # heart
        assert med([12], 75) > 180 and med([12], 99) > 400  # spine: cortical rim brighter
        assert med([13], 95) > 150  # ribs (thin, partial volume at this resolution)
        if (lab == 10).sum() > 20:
            assert med([10], 10) < -500  # trachea lumen is air


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
        # Visible: the easy findings change the image where their mask says.
        if "Pleural effusion" in pos:
            assert -20 < np.median(hu[les == P.LESION_IDS["Pleural effusion"]]) < 45
            assert (lab[les == P.LESION_IDS["Pleural effusion"]] == 19).all()
        if "Lung nodule" in pos:
            assert np.percentile(hu[les == P.LESION_IDS["Lung nodule"]], 75) > -350
        if "Consolidation" in pos:
            assert np.median(hu[les == P.LESION_IDS["Consolidation"]]) > -300
        if "Emphysema" in pos:
            assert np.median(hu[les == P.LESION_IDS["Emphysema"]]) < -880
    assert seen_pos == set(P.ABNORMALITIES) and seen_neg == set(P.ABNORMALITIES)


def test_cardiomegaly_is_an_enlarged_heart(cohort):
    ratios = {True: [], False: []}
    for name in cohort.labels:
        img, hu, lab, les, *_ = cohort.load(name)
        dx = abs(img.affine[0, 0])
        heart = (lab == 7) & (les != P.LESION_IDS["Pericardial effusion"])
        thorax = np.isin(lab, (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 18, 19))
        widths = [(heart[:, :, k].any(1).sum(), thorax[:, :, k].any(1).sum()) for k in range(lab.shape[2])]
        ctr = max(h for h, _ in widths) * dx / (max(t for _, t in widths) * dx)
        ratios["Cardiomegaly" in cohort.positives(name)].append(ctr)
    assert ratios[True] and ratios[False]
    assert min(ratios[True]) > 0.5 > max(ratios[False]), ratios


def test_sides_and_lobes_follow_the_affine(cohort):
    checked = 0
    for name in cohort.labels:
        img, hu, lab, les, *_ = cohort.load(name)
        mid = world_x(img, lab == 12).mean()  # the spine marks the midline
        # RAS+: the liver is on the patient's right (+x), the heart's centre on the left.
        assert world_x(img, lab == 15).mean() > mid
        assert world_x(img, lab == 7).mean() < mid
        assert world_x(img, np.isin(lab, P.RIGHT_LOBES)).min() > mid
        assert world_x(img, np.isin(lab, P.LEFT_LOBES)).max() < mid
        text = cohort.text(name)
        for label in LATERAL:
            if label not in cohort.positives(name):
                continue
            mask = les == P.LESION_IDS[label]
            xs = world_x(img, mask)
            mask_sides = {"right"} if xs.min() > mid else {"left"} if xs.max() < mid else {"right", "left"}
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
                assert named_lobes and set(np.unique(lab[mask])) <= named_lobes, (name, label)
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
            # Radiological display: patient right on the image's left, anterior at the top.
            rows, cols = np.nonzero(m > 127)
            assert (cols.mean() < m.shape[1] / 2) == (r["region"] == "right pleural space")
            assert rows.mean() > m.shape[0] / 2  # dependent (posterior) fluid
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
