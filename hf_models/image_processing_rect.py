# Copyright 2025 The ReCT-VLM authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
"""Image processor for ReCT-VLM: CT volumes (NIfTI, DICOM series, arrays) → model inputs, and masks back.

Data flow (one way): `volume_reading_rect` (files → stored array + affine) → `volume_geometry_rect` (regular grid,
plans to the model grid, their inverses, `VolumeMetadata`) → this file: the `ReCTImageProcessor` that chooses the
policies (gantry tilt, slice spacing, NaN, windows), runs the plans, windows the HU values and maps model outputs
back with `post_process_masks` / `save_mask`.

This file is Hub code: at module level it imports only the standard library, numpy, torch, transformers and the two
sibling files above (which `save_pretrained` copies next to it). nibabel and pydicom are imported inside the
functions that read or write files; the `isal` gzip accelerator is optional.

Coordinate conventions used throughout:

- **World coordinates** are nibabel's RAS+ millimetres (+x toward the patient's Right, +y Anterior,
  +z Superior). Affines are 4x4 voxel-index → RAS+ mm matrices. A DICOM (LPS+) affine is converted by negating
  its rows 0 and 1.
- **Canonical voxel orientation** of every processed volume is LPS+ (the DICOM/ITK convention), laid out as
  `(D, H, W)` = (inferior→superior, anterior→posterior, patient right→left). This is exactly the array that
  SimpleITK's `GetArrayFromImage` returns for an identity-direction ITK image, and an axial slice
  `pixel_values[b, c, d]` displays like a radiology viewer (anterior at the top, the patient's right on the
  viewer's left). In nibabel's axis-code terms the processed array has codes `("S", "P", "L")`.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

from .volume_geometry_rect import (
    CANONICAL_ORIENTATION,
    ModelGridPlan,
    VolumeMetadata,
    apply_linear,
    apply_nearest,
    chunk_linear_taps,
    is_sheared,
    mask_grid_correspondence,
    plan_deshear,
    plan_even_slices,
    plan_model_grid,
    spacing_of,
    to_original_grid,
)
from .volume_reading_rect import (
    InflatingNifti,
    RawVolume,
    as_3d,
    is_affine_like,
    is_array,
    is_nifti_path,
    optional_import,
    read_volume,
    to_array,
)


__all__ = [
    "ReCTImageProcessor",
    "ReCTImageProcessorKwargs",
    "VolumeMetadata",
    "load_volume",
    "NAMED_WINDOWS",
    "AIR_HU",
    "CANONICAL_ORIENTATION",
]


#: Named CT windows, (center, width) in HU. Each window becomes one output channel.
NAMED_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "abdomen": (60.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "wide": (0.0, 2000.0),
}

#: Value (HU) of the padding added by the crop/pad step, and of voxels a gantry-tilt correction brings in from
#: outside the acquired field of view: air.
AIR_HU = -1024.0

#: `.nii.gz` volumes with at least this many voxel bytes are inflated in a background thread while finished slabs
#: are already resampled and windowed (the results are identical to reading the whole file first).
STREAM_MIN_BYTES = 8 << 20

#: Slabs per streamed volume (along the file's slowest axis): more overlap, but more per-slab overhead.
STREAM_SLABS = 16

_SETTING_NAMES = (
    "volume_size",
    "target_spacing",
    "resize_mode",
    "windows",
    "image_mean",
    "image_std",
    "nan_policy",
    "fill_value_hu",
    "allow_constant_volume",
    "gantry_tilt",
    "slice_spacing",
)
# Keys that transformers itself writes into / passes with a saved image-processor config.
_SERVICE_KEYS = ("image_processor_type", "processor_class", "feature_extractor_type")


class ReCTImageProcessorKwargs(ImagesKwargs, total=False):
    """Per-call arguments of `ReCTImageProcessor.__call__` besides `images` (see the class docstring for the settings).

    Declaring the mask and affine arguments here lets `ProcessorMixin` route them to the image processor.
    """

    anatomy_mask: Any
    lesion_mask: Any
    affines: Any
    rescale_slope: float | list[float] | None
    rescale_intercept: float | list[float] | None
    volume_size: list[int] | tuple[int, ...]
    target_spacing: list[float] | tuple[float, ...] | None
    resize_mode: str | None
    windows: list[str | list[float] | tuple[float, ...]] | tuple[str | list[float] | tuple[float, ...], ...]
    nan_policy: str
    fill_value_hu: float | int
    allow_constant_volume: bool
    gantry_tilt: str
    slice_spacing: str


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _per_volume_numbers(name: str, value: Any, default: float, count: int) -> list[float]:
    """`value` (None, one number, or one number per volume) → `count` finite floats; a wrong count, a non-number, a
    non-finite value or a zero slope raises ValueError naming `name` and the volume index."""
    if value is None:
        return [default] * count
    values = [value] * count if _is_number(value) else list(value) if isinstance(value, (list, tuple)) else None
    if values is None:
        raise ValueError(f"{name}: expected a number or one number per volume, found {type(value).__name__}")
    if len(values) != count:
        raise ValueError(f"{name}: expected one value per volume ({count}), found {len(values)}")
    for index, item in enumerate(values):
        if not _is_number(item) or not math.isfinite(float(item)) or (name == "rescale_slope" and item == 0):
            wanted = "a finite non-zero number" if name == "rescale_slope" else "a finite number"
            raise ValueError(f"{name}[{index}]: expected {wanted}, found {item!r}")
    return [float(item) for item in values]


def _window_bounds(windows: list) -> list[tuple[float, float]]:
    bounds = []
    for window in windows:
        center, width = NAMED_WINDOWS[window] if isinstance(window, str) else window
        bounds.append((center - width / 2.0, center + width / 2.0))
    return bounds


def _warn(message: str, notes: list[str]) -> None:
    notes.append(message)
    warnings.warn(message, UserWarning, stacklevel=4)


def _regular_grid(
    raw: RawVolume, source: np.ndarray, name: str, gantry_tilt: str, slice_spacing: str, fill: float
) -> tuple[np.ndarray, np.ndarray, list, list[str]]:
    """Put a scan onto a regular, orthogonal grid when its acquisition did not give one.

    Returns `(array, affine, plans, notes)`: `plans` are the `EvenSlices` / `Deshear` plans applied (empty for
    ordinary scans), `notes` the warnings issued. `fill` is air in stored units.
    """
    plans, notes = [], []
    affine = raw.affine
    if raw.slice_positions is not None:
        even = plan_even_slices(raw.slice_positions, raw.slice_names, source.shape, affine, slice_spacing, name)
        if even is not None:
            source, affine = even.apply(source, labels=False), even.affine
            plans.append(even)
            spacings = ", ".join(f"{s:g}" for s in even.record()["raw_spacings_mm"])
            _warn(
                f"{name}: slice spacing varies ({spacings} mm); resampled {len(even.raw_positions)} slices onto "
                f"{len(even.positions)} equidistant ones {even.positions[1] - even.positions[0]:.3f} mm apart "
                "(slice_spacing='resample')",
                notes,
            )
    slice_axis = 0 if raw.slice_positions is not None else None  # a DICOM series stacks its slices on axis 0
    deshear = plan_deshear(source.shape, affine, gantry_tilt, name, slice_axis)
    if deshear is not None:
        source, affine = deshear.apply(source, labels=False, fill=fill), deshear.affine
        plans.append(deshear)
        _warn(
            f"{name}: gantry tilt of {deshear.angle_deg:.2f} degrees (sheared voxel grid): resampled onto an "
            "orthogonal grid, as dcm2niix does; masks map back onto that grid (set gantry_tilt='raise' to refuse "
            "tilted scans instead)",
            notes,
        )
    return source, affine, plans, notes


def load_volume(
    path_or_obj: Any, slice_spacing: str = "raise", gantry_tilt: str = "resample"
) -> tuple[np.ndarray, np.ndarray]:
    """Load a CT volume as `(array, affine)` on a regular, orthogonal grid.

    Args:
        path_or_obj: a `.nii`/`.nii.gz` file, a `.npy` file (identity affine), a folder holding one DICOM CT
            series, a nibabel image, a numpy array / torch tensor (identity affine) or an `(array, affine)` tuple.
        slice_spacing: `"raise"` (default) or `"resample"`: what to do with a DICOM series whose slice spacing
            varies (see `ReCTImageProcessor`).
        gantry_tilt: `"resample"` (default, with a warning) or `"raise"`: what to do with a sheared grid.

    Returns:
        `array`: the voxel values in the file's own axis order (HU for CT). Stored integer data without scaling is
        returned as is (no copy, e.g. int16, possibly a read-only view of the decompressed file); NIfTI
        `scl_slope`/`scl_inter` and DICOM RescaleSlope/RescaleIntercept are applied (float32), as is any regridding
        (float32). DICOM series are `(slices, rows, columns)`, slices sorted along the slice normal. `affine`: 4x4
        float64 voxel-index → RAS+ mm.

    Raises:
        FileNotFoundError: missing path or empty DICOM folder.
        ValueError: unreadable, truncated or non-NIfTI file behind a NIfTI name; DICOM folder without CT images,
            with several series, non-CT modality, missing slices, or varying slice spacing / gantry tilt under
            `"raise"`.
        TypeError: unsupported input type.
    """
    raw = read_volume(path_or_obj, None, "volume")
    name = raw.source or "volume"
    array = to_array(raw.array, name)
    fill = (AIR_HU - raw.intercept) / raw.slope
    array, affine, _, _ = _regular_grid(raw, array, name, gantry_tilt, slice_spacing, fill)
    if raw.slope != 1.0 or raw.intercept != 0.0:
        array = np.asarray(array, dtype=np.float32) * np.float32(raw.slope) + np.float32(raw.intercept)
    return np.asanyarray(array), affine


# ----------------------------------------------------------------------------------------------------------------
# The processor
# ----------------------------------------------------------------------------------------------------------------


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a 3D 0/1 mask (uint8); an empty mask stays empty."""
    ndimage = optional_import("scipy.ndimage", "post_process_masks(largest_component=True)")
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return mask.astype(np.uint8)
    sizes = np.bincount(components.ravel())[1:]
    return (components == 1 + int(np.argmax(sizes))).astype(np.uint8)


class ReCTImageProcessor(BaseImageProcessor):
    r"""
    Turns CT volumes (NIfTI, DICOM series, `.npy`, nibabel images, arrays) into `pixel_values`
    `(batch, channels, depth, height, width)` for the ReCT models, carries anatomy/lesion masks along the identical
    geometric path, and maps model-grid masks back to each original scan.

    Steps, per volume: read → put onto a regular grid if the acquisition did not give one (gantry tilt, varying
    slice spacing; see below) → check values (NaN/inf, constant) → **reorient** to the canonical orientation →
    **resample** (trilinear for images, nearest neighbour for masks) → **centre crop/pad** (pad = air, -1024 HU)
    → **window** (one channel per HU window, each scaled to [0, 1]) → optional per-channel normalisation. Every
    geometric step is recorded in the volume's `VolumeMetadata` (`volume_meta`) so predictions map back with
    `post_process_masks`.

    Resampling is voxel-centre aligned: images equal `F.interpolate(mode="trilinear", align_corners=False)`,
    masks `F.interpolate(mode="nearest-exact")` (torch's legacy `"nearest"` is shifted by half a voxel, which
    would misalign masks and images). Both are computed separably, one gather per axis that changes, straight
    from the stored dtype (e.g. int16); reorientation and crop/pad are folded into the gather indices, so only
    the voxels that reach the output are ever converted to float32. Windowing runs after resampling, on the
    output grid, writing each channel in place. A large `.nii.gz` is inflated (with `isal` when installed) in a
    background thread while the finished slabs are already resampled and windowed; the result is identical.

    Canonical orientation: LPS+ voxel orientation (the DICOM/ITK convention), laid out as `(D, H, W)` =
    (inferior→superior, anterior→posterior, patient right→left), i.e. nibabel axis codes `("S", "P", "L")`. An
    axial slice `pixel_values[b, c, d]` displays like a radiology viewer: anterior at the top, the patient's right
    on the viewer's left. World coordinates and affines are nibabel's RAS+ mm convention everywhere (a DICOM LPS
    affine has its rows 0 and 1 negated). Reorientation is an axis permutation plus flips chosen from the affine
    (for oblique scans: the closest axes; the affine stays exact, nothing is resampled for it).

    Masks (`anatomy_mask`, `lesion_mask`) that carry geometry (files, nibabel images, `(array, affine)` tuples) may
    be stored in any voxel order: a mask whose voxel centres coincide with the volume's (to 1 % of a voxel) up to
    axis permutation and flips is reoriented onto the volume's voxel order; one that lies elsewhere is refused
    with the offset or size mismatch. A bare array/tensor has no geometry and must have the volume's stored shape.

    Args:
        volume_size (`list[int]`, defaults to `[64, 512, 512]`):
            Output `(D, H, W)` in voxels.
        target_spacing (`list[float]`, *optional*):
            Approximate spacing in mm along `(D, H, W)` = (z, y, x) to resample to before the crop/pad step; requires
            `resize_mode="crop_pad"`. The field of view is kept, so the number of voxels along an axis with `n`
            voxels of spacing `s` becomes `size = max(1, round(n * s / target))` and the **achieved** spacing is
            `n * s / size`, within half a voxel's worth of the target (e.g. 1.4815 mm instead of 1.5 mm for 20
            slices of 2 mm: 27 slices). The achieved spacing is recorded in `volume_meta["steps"][1]
            ["spacing_after"]`, and `volume_meta["processed_affine"]` is exact.
        resize_mode (`str`, *optional*):
            `"resize"`: interpolate straight to `volume_size`; `"crop_pad"`: resample to `target_spacing` (if given),
            then centre crop/pad to `volume_size`. Defaults to `"resize"` without `target_spacing`, else `"crop_pad"`.
        windows (`list`, defaults to `["wide"]`):
            HU windows, each a name from `NAMED_WINDOWS` (lung, mediastinum, abdomen, bone, brain, wide) or a
            `[center, width]` pair in HU. Window `(c, w)` clips to `[c - w/2, c + w/2]` and scales to `[0, 1]`.
        image_mean (`list[float]`, *optional*), image_std (`list[float]`, *optional*):
            Per-channel normalisation `(x - mean) / std` applied after windowing (both or neither).
        nan_policy (`str`, defaults to `"raise"`):
            `"raise"`: NaN/inf voxels raise `ValueError`; `"fill"`: they are replaced by `fill_value_hu`.
        fill_value_hu (`float`, defaults to -1024.0):
            HU value that replaces non-finite voxels under `nan_policy="fill"`.
        allow_constant_volume (`bool`, defaults to `False`):
            A constant volume (a failed export, an all-padding scan) raises `ValueError` unless this is `True`.
        gantry_tilt (`str`, defaults to `"resample"`):
            A gantry-tilted series has a sheared voxel grid, which NIfTI's qform cannot hold. `"resample"`: put it
            onto an orthogonal grid (each slice shifted in-plane, bilinear; air outside the acquired field of view),
            as dcm2niix does, with a warning recorded in `volume_meta["warnings"]` and the correction in
            `volume_meta["regridding"]`; masks then map back onto that orthogonal grid. `"raise"`: refuse tilted
            scans with a `ValueError` (to keep the raw grid, convert it elsewhere).
        slice_spacing (`str`, defaults to `"raise"`):
            A DICOM series whose slice spacing varies (no slice missing) cannot be described by one affine.
            `"raise"`: a `ValueError` listing the spacings and where they change; `"resample"`: resample it onto
            equidistant slices at the finest spacing (linear; nearest for masks), as dcm2niix does, with a warning
            and a `volume_meta["regridding"]` entry. Missing slices always raise.

    Raises:
        ValueError: a setting outside its allowed values (the message names the field).
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = ReCTImageProcessorKwargs
    # `save_pretrained` copies this file (and the files it imports relatively) next to the settings and writes the
    # `auto_map` for it.
    _auto_class = "AutoImageProcessor"

    def __init__(
        self,
        volume_size: list[int] | tuple[int, ...] = (64, 512, 512),
        target_spacing: list[float] | tuple[float, ...] | None = None,
        resize_mode: str | None = None,
        windows: list | tuple = ("wide",),
        image_mean: float | list[float] | None = None,
        image_std: float | list[float] | None = None,
        nan_policy: str = "raise",
        fill_value_hu: float = AIR_HU,
        allow_constant_volume: bool = False,
        gantry_tilt: str = "resample",
        slice_spacing: str = "raise",
        **kwargs,
    ):
        auto_map = kwargs.pop("auto_map", None)
        for key in _SERVICE_KEYS:
            kwargs.pop(key, None)
        if kwargs:
            raise TypeError(
                f"ReCTImageProcessor got unexpected setting(s) {sorted(kwargs)}; allowed: {list(_SETTING_NAMES)}"
            )
        super().__init__()
        if auto_map is not None:
            self.auto_map = auto_map

        self.volume_size = self._check_triplet("volume_size", volume_size, int)
        self.target_spacing = (
            None if target_spacing is None else self._check_triplet("target_spacing", target_spacing, float)
        )
        if resize_mode is None:
            resize_mode = "resize" if self.target_spacing is None else "crop_pad"
        if resize_mode not in ("resize", "crop_pad"):
            raise ValueError(f"resize_mode: expected 'resize' or 'crop_pad', found {resize_mode!r}")
        if resize_mode == "resize" and self.target_spacing is not None:
            raise ValueError(
                f"resize_mode: 'resize' interpolates straight to volume_size and would ignore target_spacing="
                f"{self.target_spacing}; use resize_mode='crop_pad' (or drop target_spacing)"
            )
        self.resize_mode = resize_mode
        self.windows = self._check_windows(windows)
        channels = len(self.windows)
        if (image_mean is None) != (image_std is None):
            raise ValueError(
                "image_mean/image_std: expected both or neither, "
                f"found image_mean={image_mean!r}, image_std={image_std!r}"
            )
        self.image_mean = None if image_mean is None else self._check_per_channel("image_mean", image_mean, channels)
        self.image_std = None if image_std is None else self._check_per_channel("image_std", image_std, channels)
        if self.image_std is not None and min(self.image_std) <= 0:
            raise ValueError(f"image_std: expected positive values, found {self.image_std}")
        self.nan_policy = self._check_choice("nan_policy", nan_policy, ("raise", "fill"))
        if not _is_number(fill_value_hu) or not math.isfinite(fill_value_hu):
            raise ValueError(f"fill_value_hu: expected a finite number of HU, found {fill_value_hu!r}")
        self.fill_value_hu = float(fill_value_hu)
        if not isinstance(allow_constant_volume, bool):
            raise ValueError(f"allow_constant_volume: expected True or False, found {allow_constant_volume!r}")
        self.allow_constant_volume = allow_constant_volume
        self.gantry_tilt = self._check_choice("gantry_tilt", gantry_tilt, ("resample", "raise"))
        self.slice_spacing = self._check_choice("slice_spacing", slice_spacing, ("raise", "resample"))

    # ---- settings ------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> str:
        if value not in allowed:
            raise ValueError(f"{field}: expected one of {list(allowed)}, found {value!r}")
        return value

    @staticmethod
    def _check_triplet(field: str, value: Any, kind: type) -> list:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 3:
            raise ValueError(f"{field}: expected 3 values (D, H, W), found {value!r}")
        out = []
        for v in value:
            if not _is_number(v):
                raise ValueError(f"{field}: expected numbers, found {value!r}")
            if kind is int and float(v) != int(v):
                raise ValueError(f"{field}: expected whole numbers of voxels, found {value!r}")
            if not math.isfinite(float(v)) or v <= 0:
                raise ValueError(f"{field}: expected positive values, found {list(value)!r}")
            out.append(kind(v))
        return out

    @staticmethod
    def _check_windows(windows: Any) -> list:
        if isinstance(windows, (str, bytes)) or not isinstance(windows, (list, tuple)) or len(windows) == 0:
            raise ValueError(
                f"windows: expected a non-empty list of window names or [center, width] pairs, found {windows!r}"
            )
        out = []
        for window in windows:
            if isinstance(window, str):
                if window not in NAMED_WINDOWS:
                    raise ValueError(
                        f"windows: unknown window name {window!r}; allowed names: {sorted(NAMED_WINDOWS)} "
                        "or a [center, width] pair in HU"
                    )
                out.append(window)
                continue
            if (
                not isinstance(window, (list, tuple))
                or len(window) != 2
                or not all(_is_number(v) and math.isfinite(v) for v in window)
                or window[1] <= 0
            ):
                raise ValueError(
                    f"windows: expected a window name or a [center, width > 0] pair in HU, found {window!r}"
                )
            out.append([float(window[0]), float(window[1])])
        return out

    @staticmethod
    def _check_per_channel(field: str, value: Any, channels: int) -> list[float]:
        values = [value] * channels if _is_number(value) else value
        if not isinstance(values, (list, tuple)) or len(values) != channels:
            raise ValueError(f"{field}: expected one value per window ({channels}), found {value!r}")
        if not all(_is_number(v) and math.isfinite(v) for v in values):
            raise ValueError(f"{field}: expected finite numbers, found {value!r}")
        return [float(v) for v in values]

    def _settings(self) -> dict[str, Any]:
        return {name: copy.deepcopy(getattr(self, name)) for name in _SETTING_NAMES}

    def to_dict(self) -> dict[str, Any]:
        """The settings (plain JSON types, fixed keys: deterministic, so caches may hash it) and the class name."""
        output = self._settings()
        output["image_processor_type"] = type(self).__name__
        if getattr(self, "auto_map", None) is not None:
            output["auto_map"] = copy.deepcopy(self.auto_map)
        return output

    @classmethod
    def from_dict(cls, image_processor_dict: dict[str, Any], **kwargs):
        """Build from a saved config; keys this version does not know (written by another version) are dropped
        with a warning instead of failing, while the constructor itself still rejects unknown settings."""
        known = set(_SETTING_NAMES) | set(_SERVICE_KEYS) | {"auto_map"}
        unknown = sorted(set(image_processor_dict) - known)
        if unknown:
            warnings.warn(
                f"ReCTImageProcessor: ignoring unknown key(s) {unknown} in the saved image processor config "
                f"(known settings: {list(_SETTING_NAMES)})",
                UserWarning,
                stacklevel=2,
            )
            image_processor_dict = {k: v for k, v in image_processor_dict.items() if k not in unknown}
        return super().from_dict(image_processor_dict, **kwargs)

    def fetch_images(self, images: Any) -> Any:
        """Volumes are read by the processor itself (paths, arrays, nibabel images): nothing to fetch."""
        return images

    @property
    def num_channels(self) -> int:
        """Number of output channels (one per window)."""
        return len(self.windows)

    # ---- per-volume processing -----------------------------------------------------------------------------------

    def _prepare_mask(
        self,
        mask: Any,
        raw: RawVolume,
        raw_shape: tuple[int, ...],
        shape: tuple[int, ...],
        affine: np.ndarray,
        plans: list,
        label: str,
    ) -> np.ndarray:
        """A mask as integer labels on the volume's (regular) grid, in the volume's voxel order.

        A mask with geometry is matched to the volume's grid, or, for a regridded scan, to the raw grid it was
        acquired on (then regridded like the volume, nearest neighbour). A bare array lies on the raw stored grid.
        """
        mask_raw = read_volume(mask, None, label)
        name = mask_raw.source or label
        labels = as_3d(to_array(mask_raw.array, name), name)
        if mask_raw.slope != 1.0 or mask_raw.intercept != 0.0:
            labels = labels.astype(np.float32) * np.float32(mask_raw.slope) + np.float32(mask_raw.intercept)
        on_raw_grid = True
        if not mask_raw.has_geometry:
            if tuple(labels.shape) != tuple(raw_shape):
                raise ValueError(
                    f"{name}: expected the shape of its volume {tuple(raw_shape)}, found {tuple(labels.shape)}"
                )
        else:
            match = mask_grid_correspondence(labels.shape, mask_raw.affine, shape, affine)
            on_raw_grid = False
            if isinstance(match, str) and plans:
                raw_match = mask_grid_correspondence(labels.shape, mask_raw.affine, raw_shape, raw.affine)
                if not isinstance(raw_match, str):
                    match, on_raw_grid = raw_match, True
            if isinstance(match, str):
                raise ValueError(
                    f"{name}: expected a mask on the voxel grid of its volume (shape {tuple(shape)}, spacing "
                    f"{np.round(spacing_of(affine), 4).tolist()} mm; any voxel order), found one that lies elsewhere: "
                    f"{match}"
                )
            permutation, flip = match
            labels = labels.transpose(permutation)
            flips = tuple(k for k in range(3) if flip[k])
            if flips:
                labels = np.flip(labels, axis=flips)
        if labels.dtype.kind == "f":
            if not np.isfinite(labels).all():
                raise ValueError(f"{name}: expected integer label values, found NaN/inf")
            if not np.array_equal(labels, np.round(labels)):
                raise ValueError(
                    f"{name}: expected integer label values, found fractional values (a probability map?)"
                )
        if on_raw_grid:
            for plan in plans:
                labels = plan.apply(labels, labels=True)
        return labels

    def _check_values(self, source: np.ndarray, name: str, slope: float, intercept: float) -> np.ndarray:
        """NaN/inf policy for float volumes; the source with non-finite voxels filled when allowed."""
        if source.dtype.kind == "f":
            finite = np.isfinite(source)
            if not finite.all():
                count = int(finite.size - np.count_nonzero(finite))
                if self.nan_policy == "raise":
                    raise ValueError(
                        f"{name}: expected finite voxel values, found {count} NaN/inf voxel(s) "
                        "(set nan_policy='fill' to replace them with fill_value_hu)"
                    )
                source = np.where(finite, source, source.dtype.type((self.fill_value_hu - intercept) / slope))
        return source

    @staticmethod
    def _varies(array: np.ndarray, reference: Any) -> bool:
        """Whether `array` holds any value other than `reference` (a few spread-out voxels decide most scans)."""
        probe = array[tuple(np.array([0, s // 2, s - 1]) for s in array.shape)]
        return bool((probe != reference).any() or array.min() != reference or array.max() != reference)

    def _refuse_constant(self, value: Any, name: str, slope: float, intercept: float) -> None:
        if not self.allow_constant_volume:
            raise ValueError(
                f"{name}: expected a volume with varying intensities, found a constant volume (every voxel "
                f"= {float(value) * slope + intercept:g} HU); set allow_constant_volume=True to process it anyway"
            )

    def _process_volume(
        self,
        volume: Any,
        anatomy_mask: Any,
        lesion_mask: Any,
        affine: Any,
        rescale_slope: float,
        rescale_intercept: float,
        label: str,
    ) -> dict[str, Any]:
        """One volume → numpy `pixel_values (C, D, H, W)`, masks `(1, D, H, W)` int64 or None, `volume_meta`."""
        for field, value in (("rescale_slope", rescale_slope), ("rescale_intercept", rescale_intercept)):
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"{field} for {label}: expected a finite number, found {value!r}")
        if rescale_slope == 0:
            raise ValueError(f"rescale_slope for {label}: expected a non-zero number, found 0")
        raw = read_volume(volume, affine, label, stream_min_bytes=STREAM_MIN_BYTES)
        try:
            return self._process_raw(raw, anatomy_mask, lesion_mask, rescale_slope, rescale_intercept, label)
        finally:
            if raw.stream is not None:  # an error before the last slab: stop the background inflate
                raw.stream.close()

    def _process_raw(
        self,
        raw: RawVolume,
        anatomy_mask: Any,
        lesion_mask: Any,
        rescale_slope: float,
        rescale_intercept: float,
        label: str,
    ) -> dict[str, Any]:
        name = raw.source or label
        if raw.stream is not None and (raw.stream.dtype.kind not in "iu" or is_sheared(raw.affine)):
            raw.finished()  # only integer, orthogonal volumes are processed while inflating
        # HU = slope * stored + intercept, composing file scaling (NIfTI scl_*) and the caller's (e.g. CT-RATE CSV).
        slope = float(rescale_slope) * raw.slope
        intercept = float(rescale_slope) * raw.intercept + float(rescale_intercept)
        if raw.stream is not None:  # an integer NIfTI on an orthogonal grid: nothing to regrid or check upfront
            source, raw_shape, grid_affine, plans, notes = None, raw.stream.shape, raw.affine, [], []
            shape = raw_shape
        else:
            source = as_3d(to_array(raw.array, name), name)
            if source.dtype == np.bool_:
                source = source.view(np.uint8)
            raw_shape = tuple(source.shape)
            air = (AIR_HU - intercept) / slope
            source, grid_affine, plans, notes = _regular_grid(
                raw, source, name, self.gantry_tilt, self.slice_spacing, air
            )
            source = self._check_values(source, name, slope, intercept)
            if not self._varies(source, source.flat[0]):
                self._refuse_constant(source.flat[0], name, slope, intercept)
            shape = tuple(source.shape)

        masks = {}
        for key, mask in (("anatomy_mask", anatomy_mask), ("lesion_mask", lesion_mask)):
            if mask is not None:
                masks[key] = self._prepare_mask(mask, raw, raw_shape, shape, grid_affine, plans, f"{key} of {name}")

        plan = plan_model_grid(shape, grid_affine, self.volume_size, self.target_spacing, self.resize_mode, AIR_HU)
        pixel_values = self._new_output(plan)
        if raw.stream is not None:
            self._resample_streamed(raw.stream, plan, pixel_values, slope, intercept, name)
            raw.stream = None
        else:
            values = apply_linear(source.transpose(plan.permutation), plan.linear, plan.linear_axes)
            self._window_into(pixel_values, values, tuple(slice(a, b) for a, b in plan.regions), slope, intercept)

        outputs = {"pixel_values": pixel_values, "anatomy_mask": None, "lesion_mask": None}
        for key, mask in masks.items():
            full = np.zeros((1, *self.volume_size), dtype=np.int64)
            full[(0, *(slice(a, b) for a, b in plan.regions))] = apply_nearest(
                mask.transpose(plan.permutation), plan.nearest
            )
            outputs[key] = full

        outputs["volume_meta"] = VolumeMetadata(
            source=raw.source,
            original_shape=[int(s) for s in shape],
            original_affine=grid_affine.tolist(),
            original_spacing=[float(s) for s in spacing_of(grid_affine)],
            processed_shape=list(self.volume_size),
            processed_affine=plan.affine.tolist(),
            orientation=CANONICAL_ORIENTATION,
            rescale_slope=slope,
            rescale_intercept=intercept,
            steps=plan.steps,
            regridding=[p.record() for p in plans],
            warnings=notes,
        )
        return outputs

    def _resample_streamed(
        self, stream: InflatingNifti, plan: ModelGridPlan, out: np.ndarray, slope: float, intercept: float, name: str
    ) -> None:
        """Resample and window slab by slab while `stream` is still inflating the file.

        The file's slowest axis is the last stored axis; output slabs along the canonical axis it becomes are
        processed in file order (a flipped axis runs backwards), each as soon as the input slices it reads are
        inflated, and each reads at most half the stream's ring so the inflater keeps working ahead. The linear
        passes run in the whole volume's axis order, so the result is bit-identical to the whole-file path.
        """
        k = plan.permutation.index(2)
        start, stop = plan.regions[k]
        limit = max(2, stream.window_slices // 2)
        size = max(1, -(-(stop - start) // STREAM_SLABS))
        slabs, a = [], 0
        while a < stop - start:
            b = min(stop - start, a + size)
            lo, hi, taps_k = chunk_linear_taps(plan.linear[k], a, b)
            while hi - lo > limit and b - a > 1:  # one output reads at most 2 input slices
                b = a + (b - a) // 2
                lo, hi, taps_k = chunk_linear_taps(plan.linear[k], a, b)
            slabs.append((lo, hi, a, b, taps_k))
            a = b
        reference, varies = None, False
        for lo, hi, a, b, taps_k in sorted(slabs, key=lambda slab: slab[:4]):
            slab = stream.slab(lo, hi)
            if not varies:
                reference = slab.flat[0] if reference is None else reference
                varies = self._varies(slab, reference)
            taps = list(plan.linear)
            taps[k] = taps_k
            values = apply_linear(slab.transpose(plan.permutation), taps, plan.linear_axes)
            region = [slice(r0, r1) for r0, r1 in plan.regions]
            region[k] = slice(start + a, start + b)
            self._window_into(out, values, tuple(region), slope, intercept)
        stream.finish()  # the whole file inflated and its gzip CRC verified
        if not varies and reference is not None:
            self._refuse_constant(reference, name, slope, intercept)

    def _new_output(self, plan: ModelGridPlan) -> np.ndarray:
        """`(C, D, H, W)` float32, with the padding outside `plan.regions` already set to windowed air."""
        output = np.empty((self.num_channels, *self.volume_size), dtype=np.float32)
        if tuple(tuple(r) for r in plan.regions) != tuple((0, s) for s in self.volume_size):
            for c, (low, high) in enumerate(_window_bounds(self.windows)):
                air = min(max((AIR_HU - low) / (high - low), 0.0), 1.0)
                if self.image_mean is not None:
                    air = (air - self.image_mean[c]) / self.image_std[c]
                output[c].fill(air)
        return output

    def _window_into(
        self, output: np.ndarray, values: np.ndarray, region: tuple[slice, ...], slope: float, intercept: float
    ) -> None:
        """Window resampled stored `values` into `output[:, region]` (in place, one fused pass per channel)."""
        for c, (low, high) in enumerate(_window_bounds(self.windows)):
            # (slope * v + intercept - low) / (high - low), clamped to [0, 1]: one fused scale + shift
            scale = slope / (high - low)
            shift = (intercept - low) / (high - low)
            target = output[c][region]  # a view: the ufuncs below write straight into the output
            np.multiply(values, np.float32(scale), out=target)
            np.add(target, np.float32(shift), out=target)
            np.clip(target, 0.0, 1.0, out=target)
            if self.image_mean is not None:
                np.subtract(target, np.float32(self.image_mean[c]), out=target)
                np.divide(target, np.float32(self.image_std[c]), out=target)

    def process_volume(
        self,
        volume: Any,
        anatomy_mask: Any = None,
        lesion_mask: Any = None,
        affine: Any = None,
        rescale_slope: float = 1.0,
        rescale_intercept: float = 0.0,
    ) -> dict[str, Any]:
        """Process one volume (and its masks) to the model grid.

        Args:
            volume: a path (`.nii`, `.nii.gz`, `.npy`, DICOM folder), nibabel image, 3D array/tensor or
                `(array, affine)` tuple. A 4D array whose extra trailing axes are singletons is squeezed.
            anatomy_mask, lesion_mask: optional label maps on the volume's grid (same input types). Masks that carry
                geometry may use any voxel order of that grid (see the class docstring); a bare array/tensor must
                have the volume's stored shape.
            affine: 4x4 voxel → RAS+ mm affine for array inputs (default: identity, 1 mm).
            rescale_slope, rescale_intercept: HU = slope * stored + intercept, applied to the stored values (after
                any NIfTI scl_slope/scl_inter), as CT-RATE's metadata CSV requires.

        Returns:
            `dict` with `pixel_values` `(channels, depth, height, width)` float32 tensor, `anatomy_mask` and
            `lesion_mask` `(1, depth, height, width)` int64 tensors or `None`, and `volume_meta` (a
            `VolumeMetadata`; `volume_meta.to_dict()` is JSON).

        Raises:
            FileNotFoundError, ValueError, TypeError: unreadable or invalid inputs; the message names the file or
                input and says what was expected and found.
        """
        out = self._process_volume(
            volume, anatomy_mask, lesion_mask, affine, rescale_slope, rescale_intercept, "volume"
        )
        for key in ("pixel_values", "anatomy_mask", "lesion_mask"):
            if out[key] is not None:
                out[key] = torch.from_numpy(out[key])
        return out

    # ---- batch API -----------------------------------------------------------------------------------------------

    @staticmethod
    def _as_batch(inputs: Any) -> list:
        if isinstance(inputs, list):
            return inputs
        if isinstance(inputs, tuple) and not (len(inputs) == 2 and is_array(inputs[0]) and is_affine_like(inputs[1])):
            return list(inputs)
        return [inputs]

    def preprocess(
        self,
        images: Any,
        anatomy_mask: Any = None,
        lesion_mask: Any = None,
        affines: Any = None,
        return_tensors: str | None = None,
        rescale_slope: float | Sequence[float] | None = None,
        rescale_intercept: float | Sequence[float] | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Process one volume or a list of volumes.

        Args:
            images: one volume or a list of volumes (see `process_volume` for the accepted types).
            anatomy_mask, lesion_mask: one mask per volume (same container as `images`), or None.
            affines: affine(s) for array inputs: one 4x4 for a single volume or a list (entries may be None).
            return_tensors: None (default): no conversion, lists with one numpy array per volume; `"np"` / `"pt"`:
                stacked numpy arrays / torch tensors.
            rescale_slope, rescale_intercept: HU = slope * stored + intercept (as in `process_volume`, e.g. from
                CT-RATE's metadata CSV): one number for every volume or one per volume; None = 1 and 0.
            kwargs: per-call overrides of the settings (validated like the constructor's).

        Returns:
            `BatchFeature` with `pixel_values` (per volume `(channels, depth, height, width)` float32),
            `anatomy_mask` / `lesion_mask` (per volume `(1, depth, height, width)` int64) when given, and
            `volume_meta` (list of `VolumeMetadata`, one per volume; never converted).
        """
        if kwargs:
            unknown = sorted(set(kwargs) - set(_SETTING_NAMES))
            if unknown:
                raise TypeError(
                    f"ReCTImageProcessor got unexpected argument(s) {unknown}; settings: {list(_SETTING_NAMES)}"
                )
            overridden = type(self)(**{**self._settings(), **kwargs})
            return overridden.preprocess(
                images, anatomy_mask, lesion_mask, affines, return_tensors, rescale_slope, rescale_intercept
            )
        if return_tensors not in (None, "np", "pt"):
            raise ValueError(f"return_tensors: expected None, 'np' or 'pt', found {return_tensors!r}")

        batch = self._as_batch(images)
        if not batch:
            raise ValueError("images: expected at least one volume, found an empty list")
        if affines is None:
            affine_list = [None] * len(batch)
        elif len(batch) == 1 and is_affine_like(affines):
            affine_list = [affines]
        else:
            affine_list = list(affines)
        if len(affine_list) != len(batch):
            raise ValueError(f"affines: expected one per volume ({len(batch)}), found {len(affine_list)}")
        slopes = _per_volume_numbers("rescale_slope", rescale_slope, 1.0, len(batch))
        intercepts = _per_volume_numbers("rescale_intercept", rescale_intercept, 0.0, len(batch))
        mask_lists = {}
        for key, masks in (("anatomy_mask", anatomy_mask), ("lesion_mask", lesion_mask)):
            if masks is None:
                continue
            items = self._as_batch(masks) if len(batch) > 1 or isinstance(masks, list) else [masks]
            if len(items) != len(batch):
                raise ValueError(f"{key}: expected one mask per volume ({len(batch)}), found {len(items)}")
            missing = [i for i, m in enumerate(items) if m is None]
            if missing:
                raise ValueError(f"{key}: expected a mask for every volume or none, found None at index {missing}")
            mask_lists[key] = items

        results = [
            self._process_volume(
                volume,
                mask_lists["anatomy_mask"][i] if "anatomy_mask" in mask_lists else None,
                mask_lists["lesion_mask"][i] if "lesion_mask" in mask_lists else None,
                affine_list[i],
                slopes[i],
                intercepts[i],
                f"images[{i}]",
            )
            for i, volume in enumerate(batch)
        ]
        data = {}
        for key in ("pixel_values", *mask_lists):
            items = [r[key] for r in results]
            if return_tensors is None:
                data[key] = items
            elif len(items) == 1:  # one volume: a view, no copy
                data[key] = items[0][None]
            else:
                data[key] = np.stack(items)
            if return_tensors == "pt":
                data[key] = torch.from_numpy(data[key])
        data["volume_meta"] = [r["volume_meta"] for r in results]
        return BatchFeature(data=data, tensor_type=None, skip_tensor_conversion=["volume_meta"])

    def __call__(self, images: Any = None, **kwargs) -> BatchFeature:
        """See `preprocess`."""
        if images is None:
            raise ValueError("ReCTImageProcessor: expected `images` (one CT volume or a list), found None")
        return self.preprocess(images, **kwargs)

    # ---- back to the original grid -------------------------------------------------------------------------------

    @staticmethod
    def _checked_steps(meta: VolumeMetadata, index: int) -> list[dict]:
        ops = [step.get("op") if isinstance(step, Mapping) else None for step in meta.steps]
        if sorted(op for op in ops if op is not None) != ["crop_pad", "reorient", "resample"] or None in ops:
            raise ValueError(f"volume_meta[{index}]: expected reorient/resample/crop_pad steps, found ops {ops}")
        return meta.steps

    def post_process_masks(
        self,
        masks: Any,
        volume_meta: list | VolumeMetadata | Mapping,
        is_logits: bool | None = None,
        threshold: float | None = None,
        largest_component: bool = False,
    ) -> list[np.ndarray]:
        """Map model-grid masks or logits back to each volume's original voxel grid.

        Undoes crop/pad, resizing (nearest for integer/bool masks, trilinear for float logits) and reorientation.
        Voxels of the original scan that the crop removed get 0 (masks) or the channel's minimum logit (logits).
        For a scan regridded at read time (gantry tilt, varying slice spacing) the original grid is the regular
        grid recorded in `original_shape` / `original_affine` (what `save_mask` writes).

        Args:
            masks: `(batch, channels, depth, height, width)` tensor/array (e.g. a localizer's `pred_masks`, one
                channel per prompt), or a list of `(channels, D, H, W)`.
            volume_meta: the `volume_meta` list from the processor output (one `VolumeMetadata` or its dict per
                batch item), or one record for a single volume.
            is_logits: treat values as continuous logits (trilinear) or labels (nearest). Default: floating point
                input = logits, integer/bool = labels.
            threshold: binarise logits after mapping them back (`logit > threshold`; 0.0 is probability 0.5):
                the result is a uint8 mask. None keeps the logits.
            largest_component: with `threshold`, keep only the largest 26-connected component of each channel
                (needs scipy).

        Returns:
            One numpy array per volume: shape `original_shape` when channels == 1, else `(channels, *original_shape)`.
            Labels keep their dtype; logits are float32; thresholded masks uint8.

        Raises:
            ValueError: batch size or grid shape does not match `volume_meta`, a record is not the processor's, or
                `largest_component` without `threshold`.
        """
        if largest_component and threshold is None:
            raise ValueError("post_process_masks: `largest_component=True` needs a `threshold` (it works on masks)")
        metas = [volume_meta] if isinstance(volume_meta, Mapping) else list(volume_meta)
        metas = [VolumeMetadata.coerce(meta, f"volume_meta[{i}]") for i, meta in enumerate(metas)]
        items = list(masks) if isinstance(masks, (list, tuple)) else [m for m in masks]
        if len(items) != len(metas):
            raise ValueError(f"masks: expected one mask per volume_meta entry ({len(metas)}), found {len(items)}")
        outputs = []
        for index, (item, meta) in enumerate(zip(items, metas)):
            steps = self._checked_steps(meta, index)
            array = to_array(item, f"masks[{index}]")
            if array.ndim == 3:
                array = array[None]
            grid = tuple(meta.processed_shape)
            if array.ndim != 4 or tuple(array.shape[1:]) != grid:
                raise ValueError(
                    f"masks[{index}]: expected shape (channels, {', '.join(map(str, grid))}) = the processed grid of "
                    f"{meta.source or f'volume {index}'}, found {tuple(array.shape)}"
                )
            logits = array.dtype.kind == "f" if is_logits is None else bool(is_logits)
            restored = to_original_grid(array, steps, logits)
            if threshold is not None:
                restored = (restored > threshold).astype(np.uint8)
                if largest_component:
                    restored = np.stack([_largest_component(channel) for channel in restored])
            outputs.append(restored[0] if restored.shape[0] == 1 else restored)
        return outputs

    # ---- prompts into the model grid -----------------------------------------------------------------------------

    def coordinates_to_model_grid(
        self, coordinates: Any, volume_meta: VolumeMetadata | Mapping, space: str = "voxel", label: str = "points"
    ) -> np.ndarray:
        """Map points of the original scan onto the model grid: `(..., 3)` → `(..., 3)` float32 (z, y, x) voxel
        coordinates of the processed volume (what `ReCTForLesionLocalization` takes as `input_points`).

        Args:
            coordinates: `(..., 3)` numbers: voxel indices `(i, j, k)` of the original scan in its own axis order
                (`space="voxel"`, as nibabel indexes the file's array), or world coordinates in mm, RAS+ (`"ras"`,
                nibabel's convention) or LPS+ (`"lps"`, DICOM / ITK's).
            volume_meta: the volume's `VolumeMetadata` (from the processor output).
            space: `"voxel"`, `"ras"` or `"lps"`.
            label: names the coordinates in error messages.

        The map is the exact affine one: original voxel → world (`original_affine`) → model voxel (the inverse of
        `processed_affine`). A point up to half a voxel outside the model grid is moved onto its border voxel.

        Raises:
            ValueError: an unknown `space`, coordinates not of shape `(..., 3)` or not finite, or a point outside the
                model grid (cut off by the processor's crop or outside the scan), named with its position.
        """
        meta = VolumeMetadata.coerce(volume_meta, f"{label}: volume_meta")
        points = self._coordinate_array(coordinates, 3, label)
        model = self._to_model_voxels(points, meta, space, label)
        outside = self._outside(model, meta)
        if outside.any():
            first = int(np.flatnonzero(outside)[0])
            raise ValueError(
                f"{label}: {int(outside.sum())} point(s) lie outside the model grid {list(meta.processed_shape)} of "
                f"{meta.source or 'the volume'} (cropped away, or outside the scan); the first, "
                f"{points[first].tolist()} ({space}), maps to model voxel {np.round(model[first], 2).tolist()}"
            )
        return self._clip(model, meta).reshape(np.shape(coordinates)).astype(np.float32)

    def boxes_to_model_grid(
        self, boxes: Any, volume_meta: VolumeMetadata | Mapping, space: str = "voxel", label: str = "boxes"
    ) -> np.ndarray:
        """Map boxes of the original scan onto the model grid: `(..., 6)` as two opposite corners `(i0, j0, k0, i1,
        j1, k1)` in `space` (see `coordinates_to_model_grid`) → `(..., 6)` float32 `(z0, y0, x0, z1, y1, x1)` model
        voxel coordinates (corners included, z0 <= z1 ...): the bounding box of the eight mapped corners, clipped to
        the model grid (a box the processor's crop cut keeps its inside part).

        Raises:
            ValueError: an unknown `space`, boxes not of shape `(..., 6)` or not finite, or a box entirely outside
                the model grid.
        """
        meta = VolumeMetadata.coerce(volume_meta, f"{label}: volume_meta")
        flat = self._coordinate_array(boxes, 6, label)
        low, high = np.minimum(flat[:, :3], flat[:, 3:]), np.maximum(flat[:, :3], flat[:, 3:])
        corners = np.stack([np.where(np.array(bits, bool), high, low) for bits in np.ndindex(2, 2, 2)], axis=1)
        model = self._to_model_voxels(corners.reshape(-1, 3), meta, space, label).reshape(-1, 8, 3)
        result = np.concatenate([model.min(axis=1), model.max(axis=1)], axis=1)
        upper = np.asarray(meta.processed_shape, dtype=np.float64) - 1
        disjoint = ((result[:, 3:] < -0.5) | (result[:, :3] > upper + 0.5)).any(axis=1)
        if disjoint.any():
            first = int(np.flatnonzero(disjoint)[0])
            raise ValueError(
                f"{label}: box {flat[first].tolist()} ({space}) lies entirely outside the model grid "
                f"{list(meta.processed_shape)} of {meta.source or 'the volume'} (it maps to "
                f"{np.round(result[first], 2).tolist()})"
            )
        result = np.concatenate([np.clip(result[:, :3], 0, upper), np.clip(result[:, 3:], 0, upper)], axis=1)
        return result.reshape(np.shape(boxes)).astype(np.float32)

    @staticmethod
    def _coordinate_array(values: Any, width: int, label: str) -> np.ndarray:
        array = to_array(values, label).astype(np.float64)
        if array.ndim == 0 or array.shape[-1] != width:
            raise ValueError(f"{label}: expected shape (..., {width}), found {tuple(array.shape)}")
        if not np.isfinite(array).all():
            raise ValueError(f"{label}: expected finite coordinates, found NaN or infinity")
        return array.reshape(-1, width)

    @staticmethod
    def _to_model_voxels(points: np.ndarray, meta: VolumeMetadata, space: str, label: str) -> np.ndarray:
        if space not in ("voxel", "ras", "lps"):
            raise ValueError(f"{label}: space must be 'voxel', 'ras' or 'lps', found {space!r}")
        homogeneous = np.concatenate([points, np.ones((points.shape[0], 1))], axis=1)
        if space == "voxel":
            world = homogeneous @ np.asarray(meta.original_affine, dtype=np.float64).T
        else:
            world = homogeneous.copy()
            if space == "lps":
                world[:, :2] *= -1
        return (world @ np.linalg.inv(np.asarray(meta.processed_affine, dtype=np.float64)).T)[:, :3]

    @staticmethod
    def _outside(model: np.ndarray, meta: VolumeMetadata) -> np.ndarray:
        upper = np.asarray(meta.processed_shape, dtype=np.float64) - 1
        return ((model < -0.5) | (model > upper + 0.5)).any(axis=1)

    @staticmethod
    def _clip(model: np.ndarray, meta: VolumeMetadata) -> np.ndarray:
        return np.clip(model, 0, np.asarray(meta.processed_shape, dtype=np.float64) - 1)

    # ---- findings table ------------------------------------------------------------------------------------------

    def mask_findings(
        self, mask: Any, volume_meta: VolumeMetadata | Mapping, names: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """One row per connected lesion (26-connectivity) of a mask on the ORIGINAL grid (e.g. from
        `post_process_masks(..., threshold=0.0)`): `finding` (the channel's name, or its index), `lesion` (1, 2, ...
        by decreasing size), `voxels`, `volume_ml` (voxels × voxel volume from `original_spacing`), `centroid_voxel`
        (i, j, k) and `centroid_ras` (mm, RAS+). Needs scipy.

        Args:
            mask: `original_shape` or `(channels, *original_shape)`, nonzero = lesion.
            volume_meta: the volume's `VolumeMetadata`.
            names: one name per channel (e.g. the text prompts).

        Raises:
            ValueError: the mask is not on the original grid, or `names` does not have one entry per channel.
        """
        ndimage = optional_import("scipy.ndimage", "mask_findings")
        meta = VolumeMetadata.coerce(volume_meta, "mask_findings: volume_meta")
        array = to_array(mask, "mask_findings: mask")
        shape = tuple(meta.original_shape)
        channels = array[None] if array.shape == shape else array
        if channels.ndim != 4 or tuple(channels.shape[1:]) != shape:
            raise ValueError(
                f"mask_findings: expected a mask of shape {shape} or (channels, {', '.join(map(str, shape))}) (the "
                f"original grid; use post_process_masks first), found {tuple(array.shape)}"
            )
        if names is not None and len(names) != channels.shape[0]:
            raise ValueError(
                f"mask_findings: expected {channels.shape[0]} name(s), one per channel, found {len(names)}"
            )
        affine = np.asarray(meta.original_affine, dtype=np.float64)
        voxel_ml = float(np.prod(meta.original_spacing)) / 1000.0
        rows = []
        for index, channel in enumerate(channels):
            components, count = ndimage.label(channel != 0, structure=np.ones((3, 3, 3), dtype=bool))
            if count == 0:
                continue
            sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
            centroids = ndimage.center_of_mass(np.ones(shape), components, range(1, count + 1))
            for rank, component in enumerate(np.argsort(-sizes, kind="stable"), start=1):
                centroid = np.asarray(centroids[component], dtype=np.float64)
                rows.append(
                    {
                        "finding": names[index] if names is not None else index,
                        "lesion": rank,
                        "voxels": int(sizes[component]),
                        "volume_ml": round(float(sizes[component]) * voxel_ml, 4),
                        "centroid_voxel": [round(float(c), 2) for c in centroid],
                        "centroid_ras": [round(float(c), 2) for c in (affine @ np.append(centroid, 1.0))[:3]],
                    }
                )
        return rows

    def save_mask(self, mask: Any, volume_meta: VolumeMetadata | Mapping, path: str | os.PathLike) -> str:
        """Write a mask on the ORIGINAL voxel grid as NIfTI with the original affine in both qform and sform.

        Args:
            mask: array/tensor of shape `original_shape` (or `(1, *original_shape)`), e.g. from `post_process_masks`.
            volume_meta: that volume's `VolumeMetadata` (or its dict).
            path: output `.nii` or `.nii.gz` path.

        Returns:
            The path written. Integer/bool masks are stored as uint8 when their values fit (else int16/int32),
            float masks as float32.

        Raises:
            ValueError: the mask is not on the original grid (use `post_process_masks` first), the path is not
                NIfTI, or the affine is sheared (qform and sform would disagree; the processor never records one).
        """
        nib = optional_import("nibabel", "writing NIfTI masks")
        volume_meta = VolumeMetadata.coerce(volume_meta, "save_mask: volume_meta")
        array = to_array(mask, "save_mask: mask")
        original_shape = tuple(volume_meta.original_shape)
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        if array.shape != original_shape:
            raise ValueError(
                f"save_mask: expected a mask on the original grid {original_shape} of "
                f"{volume_meta.source or 'the volume'}, found shape {array.shape}; map model outputs back "
                "with post_process_masks(masks, volume_meta) first"
            )
        if not is_nifti_path(Path(path)):
            raise ValueError(f"save_mask: expected a .nii or .nii.gz path, found {path}")
        if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
            low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
            if 0 <= low and high <= 255:
                array = array.astype(np.uint8)
            elif -(2**15) <= low and high < 2**15:
                array = array.astype(np.int16)
            else:
                array = array.astype(np.int32)
        else:
            array = array.astype(np.float32)
        affine = np.asarray(volume_meta.original_affine, dtype=np.float64)
        image = nib.Nifti1Image(array, affine)
        image.set_sform(affine, code=1)
        image.set_qform(affine, code=1)
        image.header.set_xyzt_units("mm")
        # NIfTI's qform holds only rotations (ITK-based tools read it); a sheared affine would be silently mangled.
        qform, sform = image.header.get_qform(), image.header.get_sform()
        corners = np.array([[i, j, k, 1.0] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * np.append(
            np.asarray(original_shape) - 1, 1.0
        )
        disagreement = float(np.abs(corners @ (qform - sform).T).max())
        if disagreement > 1e-3:
            raise ValueError(
                f"save_mask: the affine of {volume_meta.source or 'the volume'} is not a rotation and scaling (a "
                f"sheared grid): its qform would lie {disagreement:.3f} mm from its sform; process the scan with "
                "gantry_tilt='resample' to get an orthogonal grid"
            )
        nib.save(image, str(path))
        return str(path)
