"""Shared by the bench scripts that time one operation in a child process: median seconds and peak memory."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]


def timed_peak(operation: Callable[[], None], runs: int) -> dict:
    """One warm-up call of `operation`, then `runs` timed calls → `seconds` (median) and `peak_mib`: on CUDA
    `torch.cuda.max_memory_allocated`, on the CPU the growth of this process's peak resident memory (`ru_maxrss`)
    over what it held before the warm-up. `operation` synchronises CUDA itself."""
    import torch

    cuda = torch.cuda.is_available()
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    operation()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        operation()
        times.append(time.perf_counter() - start)
    if cuda:
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kib) / 1024
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    return {"seconds": statistics.median(times), "peak_mib": peak_mib, "device": device}


def run_child(script: str, spec: dict) -> dict:
    """`python script --child JSON` in a fresh process (so each peak is its own) → the JSON it printed last.

    Raises:
        RuntimeError: the child failed (its stderr's end is in the message).
    """
    proc = subprocess.run(
        [sys.executable, script, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(script).name} --child {json.dumps(spec)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
