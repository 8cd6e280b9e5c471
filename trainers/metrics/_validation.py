"""Input checks shared by the metric modules: every bad input raises `ValueError` naming the argument."""

from __future__ import annotations

import numpy as np


def finite_array(value, name: str, ndim: int | None = None) -> np.ndarray:
    """`value` as a float64 array; raises `ValueError` naming `name` on NaN/inf or a wrong number of axes."""
    array = np.asarray(value, dtype=np.float64)
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"`{name}` must have {ndim} axes, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` contains NaN or inf")
    return array


def binary_array(value, name: str) -> np.ndarray:
    """`value` as a bool array; raises `ValueError` naming `name` when it holds anything but 0/1 (or bools)."""
    array = np.asarray(value)
    if array.dtype != bool:
        numeric = np.asarray(array, dtype=np.float64)
        if not np.isin(numeric, (0.0, 1.0)).all():
            raise ValueError(f"`{name}` must hold only 0 and 1 (binary labels or masks)")
        array = numeric.astype(bool)
    return array


def same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"`{name_a}` {a.shape} and `{name_b}` {b.shape} must have the same shape")


def text_pairs(predictions, references) -> tuple[list, list]:
    """`predictions` and `references` as equal-length, non-empty lists (a bare string is refused for either)."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError("`predictions` and `references` must be sequences of texts, not a single string")
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references) or not predictions:
        raise ValueError(
            f"`predictions` ({len(predictions)}) and `references` ({len(references)}) must be equal-length and "
            "non-empty"
        )
    return predictions, references
