"""`rect-vlm demo` end to end at a reduced size, as a user runs it (a subprocess in a temporary working folder), and
the rule that decides when a second run reuses the cohort it left behind."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainers.cli import UsageError
from trainers.demo import COHORT_STAMP, check_trainable, generator_fingerprint, prepare_cohort, stale_cohort_reason


REPO_ROOT = Path(__file__).resolve().parents[1]

#: The demo at a size that runs in seconds: 8 + 4 patients of 16×32×32 voxels, 3 training steps of 4 volumes, and
#: the report generator (SmolLM2) one step per stage, writing for 2 held-out scans.
#: Prevalence 0.5 gives every finding positive and negative training examples, which training requires.
SMALL = "--n-train 8 --n-val 4 --prevalence 0.5 --shape 16 32 32 --max-steps 3 --batch-size 4".split()
REPORT = "--report-steps 1 1 --report-scans 4".split()
#: The localizer one training step, writing masks for 2 held-out scans.
LOCALIZATION = "--localization-steps 1 --localization-scans 2".split()

#: A tqdm bar line (bars go to stderr and are expected there); anything else on stderr is a stray message.
TQDM_LINE = re.compile(r"^[^|]*\|[^|]*\|.*\[.*\]\s*$")


def run_demo_command(out: str | Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "trainers.cli", "demo", "--out", str(out), *SMALL, *extra],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def stray_stderr(proc: subprocess.CompletedProcess) -> list[str]:
    lines = [line.strip() for line in proc.stderr.replace("\r", "\n").splitlines()]
    return [line for line in lines if line and not TQDM_LINE.match(line)]


def test_demo_from_a_relative_out_with_spaces_then_reused_through_an_absolute_path(tmp_path):
    # First run: relative --out holding a space, from a working folder that is neither the repo nor --out.
    first = run_demo_command("demo out", tmp_path, *REPORT, *LOCALIZATION)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert stray_stderr(first) == [], "the demo printed warnings or other messages to stderr"
    out = tmp_path / "demo out"
    summary = json.loads((out / "demo_summary.json").read_text())

    model = out / "classifier" / "model"
    saved = {p.name for p in model.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_rect.py", "configuration_rect.py"} <= saved
    assert {"processor_config.json", "tokenizer.json"} <= saved
    assert Path(summary["paths"]["model"]) == model.resolve()
    assert summary["cohort"]["reused"] is False
    assert summary["fresh_process"]["max_abs_diff"] <= 1e-5
    assert summary["fresh_process"]["volumes"] >= 3
    assert set(summary["stage_seconds"]) == {
        "phantom cohort",
        "fine-tuning",
        "Hub folder",
        "fresh-process check",
        "Hub release (dry run)",
        "localization",
        "report generation",
    }
    assert "macro" in summary["valid_auroc"]
    # The trained model's held-out AUROC, recomputed from the fresh process's probabilities on the same volumes.
    trained, reloaded = summary["valid_auroc"], summary["fresh_process"]["valid_auroc"]
    assert {k: v for k, v in reloaded.items() if k in trained} == pytest.approx(
        {k: v for k, v in trained.items() if k in reloaded}, abs=1e-6
    )
    # The release stage: both repos staged, each loaded in a fresh process and run on a held-out scan.
    released = {r["repo_id"]: r for r in summary["release"]}
    assert set(released) == {"rect-vlm/ReCT-VisionEncoder", "rect-vlm/ReCT-Classifier"}
    assert all(r["max_abs_diff"] == 0 and r["scan"].endswith(".nii.gz") for r in released.values())
    assert released["rect-vlm/ReCT-Classifier"]["class"] == "ReCTForVolumeClassification"
    for repo in ("ReCT-VisionEncoder", "ReCT-Classifier"):
        staged = {p.name for p in (out / "hub" / "rect-vlm" / repo).iterdir()}
        assert {"README.md", "config.json", "model.safetensors", "manifest.json", "modeling_rect.py"} <= staged
    # The localization stage: the trained localizer's folder, and its masks of 2 held-out scans as NIfTI on each
    # scan's own grid (shape and affine of the scan), scored there against the phantom's masks.
    localized = summary["localization"]
    localizer = out / "localizer"
    assert {"config.json", "model.safetensors", "processor_config.json"} <= {p.name for p in localizer.iterdir()}
    assert (localizer / "vision_encoder" / "model.safetensors").is_file()
    masks = sorted((localizer / "predictions").rglob("*.nii.gz"))
    assert localized["scans"] == 2 and len(list((localizer / "predictions").iterdir())) == 2 and masks
    import nibabel as nib
    import numpy as np

    for mask in masks:
        scan = next((out / "cohort" / "dataset" / "valid").rglob(f"{mask.parent.name}.nii.gz"))
        written, original = nib.load(mask), nib.load(scan)
        assert written.shape == original.shape and np.allclose(written.affine, original.affine)
        assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}
    scored = localized["dice"]
    assert set(scored) == {"finding/text", "finding/box", "region/text"}
    assert set(scored["finding/text"]) == set(scored["finding/box"]) and len(masks) == sum(
        v["cases"] for v in scored["finding/text"].values()
    )
    assert all(0.0 <= v["dice"] <= 1.0 for per_name in scored.values() for v in per_name.values())
    assert "masks on each scan's own grid" in first.stdout
    # The report stage: both stages trained, the merged folder saved, and two held-out reports printed, one with
    # a prior scan (the 4 held-out patients of this cohort hold follow-ups: every demo patient has a second scan
    # with probability `p_prior`).
    reports = summary["report_generation"]
    generator = out / "report_generator"
    assert Path(reports["folder"]) == (generator / "model").resolve()
    assert {"config.json", "model.safetensors", "processor_config.json"} <= {
        p.name for p in (generator / "model").iterdir()
    }
    assert (generator / "mm_projector.safetensors").is_file() and (generator / "adapter").is_dir()
    # The classifier's head writes the findings it sees into the image tokens, in SmolLM2's words.
    config = json.loads((generator / "model" / "config.json").read_text())
    assert len(config["diagnosis_labels"]) == 18 and len(config["diagnosis_token_ids"]) == 18
    processor_config = json.loads((generator / "model" / "processor_config.json").read_text())
    assert processor_config["image_seq_length"] == config["image_seq_length"] > config["diagnosis_seq_length"]
    assert len(json.loads((generator / "reports.json").read_text())) == 4
    assert [e["has_prior"] for e in reports["examples"]] == [False, True]
    assert 0.0 <= reports["metrics"]["clinical_f1_macro_five"] <= 1.0 and "bleu_4" in reports["metrics"]
    for example in reports["examples"]:
        assert f"{example['id']} (" in first.stdout
    assert first.stdout.count("reference: ") == 2 and first.stdout.count("generated: ") == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"trained", "untrained"} and "auroc_macro" in metrics["trained"]
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "hub" / "rect-vlm" / "ReCT-Classifier" / "README.md")
    reported = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert reported["accuracy_macro"] == pytest.approx(metrics["trained"]["accuracy_macro"])
    for text in (
        "held-out AUROC",
        "max |p_fresh - p_here|",
        "Stage times (wall / CPU):",
        f"Everything is in {out.resolve()}",
    ):
        assert text in first.stdout

    cohort_files = {p: p.stat().st_mtime_ns for p in (out / "cohort").rglob("*") if p.is_file()}
    cache_files = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*") if p.is_file()}
    assert cache_files, "the demo cached no processed volumes"

    # Second run: the same folder by its absolute path, from another working folder → reuses cohort and cache.
    (tmp_path / "elsewhere").mkdir()
    second = run_demo_command(out.resolve(), tmp_path / "elsewhere", "--no-report", "--no-localization")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert stray_stderr(second) == []
    assert "reused:" in second.stdout and " 0 new" in second.stdout
    assert json.loads((out / "demo_summary.json").read_text())["cohort"]["reused"] is True
    assert {p: p.stat().st_mtime_ns for p in (out / "cohort").rglob("*") if p.is_file()} == cohort_files
    assert {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*") if p.is_file()} == cache_files


# ----------------------------------------------------------------------------------------------------------------
# When a cohort is reused
# ----------------------------------------------------------------------------------------------------------------

TINY = {"n_train": 2, "n_val": 1, "seed": 3, "shape": [8, 24, 24], "p_second_recon": 0.0}


@pytest.fixture
def stamped_cohort(tmp_path) -> Path:
    folder = tmp_path / "cohort"
    stamp = prepare_cohort(folder, dict(TINY), progress=False)
    assert stamp["reused"] is False and stamp["complete"] is True
    return folder


def test_same_parameters_reuse_the_cohort(stamped_cohort):
    assert stale_cohort_reason(stamped_cohort, dict(TINY), generator_fingerprint()) is None
    before = {p: p.stat().st_mtime_ns for p in stamped_cohort.rglob("*") if p.is_file()}
    assert prepare_cohort(stamped_cohort, dict(TINY), progress=False)["reused"] is True
    assert {p: p.stat().st_mtime_ns for p in stamped_cohort.rglob("*") if p.is_file()} == before


def test_other_parameters_regenerate_it(stamped_cohort):
    reason = stale_cohort_reason(stamped_cohort, {**TINY, "n_train": 3}, generator_fingerprint())
    assert reason == "it was made with other parameters (n_train 2 → 3)"
    stamp = prepare_cohort(stamped_cohort, {**TINY, "n_train": 3}, progress=False)
    assert stamp["reused"] is False and stamp["parameters"]["n_train"] == 3
    assert (stamped_cohort / "dataset" / "train" / "train_3").is_dir()


def test_another_generator_regenerates_it(stamped_cohort):
    assert (
        stale_cohort_reason(stamped_cohort, dict(TINY), "0" * 16) == "the phantom generator changed since it was made"
    )


def test_a_missing_volume_regenerates_it(stamped_cohort):
    next((stamped_cohort / "dataset" / "valid").rglob("*.nii.gz")).unlink()
    reason = stale_cohort_reason(stamped_cohort, dict(TINY), generator_fingerprint())
    assert reason.startswith("it is incomplete (")
    assert prepare_cohort(stamped_cohort, dict(TINY), progress=False)["reused"] is False
    assert stale_cohort_reason(stamped_cohort, dict(TINY), generator_fingerprint()) is None


def test_an_interrupted_generation_regenerates_it(stamped_cohort):
    stamp = json.loads((stamped_cohort / COHORT_STAMP).read_text())
    (stamped_cohort / COHORT_STAMP).write_text(json.dumps({**stamp, "complete": False}))
    reason = stale_cohort_reason(stamped_cohort, dict(TINY), generator_fingerprint())
    assert reason == "an earlier run stopped while generating it"


def test_a_folder_the_demo_did_not_write_is_left_alone(tmp_path):
    folder = tmp_path / "cohort"
    folder.mkdir()
    (folder / "my_scan.nii.gz").write_bytes(b"precious")
    with pytest.raises(UsageError, match=r"holds files that the demo did not write .*choose another --out"):
        prepare_cohort(folder, dict(TINY), progress=False)
    assert (folder / "my_scan.nii.gz").read_bytes() == b"precious"


def test_a_cohort_too_small_to_train_every_finding_is_a_usage_error():
    labels = [[0] * 18 for _ in range(3)]
    labels[0][2] = labels[1][2] = 1  # Cardiomegaly present in 2 of 3
    labels[0][9] = labels[1][9] = labels[2][9] = 1  # Lung nodule always present
    check_trainable(labels, ["Cardiomegaly"])
    with pytest.raises(UsageError) as err:
        check_trainable(labels, ["Cardiomegaly", "Emphysema", "Lung nodule"])
    assert str(err.value) == (
        "--n-train: the 3 training volumes cannot train every finding (never present: ['Emphysema']; always "
        "present: ['Lung nodule']); expected more patients (--n-train) or a prevalence nearer 0.5 (--prevalence)"
    )
