"""`evaluate` module: image→text and text→image Recall@K and MRR; see `trainers.metrics.retrieval_metrics`."""

import datasets
import evaluate

from trainers.metrics import retrieval_metrics


_DESCRIPTION = "Cross-modal retrieval Recall@1/5/10 and mean reciprocal rank, both directions, from similarities."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one row per image: its similarity to every text.
    references (`list` of `int`): the index of the text that matches each image (a permutation).
    ks (`list` of `int`, default [1, 5, 10]): the cut-offs.
Returns:
    `image_to_text/R@K`, `image_to_text/MRR`, `text_to_image/R@K`, `text_to_image/MRR`.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RectRetrieval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, ks=(1, 5, 10)):
        return retrieval_metrics(predictions, targets=references, ks=tuple(ks))
