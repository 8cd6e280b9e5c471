# Copyright 2025 The ReCT-VLM authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
"""Voxel-grid geometry of CT volumes, and the per-volume record that lets predictions go back to the scan.

Data flow (one way): (array, affine) → plans (reorient, resample, crop/pad) → arrays on the model grid; the plans
are recorded in a `VolumeMetadata`, and each plan has an inverse that takes model-grid masks back.

Hub code: imports only the standard library and numpy.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import numpy as np


__all__ = ["VolumeMetadata"]


@dataclass(eq=False)
class VolumeMetadata(Mapping):
    """Where one processed volume came from and how it reached the model grid.

    A typed record that also reads like the dict it replaces (as transformers' `VideoMetadata`): `meta["steps"]`,
    `meta.get("source")`, `meta.keys()`, `dict(meta)` all work, and `meta == a_dict` compares `to_dict()` with it.
    `to_dict()` returns plain JSON types (a cache can `json.dumps` it) and `VolumeMetadata.from_dict(d)` rebuilds it.

    Coordinates: affines are 4x4 voxel-index → RAS+ mm matrices (nibabel's convention), as nested lists.

    Attributes:
        source: the file or folder read, or None for in-memory inputs.
        original_shape: `[X, Y, Z]` voxels of the scan's grid in its own axis order (what masks map back to and
            `save_mask` writes). For a scan regridded at read time (see `regridding`) this is the regridded grid.
        original_affine: that grid's affine.
        original_spacing: `[sx, sy, sz]` mm, the column norms of `original_affine`.
        processed_shape: `[D, H, W]` voxels of the model grid.
        processed_affine: the model grid's affine (exact: it follows every step below).
        orientation: ITK-style name of the model grid's voxel orientation (`"LPS"`).
        rescale_slope, rescale_intercept: HU = slope * stored value + intercept, as applied.
        steps: the geometric steps from the original grid to the model grid, in order, each a dict with `"op"`
            (`"reorient"`, `"resample"`, `"crop_pad"`) and the numbers that define it and its inverse.
        regridding: resampling applied when reading, before `original_*` (a gantry-tilted series put onto an
            orthogonal grid, variable slice spacing made equidistant), each a dict with `"op"` and the raw grid.
            Empty for ordinary scans. Not undone: a NIfTI cannot hold the raw grid.
        warnings: what the processor said about this volume (also issued as Python warnings).
    """

    original_shape: list[int]
    original_affine: list[list[float]]
    original_spacing: list[float]
    processed_shape: list[int]
    processed_affine: list[list[float]]
    source: str | None = None
    orientation: str = "LPS"
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    steps: list[dict[str, Any]] = field(default_factory=list)
    regridding: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    # ---- Mapping protocol (so code written against the old dict keeps working) ------------------------------

    def __iter__(self):
        return (f.name for f in fields(self))

    def __len__(self) -> int:
        return len(fields(self))

    def __getitem__(self, key: str) -> Any:
        if key not in self._field_names():
            raise KeyError(key)
        return getattr(self, key)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, VolumeMetadata):
            return self.to_dict() == other.to_dict()
        if isinstance(other, Mapping):
            return self.to_dict() == dict(other)
        return NotImplemented

    __hash__ = None  # mutable record

    @classmethod
    def _field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    # ---- serialisation ------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (lists, dicts, str, float, int, bool, None), deep-copied: safe to mutate or dump."""
        return {name: _plain(copy.deepcopy(getattr(self, name))) for name in self._field_names()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VolumeMetadata:
        """Rebuild a record from `to_dict()` output (or a `VolumeMetadata`).

        Raises:
            TypeError: `data` is not a mapping.
            ValueError: a required key is missing or an unknown key is present (the message names them).
        """
        if isinstance(data, VolumeMetadata):
            return cls(**data.to_dict())
        if not isinstance(data, Mapping):
            raise TypeError(f"VolumeMetadata.from_dict: expected a mapping, found {type(data).__name__}")
        names = cls._field_names()
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"VolumeMetadata.from_dict: unknown key(s) {unknown}; expected keys from {list(names)}")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"VolumeMetadata.from_dict: missing required key(s) {missing}")
        return cls(**copy.deepcopy(dict(data)))

    @classmethod
    def coerce(cls, meta: Any, label: str = "volume_meta") -> VolumeMetadata:
        """A `VolumeMetadata` from itself or its dict form; ValueError naming `label` otherwise."""
        if isinstance(meta, VolumeMetadata):
            return meta
        if isinstance(meta, Mapping):
            try:
                return cls.from_dict(meta)
            except ValueError as err:
                raise ValueError(f"{label}: expected the record returned by the processor; {err}") from err
        raise ValueError(f"{label}: expected a VolumeMetadata or its dict, found {type(meta).__name__}")


def _plain(value: Any) -> Any:
    """Tuples → lists, numpy scalars → Python numbers, recursively (JSON types only)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
