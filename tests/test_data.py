"""Readers, processed-volume cache, collators and the orientation round trip, on a generated phantom cohort."""

import csv
import gc
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from hf_models import CT_RATE_ABNORMALITIES, ReCTConfig, ReCTForVolumeClassification, ReCTImageProcessor, ReCTModel
from tests.conftest import tiny_text_kwargs, tiny_vision_kwargs
from trainers.data import zero_copy
from trainers.data.anatomy_terms import region_mentions
from trainers.data.cache import CacheEntryError, VolumeCache, VolumeSource
from trainers.data.collators import (
    ClassificationCollator,
    ContrastiveCollator,
    LocalizationCollator,
    volume_fields,
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
from trainers.data.zero_copy import is_mapped, shared_batch_buffer


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


def meta_dict(volume_meta) -> dict:
    """The per-volume record as a JSON-able dict, whichever type the processor returns."""
    return volume_meta.to_dict() if hasattr(volume_meta, "to_dict") else volume_meta


# storage dtype → the largest rounding error allowed on windowed values in [0, 1] (half a unit in the last place)
STORAGE_TOLERANCE = {"float32": 0.0, "float16": 2**-12, "bfloat16": 2**-9}


@pytest.mark.parametrize("storage_dtype", sorted(STORAGE_TOLERANCE))
def test_cache_serves_what_the_processor_makes(small_cohort, tmp_path, storage_dtype):
    row = read_ct_rate(small_cohort, "train")[0]
    cache = VolumeCache(tmp_path / "cache", processor(), storage_dtype=storage_dtype)
    source = VolumeSource(
        row["volume_path"],
        anatomy_mask_path=row["anatomy_mask_path"],
        rescale_slope=row["rescale_slope"],
        rescale_intercept=row["rescale_intercept"],
    )
    first = cache.get(source)  # processed and stored
    second = cache.get(source)  # read back (memory-mapped)
    assert (cache.misses, cache.hits) == (1, 1)
    assert is_mapped(second["pixel_values"]) and is_mapped(second["anatomy_mask"])
    assert second["lesion_mask"] is None and first["lesion_mask"] is None
    direct = processor().process_volume(
        row["volume_path"],
        anatomy_mask=row["anatomy_mask_path"],
        rescale_slope=row["rescale_slope"],
        rescale_intercept=row["rescale_intercept"],
    )
    # a miss serves exactly what a hit serves: the stored dtype, the same bits, the same metadata type
    for name in ("pixel_values", "anatomy_mask"):
        assert first[name].dtype == second[name].dtype and torch.equal(first[name], second[name])
    assert second["pixel_values"].dtype == getattr(torch, storage_dtype)
    assert type(first["volume_meta"]) is type(second["volume_meta"])
    assert meta_dict(first["volume_meta"]) == meta_dict(second["volume_meta"])
    assert meta_dict(second["volume_meta"]) == json.loads(json.dumps(meta_dict(direct["volume_meta"])))
    error = (second["pixel_values"].float() - direct["pixel_values"]).abs().max().item()
    assert error <= STORAGE_TOLERANCE[storage_dtype]  # float16: ≤ 2.4e-4, well inside the 1e-3 budget
    assert torch.equal(second["anatomy_mask"].long(), direct["anatomy_mask"])


def test_cache_invalidates_on_setting_change_and_on_file_change(small_cohort, tmp_path):
    rows = read_ct_rate(small_cohort, "train")
    volume = tmp_path / "ct.nii.gz"
    shutil.copy(rows[0]["volume_path"], volume)
    cache = VolumeCache(tmp_path / "cache", processor())
    before = cache.get(volume)["pixel_values"].clone()
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
    # another rescale is another entry
    assert VolumeSource(volume, rescale_intercept=-1024.0) not in cache and VolumeSource(volume) in cache
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


def test_cache_rejects_bad_options_sources_and_damaged_entries(small_cohort, tmp_path):
    with pytest.raises(ValueError, match="identity"):
        VolumeCache(tmp_path, processor(), identity="mtime")
    with pytest.raises(ValueError, match="storage_dtype"):
        VolumeCache(tmp_path, processor(), storage_dtype="int8")
    cache = VolumeCache(tmp_path / "cache", processor())
    with pytest.raises(TypeError, match="VolumeSource or a volume path, found int"):
        cache.get(3)
    volume = read_ct_rate(small_cohort, "train")[0]["volume_path"]
    cache.get(volume)
    entry = cache.entry_path(cache.key(volume))
    entry.write_bytes(entry.read_bytes()[:100])  # damaged by something else than this cache
    with pytest.raises(CacheEntryError, match=f"cache entry {entry}: not a readable entry"):
        cache.get(volume)


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
    assert batch.keys() == {"pixel_values", "labels"}
    assert batch["pixel_values"].shape == (3, 2, 8, 32, 32)
    assert batch["labels"].shape == (3, 2) and batch["labels"].dtype == torch.float32
    classifier = ReCTForVolumeClassification(collated_model_config(num_labels=2))
    assert torch.isfinite(classifier(**batch).loss)

    batch = ContrastiveCollator(tokenizer, max_length=64)(examples)
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[1] <= 64
    assert batch["region_mentions"].shape == (3, 20) and batch["region_mentions"].sum() > 0
    assert batch["anatomy_mask"].shape == (3, 1, 8, 32, 32) and batch["return_loss"] is True
    output = ReCTModel(collated_model_config()).train()(**batch)
    assert torch.isfinite(output.loss) and output.region_loss is not None

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

    examples[0].pop("anatomy_mask")
    with pytest.raises(ValueError, match="anatomy_mask` is present in 2 of 3"):
        ContrastiveCollator(tokenizer)(examples)
    examples[0].pop("labels")
    with pytest.raises(ValueError, match="labels` is present in 2 of 3"):
        ClassificationCollator()(examples)


def collated_model_config(**kwargs):
    """A tiny ReCTConfig for the collated test volumes: 2 windows, (8, 32, 32), 20 anatomy regions."""
    vision = tiny_vision_kwargs(in_channels=2, num_regions=20)
    return ReCTConfig(vision_config=vision, text_config=tiny_text_kwargs(), projection_dim=16, **kwargs)


def test_dataset_prepare_fills_the_cache_and_transform_runs_per_example(small_cohort, tmp_path):
    rows = read_ct_rate(small_cohort, "train")
    # row 0's prior scan is row 1's volume: one entry serves both
    priors = {"prior_volume_path": [rows[1]["volume_path"]], "prior_rescale_slope": [rows[1]["rescale_slope"]]}
    priors["prior_rescale_intercept"] = [rows[1]["rescale_intercept"]]
    for column, first in priors.items():
        rows = rows.remove_columns(column).add_column(column, first + [None] * (len(rows) - 1))
    cache = VolumeCache(tmp_path / "cache", processor())

    def flip(example):
        return {**example, "pixel_values": example["pixel_values"].flip(-1), "flipped": True}

    dataset = CachedVolumeDataset(rows, cache, prior_column="prior_volume_path", transform=flip)
    assert dataset.prepare(progress=False) == cache.misses == len(rows)
    assert dataset.sources(rows[0])[1] == dataset.sources(rows[1])[0] and dataset.sources(rows[1])[1] is None
    assert dataset.prepare(progress=False) == 0  # everything is there now
    misses = cache.misses
    example = dataset[0]
    assert cache.misses == misses and example["flipped"]
    plain = CachedVolumeDataset(rows, cache)
    assert torch.equal(example["pixel_values"], plain[0]["pixel_values"].flip(-1))
    assert torch.equal(example["prior_pixel_values"], plain[1]["pixel_values"])  # the transform chose not to flip it


def keep_examples(examples: list) -> list:
    """A DataLoader collate_fn that delivers the examples as the dataset made them (one volume per item)."""
    return examples


def add_noise_in_place(example: dict) -> dict:
    example["pixel_values"].add_(0.5)  # in place, on the memory-mapped cache entry
    return example


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_worker_examples_reach_the_main_process_as_file_mappings_and_never_write_the_cache(small_cohort, tmp_path):
    rows = read_ct_rate(small_cohort, "train", lesion_masks=True)
    cache = VolumeCache(tmp_path / "cache", processor(), storage_dtype="float16")
    dataset = CachedVolumeDataset(rows, cache, anatomy=True, lesion_column="lesion_mask_path")
    dataset.prepare(progress=False)
    entries = sorted(cache.root.rglob("*.safetensors"))
    digests = [file_digest(p) for p in entries]
    expected = [dataset[i] for i in range(len(dataset))]
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=keep_examples)
    received = [batch[0] for batch in loader]
    for got, want in zip(received, expected, strict=True):
        for name in ("pixel_values", "anatomy_mask", "lesion_mask"):
            # the main process maps the worker's entry file: no copy through shared memory
            assert is_mapped(got[name]) and not got[name].is_shared()
            assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name])
        got["pixel_values"].mul_(0)  # copy-on-write: the consumer's writes stay private
    # a transform writing in place in the workers leaves the entries as they were, too
    noisy = CachedVolumeDataset(rows, cache, anatomy=True, transform=add_noise_in_place)
    loader = torch.utils.data.DataLoader(noisy, batch_size=1, num_workers=2, collate_fn=keep_examples)
    for batch, want in zip(loader, expected, strict=True):
        assert torch.equal(batch[0]["pixel_values"], want["pixel_values"] + 0.5)
    assert [file_digest(p) for p in entries] == digests
    assert torch.equal(dataset[0]["pixel_values"], expected[0]["pixel_values"])


def test_a_mapping_whose_file_was_replaced_is_sent_as_a_copy(small_cohort, tmp_path):
    rows = read_ct_rate(small_cohort, "train")
    cache = VolumeCache(tmp_path / "cache", processor())
    cache.get(rows[0]["volume_path"])
    entry = cache.entry_path(cache.key(rows[0]["volume_path"]))
    pixel_values = cache.get(rows[0]["volume_path"])["pixel_values"]
    kept = pixel_values.clone()
    # another entry renamed over this one (as a concurrent writer of the same key would): the receiver must not map
    # the new file in place of the bytes the sender holds
    cache.get(rows[1]["volume_path"])
    os.replace(cache.entry_path(cache.key(rows[1]["volume_path"])), entry)
    received = pickle.loads(ForkingPickler.dumps(pixel_values))
    assert torch.equal(received, kept) and not is_mapped(received)


def test_collators_in_workers_keep_float16(small_cohort, tmp_path):
    rows = read_ct_rate(small_cohort, "train")
    cache = VolumeCache(tmp_path / "cache", processor(), storage_dtype="float16")
    dataset = CachedVolumeDataset(rows, cache, anatomy=True, label_indices=[2, 12])
    dataset.prepare(progress=False)
    for collate, names in ((ClassificationCollator(), ("pixel_values", "labels")),
                           (volume_fields, ("pixel_values", "anatomy_mask"))):  # fmt: skip
        loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=1, collate_fn=collate)
        batch = next(iter(loader))
        expected = collate([dataset[i] for i in range(3)])
        assert batch["pixel_values"].dtype == torch.float16
        assert batch.get("anatomy_mask", torch.zeros(0, dtype=torch.uint8)).dtype == torch.uint8
        for name in names:
            assert torch.equal(batch[name], expected[name])


def test_batch_buffers_are_reused_only_after_the_receiver_frees_them():
    first = shared_batch_buffer((2, 3), torch.float16)
    first.copy_(torch.arange(6.0).view(2, 3))
    received = pickle.loads(ForkingPickler.dumps(first))  # as the main process receives a worker's batch
    assert torch.equal(received, first) and received.dtype == torch.float16
    held = shared_batch_buffer((2, 3), torch.float16)  # the receiver still holds `received`: another buffer
    assert held.data_ptr() != first.data_ptr()
    del received
    gc.collect()
    again = shared_batch_buffer((3, 2), torch.float16)  # same bytes: the freed buffer comes back
    assert again.data_ptr() == first.data_ptr()
    received = pickle.loads(ForkingPickler.dumps(again))
    received.fill_(7)  # the receiver owns the buffer until it frees it; its writes are what the sender holds
    assert (again == 7).all()
    second = pickle.loads(ForkingPickler.dumps(again))  # a buffer has one owner: a second receiver gets a copy
    second.fill_(1)
    assert (received == 7).all() and torch.equal(second, torch.ones(3, 2, dtype=torch.float16))


def test_worker_batches_stay_intact_while_the_main_process_keeps_them(small_cohort, tmp_path):
    rows = read_ct_rate(small_cohort, "train")
    cache = VolumeCache(tmp_path / "cache", processor(), storage_dtype="float16")
    dataset = CachedVolumeDataset(rows, cache, anatomy=True, label_indices=[2, 12])
    dataset.prepare(progress=False)
    expected = ClassificationCollator()([dataset[i] for i in range(len(dataset))])
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, num_workers=2, collate_fn=ClassificationCollator(), persistent_workers=True
    )
    kept = [batch for _ in range(3) for batch in loader]  # every batch of three epochs alive at once
    for index, batch in enumerate(kept):
        start = (index * 2) % len(dataset)
        for name in ("pixel_values", "labels"):
            assert torch.equal(batch[name], expected[name][start : start + 2])
    # dropped batches free their buffers for reuse (a worker holds no more than are in flight at once), and what
    # arrives is still the right data
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, num_workers=2, collate_fn=collate_reporting_pool_size, persistent_workers=True
    )
    pool_sizes = []
    for _ in range(6):
        for index, batch in enumerate(loader):
            assert torch.equal(batch["pixel_values"], expected["pixel_values"][index * 2 : index * 2 + 2])
            pool_sizes.append(batch.pop("pool_size"))
    assert max(pool_sizes) <= loader.prefetch_factor + 2


def collate_reporting_pool_size(examples: list) -> dict:
    """ClassificationCollator, plus how many buffers of one size this worker's pool holds."""
    batch = ClassificationCollator()(examples)
    batch["pool_size"] = max(len(buffers) for buffers in zero_copy._POOL.values())
    return batch


def test_float16_cache_trains_the_classifier_like_float32(small_cohort, tmp_path):
    rows = read_ct_rate(small_cohort, "train")
    losses = {}
    for dtype in ("float32", "float16"):
        cache = VolumeCache(tmp_path / "cache", processor(), storage_dtype=dtype)
        dataset = CachedVolumeDataset(rows, cache, label_indices=[2, 12])
        batch = ClassificationCollator()([dataset[i] for i in range(4)])
        assert batch["pixel_values"].dtype == getattr(torch, dtype)
        torch.manual_seed(0)
        config = ReCTConfig(
            vision_config=tiny_vision_kwargs(in_channels=2),
            text_config=tiny_text_kwargs(),
            projection_dim=16,
            id2label={0: "Cardiomegaly", 1: "Pleural effusion"},
        )
        model = ReCTForVolumeClassification(config)
        output = model(**batch)
        output.loss.backward()
        assert output.logits.dtype == torch.float32 and torch.isfinite(output.loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        losses[dtype] = output.loss.item()
    assert losses["float16"] == pytest.approx(losses["float32"], abs=1e-3)


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
