"""A disk cache of processed CT volumes, so each scan is decoded and resampled once, not once per epoch.

An entry is keyed by its `VolumeSource` — the identity of every source file (absolute path, size and mtime, or
with `identity="content"` a SHA-256 of the bytes) and the rescale slope/intercept — and by a hash of the image
processor's settings: a changed setting or a changed file can never be served a stale tensor. Entries are single
safetensors files (tensors + the `volume_meta` JSON in the header), written to a temporary name and renamed into
place, so a crash mid-write leaves no half file that a later read could pick up.

Reads are zero-copy: an entry is memory-mapped copy-on-write and its tensors are views of the page cache, in the
stored dtype (float16 storage is returned as float16: converting to float32 in the loader would double the bytes
every later step moves; the model casts `pixel_values` to its own dtype). In a DataLoader worker the views travel
to the main process as the file, not as a copy (see `zero_copy`), so the bytes are copied once, by the
consumer.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

import hf_models

from .zero_copy import map_file


Identity = Literal["stat", "content"]
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# safetensors' dtype names of the tensors an entry holds
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8}
MASK_NAMES = ("anatomy_mask", "lesion_mask")
# "2": pixel_values returned in the stored dtype; volume_meta served as `hf_models.VolumeMetadata` when it exists.
CACHE_FORMAT_VERSION = "2"
# The typed per-volume record, in versions of hf_models that have it (a plain dict otherwise).
VolumeMetadata = getattr(hf_models, "VolumeMetadata", None)


class CacheEntryError(RuntimeError):
    """A cache entry file that cannot be read as one (damaged outside this code, which only renames whole files)."""


@dataclass(frozen=True)
class VolumeSource:
    """What one cache entry is made from: a scan, its optional masks, and the rescale that turns stored values
    into HU (`HU = stored * rescale_slope + rescale_intercept`). Paths are files, or folders for DICOM series."""

    volume_path: str | os.PathLike
    anatomy_mask_path: str | os.PathLike | None = None
    lesion_mask_path: str | os.PathLike | None = None
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0

    @classmethod
    def of(cls, source: VolumeSource | str | os.PathLike) -> VolumeSource:
        """`source` itself, or a volume path without masks and with the identity rescale."""
        if isinstance(source, VolumeSource):
            return source
        if isinstance(source, (str, os.PathLike)):
            return cls(source)
        raise TypeError(f"expected a VolumeSource or a volume path, found {type(source).__name__}: {source!r:.200}")


def settings_fingerprint(image_processor) -> str:
    """Hash of everything in the processor's settings that changes its output (service keys excluded)."""
    settings = {k: v for k, v in image_processor.to_dict().items() if k not in ("auto_map", "processor_class")}
    payload = json.dumps({"version": CACHE_FORMAT_VERSION, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def file_identity(path: str | os.PathLike, identity: Identity) -> list:
    """What identifies a source file's content: (path, size, mtime_ns) or (path, sha256)."""
    path = Path(path).resolve()
    if path.is_dir():  # a DICOM series: the identity of every file in it
        return [str(path)] + [file_identity(p, identity) for p in sorted(path.iterdir()) if p.is_file()]
    stat = path.stat()
    if identity == "stat":
        return [str(path), stat.st_size, stat.st_mtime_ns]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return [str(path), digest.hexdigest()]


class VolumeCache:
    """Processed-volume cache for one image processor.

    Args:
        cache_dir: folder for the entries (one sub-folder per processor-settings fingerprint).
        image_processor: a `ReCTImageProcessor`; its `process_volume` fills missing entries.
        identity: `"stat"` (path, size, mtime; fast) or `"content"` (SHA-256 of the bytes; survives copies
            that keep mtimes but is slower on first use).
        storage_dtype: dtype in which `pixel_values` are stored and returned: `"float32"` (exact) or
            `"float16"`/`"bfloat16"` (half the disk, page cache and copy bandwidth; windowed values lie in [0, 1],
            where float16 keeps them to ≤ 2.5e-4 and bfloat16 to ≤ 2e-3).

    Raises:
        ValueError: an unknown `identity` or `storage_dtype`.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        image_processor,
        identity: Identity = "stat",
        storage_dtype: str = "float32",
    ):
        if identity not in ("stat", "content"):
            raise ValueError(f"`identity` must be 'stat' or 'content', got {identity!r}")
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"`storage_dtype` must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}")
        self.image_processor = image_processor
        self.identity = identity
        self.storage_dtype = storage_dtype
        self.fingerprint = settings_fingerprint(image_processor)
        self.root = Path(cache_dir) / self.fingerprint
        self.root.mkdir(parents=True, exist_ok=True)
        settings_file = self.root / "processor_settings.json"
        if not settings_file.exists():
            settings = json.dumps(image_processor.to_dict(), indent=2)
            self._atomic_write(settings_file, lambda tmp: Path(tmp).write_text(settings))
        self.hits = 0
        self.misses = 0

    def key(self, source: VolumeSource | str | os.PathLike) -> str:
        """SHA-256 over the identity of the source files, the rescale and the storage dtype."""
        source = VolumeSource.of(source)
        paths = (source.volume_path, source.anatomy_mask_path, source.lesion_mask_path)
        payload = json.dumps(
            {
                "sources": [file_identity(p, self.identity) if p is not None else None for p in paths],
                "rescale": [float(source.rescale_slope), float(source.rescale_intercept)],
                "storage": self.storage_dtype,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def entry_path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def __contains__(self, source: VolumeSource | str | os.PathLike) -> bool:
        return self.entry_path(self.key(source)).exists()

    def get(self, source: VolumeSource | str | os.PathLike) -> dict[str, Any]:
        """The processed volume, from the cache or processed and stored on a miss (hits and misses serve the same
        dtypes, values and metadata type).

        Returns:
            `pixel_values (C, D, H, W)` in the storage dtype, windowed to [0, 1]; `anatomy_mask` / `lesion_mask`
            `(1, D, H, W)` uint8 region ids, or None; `volume_meta` (a `VolumeMetadata` where hf_models has it,
            else the processor's dict) for mapping predictions back to the original grid.

        Raises:
            CacheEntryError: an entry file exists but is not a readable entry.
            ValueError: a mask holds ids outside 0..255 (it is stored as uint8).
        """
        source = VolumeSource.of(source)
        path = self.entry_path(self.key(source))
        if path.exists():
            self.hits += 1
            return read_entry(path)
        self.misses += 1
        processed = self.image_processor.process_volume(
            str(source.volume_path),
            anatomy_mask=str(source.anatomy_mask_path) if source.anatomy_mask_path is not None else None,
            lesion_mask=str(source.lesion_mask_path) if source.lesion_mask_path is not None else None,
            rescale_slope=source.rescale_slope,
            rescale_intercept=source.rescale_intercept,
        )
        return self._write(path, processed, source)

    def _write(self, path: Path, processed: dict[str, Any], source: VolumeSource) -> dict[str, Any]:
        """Store `processed` and return what a later hit reads back, without reading it back."""
        served = {"pixel_values": processed["pixel_values"].to(STORAGE_DTYPES[self.storage_dtype]).contiguous()}
        for name in MASK_NAMES:
            mask = processed.get(name)
            if mask is not None:
                low, high = int(mask.min()), int(mask.max())
                if low < 0 or high > 255:
                    mask_path = source.anatomy_mask_path if name == "anatomy_mask" else source.lesion_mask_path
                    raise ValueError(
                        f"{name} {mask_path}: region ids must lie in 0..255 to be cached as uint8, found {low}..{high}"
                    )
                mask = mask.to(torch.uint8).contiguous()
            served[name] = mask
        meta_json = json.dumps(_meta_to_dict(processed["volume_meta"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor for name, tensor in served.items() if tensor is not None}
        self._atomic_write(
            path, lambda tmp: save_file(tensors, tmp, metadata={"volume_meta": meta_json, "format": "pt"})
        )
        served["volume_meta"] = _meta_from_json(meta_json)
        return served

    @staticmethod
    def _atomic_write(path: Path, write: Callable[[str], Any]) -> None:
        """`write(tmp_path)` into a temporary file beside `path`, then rename it into place: readers see the old
        state or the whole new file, never a half-written one."""
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def read_entry(path: str | os.PathLike) -> dict[str, Any]:
    """Memory-map one entry: `pixel_values`, `anatomy_mask`, `lesion_mask` (None when absent) as zero-copy views of
    the file (copy-on-write), and `volume_meta`.

    Raises:
        CacheEntryError: the file is not a safetensors entry of this cache (truncated, damaged, foreign).
    """
    data = map_file(path)
    try:
        header_size = int.from_bytes(data[:8].numpy().tobytes(), "little")
        if not 0 < header_size <= data.numel() - 8:
            raise ValueError(f"header size {header_size} does not fit a file of {data.numel()} bytes")
        header = json.loads(data[8 : 8 + header_size].numpy().tobytes())
        volume_meta = _meta_from_json(header.pop("__metadata__")["volume_meta"])
        body = data[8 + header_size :]
        tensors = {}
        for name, spec in header.items():
            dtype = SAFETENSORS_DTYPES[spec["dtype"]]
            start, end = spec["data_offsets"]
            if not 0 <= start <= end <= body.numel():
                raise ValueError(f"`{name}` bytes {start}..{end} lie outside the {body.numel()}-byte body")
            tensors[name] = body[start:end].view(dtype).view(spec["shape"])
    except (ValueError, KeyError, TypeError, RuntimeError) as error:  # RuntimeError: torch's view/shape checks
        raise CacheEntryError(
            f"cache entry {path}: not a readable entry ({error}); delete it to rebuild it"
        ) from error
    if "pixel_values" not in tensors:
        raise CacheEntryError(f"cache entry {path}: no `pixel_values` tensor (found {sorted(tensors)})")
    return {
        "pixel_values": tensors["pixel_values"],
        **{name: tensors.get(name) for name in MASK_NAMES},
        "volume_meta": volume_meta,
    }


def _meta_to_dict(volume_meta: Any) -> dict:
    return volume_meta.to_dict() if hasattr(volume_meta, "to_dict") else dict(volume_meta)


def _meta_from_json(text: str) -> Any:
    data = json.loads(text)
    return VolumeMetadata.from_dict(data) if VolumeMetadata is not None else data


__all__ = ["CacheEntryError", "VolumeCache", "VolumeSource", "file_identity", "read_entry", "settings_fingerprint"]
