"""Multi-process training on CPUs (gloo) through `rect-vlm train` (`trainers/distributed.py`).

Two processes with batch 1 each against one process with batch 2, same seed and data order: the same loss and
grad-norm at every step and the same final weights (DDP in the default suite; DeepSpeed ZeRO-2 and ZeRO-3 under
torchrun and `accelerate launch` behind the `slow` marker: DeepSpeed compiles its shared-memory op on first use).
The evaluation set (4 volumes, 3 per process and batch) splits unevenly: every volume must be scored exactly once.
Saved weights must be whole tensors, never the `[0]`-shaped placeholders ZeRO-3 leaves on each rank. ZeRO-2 and
ZeRO-3 runs resumed from their DeepSpeed checkpoints (slow) end bit-identical to the uninterrupted ones.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainers.data.phantom import generate_cohort
from trainers.train import checkpoint_problem


REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "trainers" / "recipes" / "classification.yaml"
COHORT = dict(n_train=6, n_val=3, seed=0, shape=(8, 32, 32), prevalence=0.5, p_second_recon=0.0, num_workers=1)
COMMON = "--max_steps 6 --logging_steps 1 --seed 0 --use_cpu true --per_device_eval_batch_size 3".split()
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed") / "cohort"
    generate_cohort(root, **COHORT)
    return root


def train(cohort: Path, out: Path, launcher: list[str], *extra: str, recipe: Path = RECIPE) -> tuple[dict, list]:
    """`python -m trainers.cli train RECIPE --tiny` under `launcher` ([] = one plain process); returns the
    training summary and the per-step log."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [
        *(launcher or [sys.executable]),
        "-m",
        "trainers.cli",
        "train",
        str(recipe),
        "--tiny",
        "--data",
        str(cohort),
        "--output-dir",
        str(out),
        *COMMON,
        *extra,
    ]
    proc = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Setting accelerator to CPU" not in proc.stderr  # DeepSpeed is told, not left to guess
    summary = json.loads((out / "training_summary.json").read_text())
    steps = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    return summary, steps


def assert_same_training(run: tuple, out: Path, reference: tuple, reference_out: Path) -> None:
    (summary, steps), (expected_summary, expected_steps) = run, reference
    assert [s["step"] for s in steps] == [s["step"] for s in expected_steps] == list(range(1, 7))
    for got, want in zip(steps, expected_steps):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), (got, want)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), (got, want)
        assert got["learning_rate"] == pytest.approx(want["learning_rate"])
    weights, expected = load_file(out / "model.safetensors"), load_file(reference_out / "model.safetensors")
    assert weights.keys() == expected.keys()
    for name, tensor in weights.items():
        assert tensor.shape == expected[name].shape and tensor.numel() > 0, name  # no ZeRO-3 placeholders
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    # the uneven evaluation split (3 + 1 volumes) scores each of the 4 volumes once
    metrics, expected_metrics = summary["eval_metrics"], expected_summary["eval_metrics"]
    assert metrics["eval_samples"] == expected_metrics["eval_samples"] == summary["eval_examples"] == 4
    for key, value in expected_metrics.items():
        if key.startswith(("eval_auroc", "eval_f1", "eval_accuracy")):
            assert metrics[key] == pytest.approx(value, abs=1e-6), key


@pytest.fixture(scope="module")
def single(cohort, tmp_path_factory):
    """One process, batch 2: the reference run."""
    out = tmp_path_factory.mktemp("single") / "run"
    return train(cohort, out, [], "--per_device_train_batch_size", "2"), out


def test_ddp_two_processes_train_like_one(cohort, single, tmp_path):
    out = tmp_path / "ddp"
    run = train(cohort, out, TORCHRUN, "--per_device_train_batch_size", "1")
    assert_same_training(run, out, *single)
    assert json.loads((out / "config.json").read_text())["auto_map"]  # a Hub folder, written once


@pytest.mark.slow
def test_deepspeed_zero2_two_processes_train_like_one(cohort, single, tmp_path):
    out = tmp_path / "zero2"
    run = train(cohort, out, TORCHRUN, "--per_device_train_batch_size", "1", "--deepspeed", "zero2")
    assert_same_training(run, out, *single)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_deepspeed_zero3_two_processes_train_like_one(cohort, single, tmp_path, launcher):
    # Under ZeRO-3 each parameter is partitioned as it is created, which draws the random initialisation in another
    # order: both runs start from the same saved weights instead.
    recipe = tmp_path / "classification.yaml"
    text = RECIPE.read_text().replace("  pretrained: null", f"  pretrained: {json.dumps(str(single[1]))}", 1)
    assert text != RECIPE.read_text()
    recipe.write_text(text)
    reference_out = tmp_path / "single"
    reference = train(cohort, reference_out, [], "--per_device_train_batch_size", "2", recipe=recipe)
    out = tmp_path / f"zero3-{launcher}"
    if launcher == "torchrun":
        command = TORCHRUN
    else:
        command = [*ACCELERATE, str(REPO_ROOT / "trainers" / "accelerate" / "deepspeed_zero3_cpu.yaml")]
    run = train(cohort, out, command, "--per_device_train_batch_size", "1", "--deepspeed", "zero3", recipe=recipe)
    assert_same_training(run, out, reference, reference_out)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_resume_is_bit_identical(cohort, tmp_path, stage):
    """A DeepSpeed checkpoint keeps the optimizer state per rank under `global_step<N>/` (no `optimizer.pt`):
    `--resume` must take it, and the resumed 2-process run ends with the uninterrupted run's weights and log."""
    reference_out = tmp_path / "reference"
    zero = ("--per_device_train_batch_size", "1", "--deepspeed", stage, "--save_steps", "3")
    reference = train(cohort, reference_out, TORCHRUN, *zero)
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(reference_out / "checkpoint-3", out / "checkpoint-3")  # what a run killed after step 3 leaves
    assert not (out / "checkpoint-3" / "optimizer.pt").exists()
    assert checkpoint_problem(out / "checkpoint-3") is None
    summary, steps = train(cohort, out, TORCHRUN, *zero, "--resume")
    assert Path(summary["resumed_from"]).name == "checkpoint-3" and summary["global_step"] == 6
    assert [(s["step"], s["loss"], s["grad_norm"]) for s in steps] == [
        (s["step"], s["loss"], s["grad_norm"]) for s in reference[1]
    ]
    weights, expected = load_file(out / "model.safetensors"), load_file(reference_out / "model.safetensors")
    assert weights.keys() == expected.keys()
    assert [n for n in expected if not torch.equal(weights[n], expected[n])] == []
    assert min(t.numel() for t in weights.values()) > 0  # gathered, never ZeRO-3's placeholders
    states = sorted((out / "checkpoint-6" / "global_step6").glob("*optim_states.pt"))
    assert len(states) == 2  # one per rank
    with open(states[1], "r+b") as handle:
        handle.truncate(states[1].stat().st_size // 2)
    assert "truncated" in checkpoint_problem(out / "checkpoint-6")


@pytest.mark.parametrize("recipe", ["localization", "multitask"])
def test_ddp_trains_localizers_whatever_prompts_each_process_gets(cohort, tmp_path, recipe):
    """The processes get batches with different prompt kinds (text, text + box, text + points): every parameter
    must still get a gradient in each (DDP runs with `find_unused_parameters=False`; the localizer masks absent
    prompts instead of skipping their layers). The evaluation loss must come from every batch, whatever its prompts
    (the Trainer would otherwise take the points' `input_labels` for labels and skip the loss of batches without
    points; early stopping then finds no `eval_loss`)."""
    out = tmp_path / recipe
    path = REPO_ROOT / "trainers" / "recipes" / f"{recipe}.yaml"
    summary, steps = train(cohort, out, TORCHRUN, "--per_device_train_batch_size", "1", "--max_steps", "3",
                           recipe=path)  # fmt: skip
    assert summary["global_step"] == 3 and [s["step"] for s in steps] == [1, 2, 3]
    assert all({"dice_loss", "focal_loss"} <= set(s) for s in steps)
    assert summary["eval_metrics"]["eval_loss"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["vision_pretrain", "localization", "multitask"])
def test_deepspeed_zero3_builds_text_tower_models_and_exports_their_parts(cohort, tmp_path, recipe):
    """Under ZeRO-3 each weight is partitioned as it is created: a new model with a BERT text tower must be built
    and initialised through `_from_config` (its padding row cannot be written into a partition), 0-dimensional
    parameters cannot be partitioned at all, and every rank must run the same layers whatever prompts it gets (the
    localizer masks absent prompts instead of skipping their layers). The exports after training build models
    again, in a process of their own (`from_pretrained` with ZeRO-3 active would partition across ranks that are
    not there). Every saved tensor is whole and every exported folder loads."""
    from transformers import AutoModel

    out = tmp_path / recipe
    path = REPO_ROOT / "trainers" / "recipes" / f"{recipe}.yaml"
    summary, steps = train(cohort, out, TORCHRUN, "--per_device_train_batch_size", "1", "--max_steps", "2",
                           "--deepspeed", "zero3", recipe=path)  # fmt: skip
    assert summary["global_step"] == 2 and [s["step"] for s in steps] == [1, 2]
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    folders = {"vision_pretrain": [out], "localization": [out, out / "vision_encoder"],
               "multitask": [out, out / "classifier", out / "localizer"]}[recipe]  # fmt: skip
    for folder in folders:
        weights = load_file(folder / "model.safetensors")
        assert min(t.numel() for t in weights.values()) > 0, folder  # gathered, never ZeRO-3's placeholders
        model = AutoModel.from_pretrained(folder, trust_remote_code=True)
        assert weights.keys() == model.state_dict().keys(), folder
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, weights[name]), (folder, name)


@pytest.mark.slow
def test_deepspeed_zero3_trains_both_report_stages(cohort, tmp_path):
    """The report model under ZeRO-3, stage 1 (projector) from a new model, then stage 2 (LoRA) from stage 1's
    folder. The evaluation split's one follow-up goes to one process only: a batch with a prior scan must run the
    same layers as one without (the prior scans go through the encoder with the current ones, in one pass)."""
    import yaml

    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    recipes = REPO_ROOT / "trainers" / "recipes"
    args = ("--per_device_train_batch_size", "1", "--max_steps", "2", "--deepspeed", "zero3")
    summary, steps = train(cohort, stage1, TORCHRUN, *args, recipe=recipes / "report_stage1.yaml")
    assert summary["global_step"] == 2 and summary["eval_metrics"]["eval_loss"] > 0
    data = yaml.safe_load((recipes / "report_stage2.yaml").read_text())
    data["model"]["pretrained"] = str(stage1)
    recipe = tmp_path / "report_stage2.yaml"
    recipe.write_text(yaml.safe_dump(data))
    summary, steps = train(cohort, stage2, TORCHRUN, *args, recipe=recipe)
    assert summary["global_step"] == 2 and summary["eval_metrics"]["eval_loss"] > 0
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    for path in [stage1 / "model.safetensors", stage1 / "mm_projector.safetensors",
                 stage2 / "adapter_model.safetensors", stage2 / "non_lora_trainables.safetensors"]:  # fmt: skip
        weights = load_file(path)
        assert weights and min(t.numel() for t in weights.values()) > 0, path  # never ZeRO-3's placeholders
