"""Clinical efficacy of generated reports: the 18 CT-RATE labels read from generated and reference texts, compared
with F1 (scikit-learn).

The labels come from the project's sentence-level, negation-aware extractor
(`trainers.data.phantom_reports.extract_labels`): a label is asserted when a sentence matches its keyword pattern
(`REPORT_KEYWORDS`) and holds no negation cue ("No pleural effusion." asserts nothing). It reads the phantom
cohort's wording exactly and other reports roughly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import f1_score, precision_score, recall_score

from ._validation import text_pairs


__all__ = ["clinical_efficacy_metrics", "follow_up_accuracy", "report_labels"]


def report_labels(texts: Sequence[str]) -> np.ndarray:
    """`(texts, 18)` 0/1 array of the CT-RATE labels each report asserts, columns in `CT_RATE_ABNORMALITIES` order."""
    from hf_models.configuration_rect import CT_RATE_ABNORMALITIES
    from trainers.data.phantom_reports import extract_labels

    rows = []
    for text in texts:
        labels = extract_labels(text)
        rows.append([labels[name] for name in CT_RATE_ABNORMALITIES])
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), len(CT_RATE_ABNORMALITIES))


def clinical_efficacy_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | int | None]:
    """Micro and macro F1 (and micro precision/recall) of the labels of generated vs reference reports.

    Returns:
        `clinical_f1_micro`, `clinical_precision_micro`, `clinical_recall_micro` (over all label decisions; 0 when
        no label is asserted anywhere), `clinical_f1_macro` (mean over labels asserted by a reference or a
        prediction; None if none is), `clinical_f1_defined_labels` (their count) and `clinical_f1/<label>`
        (None where undefined).

    Raises:
        ValueError: the two differ in length, are empty, or are not sequences of strings.
    """
    predictions, references = text_pairs(predictions, references)
    for name, texts in (("predictions", predictions), ("references", references)):
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"`{name}` must hold report texts (strings)")
    from hf_models.configuration_rect import CT_RATE_ABNORMALITIES

    predicted, target = report_labels(predictions), report_labels(references)
    per_label = f1_score(target, predicted, average=None, zero_division=np.nan)
    defined = [float(v) for v in per_label if not np.isnan(v)]
    result: dict[str, float | int | None] = {
        "clinical_f1_micro": float(f1_score(target, predicted, average="micro", zero_division=0.0)),
        "clinical_precision_micro": float(precision_score(target, predicted, average="micro", zero_division=0.0)),
        "clinical_recall_micro": float(recall_score(target, predicted, average="micro", zero_division=0.0)),
        "clinical_f1_macro": float(np.mean(defined)) if defined else None,
        "clinical_f1_defined_labels": len(defined),
    }
    for name, value in zip(CT_RATE_ABNORMALITIES, per_label):
        result[f"clinical_f1/{name}"] = None if np.isnan(value) else float(value)
    return result


def follow_up_accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | int | None]:
    """How often a generated follow-up report states the reference's change since the prior examination.

    Every (report, finding) pair whose reference sentence asserts the finding with a change word (new, increased,
    decreased, unchanged: `trainers.data.phantom_reports.extract_changes`) counts once; it is right when the
    generated report asserts the same finding with the same change.

    Returns:
        `follow_up_accuracy` (None when no reference states a change), `follow_up_statements` (the pairs counted),
        `follow_up_detected` (pairs whose finding the prediction asserts with any change word) and
        `follow_up_accuracy/<change>` per change word (None where the references never use it).

    Raises:
        ValueError: as `clinical_efficacy_metrics`.
    """
    predictions, references = text_pairs(predictions, references)
    for name, texts in (("predictions", predictions), ("references", references)):
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"`{name}` must hold report texts (strings)")
    from trainers.data.phantom_reports import CHANGE_WORDS, extract_changes

    right = {word: 0 for word in CHANGE_WORDS}
    total = {word: 0 for word in CHANGE_WORDS}
    detected = 0
    for prediction, reference in zip(predictions, references):
        stated = extract_changes(prediction)
        for finding, change in extract_changes(reference).items():
            total[change] += 1
            detected += finding in stated
            right[change] += stated.get(finding) == change
    count = sum(total.values())
    result: dict[str, float | int | None] = {
        "follow_up_accuracy": sum(right.values()) / count if count else None,
        "follow_up_statements": count,
        "follow_up_detected": detected,
    }
    for word in CHANGE_WORDS:
        result[f"follow_up_accuracy/{word}"] = right[word] / total[word] if total[word] else None
    return result
