# Copyright 2025 The ReCT-VLM authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
"""Voxel-grid geometry of CT volumes, and the per-volume record that lets predictions go back to the scan.

Data flow (one way): (stored array, affine) → [read-time regridding: an unevenly spaced DICOM series onto an
equidistant grid, a gantry-tilted (sheared) grid onto an orthogonal one] → the scan's grid → plans (reorient,
resample, crop/pad) → arrays on the model grid. The plans are recorded as plain dicts in a `VolumeMetadata`, and each
has an inverse (as MONAI's `Orientation.inverse`) that `to_original_grid` applies in reverse order to take model-grid
masks or logits back to the scan's grid. Masks that come with their own affine are matched to the scan's grid here
(`mask_grid_correspondence`).

Conventions: affines are 4x4 voxel-index → RAS+ mm (nibabel). The canonical model-grid layout is LPS+ voxel
orientation as `(D, H, W)` = (inferior→superior, anterior→posterior, patient right→left), nibabel axis codes
`("S", "P", "L")`. Resampling is voxel-centre aligned (`align_corners=False`). Images are interpolated linearly
(separably, one 1D pass per axis that changes), masks by nearest neighbour (never interpolating label ids).

Hub code: imports only the standard library and numpy.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import numpy as np


__all__ = [
    "VolumeMetadata",
    "CANONICAL_ORIENTATION",
    "ModelGridPlan",
    "plan_model_grid",
    "to_original_grid",
    "EvenSlices",
    "plan_even_slices",
    "Deshear",
    "plan_deshear",
    "mask_grid_correspondence",
    "apply_linear",
    "apply_nearest",
]

#: ITK-style name of the canonical voxel orientation of processed volumes.
CANONICAL_ORIENTATION = "LPS"

# For each processed array axis (D, H, W): the RAS world axis it runs along and the sign of its direction.
# D: inferior→superior = +z, H: anterior→posterior = -y, W: patient right→left = -x.
_CANONICAL_AXES = ((2, 1), (1, -1), (0, -1))

#: Largest |cosine| between voxel axes still called orthogonal (float32 NIfTI affines reach ~1e-7; 1e-4 is a
#: 0.006 degree tilt, i.e. 0.05 mm over a 500 mm field of view).
SHEAR_TOLERANCE = 1e-4


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


# ----------------------------------------------------------------------------------------------------------------
# 1D index maps (taps) and separable resampling
# ----------------------------------------------------------------------------------------------------------------


def linear_taps(in_len: int, out_len: int, start: int, stop: int, flip: bool):
    """1D linear-interpolation taps for output indices [start, stop) of an in_len → out_len resize.

    Identical to `torch.nn.functional.interpolate(mode="linear", align_corners=False)`. Returns (i0, i1, w) with
    out = (1 - w) * x[i0] + w * x[i1] (indices into the unflipped input axis), or None when the map is the identity.
    """
    n = np.arange(start, stop, dtype=np.float64)
    position = np.maximum((n + 0.5) * (in_len / out_len) - 0.5, 0.0)
    i0 = np.minimum(np.floor(position).astype(np.int64), in_len - 1)
    i1 = np.minimum(i0 + 1, in_len - 1)
    weight = (position - i0).astype(np.float32)
    weight[i0 == i1] = 0.0
    if flip:
        i0, i1 = in_len - 1 - i0, in_len - 1 - i1
    if not flip and stop - start == in_len and not weight.any() and np.array_equal(i0, np.arange(in_len)):
        return None
    return i0, i1, weight


def nearest_taps(in_len: int, out_len: int, start: int, stop: int, flip: bool):
    """1D nearest-neighbour indices for output indices [start, stop) of an in_len → out_len resize.

    Voxel-centre aligned like `interpolate(mode="nearest-exact")`, computed in exact integer arithmetic:
    index = floor((n + 0.5) * in_len / out_len). Returns None when the map is the identity.
    """
    n = np.arange(start, stop, dtype=np.int64)
    index = np.minimum(((2 * n + 1) * in_len) // (2 * out_len), in_len - 1)
    if flip:
        index = in_len - 1 - index
    if stop - start == in_len and np.array_equal(index, np.arange(in_len)):
        return None
    return index


def linear_order(shape: tuple[int, ...], taps: list) -> list[int]:
    """Axes to resample, most-reduced first: the data shrinks as early as possible and little is ever float32."""
    return sorted((k for k in range(len(shape)) if taps[k] is not None), key=lambda k: len(taps[k][0]) / shape[k])


def apply_linear(source: np.ndarray, taps: list, order: list[int] | None = None) -> np.ndarray:
    """Separable linear resampling (one 1D pass per axis in `order`) to float32.

    Trilinear interpolation is separable, so this equals `F.interpolate(mode="trilinear", align_corners=False)`,
    but it gathers straight from the stored dtype (e.g. int16), so most of the volume is never converted to float.
    numpy, not torch: the gathers are memory-bound copies, and single-threaded numpy stays fast where torch's thread
    pool stalls on a busy machine (DataLoader workers, several jobs per node). Passing the `order` of the whole
    volume makes a slab-by-slab run give bit-identical results.
    """
    x = source
    for k in linear_order(source.shape, taps) if order is None else order:
        if taps[k] is None:
            continue
        i0, i1, weight = taps[k]
        if not weight.any():
            x = _gather(x, i0, k)  # a flip or a crop is a view: nothing copied
            continue
        shape = [1] * x.ndim
        shape[k] = -1
        weight = weight.reshape(shape)
        low, high = np.take(x, i0, axis=k), np.take(x, i1, axis=k)  # new arrays: safe to update in place
        # (1 - w) * low + w * high, as F.interpolate computes it; the ufuncs cast int16 → float32 on the fly
        result = np.multiply(low, 1.0 - weight, dtype=np.float32)
        if high.dtype == np.float32:
            high *= weight
        else:
            high = np.multiply(high, weight, dtype=np.float32)
        result += high
        x = result
    return x if x.dtype == np.float32 else x.astype(np.float32)


def apply_nearest(source: np.ndarray, taps: list) -> np.ndarray:
    """Nearest-neighbour gathers, one per axis whose taps are not None; keeps the dtype."""
    x = source
    for k in sorted(
        (k for k in range(source.ndim) if taps[k] is not None), key=lambda k: len(taps[k]) / source.shape[k]
    ):
        x = _gather(x, taps[k], k)
    return x


def _gather(x: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    """`np.take(x, index, axis)`, as a view when `index` is a run of consecutive indices (a crop, a flip)."""
    step = int(index[1] - index[0]) if len(index) > 1 else 1
    if step in (1, -1) and np.array_equal(index, index[0] + step * np.arange(len(index))):
        stop = int(index[-1]) + step
        where = [slice(None)] * x.ndim
        where[axis] = slice(int(index[0]), None if stop < 0 else stop, step)
        return x[tuple(where)]
    return np.take(x, index, axis=axis)


def chunk_linear_taps(taps, start: int, stop: int) -> tuple[int, int, Any]:
    """The part of one axis's linear taps that produces outputs [start, stop) of that axis's region.

    Returns `(lo, hi, taps)`: the input indices `[lo, hi)` those outputs read, and the taps shifted to index the
    slab `x[lo:hi]`. For identity taps (None) the slab is `[start, stop)` itself.
    """
    if taps is None:
        return start, stop, None
    i0, i1, weight = (t[start:stop] for t in taps)
    lo = int(min(i0.min(), i1.min()))
    hi = int(max(i0.max(), i1.max())) + 1
    return lo, hi, (i0 - lo, i1 - lo, weight)


# ----------------------------------------------------------------------------------------------------------------
# The scan's grid → the model grid: reorient, resample, crop/pad
# ----------------------------------------------------------------------------------------------------------------


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing in mm: the column norms of the affine's 3x3 part."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def axis_directions(affine: np.ndarray) -> tuple[list[int], list[int]]:
    """For each voxel axis: the RAS world axis it runs closest to, and the sign (+1/-1) along that axis."""
    columns = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    weights = np.abs(columns)
    world, sign = [-1] * 3, [1] * 3
    for _ in range(3):  # greedy on the largest remaining cosine: one world axis per voxel axis, even if oblique
        w, j = np.unravel_index(int(np.argmax(weights)), weights.shape)
        world[j], sign[j] = int(w), (1 if columns[w, j] >= 0 else -1)
        weights[w, :] = -1.0
        weights[:, j] = -1.0
    return world, sign


def reorientation(shape: tuple[int, ...], affine: np.ndarray) -> tuple[list[int], list[bool], np.ndarray]:
    """Permutation and flips taking the input voxel axes to the canonical (D, H, W) layout, and the new affine.

    Canonical axis `k` is input axis `permutation[k]`, reversed when `flip[k]`. For oblique scans the closest axes
    are chosen; the affine stays exact and nothing is resampled for it.
    """
    world, sign = axis_directions(affine)
    permutation, flip = [], []
    transform = np.zeros((4, 4))
    transform[3, 3] = 1.0
    for k, (target_axis, target_sign) in enumerate(_CANONICAL_AXES):
        j = world.index(target_axis)
        permutation.append(j)
        flip.append(sign[j] != target_sign)
        # input index along axis j = n_k, or (shape_j - 1 - n_k) when flipped
        transform[j, k] = -1.0 if flip[-1] else 1.0
        transform[j, 3] = shape[j] - 1 if flip[-1] else 0.0
    return permutation, flip, affine @ transform


def resize_affine(affine: np.ndarray, shape_before: list[int], shape_after: list[int]) -> np.ndarray:
    """Affine of a voxel-centre aligned resize: new index n samples old continuous index (n + 0.5) * s - 0.5."""
    transform = np.eye(4)
    for k in range(3):
        scale = shape_before[k] / shape_after[k]
        transform[k, k] = scale
        transform[k, 3] = 0.5 * scale - 0.5
    return affine @ transform


def crop_pad_amounts(current: list[int], target: list[int]) -> tuple[list[int], list[int]]:
    """Centre crop/pad: signed amounts added before/after each axis (negative = cropped)."""
    before, after = [], []
    for have, want in zip(current, target):
        diff = want - have
        b = diff // 2 if diff >= 0 else -((-diff) // 2)
        before.append(b)
        after.append(diff - b)
    return before, after


@dataclass
class ModelGridPlan:
    """How one scan reaches the model grid.

    Attributes:
        permutation: canonical axis k is stored axis `permutation[k]` (apply as `array.transpose(permutation)`; the
            flips are folded into the taps).
        regions: per canonical axis, the `[start, stop)` of the output that holds resampled data (the rest is
            padding).
        linear, nearest: per canonical axis, the image (linear) and mask (nearest) taps that fill `regions` from the
            transposed stored array (None: identity).
        linear_axes: the order of the linear passes (fixed for the whole volume, so slabs give identical results).
        steps: the recorded steps (`reorient`, `resample`, `crop_pad`) as plain dicts for `VolumeMetadata.steps`.
        affine: the model grid's voxel → RAS+ mm affine.
    """

    permutation: list[int]
    regions: list[tuple[int, int]]
    linear: list
    nearest: list
    linear_axes: list[int]
    steps: list[dict[str, Any]]
    affine: np.ndarray


def plan_model_grid(
    shape: tuple[int, ...],
    affine: np.ndarray,
    volume_size: list[int],
    target_spacing: list[float] | None,
    resize_mode: str,
    pad_value_hu: float,
) -> ModelGridPlan:
    """Plan reorientation to LPS `(D, H, W)`, resampling and centre crop/pad of a `shape` scan with `affine`.

    Resampled size: `volume_size` for `resize_mode="resize"`; with `target_spacing`, per canonical axis
    `max(1, round(n * spacing / target))`, so the achieved spacing `n * spacing / size` (recorded as the resample
    step's `spacing_after`, and exact in the returned affine) is the target rounded to keep a whole number of
    voxels across the same field of view; otherwise the reoriented size (crop/pad only).
    """
    permutation, flip, affine_r = reorientation(shape, affine)
    shape_r = [int(shape[j]) for j in permutation]
    spacing_r = spacing_of(affine_r)
    target = list(volume_size)
    if resize_mode == "resize":
        resampled = list(target)
    elif target_spacing is not None:
        resampled = [max(1, int(round(shape_r[k] * spacing_r[k] / target_spacing[k]))) for k in range(3)]
    else:
        resampled = list(shape_r)
    affine_s = resize_affine(affine_r, shape_r, resampled)
    pad_before, pad_after = crop_pad_amounts(resampled, target)
    crop_transform = np.eye(4)
    crop_transform[:3, 3] = [-p for p in pad_before]

    regions, linear, nearest = [], [], []
    for k in range(3):
        start, stop = max(0, pad_before[k]), min(target[k], pad_before[k] + resampled[k])
        regions.append((start, stop))
        m0, m1 = start - pad_before[k], stop - pad_before[k]  # indices on the resampled grid
        linear.append(linear_taps(shape_r[k], resampled[k], m0, m1, flip[k]))
        nearest.append(nearest_taps(shape_r[k], resampled[k], m0, m1, flip[k]))
    steps = [
        {
            "op": "reorient",
            "to": CANONICAL_ORIENTATION,
            "permutation": permutation,
            "flip": flip,
            "shape_before": [int(s) for s in shape],
            "shape_after": shape_r,
        },
        {
            "op": "resample",
            "image_mode": "trilinear",
            "mask_mode": "nearest",
            "align_corners": False,
            "shape_before": shape_r,
            "shape_after": resampled,
            "spacing_before": [float(s) for s in spacing_r],
            "spacing_after": [float(s) for s in spacing_of(affine_s)],
        },
        {
            "op": "crop_pad",
            "pad_before": pad_before,
            "pad_after": pad_after,
            "shape_before": resampled,
            "shape_after": target,
            "pad_value_hu": pad_value_hu,
        },
    ]
    return ModelGridPlan(
        permutation=permutation,
        regions=regions,
        linear=linear,
        nearest=nearest,
        linear_axes=linear_order(tuple(shape_r), linear),
        steps=steps,
        affine=affine_s @ crop_transform,
    )


def _invert_crop_pad(array: np.ndarray, step: dict, logits: bool) -> np.ndarray:
    """Back onto the resampled grid: cropped-away voxels get 0 (labels) or the channel's minimum logit."""
    channels, resampled = array.shape[0], step["shape_before"]
    if logits:
        fill = array.reshape(channels, -1).min(axis=1)
    else:
        fill = np.zeros(channels, dtype=array.dtype)
    full = np.empty((channels, *resampled), dtype=array.dtype)
    full[...] = fill.reshape(channels, 1, 1, 1)
    src, dst = [], []
    for k in range(3):
        before = step["pad_before"][k]
        start, stop = max(0, before), min(step["shape_after"][k], before + resampled[k])
        src.append(slice(start, stop))
        dst.append(slice(start - before, stop - before))
    full[(slice(None), *dst)] = array[(slice(None), *src)]
    return full


def _invert_resample(array: np.ndarray, step: dict, logits: bool) -> np.ndarray:
    """Resampled grid → reoriented scan grid, with the same voxel-centre alignment, reversed."""
    after, before = step["shape_after"], step["shape_before"]
    if logits:
        return apply_linear(array, [None] + [linear_taps(after[k], before[k], 0, before[k], False) for k in range(3)])
    return apply_nearest(array, [None] + [nearest_taps(after[k], before[k], 0, before[k], False) for k in range(3)])


def _invert_reorient(array: np.ndarray, step: dict, logits: bool) -> np.ndarray:
    """Canonical layout → the scan's own axis order: undo the flips, then the inverse permutation."""
    flips = tuple(1 + k for k, f in enumerate(step["flip"]) if f)
    if flips:
        array = np.flip(array, axis=flips)
    inverse = np.argsort(step["permutation"])
    return np.ascontiguousarray(array.transpose(0, *(1 + int(i) for i in inverse)))


_INVERSES = {"crop_pad": _invert_crop_pad, "resample": _invert_resample, "reorient": _invert_reorient}


#: The logit a localizer's region-of-interest box gives the voxels outside it (`ReCTForLesionLocalization`,
#: `box_prompt="roi"`): −2¹³, exact in float32, bfloat16 and float16 (so `to_original_grid` recognises it in the
#: output of a model run in any of them), sigmoid 0 in each, and finite, so losses stay finite.
OUTSIDE_BOX_LOGIT = -8192.0


def _box_cut(array: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Logits `(channels, D, H, W)` whose voxels outside a box hold `OUTSIDE_BOX_LOGIT` → the logits with each such
    voxel given the value of the nearest voxel inside the box, the channels cut that way and their boxes (uint8, 1
    inside); the logits as they are and None, None when no channel was. Channels whose other voxels do not form a
    box are left as they are."""
    cut = array <= OUTSIDE_BOX_LOGIT
    if not cut.any():
        return array, None, None
    filled, boxed = array.copy(), np.zeros(array.shape[0], dtype=bool)
    for c, outside in enumerate(cut):
        inside = ~outside
        if not outside.any() or not inside.any():
            continue
        ranges = [np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
        box = tuple(slice(r[0], r[-1] + 1) for r in ranges)
        if inside.sum() == inside[box].size:  # every voxel of the bounding box, and none outside it
            nearest = [np.clip(np.arange(n), r[0], r[-1]) for n, r in zip(inside.shape, ranges)]
            filled[c] = array[c][np.ix_(*nearest)]
            boxed[c] = True
    if not boxed.any():
        return array, None, None
    return filled, boxed, (~cut[boxed]).astype(np.uint8)


def to_original_grid(array: np.ndarray, steps: list[dict], logits: bool) -> np.ndarray:
    """Undo `steps` (as recorded in `VolumeMetadata.steps`) in reverse order.

    Logits cut to a localizer's region-of-interest box (`OUTSIDE_BOX_LOGIT` outside it) are resampled as the mask
    they hold and the box as labels: the logits outside the box first get the nearest value inside it, so that
    linear interpolation against −8192 does not pull the mask's edges in by half a model voxel wherever it meets the
    box, and the original voxels outside the box (resampled nearest) get `OUTSIDE_BOX_LOGIT` again.

    Args:
        array: `(channels, D, H, W)` on the model grid.
        steps: the recorded steps; each `op` must be one of reorient / resample / crop_pad.
        logits: continuous values (linear interpolation, float32) or labels (nearest, dtype kept).

    Returns:
        `(channels, *original_shape)`.
    """
    boxed = boxes = None
    if logits:
        array, boxed, boxes = _box_cut(array.astype(np.float32, copy=False))
    for step in reversed(steps):
        array = _INVERSES[step["op"]](array, step, logits)
        if boxes is not None:
            boxes = _INVERSES[step["op"]](boxes, step, False)
    if boxes is not None:
        array[boxed] = np.where(boxes == 1, array[boxed], np.float32(OUTSIDE_BOX_LOGIT))
    return array


# ----------------------------------------------------------------------------------------------------------------
# Read-time regridding: uneven slice spacing, gantry tilt
# ----------------------------------------------------------------------------------------------------------------


def _cluster(values: np.ndarray, rel_tol: float) -> list[list[int]]:
    """Indices of `values` grouped into clusters of values within `rel_tol` of the cluster's smallest member."""
    order = np.argsort(values, kind="stable")
    clusters: list[list[int]] = []
    for i in order:
        if clusters and values[i] <= values[clusters[-1][0]] * (1 + rel_tol) + 1e-3:
            clusters[-1].append(int(i))
        else:
            clusters.append([int(i)])
    return clusters


@dataclass
class EvenSlices:
    """Resampling of an unevenly spaced series onto equidistant slices along one stored axis (dcm2niix's remedy).

    Attributes:
        axis: the stored slice axis.
        raw_positions: `(n,)` mm along the slice normal of the slices as read.
        raw_spacings: the distinct spacings (mm) found between them, ascending.
        positions: `(m,)` mm of the equidistant slices: first and last coincide with the raw ones.
        raw_affine, affine: the stored grid's affine (mean step) and the equidistant grid's.
    """

    axis: int
    raw_positions: np.ndarray
    raw_spacings: list[float]
    positions: np.ndarray
    raw_affine: np.ndarray
    affine: np.ndarray

    def shape(self, raw_shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = list(raw_shape)
        shape[self.axis] = len(self.positions)
        return tuple(shape)

    def apply(self, array: np.ndarray, labels: bool, fill: float = 0.0) -> np.ndarray:
        """Images: linear between the two nearest raw slices (float32); labels: the nearest raw slice."""
        raw, new = self.raw_positions, self.positions
        taps: list = [None] * array.ndim
        if labels:
            upper = np.clip(np.searchsorted(raw, new), 1, len(raw) - 1)
            nearer_lower = (new - raw[upper - 1]) <= (raw[upper] - new)
            taps[self.axis] = np.where(nearer_lower, upper - 1, upper)
            return apply_nearest(array, taps)
        i1 = np.clip(np.searchsorted(raw, new, side="right"), 1, len(raw) - 1)
        i0 = i1 - 1
        weight = np.clip((new - raw[i0]) / (raw[i1] - raw[i0]), 0.0, 1.0).astype(np.float32)
        taps[self.axis] = (i0, i1, weight)
        return apply_linear(array, taps)

    def record(self) -> dict[str, Any]:
        return {
            "op": "even_slices",
            "axis": self.axis,
            "raw_shape_along_axis": len(self.raw_positions),
            "raw_positions_mm": [float(p) for p in self.raw_positions],
            "raw_spacings_mm": [round(float(g), 4) for g in self.raw_spacings],
            "spacing_mm": float(self.positions[1] - self.positions[0]) if len(self.positions) > 1 else 0.0,
            "shape_along_axis": len(self.positions),
            "raw_affine": self.raw_affine.tolist(),
            "image_mode": "linear",
            "mask_mode": "nearest",
        }


def plan_even_slices(
    positions: np.ndarray,
    names: list[str],
    shape: tuple[int, ...],
    affine: np.ndarray,
    policy: str,
    label: str,
    axis: int = 0,
) -> EvenSlices | None:
    """Check that the slices of a series are evenly spaced; plan equidistant slices when they are not.

    Slices count as even when every position lies within 5 % of a slice step of the straight line from the first
    to the last (the affine's mean step then places each slice to within that). Otherwise the gaps are grouped into
    distinct spacings (within 5 %) and the most common one is the regular step:

    - a single gap that is a whole multiple k ≥ 2 of the regular step, between regular gaps, is k - 1 missing
      slices: always an error (resampling would hide lost data);
    - otherwise the spacing varies (e.g. a head CT that goes from 4 mm to 7 mm slices). With `policy="raise"` this
      is an error that lists the spacings and where they change; with `policy="resample"` the series is resampled
      onto equidistant slices at the finest spacing found (rounded so the first and last slices stay), as dcm2niix
      does.

    Args:
        positions: `(n,)` ascending mm along the slice normal, one per slice of `axis`.
        names: the file of each slice (for messages).
        shape, affine: the stored grid (its slice column is the mean step).
        policy: `"raise"` or `"resample"`.
        label: the folder or input named in messages.

    Returns:
        None when the slices are even, else the `EvenSlices` plan.

    Raises:
        ValueError: missing slices, or uneven spacing under `policy="raise"`.
    """
    positions = np.asarray(positions, dtype=np.float64)
    n = len(positions)
    if n < 3:
        return None
    step = (positions[-1] - positions[0]) / (n - 1)
    deviation = np.abs(positions - (positions[0] + step * np.arange(n)))
    if deviation.max() <= 0.05 * step:
        return None
    gaps = np.diff(positions)
    clusters = _cluster(gaps, 0.05)
    regular_cluster = max(clusters, key=lambda c: (len(c), -gaps[c[0]]))
    regular = float(np.median(gaps[regular_cluster]))
    is_regular = np.zeros(len(gaps), dtype=bool)
    is_regular[regular_cluster] = True

    missing = []
    for i in np.flatnonzero(~is_regular):
        ratio = gaps[i] / regular
        k = int(round(ratio))
        isolated = (i == 0 or is_regular[i - 1]) and (i == len(gaps) - 1 or is_regular[i + 1])
        if k >= 2 and abs(ratio - k) <= 0.05 * k and isolated:
            missing.append((int(i), k - 1))
    if missing:
        where = ", ".join(
            f"between {positions[i]:.3f} and {positions[i + 1]:.3f} mm ({count} slice(s), after {names[i]})"
            for i, count in missing
        )
        raise ValueError(
            f"{label}: missing slice(s): expected a slice every {regular:.3f} mm along the slice normal, found gaps "
            f"{where}; a series with lost files cannot be put on a regular grid (slice_spacing='resample' would "
            "only hide the loss)"
        )

    cluster_of = np.empty(len(gaps), dtype=np.int64)
    for c, members in enumerate(clusters):
        cluster_of[members] = c
    spacing_of_cluster = [float(np.median(gaps[members])) for members in clusters]
    finest = min(spacing_of_cluster)
    if policy != "resample":
        counts = ", ".join(f"{len(m)} gap(s) of {spacing_of_cluster[c]:.3f} mm" for c, m in enumerate(clusters))
        changes = [i for i in range(1, len(gaps)) if cluster_of[i] != cluster_of[i - 1]]
        shown = "; ".join(
            f"{spacing_of_cluster[cluster_of[i - 1]]:.3f} → {spacing_of_cluster[cluster_of[i]]:.3f} mm at "
            f"{positions[i]:.3f} mm ({names[i]})"
            for i in changes[:6]
        ) + ("; ..." if len(changes) > 6 else "")
        raise ValueError(
            f"{label}: slice spacing varies along the slice normal (no slice is missing): {len(clusters)} distinct "
            f"spacings, {counts}; it changes {shown}. One affine cannot describe these {n} slices: pass "
            f"slice_spacing='resample' to resample them onto an equidistant grid of ~{finest:.3f} mm (as dcm2niix "
            "does)"
        )
    extent = positions[-1] - positions[0]
    intervals = max(1, int(round(extent / finest)))
    new_positions = positions[0] + extent * np.arange(intervals + 1) / intervals
    new_affine = np.array(affine, dtype=np.float64)
    new_affine[:3, axis] = affine[:3, axis] * (n - 1) / intervals  # same direction and end points, finer step
    return EvenSlices(
        axis, positions, sorted(spacing_of_cluster), new_positions, np.asarray(affine, dtype=np.float64), new_affine
    )


@dataclass
class Deshear:
    """Resampling of a sheared grid (a gantry-tilted series) onto an orthogonal one, slice by slice.

    The slices of a tilted acquisition are planes perpendicular to the normal of the in-plane axes, but each slice's
    origin is shifted in-plane by a constant amount per slice. Keeping the in-plane axes and the slices' planes,
    the orthogonal grid takes the slice step along the normal (its length = the spacing between slice planes) and
    is aligned with the middle slice, so the shift is split evenly between both ends; each slice is then translated
    in-plane by a sub-voxel amount (bilinear for images, nearest for labels). Voxels that come from outside the
    acquired field of view get `fill` (the processor passes air). This is what dcm2niix does for CT gantry tilt.

    Attributes:
        axis: the sheared (slice) axis of the stored array.
        shifts: `(n_slices, 2)` continuous-index shifts along the two other stored axes (ascending axis order): new
            voxel `(i, j)` of slice `k` samples the raw slice `k` at `(i + shifts[k, 0], j + shifts[k, 1])`.
        angle_deg: the tilt, degrees between the raw slice step and the slice normal.
        raw_affine, affine: the sheared and the orthogonal affine.
    """

    axis: int
    shifts: np.ndarray
    angle_deg: float
    raw_affine: np.ndarray
    affine: np.ndarray

    def apply(self, array: np.ndarray, labels: bool, fill: float = 0.0) -> np.ndarray:
        moved = np.moveaxis(array, self.axis, 0)
        out = np.empty(moved.shape, dtype=moved.dtype if labels else np.float32)
        for k in range(moved.shape[0]):
            plane = moved[k]
            for a in range(2):
                plane = _shift_axis(plane, a, float(self.shifts[k, a]), labels, fill)
            out[k] = plane
        return np.moveaxis(out, 0, self.axis)

    def record(self) -> dict[str, Any]:
        return {
            "op": "gantry_tilt",
            "axis": self.axis,
            "angle_deg": self.angle_deg,
            "shift_voxels_per_slice": [float(v) for v in (self.shifts[1] - self.shifts[0])]
            if len(self.shifts) > 1
            else [0.0, 0.0],
            "raw_affine": self.raw_affine.tolist(),
            "image_mode": "linear",
            "mask_mode": "nearest",
            "outside_field_of_view": "air",
        }


def _shift_axis(plane: np.ndarray, axis: int, shift: float, labels: bool, fill: float) -> np.ndarray:
    """`out[i] = plane[i + shift]` along `axis` of a 2D plane; positions outside `[0, n - 1]` get `fill`."""
    n = plane.shape[axis]
    position = np.arange(n, dtype=np.float64) + shift
    if labels:
        index = np.floor(position + 0.5).astype(np.int64)
        inside = (index >= 0) & (index < n)
        out = np.take(plane, np.clip(index, 0, n - 1), axis=axis)
    else:
        inside = (position >= 0) & (position <= n - 1)
        i0 = np.clip(np.floor(position).astype(np.int64), 0, n - 1)
        i1 = np.minimum(i0 + 1, n - 1)
        weight = np.clip(position - i0, 0.0, 1.0).astype(np.float32)
        shape = [1, 1]
        shape[axis] = -1
        weight = weight.reshape(shape)
        out = np.multiply(np.take(plane, i0, axis=axis), 1.0 - weight, dtype=np.float32)
        out += np.multiply(np.take(plane, i1, axis=axis), weight, dtype=np.float32)
    if not inside.all():
        outside = [slice(None), slice(None)]
        outside[axis] = ~inside
        out[tuple(outside)] = fill
    return out


def shear_cosines(affine: np.ndarray) -> np.ndarray:
    """`(3, 3)` |cosines| between the voxel axes of `affine` (0 on the diagonal)."""
    columns = affine[:3, :3] / spacing_of(affine)
    cosines = np.abs(columns.T @ columns)
    np.fill_diagonal(cosines, 0.0)
    return cosines


def is_sheared(affine: np.ndarray) -> bool:
    """True when two voxel axes of `affine` are further from orthogonal than `SHEAR_TOLERANCE`."""
    return bool(shear_cosines(np.asarray(affine, dtype=np.float64)).max() > SHEAR_TOLERANCE)


def plan_deshear(
    shape: tuple[int, ...], affine: np.ndarray, policy: str, label: str, slice_axis: int | None = None
) -> Deshear | None:
    """None for an orthogonal grid; for a sheared one (gantry tilt) a `Deshear` plan, or an error.

    Args:
        shape, affine: the stored grid.
        policy: `"resample"` (plan the orthogonal grid) or `"raise"`.
        label: the file or input named in messages.
        slice_axis: the stored axis the acquisition stepped along (0 for a DICOM series), when known; otherwise
            the last of the axes that can be the tilted one (NIfTI stores slices last).

    Raises:
        ValueError: a sheared grid under `policy="raise"`, or a shear that is not a tilt of one axis against the
            plane of the two others (not produced by CT scanners).
    """
    affine = np.asarray(affine, dtype=np.float64)
    if not is_sheared(affine):
        return None
    cosines = shear_cosines(affine)
    # the tilted axis: one whose two companions are orthogonal to each other (they span the slice plane); with a
    # tilt along one in-plane axis two axes qualify, and the slice axis is the one the acquisition stepped along
    candidates = [axis for axis in range(3) if cosines[tuple(a for a in range(3) if a != axis)] <= SHEAR_TOLERANCE]
    if not candidates:
        raise ValueError(
            f"{label}: expected an orthogonal voxel grid or a gantry tilt (one axis tilted against the plane of the "
            f"two others), found a general shear with axis cosines {np.round(cosines, 4).tolist()}"
        )
    axis = slice_axis if slice_axis in candidates else max(candidates)
    u_axis, v_axis = (a for a in range(3) if a != axis)
    u, v, step = affine[:3, u_axis], affine[:3, v_axis], affine[:3, axis]
    normal = np.cross(u, v)
    normal /= np.linalg.norm(normal)
    if step @ normal < 0:
        normal = -normal
    along = float(step @ normal)
    angle = float(np.degrees(np.arccos(min(1.0, along / np.linalg.norm(step)))))
    if policy != "resample":
        raise ValueError(
            f"{label}: expected an orthogonal voxel grid, found a gantry tilt of {angle:.2f} degrees (the slice step "
            f"is not perpendicular to the slices: a sheared affine, which a NIfTI qform cannot hold); pass "
            "gantry_tilt='resample' to resample it onto an orthogonal grid (as dcm2niix does)"
        )
    in_plane_step = step - along * normal  # the per-slice in-plane drift of the slice origins
    count = int(shape[axis])
    center = (count - 1) / 2.0
    new_affine = affine.copy()
    new_affine[:3, axis] = along * normal
    new_affine[:3, 3] = affine[:3, 3] + center * in_plane_step
    # new voxel (k, i, j) sits at raw continuous index (k, i + (center - k) * du, j + (center - k) * dv)
    du = float(in_plane_step @ u / (u @ u))
    dv = float(in_plane_step @ v / (v @ v))
    offsets = center - np.arange(count, dtype=np.float64)
    shifts = np.stack([offsets * du, offsets * dv], axis=1)
    return Deshear(axis, shifts, angle, affine, new_affine)


# ----------------------------------------------------------------------------------------------------------------
# Masks with their own geometry
# ----------------------------------------------------------------------------------------------------------------


def mask_grid_correspondence(
    mask_shape: tuple[int, ...],
    mask_affine: np.ndarray,
    shape: tuple[int, ...],
    affine: np.ndarray,
    tolerance_mm: float | None = None,
) -> tuple[list[int], list[bool]] | str:
    """How a mask's voxel grid maps onto a volume's, decided from the affines.

    The grids are the same when some axis permutation and flips of the mask's array put every voxel centre at the
    volume's voxel centre of the same index, to within `tolerance_mm` (default: 1 % of the smallest voxel spacing).
    Checking the 8 corner voxels suffices: both index → world maps are affine.

    Returns:
        `(permutation, flip)` such that `mask.transpose(permutation)`, reversed along the axes where `flip` is True,
        lies on the volume's grid; or a string saying how the grids differ (offset in mm, size, spacing or axes).
    """
    mask_affine = np.asarray(mask_affine, dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64)
    spacing = spacing_of(affine)
    tolerance = 0.01 * float(spacing.min()) if tolerance_mm is None else float(tolerance_mm)
    transform = np.linalg.solve(mask_affine, affine)  # volume voxel index → mask continuous index
    rounded = np.round(transform[:3, :3])
    is_signed_permutation = (
        np.allclose(transform[:3, :3], rounded, atol=0.01)
        and np.array_equal(np.abs(rounded).sum(axis=0), np.ones(3))
        and np.array_equal(np.abs(rounded).sum(axis=1), np.ones(3))
    )
    center = affine @ np.append((np.asarray(shape) - 1) / 2.0, 1.0)
    mask_center = mask_affine @ np.append((np.asarray(mask_shape, dtype=np.float64) - 1) / 2.0, 1.0)
    offset = mask_center[:3] - center[:3]
    if not is_signed_permutation:
        return (
            f"its voxel axes are not the volume's up to order and flips: spacing "
            f"{np.round(spacing_of(mask_affine), 4).tolist()} mm vs the volume's {np.round(spacing, 4).tolist()} mm, "
            f"grid centre offset by {np.round(offset, 3).tolist()} mm"
        )
    permutation = [int(np.flatnonzero(rounded[:, k])[0]) for k in range(3)]
    flip = [bool(rounded[permutation[k], k] < 0) for k in range(3)]
    in_volume_order = tuple(int(mask_shape[j]) for j in permutation)
    if in_volume_order != tuple(int(s) for s in shape):
        extent = np.asarray(in_volume_order) * spacing
        return (
            f"size mismatch: in the volume's axis order its grid is {in_volume_order} voxels "
            f"({np.round(extent, 2).tolist()} mm), the volume's {tuple(int(s) for s in shape)} "
            f"({np.round(np.asarray(shape) * spacing, 2).tolist()} mm); grid centre offset by "
            f"{np.round(offset, 3).tolist()} mm"
        )
    index_map = np.zeros((4, 4))
    index_map[3, 3] = 1.0
    for k, j in enumerate(permutation):
        index_map[j, k] = -1.0 if flip[k] else 1.0
        index_map[j, 3] = shape[k] - 1 if flip[k] else 0.0
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]
    )
    distance = np.linalg.norm((corners @ (mask_affine @ index_map).T - corners @ affine.T)[:, :3], axis=1)
    if distance.max() > tolerance:
        return (
            f"its voxel centres lie up to {distance.max():.3f} mm from the volume's (tolerance {tolerance:.3g} mm; "
            f"grid centre offset by {np.round(offset, 3).tolist()} mm)"
        )
    return permutation, flip
