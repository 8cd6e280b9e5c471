"""Evaluation metrics computed from arrays (no downloads: `evaluate.load` would fetch metric code from the Hub)."""

from __future__ import annotations

import numpy as np


def binary_auroc(scores: np.ndarray, targets: np.ndarray) -> float | None:
    """Area under the ROC curve of one label (Mann–Whitney U with tie-averaged ranks).

    Returns None when the targets hold a single class: AUROC is undefined there, and averaging a NaN or a
    made-up 0.5 would misstate the result.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    targets = np.asarray(targets).ravel().astype(bool)
    if scores.shape != targets.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must have the same shape")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    positives, negatives = int(targets.sum()), int((~targets).sum())
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    u = ranks[targets].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def multilabel_auroc(
    scores: np.ndarray, targets: np.ndarray, label_names: list[str] | None = None
) -> dict[str, float | None]:
    """Per-label AUROC for `(samples, labels)` arrays plus `macro` (mean over labels where it is defined) and
    `defined_labels` (how many entered the mean). Labels with one class in `targets` map to None."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"expected (samples, labels) arrays of one shape, got {scores.shape} and {targets.shape}")
    names = label_names or [str(i) for i in range(scores.shape[1])]
    if len(names) != scores.shape[1]:
        raise ValueError(f"{len(names)} label names for {scores.shape[1]} labels")
    result: dict[str, float | None] = {name: binary_auroc(scores[:, i], targets[:, i]) for i, name in enumerate(names)}
    defined = [v for v in result.values() if v is not None]
    result["macro"] = float(np.mean(defined)) if defined else None
    result["defined_labels"] = len(defined)
    return result
