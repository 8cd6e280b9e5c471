"""`bench/focal_detector.py`: lesion-centred crops keep pixels and masks together, and the detector learns to find
a small bright blob among noise that it could not find as initialised."""

import numpy as np
import pytest
import torch

from tests.conftest import load_bench_script


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("focal_detector")


def blob_volumes(count: int, seed: int, shape=(12, 24, 24)):
    """Noise volumes (2 channels); every other one holds a 3×3×3 blob 3 noise SDs bright (its mask and label 1).
    Channel 1 repeats the mask, so a crop's pixels can be checked against its mask crop."""
    rng = np.random.default_rng(seed)
    volumes = []
    for i in range(count):
        pixels = rng.normal(0.0, 1.0, size=(2, *shape)).astype(np.float32)
        mask = np.zeros((1, *shape), dtype=bool)
        if i % 2:
            z, y, x = (int(rng.integers(2, n - 4)) for n in shape)
            mask[0, z : z + 3, y : y + 3, x : x + 3] = True
            pixels[0][mask[0]] += 3.0
        pixels[1] = mask[0]
        volumes.append((torch.from_numpy(pixels).half(), mask, [int(i % 2)]))
    return volumes


def test_lesion_centred_crops_hold_the_lesion_and_keep_pixels_and_masks_together(bench):
    volumes = blob_volumes(8, seed=0)
    positives = [[i for i, v in enumerate(volumes) if v[1][0].any()]]
    pixels, masks = bench.sample_batch(np.random.default_rng(0), volumes, positives, (8, 12, 12), 16)
    assert pixels.shape == (16, 2, 8, 12, 12) and masks.shape == (16, 1, 8, 12, 12)
    assert all(masks[b].any() for b in range(8)), "the first half of the batch is centred on a lesion"
    assert torch.equal(pixels[:, 1], masks[:, 0]), "a flip or a window moved the pixels and the mask apart"


def test_the_detector_learns_to_find_a_small_blob(bench):
    train, valid = blob_volumes(24, seed=1), blob_volumes(24, seed=2)
    for volumes in (train, valid):  # the mask channel was for the crop test only
        for pixels, _, _ in volumes:
            pixels[1] = 0
    untrained, trained, seconds = bench.train_detector(
        train, valid, ["blob"], seed=0, steps=120, width=8, crop=(8, 12, 12), batch=8, lr=3e-3
    )
    assert trained["blob"]["max"] >= 0.9 and trained["blob"]["voxel"] >= 0.9, (untrained, trained)
    assert trained["blob"]["max"] > untrained["blob"]["max"] + 0.2
    assert seconds > 0


def test_an_unknown_finding_is_refused_by_name(bench, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["focal_detector.py", "--findings", "Lung nodule", "Pneumothorax"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
    assert "--findings ['Pneumothorax']: not a phantom finding" in capsys.readouterr().err
