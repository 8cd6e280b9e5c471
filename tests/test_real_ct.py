"""The image processor on real CT (`../shared/data/real_ct/`, see its README): a gantry-tilted Philips series, a
Siemens series and its segmentation stored in another voxel order, and copies of that series with edited slice
positions (real pixel data, modified geometry) for variable spacing and missing slices."""

import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy.interpolate import interp1d
from scipy.ndimage import map_coordinates

from hf_models import ReCTImageProcessor, load_volume


REAL_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_ct"
TILTED = REAL_CT / "dcm_qa_ct_tilt" / "philips_tilt_minus18.5"
SERIES = REAL_CT / "totalsegmentator" / "example_ct_dicom"
SERIES_SEG = REAL_CT / "totalsegmentator" / "example_seg_dicom.nii.gz"
NIFTI_CT = REAL_CT / "totalsegmentator" / "example_ct_sm.nii.gz"
NIFTI_SEG = REAL_CT / "totalsegmentator" / "example_seg.nii.gz"

pytestmark = pytest.mark.skipif(
    not REAL_CT.is_dir(), reason=f"real CT files not found at {REAL_CT} (the checkout's sibling ../shared)"
)


def reoriented_like(image, affine):
    """nibabel's own reorientation of `image`'s array onto the voxel order of `affine` (an independent reference)."""
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(image.affine), nib.orientations.io_orientation(affine)
    )
    return nib.orientations.apply_orientation(np.asarray(image.dataobj), transform)


def dice(a, b):
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def series_copy(tmp_path, name, positions_z=None, drop=()):
    """A copy of the Siemens series with its slices at `positions_z` (mm, LPS z, ascending) and `drop`ped slices."""
    folder = tmp_path / name
    folder.mkdir()
    files = sorted(
        SERIES.iterdir(), key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
    )
    for index, file in enumerate(files):
        if index in drop:
            continue
        if positions_z is None:
            shutil.copy(file, folder / file.name)
            continue
        ds = pydicom.dcmread(file)
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(positions_z[index])]
        ds.save_as(folder / file.name)
    return folder


# --------------------------------------------------------------------------------------------------------------
# gantry tilt
# --------------------------------------------------------------------------------------------------------------


def test_tilted_series_is_resampled_onto_an_orthogonal_grid_with_a_warning():
    processor = ReCTImageProcessor(volume_size=[12, 128, 128])
    with pytest.warns(UserWarning, match=r"gantry tilt of 18.50 degrees.*orthogonal grid"):
        out = processor(str(TILTED), return_tensors="pt")
    meta = out["volume_meta"][0]
    assert any("gantry tilt" in note for note in meta.warnings)
    [record] = meta.regridding
    assert record["op"] == "gantry_tilt" and record["angle_deg"] == pytest.approx(18.5, abs=0.01)
    affine, raw_affine = np.asarray(meta.original_affine), np.asarray(record["raw_affine"])
    columns = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    np.testing.assert_allclose(columns.T @ columns, np.eye(3), atol=1e-9)  # orthogonal
    raw_columns = raw_affine[:3, :3] / np.linalg.norm(raw_affine[:3, :3], axis=0)
    assert abs(raw_columns[:, 0] @ raw_columns[:, 1]) == pytest.approx(np.sin(np.radians(18.5)), abs=1e-4)
    # in-plane axes kept; slice spacing = distance between the slice planes (2.5 mm table step * cos 18.5)
    np.testing.assert_allclose(affine[:3, 1:3], raw_affine[:3, 1:3])
    assert np.linalg.norm(affine[:3, 0]) == pytest.approx(2.5 * np.cos(np.radians(18.5)), abs=1e-4)

    # every voxel equals an independent bilinear resampling of the raw slices at the same world position
    with pytest.warns(UserWarning, match="gantry tilt"):
        resampled, _ = load_volume(str(TILTED))  # gantry_tilt="resample" is the default
    stored = _raw_tilted_slices()
    index = np.stack(np.meshgrid(*(np.arange(s) for s in stored.shape), indexing="ij"), axis=0).reshape(3, -1)
    world = affine @ np.vstack([index, np.ones(index.shape[1])])
    raw_index = np.linalg.solve(raw_affine, world)[:3]
    raw_index[0] = np.round(raw_index[0], 6)  # the slice planes coincide: stay exactly on them
    expected = map_coordinates(stored, raw_index, order=1, mode="constant", cval=-1024.0).reshape(stored.shape)
    np.testing.assert_allclose(resampled, expected, atol=1e-2)


def test_tilted_series_is_refused_when_the_raw_grid_must_be_kept():
    with pytest.raises(
        ValueError,
        match=r"philips_tilt_minus18.5: expected an orthogonal voxel grid, found a gantry "
        r"tilt of 18.50 degrees.*gantry_tilt='resample'",
    ):
        ReCTImageProcessor(gantry_tilt="raise")(str(TILTED))
    with pytest.raises(ValueError, match="gantry tilt of 18.50 degrees"):
        load_volume(str(TILTED), gantry_tilt="raise")


def _raw_tilted_slices():
    """The tilted series' HU slices, sorted along the slice normal, read here with pydicom alone."""
    datasets = [pydicom.dcmread(f) for f in TILTED.iterdir()]
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda ds: np.asarray(ds.ImagePositionPatient, dtype=np.float64) @ normal)
    return np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets]).astype(
        np.float32
    )


def test_tilted_series_mask_maps_back_onto_the_written_geometry_with_agreeing_qform_and_sform(tmp_path):
    processor = ReCTImageProcessor(volume_size=[12, 512, 512])  # no resizing: the tilt correction alone
    stored = _raw_tilted_slices()
    raw_mask = (stored > 300).astype(np.uint8)  # dense phantom inserts, on the raw (sheared) grid
    assert raw_mask.sum() > 1000
    with pytest.warns(UserWarning, match="gantry tilt"):
        out = processor(str(TILTED), anatomy_mask=raw_mask, return_tensors="pt")
    meta = out["volume_meta"][0]
    restored = processor.post_process_masks(out["anatomy_mask"], out["volume_meta"])[0]
    assert list(restored.shape) == meta.original_shape
    written = processor.save_mask(restored, meta, tmp_path / "mask.nii.gz")
    image = nib.load(written)
    qform, sform = image.header.get_qform(), image.header.get_sform()
    # qform holds only a rotation + scaling: it must say the same as the sform (ITK tools follow the qform)
    corners = np.array([[i, j, k, 1.0] for i in (0, 11) for j in (0, 511) for k in (0, 511)])
    assert np.abs(corners @ (qform - sform).T).max() < 1e-3
    np.testing.assert_allclose(sform, meta.original_affine, atol=1e-4)
    # the mask lies where the raw-grid mask lay: an independent nearest-neighbour lookup of the raw-grid mask at the
    # world position of every written voxel (through the written qform) gives the same labels
    written_mask = np.asarray(image.dataobj)
    raw_affine = np.asarray(meta.regridding[0]["raw_affine"])
    index = np.stack(np.meshgrid(*(np.arange(s) for s in written_mask.shape), indexing="ij"), axis=0).reshape(3, -1)
    raw_index = np.linalg.solve(raw_affine, qform @ np.vstack([index, np.ones(index.shape[1])]))[:3]
    expected = map_coordinates(raw_mask, np.round(raw_index, 4), order=0, mode="constant", cval=0)
    assert (written_mask.reshape(-1) == expected).mean() > 0.9999  # ties at exactly half a voxel may round apart
    assert written_mask.sum() > 0.95 * raw_mask.sum()


def test_save_mask_refuses_a_sheared_affine(tmp_path):
    processor = ReCTImageProcessor(volume_size=[4, 8, 8])
    out = processor(np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32))
    meta = out["volume_meta"][0].to_dict()
    meta["original_affine"][0][1] = 0.3  # shear x against y: not what the processor ever records
    with pytest.raises(ValueError, match=r"qform would lie .* mm from its sform.*gantry_tilt='resample'"):
        processor.save_mask(np.zeros(meta["original_shape"], np.uint8), meta, tmp_path / "m.nii.gz")


# --------------------------------------------------------------------------------------------------------------
# slice spacing
# --------------------------------------------------------------------------------------------------------------


def test_pristine_series_reads_identically_with_either_slice_spacing_setting(tmp_path):
    copy = series_copy(tmp_path, "pristine")
    normal, normal_affine = load_volume(str(SERIES))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say about an evenly spaced series
        resampled, affine = load_volume(str(copy), slice_spacing="resample")
        out = ReCTImageProcessor(volume_size=[20, 64, 64], slice_spacing="resample")(str(copy))
    assert np.abs(resampled - normal).max() == 0.0
    np.testing.assert_array_equal(affine, normal_affine)
    assert out["volume_meta"][0].regridding == []


def _variable_positions(first_gaps=8, small=2.0, large=3.5):
    z0 = min(float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in SERIES.iterdir())
    gaps = [small] * first_gaps + [large] * (19 - first_gaps)
    return z0 + np.concatenate([[0.0], np.cumsum(gaps)])


def test_variable_slice_spacing_is_named_as_such_not_as_missing_slices(tmp_path):
    folder = series_copy(tmp_path, "variable", _variable_positions())
    with pytest.raises(ValueError) as info:
        load_volume(str(folder))
    message = str(info.value)
    assert "slice spacing varies" in message and "no slice is missing" in message and "missing slice" not in message
    assert "8 gap(s) of 2.000 mm" in message and "11 gap(s) of 3.500 mm" in message
    assert "2.000 → 3.500 mm at" in message and "slice_spacing='resample'" in message
    with pytest.raises(ValueError, match="slice spacing varies"):
        ReCTImageProcessor()(str(folder))


def test_variable_slice_spacing_resamples_onto_an_equidistant_grid_on_request(tmp_path):
    positions = _variable_positions()
    folder = series_copy(tmp_path, "variable", positions)
    raw = np.stack([pydicom.dcmread(f).pixel_array for f in _sorted_files(folder)]).astype(np.float32) - 1024.0
    with pytest.warns(UserWarning, match=r"slice spacing varies \(2, 3.5 mm\); resampled 20 slices onto 28"):
        volume, affine = load_volume(str(folder), slice_spacing="resample")
    extent = positions[-1] - positions[0]  # 54.5 mm: 27 intervals of ~2 mm
    new_positions = positions[0] + extent * np.arange(28) / 27
    assert volume.shape == (28, 512, 512)
    np.testing.assert_allclose(affine[:3, 0], [0.0, 0.0, extent / 27], atol=1e-9)  # LPS z = RAS z
    assert affine[2, 3] == pytest.approx(positions[0])
    expected = interp1d(positions, raw.astype(np.float64), axis=0)(new_positions)
    np.testing.assert_allclose(volume, expected, atol=1e-3)
    np.testing.assert_array_equal(volume[[0, -1]], raw[[0, -1]])  # the end slices are the acquired ones

    processor = ReCTImageProcessor(volume_size=[28, 512, 512], slice_spacing="resample")  # no further resizing
    labels = (raw > 200).astype(np.uint8)  # a mask on the acquired slices goes along (nearest neighbour)
    with pytest.warns(UserWarning, match="slice spacing varies"):
        out = processor(str(folder), anatomy_mask=labels, return_tensors="pt")
    meta = out["volume_meta"][0]
    [record] = meta.regridding
    assert record["op"] == "even_slices" and record["raw_spacings_mm"] == [2.0, 3.5]
    assert record["raw_positions_mm"] == pytest.approx(list(positions))
    assert meta.original_shape == [28, 512, 512]
    restored = processor.post_process_masks(out["anatomy_mask"], out["volume_meta"])[0]
    nearest = np.abs(new_positions[:, None] - positions[None, :]).argmin(axis=1)
    np.testing.assert_array_equal(restored, labels[nearest])


def _sorted_files(folder):
    return sorted(
        folder.iterdir(), key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
    )


@pytest.mark.parametrize("slice_spacing", ["raise", "resample"])
def test_a_real_missing_slice_is_still_reported_as_missing(tmp_path, slice_spacing):
    folder = series_copy(tmp_path, "gappy", drop=(7,))
    with pytest.raises(ValueError, match=r"gappy: missing slice\(s\): expected a slice every 2.000 mm.*1 slice"):
        load_volume(str(folder), slice_spacing=slice_spacing)


def test_a_run_of_doubled_gaps_is_variable_spacing_not_missing_slices(tmp_path):
    folder = series_copy(tmp_path, "doubled", _variable_positions(first_gaps=12, small=2.0, large=4.0))
    with pytest.raises(ValueError, match=r"slice spacing varies.*12 gap\(s\) of 2.000 mm, 7 gap\(s\) of 4.000 mm"):
        load_volume(str(folder))


# --------------------------------------------------------------------------------------------------------------
# masks in another voxel order; target spacing
# --------------------------------------------------------------------------------------------------------------


def test_segmentation_in_another_voxel_order_round_trips_onto_the_dicom_grid(tmp_path):
    seg = nib.load(SERIES_SEG)
    assert nib.aff2axcodes(seg.affine) == ("L", "A", "S")
    _, series_affine = load_volume(str(SERIES))
    expected = reoriented_like(seg, series_affine)  # (slices, rows, columns) like the DICOM volume
    assert expected.shape == (20, 512, 512) and len(np.unique(expected)) > 10

    exact = ReCTImageProcessor(volume_size=[20, 512, 512])  # no resampling: the round trip must be exact
    out = exact(str(SERIES), anatomy_mask=str(SERIES_SEG), return_tensors="pt")
    restored = exact.post_process_masks(out["anatomy_mask"], out["volume_meta"])[0]
    np.testing.assert_array_equal(restored, expected)
    written = nib.load(exact.save_mask(restored, out["volume_meta"][0], tmp_path / "seg.nii.gz"))
    np.testing.assert_array_equal(reoriented_like(written, seg.affine), np.asarray(seg.dataobj))

    resized = ReCTImageProcessor(volume_size=[16, 128, 128])
    out = resized(str(SERIES), anatomy_mask=str(SERIES_SEG), return_tensors="pt")
    restored = resized.post_process_masks(out["anatomy_mask"], out["volume_meta"])[0]
    assert (restored == expected).mean() > 0.98


def test_masks_that_really_lie_elsewhere_are_refused_with_the_file_and_the_mismatch(tmp_path):
    seg = nib.load(SERIES_SEG)
    shifted_affine = seg.affine.copy()
    shifted_affine[:3, 3] += [0.0, 0.0, 5.0]
    shifted = tmp_path / "seg_shifted.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj), shifted_affine), shifted)
    processor = ReCTImageProcessor(volume_size=[8, 32, 32])
    with pytest.raises(ValueError, match=r"seg_shifted.nii.gz: .*lies elsewhere.*offset by \[0.0, 0.0, 5.0\] mm"):
        processor(str(SERIES), anatomy_mask=str(shifted))
    with pytest.raises(ValueError, match=r"example_seg.nii.gz: .*lies elsewhere.*not the volume's"):
        processor(str(SERIES), anatomy_mask=str(NIFTI_SEG))


def test_nifti_ct_and_its_segmentation_round_trip():
    processor = ReCTImageProcessor(volume_size=[32, 96, 96])
    out = processor(str(NIFTI_CT), anatomy_mask=str(NIFTI_SEG), return_tensors="pt")
    restored = processor.post_process_masks(out["anatomy_mask"], out["volume_meta"])[0]
    seg = np.asarray(nib.load(NIFTI_SEG).dataobj)
    assert restored.shape == seg.shape and (restored == seg).mean() > 0.97


def test_target_spacing_is_approximate_and_the_achieved_spacing_is_recorded_exactly():
    processor = ReCTImageProcessor(volume_size=[32, 256, 256], target_spacing=[1.5, 2.0, 2.0])
    meta = processor(str(SERIES))["volume_meta"][0]
    resample = meta["steps"][1]
    # 20 slices of 2 mm = 40 mm: round(40 / 1.5) = 27 slices, so 40 / 27 = 1.4815 mm, not 1.5
    assert resample["shape_after"][0] == 27
    assert resample["spacing_after"][0] == pytest.approx(40 / 27)
    spacing = np.linalg.norm(np.asarray(meta.processed_affine)[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, resample["spacing_after"])


def test_real_nifti_streamed_slab_by_slab_equals_the_whole_file_path(monkeypatch):
    import hf_models.image_processing_rect as rect

    processor = ReCTImageProcessor(volume_size=[24, 80, 96], windows=["lung", "mediastinum"])
    monkeypatch.setattr(rect, "STREAM_MIN_BYTES", float("inf"))
    whole = processor(str(NIFTI_CT), return_tensors="np")["pixel_values"]
    monkeypatch.setattr(rect, "STREAM_MIN_BYTES", 0)
    monkeypatch.setattr(rect, "STREAM_SLABS", 5)
    np.testing.assert_array_equal(processor(str(NIFTI_CT), return_tensors="np")["pixel_values"], whole)
