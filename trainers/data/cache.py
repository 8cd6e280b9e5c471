"""A disk cache of processed CT volumes, so each scan is decoded and resampled once, not once per epoch.

An entry is keyed by the identity of every source file (absolute path, size and mtime — or, with
`identity="content"`, a SHA-256 of the bytes), the rescale slope/intercept, and a hash of the image processor's
settings: a changed setting or a changed file can never be served a stale tensor. Entries are single
safetensors files (tensors + the `volume_meta` JSON in the header), written to a temporary name and renamed into
place, so a crash mid-write leaves no half file that a later read could pick up. Reads are memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file


Identity = Literal["stat", "content"]
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CACHE_FORMAT_VERSION = "1"


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
        storage_dtype: dtype of the stored `pixel_values`: `"float32"` (exact) or `"float16"`/`"bfloat16"`
            (half the disk and read bandwidth; windowed values lie in [0, 1], so float16 keeps them to ≤ 5e-4).
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

    def key(
        self,
        volume_path: str | os.PathLike,
        anatomy_mask_path: str | os.PathLike | None = None,
        lesion_mask_path: str | os.PathLike | None = None,
        rescale_slope: float = 1.0,
        rescale_intercept: float = 0.0,
    ) -> str:
        sources = [
            file_identity(p, self.identity) if p is not None else None
            for p in (volume_path, anatomy_mask_path, lesion_mask_path)
        ]
        payload = json.dumps(
            {
                "sources": sources,
                "rescale": [float(rescale_slope), float(rescale_intercept)],
                "storage": self.storage_dtype,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def entry_path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(
        self,
        volume_path: str | os.PathLike,
        anatomy_mask_path: str | os.PathLike | None = None,
        lesion_mask_path: str | os.PathLike | None = None,
        rescale_slope: float = 1.0,
        rescale_intercept: float = 0.0,
    ) -> dict[str, Any]:
        """The processed volume: `pixel_values (C, D, H, W)` float32, `anatomy_mask` / `lesion_mask`
        `(1, D, H, W)` uint8 or None, and `volume_meta` — from the cache, or processed and stored on a miss."""
        key = self.key(volume_path, anatomy_mask_path, lesion_mask_path, rescale_slope, rescale_intercept)
        path = self.entry_path(key)
        if path.exists():
            self.hits += 1
            return self._read(path)
        self.misses += 1
        processed = self.image_processor.process_volume(
            str(volume_path),
            anatomy_mask=str(anatomy_mask_path) if anatomy_mask_path is not None else None,
            lesion_mask=str(lesion_mask_path) if lesion_mask_path is not None else None,
            rescale_slope=rescale_slope,
            rescale_intercept=rescale_intercept,
        )
        self._write(path, processed)
        # Serve what a later hit would serve (storage dtype, uint8 masks), so hits and misses are identical.
        return self._read(path)

    def _write(self, path: Path, processed: dict[str, Any]) -> None:
        tensors = {"pixel_values": processed["pixel_values"].to(STORAGE_DTYPES[self.storage_dtype]).contiguous()}
        for name in ("anatomy_mask", "lesion_mask"):
            mask = processed.get(name)
            if mask is not None:
                if int(mask.min()) < 0 or int(mask.max()) > 255:
                    raise ValueError(f"{name} of {processed['volume_meta'].get('source')}: ids must be in 0..255")
                tensors[name] = mask.to(torch.uint8).contiguous()
        metadata = {"volume_meta": json.dumps(processed["volume_meta"]), "format": "pt"}
        path.parent.mkdir(parents=True, exist_ok=True)
        self._atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        with safe_open(path, framework="pt") as handle:  # memory-mapped
            names = set(handle.keys())
            result = {
                "pixel_values": handle.get_tensor("pixel_values").float(),
                "anatomy_mask": handle.get_tensor("anatomy_mask") if "anatomy_mask" in names else None,
                "lesion_mask": handle.get_tensor("lesion_mask") if "lesion_mask" in names else None,
                "volume_meta": json.loads(handle.metadata()["volume_meta"]),
            }
        return result

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
