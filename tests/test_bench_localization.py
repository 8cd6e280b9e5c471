"""The one-voxel-off references of `bench/localization.py`: what the truth scores when it is one voxel too large all
round or moved by one voxel — the ruler its learning numbers are read against — computed on known masks."""

import numpy as np
import pytest

from hf_models.anatomy_rect import ANATOMY_REGIONS
from tests.conftest import load_bench_script
from trainers.data.phantom import LESION_IDS


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("localization")


def test_moved_shifts_along_one_axis_and_drops_what_leaves_the_grid(bench):
    mask = np.zeros((3, 4, 5), dtype=bool)
    mask[1, 2, 0] = mask[1, 2, 4] = True
    right = bench.moved(mask, 2, 1)
    assert right.shape == mask.shape and right.dtype == mask.dtype
    assert np.argwhere(right).tolist() == [[1, 2, 1]]  # the voxel at x = 4 left the grid
    assert np.argwhere(bench.moved(mask, 2, -1)).tolist() == [[1, 2, 3]]
    assert np.argwhere(bench.moved(mask, 0, -1)).tolist() == [[0, 2, 0], [0, 2, 4]]


def test_one_voxel_off_scores_a_cube_and_a_region_as_the_arithmetic_says(bench):
    lesion = np.zeros((10, 10, 10), dtype=np.uint8)
    lesion[3:7, 3:7, 3:7] = LESION_IDS["Lung nodule"]  # a 4³ cube: 64 voxels, 16 per face
    anatomy = np.zeros_like(lesion)
    region = next(r for r in ANATOMY_REGIONS if r.id)
    anatomy[0:2, 0:10, 0:10] = region.id  # a 2-voxel slab on the grid's edge
    references = bench.one_voxel_off([{"lesion": lesion, "anatomy": anatomy}])

    nodule = {reference: summary["finding/text"]["Lung nodule"] for reference, summary in references.items()}
    assert nodule["dilated"] == {"dice": pytest.approx(2 * 64 / (64 + 64 + 6 * 16)), "cases": 1}
    assert nodule["moved"] == {"dice": pytest.approx(2 * 48 / 128), "cases": 6}  # 48 voxels overlap each move
    assert references["moved"]["finding/box"] == references["moved"]["finding/text"]
    # The slab grows inward only (to z = 2); moved along z it keeps 100 or (towards the edge) loses 100 of its 200
    # voxels, moved along y or x it loses the 20 that leave the grid.
    slab = {reference: summary["region/text"][region.name]["dice"] for reference, summary in references.items()}
    assert slab["dilated"] == pytest.approx(2 * 200 / (200 + 300))
    assert slab["moved"] == pytest.approx((2 * 100 / 400 + 2 * 100 / 300 + 4 * (2 * 180 / 380)) / 6)
    assert set(bench.headline(references["dilated"])) >= {"findings_text", "findings_box", "anatomy_text"}
