"""Evaluation metrics of the project's tasks, computed with maintained libraries (scikit-learn, SciPy, MONAI, nltk,
rouge-score, pycocoevalcap); only the report label extractor is ours.

Three ways to use them:

- functions of arrays or texts: [`multilabel_classification_metrics`], [`retrieval_metrics`],
  [`segmentation_metrics`], [`text_overlap_metrics`], [`clinical_efficacy_metrics`];
- `Trainer(compute_metrics=...)` factories: [`classification_compute_metrics`] and its siblings;
- `evaluate` modules, loaded offline from this package's folder:
  `evaluate.load(metric_module_path("rect_multilabel"))` (also `rect_retrieval`, `rect_segmentation`,
  `rect_report`). `evaluate.load("bleu")` would fetch code from the Hub instead.
"""

from __future__ import annotations

from pathlib import Path

from .classification import binary_auroc, multilabel_auroc, multilabel_classification_metrics
from .clinical_efficacy import clinical_efficacy_metrics, follow_up_accuracy, report_labels
from .compute_metrics import (
    classification_compute_metrics,
    report_compute_metrics,
    retrieval_compute_metrics,
    segmentation_compute_metrics,
)
from .retrieval import retrieval_metrics, retrieval_ranks
from .segmentation import segmentation_case_metrics, segmentation_metrics
from .text_overlap import bleu, cider, meteor, meteor_available, rouge_l, text_overlap_metrics


__all__ = [
    "METRIC_MODULES",
    "binary_auroc",
    "bleu",
    "cider",
    "classification_compute_metrics",
    "clinical_efficacy_metrics",
    "follow_up_accuracy",
    "meteor",
    "meteor_available",
    "metric_module_path",
    "multilabel_auroc",
    "multilabel_classification_metrics",
    "report_compute_metrics",
    "report_labels",
    "retrieval_compute_metrics",
    "retrieval_metrics",
    "retrieval_ranks",
    "rouge_l",
    "segmentation_case_metrics",
    "segmentation_compute_metrics",
    "segmentation_metrics",
    "text_overlap_metrics",
]

#: The `evaluate` modules in `trainers/metrics_modules/`.
METRIC_MODULES = ("rect_multilabel", "rect_retrieval", "rect_segmentation", "rect_report")


def metric_module_path(name: str) -> str:
    """Absolute folder of one of our `evaluate` modules, for `evaluate.load(path)` (works offline).

    Raises:
        ValueError: `name` is not one of `METRIC_MODULES`.
    """
    if name not in METRIC_MODULES:
        raise ValueError(f"`name` must be one of {METRIC_MODULES}, got {name!r}")
    return str(Path(__file__).resolve().parents[1] / "metrics_modules" / name)
