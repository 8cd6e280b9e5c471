"""Readers, processed-volume cache, collators and the orientation round trip, on a generated phantom cohort."""

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from hf_models import CT_RATE_ABNORMALITIES, ReCTImageProcessor
from trainers.data.anatomy_terms import region_mentions
from trainers.data.cache import VolumeCache
from trainers.data.collators import (
    ClassificationCollator,
    ContrastiveCollator,
    GenerationCollator,
    LocalizationCollator,
)
from trainers.data.readers import (
    DatasetFormatError,
    MissingFilesError,
    lift_slice_to_volume,
    read_ct_rate,
    read_libra,
    read_omniabnorm,
    read_segmentation_csv,
    skipped_rows,
)
from trainers.data.volume_dataset import CachedVolumeDataset


@pytest.fixture
def cohort(small_cohort, tmp_path) -> Path:
    """A private copy of the session cohort, for tests that damage files."""
    copy = tmp_path / "cohort"
    shutil.copytree(small_cohort, copy)
    return copy


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ---- readers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "valid"])
def test_ct_rate_reader_matches_the_csvs(small_cohort, split):
    data = read_ct_rate(small_cohort, split, lesion_masks=True)
    reports = csv_rows(small_cohort / "dataset" / "radiology_text_reports" / f"{split}_reports.csv")
    labels = {
        r["VolumeName"]: r
        for r in csv_rows(small_cohort / "dataset" / "multi_abnormality_labels" / f"{split}_predicted_labels.csv")
    }
    assert data.num_rows == len(reports) and skipped_rows(data) == 0
    for row in data:
        assert Path(row["volume_path"]).is_file() and Path(row["anatomy_mask_path"]).is_file()
        assert Path(row["lesion_mask_path"]).is_file()
        assert "/masks/anatomy/" in row["anatomy_mask_path"] and "/dataset/" not in row["anatomy_mask_path"]
        assert row["labels"] == [int(labels[row["volume_name"]][c]) for c in CT_RATE_ABNORMALITIES]
        assert row["cot"] and all(set(c) == {"question", "answer"} for c in row["cot"])
        if row["scan_id"] == "b":
            assert row["prior_volume_path"] is not None and "_a_" in Path(row["prior_volume_path"]).name
        else:
            assert row["prior_volume_path"] is None


def test_ct_rate_reader_reports_every_missing_file_at_once_or_skips(cohort):
    data = read_ct_rate(cohort, "train")
    victims = [Path(data[0]["volume_path"]), Path(data[1]["anatomy_mask_path"])]
    victims[0].unlink()
    victims[1].write_bytes(b"")
    truncated = Path(data[2]["volume_path"])
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(MissingFilesError) as err:
        read_ct_rate(cohort, "train")
    message = str(err.value)
    assert "3 file(s)" in message
    for path in (*victims, truncated):
        assert str(path) in message
    assert "missing" in message and "empty file" in message and "unreadable" in message
    skipped = read_ct_rate(cohort, "train", on_missing="skip")
    assert skipped.num_rows == data.num_rows - 3 and skipped_rows(skipped) == 3


def test_ct_rate_reader_rejects_bad_csv_headers(cohort):
    path = cohort / "dataset" / "radiology_text_reports" / "train_reports.csv"
    rows = csv_rows(path)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["VolumeName", "Findings"])
        writer.writeheader()
        writer.writerows({"VolumeName": r["VolumeName"], "Findings": r["Findings_EN"]} for r in rows)
    with pytest.raises(
        DatasetFormatError, match=r"train_reports\.csv: missing column\(s\) \['Findings_EN', 'Impressions_EN'\]"
    ):
        read_ct_rate(cohort, "train")


def test_ct_rate_reader_rejects_labels_csv_without_a_volume(cohort):
    path = cohort / "dataset" / "multi_abnormality_labels" / "train_predicted_labels.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))
    with pytest.raises(DatasetFormatError, match="no row for 1 volume"):
        read_ct_rate(cohort, "train")


def test_omniabnorm_reader_and_pseudo_3d_lift(small_cohort):
    data = read_omniabnorm(small_cohort, num_slices=4)
    assert data.num_rows > 0
    row = data[0]
    assert row["category"] in CT_RATE_ABNORMALITIES and isinstance(row["cot_reasoning"], list)
    volume, mask = lift_slice_to_volume(row["image_path"], row["mask_path"], row["num_slices"])
    assert volume.shape[2] == 4 and mask.shape == volume.shape
    assert set(np.unique(mask)) <= {0, 1} and mask.sum() > 0
    assert np.array_equal(volume[..., 0], volume[..., 3])


def test_omniabnorm_reader_rejects_bad_json(cohort):
    (cohort / "omniabnorm" / "cot.json").write_text(json.dumps([{"case_id": "x", "region": "lung"}]))
    with pytest.raises(DatasetFormatError, match=r"record 0 lacks key\(s\) \['category', 'cot_reasoning'\]"):
        read_omniabnorm(cohort)


def test_segmentation_split_never_leaks_a_patient(small_cohort, tmp_path):
    # Several scans per patient: duplicate every row under a second scan name for the same patient.
    rows = csv_rows(small_cohort / "segmentation.csv")
    doubled = tmp_path / "seg.csv"
    with open(doubled, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "patient_id"])
        writer.writeheader()
        for row in rows:
            for _ in range(2):
                writer.writerow(
                    {
                        "path": str(small_cohort / row["path"]),
                        "label": str(small_cohort / row["label"]),
                        "patient_id": row["patient_id"],
                    }
                )
    for seed in range(5):
        splits = read_segmentation_csv(doubled, val_fraction=0.3, test_fraction=0.2, seed=seed)
        patients = {name: set(split["patient_id"]) for name, split in splits.items()}
        names = list(patients)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                assert not patients[a] & patients[b], (seed, a, b)
        assert sum(split.num_rows for split in splits.values()) == 2 * len(rows)
    again = read_segmentation_csv(doubled, val_fraction=0.3, test_fraction=0.2, seed=4)
    assert again["train"]["image_path"] == splits["train"]["image_path"]


def test_segmentation_reader_validates(cohort):
    path = cohort / "segmentation.csv"
    with pytest.raises(DatasetFormatError, match="sum below 1"):
        read_segmentation_csv(path, val_fraction=0.6, test_fraction=0.5)
    rows = csv_rows(path)
    (cohort / rows[0]["label"]).unlink()
    with pytest.raises(MissingFilesError, match=rows[0]["label"].split("/")[-1]):
        read_segmentation_csv(path)
    path.write_text("image,mask\n")
    with pytest.raises(DatasetFormatError, match=r"missing column\(s\) \['path', 'label', 'patient_id'\]"):
        read_segmentation_csv(path)


def test_libra_reader_current_and_prior(small_cohort):
    data = read_libra(small_cohort / "libra" / "train.json")
    assert data.num_rows > 0
    for row in data:
        assert Path(row["current_volume_path"]).is_file() and Path(row["prior_volume_path"]).is_file()
        assert row["has_prior"] == (row["current_volume_path"] != row["prior_volume_path"])
        assert "<image>" in row["prompt"] and row["report"]


# ---- cache -----------------------------------------------------------------------------------------------------


def processor() -> ReCTImageProcessor:
    return ReCTImageProcessor(volume_size=[8, 32, 32], windows=["lung", "mediastinum"])


def test_cache_serves_what_the_processor_makes(small_cohort, tmp_path):
    row = read_ct_rate(small_cohort, "train")[0]
    cache = VolumeCache(tmp_path / "cache", processor())
    args = (row["volume_path"], row["anatomy_mask_path"], None, row["rescale_slope"], row["rescale_intercept"])
    first = cache.get(*args)
    second = cache.get(*args)
    assert (cache.misses, cache.hits) == (1, 1)
    direct = processor().process_volume(
        row["volume_path"],
        anatomy_mask=row["anatomy_mask_path"],
        rescale_slope=row["rescale_slope"],
        rescale_intercept=row["rescale_intercept"],
    )
    assert torch.equal(first["pixel_values"], direct["pixel_values"])
    assert torch.equal(second["pixel_values"], direct["pixel_values"])
    assert torch.equal(second["anatomy_mask"].long(), direct["anatomy_mask"])
    assert second["volume_meta"] == json.loads(json.dumps(direct["volume_meta"]))


def test_cache_invalidates_on_setting_change_and_on_file_change(small_cohort, tmp_path):
    rows = read_ct_rate(small_cohort, "train")
    volume = tmp_path / "ct.nii.gz"
    shutil.copy(rows[0]["volume_path"], volume)
    cache = VolumeCache(tmp_path / "cache", processor())
    before = cache.get(volume)["pixel_values"]
    # another window → another fingerprint → recomputed, different tensor
    other = VolumeCache(
        tmp_path / "cache", ReCTImageProcessor(volume_size=[8, 32, 32], windows=["bone", "mediastinum"])
    )
    assert other.fingerprint != cache.fingerprint
    assert not torch.equal(other.get(volume)["pixel_values"], before) and other.misses == 1
    # the file is replaced by another scan → recomputed from the new content
    shutil.copy(rows[1]["volume_path"], volume)
    after = cache.get(volume)
    assert cache.misses == 2 and cache.hits == 0
    assert not torch.equal(after["pixel_values"], before)
    assert torch.equal(after["pixel_values"], processor().process_volume(str(volume))["pixel_values"])
    # content identity: same bytes under a new mtime is still a hit
    content = VolumeCache(tmp_path / "cache", processor(), identity="content")
    content.get(volume)
    os.utime(volume, (1, 1))
    content.get(volume)
    assert (content.misses, content.hits) == (1, 1)


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import trainers.data.cache as cache_module
    from hf_models import ReCTImageProcessor
    # Die right after the temporary file is written, before it is renamed into place.
    cache_module.os.replace = lambda src, dst: os._exit(17)
    processor = ReCTImageProcessor(volume_size=[8, 32, 32], windows=["lung", "mediastinum"])
    cache = cache_module.VolumeCache(sys.argv[1], processor)
    cache.get(sys.argv[2])
    """
)


def test_crash_mid_write_leaves_no_entry_that_is_read_later(small_cohort, tmp_path):
    volume = read_ct_rate(small_cohort, "train")[0]["volume_path"]
    cache_dir = tmp_path / "cache"
    VolumeCache(cache_dir, processor())  # settings file written up front, as in a real run
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(cache_dir), volume], env=env, timeout=120)
    assert proc.returncode == 17
    leftovers = [p for p in cache_dir.rglob("*") if p.is_file() and p.name != "processor_settings.json"]
    assert leftovers and all(p.name.endswith(".tmp") for p in leftovers)  # only the abandoned temporary file
    cache = VolumeCache(cache_dir, processor())
    result = cache.get(volume)
    assert cache.misses == 1  # the temporary file was not taken for an entry
    assert torch.equal(result["pixel_values"], processor().process_volume(volume)["pixel_values"])


def test_cache_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="identity"):
        VolumeCache(tmp_path, processor(), identity="mtime")
    with pytest.raises(ValueError, match="storage_dtype"):
        VolumeCache(tmp_path, processor(), storage_dtype="int8")


# ---- dataset + collators ---------------------------------------------------------------------------------------


def test_dataset_and_collators_build_model_inputs(small_cohort, tmp_path, minilm_dir):
    rows = read_ct_rate(small_cohort, "train", lesion_masks=True)
    cache = VolumeCache(tmp_path / "cache", processor())
    dataset = CachedVolumeDataset(
        rows,
        cache,
        anatomy=True,
        lesion_column="lesion_mask_path",
        label_indices=[2, 12],
        text_column="report",
        region_mentions_fn=region_mentions,
        prior_column="prior_volume_path",
    )
    examples = [dataset[i] for i in range(3)]
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)

    batch = ClassificationCollator()(examples)
    assert batch["pixel_values"].shape == (3, 2, 8, 32, 32) and batch["anatomy_mask"].shape == (3, 1, 8, 32, 32)
    assert batch["labels"].shape == (3, 2) and batch["labels"].dtype == torch.float32

    batch = ContrastiveCollator(tokenizer, max_length=64)(examples)
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[1] <= 64
    assert batch["region_mentions"].shape == (3, 20) and batch["region_mentions"].sum() > 0

    prompts = [([[1, 2, 3]], [1]), ([], []), ([[4, 5, 6], [7, 8, 9]], [1, 0])]
    for example, (points, labels) in zip(examples, prompts):
        example.update(input_points=points, input_labels=labels, input_boxes=[0, 0, 0, 4, 16, 16], prompt="effusion")
    examples[1]["input_points"] = None
    batch = LocalizationCollator(tokenizer)(examples)
    assert batch["labels"].shape == (3, 1, 8, 32, 32)
    assert batch["input_points"].shape == (3, 2, 3) and batch["input_labels"].tolist() == [
        [1, -10],
        [-10, -10],
        [1, 0],
    ]
    assert batch["input_boxes"].shape == (3, 6)

    for example in examples:
        example.update(prompt="<image>\nDescribe the findings.", report=example["text"][:80])
    tokenizer.padding_side = "right"
    batch = GenerationCollator(tokenizer)(examples)
    assert batch["prior_pixel_values"].shape == batch["pixel_values"].shape
    prompt_len = len(tokenizer("<image>\nDescribe the findings.")["input_ids"])
    assert (batch["labels"][:, :prompt_len] == -100).all()
    assert ((batch["labels"] != -100) <= (batch["attention_mask"] == 1)).all()
    assert (batch["labels"] != -100).any(dim=1).all()

    examples[0].pop("anatomy_mask")
    with pytest.raises(ValueError, match="anatomy_mask` is present in 2 of 3"):
        ClassificationCollator()(examples)


def test_region_mentions_from_report_text():
    mentions = region_mentions("No pleural effusion. A 14 mm nodule in the right lower lobe. Heart size is normal.")
    assert [i + 1 for i, m in enumerate(mentions) if m] == [4, 7, 19]


# ---- orientation round trip through the processor ------------------------------------------------------------


def test_lesion_masks_round_trip_through_the_processor_in_every_stored_orientation(small_cohort):
    rows = read_ct_rate(small_cohort, "train", lesion_masks=True)
    image_processor = ReCTImageProcessor(volume_size=[24, 64, 64])
    orientations = set()
    for row in rows:
        image = nib.load(row["volume_path"])
        orientations.add("".join(nib.aff2axcodes(image.affine)))
        out = image_processor(row["volume_path"], lesion_mask=row["lesion_mask_path"])
        restored = image_processor.post_process_masks(out["lesion_mask"], out["volume_meta"])[0]
        original = np.asarray(nib.load(row["lesion_mask_path"]).dataobj)
        assert restored.shape == original.shape
        assert np.array_equal(restored, original)  # same grid size: nearest resampling is exact
        assert np.allclose(out["volume_meta"][0]["original_affine"], image.affine)
    assert len(orientations) >= 2, orientations


def test_dataset_prepare_fills_the_cache_and_transform_runs_per_example(small_cohort, tmp_path):
    rows = read_ct_rate(small_cohort, "train")
    cache = VolumeCache(tmp_path / "cache", processor())

    def flip(example):
        return {**example, "pixel_values": example["pixel_values"].flip(-1), "flipped": True}

    dataset = CachedVolumeDataset(rows, cache, prior_column="prior_volume_path", transform=flip)
    assert dataset.prepare(progress=False) == cache.misses > 0
    assert dataset.prepare(progress=False) == 0  # everything is there now
    misses = cache.misses
    example = dataset[0]
    assert cache.misses == misses and example["flipped"]
    plain = CachedVolumeDataset(rows, cache)[0]
    assert torch.equal(example["pixel_values"], plain["pixel_values"].flip(-1))
