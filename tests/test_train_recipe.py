"""`rect-vlm train` (`trainers.train.train_from_recipe`) on the tiny recipes and a tiny phantom cohort: a run killed
with SIGKILL and restarted with `--resume` ends bit-identical to an uninterrupted one (a full fine-tune of the
classifier and a LoRA run of the report generator's stage 2); a truncated
newest checkpoint is skipped with a warning naming it; user mistakes are one line with exit code 2."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainers.cli import main
from trainers.data.phantom import generate_cohort
from trainers.train import checkpoint_problem, latest_valid_checkpoint, train_from_recipe


REPO_ROOT = Path(__file__).resolve().parents[1]

#: 6 + 3 patients of 8×32×32 voxels (→ 6 training and 4 validation volumes); prevalence 0.5 gives most findings both
#: classes.
COHORT = dict(n_train=6, n_val=3, seed=0, shape=(8, 32, 32), prevalence=0.5, p_second_recon=0.0, num_workers=1)

#: 24 steps in batches of 2 (3 steps an epoch over the 6 training volumes, so checkpoints 4, 8, 16 and 20 fall in the
#: middle of an epoch and a resumed run must skip the batches already seen), a checkpoint every 4 steps, a log
#: entry every step, deterministic algorithms on. About 50 ms a step: the killed run has 16 steps and 4 checkpoint
#: saves to go when checkpoint-8 is complete.
MAX_STEPS = 24
OVERRIDES = (
    f"--max_steps {MAX_STEPS} --save_steps 4 --per_device_train_batch_size 2 --logging_steps 1 --seed 0 "
    "--use_cpu true --full_determinism true"
).split()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_recipe") / "cohort"
    generate_cohort(root, **COHORT)
    return root


def start_train(cohort: Path, out: Path, *extra: str, recipe: str = "classification") -> subprocess.Popen:
    """`rect-vlm train RECIPE --tiny ...` in a fresh process (one thread: the same float sums in each run). Its
    output goes to files next to `out` (a pipe nobody reads while polling could fill up and stall it)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = ["train", recipe, "--tiny", "--data", str(cohort), "--output-dir", str(out), *extra]
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}-{len(list(out.parent.glob(f'{out.name}-*.stderr')))}"
    with open(f"{log}.stdout", "w") as stdout, open(f"{log}.stderr", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trainers.cli", *command, *OVERRIDES], env=env, stdout=stdout, stderr=stderr
        )
    proc.stderr_path = Path(f"{log}.stderr")
    return proc


def finish(proc: subprocess.Popen) -> str:
    """Wait for a run that must succeed; returns its stderr."""
    proc.wait(timeout=300)
    stderr = proc.stderr_path.read_text()
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory) -> Path:
    """The uninterrupted run's output folder."""
    out = tmp_path_factory.mktemp("reference") / "run"
    finish(start_train(cohort, out))
    return out


def assert_same_run(run: Path, reference: Path, weights_file: str = "model.safetensors") -> None:
    """Bit-identical final weights, the same global step and the same per-step training logs."""
    weights, expected = load_file(run / weights_file), load_file(reference / weights_file)
    assert weights.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(weights[name], expected[name])]
    assert different == [], f"{len(different)} tensors differ, e.g. {different[:3]}"
    state, expected_state = (json.loads((r / "trainer_state.json").read_text()) for r in (run, reference))
    assert state["global_step"] == expected_state["global_step"] == MAX_STEPS

    def training_logs(s):
        return [(e["step"], e["loss"], e["grad_norm"], e["learning_rate"]) for e in s["log_history"] if "loss" in e]

    assert len(training_logs(state)) == MAX_STEPS
    assert training_logs(state) == training_logs(expected_state)


def kill_after_checkpoint_8(proc: subprocess.Popen, out: Path) -> Path:
    """SIGKILL `proc` once `out/checkpoint-8` is complete; returns the newest valid checkpoint it left."""
    deadline = time.monotonic() + 240
    while checkpoint_problem(out / "checkpoint-8") is not None:  # complete once its trainer_state.json parses
        assert proc.poll() is None, "ended before checkpoint-8 was complete: " + proc.stderr_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "no complete checkpoint-8 after 240 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "training_summary.json").exists(), "the run finished before it was killed"
    newest = latest_valid_checkpoint(out)
    assert newest is not None and 8 <= int(newest.name.split("-")[1]) < MAX_STEPS
    return newest


def test_killed_run_resumes_to_bit_identical_weights(cohort, reference, tmp_path):
    out = tmp_path / "run"
    newest = kill_after_checkpoint_8(start_train(cohort, out), out)
    finish(start_train(cohort, out, "--resume"))
    summary = json.loads((out / "training_summary.json").read_text())
    assert Path(summary["resumed_from"]).name == newest.name
    assert summary["global_step"] == MAX_STEPS
    assert summary["train_examples"] == 6 and summary["eval_examples"] == 4
    assert_same_run(out, reference)
    # The final folder is a Hub folder: model, config and image processor.
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    # The recipe trains with the demo's lesion-token supervision (the cohort has lesion masks): both terms are
    # logged, the token head is saved (and so restored on resume), evaluation reads images and labels only.
    logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert all({"classification_loss", "lesion_token_loss"} <= set(e) for e in logs)
    assert json.loads((out / "config.json").read_text())["lesion_token_loss_weight"] == 1.0
    assert any(k.startswith("lesion_token_classifier.") for k in load_file(out / "model.safetensors"))
    assert summary["eval_metrics"]["eval_loss"] > 0


def test_killed_lora_run_resumes_to_bit_identical_adapter(cohort, tmp_path):
    """Stage 2 of the report generator (LoRA with dropout on a tiny random Llama, the projector as
    `modules_to_save`): the resumed run restores the adapter, the optimizer and the dropout RNG from the checkpoint
    and ends with the uninterrupted run's adapter, bit for bit."""
    reference = tmp_path / "reference"
    finish(start_train(cohort, reference, recipe="report_stage2"))
    out = tmp_path / "run"
    newest = kill_after_checkpoint_8(start_train(cohort, out, recipe="report_stage2"), out)
    finish(start_train(cohort, out, "--resume", recipe="report_stage2"))
    summary = json.loads((out / "training_summary.json").read_text())
    assert Path(summary["resumed_from"]).name == newest.name
    assert_same_run(out, reference, "adapter_model.safetensors")
    assert_same_run(out, reference, "non_lora_trainables.safetensors")
    assert "model.safetensors" not in {p.name for p in out.iterdir()}  # the adapter folder, not a merged model
    adapter = out / f"checkpoint-{MAX_STEPS}" / "adapter_model.safetensors"  # a LoRA checkpoint, cut short
    with open(adapter, "r+b") as handle:
        handle.truncate(adapter.stat().st_size // 2)
    assert "truncated" in checkpoint_problem(adapter.parent)
    assert latest_valid_checkpoint(out) == out / f"checkpoint-{MAX_STEPS - 4}"


def test_truncated_newest_checkpoint_is_skipped_with_a_warning(cohort, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    weights = out / f"checkpoint-{MAX_STEPS}" / "model.safetensors"
    with open(weights, "r+b") as handle:  # what a process killed while writing the weights leaves
        handle.truncate(weights.stat().st_size // 2)
    assert "truncated" in checkpoint_problem(weights.parent)
    previous = out / f"checkpoint-{MAX_STEPS - 4}"
    assert latest_valid_checkpoint(out) == previous

    stderr = finish(start_train(cohort, out, "--resume"))
    warnings = [line for line in stderr.splitlines() if "skipping incomplete checkpoint" in line]
    assert len(warnings) == 1 and str(weights.parent) in warnings[0] and "model.safetensors" in warnings[0], stderr
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["resumed_from"] == str(previous)
    assert checkpoint_problem(weights.parent) is None  # step 24 was trained again and saved over the broken folder
    assert_same_run(out, reference)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_unknown_override_key_is_one_line(cohort, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    args = ["train", "classification", "--tiny", "--data", str(cohort), "--output-dir", str(tmp_path / "out")]
    proc = subprocess.run(
        [sys.executable, "-m", "trainers.cli", *args, "--max_steps", "3", "--max_stepz", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = one_line_error(proc)
    assert line.startswith("rect-vlm train: error: --max_stepz: not a TrainingArguments field"), line
    assert not list((tmp_path / "out").glob("checkpoint-*"))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["classification", "--tiny", "--data", "{missing}", "--output-dir", "{out}"], ["--data", "no such folder"]),
        (["classification", "--tiny", "--data", "{cohort}"], ["--output-dir is required"]),
        (
            ["classification", "--data", "{cohort}", "--output-dir", "{out}", "--max_steps", "x"],
            ["--max_steps", "'x'"],
        ),
        (["classification", "--data", "{cohort}", "--output-dir", "{out}", "--output_dir", "y"], ["--output_dir"]),
        (["classification", "--data", "{cohort}", "--output-dir", "{earlier}"], ["checkpoint-4", "--resume"]),
    ],
    ids=["missing-data", "no-output-dir", "bad-value", "output-dir-override", "earlier-run"],
)
def test_train_usage_errors(cohort, tmp_path, capsys, args, expected):
    (tmp_path / "earlier" / "checkpoint-4").mkdir(parents=True)
    paths = {"missing": str(tmp_path / "missing"), "out": str(tmp_path / "out"), "cohort": str(cohort)}
    paths["earlier"] = str(tmp_path / "earlier")
    assert main(["train", *(a.format(**paths) for a in args)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rect-vlm train: error: "), lines
    for text in expected:
        assert text in lines[0], lines[0]


def test_vision_pretrain_tiny_trains_and_saves_a_hub_folder(cohort, tmp_path):
    from transformers import AutoModel, AutoProcessor

    out = tmp_path / "pretrain"
    overrides = dict(max_steps=10, logging_steps=5, use_cpu=True, eval_strategy="steps", eval_steps=10)
    summary = train_from_recipe("vision_pretrain", cohort, out, tiny=True, overrides=overrides, progress=False)
    assert summary["task"] == "vision_pretrain" and summary["global_step"] == 10
    logged = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert all({"contrastive_loss", "region_loss", "grad_norm"} <= set(e) for e in logged)  # each loss term
    metrics = summary["eval_metrics"]
    for direction in ("image_to_text", "text_to_image"):
        for key in ("R@1", "R@5", "R@10", "MRR"):
            assert 0.0 <= metrics[f"eval_{direction}/{key}"] <= 1.0
        assert metrics[f"eval_{direction}/R@10"] == 1.0  # 4 held-out pairs: every report is within the top 10
    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "ReCTModel"
    saved = load_file(out / "model.safetensors")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0, msg=name)
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    batch = processor(text=["No pleural effusion."], return_tensors="pt")
    assert batch["input_ids"].shape[0] == 1

    # pre-training → fine-tuning: the classification recipe starting from this folder gets its vision encoder
    from trainers.recipes import load_recipe
    from trainers.train import build_classification

    recipe = load_recipe("classification", tiny=True)
    recipe.model.pretrained = str(out)
    classifier = build_classification(recipe, cohort, tmp_path / "cache", progress=False).model
    encoder, pretrained = classifier.vision_model.state_dict(), model.vision_model.state_dict()
    assert set(encoder) <= set(pretrained)  # the classifier's tower: the same, less the region queries
    for name, tensor in encoder.items():
        torch.testing.assert_close(tensor, pretrained[name], rtol=0, atol=0, msg=name)


def test_localization_tiny_trains_and_saves_a_hub_folder(cohort, tmp_path):
    from transformers import AutoModel, AutoModelForMaskGeneration, AutoProcessor

    from trainers.data.readers import read_ct_rate

    out = tmp_path / "localizer"
    summary = train_from_recipe("localization", cohort, out, tiny=True, overrides={"use_cpu": True}, progress=False)
    assert summary["task"] == "localization" and summary["global_step"] == 8
    volumes = {split: len(read_ct_rate(cohort, split, cot=False)) for split in ("train", "valid")}
    # one example (K targets) per volume
    assert (summary["train_examples"], summary["eval_examples"]) == (volumes["train"], volumes["valid"])
    assert summary["eval_metrics"]["eval_loss"] > 0
    logged = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert all({"dice_loss", "focal_loss", "iou_loss", "grad_norm"} <= set(e) for e in logged)
    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "ReCTForLesionLocalization"
    assert type(AutoModelForMaskGeneration.from_pretrained(out, trust_remote_code=True)) is type(model)
    saved = load_file(out / "model.safetensors")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0, msg=name)
    # Seed 002's encoder export: the vision encoder alone, a Hub folder of its own.
    encoder = AutoModel.from_pretrained(out / "vision_encoder", trust_remote_code=True)
    assert type(encoder).__name__ == "ReCTVisionModel"
    assert encoder.state_dict().keys() == model.vision_model.state_dict().keys()
    for name, tensor in model.vision_model.state_dict().items():
        torch.testing.assert_close(encoder.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    volume = next((cohort / "dataset" / "valid").rglob("*.nii.gz"))
    batch = processor(images=[str(volume)], text=[["pleural effusion", "aorta"]], return_tensors="pt")
    with torch.no_grad():
        masks = model(**{k: v for k, v in batch.items() if k != "volume_meta"}).pred_masks
    assert masks.shape == (1, 2, 8, 32, 32)


def test_multitask_tiny_trains_one_encoder_and_exports_each_component(cohort, tmp_path):
    """`multitask` from a `vision_pretrain` folder: every loss term in the logs, the pre-trained weights as the
    starting point, and OUT holding the ReCTModel, classifier/ and localizer/ Hub folders that share the one
    jointly trained encoder (and, for the localizer, text tower)."""
    from transformers import AutoModel, AutoModelForImageClassification, AutoModelForMaskGeneration

    from trainers.multitask import CLASSIFIER_DIR, LOCALIZER_DIR
    from trainers.recipes import load_recipe

    pretrained = tmp_path / "pretrain"
    train_from_recipe("vision_pretrain", cohort, pretrained, tiny=True, overrides={"max_steps": 2}, progress=False)
    start = load_file(pretrained / "model.safetensors")
    recipe = load_recipe("multitask", tiny=True)
    recipe.model.pretrained = str(pretrained)
    recipe.optimization.max_steps, recipe.optimization.logging_steps = 4, 2
    out = tmp_path / "multitask"
    summary = train_from_recipe(recipe, cohort, out, overrides={"use_cpu": True}, progress=False)
    assert summary["task"] == "multitask" and summary["global_step"] == 4
    assert summary["eval_metrics"]["eval_loss"] > 0
    logged = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    terms = {"contrastive_loss", "region_loss", "classification_loss", "dice_loss", "focal_loss", "iou_loss"}
    assert logged and all(terms | {"grad_norm"} <= set(e) for e in logged), logged

    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "ReCTModel"
    saved = load_file(out / "model.safetensors")
    assert saved.keys() == model.state_dict().keys() == start.keys()
    assert not torch.equal(saved["vision_model.embeddings.projection.weight"],
                           start["vision_model.embeddings.projection.weight"])  # fmt: skip
    classifier = AutoModelForImageClassification.from_pretrained(out / CLASSIFIER_DIR, trust_remote_code=True)
    localizer = AutoModelForMaskGeneration.from_pretrained(out / LOCALIZER_DIR, trust_remote_code=True)
    assert type(classifier).__name__ == "ReCTForVolumeClassification"
    assert type(localizer).__name__ == "ReCTForLesionLocalization"
    assert type(AutoModel.from_pretrained(out / LOCALIZER_DIR, trust_remote_code=True)) is type(localizer)
    assert len(classifier.config.id2label) == 18
    encoder = model.vision_model.state_dict()
    for part in (classifier, localizer):
        tower = part.vision_model.state_dict()
        assert set(tower) <= set(encoder) and set(encoder) - set(tower) <= {k for k in encoder if "region" in k}
        for name, tensor in tower.items():
            torch.testing.assert_close(tensor, encoder[name], rtol=0, atol=0, msg=name)
    for name, tensor in localizer.text_model.state_dict().items():
        torch.testing.assert_close(tensor, model.text_model.state_dict()[name], rtol=0, atol=0, msg=name)
    processor_files = {p.name for p in (out / LOCALIZER_DIR).iterdir()}
    assert {"processor_config.json", "tokenizer.json"} <= processor_files, processor_files
    assert (out / CLASSIFIER_DIR / "preprocessor_config.json").is_file()


def test_localization_reads_a_seed_002_segmentation_csv(cohort, tmp_path):
    """`data.format: segmentation_csv`: the phantom's seed-002 CSV (binary pleural-effusion masks), split per
    patient, one target per volume prompted by the one name in `data.labels`."""
    from trainers.data.readers import read_segmentation_csv
    from trainers.recipes import load_recipe

    def recipe(**data):
        loaded = load_recipe("localization", tiny=True)
        loaded.data.format, loaded.data.labels, loaded.data.valid_split = (
            "segmentation_csv",
            ["pleural effusion"],
            "validation",
        )
        for key, value in data.items():
            setattr(loaded.data, key, value)
        loaded.optimization.max_steps = 2
        return loaded

    splits = read_segmentation_csv(cohort / "segmentation.csv")
    summary = train_from_recipe(recipe(), cohort, tmp_path / "csv", overrides={"use_cpu": True}, progress=False)
    assert summary["global_step"] == 2 and summary["eval_metrics"]["eval_loss"] > 0
    assert (summary["train_examples"], summary["eval_examples"]) == (len(splits["train"]), len(splits["validation"]))
    with pytest.raises(ValueError, match="one entry of data.labels"):
        train_from_recipe(recipe(labels=None), cohort, tmp_path / "none", progress=False)
    with pytest.raises(ValueError, match=r"split per patient into \['train', 'validation'\]; got split 'valid'"):
        train_from_recipe(recipe(valid_split="valid"), cohort / "segmentation.csv", tmp_path / "split", progress=False)


def test_report_generation_two_stages_tiny(cohort, tmp_path):
    """Stage 1 trains the projector alone and writes `mm_projector.safetensors`; stage 2 starts from it and trains
    LoRA on the language model plus the projector, saved as an adapter for the stage-1 model."""
    import dataclasses

    from peft import PeftModel

    from hf_models import ReCTForConditionalGeneration
    from trainers.recipes import load_recipe

    stage1_out = tmp_path / "stage1"
    summary = train_from_recipe(
        "report_stage1", cohort, stage1_out, tiny=True, overrides={"use_cpu": True}, progress=False
    )
    assert summary["task"] == "report_generation" and summary["global_step"] == 20
    assert summary["eval_metrics"]["eval_loss"] > 0
    stage1 = ReCTForConditionalGeneration.from_pretrained(stage1_out).eval()
    # The run seeds before it builds the model: rebuilt the same way, the frozen encoder and language model are
    # exactly as initialised and the projector has moved.
    from transformers import set_seed

    set_seed(load_recipe("report_stage1", tiny=True).optimization.seed)
    initial = ReCTForConditionalGeneration(stage1.config).state_dict()
    trained = stage1.state_dict()
    for name, tensor in trained.items():
        if name.startswith(("vision_model.", "language_model.")):
            torch.testing.assert_close(tensor, initial[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(trained[n], initial[n]) for n in trained if n.startswith("multi_modal_projector."))
    projector = load_file(stage1_out / "mm_projector.safetensors")
    assert set(projector) == {f"multi_modal_projector.{k}" for k in stage1.multi_modal_projector.state_dict()}
    assert {"processor_config.json", "tokenizer.json"} <= {p.name for p in stage1_out.iterdir()}

    recipe = load_recipe("report_stage2", tiny=True)
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, pretrained=str(stage1_out)))
    stage2_out = tmp_path / "stage2"
    summary = train_from_recipe(recipe, cohort, stage2_out, overrides={"use_cpu": True}, progress=False)
    assert summary["global_step"] == 20
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in stage2_out.iterdir()}
    adapted = PeftModel.from_pretrained(ReCTForConditionalGeneration.from_pretrained(stage1_out), stage2_out).eval()
    trained = {n for n, _ in adapted.named_parameters() if "lora_" in n}
    assert trained and all(".language_model." in n for n in trained)
    base = ReCTForConditionalGeneration.from_pretrained(stage1_out).eval()
    ids = torch.tensor([[101] + [stage1.config.image_token_id] * stage1.config.image_seq_length + [2054, 102]])
    pixels = torch.randn(1, 1, 8, 32, 32)
    with torch.no_grad():
        assert (
            adapted(input_ids=ids, pixel_values=pixels).logits - base(input_ids=ids, pixel_values=pixels).logits
        ).abs().max() > 0
    # Libra's layout beside the adapter: the projector (modules_to_save) alone, in the model's own names, which
    # load_stage2 and the converter's PEFT reader take; both ways of loading give the same model.
    from trainers.report_generation import NON_LORA_FILE, load_stage2

    non_lora = load_file(stage2_out / NON_LORA_FILE)
    assert set(non_lora) == {f"multi_modal_projector.{k}" for k in stage1.multi_modal_projector.state_dict()}
    adapter = load_file(stage2_out / "adapter_model.safetensors")
    for name, tensor in non_lora.items():
        assert torch.equal(tensor, adapter[f"base_model.model.{name}"]), name
    assert any(not torch.equal(t, projector[n]) for n, t in non_lora.items())  # stage 2 moved the projector
    reloaded = load_stage2(ReCTForConditionalGeneration.from_pretrained(stage1_out), stage2_out).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids, pixel_values=pixels).logits, adapted(input_ids=ids, pixel_values=pixels).logits
        )


def test_deepspeed_checkpoint_layout_is_checked(reference, tmp_path):
    """DeepSpeed keeps the optimizer state per rank in the folder its `latest` file names, not in `optimizer.pt`
    (a real 2-process ZeRO-2 checkpoint is resumed in tests/test_distributed.py, slow)."""
    folder = tmp_path / "checkpoint-24"
    shutil.copytree(reference / "checkpoint-24", folder)
    (folder / "global_step24").mkdir()
    (folder / "optimizer.pt").rename(folder / "global_step24" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert checkpoint_problem(folder) == "optimizer.pt is missing"
    (folder / "latest").write_text("global_step24")
    assert checkpoint_problem(folder) is None
    (folder / "latest").write_text("global_step20")
    assert "holds no DeepSpeed optimizer states" in checkpoint_problem(folder)
    (folder / "latest").write_text("global_step24")
    states = folder / "global_step24" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with open(states, "r+b") as handle:
        handle.truncate(states.stat().st_size - 10)
    assert "truncated" in checkpoint_problem(folder)


def test_lesion_supervised_classifier_logs_its_loss_terms(cohort, tmp_path):
    """`train_classifier` with the cohort's lesion masks: the per-token lesion term and the lesion map's join the
    classification loss (logged separately; their weighted sum is the logged loss); without lesion supervision there
    is one term."""
    import dataclasses

    from trainers.classification import ClassifierRecipe, train_classifier

    recipe = ClassifierRecipe(
        label_names=("Cardiomegaly", "Pleural effusion"),
        volume_size=(8, 32, 32),
        windows=("lung",),
        patch_size=(2, 8, 8),
        stem_channels=(),
        lesion_map_channels=(),
        hidden_size=32,
        num_hidden_layers=1,
        max_steps=6,
        batch_size=2,
        warmup_steps=1,
        logging_steps=3,
        eval_batch_size=4,
    )
    summary = train_classifier(cohort, tmp_path / "run", dataclasses.replace(recipe, lesion_supervision=0.5))
    assert summary["lesion_supervision_used"]
    terms = summary["loss_terms"]
    assert set(terms) == {"classification_loss", "lesion_token_loss"} and len(terms["lesion_token_loss"]) == 2
    for total, classification, lesion in zip(summary["loss_history"], *terms.values()):
        assert total == pytest.approx(classification + 0.5 * lesion, abs=2e-4)
    assert (
        train_classifier(cohort, tmp_path / "plain", dataclasses.replace(recipe, lesion_supervision=0.0))["loss_terms"]
        == {}
    )
    # The lesion-map decoder over a one-convolution stem, beside the token head: three terms.
    both = dataclasses.replace(recipe, lesion_supervision=0.5, stem_channels=(4,), lesion_map_channels=(4,))
    summary = train_classifier(cohort, tmp_path / "map", dataclasses.replace(both, lesion_map_supervision=2.0))
    terms = summary["loss_terms"]
    assert set(terms) == {"classification_loss", "lesion_map_loss", "lesion_token_loss"}
    for total, classification, lesion_map, lesion in zip(summary["loss_history"], *terms.values()):
        assert total == pytest.approx(classification + 2.0 * lesion_map + 0.5 * lesion, abs=2e-4)
    weights = load_file(tmp_path / "map" / "model" / "model.safetensors")
    assert any(k.startswith("lesion_map_decoder.") for k in weights)


def test_text_fields_choose_the_report_sections_and_their_order(cohort, tmp_path):
    """`data.text_fields` is joined in the order given (the impression first survives a short `max_length`); other
    fields are one error naming the key."""
    from trainers.data.readers import read_ct_rate
    from trainers.recipes import load_recipe
    from trainers.train import build_vision_pretrain

    row = read_ct_rate(cohort, "train", cot=False)[0]
    findings, impression = f"Findings: {row['findings']}", f"Impression: {row['impressions']}"
    recipe = load_recipe("vision_pretrain", tiny=True)
    for fields, expected in (
        (["Findings_EN", "Impressions_EN"], f"{findings} {impression}"),
        (["Impressions_EN", "Findings_EN"], f"{impression} {findings}"),
        (["Impressions_EN"], row["impressions"]),
    ):
        recipe.data.text_fields = fields
        parts = build_vision_pretrain(recipe, cohort, tmp_path / "cache", progress=False)
        assert parts.train_dataset[0]["text"] == expected, fields
    for fields in (["Technique_EN"], ["Findings_EN", "Findings_EN"]):
        recipe.data.text_fields = fields
        with pytest.raises(ValueError, match=r"data\.text_fields: expected Findings_EN, Impressions_EN or both"):
            build_vision_pretrain(recipe, cohort, tmp_path / "cache", progress=False)


def test_vision_pretrain_augments_the_training_split_without_swapping_sides(cohort, tmp_path):
    """`data.augmentation` perturbs the training volumes (never the evaluation ones) and moves their anatomy masks
    with them, but never mirrors left and right: the right lower lobe (id 4) stays on the patient's right (low W in
    the LPS+ layout) and the left lower lobe (id 6) on the left, draw after draw. Other tasks refuse the key."""
    from trainers.recipes import load_recipe
    from trainers.train import build_vision_pretrain

    recipe = load_recipe("vision_pretrain", tiny=True)
    plain = build_vision_pretrain(recipe, cohort, tmp_path / "cache", progress=False)
    recipe.data.augmentation = 2.0
    augmented = build_vision_pretrain(recipe, cohort, tmp_path / "cache", progress=False)
    assert torch.equal(augmented.eval_dataset[0]["pixel_values"], plain.eval_dataset[0]["pixel_values"])
    original = plain.train_dataset[0]
    width = torch.arange(original["anatomy_mask"].shape[-1], dtype=torch.float32)

    def centre(mask: torch.Tensor, region: int) -> float:
        return float((mask == region).float().sum(dim=(0, 1, 2)) @ width / (mask == region).sum())

    moved = 0
    for _ in range(12):
        example = augmented.train_dataset[0]
        assert example["text"] == original["text"]
        assert not torch.equal(example["pixel_values"], original["pixel_values"])
        moved += int(not torch.equal(example["anatomy_mask"], original["anatomy_mask"]))
        assert centre(example["anatomy_mask"], 4) < centre(example["anatomy_mask"], 6)
    assert centre(original["anatomy_mask"], 4) < centre(original["anatomy_mask"], 6)
    assert moved > 0  # rotations moved the mask with the volume

    recipe.data.augmentation = -1.0
    with pytest.raises(ValueError, match=r"data\.augmentation: expected a strength >= 0, found -1.0"):
        build_vision_pretrain(recipe, cohort, tmp_path / "cache", progress=False)
    classification = load_recipe("classification", tiny=True)
    classification.data.augmentation = 0.5
    with pytest.raises(ValueError, match=r"data\.augmentation: only the vision_pretrain task reads it"):
        train_from_recipe(classification, cohort, tmp_path / "classifier", progress=False)
