"""`rect-vlm` as a user meets it: a mistake prints one line naming the argument or path, exit code 2, no traceback
unless `--debug`; the import-time bitsandbytes warning does not reach the output."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainers.cli import silence_optional_kernel_probe


REPO_ROOT = Path(__file__).resolve().parents[1]


def rect_vlm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the console script's entry point in a fresh process, as `rect-vlm ARGS` would."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "trainers.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def assert_one_line_usage_error(proc: subprocess.CompletedProcess, *expected: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--n-train", "abc"], ["--n-train", "expected an integer >= 0", "'abc'"]),
        (["--n-val", "-1"], ["--n-val", "expected an integer >= 0"]),
        (["--shape", "2", "64", "64"], ["--shape", "expected an integer >= 4", "'2'"]),
        (["--p-prior", "1.5"], ["--p-prior", "expected a number in [0, 1]"]),
    ],
)
def test_bad_argument_value_is_one_line(tmp_path, args, expected):
    proc = rect_vlm("synth", "--out", str(tmp_path / "cohort"), *args, cwd=tmp_path)
    assert_one_line_usage_error(proc, "rect-vlm synth: error: argument", *expected)
    assert not (tmp_path / "cohort").exists()


def test_missing_required_argument_and_unknown_command(tmp_path):
    assert_one_line_usage_error(rect_vlm("synth", cwd=tmp_path), "--out", "required")
    assert_one_line_usage_error(rect_vlm("trian", cwd=tmp_path), "invalid choice: 'trian'", "demo")
    assert_one_line_usage_error(rect_vlm("demo", "--max-steps", "0", cwd=tmp_path), "--max-steps", ">= 1")


@pytest.mark.parametrize("command", ["synth", "demo"])
def test_unwritable_out_is_one_line(tmp_path, command):
    proc = rect_vlm(command, "--out", "/proc/x", cwd=tmp_path)
    assert_one_line_usage_error(proc, f"rect-vlm {command}: error: --out '/proc/x': cannot write there")


def test_out_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    proc = rect_vlm("synth", "--out", "taken", cwd=tmp_path)
    assert_one_line_usage_error(proc, "--out 'taken': is a file; expected a folder")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: None, "no such folder"),
        (lambda p: p.mkdir(), "folder is empty"),
        (lambda p: (p.mkdir(), (p / "notes.txt").write_text("x")), "has no dataset/ folder"),
    ],
)
def test_bad_cohort_folder_is_one_line(tmp_path, make, expected):
    cohort = tmp_path / "my cohort"
    make(cohort)
    proc = rect_vlm("train-classifier", "--cohort", str(cohort), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert_one_line_usage_error(proc, f"--cohort {str(cohort)!r}: {expected}", "rect-vlm synth --out DIR")


def test_malformed_cohort_is_one_line(tmp_path):
    """A cohort folder that passes the quick checks but lacks its CSVs: the reader's error, as one line."""
    (tmp_path / "cohort" / "dataset").mkdir(parents=True)
    proc = rect_vlm("train-classifier", "--cohort", "cohort", "--out", "run", cwd=tmp_path)
    assert_one_line_usage_error(proc, "train_reports.csv: CSV file not found")


def test_unknown_label_is_one_line(tmp_path):
    (tmp_path / "cohort" / "dataset").mkdir(parents=True)
    proc = rect_vlm(
        "train-classifier", "--cohort", "cohort", "--out", "run", "--labels", "Cardiomegaly", "Pneumonia", cwd=tmp_path
    )
    assert_one_line_usage_error(proc, "--labels: unknown label name(s) ['Pneumonia']")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, where):
    args = ["train-classifier", "--cohort", "/nonexistent", "--out", str(tmp_path / "run")]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    proc = rect_vlm(*args, cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "UsageError: --cohort '/nonexistent': no such folder" in proc.stderr


def test_kernel_probe_warning_is_dropped_and_nothing_else():
    silence_optional_kernel_probe()
    silence_optional_kernel_probe()  # idempotent: one filter, not two
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    probe = logger.makeRecord(
        logger.name, logging.WARNING, __file__, 1, "Failed to load CPU gemm_4bit_forward from kernels-community: %s",
        ("No module named 'kernels'",), None,
    )  # fmt: skip
    other = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "some other problem", (), None)
    assert not logger.filter(probe)
    assert logger.filter(other)


def test_importing_the_trainer_after_the_filter_is_quiet(tmp_path):
    """The real import chain (Trainer → peft → bitsandbytes) prints nothing once the filter is installed. (On a CPU
    without AVX512-BF16 bitsandbytes never probes, and this passes either way.)"""
    code = "from trainers.cli import silence_optional_kernel_probe as s; s(); from transformers import Trainer"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
