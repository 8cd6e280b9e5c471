"""Augmentation of processed examples: volume and masks move together, probability 0 is the identity, draws are
reproducible and differ between DataLoader workers."""

import pytest
import torch

from trainers.data.augmentation import (
    Compose,
    RandFlipd,
    RandGaussianNoised,
    RandRotateZd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ct_augmentation,
)


def blob_example(depth=6, height=32, width=48, centre=(20, 36), radius=3.5):
    """A 2-channel volume with a bright disc through every slice, and masks labelling exactly that disc."""
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    disc = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) <= radius**2
    volume = torch.full((2, depth, height, width), -1.0)
    volume[:, :, disc] = 1.0
    mask = torch.zeros((1, depth, height, width), dtype=torch.uint8)
    mask[:, :, disc] = 7
    return {"pixel_values": volume, "anatomy_mask": mask, "lesion_mask": mask.clone(), "labels": torch.ones(3)}


def centroid(binary: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(binary).float().mean(dim=0)


ALL_TRANSFORMS = [
    lambda p: RandFlipd(prob=p),
    lambda p: RandRotateZd(max_degrees=15, prob=p),
    lambda p: RandShiftIntensityd(offsets=0.2, prob=p),
    lambda p: RandScaleIntensityd(factors=0.3, prob=p),
    lambda p: RandGaussianNoised(std=0.1, prob=p),
]


@pytest.mark.parametrize("make", ALL_TRANSFORMS)
def test_probability_zero_is_identity(make):
    example = blob_example()
    transform = make(0.0)
    for _ in range(5):
        out = transform(example)
        for key in ("pixel_values", "anatomy_mask", "lesion_mask", "labels"):
            assert torch.equal(out[key], example[key]), key
    assert torch.equal(ct_augmentation(0.0)(example)["pixel_values"], example["pixel_values"])


@pytest.mark.parametrize("transform", [RandFlipd(spatial_axis=2, prob=1.0), RandRotateZd(max_degrees=30, prob=1.0)])
def test_masks_move_with_the_volume(transform):
    example = blob_example()
    for seed in range(4):
        transform.set_random_state(seed)
        out = transform(example)
        bright = out["pixel_values"][0] > 0.0
        for key in ("anatomy_mask", "lesion_mask"):
            mask = out[key]
            assert mask.dtype == torch.uint8 and set(mask.unique().tolist()) <= {0, 7}, key  # ids never interpolated
            labelled = mask[0] == 7
            assert labelled.sum() > 0.8 * (example[key][0] == 7).sum()
            assert torch.allclose(centroid(labelled), centroid(bright), atol=0.5), (key, seed)
            assert (bright & labelled).sum() >= 0.9 * labelled.sum()
    assert not torch.allclose(centroid(out["pixel_values"][0] > 0), centroid(example["pixel_values"][0] > 0))


def test_left_right_flip_is_the_width_axis():
    example = blob_example()
    out = RandFlipd(prob=1.0)(example)
    assert torch.equal(out["pixel_values"], torch.flip(example["pixel_values"], dims=(3,)))
    assert torch.equal(out["anatomy_mask"], torch.flip(example["anatomy_mask"], dims=(3,)))


def test_rotation_by_90_degrees_matches_rot90_on_square_slices():
    volume = torch.randn(3, 4, 16, 16)
    mask = torch.randint(0, 5, (1, 4, 16, 16), dtype=torch.uint8)
    transform = RandRotateZd(max_degrees=90, prob=1.0)
    transform.uniform = lambda low, high: 90.0  # pin the angle: an exact reference exists only at 90 degrees
    out = transform({"pixel_values": volume, "anatomy_mask": mask})
    # +90 degrees turns anterior (row 0) towards the patient's left (last column): torch.rot90 with k=-1.
    assert torch.allclose(out["pixel_values"], torch.rot90(volume, k=-1, dims=(2, 3)), atol=1e-5)
    assert torch.equal(out["anatomy_mask"], torch.rot90(mask, k=-1, dims=(2, 3)))


def test_rotation_is_in_voxel_units_on_non_square_slices():
    """On a 32 × 48 slice a point 10 voxels right of centre lands 10 voxels below it after 90 degrees (rotating
    normalised coordinates would put it at 10 × 32 / 48 voxels)."""
    volume = torch.zeros(1, 1, 32, 48)
    volume[0, 0, 15:17, 33:35] = 1.0  # centre (15.5, 23.5) + (0, 10)
    transform = RandRotateZd(max_degrees=90, prob=1.0)
    transform.uniform = lambda low, high: 90.0
    out = transform({"pixel_values": volume})["pixel_values"]
    assert torch.allclose(centroid(out[0, 0] > 0.5), torch.tensor([25.5, 23.5]), atol=0.01)


def test_pipeline_output_is_finite_and_reproducible():
    example = blob_example()
    first = ct_augmentation(2.0, seed=3)(example)
    again = ct_augmentation(2.0, seed=3)(example)
    other = ct_augmentation(2.0, seed=4)(example)
    assert torch.isfinite(first["pixel_values"]).all()
    assert first["pixel_values"].dtype == example["pixel_values"].dtype
    assert torch.equal(first["pixel_values"], again["pixel_values"])
    assert not torch.equal(first["pixel_values"], other["pixel_values"])
    assert torch.equal(first["labels"], example["labels"])


def test_float16_volumes_keep_their_dtype():
    example = blob_example()
    example["pixel_values"] = example["pixel_values"].half()
    out = ct_augmentation(2.0, seed=1)(example)
    assert out["pixel_values"].dtype == torch.float16 and torch.isfinite(out["pixel_values"]).all()


def test_missing_masks_are_skipped():
    example = {"pixel_values": torch.randn(2, 4, 16, 16), "anatomy_mask": None}
    out = Compose([RandFlipd(prob=1.0), RandRotateZd(20, prob=1.0)], seed=0)(example)
    assert out["anatomy_mask"] is None and out["pixel_values"].shape == (2, 4, 16, 16)


class _Examples(torch.utils.data.Dataset):
    def __init__(self, transform):
        self.transform = transform

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return self.transform({"pixel_values": torch.zeros(1, 1, 4, 4)})["pixel_values"].flatten()


def _noise_per_item(seed: int, workers: int) -> torch.Tensor:
    dataset = _Examples(RandGaussianNoised(std=1.0, prob=1.0, seed=0))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=1, num_workers=workers, generator=torch.Generator().manual_seed(seed)
    )
    return torch.cat(list(loader))


def test_dataloader_workers_draw_different_reproducible_numbers():
    draws = _noise_per_item(seed=0, workers=2)
    # Workers take items 0, 2, 4 … and 1, 3, 5 …: without re-seeding both would draw the same sequence.
    assert not torch.allclose(draws[0], draws[1])
    assert torch.equal(draws, _noise_per_item(seed=0, workers=2))
    assert not torch.equal(draws, _noise_per_item(seed=1, workers=2))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: RandFlipd(prob=1.5), "RandFlipd: `prob`"),
        (lambda: RandFlipd(spatial_axis=3), "spatial_axis"),
        (lambda: RandRotateZd(max_degrees=-1), "max_degrees"),
        (lambda: RandScaleIntensityd(factors=1.0), "factors"),
        (lambda: ct_augmentation(-1.0), "strength"),
    ],
)
def test_bad_settings_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_volume_shape_names_the_key():
    with pytest.raises(ValueError, match="`pixel_values` must be a \\(channels, depth, height, width\\)"):
        RandFlipd(prob=1.0)({"pixel_values": torch.zeros(4, 4, 4)})
