"""`bench/learning.py --shape`: the demo's recipe on another grid keeps the demo's token grid (the patch scales with
the volume), and a grid it cannot scale to is refused with the argument named."""

import pytest

from tests.conftest import load_bench_script
from trainers.classification import ClassifierRecipe


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("learning")


def test_the_patch_scales_with_the_grid_so_the_tokens_stay_the_demos(bench):
    recipe = ClassifierRecipe()
    assert bench.grid_overrides(recipe, None, None) == {
        "volume_size": recipe.volume_size,
        "patch_size": recipe.patch_size,
    }
    finer = bench.grid_overrides(recipe, [64, 128, 128], None)
    assert finer == {"volume_size": (64, 128, 128), "patch_size": (8, 32, 32)}
    tokens = [v // p for v, p in zip(recipe.volume_size, recipe.patch_size)]
    assert [v // p for v, p in zip(finer["volume_size"], finer["patch_size"])] == tokens
    assert bench.grid_overrides(recipe, [64, 128, 128], [4, 16, 16])["patch_size"] == (4, 16, 16)


def test_a_grid_the_patch_cannot_scale_to_or_tile_is_refused(bench):
    recipe = ClassifierRecipe()
    with pytest.raises(ValueError, match=r"--shape \[36, 64, 64\].*pass --patch-size"):
        bench.grid_overrides(recipe, [36, 64, 64], None)
    with pytest.raises(ValueError, match=r"--patch-size \[4, 16, 16\] does not tile the volume size \[40, 72, 64\]"):
        bench.grid_overrides(recipe, [40, 72, 64], [4, 16, 16])
