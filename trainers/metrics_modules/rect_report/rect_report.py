"""`evaluate` module: report generation metrics, BLEU-1..4, ROUGE-L, CIDEr-D, METEOR (where nltk's WordNet data is
installed) and clinical-efficacy F1 over the 18 CT-RATE labels; see `trainers.metrics.text_overlap_metrics` and
`trainers.metrics.clinical_efficacy_metrics`."""

import datasets
import evaluate

from trainers.metrics import clinical_efficacy_metrics, text_overlap_metrics


_DESCRIPTION = "BLEU-1..4, ROUGE-L, CIDEr-D, METEOR and clinical-efficacy F1 of generated CT reports."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated reports.
    references (`list` of `str`): one reference report per prediction.
Returns:
    `bleu_1` .. `bleu_4`, `rouge_l`, `cider`, `meteor` (absent, with a logged warning, without WordNet data),
    `clinical_f1_micro`, `clinical_f1_macro`, `clinical_precision_micro`, `clinical_recall_micro`,
    `clinical_f1_defined_labels`, `clinical_f1/<label>`.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RectReport(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        result = text_overlap_metrics(predictions, references)
        result.update(clinical_efficacy_metrics(predictions, references))
        return result
