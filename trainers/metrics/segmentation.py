"""Binary segmentation metrics in millimetres (MONAI): Dice, IoU, HD95 and NSD (normalised surface Dice).

Distances use the voxel spacing, so HD95 is in mm and NSD counts surface points within `tolerance_mm` of the
other surface. MONAI is imported inside the functions (it is heavy and only these metrics need it).

Empty-mask policy (MONAI returns NaN or inf there; we never do):

- prediction and reference both empty: Dice, IoU and NSD 1 (a correct "nothing there"), HD95 0 mm;
- exactly one of them empty: Dice, IoU and NSD 0, HD95 the volume's diagonal `sqrt(sum(((n_i - 1) * spacing_i)^2))`
  mm, the largest distance two voxel centres of that grid can have: a finite worst case, so means stay finite.

The result counts the cases of each kind (`both_empty`, `one_empty`), so a mean can be read with its policy.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from ._validation import binary_array, same_shape


__all__ = ["mean_case_metrics", "segmentation_case_metrics", "segmentation_metrics"]


def _spacing(spacing, ndim: int, name: str = "spacing") -> tuple[float, ...]:
    values = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing, dtype=np.float64)))
    if len(values) == 1:
        values = values * ndim
    if len(values) != ndim or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"`{name}` must be {ndim} positive finite mm values (one per mask axis), got {spacing}")
    return values


def segmentation_case_metrics(
    prediction, target, spacing: Sequence[float] | float = 1.0, tolerance_mm: float = 1.0
) -> dict[str, float]:
    """Dice, IoU, HD95 (mm) and NSD of one binary mask pair, with the empty-mask policy of the module docstring.

    Args:
        prediction, target (2-D or 3-D arrays of 0/1 or bool): the masks, axes in the same order as `spacing`.
        spacing: voxel size in mm per mask axis (one number: isotropic).
        tolerance_mm: NSD counts surface points within this distance of the other surface.

    Returns:
        `{"dice", "iou", "hd95_mm", "nsd"}` as floats.

    Raises:
        ValueError: shapes differ, masks are not 2-D/3-D or hold values other than 0/1, `spacing` or
            `tolerance_mm` is not positive.
    """
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou, compute_surface_dice

    prediction, target = binary_array(prediction, "prediction"), binary_array(target, "target")
    same_shape(prediction, target, "prediction", "target")
    if prediction.ndim not in (2, 3):
        raise ValueError(f"`prediction` and `target` must be 2-D or 3-D masks, got shape {prediction.shape}")
    spacing = _spacing(spacing, prediction.ndim)
    if not (np.isfinite(tolerance_mm) and tolerance_mm > 0):
        raise ValueError(f"`tolerance_mm` must be positive, got {tolerance_mm}")
    if not prediction.any() and not target.any():
        return {"dice": 1.0, "iou": 1.0, "hd95_mm": 0.0, "nsd": 1.0}
    if not prediction.any() or not target.any():
        diagonal = float(np.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(prediction.shape, spacing))))
        return {"dice": 0.0, "iou": 0.0, "hd95_mm": diagonal, "nsd": 0.0}
    y_pred = torch.from_numpy(prediction)[None, None].float()  # (batch 1, channel 1, *spatial)
    y = torch.from_numpy(target)[None, None].float()
    with warnings.catch_warnings():  # MONAI 1.6 warns about an argument it passes to itself
        warnings.simplefilter("ignore", FutureWarning)
        return {
            "dice": float(compute_dice(y_pred, y, include_background=True, ignore_empty=False)),
            "iou": float(compute_iou(y_pred, y, include_background=True, ignore_empty=False)),
            "hd95_mm": float(
                compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=list(spacing))
            ),
            "nsd": float(
                compute_surface_dice(y_pred, y, [float(tolerance_mm)], include_background=True, spacing=list(spacing))
            ),
        }


def mean_case_metrics(scores: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, dict]]:
    """`{kind: {name: [segmentation_case_metrics(...), ...]}}` → `{kind: {name: {"dice", "hd95_mm", "cases"}}}`: the
    mean Dice and HD95 (mm) of each name's cases and their count, names sorted."""
    return {
        kind: {
            name: {
                "dice": float(np.mean([c["dice"] for c in cases])),
                "hd95_mm": float(np.mean([c["hd95_mm"] for c in cases])),
                "cases": len(cases),
            }
            for name, cases in sorted(per_name.items())
        }
        for kind, per_name in scores.items()
    }


def segmentation_metrics(predictions, targets, spacing=1.0, tolerance_mm: float = 1.0) -> dict[str, float | int]:
    """Mean Dice, IoU, HD95 (mm) and NSD over cases (see [`segmentation_case_metrics`] and the empty-mask policy).

    Args:
        predictions, targets: one mask each, or equal-length sequences of masks (cases may differ in shape).
        spacing: voxel size in mm per axis shared by all cases, or a `(cases, axes)` array: one row per case.
        tolerance_mm: NSD tolerance.

    Returns:
        `dice`, `iou`, `hd95_mm`, `nsd` (means over cases), `cases`, `both_empty`, `one_empty` (counts).

    Raises:
        ValueError: as [`segmentation_case_metrics`], or the sequences differ in length.
    """
    if isinstance(predictions, np.ndarray) and predictions.ndim in (2, 3):
        predictions, targets = [predictions], [targets]
    predictions, targets = list(predictions), list(targets)
    if len(predictions) != len(targets) or not predictions:
        raise ValueError(f"`predictions` ({len(predictions)}) and `targets` ({len(targets)}) must be equal, non-empty")
    spacing_array = np.asarray(spacing, dtype=np.float64)
    per_case = spacing_array.ndim == 2
    if spacing_array.ndim == 2 and len(spacing_array) != len(predictions):
        raise ValueError(f"`spacing` has {len(spacing_array)} entries for {len(predictions)} cases")
    cases = [
        segmentation_case_metrics(p, t, spacing_array[i] if per_case else spacing_array, tolerance_mm)
        for i, (p, t) in enumerate(zip(predictions, targets))
    ]
    empty = [(not np.any(p), not np.any(t)) for p, t in zip(predictions, targets)]
    result: dict[str, float | int] = {key: float(np.mean([c[key] for c in cases])) for key in cases[0]}
    result["cases"] = len(cases)
    result["both_empty"] = sum(a and b for a, b in empty)
    result["one_empty"] = sum(a != b for a, b in empty)
    return result
