# Copyright 2025 The ReCT-VLM authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
"""Image processor for ReCT-VLM: CT volumes (NIfTI, DICOM series, arrays) → model tensors, and masks back.

This file is Hub code: at module level it imports only the standard library, numpy, torch and transformers.
nibabel and pydicom are imported inside the functions that read or write files.

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
import importlib
import math
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

from .volume_geometry_rect import VolumeMetadata


__all__ = [
    "ReCTImageProcessor",
    "ReCTImageProcessorKwargs",
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

#: Value (HU) of the padding added by the crop/pad step: air.
AIR_HU = -1024.0

#: ITK-style name of the canonical voxel orientation of processed volumes.
CANONICAL_ORIENTATION = "LPS"

# For each processed array axis (D, H, W): the RAS world axis it runs along and the sign of its direction.
# D: inferior→superior = +z, H: anterior→posterior = -y, W: patient right→left = -x.
_CANONICAL_AXES = ((2, 1), (1, -1), (0, -1))

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
)
# Keys that transformers itself writes into / passes with a saved image-processor config.
_SERVICE_KEYS = ("image_processor_type", "processor_class", "feature_extractor_type")

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


class ReCTImageProcessorKwargs(ImagesKwargs, total=False):
    """Per-call overrides accepted by `ReCTImageProcessor.__call__` (see the class docstring)."""

    volume_size: list[int] | tuple[int, ...]
    target_spacing: list[float] | tuple[float, ...] | None
    resize_mode: str | None
    windows: list[str | list[float] | tuple[float, ...]] | tuple[str | list[float] | tuple[float, ...], ...]
    nan_policy: str
    fill_value_hu: float | int
    allow_constant_volume: bool


# ----------------------------------------------------------------------------------------------------------------
# Reading volumes
# ----------------------------------------------------------------------------------------------------------------


def _optional_import(module: str, purpose: str) -> Any:
    """Import a reader dependency at first use, so the Hub loader does not require it to import this file."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{purpose} needs the `{module}` package (pip install {module})") from err


def _source_name(path: str | os.PathLike | None, fallback: str) -> str:
    return str(path) if path is not None else fallback


def _is_nifti_path(path: Path) -> bool:
    return path.name.lower().endswith(_NIFTI_SUFFIXES)


_LIBDEFLATE: Any = False  # not looked up yet; None when unavailable


def _libdeflate() -> Any:
    """The system libdeflate (if installed), which inflates ~2x faster than zlib; None otherwise.

    Optional accelerator found with ctypes (standard library) at first use: nothing to install, and without it the
    zlib path below gives identical bytes.
    """
    global _LIBDEFLATE
    if _LIBDEFLATE is False:
        _LIBDEFLATE = None
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("deflate")
        if name is not None:
            try:
                lib = ctypes.CDLL(name)
                lib.libdeflate_alloc_decompressor.restype = ctypes.c_void_p
                lib.libdeflate_free_decompressor.argtypes = [ctypes.c_void_p]
                lib.libdeflate_gzip_decompress_ex.restype = ctypes.c_int
                lib.libdeflate_gzip_decompress_ex.argtypes = [
                    ctypes.c_void_p,
                    ctypes.c_char_p,
                    ctypes.c_size_t,
                    ctypes.c_void_p,
                    ctypes.c_size_t,
                    ctypes.POINTER(ctypes.c_size_t),
                    ctypes.POINTER(ctypes.c_size_t),
                ]
                _LIBDEFLATE = lib
            except (OSError, AttributeError):  # an incompatible build: fall back to zlib
                _LIBDEFLATE = None
    return _LIBDEFLATE


def _inflate_libdeflate(compressed: bytes, size: int) -> np.ndarray | None:
    """Inflate a single-member gzip stream of exactly `size` bytes with libdeflate; None to fall back to zlib."""
    lib = _libdeflate()
    if lib is None:
        return None
    import ctypes

    out = np.empty(size, dtype=np.uint8)
    used_in, used_out = ctypes.c_size_t(0), ctypes.c_size_t(0)
    decompressor = lib.libdeflate_alloc_decompressor()
    if not decompressor:
        return None
    try:
        status = lib.libdeflate_gzip_decompress_ex(
            decompressor,
            compressed,
            len(compressed),
            out.ctypes.data,
            size,
            ctypes.byref(used_in),
            ctypes.byref(used_out),
        )
    finally:
        lib.libdeflate_free_decompressor(decompressor)
    # anything unusual (corrupt data, several gzip members, trailing data): let zlib redo it and explain
    if status != 0 or used_out.value != size or len(compressed[used_in.value :].strip(b"\x00")) != 0:
        return None
    return out


def _read_gzip(path: Path, size: int) -> np.ndarray:
    """Decompress a whole `.gz` file into a uint8 array (read-only on the zlib path, which avoids a copy).

    nibabel's chunked GzipFile reads are ~1.5x slower than one zlib pass and ~3x slower than libdeflate.
    `size` is the expected decompressed size.
    """
    with open(path, "rb") as handle:
        compressed = handle.read()
    fast = _inflate_libdeflate(compressed, size)
    if fast is not None:
        return fast
    chunks = []
    while compressed:
        decompressor = zlib.decompressobj(wbits=31)
        chunks.append(decompressor.decompress(compressed))
        if not decompressor.eof:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")
        compressed = decompressor.unused_data.lstrip(b"\x00")
    return np.frombuffer(chunks[0] if len(chunks) == 1 else b"".join(chunks), dtype=np.uint8)


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Read a NIfTI file as (stored array, RAS affine, scl_slope, scl_inter), without applying the scaling."""
    nib = _optional_import("nibabel", "reading NIfTI files")
    expected = "a NIfTI-1/NIfTI-2 image (.nii or gzip-compressed .nii.gz)"
    try:
        image = nib.load(str(path))
    except (
        nib.filebasedimages.ImageFileError,
        nib.spatialimages.HeaderDataError,
        OSError,
        EOFError,
        zlib.error,
        ValueError,
    ) as err:
        found = f"{type(err).__name__}: {err}"
        raise ValueError(f"could not read NIfTI file {path}: expected {expected}, found {found}") from err
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ValueError(f"could not read NIfTI file {path}: expected {expected}, found {type(image).__name__}")
    proxy = image.dataobj
    shape, dtype = tuple(int(s) for s in proxy.shape), np.dtype(proxy.dtype)
    try:
        if path.name.lower().endswith(".gz") and proxy.order == "F":
            offset = int(proxy.offset)
            count = int(np.prod(shape, dtype=np.int64))
            needed = offset + count * dtype.itemsize
            raw = _read_gzip(path, needed)
            if len(raw) < needed:
                raise EOFError(f"{len(raw)} decompressed bytes, the header needs {needed}")
            array = raw[offset:needed].view(dtype).reshape(shape, order="F")
        else:
            array = np.asanyarray(proxy.get_unscaled())
    except (OSError, EOFError, zlib.error, ValueError) as err:
        raise ValueError(
            f"NIfTI file {path} is truncated or corrupt: the header promises shape {shape} of {dtype}, "
            f"but reading the voxel data failed ({type(err).__name__}: {err})"
        ) from err
    slope = float(proxy.slope) if np.isfinite(proxy.slope) and proxy.slope != 0 else 1.0
    inter = float(proxy.inter) if np.isfinite(proxy.inter) else 0.0
    return array, np.asarray(image.affine, dtype=np.float64), slope, inter


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CT series from a folder as (float32 HU array (slices, rows, columns), RAS affine)."""
    pydicom = _optional_import("pydicom", "reading DICOM series")
    InvalidDicomError = pydicom.errors.InvalidDicomError  # noqa: N806 - an exception class

    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise FileNotFoundError(f"DICOM folder {folder} is empty: expected the files of one CT series, found no files")
    slices, skipped = [], []
    for file in files:
        try:
            ds = pydicom.dcmread(str(file))
        except InvalidDicomError:
            skipped.append(file.name)
            continue
        except (OSError, EOFError, ValueError) as err:
            raise ValueError(f"could not read DICOM file {file}: {type(err).__name__}: {err}") from err
        if "PixelData" not in ds:  # DICOMDIR, structured reports, ...: not slices of the series
            skipped.append(file.name)
            continue
        slices.append((file, ds))
    if not slices:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        raise ValueError(
            f"DICOM folder {folder}: expected the files of one CT series, found no DICOM image among its "
            f"{len(files)} file(s) ({shown})"
        )
    for file, ds in slices:
        modality = ds.get("Modality")
        if modality != "CT":
            raise ValueError(f"DICOM file {file}: expected Modality 'CT', found {modality!r}")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise ValueError(
                f"DICOM file {file}: expected single-frame CT slices, found NumberOfFrames={ds.NumberOfFrames} "
                "(multi-frame/enhanced CT is not supported)"
            )
    series = {}
    for file, ds in slices:
        series.setdefault(str(ds.get("SeriesInstanceUID")), []).append(file.name)
    if len(series) > 1:
        listing = "; ".join(f"{uid} ({len(names)} files, e.g. {names[0]})" for uid, names in sorted(series.items()))
        raise ValueError(
            f"DICOM folder {folder}: expected one series, found {len(series)} SeriesInstanceUIDs: {listing}"
        )

    def geometry(file, ds, key):
        if key not in ds:
            raise ValueError(f"DICOM file {file}: expected the {key} attribute, found none")
        return np.asarray([float(v) for v in ds[key].value], dtype=np.float64)

    first_file, first = slices[0]
    iop = geometry(first_file, first, "ImageOrientationPatient")
    spacing = geometry(first_file, first, "PixelSpacing")
    shape2d = (int(first.Rows), int(first.Columns))
    for file, ds in slices[1:]:
        if not np.allclose(geometry(file, ds, "ImageOrientationPatient"), iop, atol=1e-4):
            raise ValueError(
                f"DICOM file {file}: ImageOrientationPatient differs from {first_file.name}'s {iop.tolist()}"
            )
        if not np.allclose(geometry(file, ds, "PixelSpacing"), spacing, atol=1e-4):
            raise ValueError(f"DICOM file {file}: PixelSpacing differs from {first_file.name}'s {spacing.tolist()}")
        if (int(ds.Rows), int(ds.Columns)) != shape2d:
            found = (int(ds.Rows), int(ds.Columns))
            raise ValueError(f"DICOM file {file}: expected {shape2d} rows x columns, found {found}")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.stack([geometry(file, ds, "ImagePositionPatient") for file, ds in slices])
    along_normal = positions @ normal
    order = np.argsort(along_normal, kind="stable")
    slices = [slices[i] for i in order]
    positions, along_normal = positions[order], along_normal[order]
    if len(slices) > 1:
        gaps = np.diff(along_normal)
        duplicates = np.flatnonzero(gaps < 1e-3)
        if duplicates.size:
            i = int(duplicates[0])
            raise ValueError(
                f"DICOM folder {folder}: expected one slice per position, found {slices[i][0].name} and "
                f"{slices[i + 1][0].name} both at {along_normal[i]:.3f} mm along the slice normal"
            )
        median = float(np.median(gaps))
        missing = np.flatnonzero(gaps > 1.5 * median)
        if missing.size:
            where = ", ".join(f"between {along_normal[i]:.3f} and {along_normal[i + 1]:.3f} mm" for i in missing)
            raise ValueError(
                f"DICOM folder {folder}: missing slice(s): expected a slice every {median:.3f} mm along the slice "
                f"normal, found gaps {where}"
            )
        slice_step = (positions[-1] - positions[0]) / (len(slices) - 1)
    else:
        thickness = float(slices[0][1].get("SliceThickness", 1.0) or 1.0)
        slice_step = normal * thickness

    volume = np.empty((len(slices),) + shape2d, dtype=np.float32)
    for index, (file, ds) in enumerate(slices):
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        try:
            pixels = ds.pixel_array
        except (AttributeError, ValueError, RuntimeError, NotImplementedError) as err:
            raise ValueError(f"DICOM file {file}: could not decode pixel data ({type(err).__name__}: {err})") from err
        np.multiply(pixels, slope, out=volume[index], casting="unsafe")
        volume[index] += intercept

    # Array axes: 0 = slice (along the normal), 1 = row index (follows the column direction cosine, spaced by
    # PixelSpacing[0]), 2 = column index (follows the row direction cosine, spaced by PixelSpacing[1]).
    affine = np.eye(4)
    affine[:3, 0] = slice_step
    affine[:3, 1] = col_dir * spacing[0]
    affine[:3, 2] = row_dir * spacing[1]
    affine[:3, 3] = positions[0]
    affine[:2] *= -1.0  # LPS -> RAS
    return volume, affine


def _read_path(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, float, float]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"volume file {path} does not exist")
    if path.is_dir():
        array, affine = _read_dicom_series(path)
        return array, affine, 1.0, 0.0
    if _is_nifti_path(path):
        return _read_nifti(path)
    if path.name.lower().endswith(".npy"):
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"could not read .npy file {path}: {type(err).__name__}: {err}") from err
        return array, np.eye(4), 1.0, 0.0
    raise ValueError(
        f"unsupported volume file {path}: expected a .nii/.nii.gz file, a .npy file or a folder holding one "
        f"DICOM series, found suffix {''.join(path.suffixes) or '(none)'!r}"
    )


def _is_nibabel_image(obj: Any) -> bool:
    return hasattr(obj, "dataobj") and hasattr(obj, "affine") and hasattr(obj, "header")


def _is_array(obj: Any) -> bool:
    return isinstance(obj, (np.ndarray, torch.Tensor))


def _is_affine_like(obj: Any) -> bool:
    return (_is_array(obj) or isinstance(obj, (list, tuple))) and np.shape(np.asarray(obj, dtype=object)) == (4, 4)


def _read_any(
    obj: Any, affine: Any, label: str
) -> tuple[np.ndarray | torch.Tensor, np.ndarray, float, float, str | None]:
    """Resolve one input to (stored array, RAS affine, slope, intercept, source path or None).

    `affine` is the explicit affine for array inputs (None: the array's own or the identity).
    """
    if isinstance(obj, (str, os.PathLike)):
        array, file_affine, slope, inter = _read_path(obj)
        return array, file_affine, slope, inter, str(obj)
    if isinstance(obj, tuple) and len(obj) == 2 and _is_array(obj[0]) and _is_affine_like(obj[1]):
        array, affine = obj
        return array, _check_affine(affine, label), 1.0, 0.0, None
    if _is_nibabel_image(obj):
        proxy = obj.dataobj
        if hasattr(proxy, "get_unscaled"):
            array = np.asanyarray(proxy.get_unscaled())
            slope = float(proxy.slope) if np.isfinite(proxy.slope) and proxy.slope != 0 else 1.0
            inter = float(proxy.inter) if np.isfinite(proxy.inter) else 0.0
        else:
            array, slope, inter = np.asanyarray(proxy), 1.0, 0.0
        filename = obj.get_filename() if hasattr(obj, "get_filename") else None
        return array, _check_affine(obj.affine, label), slope, inter, filename
    if _is_array(obj):
        return obj, (np.eye(4) if affine is None else _check_affine(affine, label)), 1.0, 0.0, None
    raise TypeError(
        f"{label}: expected a path (.nii, .nii.gz, .npy, DICOM folder), a nibabel image, a 3D numpy array or "
        f"torch tensor, or an (array, affine) tuple, found {type(obj).__name__}"
    )


def _check_affine(affine: Any, label: str) -> np.ndarray:
    if isinstance(affine, torch.Tensor):
        affine = affine.detach().cpu().numpy()
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"{label}: expected a 4x4 voxel-to-RAS affine, found shape {affine.shape}")
    if not np.all(np.isfinite(affine)):
        raise ValueError(f"{label}: expected a finite affine, found {affine.tolist()}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(
            f"{label}: expected an invertible affine, found a singular 3x3 part {affine[:3, :3].tolist()}"
        )
    return affine


def load_volume(path_or_obj: Any) -> tuple[np.ndarray, np.ndarray]:
    """Load a CT volume as `(array, affine)`.

    Args:
        path_or_obj: a `.nii`/`.nii.gz` file, a `.npy` file (identity affine), a folder holding one DICOM CT
            series, a nibabel image, a numpy array / torch tensor (identity affine) or an `(array, affine)` tuple.

    Returns:
        `array`: the voxel values in the file's own axis order (HU for CT). Stored integer data without scaling is
        returned as is (no copy, e.g. int16, possibly a read-only view of the decompressed file); NIfTI
        `scl_slope`/`scl_inter` and DICOM RescaleSlope/RescaleIntercept are applied (float32). DICOM series are
        `(slices, rows, columns)`, slices sorted along the slice normal. `affine`: 4x4 float64 voxel-index → RAS+ mm.

    Raises:
        FileNotFoundError: missing path or empty DICOM folder.
        ValueError: unreadable, truncated or non-NIfTI file behind a NIfTI name; DICOM folder without CT images,
            with several series, non-CT modality or missing slices.
        TypeError: unsupported input type.
    """
    array, affine, slope, inter, _ = _read_any(path_or_obj, None, "volume")
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    if slope != 1.0 or inter != 0.0:
        array = np.asarray(array, dtype=np.float32) * np.float32(slope) + np.float32(inter)
    return np.asanyarray(array), affine


# ----------------------------------------------------------------------------------------------------------------
# Geometry: reorientation, resampling, crop/pad as per-axis index maps
# ----------------------------------------------------------------------------------------------------------------


def _axis_directions(affine: np.ndarray) -> tuple[list[int], list[int]]:
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


def _reorientation(shape: tuple[int, ...], affine: np.ndarray) -> tuple[list[int], list[bool], np.ndarray]:
    """Permutation and flips taking the input voxel axes to the canonical (D, H, W) layout, and the new affine.

    Canonical axis `k` is input axis `permutation[k]`, reversed when `flip[k]`.
    """
    world, sign = _axis_directions(affine)
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


def _resize_affine(affine: np.ndarray, shape_before: list[int], shape_after: list[int]) -> np.ndarray:
    # Voxel-centre aligned (align_corners=False): new index n samples old continuous index (n + 0.5) * s - 0.5.
    transform = np.eye(4)
    for k in range(3):
        scale = shape_before[k] / shape_after[k]
        transform[k, k] = scale
        transform[k, 3] = 0.5 * scale - 0.5
    return affine @ transform


def _linear_taps(in_len: int, out_len: int, start: int, stop: int, flip: bool):
    """1D linear-interpolation taps for output indices [start, stop) of an in_len → out_len resize.

    Identical to `torch.nn.functional.interpolate(mode="linear", align_corners=False)`. Returns (i0, i1, w) with
    out = (1 - w) * x[i0] + w * x[i1], or None when the map is the identity.
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


def _nearest_taps(in_len: int, out_len: int, start: int, stop: int, flip: bool):
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


def _apply_linear(source: np.ndarray, taps: list) -> np.ndarray:
    """Separable linear resampling (one 1D pass per axis that changes) to float32.

    Trilinear interpolation is separable, so this equals `F.interpolate(mode="trilinear", align_corners=False)`,
    but it gathers straight from the stored dtype (e.g. int16) and shrinks the data along the most-reduced axis
    first, so most of the volume is never converted to float. numpy, not torch: the gathers are memory-bound
    copies, and single-threaded numpy stays fast where torch's thread pool stalls on a busy machine (DataLoader
    workers, several jobs per node).
    """
    order = sorted(
        (k for k in range(source.ndim) if taps[k] is not None), key=lambda k: len(taps[k][0]) / source.shape[k]
    )
    x = source
    for k in order:
        i0, i1, weight = taps[k]
        low = np.take(x, i0, axis=k)  # a new array: safe to update in place
        if weight.any():
            shape = [1] * x.ndim
            shape[k] = -1
            weight = weight.reshape(shape)
            high = np.take(x, i1, axis=k)
            # (1 - w) * low + w * high, as F.interpolate computes it; the ufuncs cast int16 → float32 on the fly
            result = np.multiply(low, 1.0 - weight, dtype=np.float32)
            if high.dtype == np.float32:
                high *= weight
            else:
                high = np.multiply(high, weight, dtype=np.float32)
            result += high
            low = result
        x = low
    return x if x.dtype == np.float32 else x.astype(np.float32)


def _apply_nearest(source: np.ndarray, taps: list) -> np.ndarray:
    x = source
    for k in sorted(
        (k for k in range(source.ndim) if taps[k] is not None), key=lambda k: len(taps[k]) / source.shape[k]
    ):
        x = np.take(x, taps[k], axis=k)
    return x


def _crop_pad_amounts(current: list[int], target: list[int]) -> tuple[list[int], list[int]]:
    """Centre crop/pad: signed amounts added before/after each axis (negative = cropped)."""
    before, after = [], []
    for have, want in zip(current, target):
        diff = want - have
        b = diff // 2 if diff >= 0 else -((-diff) // 2)
        before.append(b)
        after.append(diff - b)
    return before, after


# ----------------------------------------------------------------------------------------------------------------
# Input normalisation helpers
# ----------------------------------------------------------------------------------------------------------------


def _to_array(array: np.ndarray | torch.Tensor, label: str) -> np.ndarray:
    """A numpy view of `array` (no copy where possible) with real numeric voxels."""
    if isinstance(array, torch.Tensor):
        tensor = array.detach().cpu()
        if tensor.is_complex():
            raise ValueError(f"{label}: expected real numeric voxel values, found dtype {tensor.dtype}")
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
            tensor = tensor.to(torch.float32)
        array = tensor.numpy()
    array = np.asarray(array)  # drops np.memmap & co; views stay views
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{label}: expected real numeric voxel values, found dtype {array.dtype}")
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    return array


def _as_3d(array: np.ndarray, label: str) -> np.ndarray:
    if array.ndim > 3 and all(s == 1 for s in array.shape[3:]):
        array = array.reshape(array.shape[:3])  # (X, Y, Z, 1): a 3D volume stored with a singleton time axis
    if array.ndim != 3:
        hint = " (a single slice: CT volumes must be 3D)" if array.ndim == 2 else ""
        hint = hint or (" (several volumes or channels: pass a list of 3D volumes)" if array.ndim > 3 else "")
        raise ValueError(
            f"{label}: expected a 3D volume (a 4D one only with trailing singleton axes), found shape "
            f"{tuple(array.shape)} ({array.ndim}D){hint}"
        )
    if min(array.shape) < 1:
        raise ValueError(f"{label}: expected a non-empty 3D volume, found shape {tuple(array.shape)}")
    return array


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _window_bounds(windows: list) -> list[tuple[float, float]]:
    bounds = []
    for window in windows:
        center, width = NAMED_WINDOWS[window] if isinstance(window, str) else window
        bounds.append((center - width / 2.0, center + width / 2.0))
    return bounds


# ----------------------------------------------------------------------------------------------------------------
# The processor
# ----------------------------------------------------------------------------------------------------------------


class ReCTImageProcessor(BaseImageProcessor):
    r"""
    Turns CT volumes (NIfTI, DICOM series, `.npy`, nibabel images, arrays) into `pixel_values`
    `(batch, channels, depth, height, width)` for the ReCT models, carries anatomy/lesion masks along the identical
    geometric path, and maps model-grid masks back to each original scan.

    Steps, per volume: read → check values (NaN/inf, constant) → **reorient** to the canonical orientation →
    **resample** (trilinear for images, nearest neighbour for masks) → **centre crop/pad** (pad = air, -1024 HU)
    → **window** (one channel per HU window, each scaled to [0, 1]) → optional per-channel normalisation. Every
    geometric step is recorded in `volume_meta` so predictions map back with `post_process_masks`.

    Resampling is voxel-centre aligned: images equal `F.interpolate(mode="trilinear", align_corners=False)`,
    masks `F.interpolate(mode="nearest-exact")` (torch's legacy `"nearest"` is shifted by half a voxel, which
    would misalign masks and images). Both are computed separably, one gather per axis that changes, straight
    from the stored dtype (e.g. int16); reorientation and crop/pad are folded into the gather indices, so only
    the voxels that reach the output are ever converted to float32. Windowing runs after resampling, on the
    output grid, writing each channel in place.

    Canonical orientation: LPS+ voxel orientation (the DICOM/ITK convention), laid out as `(D, H, W)` =
    (inferior→superior, anterior→posterior, patient right→left), i.e. nibabel axis codes `("S", "P", "L")`. An
    axial slice `pixel_values[b, c, d]` displays like a radiology viewer: anterior at the top, the patient's right
    on the viewer's left. World coordinates and affines are nibabel's RAS+ mm convention everywhere (a DICOM LPS
    affine has its rows 0 and 1 negated). Reorientation is an axis permutation plus flips chosen from the affine
    (for oblique scans: the closest axes; the affine stays exact, nothing is resampled for it).

    Args:
        volume_size (`list[int]`, defaults to `[64, 512, 512]`):
            Output `(D, H, W)` in voxels.
        target_spacing (`list[float]`, *optional*):
            Spacing in mm along `(D, H, W)` = (z, y, x) to resample to before the crop/pad step. Requires
            `resize_mode="crop_pad"`.
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

    Raises:
        ValueError: a setting outside its allowed values (the message names the field).
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = ReCTImageProcessorKwargs
    # `save_pretrained` copies this file next to the settings and writes the `auto_map` for it.
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
        if nan_policy not in ("raise", "fill"):
            raise ValueError(f"nan_policy: expected 'raise' or 'fill', found {nan_policy!r}")
        self.nan_policy = nan_policy
        if not _is_number(fill_value_hu) or not math.isfinite(fill_value_hu):
            raise ValueError(f"fill_value_hu: expected a finite number of HU, found {fill_value_hu!r}")
        self.fill_value_hu = float(fill_value_hu)
        if not isinstance(allow_constant_volume, bool):
            raise ValueError(f"allow_constant_volume: expected True or False, found {allow_constant_volume!r}")
        self.allow_constant_volume = allow_constant_volume

    # ---- settings ------------------------------------------------------------------------------------------------

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

    @property
    def num_channels(self) -> int:
        """Number of output channels (one per window)."""
        return len(self.windows)

    # ---- per-volume processing -----------------------------------------------------------------------------------

    def _plan(self, shape: tuple[int, ...], affine: np.ndarray) -> dict[str, Any]:
        """Geometric plan of one volume: the canonical layout, the recorded steps, and per-axis index maps."""
        permutation, flip, affine_r = _reorientation(shape, affine)
        shape_r = [int(shape[j]) for j in permutation]
        spacing_r = np.linalg.norm(affine_r[:3, :3], axis=0)
        target = list(self.volume_size)
        if self.resize_mode == "resize":
            resampled = list(target)
        elif self.target_spacing is not None:
            resampled = [max(1, int(round(shape_r[k] * spacing_r[k] / self.target_spacing[k]))) for k in range(3)]
        else:
            resampled = list(shape_r)
        affine_s = _resize_affine(affine_r, shape_r, resampled)
        pad_before, pad_after = _crop_pad_amounts(resampled, target)
        crop_transform = np.eye(4)
        crop_transform[:3, 3] = [-p for p in pad_before]
        affine_out = affine_s @ crop_transform

        regions, linear, nearest = [], [], []
        for k in range(3):
            start, stop = max(0, pad_before[k]), min(target[k], pad_before[k] + resampled[k])
            regions.append((start, stop))
            m0, m1 = start - pad_before[k], stop - pad_before[k]  # indices on the resampled grid
            linear.append(_linear_taps(shape_r[k], resampled[k], m0, m1, flip[k]))
            nearest.append(_nearest_taps(shape_r[k], resampled[k], m0, m1, flip[k]))
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
                "spacing_after": [float(s) for s in np.linalg.norm(affine_s[:3, :3], axis=0)],
            },
            {
                "op": "crop_pad",
                "pad_before": pad_before,
                "pad_after": pad_after,
                "shape_before": resampled,
                "shape_after": target,
                "pad_value_hu": AIR_HU,
            },
        ]
        return {
            "permutation": permutation,
            "regions": regions,
            "linear": linear,
            "nearest": nearest,
            "steps": steps,
            "affine": affine_out,
        }

    @staticmethod
    def _prepare_mask(mask: Any, volume_shape: tuple[int, ...], volume_affine: np.ndarray, label: str) -> np.ndarray:
        has_geometry = (
            isinstance(mask, (str, os.PathLike))
            or _is_nibabel_image(mask)
            or (isinstance(mask, tuple) and len(mask) == 2)
        )
        array, mask_affine, slope, inter, path = _read_any(mask, None, label)
        name = _source_name(path, label)
        labels = _as_3d(_to_array(array, name), name)
        if slope != 1.0 or inter != 0.0:
            labels = labels.astype(np.float32) * np.float32(slope) + np.float32(inter)
        if tuple(labels.shape) != tuple(volume_shape):
            raise ValueError(
                f"{name}: expected the shape of its volume {tuple(volume_shape)}, found {tuple(labels.shape)}"
            )
        # A bare array/tensor carries no geometry: it is taken to lie on its volume's grid.
        if has_geometry and not np.allclose(mask_affine, volume_affine, atol=1e-3):
            raise ValueError(
                f"{name}: expected the affine of its volume {np.round(volume_affine, 4).tolist()}, "
                f"found {np.round(mask_affine, 4).tolist()}"
            )
        if labels.dtype.kind == "f":
            if not np.isfinite(labels).all():
                raise ValueError(f"{name}: expected integer label values, found NaN/inf")
            if not np.array_equal(labels, np.round(labels)):
                raise ValueError(
                    f"{name}: expected integer label values, found fractional values (a probability map?)"
                )
        return labels

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
        for field, value in (("rescale_slope", rescale_slope), ("rescale_intercept", rescale_intercept)):
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"{field} for {label}: expected a finite number, found {value!r}")
        if rescale_slope == 0:
            raise ValueError(f"rescale_slope for {label}: expected a non-zero number, found 0")
        array, affine, stored_slope, stored_inter, path = _read_any(volume, affine, label)
        name = _source_name(path, label)
        source = _as_3d(_to_array(array, name), name)
        if source.dtype == np.bool_:
            source = source.view(np.uint8)
        # HU = slope * stored + intercept, composing file scaling (NIfTI scl_*) and the caller's (e.g. CT-RATE CSV).
        slope = float(rescale_slope) * stored_slope
        intercept = float(rescale_slope) * stored_inter + float(rescale_intercept)

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
            del finite
        if self._is_constant(source):
            value = float(source[0, 0, 0]) * slope + intercept
            if not self.allow_constant_volume:
                raise ValueError(
                    f"{name}: expected a volume with varying intensities, found a constant volume (every voxel "
                    f"= {value:g} HU); set allow_constant_volume=True to process it anyway"
                )

        masks = {}
        for key, mask in (("anatomy_mask", anatomy_mask), ("lesion_mask", lesion_mask)):
            if mask is not None:
                masks[key] = self._prepare_mask(mask, tuple(source.shape), affine, f"{key} of {name}")

        plan = self._plan(tuple(source.shape), affine)
        permutation = plan["permutation"]
        resampled = _apply_linear(source.transpose(permutation), plan["linear"])
        pixel_values = torch.from_numpy(self._window(resampled, plan["regions"], slope, intercept))

        outputs = {"pixel_values": pixel_values, "anatomy_mask": None, "lesion_mask": None}
        for key, mask in masks.items():
            full = np.zeros((1, *self.volume_size), dtype=np.int64)
            full[(0, *(slice(a, b) for a, b in plan["regions"]))] = _apply_nearest(
                mask.transpose(permutation), plan["nearest"]
            )
            outputs[key] = torch.from_numpy(full)

        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        outputs["volume_meta"] = VolumeMetadata(
            source=path,
            original_shape=[int(s) for s in source.shape],
            original_affine=affine.tolist(),
            original_spacing=[float(s) for s in spacing],
            processed_shape=list(self.volume_size),
            processed_affine=plan["affine"].tolist(),
            orientation=CANONICAL_ORIENTATION,
            rescale_slope=slope,
            rescale_intercept=intercept,
            steps=plan["steps"],
        )
        return outputs

    @staticmethod
    def _is_constant(source: np.ndarray) -> bool:
        # cheap early exit: a few spread-out voxels already differ in any real scan
        probe = source[tuple(np.array([0, s // 2, s - 1]) for s in source.shape)]
        if (probe != probe[0]).any():
            return False
        return bool(source.min() == source.max())

    def _window(
        self, values: np.ndarray, regions: list[tuple[int, int]], slope: float, intercept: float
    ) -> np.ndarray:
        """Window the resampled stored values into (C, D, H, W) float32; voxels outside `regions` are padding (air)."""
        channels = self.num_channels
        output = np.empty((channels, *self.volume_size), dtype=np.float32)
        padded = tuple(tuple(r) for r in regions) != tuple((0, s) for s in self.volume_size)
        region = tuple(slice(a, b) for a, b in regions)
        for c, (low, high) in enumerate(_window_bounds(self.windows)):
            # (slope * v + intercept - low) / (high - low), clamped to [0, 1]: one fused scale + shift
            scale = slope / (high - low)
            shift = (intercept - low) / (high - low)
            air = min(max((AIR_HU - low) / (high - low), 0.0), 1.0)
            if self.image_mean is not None:
                mean, std = self.image_mean[c], self.image_std[c]
            channel = output[c]
            if padded:
                channel.fill(air if self.image_mean is None else (air - mean) / std)
            target = channel[region]  # a view: the ufuncs below write straight into the output
            np.multiply(values, np.float32(scale), out=target)
            np.add(target, np.float32(shift), out=target)
            np.clip(target, 0.0, 1.0, out=target)
            if self.image_mean is not None:
                np.subtract(target, np.float32(mean), out=target)
                np.divide(target, np.float32(std), out=target)
        return output

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
            anatomy_mask, lesion_mask: optional label maps of the same shape (same input types). Masks that carry
                geometry (files, nibabel images, `(array, affine)` tuples) must match the volume's affine
                (`np.allclose(atol=1e-3)`); a bare array/tensor has none and is taken to lie on the volume's grid.
            affine: 4x4 voxel → RAS+ mm affine for array inputs (default: identity, 1 mm).
            rescale_slope, rescale_intercept: HU = slope * stored + intercept, applied to the stored values (after
                any NIfTI scl_slope/scl_inter), as CT-RATE's metadata CSV requires.

        Returns:
            `dict` with `pixel_values` `(channels, depth, height, width)` float32 tensor, `anatomy_mask` and
            `lesion_mask` `(1, depth, height, width)` int64 tensors or `None`, and `volume_meta` (JSON-serialisable
            dict: source, original_shape/affine/spacing, processed_shape/affine, steps).

        Raises:
            FileNotFoundError, ValueError, TypeError: unreadable or invalid inputs; the message names the file or
                input and says what was expected and found.
        """
        return self._process_volume(
            volume, anatomy_mask, lesion_mask, affine, rescale_slope, rescale_intercept, "volume"
        )

    # ---- batch API -----------------------------------------------------------------------------------------------

    @staticmethod
    def _as_batch(inputs: Any) -> list:
        if isinstance(inputs, list):
            return inputs
        if isinstance(inputs, tuple) and not (
            len(inputs) == 2 and _is_array(inputs[0]) and _is_affine_like(inputs[1])
        ):
            return list(inputs)
        return [inputs]

    def preprocess(
        self,
        volumes: Any,
        anatomy_mask: Any = None,
        lesion_mask: Any = None,
        affines: Any = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Process one volume or a list of volumes.

        Args:
            volumes: one input or a list of inputs (see `process_volume`).
            anatomy_mask, lesion_mask: one mask per volume (same container as `volumes`), or None.
            affines: affine(s) for array inputs: one 4x4 for a single volume or a list (entries may be None).
            return_tensors: `"pt"` (default), `"np"` or None (torch tensors).
            kwargs: per-call overrides of the settings (validated like the constructor's).

        Returns:
            `BatchFeature` with `pixel_values` `(batch, channels, depth, height, width)` float32, `anatomy_mask` /
            `lesion_mask` `(batch, 1, depth, height, width)` int64 when given, and `volume_meta` (list of dicts, one
            per volume; never converted to tensors).
        """
        if kwargs:
            unknown = sorted(set(kwargs) - set(_SETTING_NAMES))
            if unknown:
                raise TypeError(
                    f"ReCTImageProcessor got unexpected argument(s) {unknown}; settings: {list(_SETTING_NAMES)}"
                )
            overridden = type(self)(**{**self._settings(), **kwargs})
            return overridden.preprocess(volumes, anatomy_mask, lesion_mask, affines, return_tensors)

        batch = self._as_batch(volumes)
        if not batch:
            raise ValueError("volumes: expected at least one volume, found an empty list")
        if affines is None:
            affine_list = [None] * len(batch)
        elif len(batch) == 1 and _is_affine_like(affines):
            affine_list = [affines]
        else:
            affine_list = list(affines)
        if len(affine_list) != len(batch):
            raise ValueError(f"affines: expected one per volume ({len(batch)}), found {len(affine_list)}")
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

        results = []
        for i, volume in enumerate(batch):
            results.append(
                self._process_volume(
                    volume,
                    mask_lists.get("anatomy_mask", [None] * len(batch))[i],
                    mask_lists.get("lesion_mask", [None] * len(batch))[i],
                    affine_list[i],
                    1.0,
                    0.0,
                    f"volumes[{i}]",
                )
            )

        def batched(key):  # one volume: a view, no copy
            items = [r[key] for r in results]
            return items[0].unsqueeze(0) if len(items) == 1 else torch.stack(items)

        data = {"pixel_values": batched("pixel_values")}
        for key in mask_lists:
            data[key] = batched(key)
        if return_tensors == "np":
            data = {k: v.numpy() for k, v in data.items()}
        elif return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors: expected 'pt', 'np' or None, found {return_tensors!r}")
        data["volume_meta"] = [r["volume_meta"] for r in results]
        return BatchFeature(data=data, tensor_type=None, skip_tensor_conversion=["volume_meta"])

    def __call__(
        self,
        volumes: Any,
        anatomy_mask: Any = None,
        lesion_mask: Any = None,
        affines: Any = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """See `preprocess`."""
        return self.preprocess(
            volumes,
            anatomy_mask=anatomy_mask,
            lesion_mask=lesion_mask,
            affines=affines,
            return_tensors=return_tensors,
            **kwargs,
        )

    # ---- back to the original grid -------------------------------------------------------------------------------

    @staticmethod
    def _steps(meta: dict, index: int) -> dict[str, dict]:
        try:
            steps = {step["op"]: step for step in meta["steps"]}
            missing = [op for op in ("reorient", "resample", "crop_pad") if op not in steps]
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"volume_meta[{index}]: expected the dict returned by the processor, found {meta!r:.200}"
            ) from err
        if missing:
            raise ValueError(f"volume_meta[{index}]: expected reorient/resample/crop_pad steps, missing {missing}")
        return steps

    def post_process_masks(
        self, masks: Any, volume_meta: list[dict] | dict, is_logits: bool | None = None
    ) -> list[np.ndarray]:
        """Map model-grid masks or logits back to each volume's original voxel grid.

        Undoes crop/pad, resizing (nearest for integer/bool masks, trilinear for float logits) and reorientation.
        Voxels of the original scan that the crop removed get 0 (masks) or the channel's minimum logit (logits).

        Args:
            masks: `(batch, channels, depth, height, width)` tensor/array, or a list of `(channels, D, H, W)`.
            volume_meta: the `volume_meta` list from the processor output (one dict per batch item).
            is_logits: treat values as continuous logits (trilinear) or labels (nearest). Default: floating point
                input = logits, integer/bool = labels.

        Returns:
            One numpy array per volume: shape `original_shape` when channels == 1, else `(channels, *original_shape)`.
            Labels keep their dtype; logits are float32.

        Raises:
            ValueError: batch size or grid shape does not match `volume_meta`.
        """
        metas = [volume_meta] if isinstance(volume_meta, Mapping) else list(volume_meta)
        metas = [VolumeMetadata.coerce(meta, f"volume_meta[{i}]") for i, meta in enumerate(metas)]
        items = list(masks) if isinstance(masks, (list, tuple)) else [m for m in masks]
        if len(items) != len(metas):
            raise ValueError(f"masks: expected one mask per volume_meta entry ({len(metas)}), found {len(items)}")
        outputs = []
        for index, (item, meta) in enumerate(zip(items, metas)):
            steps = self._steps(meta, index)
            array = _to_array(item, f"masks[{index}]")
            if array.ndim == 3:
                array = array[None]
            grid = tuple(steps["crop_pad"]["shape_after"])
            if array.ndim != 4 or tuple(array.shape[1:]) != grid:
                raise ValueError(
                    f"masks[{index}]: expected shape (channels, {', '.join(map(str, grid))}) = the processed grid of "
                    f"{meta.get('source') or f'volume {index}'}, found {tuple(array.shape)}"
                )
            logits = array.dtype.kind == "f" if is_logits is None else bool(is_logits)
            outputs.append(self._to_original_grid(array, steps, logits))
        return outputs

    @staticmethod
    def _to_original_grid(array: np.ndarray, steps: dict[str, dict], logits: bool) -> np.ndarray:
        crop_pad, resample, reorient = steps["crop_pad"], steps["resample"], steps["reorient"]
        channels = array.shape[0]
        resampled = resample["shape_after"]
        if logits:
            array = array.astype(np.float32, copy=False)
            fill = array.reshape(channels, -1).min(axis=1)
        else:
            fill = np.zeros(channels, dtype=array.dtype)
        # undo crop/pad: back onto the resampled grid
        full = np.empty((channels, *resampled), dtype=array.dtype)
        full[...] = fill.reshape(channels, 1, 1, 1)
        src, dst = [], []
        for k in range(3):
            before = crop_pad["pad_before"][k]
            start, stop = max(0, before), min(crop_pad["shape_after"][k], before + resampled[k])
            src.append(slice(start, stop))
            dst.append(slice(start - before, stop - before))
        full[(slice(None), *dst)] = array[(slice(None), *src)]
        # undo the resize: resampled grid -> reoriented original grid (same voxel-centre alignment, reversed)
        shape_r = resample["shape_before"]
        if logits:
            taps = [None] + [_linear_taps(resampled[k], shape_r[k], 0, shape_r[k], False) for k in range(3)]
            restored = _apply_linear(full, taps)
        else:
            taps = [None] + [_nearest_taps(resampled[k], shape_r[k], 0, shape_r[k], False) for k in range(3)]
            restored = _apply_nearest(full, taps)
        # undo the reorientation: flips, then the inverse permutation
        array = restored
        flips = tuple(1 + k for k, f in enumerate(reorient["flip"]) if f)
        if flips:
            array = np.flip(array, axis=flips)
        inverse = np.argsort(reorient["permutation"])
        array = np.ascontiguousarray(array.transpose(0, *(1 + int(i) for i in inverse)))
        return array[0] if channels == 1 else array

    def save_mask(self, mask: Any, volume_meta: dict, path: str | os.PathLike) -> str:
        """Write a mask on the ORIGINAL voxel grid as NIfTI with the original affine.

        Args:
            mask: array/tensor of shape `original_shape` (or `(1, *original_shape)`), e.g. from `post_process_masks`.
            volume_meta: that volume's `volume_meta` dict.
            path: output `.nii` or `.nii.gz` path.

        Returns:
            The path written. Integer/bool masks are stored as uint8 when their values fit (else int16/int32),
            float masks as float32.

        Raises:
            ValueError: the mask is not on the original grid (use `post_process_masks` first) or the path is not NIfTI.
        """
        nib = _optional_import("nibabel", "writing NIfTI masks")
        volume_meta = VolumeMetadata.coerce(volume_meta, "save_mask: volume_meta")
        array = _to_array(mask, "save_mask: mask")
        original_shape = tuple(volume_meta["original_shape"])
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        if array.shape != original_shape:
            raise ValueError(
                f"save_mask: expected a mask on the original grid {original_shape} of "
                f"{volume_meta.get('source') or 'the volume'}, found shape {array.shape}; map model outputs back "
                "with post_process_masks(masks, volume_meta) first"
            )
        if not _is_nifti_path(Path(path)):
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
        affine = np.asarray(volume_meta["original_affine"], dtype=np.float64)
        image = nib.Nifti1Image(array, affine)
        image.set_sform(affine, code=1)
        image.set_qform(affine, code=1)
        image.header.set_xyzt_units("mm")
        nib.save(image, str(path))
        return str(path)
