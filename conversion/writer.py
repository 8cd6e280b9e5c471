"""Writing a converted model: a `save_pretrained` folder (safetensors only, sharded past `max_shard_size`),
`conversion_report.json` and `manifest.json` (sha256 of every file and of the source), built in a temporary folder
beside the destination and renamed into place only once complete and verified. A failed conversion leaves nothing
behind and never touches an existing folder unless `overwrite` is set; then the old folder is replaced in one rename
after the new one is complete."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .readers import ConversionError, file_sha256


MANIFEST = "manifest.json"
REPORT = "conversion_report.json"


def write_manifest(folder: Path, source: dict[str, Any]) -> dict[str, Any]:
    """`manifest.json`: every file in `folder` (relative path → sha256) and the `source` description."""
    files = {
        p.relative_to(folder).as_posix(): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"source": source, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_manifest(folder: str | os.PathLike) -> None:
    """Raise `ConversionError` when a file listed in `manifest.json` is missing or its sha256 differs."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise ConversionError(f"{folder}: {name} is listed in {MANIFEST} but missing")
        if file_sha256(path) != digest:
            raise ConversionError(f"{folder}: {name} does not match its sha256 in {MANIFEST}")


@contextmanager
def atomic_folder(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder next to `out`; on success it becomes `out` in one rename, on error it is removed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.converting-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_model_folder(
    folder: Path,
    model: torch.nn.Module,
    report: dict[str, Any],
    source: dict[str, Any],
    processor: Any | None = None,
    max_shard_size: str | int = "2GB",
    extra_writer: Callable[[Path], None] | None = None,
) -> None:
    """Save `model` (and `processor`) into `folder`, check the saved weights reload bit-identically, then write the
    report and manifest."""
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    if processor is not None:
        processor.save_pretrained(folder)
    if extra_writer is not None:
        extra_writer(folder)
    pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    if pickles:
        raise ConversionError(f"internal: pickled weights {pickles} were written; Hub folders hold safetensors only")
    reloaded = type(model).from_pretrained(folder)
    expected, got = model.state_dict(), reloaded.state_dict()
    differ = [k for k in expected if k not in got or not torch.equal(expected[k], got[k])]
    if differ or set(got) - set(expected):
        raise ConversionError(f"internal: the saved folder does not reload to the converted weights: {differ[:5]}")
    (folder / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    write_manifest(folder, source)
