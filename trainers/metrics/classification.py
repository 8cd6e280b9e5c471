"""Multi-label classification metrics (scikit-learn): AUROC, F1 and accuracy per label and macro.

Undefined values are `None`, never NaN or a made-up number: AUROC of a label whose targets hold one class, F1 of a
label with neither a positive target nor a positive prediction. Macro values average the defined labels only, and
the result says how many those were.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from ._validation import binary_array, finite_array, same_shape


__all__ = ["binary_auroc", "multilabel_auroc", "multilabel_classification_metrics"]


def binary_auroc(scores, targets) -> float | None:
    """Area under the ROC curve of one label (`sklearn.metrics.roc_auc_score`; ties count one half).

    Returns None when the targets hold a single class: AUROC is undefined there, and averaging a NaN or a
    made-up 0.5 would misstate the result.

    Raises:
        ValueError: `scores` holds NaN or inf, or `scores` and `targets` differ in size.
    """
    scores = finite_array(scores, "scores").ravel()
    targets = np.asarray(targets).ravel().astype(bool)
    same_shape(scores, targets, "scores", "targets")
    if targets.all() or not targets.any():
        return None
    return float(roc_auc_score(targets, scores))


def _label_names(label_names, count: int) -> list[str]:
    names = list(label_names) if label_names is not None else [str(i) for i in range(count)]
    if len(names) != count:
        raise ValueError(f"{len(names)} `label_names` for {count} labels")
    return names


def _two_d(scores, targets) -> tuple[np.ndarray, np.ndarray]:
    scores, targets = np.asarray(scores), np.asarray(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(
            f"expected `scores` and `targets` as (samples, labels) arrays of one shape, got {scores.shape} and "
            f"{targets.shape}"
        )
    return scores, targets


def multilabel_auroc(scores, targets, label_names: list[str] | None = None) -> dict[str, float | None]:
    """Per-label AUROC for `(samples, labels)` arrays plus `macro` (mean over labels where it is defined) and
    `defined_labels` (how many entered the mean). Labels with one class in `targets` map to None.

    Raises:
        ValueError: shapes differ or are not 2-D, `scores` holds NaN/inf, or `label_names` has the wrong length.
    """
    scores, targets = _two_d(scores, targets)
    names = _label_names(label_names, scores.shape[1])
    result: dict[str, float | None] = {name: binary_auroc(scores[:, i], targets[:, i]) for i, name in enumerate(names)}
    defined = [v for v in result.values() if v is not None]
    result["macro"] = float(np.mean(defined)) if defined else None
    result["defined_labels"] = len(defined)
    return result


def multilabel_classification_metrics(
    scores, targets, label_names: list[str] | None = None, threshold: float = 0.5
) -> dict[str, float | int | None]:
    """AUROC, F1 and accuracy of a multi-label classifier, per label and macro.

    Args:
        scores (`(samples, labels)` array): probabilities (or any score where higher means positive).
        targets (`(samples, labels)` array of 0/1): the reference labels.
        label_names: one name per label column (default: "0", "1", ...).
        threshold: a score `>= threshold` is a positive prediction (F1 and accuracy).

    Returns:
        A flat dict: `auroc/<name>`, `f1/<name>`, `accuracy/<name>` per label (AUROC or F1 None where
        undefined); `auroc_macro`, `f1_macro`, `accuracy_macro` (means over the defined labels, None if none is);
        `auroc_defined_labels`, `f1_defined_labels`; `f1_micro` (over all label decisions) and `exact_match`
        (share of samples with every label right).

    Raises:
        ValueError: shapes differ, `scores` holds NaN/inf, `targets` holds values other than 0/1, or
            `label_names` has the wrong length.
    """
    scores, targets = _two_d(scores, targets)
    scores = finite_array(scores, "scores")
    targets = binary_array(targets, "targets")
    names = _label_names(label_names, scores.shape[1])
    predictions = scores >= threshold
    auroc = multilabel_auroc(scores, targets, names)
    f1 = f1_score(targets, predictions, average=None, zero_division=np.nan)
    result: dict[str, float | int | None] = {}
    for i, name in enumerate(names):
        result[f"auroc/{name}"] = auroc[name]
        result[f"f1/{name}"] = None if np.isnan(f1[i]) else float(f1[i])
        result[f"accuracy/{name}"] = float(accuracy_score(targets[:, i], predictions[:, i]))
    defined_f1 = [v for v in f1 if not np.isnan(v)]
    result["auroc_macro"] = auroc["macro"]
    result["auroc_defined_labels"] = auroc["defined_labels"]
    result["f1_macro"] = float(np.mean(defined_f1)) if defined_f1 else None
    result["f1_defined_labels"] = len(defined_f1)
    result["f1_micro"] = float(f1_score(targets, predictions, average="micro", zero_division=0.0))
    result["accuracy_macro"] = float(np.mean([result[f"accuracy/{name}"] for name in names]))
    result["exact_match"] = float(accuracy_score(targets, predictions))
    return result
