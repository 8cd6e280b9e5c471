"""`compute_metrics` factories for `transformers.Trainer`: each returns a function of an `EvalPrediction` that
returns a flat dict of floats (the Trainer logs it with an `eval_` prefix). Undefined values (an AUROC of a label
with one class in the evaluation set) are left out; the `*_defined_labels` counts say how many entered each mean.

The Trainer calls `compute_metrics` only when the evaluation set has labels: for the dual encoder's retrieval
metrics, which need none, give the dataset a label column and `TrainingArguments(label_names=[...])`, or call the
returned function with an `EvalPrediction` you build.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.special import expit

from .classification import multilabel_classification_metrics
from .clinical_efficacy import clinical_efficacy_metrics
from .retrieval import retrieval_metrics
from .segmentation import segmentation_metrics
from .text_overlap import text_overlap_metrics


__all__ = [
    "classification_compute_metrics",
    "report_compute_metrics",
    "retrieval_compute_metrics",
    "segmentation_compute_metrics",
]


def _floats(result: dict) -> dict[str, float]:
    return {key: float(value) for key, value in result.items() if value is not None}


def _first(predictions):
    return predictions[0] if isinstance(predictions, (tuple, list)) else predictions


def classification_compute_metrics(
    label_names: Sequence[str] | None = None, threshold: float = 0.5
) -> Callable[..., dict[str, float]]:
    """Multi-label AUROC/F1/accuracy from classifier logits (`predictions`, `(samples, labels)`, passed through a
    sigmoid) and 0/1 `label_ids`; `threshold` applies to the probabilities. See
    [`multilabel_classification_metrics`]. `samples` is how many were scored (after a multi-process evaluation:
    the evaluation set's size, each sample counted once)."""
    names = list(label_names) if label_names is not None else None

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = np.asarray(_first(eval_prediction.predictions), dtype=np.float64)
        targets = eval_prediction.label_ids
        metrics = multilabel_classification_metrics(expit(logits), targets, names, threshold=threshold)
        return _floats({**metrics, "samples": len(logits)})

    return compute_metrics


def retrieval_compute_metrics(
    image_embeds_index: int = 3, text_embeds_index: int = 2, ks: Sequence[int] = (1, 5, 10)
) -> Callable[..., dict[str, float]]:
    """Recall@K and MRR over the whole evaluation set from the embeddings the model returns: the Trainer gathers
    `ReCTOutput` without its loss as a tuple, where `text_embeds` is item 2 and `image_embeds` item 3 (per-batch
    `logits_per_image` would only hold each batch's own pairs). Image i matches text i. See [`retrieval_metrics`]."""

    def compute_metrics(eval_prediction) -> dict[str, float]:
        predictions = eval_prediction.predictions
        image = np.asarray(predictions[image_embeds_index], dtype=np.float64)
        text = np.asarray(predictions[text_embeds_index], dtype=np.float64)
        return _floats(retrieval_metrics(image @ text.T, ks=ks))

    return compute_metrics


def segmentation_compute_metrics(
    spacing: Sequence[float] | float, tolerance_mm: float = 1.0
) -> Callable[..., dict[str, float]]:
    """Dice/IoU/HD95/NSD from mask logits (`predictions`, `(batch, [1,] *spatial)`; positive where the logit is
    above 0, i.e. probability above 0.5) and 0/1 masks (`label_ids`, same layout). `spacing` is the voxel size in mm
    per spatial axis of the evaluated masks. See [`segmentation_metrics`] for the empty-mask policy."""

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = np.asarray(_first(eval_prediction.predictions))
        masks = np.asarray(eval_prediction.label_ids)
        if logits.ndim == masks.ndim + 1 and logits.shape[1] == 1:
            logits = logits[:, 0]
        if masks.ndim == logits.ndim + 1 and masks.shape[1] == 1:
            masks = masks[:, 0]
        return _floats(segmentation_metrics(list(logits > 0), list(masks), spacing, tolerance_mm))

    return compute_metrics


def report_compute_metrics(tokenizer) -> Callable[..., dict[str, float]]:
    """Text-overlap and clinical-efficacy metrics of generated reports: `predictions` are generated token ids
    (`Seq2SeqTrainingArguments(predict_with_generate=True)`), `label_ids` the reference ids with -100 where
    ignored; both are decoded with `tokenizer`. See [`text_overlap_metrics`] and [`clinical_efficacy_metrics`]."""

    def decode(ids) -> list[str]:
        ids = np.asarray(ids)
        ids = np.where(ids < 0, tokenizer.pad_token_id, ids)
        return tokenizer.batch_decode(ids, skip_special_tokens=True)

    def compute_metrics(eval_prediction) -> dict[str, float]:
        predictions = decode(_first(eval_prediction.predictions))
        references = decode(eval_prediction.label_ids)
        result = text_overlap_metrics(predictions, references)
        result.update(clinical_efficacy_metrics(predictions, references))
        return _floats(result)

    return compute_metrics
