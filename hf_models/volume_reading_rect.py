# Copyright 2025 The ReCT-VLM authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
"""Reading CT volumes: files and in-memory inputs → stored voxel array + RAS affine + slope/intercept.

Data flow (one way): a path (`.nii`, `.nii.gz`, `.npy`, a DICOM series folder), a nibabel image, an array/tensor or
an `(array, affine)` tuple → `RawVolume` (the stored values in the source's own axis order, untouched; its voxel →
RAS+ mm affine; the HU scaling; for DICOM, each slice's position). Nothing here resamples: putting a gantry-tilted
or unevenly spaced series onto a regular grid is geometry (`volume_geometry_rect.py`), deciding whether to do it is
the processor's job (`image_processing_rect.py`).

Hub code: at module level only the standard library, numpy and torch. nibabel, pydicom and the optional `isal` gzip
accelerator are imported inside the functions that use them.

World coordinates are nibabel's RAS+ millimetres; a DICOM (LPS+) position or direction is converted by negating its
x and y components.
"""

from __future__ import annotations

import importlib
import os
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


__all__ = [
    "RawVolume",
    "InflatingNifti",
    "read_volume",
    "read_gzip",
    "gzip_backend",
    "to_array",
    "as_3d",
    "check_affine",
    "is_array",
    "is_affine_like",
    "is_nibabel_image",
    "is_nifti_path",
]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")

#: Set to False to inflate `.gz` files with the standard library's zlib even when `isal` is installed
#: (identical bytes; the benchmark uses it to measure a machine without isal).
USE_ISAL = True

#: Bytes of inflated voxel data a streamed `.nii.gz` keeps at a time (`InflatingNifti`): a ring of whole slices,
#: so a large scan never needs its whole stored array in memory, and the same warm memory is reused throughout.
STREAM_WINDOW_BYTES = 32 << 20


def optional_import(module: str, purpose: str) -> Any:
    """Import a reader dependency at first use, so the Hub loader does not require it to import this file."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{purpose} needs the `{module}` package (pip install {module})") from err


@dataclass
class RawVolume:
    """One volume as stored, before any geometry.

    Attributes:
        array: the stored values, 3D or more, in the source's own axis order (e.g. NIfTI `(x, y, z)`, DICOM
            `(slices, rows, columns)`); numpy array (possibly a read-only view of the decompressed file, or a
            memory map) or torch tensor. None for a streamed `.nii.gz` until `finished()`: `stream` has its slabs.
        affine: `(4, 4)` float64 voxel index → RAS+ mm. Sheared for a gantry-tilted series.
        slope, intercept: HU = slope * stored + intercept (NIfTI `scl_slope`/`scl_inter`; DICOM series are already
            in HU, slope 1 and intercept 0).
        source: the path read, or None for in-memory inputs.
        has_geometry: False when the input carries no affine (a bare array, a `.npy` file): it is then taken to lie
            on whatever grid it is paired with.
        slice_positions: DICOM series only: `(slices,)` mm along the slice normal (ImagePositionPatient projected on
            it), ascending: the slices are sorted.
        slice_names: DICOM series only: the file name of each slice, in the same order.
        stream: for a `.nii.gz` inflated in a background thread: the `InflatingNifti` handing out its slabs.
    """

    array: Any
    affine: np.ndarray
    slope: float = 1.0
    intercept: float = 0.0
    source: str | None = None
    has_geometry: bool = True
    slice_positions: np.ndarray | None = None
    slice_names: list[str] | None = None
    stream: InflatingNifti | None = None

    def finished(self) -> RawVolume:
        """This volume with its whole array in `array` (reads the rest of a streamed file)."""
        if self.stream is not None:
            self.array = self.stream.read_all()
            self.stream = None
        return self


# ----------------------------------------------------------------------------------------------------------------
# gzip
# ----------------------------------------------------------------------------------------------------------------


def gzip_backend() -> Any:
    """The inflater: `isal.isal_zlib` (ISA-L, ~2x faster than zlib) when installed and `USE_ISAL`, else `zlib`.

    Both expose `decompressobj(wbits=31)` and give identical bytes.
    """
    if USE_ISAL:
        try:
            from isal import isal_zlib

            return isal_zlib
        except ImportError:  # optional accelerator: the stdlib path below gives the same bytes
            pass
    return zlib


def _gzip_errors(backend: Any) -> tuple[type[BaseException], ...]:
    return (zlib.error, backend.error, EOFError) if backend is not zlib else (zlib.error, EOFError)


def read_gzip(path: str | os.PathLike) -> np.ndarray:
    """Inflate a whole `.gz` file into a read-only uint8 array (one pass, no copy of the output).

    Concatenated gzip members are joined (as `gzip.open` does); zero padding between members is skipped.

    Raises:
        EOFError: the file ends before the end-of-stream marker.
        zlib.error (or isal's error): corrupt data.
    """
    with open(path, "rb") as handle:
        compressed = handle.read()
    backend = gzip_backend()
    chunks = []
    while compressed:
        decompressor = backend.decompressobj(wbits=31)
        chunks.append(decompressor.decompress(compressed))
        if not decompressor.eof:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")
        compressed = decompressor.unused_data.lstrip(b"\x00")
    return np.frombuffer(chunks[0] if len(chunks) == 1 else b"".join(chunks), dtype=np.uint8)


#: Rings of finished streams kept for the next ones: warm memory that costs no page faults (at most 2).
_spare_rings: list[np.ndarray] = []
_spare_rings_lock = threading.Lock()


def _take_ring(nbytes: int) -> np.ndarray:
    """A uint8 buffer of at least `nbytes`: a spare ring when one is large enough, else new memory."""
    with _spare_rings_lock:
        for index, ring in enumerate(_spare_rings):
            if len(ring) >= nbytes:
                return _spare_rings.pop(index)
    return np.empty(nbytes, dtype=np.uint8)


def _give_back_ring(ring: np.ndarray) -> None:
    with _spare_rings_lock:
        _spare_rings.append(ring)
        del _spare_rings[:-2]


class InflatingNifti:
    """Inflates a `.nii.gz` in a background thread into a bounded ring of slices while the caller processes slabs.

    NIfTI stores voxels in Fortran order, so the file is a sequence of slices along the LAST axis. The background
    thread reads, inflates and copies them into a ring buffer of `window_slices` slices; the caller asks for slabs
    `[lo, hi)` in file order with `slab(lo, hi)`, which waits until they are inflated and frees every slice before
    `lo` for the inflater to overwrite. isal/zlib and numpy release the GIL, so inflating and the caller's
    processing run on two cores, and memory stays bounded (`STREAM_WINDOW_BYTES`) whatever the scan's size:
    fresh memory for a whole 150 MB stored array costs more in page faults than processing it.

    Call `finish()` after the last slab (waits for the end of the file and its gzip CRC), or `close()` to abandon
    the file; `read_all()` returns the whole array instead.

    Raises (from `slab` / `finish` / `read_all`): `ValueError` naming the file when the data is truncated or corrupt.
    """

    #: compressed bytes read and handed to the inflater per call
    INPUT_CHUNK = 1 << 19
    #: at most this many inflated bytes per inflater call (bounds memory on highly compressible data)
    OUTPUT_CHUNK = 1 << 21

    def __init__(
        self,
        path: Path,
        offset: int,
        shape: tuple[int, ...],
        dtype: np.dtype,
        window_bytes: int | None = None,
    ):
        self.path = path
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.offset = int(offset)
        self.num_slices = self.shape[-1]
        self.slice_bytes = int(np.prod(self.shape[:-1], dtype=np.int64)) * self.dtype.itemsize
        if self.num_slices < 1 or self.slice_bytes < 1:
            raise ValueError(f"{path}: cannot stream an empty volume of shape {self.shape}")
        self.nbytes = self.num_slices * self.slice_bytes
        window = STREAM_WINDOW_BYTES if window_bytes is None else int(window_bytes)
        #: slices the ring holds: a slab asked for may span at most this many
        self.window_slices = min(self.num_slices, max(4, -(-window // self.slice_bytes)))
        self._ring = _take_ring(self.window_slices * self.slice_bytes)[: self.window_slices * self.slice_bytes]
        self._written = 0  # voxel bytes inflated into the ring so far (guarded by the condition)
        self._released = 0  # voxel bytes the caller no longer needs: the inflater may overwrite them
        self._done = False
        self._closed = False
        self._error: BaseException | None = None
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"inflate {path.name}", daemon=True)
        self._thread.start()

    # -- background thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        backend = gzip_backend()
        error = None
        try:
            self._inflate(backend)
        except (*_gzip_errors(backend), OSError) as err:
            error = err
        with self._condition:
            self._error = error
            self._done = True
            self._condition.notify_all()

    def _inflate(self, backend: Any) -> int:
        """Inflate the whole file (every gzip member), copying the voxel bytes into the ring; verify its end."""
        skip, written = self.offset, 0  # header bytes still to drop; voxel bytes copied
        decompressor = backend.decompressobj(wbits=31)
        with open(self.path, "rb") as handle:  # read as we go: reading overlaps inflating too
            data = b""
            while True:
                at_end = False
                if not data:
                    data = handle.read(self.INPUT_CHUNK)
                    at_end = not data
                out = decompressor.decompress(data, self.OUTPUT_CHUNK)
                if decompressor.eof:  # end of a gzip member: the rest is zero padding or another member
                    data = (decompressor.unused_data + handle.read()).lstrip(b"\x00")
                    if data:
                        decompressor = backend.decompressobj(wbits=31)
                    finished = not data
                else:
                    data = decompressor.unconsumed_tail
                    finished = at_end and not out  # the file ended inside a member: truncated (raised below)
                piece = memoryview(out)
                if skip:
                    cut = min(skip, len(piece))
                    piece, skip = piece[cut:], skip - cut
                piece = piece[: self.nbytes - written]  # bytes past the voxel data are dropped
                if piece and not self._store(piece, written):
                    return written  # the caller closed the stream
                written += len(piece)
                if finished:
                    break
        if not decompressor.eof:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")
        if written < self.nbytes:
            raise EOFError(f"{self.offset + written} decompressed bytes, the header needs {self.offset + self.nbytes}")
        return written

    def _store(self, piece: memoryview, written: int) -> bool:
        """Copy `piece` (voxel bytes from offset `written`) into the ring as space frees up; False once closed."""
        capacity = len(self._ring)
        while piece:
            with self._condition:
                while not self._closed and written - self._released >= capacity:
                    self._condition.wait()
                if self._closed:
                    return False
                space = capacity - (written - self._released)
            start = written % capacity
            count = min(len(piece), space, capacity - start)
            self._ring[start : start + count] = np.frombuffer(piece[:count], dtype=np.uint8)
            piece, written = piece[count:], written + count
            with self._condition:
                self._written = written
                self._condition.notify_all()
        return True

    # -- caller ------------------------------------------------------------------------------------------

    def slab(self, lo: int, hi: int) -> np.ndarray:
        """Slices `[lo, hi)` along the last axis, once inflated; frees every slice before `lo`.

        Slabs must be asked for in file order (`lo` never decreasing). The result is a read-only view into the ring,
        valid until the next `slab` call (a copy when the slab wraps around the ring's end).
        """
        lo, hi = int(lo), int(hi)
        count = hi - lo
        if self._ring is None:
            raise ValueError(f"{self.path}: slab [{lo}, {hi}) asked for after the stream was finished or closed")
        if not 0 <= lo < hi <= self.num_slices or count > self.window_slices:
            raise ValueError(
                f"{self.path}: slab [{lo}, {hi}) must lie within the {self.num_slices} slices and span at most "
                f"{self.window_slices}"
            )
        with self._condition:
            if lo * self.slice_bytes < self._released:
                raise ValueError(f"{self.path}: slab [{lo}, {hi}) asked for after slices before {lo} were freed")
            self._released = lo * self.slice_bytes
            self._condition.notify_all()
            while self._written < hi * self.slice_bytes and not self._done:
                self._condition.wait()
            if self._written < hi * self.slice_bytes:
                self._fail()
        start, end = (lo % self.window_slices) * self.slice_bytes, (hi % self.window_slices) * self.slice_bytes
        if start < end or end == 0:
            data = self._ring[start : end or len(self._ring)]
        else:  # wraps around the end of the ring
            data = np.concatenate((self._ring[start:], self._ring[:end]))
        array = data.view(self.dtype).reshape((*self.shape[:-1], count), order="F")
        array.flags.writeable = False
        return array

    def read_all(self) -> np.ndarray:
        """The whole stored array (Fortran order, as nibabel reads it), after the end of the file is verified."""
        array = np.empty(self.shape, dtype=self.dtype, order="F")
        step = self.window_slices
        for lo in range(0, self.num_slices, step):
            hi = min(self.num_slices, lo + step)
            array[..., lo:hi] = self.slab(lo, hi)
        self.finish()
        return array

    def finish(self) -> None:
        """Wait for the whole file to be inflated and its gzip CRC verified."""
        with self._condition:
            self._released = self.nbytes  # nothing more is read from the ring
            self._condition.notify_all()
            while not self._done:
                self._condition.wait()
        self._thread.join()
        self._give_back_ring()
        if self._error is not None:
            self._fail()

    def close(self) -> None:
        """Abandon the file: the background thread stops at its next piece. Safe to call at any time, repeatedly."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join()
        self._give_back_ring()

    def _give_back_ring(self) -> None:
        ring, self._ring = self._ring, None
        if ring is not None:
            _give_back_ring(ring.base if ring.base is not None else ring)

    def _fail(self) -> None:
        err = self._error
        raise ValueError(
            f"NIfTI file {self.path} is truncated or corrupt: the header promises shape {self.shape} of {self.dtype}, "
            f"but reading the voxel data failed ({type(err).__name__}: {err})"
        ) from err


# ----------------------------------------------------------------------------------------------------------------
# NIfTI, DICOM, npy
# ----------------------------------------------------------------------------------------------------------------


def is_nifti_path(path: str | os.PathLike) -> bool:
    return Path(path).name.lower().endswith(_NIFTI_SUFFIXES)


def _nifti_scaling(proxy: Any) -> tuple[float, float]:
    slope = float(proxy.slope) if np.isfinite(proxy.slope) and proxy.slope != 0 else 1.0
    inter = float(proxy.inter) if np.isfinite(proxy.inter) else 0.0
    return slope, inter


def _read_nifti(path: Path, stream_min_bytes: float) -> RawVolume:
    """Read a NIfTI file without applying its scaling. A `.nii.gz` of at least `stream_min_bytes` voxel bytes is
    inflated in a background thread (`RawVolume.stream`); smaller ones are inflated here in one pass."""
    nib = optional_import("nibabel", "reading NIfTI files")
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
    slope, inter = _nifti_scaling(proxy)
    affine = np.asarray(image.affine, dtype=np.float64)
    gzipped = path.name.lower().endswith(".gz") and proxy.order == "F"
    count = int(np.prod(shape, dtype=np.int64))
    if gzipped and len(shape) == 3 and count > 0 and count * dtype.itemsize >= stream_min_bytes:
        stream = InflatingNifti(path, int(proxy.offset), shape, dtype)
        return RawVolume(None, affine, slope, inter, str(path), stream=stream)
    backend = gzip_backend()
    try:
        if gzipped:
            offset = int(proxy.offset)
            needed = offset + count * dtype.itemsize
            raw = read_gzip(path)
            if len(raw) < needed:
                raise EOFError(f"{len(raw)} decompressed bytes, the header needs {needed}")
            array = raw[offset:needed].view(dtype).reshape(shape, order="F")
        else:
            array = np.asanyarray(proxy.get_unscaled())
    except (*_gzip_errors(backend), OSError, ValueError) as err:
        raise ValueError(
            f"NIfTI file {path} is truncated or corrupt: the header promises shape {shape} of {dtype}, "
            f"but reading the voxel data failed ({type(err).__name__}: {err})"
        ) from err
    return RawVolume(array, affine, slope, inter, str(path))


def _read_dicom_series(folder: Path) -> RawVolume:
    """Read one CT series from a folder: float32 HU `(slices, rows, columns)` sorted along the slice normal.

    The affine's slice column is the mean step between the first and last slice positions; each slice's own
    position along the normal is kept in `slice_positions`, so the geometry step can check that the spacing is even
    (and resample when asked). A gantry-tilted series gives a sheared affine (slice step not along the normal).
    """
    pydicom = optional_import("pydicom", "reading DICOM series")
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
        duplicates = np.flatnonzero(np.diff(along_normal) < 1e-3)
        if duplicates.size:
            i = int(duplicates[0])
            raise ValueError(
                f"DICOM folder {folder}: expected one slice per position, found {slices[i][0].name} and "
                f"{slices[i + 1][0].name} both at {along_normal[i]:.3f} mm along the slice normal"
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

    # Array axes: 0 = slice (sorted along the normal), 1 = row index (follows the column direction cosine, spaced by
    # PixelSpacing[0]), 2 = column index (follows the row direction cosine, spaced by PixelSpacing[1]).
    affine = np.eye(4)
    affine[:3, 0] = slice_step
    affine[:3, 1] = col_dir * spacing[0]
    affine[:3, 2] = row_dir * spacing[1]
    affine[:3, 3] = positions[0]
    affine[:2] *= -1.0  # LPS -> RAS
    return RawVolume(
        volume,
        affine,
        source=str(folder),
        slice_positions=along_normal,
        slice_names=[file.name for file, _ in slices],
    )


def _read_path(path: str | os.PathLike, stream_min_bytes: float) -> RawVolume:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"volume file {path} does not exist")
    if path.is_dir():
        return _read_dicom_series(path)
    if is_nifti_path(path):
        return _read_nifti(path, stream_min_bytes)
    if path.name.lower().endswith(".npy"):
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"could not read .npy file {path}: {type(err).__name__}: {err}") from err
        return RawVolume(array, np.eye(4), source=str(path), has_geometry=False)
    raise ValueError(
        f"unsupported volume file {path}: expected a .nii/.nii.gz file, a .npy file or a folder holding one "
        f"DICOM series, found suffix {''.join(path.suffixes) or '(none)'!r}"
    )


# ----------------------------------------------------------------------------------------------------------------
# in-memory inputs
# ----------------------------------------------------------------------------------------------------------------


def is_nibabel_image(obj: Any) -> bool:
    return hasattr(obj, "dataobj") and hasattr(obj, "affine") and hasattr(obj, "header")


def is_array(obj: Any) -> bool:
    return isinstance(obj, (np.ndarray, torch.Tensor))


def is_affine_like(obj: Any) -> bool:
    return (is_array(obj) or isinstance(obj, (list, tuple))) and np.shape(np.asarray(obj, dtype=object)) == (4, 4)


def check_affine(affine: Any, label: str) -> np.ndarray:
    """`affine` as a `(4, 4)` float64 array; ValueError naming `label` unless finite and invertible."""
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


def read_volume(obj: Any, affine: Any = None, label: str = "volume", stream_min_bytes: float = np.inf) -> RawVolume:
    """Resolve one input to a `RawVolume`.

    Args:
        obj: a path (`.nii`, `.nii.gz`, `.npy`, DICOM series folder), a nibabel image, a numpy array / torch tensor,
            or an `(array, affine)` tuple.
        affine: the affine of a bare array (None: identity, 1 mm, and `has_geometry=False`).
        label: how error messages name an in-memory input.
        stream_min_bytes: `.nii.gz` files with at least this many voxel bytes are inflated in a background thread
            (see `InflatingNifti`); the default never streams.

    Raises:
        FileNotFoundError: missing path or empty DICOM folder.
        ValueError: unreadable, truncated or corrupt file; DICOM folder without CT images, with several series,
            non-CT modality, mixed geometry or duplicate positions; a non-finite or singular affine.
        TypeError: unsupported input type.
    """
    if isinstance(obj, (str, os.PathLike)):
        return _read_path(obj, stream_min_bytes)
    if isinstance(obj, tuple) and len(obj) == 2 and is_array(obj[0]) and is_affine_like(obj[1]):
        return RawVolume(obj[0], check_affine(obj[1], label))
    if is_nibabel_image(obj):
        proxy = obj.dataobj
        if hasattr(proxy, "get_unscaled"):
            array = np.asanyarray(proxy.get_unscaled())
            slope, inter = _nifti_scaling(proxy)
        else:
            array, slope, inter = np.asanyarray(proxy), 1.0, 0.0
        filename = obj.get_filename() if hasattr(obj, "get_filename") else None
        return RawVolume(array, check_affine(obj.affine, label), slope, inter, filename)
    if is_array(obj):
        if affine is None:
            return RawVolume(obj, np.eye(4), has_geometry=False)
        return RawVolume(obj, check_affine(affine, label))
    raise TypeError(
        f"{label}: expected a path (.nii, .nii.gz, .npy, DICOM folder), a nibabel image, a 3D numpy array or "
        f"torch tensor, or an (array, affine) tuple, found {type(obj).__name__}"
    )


def to_array(array: np.ndarray | torch.Tensor, label: str) -> np.ndarray:
    """A numpy view of `array` (no copy where possible) with real numeric voxels; float16/bfloat16 → float32."""
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


def as_3d(array: np.ndarray, label: str) -> np.ndarray:
    """`array` as 3D: trailing singleton axes (a `(X, Y, Z, 1)` NIfTI) are dropped; anything else raises."""
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
