"""`evaluate` module: multi-label AUROC, F1 and accuracy (per label and macro); see
`trainers.metrics.multilabel_classification_metrics`."""

import datasets
import evaluate

from trainers.metrics import multilabel_classification_metrics


_DESCRIPTION = "Multi-label AUROC, F1 and accuracy per label and macro (scikit-learn); undefined values are None."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): per-sample scores, one per label (probabilities).
    references (`list` of `list` of `int`): per-sample 0/1 labels.
    label_names (`list` of `str`, optional): one name per label.
    threshold (`float`, default 0.5): a score at or above it is a positive prediction.
Returns:
    `auroc/<label>`, `f1/<label>`, `accuracy/<label>`, `auroc_macro`, `f1_macro`, `accuracy_macro`, `f1_micro`,
    `exact_match`, `auroc_defined_labels`, `f1_defined_labels`.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RectMultilabel(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Sequence(datasets.Value("int32")),
                }
            ),
        )

    def _compute(self, predictions, references, label_names=None, threshold=0.5):
        return multilabel_classification_metrics(predictions, references, label_names, threshold=threshold)
