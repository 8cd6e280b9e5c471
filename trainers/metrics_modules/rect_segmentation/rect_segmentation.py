"""`evaluate` module: Dice, IoU, HD95 (mm) and NSD of 3-D binary masks; see `trainers.metrics.segmentation_metrics`
(and its empty-mask policy)."""

import datasets
import evaluate

from trainers.metrics import segmentation_metrics


_DESCRIPTION = "Dice, IoU, HD95 in mm and normalised surface Dice of binary 3-D masks (MONAI), with voxel spacing."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 3-D nested lists of 0/1): predicted masks, (depth, height, width) each.
    references (`list` of 3-D nested lists of 0/1): reference masks of the same shapes.
    spacing (`float` or 3 `float`s, default 1.0): voxel size in mm along (depth, height, width).
    tolerance_mm (`float`, default 1.0): NSD tolerance.
Returns:
    `dice`, `iou`, `hd95_mm`, `nsd` (means over cases), `cases`, `both_empty`, `one_empty`.
"""

_MASK = datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("uint8"))))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RectSegmentation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": _MASK, "references": _MASK}),
        )

    def _compute(self, predictions, references, spacing=1.0, tolerance_mm=1.0):
        return segmentation_metrics(predictions, references, spacing=spacing, tolerance_mm=tolerance_mm)
