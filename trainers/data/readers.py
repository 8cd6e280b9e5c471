"""Readers for the four seed dataset formats → `datasets.Dataset` of file references and metadata.

Rows hold paths and text, never decoded voxels; the preprocessing cache decodes. Every builder validates its
files and columns up front: all missing or unreadable files are reported in one `MissingFilesError` (or skipped
and counted with `on_missing="skip"`), so a bad cohort fails before training starts, not at step 10,000.

Formats (SPEC §6):
- CT-RATE: `dataset/{split}/{split}_{patient}/{split}_{patient}_{scan}/{volume}.nii.gz`, reports CSV
  (`VolumeName`, `Findings_EN`, `Impressions_EN`), the 18-column labels CSV, a metadata CSV with
  `RescaleSlope`/`RescaleIntercept`, anatomy and lesion masks in parallel trees (`masks/anatomy/{split}/…`,
  `masks/lesion/{split}/…`), CoT JSON (`volumename`, `question`, `answer`).
- OmniAbnorm-CT: 2D JPEG slices + JPEG lesion masks + CoT JSON (`case_id`, `region`, `category`,
  `cot_reasoning`), lifted to pseudo-3D volumes of N slices.
- Segmentation CSV: `path, label, patient_id` (+ binary NIfTI masks), split by patient.
- Libra/LLaVA conversation JSON with current and prior volume paths.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np

from hf_models.configuration_rect import CT_RATE_ABNORMALITIES


logger = logging.getLogger(__name__)

OnMissing = Literal["raise", "skip"]

CT_RATE_SPLITS = ("train", "valid")
# CT-RATE volume names: {split}_{patient}_{scan letter}_{reconstruction}.nii.gz, e.g. train_12_a_1.nii.gz
VOLUME_NAME = re.compile(r"^(?P<split>[a-z]+)_(?P<patient>\d+)_(?P<scan>[a-z]+)_(?P<recon>\d+)\.nii(\.gz)?$")


class DatasetFormatError(ValueError):
    """A CSV/JSON file is missing, has the wrong columns/keys, or holds a value of the wrong form."""


class MissingFilesError(FileNotFoundError):
    """Files that rows refer to are missing or unreadable; `problems` lists every one as (path, reason)."""

    def __init__(self, what: str, problems: list[tuple[str, str]]):
        self.problems = problems
        shown = "\n".join(f"  {path}: {reason}" for path, reason in problems[:20])
        more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(
            f"{len(problems)} file(s) of {what} are missing or unreadable "
            f"(pass on_missing='skip' to drop those rows):\n{shown}{more}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Validation shared by every reader
# ----------------------------------------------------------------------------------------------------------------


def read_csv_rows(path: Path, required: Iterable[str]) -> list[dict[str, str]]:
    """All rows of a CSV as dicts, after checking that every required column is in its header.

    Raises:
        DatasetFormatError: the file is missing, empty, or lacks a required column (names the file, the missing
            columns and the columns found).
    """
    if not path.is_file():
        raise DatasetFormatError(f"{path}: CSV file not found")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames
        if not header:
            raise DatasetFormatError(f"{path}: empty CSV, expected a header with columns {list(required)}")
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetFormatError(f"{path}: missing column(s) {missing}; found columns {header}")
        return list(reader)


def read_json_records(path: Path, required: Iterable[str]) -> list[dict]:
    """A JSON file holding a list of objects, each with the required keys.

    Raises:
        DatasetFormatError: missing file, invalid JSON, not a list, or a record without a required key (names the
            file, the record index and the key).
    """
    if not path.is_file():
        raise DatasetFormatError(f"{path}: JSON file not found")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetFormatError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(records, list):
        raise DatasetFormatError(f"{path}: expected a JSON list of records, found {type(records).__name__}")
    required = list(required)
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DatasetFormatError(f"{path}: record {i} is a {type(record).__name__}, expected an object")
        missing = [k for k in required if k not in record]
        if missing:
            raise DatasetFormatError(f"{path}: record {i} lacks key(s) {missing}; found keys {sorted(record)}")
    return records


def file_problem(path: Path) -> str | None:
    """Why a referenced file cannot be used, or None. NIfTI files get a cheap header check (348-byte header,
    `n+1`/`ni1` magic) so a truncated or mislabelled file is caught here rather than mid-epoch."""
    if not path.exists():
        return "missing"
    if not path.is_file():
        return "not a file"
    if path.stat().st_size == 0:
        return "empty file"
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        try:
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rb") as handle:
                header = handle.read(348)
        except (OSError, EOFError) as err:
            return f"unreadable ({err})"
        if len(header) < 348:
            return f"truncated NIfTI header ({len(header)} of 348 bytes)"
        if header[344:347] not in (b"n+1", b"ni1"):
            return "not a NIfTI-1 file (bad magic)"
    return None


def drop_unusable(rows: list[dict], path_keys: Iterable[str], what: str, on_missing: OnMissing) -> list[dict]:
    """Check every path column of every row; raise one error listing all problems, or drop those rows."""
    if on_missing not in ("raise", "skip"):
        raise ValueError(f"`on_missing` must be 'raise' or 'skip', got {on_missing!r}")
    path_keys = list(path_keys)
    problems, kept = [], []
    for row in rows:
        row_problems = [
            (row[key], reason)
            for key in path_keys
            if row.get(key) is not None and (reason := file_problem(Path(row[key]))) is not None
        ]
        problems.extend(row_problems)
        if not row_problems:
            kept.append(row)
    if problems and on_missing == "raise":
        raise MissingFilesError(what, problems)
    if problems:
        logger.warning(
            "%s: skipped %d row(s) with %d missing/unreadable file(s)", what, len(rows) - len(kept), len(problems)
        )
    return kept


def to_dataset(rows: list[dict], skipped: int, streaming: bool):
    """Rows → `datasets.Dataset` (or an `IterableDataset` when `streaming`), with the skip count in its info."""
    import datasets

    dataset = datasets.Dataset.from_list(rows)
    dataset.info.description = json.dumps({"rows": len(rows), "skipped_rows": skipped})
    return dataset.to_iterable_dataset() if streaming else dataset


def skipped_rows(dataset) -> int:
    """How many rows a reader dropped with `on_missing="skip"`."""
    return json.loads(dataset.info.description)["skipped_rows"]


# ----------------------------------------------------------------------------------------------------------------
# CT-RATE
# ----------------------------------------------------------------------------------------------------------------


def ct_rate_relative_path(volume_name: str) -> Path:
    """`train_3_b_1.nii.gz` → `train/train_3/train_3_b/train_3_b_1.nii.gz` (CT-RATE's tree)."""
    match = VOLUME_NAME.match(volume_name)
    if match is None:
        raise DatasetFormatError(
            f"VolumeName {volume_name!r} is not of the CT-RATE form {{split}}_{{patient}}_{{scan}}_{{recon}}.nii.gz"
        )
    split, patient, scan = match["split"], match["patient"], match["scan"]
    return Path(split) / f"{split}_{patient}" / f"{split}_{patient}_{scan}" / volume_name


def read_ct_rate(
    root: str | Path,
    split: str,
    *,
    anatomy_masks: bool = True,
    lesion_masks: bool = False,
    cot: bool = True,
    on_missing: OnMissing = "raise",
    streaming: bool = False,
):
    """A CT-RATE split → one row per volume.

    Columns: `volume_name`, `volume_path`, `patient_id`, `scan_id`, `findings`, `impressions`, `report` (findings +
    impression), `report_impression_first` (impression + findings), `labels` (18 ints in `CT_RATE_ABNORMALITIES`
    order), `rescale_slope`, `rescale_intercept`, `xy_spacing`, `z_spacing`, `anatomy_mask_path`, `lesion_mask_path`
    (None when not requested), `prior_volume_path` (the patient's previous scan, else None) with its
    `prior_rescale_slope` / `prior_rescale_intercept`, `cot` (list of {question, answer}).

    Args:
        root: the cohort folder holding `dataset/` and `masks/`.
        split: `"train"` or `"valid"`.
        on_missing: `"raise"` (one error listing every missing/unreadable file) or `"skip"` (drop those rows and
            record the count, see `skipped_rows`).
        streaming: return an `IterableDataset` for cohorts too large to index in memory.

    Raises:
        DatasetFormatError: a CSV/JSON file is missing or has the wrong columns, or the CSVs disagree on volumes.
        MissingFilesError: referenced files are missing or unreadable and `on_missing="raise"`.
    """
    root = Path(root)
    data = root / "dataset"
    reports = read_csv_rows(
        data / "radiology_text_reports" / f"{split}_reports.csv", ["VolumeName", "Findings_EN", "Impressions_EN"]
    )
    labels_path = data / "multi_abnormality_labels" / f"{split}_predicted_labels.csv"
    labels = {r["VolumeName"]: r for r in read_csv_rows(labels_path, ["VolumeName", *CT_RATE_ABNORMALITIES])}
    metadata_path = data / "metadata" / f"{split}_metadata.csv"
    metadata = {
        r["VolumeName"]: r for r in read_csv_rows(metadata_path, ["VolumeName", "RescaleSlope", "RescaleIntercept"])
    }
    cot_by_volume: dict[str, list[dict]] = defaultdict(list)
    if cot:
        for record in read_json_records(data / "cot" / f"{split}_cot.json", ["volumename", "question", "answer"]):
            cot_by_volume[record["volumename"]].append({"question": record["question"], "answer": record["answer"]})

    report_names = [r["VolumeName"] for r in reports]
    for name, path in ((labels, labels_path), (metadata, metadata_path)):
        absent = sorted(set(report_names) - set(name))
        if absent:
            raise DatasetFormatError(
                f"{path}: no row for {len(absent)} volume(s) of the reports CSV, e.g. {absent[:5]}"
            )

    rows = []
    for report in reports:
        name = report["VolumeName"]
        relative = ct_rate_relative_path(name)
        label_row, meta = labels[name], metadata[name]
        try:
            label_values = [int(float(label_row[c])) for c in CT_RATE_ABNORMALITIES]
            slope, intercept = float(meta["RescaleSlope"]), float(meta["RescaleIntercept"])
        except ValueError as err:
            raise DatasetFormatError(f"{name}: non-numeric label or rescale value ({err})") from err
        bad = [c for c, v in zip(CT_RATE_ABNORMALITIES, label_values) if v not in (0, 1)]
        if bad:
            raise DatasetFormatError(f"{labels_path}: {name} has non-binary values in {bad}")
        match = VOLUME_NAME.match(name)
        findings, impressions = report["Findings_EN"].strip(), report["Impressions_EN"].strip()
        rows.append(
            {
                "volume_name": name,
                "volume_path": str(data / relative),
                "patient_id": f"{match['split']}_{match['patient']}",
                "scan_id": match["scan"],
                "findings": findings,
                "impressions": impressions,
                "report": f"Findings: {findings} Impression: {impressions}",
                "report_impression_first": f"Impression: {impressions} Findings: {findings}",
                "labels": label_values,
                "rescale_slope": slope,
                "rescale_intercept": intercept,
                "xy_spacing": meta.get("XYSpacing"),
                "z_spacing": meta.get("ZSpacing"),
                "anatomy_mask_path": str(root / "masks" / "anatomy" / relative) if anatomy_masks else None,
                "lesion_mask_path": str(root / "masks" / "lesion" / relative) if lesion_masks else None,
                "cot": cot_by_volume.get(name, []),
            }
        )
    # The prior of a scan is the same patient's previous scan letter (a → b → c; its first reconstruction), as
    # in CT-RATE follow-ups.
    scans: dict[str, dict[str, dict]] = defaultdict(dict)  # patient → scan letter → first reconstruction's row
    for row in sorted(rows, key=lambda r: r["volume_name"]):
        scans[row["patient_id"]].setdefault(row["scan_id"], row)
    for row in rows:
        earlier = [s for s in scans[row["patient_id"]] if s < row["scan_id"]]
        prior = scans[row["patient_id"]][max(earlier)] if earlier else None
        row["prior_volume_path"] = prior["volume_path"] if prior else None
        row["prior_rescale_slope"] = prior["rescale_slope"] if prior else None
        row["prior_rescale_intercept"] = prior["rescale_intercept"] if prior else None

    kept = drop_unusable(
        rows, ["volume_path", "anatomy_mask_path", "lesion_mask_path"], f"CT-RATE {split}", on_missing
    )
    return to_dataset(kept, len(rows) - len(kept), streaming)


# ----------------------------------------------------------------------------------------------------------------
# OmniAbnorm-CT
# ----------------------------------------------------------------------------------------------------------------


def read_omniabnorm(
    root: str | Path, *, num_slices: int = 4, on_missing: OnMissing = "raise", streaming: bool = False
):
    """OmniAbnorm-CT (`omniabnorm/images/{case_id}.jpg`, `omniabnorm/masks/{case_id}.jpg`, `omniabnorm/cot.json`)
    → one row per case: `case_id`, `image_path`, `mask_path`, `region`, `category`, `cot_reasoning` (list of
    steps), `num_slices` (depth of the pseudo-3D volume, see `lift_slice_to_volume`)."""
    if num_slices < 1:
        raise ValueError(f"`num_slices` must be >= 1, got {num_slices}")
    folder = Path(root) / "omniabnorm"
    records = read_json_records(folder / "cot.json", ["case_id", "region", "category", "cot_reasoning"])
    rows = []
    for i, record in enumerate(records):
        steps = record["cot_reasoning"]
        if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
            raise DatasetFormatError(f"{folder / 'cot.json'}: record {i} `cot_reasoning` must be a list of strings")
        case = str(record["case_id"])
        rows.append(
            {
                "case_id": case,
                "image_path": str(folder / "images" / f"{case}.jpg"),
                "mask_path": str(folder / "masks" / f"{case}.jpg"),
                "region": record["region"],
                "category": record["category"],
                "cot_reasoning": steps,
                "num_slices": num_slices,
            }
        )
    kept = drop_unusable(rows, ["image_path", "mask_path"], "OmniAbnorm", on_missing)
    return to_dataset(kept, len(rows) - len(kept), streaming)


def lift_slice_to_volume(image_path: str | Path, mask_path: str | Path | None, num_slices: int = 4):
    """A 2D JPEG slice (and its JPEG lesion mask) → pseudo-3D arrays of `num_slices` identical slices.

    Returns `(volume, mask)`: volume float32 `(W, H, num_slices)` in the JPEG's grey levels 0..255 (voxel axes
    x, y, z as nibabel lays them out; give it an identity affine), mask uint8 0/1 of the same shape (JPEG
    artefacts removed by thresholding at 128) or None.
    """
    from PIL import Image

    with Image.open(image_path) as image:
        grey = np.asarray(image.convert("L"), dtype=np.float32)  # (rows=y, cols=x)
    volume = np.repeat(grey.T[:, :, None], num_slices, axis=2)
    mask = None
    if mask_path is not None:
        with Image.open(mask_path) as image:
            binary = (np.asarray(image.convert("L")) >= 128).astype(np.uint8)
        if binary.shape != grey.shape:
            raise DatasetFormatError(f"{mask_path}: mask shape {binary.shape} differs from image {grey.shape}")
        mask = np.repeat(binary.T[:, :, None], num_slices, axis=2)
    return volume, mask


# ----------------------------------------------------------------------------------------------------------------
# Segmentation CSV (seed 002)
# ----------------------------------------------------------------------------------------------------------------


def patient_split(patient_id: str, seed: int) -> float:
    """A stable number in [0, 1) per patient (and seed): the same patient always lands in the same split."""
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def read_segmentation_csv(
    csv_path: str | Path,
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    on_missing: OnMissing = "raise",
):
    """Seed-002 segmentation CSV (`path, label, patient_id`; paths relative to the CSV's folder or absolute) →
    `DatasetDict` with `train` / `validation` (/ `test`) splits made per patient, so no patient's scans are in
    two splits. Columns: `image_path`, `label_path`, `patient_id`.

    Raises:
        DatasetFormatError: wrong header, empty patient id, or fractions outside [0, 1).
        MissingFilesError: image or label files missing/unreadable and `on_missing="raise"`.
    """
    import datasets

    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DatasetFormatError(
            f"split fractions must be in [0, 1) and sum below 1, got val={val_fraction}, test={test_fraction}"
        )
    csv_path = Path(csv_path)
    base = csv_path.parent
    rows = []
    for i, row in enumerate(read_csv_rows(csv_path, ["path", "label", "patient_id"])):
        if not row["patient_id"].strip():
            raise DatasetFormatError(f"{csv_path}: row {i + 2} has an empty patient_id")
        rows.append(
            {
                "image_path": str((base / row["path"]).resolve()),
                "label_path": str((base / row["label"]).resolve()),
                "patient_id": row["patient_id"].strip(),
            }
        )
    kept = drop_unusable(rows, ["image_path", "label_path"], f"segmentation CSV {csv_path}", on_missing)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for row in kept:
        u = patient_split(row["patient_id"], seed)
        name = "test" if u < test_fraction else "validation" if u < test_fraction + val_fraction else "train"
        splits[name].append(row)
    result = datasets.DatasetDict(
        {name: datasets.Dataset.from_list(r) for name, r in splits.items() if r or name != "test"}
    )
    for dataset in result.values():
        dataset.info.description = json.dumps({"rows": dataset.num_rows, "skipped_rows": len(rows) - len(kept)})
    return result


# ----------------------------------------------------------------------------------------------------------------
# Libra / LLaVA conversations (seed 001)
# ----------------------------------------------------------------------------------------------------------------


def read_libra(json_path: str | Path, *, on_missing: OnMissing = "raise", streaming: bool = False):
    """Libra/LLaVA conversation JSON → rows `id`, `current_volume_path`, `prior_volume_path`, `has_prior`,
    `prompt` (first human turn), `report` (first gpt turn). `image` is `[current, prior]` (or one path); a missing
    prior means the current scan stands in (Libra's rule). Relative paths resolve against the JSON's parent's
    parent when the JSON sits in a `libra/` folder of a cohort, else against the JSON's folder."""
    json_path = Path(json_path)
    base = json_path.parent.parent if json_path.parent.name == "libra" else json_path.parent
    rows = []
    for i, record in enumerate(read_json_records(json_path, ["id", "image", "conversations"])):
        images = record["image"] if isinstance(record["image"], list) else [record["image"]]
        if not 1 <= len(images) <= 2 or not all(isinstance(p, str) for p in images):
            raise DatasetFormatError(f"{json_path}: record {i} `image` must be a path or [current, prior] paths")
        turns = record["conversations"]
        human = next((t["value"] for t in turns if t.get("from") == "human"), None)
        gpt = next((t["value"] for t in turns if t.get("from") == "gpt"), None)
        if human is None or gpt is None:
            raise DatasetFormatError(f"{json_path}: record {i} needs a 'human' and a 'gpt' turn")
        current = str(base / images[0])
        prior = str(base / images[1]) if len(images) == 2 else current
        rows.append(
            {
                "id": str(record["id"]),
                "current_volume_path": current,
                "prior_volume_path": prior,
                "has_prior": prior != current,
                "prompt": human,
                "report": gpt,
            }
        )
    kept = drop_unusable(rows, ["current_volume_path", "prior_volume_path"], f"Libra {json_path}", on_missing)
    return to_dataset(kept, len(rows) - len(kept), streaming)
