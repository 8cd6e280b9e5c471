"""ReCTImageProcessor: reading (NIfTI, DICOM, arrays), canonical LPS orientation, resampling, windowing, masks,
mapping predictions back to the original grid, settings round trip, and every bad-input error."""

import copy
import json
import sys
import textwrap
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

import hf_models.image_processing_rect as rect
import hf_models.volume_reading_rect as reading
from hf_models import VolumeMetadata
from hf_models.image_processing_rect import NAMED_WINDOWS, ReCTImageProcessor, load_volume
from trainers.fresh_process import run_without_project


REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def save_nifti(path, data, affine, **header):
    image = nib.Nifti1Image(data, affine)
    for key, value in header.items():
        image.header[key] = value
    nib.save(image, str(path))
    return str(path)


def dice(a, b):
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def window(hu, center, width):
    return np.clip((np.asarray(hu, dtype=np.float64) - (center - width / 2)) / width, 0, 1)


def canonical_phantom(shape=(10, 12, 14), seed=0):
    """A (D, H, W) = (S, P, L) phantom with a cube at superior / anterior / patient-left and a bar, plus labels."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    hu = rng.integers(-200, 200, size=shape).astype(np.int16)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[d - 4 :, :4, w - 5 :] = 1  # superior, anterior, left corner
    labels[2:4, h // 2, 1 : w - 2] = 2  # a bar
    hu[labels == 1] = 900
    hu[labels == 2] = -900
    return hu, labels


def canonical_affine(shape, spacing=(2.5, 0.7, 0.7), origin=(10.0, -20.0, 30.0)):
    """RAS affine of a (D, H, W) = (S, P, L) array: D → +z, H → -y, W → -x."""
    affine = np.eye(4)
    affine[:3, 0] = [0, 0, spacing[0]]
    affine[:3, 1] = [0, -spacing[1], 0]
    affine[:3, 2] = [-spacing[2], 0, 0]
    affine[:3, 3] = origin
    return affine


def as_layout(array, affine, layout):
    """The same physical volume stored RAS-style (x→R, y→A, z→S), LPS-style (x→L, y→P, z→S) or permuted."""
    # canonical index (d, h, w); LPS layout index (i, j, k) = (w, h, d)
    lps = array.transpose(2, 1, 0)
    lps_affine = affine[:, [2, 1, 0, 3]]
    if layout == "lps":
        return np.ascontiguousarray(lps), lps_affine
    if layout == "ras":  # flip x and y: voxel i → n - 1 - i
        nx, ny = lps.shape[:2]
        flip = np.eye(4)
        flip[0, 0], flip[0, 3], flip[1, 1], flip[1, 3] = -1, nx - 1, -1, ny - 1
        return np.ascontiguousarray(lps[::-1, ::-1, :]), lps_affine @ flip
    if layout == "permuted":  # array axes (z, x, y) of the LPS layout, i.e. a sagittal-first storage
        return np.ascontiguousarray(lps.transpose(2, 0, 1)), lps_affine[:, [2, 0, 1, 3]]
    raise AssertionError(layout)


def dicom_series(
    folder, n=5, spacing=2.5, modalities=None, series_uids=None, slope=None, intercept=None, skip=(), order=None
):
    """Write `n` copies of pydicom's CT_small.dcm as one series with positions stepping along +z (LPS)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series_uid = generate_uid()
    base = [float(v) for v in template.ImagePositionPatient]
    indices = [i for i in range(n) if i not in skip]
    for file_index, i in enumerate(order(indices) if order else indices):
        ds = copy.deepcopy(template)
        ds.ImagePositionPatient = [base[0], base[1], base[2] + i * spacing]
        ds.InstanceNumber = i + 1
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series_uids[i] if series_uids else series_uid
        if modalities:
            ds.Modality = modalities[i]
        if slope is not None:
            ds.RescaleSlope = slope
        if intercept is not None:
            ds.RescaleIntercept = intercept
        ds.save_as(str(folder / f"slice_{file_index:03d}.dcm"))
    return folder, template


# --------------------------------------------------------------------------------------------------------------
# resampling is F.interpolate, orientation is LPS
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.float64])
@pytest.mark.parametrize(
    "in_shape,out_shape", [((13, 17, 11), (7, 17, 20)), ((9, 8, 7), (9, 8, 7)), ((30, 5, 11), (4, 9, 11))]
)
def test_image_resampling_equals_trilinear_interpolate(in_shape, out_shape, dtype):
    # identity affine = RAS voxel axes; the canonical (S, P, L) array is the transposed array flipped in H and W
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 300, size=in_shape).astype(dtype)
    processor = ReCTImageProcessor(volume_size=list(out_shape[::-1]), windows=[[0, 8000]])
    out = processor(hu, return_tensors="pt")["pixel_values"][0, 0]
    assert out.dtype == torch.float32
    canonical = torch.from_numpy(np.ascontiguousarray(hu.astype(np.float32).transpose(2, 1, 0)[:, ::-1, ::-1]))
    expected = F.interpolate(canonical[None, None], size=tuple(out_shape[::-1]), mode="trilinear", align_corners=False)
    torch.testing.assert_close(out, (expected[0, 0] + 4000) / 8000, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float64, np.int32])
def test_masks_use_nearest_neighbour_only(dtype):
    rng = np.random.default_rng(1)
    volume = rng.normal(0, 100, size=(13, 11, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=(13, 11, 7)).astype(dtype)
    processor = ReCTImageProcessor(volume_size=[5, 8, 9])
    out = processor(volume, anatomy_mask=labels, lesion_mask=(labels == 3), return_tensors="pt")
    mask = out["anatomy_mask"]
    assert mask.dtype == torch.int64 and tuple(mask.shape) == (1, 1, 5, 8, 9)
    canonical = torch.from_numpy(np.ascontiguousarray(labels.astype(np.float32).transpose(2, 1, 0)[:, ::-1, ::-1]))
    expected = F.interpolate(canonical[None, None], size=(5, 8, 9), mode="nearest-exact")[0].to(torch.int64)
    assert torch.equal(mask[0], expected)  # values stay in the label set: never interpolated
    assert set(out["lesion_mask"].unique().tolist()) <= {0, 1}


@pytest.mark.parametrize("layout", ["ras", "lps", "permuted"])
def test_canonical_orientation_is_lps(layout):
    hu, labels = canonical_phantom()
    affine = canonical_affine(hu.shape)
    stored, stored_affine = as_layout(hu, affine, layout)
    stored_labels, _ = as_layout(labels, affine, layout)
    processor = ReCTImageProcessor(volume_size=list(hu.shape), windows=[[0, 4000]])
    out = processor((stored, stored_affine), anatomy_mask=stored_labels, return_tensors="pt")
    pixel_values, meta = out["pixel_values"][0, 0].numpy(), out["volume_meta"][0]
    # the same physical phantom gives the same canonical array, whatever the storage layout
    np.testing.assert_allclose(pixel_values, window(hu, 0, 4000), atol=1e-6)
    np.testing.assert_array_equal(out["anatomy_mask"][0, 0].numpy(), labels)
    np.testing.assert_allclose(meta["processed_affine"], affine, atol=1e-9)
    assert nib.aff2axcodes(np.asarray(meta["processed_affine"])) == ("S", "P", "L")
    # the marker at the patient's superior / anterior / left lands in the high-D, low-H, high-W halves
    marker = np.argwhere(out["anatomy_mask"][0, 0].numpy() == 1).mean(axis=0)
    d, h, w = hu.shape
    assert marker[0] > d / 2 and marker[1] < h / 2 and marker[2] > w / 2
    world = np.asarray(meta["processed_affine"]) @ np.append(marker, 1.0)
    center = np.asarray(meta["processed_affine"]) @ np.append((np.array(hu.shape) - 1) / 2, 1.0)
    assert world[0] < center[0] and world[1] > center[1] and world[2] > center[2]  # left (-x), anterior, superior
    assert meta["original_affine"] == stored_affine.tolist()


@pytest.mark.parametrize("angle", [0.0, 12.0])
def test_processed_affine_keeps_world_positions(angle):
    # an anisotropic, permuted and (optionally) oblique scan: the recorded processed_affine must put a marker at
    # the same world position as the original affine does
    shape = (30, 16, 40)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[4:12, 3:9, 25:36] = 1
    theta = np.deg2rad(angle)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 2.0, -0.6])[:, [0, 2, 1]]  # voxel axes (x, z, y), z stored reversed
    affine[:3, 3] = [-30.0, 12.0, 5.0]
    volume = labels.astype(np.float32) * 500 + np.random.default_rng(12).normal(0, 5, shape).astype(np.float32)
    out = ReCTImageProcessor(volume_size=[20, 24, 28])((volume, affine), anatomy_mask=labels, return_tensors="pt")
    meta = out["volume_meta"][0]
    assert nib.aff2axcodes(np.asarray(meta["processed_affine"])) == ("S", "P", "L")
    before = affine @ np.append(np.argwhere(labels == 1).mean(axis=0), 1.0)
    after = np.asarray(meta["processed_affine"]) @ np.append(
        np.argwhere(out["anatomy_mask"][0, 0].numpy() == 1).mean(axis=0), 1.0
    )
    spacing = np.linalg.norm(np.asarray(meta["processed_affine"])[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, meta["steps"][1]["spacing_after"])
    # nearest resampling moves a box face by at most half an output voxel
    np.testing.assert_allclose(after[:3], before[:3], atol=0.5 * spacing.max())
    assert np.linalg.norm(after[:3] - before[:3]) < 1.0  # mm; a half-voxel shift of the grid would be ~1.5 mm


def test_dicom_lps_affine_is_converted_to_ras(tmp_path):
    folder, template = dicom_series(tmp_path / "series", n=3)
    _, affine = load_volume(folder)
    assert nib.aff2axcodes(affine) == ("S", "P", "L")  # IOP (1,0,0,0,1,0): rows → L, columns → P, slices → S


# --------------------------------------------------------------------------------------------------------------
# round trip to the original grid
# --------------------------------------------------------------------------------------------------------------


def round_trip_case(tmp_path, layout):
    """An anisotropic LPS-style scan (affine diag(-0.7, -0.7, 2.5)) with a corner cube and a bar, saved as NIfTI."""
    shape = (64, 56, 40)  # x, y, z
    hu = np.full(shape, -50, dtype=np.int16)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[2:28, 2:24, -27:-1] = 1  # cube in the (right, anterior, superior) corner
    labels[12:58, 28:55, 2:31] = 2  # bar along x
    hu[labels == 1], hu[labels == 2] = 800, 300
    affine = np.diag([-0.7, -0.7, 2.5, 1.0])
    affine[:3, 3] = [12.0, -4.0, 30.0]
    if layout == "permuted":  # stored (z, x, y): an oblique-free permutation of the axes
        hu, labels, affine = hu.transpose(2, 0, 1), labels.transpose(2, 0, 1), affine[:, [2, 0, 1, 3]]
    elif layout == "ras":  # the same scan stored RAS-style (x and y reversed): exercises the flips
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = [shape[0] - 1, shape[1] - 1]
        hu, labels, affine = hu[::-1, ::-1], labels[::-1, ::-1], affine @ flip
    volume_path = save_nifti(tmp_path / f"ct_{layout}.nii.gz", np.ascontiguousarray(hu), affine)
    mask_path = save_nifti(tmp_path / f"mask_{layout}.nii.gz", np.ascontiguousarray(labels), affine)
    return volume_path, mask_path, labels, affine


@pytest.mark.parametrize("layout", ["lps", "permuted", "ras"])
@pytest.mark.parametrize(
    "settings",
    [
        dict(volume_size=[48, 44, 52]),
        dict(volume_size=[31, 42, 60], target_spacing=[3.0, 0.9, 0.8]),  # resample to (33, 44, 56), crop D, H, pad W
    ],
)
def test_masks_round_trip_to_original_grid(tmp_path, layout, settings):
    volume_path, mask_path, labels, affine = round_trip_case(tmp_path, layout)
    processor = ReCTImageProcessor(**settings)
    out = processor(volume_path, anatomy_mask=mask_path, return_tensors="pt")
    meta = out["volume_meta"][0]
    assert meta["source"] == volume_path and meta["original_shape"] == list(labels.shape)
    np.testing.assert_allclose(meta["original_affine"], affine)
    assert [step["op"] for step in meta["steps"]] == ["reorient", "resample", "crop_pad"]
    json.dumps(meta.to_dict())  # plain JSON types only

    restored = processor.post_process_masks(out["anatomy_mask"], out["volume_meta"])[0]
    assert restored.shape == labels.shape and restored.dtype == np.int64
    for label in (1, 2):
        assert dice(restored == label, labels == label) >= 0.95, label

    written = processor.save_mask(restored, meta, tmp_path / "restored.nii.gz")
    reloaded = nib.load(written)
    np.testing.assert_allclose(reloaded.affine, affine, atol=1e-5)
    assert reloaded.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(reloaded.dataobj), restored)


def test_volume_metadata_reads_like_a_dict_and_round_trips_through_json(tmp_path):
    volume = np.random.default_rng(13).normal(0, 100, size=(9, 8, 7)).astype(np.float32)
    labels = (volume > 0).astype(np.uint8)
    processor = ReCTImageProcessor(volume_size=[4, 6, 6])
    out = processor((volume, np.diag([0.8, 0.8, 2.0, 1.0])), anatomy_mask=labels, return_tensors="pt")
    meta = out["volume_meta"][0]
    assert isinstance(meta, VolumeMetadata)
    assert meta["orientation"] == meta.orientation == "LPS" and meta.get("source") is None
    assert meta.get("not_a_field", 7) == 7 and "steps" in meta and "not_a_field" not in meta
    assert list(meta.keys()) == list(dict(meta)) and len(meta) == len(dict(meta))
    with pytest.raises(KeyError):
        meta["not_a_field"]
    as_dict = meta.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict  # plain JSON types only
    as_dict["steps"][0]["op"] = "changed"  # a deep copy: the record is untouched
    assert meta.steps[0]["op"] == "reorient"
    rebuilt = VolumeMetadata.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert rebuilt == meta and rebuilt == meta.to_dict() and rebuilt is not meta
    # post_process_masks and save_mask take the record or its dict form alike
    from_record = processor.post_process_masks(out["anatomy_mask"], [meta])[0]
    from_dict = processor.post_process_masks(out["anatomy_mask"], [meta.to_dict()])[0]
    np.testing.assert_array_equal(from_record, from_dict)
    np.testing.assert_array_equal(processor.post_process_masks(out["anatomy_mask"], meta.to_dict())[0], from_dict)
    written = processor.save_mask(from_dict, meta.to_dict(), tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(written).dataobj), from_record)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['extra'\]"):
        VolumeMetadata.from_dict({**meta.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['original_affine'\]"):
        VolumeMetadata.from_dict({k: v for k, v in meta.to_dict().items() if k != "original_affine"})
    with pytest.raises(ValueError, match=r"volume_meta\[0\]: expected the record returned by the processor"):
        processor.post_process_masks(out["anatomy_mask"], [{"steps": []}])


def test_crop_pad_records_amounts_and_pads_with_air():
    hu = np.full((6, 20, 9), 100, dtype=np.int16)  # identity affine: canonical shape (9, 20, 6)
    processor = ReCTImageProcessor(
        volume_size=[5, 24, 10], resize_mode="crop_pad", windows=["wide", "lung"], allow_constant_volume=True
    )
    out = processor(hu, return_tensors="pt")
    step = out["volume_meta"][0]["steps"][2]
    assert step["op"] == "crop_pad"
    assert step["pad_before"] == [-2, 2, 2] and step["pad_after"] == [-2, 2, 2]
    pv = out["pixel_values"][0]
    wide_air, lung_air = window(-1024, *NAMED_WINDOWS["wide"]), window(-1024, *NAMED_WINDOWS["lung"])
    assert torch.allclose(pv[0, :, :2], torch.tensor(wide_air, dtype=torch.float32))
    assert torch.allclose(pv[1, :, :, -2:], torch.tensor(lung_air, dtype=torch.float32))
    assert torch.allclose(pv[0, :, 2:-2, 2:-2], torch.tensor(window(100, 0, 2000), dtype=torch.float32))


def test_logits_map_back_with_trilinear_and_crop_fill():
    rng = np.random.default_rng(2)
    volume = rng.normal(0, 100, size=(12, 10, 8)).astype(np.float32)
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    processor = ReCTImageProcessor(volume_size=[8, 10, 10], resize_mode="crop_pad")  # crops W 12 → 10, no resampling
    out = processor((volume, affine), return_tensors="pt")
    # logits that are a smooth function of the canonical grid come back as the same function of the original grid
    logits = torch.linspace(-3, 3, 8).view(1, 1, 8, 1, 1).expand(1, 2, 8, 10, 10).contiguous()
    restored = processor.post_process_masks(logits, out["volume_meta"])[0]
    assert restored.shape == (2, 12, 10, 8) and restored.dtype == np.float32
    np.testing.assert_allclose(restored[0, 5, 0, :], np.linspace(-3, 3, 8), atol=1e-5)  # z of the original = D
    np.testing.assert_allclose(restored[:, [0, 11]], -3.0)  # cropped-away x columns get the minimum logit
    binary = processor.post_process_masks(logits > 0, out["volume_meta"])[0]
    assert binary.dtype == bool and binary.shape == (2, 12, 10, 8)


def test_post_process_and_save_mask_reject_wrong_grids(tmp_path):
    processor = ReCTImageProcessor(volume_size=[4, 6, 6])
    out = processor(np.random.default_rng(0).normal(size=(5, 7, 9)).astype(np.float32), return_tensors="pt")
    with pytest.raises(ValueError, match=r"masks\[0\].*\(channels, 4, 6, 6\)"):
        processor.post_process_masks(torch.zeros(1, 1, 4, 6, 7, dtype=torch.long), out["volume_meta"])
    with pytest.raises(ValueError, match="one mask per volume_meta"):
        processor.post_process_masks(torch.zeros(2, 1, 4, 6, 6, dtype=torch.long), out["volume_meta"])
    with pytest.raises(ValueError, match=r"original grid \(5, 7, 9\).*post_process_masks"):
        processor.save_mask(out["pixel_values"][0, 0] > 0.5, out["volume_meta"][0], tmp_path / "m.nii.gz")


# --------------------------------------------------------------------------------------------------------------
# intensities
# --------------------------------------------------------------------------------------------------------------


def test_windows_and_normalisation():
    hu = np.array([-2000, -1350, -600, 40, 240, 1300, 3000], dtype=np.float32)
    volume = np.broadcast_to(hu[None, None, :], (2, 3, 7)).copy()  # (x, y, z): varies along z → D
    names = ["lung", "mediastinum", "abdomen", "bone", "brain", "wide"]
    processor = ReCTImageProcessor(volume_size=[7, 3, 2], windows=names + [[100, 50]])
    pv = processor(volume, return_tensors="pt")["pixel_values"][0]
    assert pv.shape == (7, 7, 3, 2)
    for c, spec in enumerate(names + [[100, 50]]):
        center, width = NAMED_WINDOWS[spec] if isinstance(spec, str) else spec
        np.testing.assert_allclose(pv[c, :, 0, 0].numpy(), window(hu, center, width), atol=1e-6)
    normalised = ReCTImageProcessor(
        volume_size=[7, 3, 2], windows=["lung", "bone"], image_mean=[0.5, 0.25], image_std=[0.5, 0.25]
    )(volume, return_tensors="pt")["pixel_values"][0]
    np.testing.assert_allclose(normalised[1, :, 0, 0].numpy(), (window(hu, 400, 1800) - 0.25) / 0.25, atol=1e-5)


def test_rescale_slope_intercept_and_nifti_scaling(tmp_path):
    rng = np.random.default_rng(3)
    stored = rng.integers(0, 3000, size=(9, 8, 7)).astype(np.int16)
    hu = stored.astype(np.float32) * 0.5 - 1024
    processor = ReCTImageProcessor(volume_size=[5, 6, 7], windows=["lung", "bone"])
    reference = processor.process_volume(hu)["pixel_values"]
    from_raw = processor.process_volume(stored, rescale_slope=0.5, rescale_intercept=-1024)
    torch.testing.assert_close(from_raw["pixel_values"], reference, atol=1e-6, rtol=0)
    assert from_raw["volume_meta"]["rescale_slope"] == 0.5
    assert from_raw["pixel_values"].shape == (2, 5, 6, 7) and from_raw["anatomy_mask"] is None
    assert from_raw["lesion_mask"] is None
    path = save_nifti(tmp_path / "scaled.nii.gz", stored, np.eye(4), scl_slope=0.5, scl_inter=-1024)
    torch.testing.assert_close(processor.process_volume(path)["pixel_values"], reference, atol=1e-6, rtol=0)
    array, _ = load_volume(path)
    np.testing.assert_allclose(array, hu)
    with pytest.raises(ValueError, match="rescale_slope"):
        processor.process_volume(stored, rescale_slope=0)


def test_batch_rescale_is_per_volume():
    """`preprocess(images=[...])` takes one slope/intercept per volume (CT-RATE's metadata CSV gives one per scan)."""
    rng = np.random.default_rng(4)
    stored = [rng.integers(0, 3000, size=(9, 8, 7)).astype(np.int16) for _ in range(2)]
    processor = ReCTImageProcessor(volume_size=[5, 6, 7], windows=["lung", "bone"])
    out = processor(stored, rescale_slope=[0.5, 1.0], rescale_intercept=[-1024, -1000], return_tensors="np")
    for index, (slope, intercept) in enumerate(((0.5, -1024), (1.0, -1000))):
        expected = processor.process_volume(stored[index].astype(np.float32) * slope + intercept)["pixel_values"]
        np.testing.assert_allclose(out["pixel_values"][index], expected.numpy(), atol=1e-6)
        assert out["volume_meta"][index]["rescale_intercept"] == intercept
    one_number = processor(stored, rescale_intercept=-1024, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(one_number[1], processor(stored[1], rescale_intercept=-1024)["pixel_values"][0])
    for kwargs, match in (
        (dict(rescale_slope=[1.0]), r"rescale_slope: expected one value per volume \(2\), found 1"),
        (dict(rescale_intercept=[0.0, float("nan")]), r"rescale_intercept\[1\]: expected a finite number"),
        (dict(rescale_slope=[1.0, 0]), r"rescale_slope\[1\]: expected a finite non-zero number"),
        (dict(rescale_slope="2"), "rescale_slope: expected a number or one number per volume, found str"),
    ):
        with pytest.raises(ValueError, match=match):
            processor(stored, **kwargs)


def test_input_types_agree(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    data = rng.integers(-1000, 1000, size=(11, 9, 6)).astype(np.int16)
    affine = np.diag([0.8, -0.8, 2.0, 1.0])
    nii = save_nifti(tmp_path / "v.nii", data, affine)
    niigz = save_nifti(tmp_path / "v.nii.gz", data, affine)
    np.save(tmp_path / "v.npy", data)
    processor = ReCTImageProcessor(volume_size=[4, 6, 8])
    reference = processor((data, affine), return_tensors="pt")["pixel_values"]
    for volume in (nii, niigz, nib.load(niigz), nib.Nifti1Image(data, affine), torch.from_numpy(data)):
        kwargs = {"affines": affine} if isinstance(volume, torch.Tensor) else {}
        torch.testing.assert_close(processor(volume, **kwargs, return_tensors="pt")["pixel_values"], reference)
    npy = processor(str(tmp_path / "v.npy"), return_tensors="pt")  # .npy carries no geometry: identity, 1 mm
    assert npy["volume_meta"][0]["original_spacing"] == [1.0, 1.0, 1.0]
    # the stdlib zlib path gives the same voxels as the isal path
    assert reading.gzip_backend().__name__.endswith("isal_zlib")  # isal is a dependency of the project
    monkeypatch.setattr(reading, "USE_ISAL", False)
    assert reading.gzip_backend() is zlib
    np.testing.assert_array_equal(load_volume(niigz)[0], data)


def test_batch_output_and_overrides():
    rng = np.random.default_rng(5)
    volumes = [rng.normal(size=(10, 9, 8)).astype(np.float32), rng.normal(size=(7, 12, 5)).astype(np.float32)]
    masks = [(v > 0).astype(np.uint8) for v in volumes]
    processor = ReCTImageProcessor(volume_size=[4, 8, 8], windows=["lung", "bone"])
    out = processor(volumes, anatomy_mask=masks, lesion_mask=masks, return_tensors="pt")
    assert out["pixel_values"].shape == (2, 2, 4, 8, 8) and out["pixel_values"].dtype == torch.float32
    assert out["anatomy_mask"].shape == (2, 1, 4, 8, 8) and out["lesion_mask"].dtype == torch.int64
    assert len(out["volume_meta"]) == 2 and isinstance(out["volume_meta"][0], VolumeMetadata)
    assert [m["original_shape"] for m in out["volume_meta"]] == [[10, 9, 8], [7, 12, 5]]
    as_numpy = processor(volumes, return_tensors="np")
    assert isinstance(as_numpy["pixel_values"], np.ndarray)
    overridden = processor(volumes[0], volume_size=[2, 4, 4], windows=["wide"], return_tensors="pt")
    assert overridden["pixel_values"].shape == (1, 1, 2, 4, 4)
    assert processor.volume_size == [4, 8, 8]  # per-call overrides do not change the processor
    with pytest.raises(TypeError, match="do_resize"):
        processor(volumes[0], do_resize=True, return_tensors="pt")
    with pytest.raises(ValueError, match="anatomy_mask.*one mask per volume"):
        processor(volumes, anatomy_mask=masks[:1], return_tensors="pt")


# --------------------------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------------------------


def test_settings_round_trip_through_save_pretrained(tmp_path):
    processor = ReCTImageProcessor(
        volume_size=(16, 48, 40),
        target_spacing=(3, 0.8, 0.8),
        windows=("lung", (40, 400)),
        image_mean=[0.2, 0.3],
        image_std=[0.5, 0.6],
        nan_policy="fill",
        fill_value_hu=-1000,
        allow_constant_volume=True,
    )
    assert processor.resize_mode == "crop_pad"
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "ReCTImageProcessor"
    assert saved["windows"] == ["lung", [40.0, 400.0]] and saved["target_spacing"] == [3.0, 0.8, 0.8]
    loaded = ReCTImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert loaded.to_json_string() == processor.to_json_string()  # deterministic: a cache may hash it
    volume = np.random.default_rng(6).normal(size=(9, 8, 7)).astype(np.float32)
    torch.testing.assert_close(
        loaded(volume, return_tensors="pt")["pixel_values"], processor(volume, return_tensors="pt")["pixel_values"]
    )
    assert ReCTImageProcessor.from_pretrained(tmp_path, volume_size=[8, 8, 8]).volume_size == [8, 8, 8]
    with pytest.raises(ValueError, match="volume_size"):
        ReCTImageProcessor.from_pretrained(tmp_path, volume_size=[0, 8, 8])


def test_defaults():
    processor = ReCTImageProcessor()
    assert processor.to_dict() == {
        "volume_size": [64, 512, 512],
        "target_spacing": None,
        "resize_mode": "resize",
        "windows": ["wide"],
        "image_mean": None,
        "image_std": None,
        "nan_policy": "raise",
        "fill_value_hu": -1024.0,
        "allow_constant_volume": False,
        "gantry_tilt": "resample",
        "slice_spacing": "raise",
        "image_processor_type": "ReCTImageProcessor",
    }
    assert processor.model_input_names == ["pixel_values"]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(volume_size=[0, 32, 32]), "volume_size"),
        (dict(volume_size=[-4, 32, 32]), "volume_size"),
        (dict(volume_size=[32, 32]), "volume_size"),
        (dict(volume_size=[8.5, 32, 32]), "volume_size"),
        (dict(target_spacing=[0, 1, 1]), "target_spacing"),
        (dict(target_spacing=[1, 1]), "target_spacing"),
        (dict(target_spacing=[1, float("nan"), 1]), "target_spacing"),
        (dict(resize_mode="stretch"), "resize_mode"),
        (dict(resize_mode="resize", target_spacing=[1, 1, 1]), "resize_mode"),
        (dict(windows=[]), "windows"),
        (dict(windows=[[40, 0]]), "windows"),
        (dict(windows="lung"), "windows"),
        (dict(image_mean=[0.5, 0.5], image_std=[1, 1]), "image_mean"),
        (dict(image_mean=[0.5]), "image_mean"),
        (dict(image_mean=[0.5], image_std=[0.0]), "image_std"),
        (dict(nan_policy="ignore"), "nan_policy"),
        (dict(fill_value_hu=float("inf")), "fill_value_hu"),
        (dict(allow_constant_volume="yes"), "allow_constant_volume"),
    ],
)
def test_invalid_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ReCTImageProcessor(**kwargs)


def test_unknown_window_name_lists_allowed_names():
    with pytest.raises(ValueError) as info:
        ReCTImageProcessor(windows=["lung", "liver"])
    message = str(info.value)
    assert "windows" in message and "'liver'" in message
    assert all(name in message for name in NAMED_WINDOWS)


def test_unknown_setting_is_rejected():
    with pytest.raises(TypeError, match="volume_sizes"):
        ReCTImageProcessor(volume_sizes=[8, 8, 8])


# --------------------------------------------------------------------------------------------------------------
# bad volumes
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def small_nifti(tmp_path):
    data = np.random.default_rng(7).integers(-1000, 1000, size=(12, 10, 6)).astype(np.int16)
    return save_nifti(tmp_path / "ct.nii.gz", data, np.diag([0.7, 0.7, 2.0, 1.0])), data


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("inflate", ["isal", "zlib"])
@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_nifti_gz_names_the_file(tmp_path, monkeypatch, inflate, damage, streamed):
    data = np.random.default_rng(7).integers(-1000, 1000, size=(40, 30, 12)).astype(np.int16)
    path = save_nifti(tmp_path / "ct.nii.gz", data, np.eye(4))
    raw = bytearray(Path(path).read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) * 2 // 3]
    else:
        raw[len(raw) // 2 : len(raw) // 2 + 4] = b"\xff\x00\xff\x00"
    bad = tmp_path / f"{damage}.nii.gz"
    bad.write_bytes(bytes(raw))
    monkeypatch.setattr(reading, "USE_ISAL", inflate == "isal")
    monkeypatch.setattr(rect, "STREAM_MIN_BYTES", 0 if streamed else float("inf"))
    monkeypatch.setattr(reading, "STREAM_WINDOW_BYTES", 1)  # streamed: a 4-slice ring, the inflater often waits
    processor = ReCTImageProcessor(volume_size=[4, 4, 4])
    with pytest.raises(ValueError, match=rf"{bad.name} is truncated or corrupt.*shape \(40, 30, 12\)"):
        processor(str(bad), return_tensors="pt")


@pytest.mark.parametrize("layout", ["ras", "lps", "permuted"])
@pytest.mark.parametrize(
    "settings",
    [
        dict(volume_size=[7, 20, 26]),
        dict(volume_size=[9, 16, 40], target_spacing=[1.7, 1.1, 0.6]),
        dict(volume_size=[30, 40, 44], resize_mode="crop_pad"),  # pure flips and crops: views, no arithmetic
    ],
)
def test_streamed_inflate_gives_identical_results(tmp_path, monkeypatch, layout, settings):
    hu = np.random.default_rng(15).integers(-1024, 2000, size=(30, 36, 44)).astype(np.int16)
    volume, affine = as_layout(hu, canonical_affine(hu.shape, spacing=(1.5, 0.8, 0.7)), layout)
    path = save_nifti(tmp_path / f"{layout}.nii.gz", volume, affine, scl_slope=1.0, scl_inter=-3.0)
    processor = ReCTImageProcessor(windows=["lung", "bone"], **settings)
    monkeypatch.setattr(rect, "STREAM_MIN_BYTES", float("inf"))
    whole = processor(path, return_tensors="np")
    monkeypatch.setattr(rect, "STREAM_MIN_BYTES", 0)
    stream = reading.read_volume(path, stream_min_bytes=0).stream
    assert stream is not None  # this file is now inflated in slabs
    stream.close()
    # the default ring holds the whole file; 1 byte asks for the smallest ring (4 slices): slabs wrap around it
    for window in (reading.STREAM_WINDOW_BYTES, 1):
        monkeypatch.setattr(reading, "STREAM_WINDOW_BYTES", window)
        for slabs in (1, 3, 64):
            monkeypatch.setattr(rect, "STREAM_SLABS", slabs)
            for use_isal in (True, False):
                monkeypatch.setattr(reading, "USE_ISAL", use_isal)
                streamed = processor(path, return_tensors="np")
                np.testing.assert_array_equal(streamed["pixel_values"], whole["pixel_values"])
                assert streamed["volume_meta"] == whole["volume_meta"]


def write_gzip_members(path, payload, cuts):
    """`payload` gzip-compressed as several members (split at `cuts`) with zero padding between them."""
    pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)])]
    blob = b"".join(zlib.compress(p, wbits=31) + b"\x00" * 7 for p in pieces)
    Path(path).write_bytes(blob)
    return path


@pytest.mark.parametrize("use_isal", [True, False])
@pytest.mark.parametrize("window_slices", [4, 7, 100])
def test_inflating_nifti_ring_hands_out_every_slab(tmp_path, monkeypatch, use_isal, window_slices):
    monkeypatch.setattr(reading, "USE_ISAL", use_isal)
    data = np.random.default_rng(3).integers(-1024, 3000, size=(9, 11, 23)).astype(np.int16)
    path = save_nifti(tmp_path / "ct.nii.gz", data, np.eye(4))
    offset = int(nib.load(path).dataobj.offset)
    # the same voxels as three gzip members, split mid-slice and inside the header
    payload = zlib.decompress(Path(path).read_bytes(), wbits=31)
    multi = write_gzip_members(tmp_path / "multi.nii.gz", payload, [100, offset + 9 * 11 * 2 * 5 + 3])
    slice_bytes = 9 * 11 * 2
    for source in (path, multi):
        stream = reading.InflatingNifti(Path(source), offset, data.shape, np.int16, window_slices * slice_bytes)
        assert stream.window_slices == min(window_slices, 23)
        # overlapping slabs, as resampling asks for them, some wrapping around the ring's end
        for lo, hi in [(0, 2), (1, 4), (3, 3 + min(4, stream.window_slices)), (8, 10), (10, 12), (21, 23)]:
            np.testing.assert_array_equal(stream.slab(lo, hi), data[..., lo:hi])
        with pytest.raises(ValueError, match=r"slab \[5, 7\) asked for after slices before 5 were freed"):
            stream.slab(5, 7)
        stream.finish()
        stream = reading.InflatingNifti(Path(source), offset, data.shape, np.int16, window_slices * slice_bytes)
        np.testing.assert_array_equal(stream.read_all(), data)
    stream = reading.InflatingNifti(Path(path), offset, data.shape, np.int16, 4 * slice_bytes)
    with pytest.raises(ValueError, match=r"span at most 4"):
        stream.slab(0, 5)
    stream.close()  # abandoned mid-file: the inflater, blocked on a full ring, stops
    assert not stream._thread.is_alive()


def test_streamed_float_volume_is_read_whole(tmp_path, monkeypatch):
    hu = np.random.default_rng(4).normal(0, 300, size=(20, 16, 12)).astype(np.float32)
    path = save_nifti(tmp_path / "float.nii.gz", hu, np.diag([0.8, 0.8, 1.5, 1.0]))
    processor = ReCTImageProcessor(volume_size=[6, 8, 10], windows=["lung", "bone"])
    monkeypatch.setattr(rect, "STREAM_MIN_BYTES", float("inf"))
    whole = processor(path, return_tensors="np")["pixel_values"]
    monkeypatch.setattr(rect, "STREAM_MIN_BYTES", 0)
    monkeypatch.setattr(reading, "STREAM_WINDOW_BYTES", 1)
    np.testing.assert_array_equal(processor(path, return_tensors="np")["pixel_values"], whole)


@pytest.mark.parametrize("window", [None, 1])
def test_streamed_constant_volume_is_still_refused(tmp_path, monkeypatch, window):
    path = save_nifti(tmp_path / "flat.nii.gz", np.full((16, 12, 10), -1024, dtype=np.int16), np.eye(4))
    monkeypatch.setattr(rect, "STREAM_MIN_BYTES", 0)
    if window is not None:
        monkeypatch.setattr(reading, "STREAM_WINDOW_BYTES", window)
    with pytest.raises(ValueError, match=r"flat.nii.gz: .*constant volume"):
        ReCTImageProcessor(volume_size=[4, 4, 4])(path)
    # one differing voxel in the last slice is enough
    almost = np.full((16, 12, 10), -1024, dtype=np.int16)
    almost[3, 4, 9] = 40
    path = save_nifti(tmp_path / "almost.nii.gz", almost, np.eye(4))
    assert ReCTImageProcessor(volume_size=[4, 4, 4])(path, return_tensors="np")["pixel_values"].shape == (
        1,
        1,
        4,
        4,
        4,
    )


def test_truncated_uncompressed_nifti(small_nifti, tmp_path):
    path, data = small_nifti
    full = tmp_path / "full.nii"
    save_nifti(full, data, np.eye(4))
    short = tmp_path / "short.nii"
    short.write_bytes(full.read_bytes()[:600])
    with pytest.raises(ValueError, match="short.nii is truncated or corrupt"):
        load_volume(str(short))


@pytest.mark.parametrize(
    "name,content", [("fake.nii", b"not a nifti header " * 30), ("fake.nii.gz", b"plain text" * 50)]
)
def test_non_nifti_file_with_nifti_name(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"could not read NIfTI file .*{name}: expected a NIfTI"):
        ReCTImageProcessor()(str(path), return_tensors="pt")


def test_missing_and_unsupported_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.nii.gz"):
        load_volume(str(tmp_path / "nowhere.nii.gz"))
    other = tmp_path / "scan.mha"
    other.write_bytes(b"ObjectType = Image")
    with pytest.raises(ValueError, match=r"scan.mha: expected a .nii/.nii.gz.*found suffix '.mha'"):
        load_volume(str(other))
    with pytest.raises(TypeError, match=r"images\[0\].*found dict"):
        ReCTImageProcessor()({"image": 1}, return_tensors="pt")


@pytest.mark.parametrize("shape", [(8, 9), (2, 8, 9, 7), (1, 8, 9, 7)])
def test_2d_and_4d_arrays_are_rejected(shape):
    processor = ReCTImageProcessor(volume_size=[4, 4, 4])
    with pytest.raises(ValueError, match=rf"images\[0\]: expected a 3D volume.*{len(shape)}D"):
        processor(np.zeros(shape, dtype=np.float32) + np.arange(shape[-1]), return_tensors="pt")


def test_2d_nifti_names_the_file(tmp_path):
    path = save_nifti(tmp_path / "slice.nii.gz", np.arange(80, dtype=np.int16).reshape(8, 10), np.eye(4))
    with pytest.raises(ValueError, match=r"slice.nii.gz: expected a 3D volume.*2D"):
        ReCTImageProcessor(volume_size=[4, 4, 4])(path, return_tensors="pt")


def test_4d_with_trailing_singleton_is_squeezed(tmp_path):
    data = np.random.default_rng(8).normal(size=(8, 9, 7, 1)).astype(np.float32)
    path = save_nifti(tmp_path / "time1.nii.gz", data, np.eye(4))
    processor = ReCTImageProcessor(volume_size=[4, 4, 4])
    out = processor(path, return_tensors="pt")
    assert out["volume_meta"][0]["original_shape"] == [8, 9, 7]
    torch.testing.assert_close(out["pixel_values"], processor(data[..., 0], return_tensors="pt")["pixel_values"])


def test_nan_and_inf_raise_with_file_and_count(tmp_path):
    data = np.random.default_rng(9).normal(size=(8, 9, 7)).astype(np.float32)
    data[1, 2, 3], data[4, 4, 4], data[0, 0, 0] = np.nan, np.inf, -np.inf
    path = save_nifti(tmp_path / "nan.nii.gz", data, np.eye(4))
    processor = ReCTImageProcessor(volume_size=[4, 4, 4])
    with pytest.raises(ValueError, match=r"nan.nii.gz: expected finite voxel values, found 3 NaN/inf"):
        processor(path, return_tensors="pt")
    clean = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    with pytest.raises(ValueError, match=r"images\[1\]: expected finite"):
        processor([clean, data], return_tensors="pt")


def test_nan_fill_policy_never_leaks_nan():
    data = np.random.default_rng(10).normal(0, 50, size=(8, 9, 7)).astype(np.float64)
    data[2:4, 2:4, 2:4] = np.nan
    processor = ReCTImageProcessor(
        volume_size=[8, 9, 7][::-1], nan_policy="fill", fill_value_hu=500, windows=[[0, 2000]]
    )
    out = processor(data, return_tensors="pt")["pixel_values"]
    assert torch.isfinite(out).all()
    # identity affine: canonical = (z, y flipped, x flipped); back to the stored (x, y, z) layout to compare
    stored = out[0, 0].numpy().transpose(2, 1, 0)[::-1, ::-1, :]
    np.testing.assert_allclose(stored[2:4, 2:4, 2:4], window(500, 0, 2000), atol=1e-6)
    np.testing.assert_allclose(stored[5], window(data[5], 0, 2000), atol=1e-5)


def test_constant_volume(tmp_path):
    path = save_nifti(tmp_path / "flat.nii.gz", np.full((6, 7, 5), -1024, dtype=np.int16), np.eye(4))
    with pytest.raises(ValueError, match=r"flat.nii.gz: .*constant volume.*-1024 HU.*allow_constant_volume"):
        ReCTImageProcessor(volume_size=[4, 4, 4])(path, return_tensors="pt")
    out = ReCTImageProcessor(volume_size=[4, 4, 4], allow_constant_volume=True)(path, return_tensors="pt")[
        "pixel_values"
    ]
    assert torch.isfinite(out).all() and torch.allclose(out, torch.tensor(window(-1024, 0, 2000), dtype=torch.float32))
    # a varying volume whose probe voxels happen to be equal is not constant
    data = np.zeros((5, 5, 5), dtype=np.int16)
    data[1, 2, 3] = 7
    out = ReCTImageProcessor(volume_size=[4, 4, 4])(data, return_tensors="pt")
    assert out["pixel_values"].shape == (1, 1, 4, 4, 4)


def test_mask_grid_mismatch_names_the_file_and_the_difference(tmp_path, small_nifti):
    path, data = small_nifti
    processor = ReCTImageProcessor(volume_size=[4, 4, 4])
    affine = np.diag([0.7, 0.7, 2.0, 1.0])
    wrong_shape = save_nifti(tmp_path / "mask_shape.nii.gz", np.zeros((12, 10, 5), np.uint8), affine)
    with pytest.raises(
        ValueError,
        match=r"mask_shape.nii.gz: expected a mask on the voxel grid of its volume.*size mismatch.*"
        r"\(12, 10, 5\) voxels.*\(12, 10, 6\)",
    ):
        processor(path, anatomy_mask=wrong_shape)
    wrong_spacing = save_nifti(
        tmp_path / "mask_spacing.nii.gz", np.zeros((12, 10, 6), np.uint8), np.diag([0.7, 0.7, 2.5, 1.0])
    )
    with pytest.raises(ValueError, match=r"mask_spacing.nii.gz: .*not the volume's.*spacing \[0.7, 0.7, 2.5\]"):
        processor(path, lesion_mask=wrong_spacing)
    shifted_affine = affine.copy()
    shifted_affine[:3, 3] = [0.0, 1.0, 0.0]
    shifted = save_nifti(tmp_path / "mask_shifted.nii.gz", np.zeros((12, 10, 6), np.uint8), shifted_affine)
    with pytest.raises(ValueError, match=r"mask_shifted.nii.gz: .*lie up to 1.000 mm.*offset by \[0.0, 1.0, 0.0\]"):
        processor(path, lesion_mask=shifted)
    with pytest.raises(ValueError, match=r"anatomy_mask of .*ct.nii.gz: expected the shape"):
        processor(path, anatomy_mask=np.zeros((3, 3, 3), np.uint8))
    with pytest.raises(ValueError, match=r"lesion_mask of .*expected integer label values, found fractional"):
        processor(path, lesion_mask=np.full(data.shape, 0.5, np.float32))
    # a bare array carries no geometry: it is taken to lie on its volume's stored grid
    assert processor(path, anatomy_mask=np.ones(data.shape, np.uint8), return_tensors="pt")["anatomy_mask"].min() == 1
    # an explicit (array, affine) mask is checked
    with pytest.raises(ValueError, match="expected a mask on the voxel grid of its volume"):
        processor(path, anatomy_mask=(np.ones(data.shape, np.uint8), np.eye(4)))


@pytest.mark.parametrize("layout", ["ras", "lps", "permuted"])
def test_mask_on_the_same_grid_in_another_voxel_order_is_reoriented(tmp_path, layout):
    hu, labels = canonical_phantom()
    affine = canonical_affine(hu.shape)
    volume, volume_affine = as_layout(hu, affine, "ras")
    mask, mask_affine = as_layout(labels, affine, layout)
    volume_path = save_nifti(tmp_path / "ct.nii.gz", volume, volume_affine)
    mask_path = save_nifti(tmp_path / f"mask_{layout}.nii.gz", mask, mask_affine)
    processor = ReCTImageProcessor(volume_size=[8, 10, 12])
    out = processor(volume_path, anatomy_mask=mask_path, return_tensors="pt")
    reference = processor(volume_path, anatomy_mask=as_layout(labels, affine, "ras")[0], return_tensors="pt")
    assert torch.equal(out["anatomy_mask"], reference["anatomy_mask"])
    # back on the volume's grid, the mask is the one nibabel reorients onto the volume's voxel order
    restored = processor.post_process_masks(out["anatomy_mask"], out["volume_meta"])[0]
    expected = nib.orientations.apply_orientation(
        mask,
        nib.orientations.ornt_transform(
            nib.orientations.io_orientation(mask_affine), nib.orientations.io_orientation(volume_affine)
        ),
    )
    assert dice(restored == 1, expected == 1) > 0.9 and dice(restored == 2, expected == 2) > 0.9


def test_bad_affines_are_named():
    processor = ReCTImageProcessor(volume_size=[4, 4, 4])
    volume = np.random.default_rng(11).normal(size=(5, 6, 7)).astype(np.float32)
    with pytest.raises(ValueError, match=r"images\[0\]: expected an invertible affine"):
        processor(volume, affines=np.diag([1.0, 0.0, 1.0, 1.0]), return_tensors="pt")
    with pytest.raises(ValueError, match=r"affines: expected one per volume \(2\), found 1"):
        processor([volume, volume], affines=[np.eye(4)], return_tensors="pt")


# --------------------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------------------


def test_dicom_series_shape_hu_and_affine(tmp_path):
    folder, template = dicom_series(tmp_path / "series", n=5, spacing=2.5, order=lambda i: i[::-1])
    (folder / "notes.txt").write_text("not a DICOM file")  # skipped, since the folder holds DICOM slices
    array, affine = load_volume(str(folder))
    assert array.shape == (5, 128, 128) and array.dtype == np.float32
    slope, intercept = float(template.RescaleSlope), float(template.RescaleIntercept)
    expected_hu = template.pixel_array.astype(np.float32) * slope + intercept
    for index in range(5):
        np.testing.assert_array_equal(array[index], expected_hu)
    ipp = np.array([float(v) for v in template.ImagePositionPatient])
    row_spacing, col_spacing = (float(v) for v in template.PixelSpacing)
    expected = np.array(
        [
            [0.0, 0.0, -col_spacing, -ipp[0]],  # columns run along +x LPS = -x RAS
            [0.0, -row_spacing, 0.0, -ipp[1]],  # rows run along +y LPS = -y RAS
            [2.5, 0.0, 0.0, ipp[2]],  # slices step +2.5 mm superior
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    np.testing.assert_allclose(affine, expected, atol=1e-6)
    out = ReCTImageProcessor(volume_size=[5, 128, 128])(str(folder), return_tensors="pt")
    meta = out["volume_meta"][0]
    assert meta["steps"][0]["permutation"] == [0, 1, 2] and meta["steps"][0]["flip"] == [False] * 3
    np.testing.assert_allclose(out["pixel_values"][0, 0].numpy(), window(array, 0, 2000), atol=1e-6)


def test_dicom_rescale_and_single_slice(tmp_path):
    folder, template = dicom_series(tmp_path / "scaled", n=1, slope=2, intercept=-1000)
    array, affine = load_volume(folder)
    assert array.shape == (1, 128, 128)
    np.testing.assert_allclose(array[0], template.pixel_array * 2.0 - 1000.0)
    assert np.linalg.norm(affine[:3, 0]) == pytest.approx(float(template.SliceThickness))


def test_dicom_missing_slice(tmp_path):
    folder, _ = dicom_series(tmp_path / "gappy", n=6, spacing=2.0, skip=(3,))
    with pytest.raises(ValueError, match=r"gappy: missing slice\(s\).*every 2.000 mm.*between"):
        load_volume(folder)


def test_dicom_duplicate_position(tmp_path):
    folder, _ = dicom_series(tmp_path / "dup", n=3)
    template = pydicom.dcmread(folder / "slice_000.dcm")
    template.SOPInstanceUID = generate_uid()
    template.save_as(str(folder / "slice_copy.dcm"))
    with pytest.raises(ValueError, match=r"dup: expected one slice per position"):
        load_volume(folder)


def test_dicom_mixed_series(tmp_path):
    uids = [generate_uid(), generate_uid()]
    folder, _ = dicom_series(tmp_path / "mixed", n=4, series_uids=[uids[0], uids[0], uids[1], uids[1]])
    with pytest.raises(ValueError, match=r"mixed: expected one series, found 2 SeriesInstanceUIDs") as info:
        load_volume(folder)
    assert uids[0] in str(info.value) and uids[1] in str(info.value)


def test_dicom_non_ct_modality(tmp_path):
    folder, _ = dicom_series(tmp_path / "mr", n=3, modalities=["CT", "MR", "CT"])
    with pytest.raises(ValueError, match=r"slice_001.dcm: expected Modality 'CT', found 'MR'"):
        load_volume(folder)


def test_dicom_empty_folder_and_no_dicom(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty is empty"):
        ReCTImageProcessor()(str(empty), return_tensors="pt")
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    (text_only / "readme.txt").write_text("hello")
    with pytest.raises(
        ValueError,
        match=r"text_only: expected the files of one CT series, found no DICOM image"
        r".*readme.txt",
    ):
        load_volume(text_only)


# --------------------------------------------------------------------------------------------------------------
# Hub code: the file works alone
# --------------------------------------------------------------------------------------------------------------


def test_hub_loader_requires_only_torch_transformers_numpy():
    from transformers.dynamic_module_utils import get_imports

    for name in ("image_processing_rect.py", "volume_geometry_rect.py"):
        required = set(get_imports(REPO_ROOT / "hf_models" / name))
        assert required - set(sys.stdlib_module_names) <= {"numpy", "torch", "transformers"}, name


HUB_FILES = {"image_processing_rect.py", "volume_reading_rect.py", "volume_geometry_rect.py"}

FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys, warnings
    from pathlib import Path

    import numpy as np
    import torch
    from transformers import AutoImageProcessor

    root = Path(sys.argv[1])
    processor = AutoImageProcessor.from_pretrained(root / "saved", trust_remote_code=True)
    out = processor(np.load(root / "volume.npy"), anatomy_mask=np.load(root / "mask.npy"), return_tensors="pt")
    restored = processor.post_process_masks(out["anatomy_mask"], out["volume_meta"])[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        extra = AutoImageProcessor.from_pretrained(root / "extra_key", trust_remote_code=True)
    torch.save({"pixel_values": out["pixel_values"], "restored": torch.from_numpy(restored)}, root / "results.pt")
    report = {
        "class": type(processor).__name__,
        "module": type(processor).__module__,
        "meta_class": type(out["volume_meta"][0]).__name__,
        "project_modules": project_modules(),
        "readers_loaded": sorted(m for m in ("nibabel", "pydicom") if m in sys.modules),
        "extra_key_settings": extra.to_dict()["volume_size"],
        "extra_key_warnings": [str(w.message) for w in caught],
    }
    (root / "report.json").write_text(json.dumps(report))
    """
)


def test_save_pretrained_writes_every_hub_file_and_loads_in_a_fresh_process(tmp_path):
    processor = ReCTImageProcessor(volume_size=[4, 6, 6], windows=["lung", "bone"])
    processor.save_pretrained(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").glob("*.py")} == HUB_FILES
    saved = json.loads((tmp_path / "saved" / "preprocessor_config.json").read_text())
    assert saved["auto_map"] == {"AutoImageProcessor": "image_processing_rect.ReCTImageProcessor"}
    # a config written by another version, with a key this one does not know, still loads (with a warning)
    processor.save_pretrained(tmp_path / "extra_key")
    config_path = tmp_path / "extra_key" / "preprocessor_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "future_setting": 3}))
    volume = np.random.default_rng(14).normal(0, 300, size=(9, 8, 7)).astype(np.float32)
    mask = (volume > 0).astype(np.uint8)
    np.save(tmp_path / "volume.npy", volume)
    np.save(tmp_path / "mask.npy", mask)
    expected = processor(volume, anatomy_mask=mask, return_tensors="pt")

    result = run_without_project(
        FRESH_PROCESS, tmp_path, cwd=tmp_path, timeout=300, env={"HF_MODULES_CACHE": str(tmp_path / "modules")}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["class"] == "ReCTImageProcessor" and report["meta_class"] == "VolumeMetadata"
    assert report["module"].startswith("transformers_modules")  # the copied Hub files, not this checkout
    assert report["project_modules"] == [] and report["readers_loaded"] == []
    assert report["extra_key_settings"] == [4, 6, 6]
    assert any("future_setting" in message for message in report["extra_key_warnings"])
    results = torch.load(tmp_path / "results.pt")
    torch.testing.assert_close(results["pixel_values"], expected["pixel_values"], atol=0, rtol=0)
    restored = processor.post_process_masks(expected["anatomy_mask"], expected["volume_meta"])[0]
    np.testing.assert_array_equal(results["restored"].numpy(), restored)


def test_unknown_key_in_a_saved_config_warns_but_the_constructor_still_refuses(tmp_path):
    ReCTImageProcessor(volume_size=[4, 4, 4]).save_pretrained(tmp_path)
    config_path = tmp_path / "preprocessor_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "future_setting": 3}))
    with pytest.warns(UserWarning, match=r"ignoring unknown key\(s\) \['future_setting'\]"):
        loaded = ReCTImageProcessor.from_pretrained(tmp_path)
    assert loaded.volume_size == [4, 4, 4]
    with pytest.raises(TypeError, match="future_setting"):
        ReCTImageProcessor(future_setting=3)


# --------------------------------------------------------------------------------------------------------------
# ReCTProcessor: what ProcessorMixin provides
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def rect_processor(minilm_dir):
    from transformers import AutoTokenizer

    from hf_models import ReCTProcessor

    return ReCTProcessor(
        image_processor=ReCTImageProcessor(volume_size=[4, 8, 8], windows=["lung", "bone"]),
        tokenizer=AutoTokenizer.from_pretrained(minilm_dir),
    )


def test_processor_routes_images_masks_and_text_and_converts_only_on_request(rect_processor):
    rng = np.random.default_rng(16)
    volumes = [rng.normal(0, 300, size=(9, 8, 7)).astype(np.float32), rng.normal(0, 300, size=(6, 5, 7))]
    masks = [(v > 0).astype(np.uint8) for v in volumes]
    text = ["No pleural effusion.", "Small nodule in the right upper lobe."]
    out = rect_processor(images=volumes, text=text, anatomy_mask=masks, return_tensors="pt")
    assert out["pixel_values"].shape == (2, 2, 4, 8, 8) and out["anatomy_mask"].shape == (2, 1, 4, 8, 8)
    assert isinstance(out["input_ids"], torch.Tensor) and out["input_ids"].shape[0] == 2
    assert all(isinstance(meta, VolumeMetadata) for meta in out["volume_meta"])
    image_only = rect_processor.image_processor(volumes, anatomy_mask=masks, return_tensors="pt")
    assert torch.equal(out["pixel_values"], image_only["pixel_values"])
    assert torch.equal(out["anatomy_mask"], image_only["anatomy_mask"])
    # return_tensors=None (the default): no conversion, one numpy array per volume, token ids as lists
    plain = rect_processor(images=volumes, text=text)
    assert isinstance(plain["pixel_values"], list) and isinstance(plain["pixel_values"][0], np.ndarray)
    np.testing.assert_array_equal(plain["pixel_values"][1], out["pixel_values"][1].numpy())
    assert isinstance(plain["input_ids"], list) and isinstance(plain["input_ids"][0], list)
    # settings overrides and tokenizer arguments go where they belong
    small = rect_processor(images=volumes[0], volume_size=[2, 4, 4], text=text[1], max_length=4, return_tensors="np")
    assert small["pixel_values"].shape == (1, 2, 2, 4, 4) and small["input_ids"].shape == (1, 4)
    restored = rect_processor.post_process_masks(out["anatomy_mask"], out["volume_meta"])
    assert [r.shape for r in restored] == [(9, 8, 7), (6, 5, 7)]
    with pytest.raises(ValueError, match="at least one input"):
        rect_processor()


def test_saved_processor_with_an_unknown_key_loads_with_a_warning(rect_processor, tmp_path):
    from transformers import AutoProcessor

    rect_processor.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.glob("*.py")} == HUB_FILES | {"processing_rect.py"}
    config_path = tmp_path / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["text_max_length"] = 512  # a key earlier versions wrote
    config["image_processor"]["future_setting"] = 1
    config_path.write_text(json.dumps(config))
    with pytest.warns(UserWarning) as caught:
        loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    messages = " ".join(str(w.message) for w in caught)
    assert "text_max_length" in messages and "future_setting" in messages
    assert loaded.image_processor.to_dict()["windows"] == ["lung", "bone"]
