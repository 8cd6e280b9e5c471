"""Readers for raw research checkpoints: every format of SPEC §7 → one flat `{name: tensor}` state dict.

Pickled files (`.pt`, `.pth`, `.bin`, `.ckpt`) are read with `torch.load(weights_only=True)`: tensors, containers
and plain values only. A file whose unpickling would have to construct other objects (and so could run code) is
refused with `UnsafeCheckpointError`, which names the object; `trust_pickle=True` (`--trust-pickle`) reads it
anyway, for files the user vouches for. A file that cannot be read at all (truncated, not a checkpoint) raises
`CheckpointReadError` naming the file.

Each reader returns a `SourceCheckpoint`: the state dict, the files it came from, and what was unwrapped on the way
(`["state_dict"]`, the DDP prefix `module.`, …), which the conversion report records.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


#: Keys under which training scripts nest the weights, in the order they are looked for.
STATE_DICT_KEYS = ("model_state_dict", "state_dict", "module", "model")
#: Prefixes wrappers add to every key: DDP / DeepSpeed (`module.`), `torch.compile` (`_orig_mod.`).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: Files a raw checkpoint may be.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CHECKPOINT_SUFFIXES = (*PICKLE_SUFFIXES, ".safetensors")
#: Non-tensor classes DeepSpeed writes into its ZeRO optimizer files. Plain data holders (an enum and the loss
#: scalers' attributes, restored by `__dict__` update: none defines `__setstate__` or `__reduce__`), so allowing them
#: to the weights-only unpickler runs no code from the file.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
)


class ConversionError(ValueError):
    """A checkpoint cannot be converted as asked; the message names the file or key and what was expected."""


class CheckpointReadError(ConversionError):
    """A checkpoint file cannot be read (missing, truncated, or not a checkpoint)."""


class UnsafeCheckpointError(ConversionError):
    """A pickled checkpoint would construct arbitrary objects when loaded; refused unless `trust_pickle`."""


@dataclass
class SourceCheckpoint:
    """A flat state dict read from `path`, with the files it came from and the unwrapping steps applied."""

    state_dict: dict[str, torch.Tensor]
    path: Path
    files: list[Path]
    unwrapped: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Hashes
# ----------------------------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def source_sha256(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint file, or of a folder: over its files' relative paths and contents, in sorted order."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        digest.update(bytes.fromhex(file_sha256(file)))
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# One file
# ----------------------------------------------------------------------------------------------------------------


def _unsafe_global(err: BaseException) -> str | None:
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    return match.group(1) if match else None


def load_checkpoint_file(path: str | os.PathLike, trust_pickle: bool = False, safe_globals: tuple = ()) -> Any:
    """The object stored in one checkpoint file (safetensors or a torch pickle), on the CPU.

    Raises:
        CheckpointReadError: the file is missing, empty, truncated or not a checkpoint.
        UnsafeCheckpointError: the pickle needs a global outside torch's weights-only allowlist (and
            `safe_globals`) and `trust_pickle` is False.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointReadError(f"{path}: the file is empty")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as err:
            raise CheckpointReadError(
                f"{path}: not a readable safetensors file (truncated or corrupt?): {err}"
            ) from err
    if trust_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
            raise CheckpointReadError(
                f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {err}"
            ) from err
    allowed = [_import_global(name) for name in safe_globals]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        name = _unsafe_global(err)
        if name is None:
            raise CheckpointReadError(
                f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {err}"
            ) from err
        raise UnsafeCheckpointError(
            f"{path}: loading this pickle would construct `{name}`, i.e. run code from the file; only tensors and "
            "plain containers are read by default. Pass --trust-pickle (trust_pickle=True) only if you trust "
            "where the file came from."
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointReadError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {err}") from err


def _import_global(dotted: str):
    module_name, _, attr = dotted.rpartition(".")
    import importlib

    return getattr(importlib.import_module(module_name), attr)


# ----------------------------------------------------------------------------------------------------------------
# Unwrapping
# ----------------------------------------------------------------------------------------------------------------


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def extract_state_dict(obj: Any, path: Path, unwrapped: list[str]) -> dict[str, torch.Tensor]:
    """The flat state dict inside a loaded checkpoint: the object itself, or one nested under `STATE_DICT_KEYS`
    (`{"model_state_dict": ...}`, `{"state_dict": ...}`, `{"module": ...}`, `{"model": ...}`, at any depth).
    Non-tensor entries beside the tensors (`{"state_dict": {..., "n_averaged": 3}}` is not one) are an error."""
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                unwrapped.append(key)
                return extract_state_dict(obj[key], path, unwrapped)
        others = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if others and any(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ConversionError(
                f"{path}: entry {'/'.join(unwrapped) or '<top level>'} mixes tensors with non-tensor entries "
                f"{others[:5]}; expected a state dict of tensors"
            )
        raise ConversionError(
            f"{path}: found no state dict; expected tensors at the top level or under one of {list(STATE_DICT_KEYS)}, "
            f"found keys {list(obj)[:10]}"
        )
    raise ConversionError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")


def strip_shared_prefixes(
    state_dict: dict[str, torch.Tensor], unwrapped: list[str], prefixes: tuple[str, ...] = WRAPPER_PREFIXES
) -> dict[str, torch.Tensor]:
    """Remove a wrapper prefix that EVERY key carries (repeatedly: `module._orig_mod.`); a prefix only some keys
    carry is left alone (it is then part of the model's own names)."""
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if state_dict and all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
                unwrapped.append(f"prefix {prefix!r}")
                changed = True
    return state_dict


# ----------------------------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------------------------


def read_raw(path: str | os.PathLike, trust_pickle: bool = False) -> SourceCheckpoint:
    """A `.pt`/`.pth`/`.bin`/`.safetensors` file: a plain state dict, or one nested under `STATE_DICT_KEYS`, with
    DDP (`module.`) and `torch.compile` (`_orig_mod.`) prefixes removed."""
    path = Path(path)
    unwrapped: list[str] = []
    state = extract_state_dict(load_checkpoint_file(path, trust_pickle), path, unwrapped)
    return SourceCheckpoint(strip_shared_prefixes(state, unwrapped), path, [path], unwrapped)


def read_lightning(path: str | os.PathLike, trust_pickle: bool = False, prefix: str = "model.") -> SourceCheckpoint:
    """A PyTorch Lightning `.ckpt`: its `state_dict` (keys are the LightningModule's attribute paths), with the
    `model.` prefix of the usual `self.model = ...` removed when every key has it."""
    path = Path(path)
    obj = load_checkpoint_file(path, trust_pickle)
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        found = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise ConversionError(f"{path}: a Lightning checkpoint holds a `state_dict` entry; found {found}")
    unwrapped = ["state_dict"]
    state = extract_state_dict(obj["state_dict"], path, unwrapped)
    state = strip_shared_prefixes(state, unwrapped, (prefix, *WRAPPER_PREFIXES))
    extra = {k: obj[k] for k in ("epoch", "global_step", "pytorch-lightning_version") if k in obj}
    return SourceCheckpoint(state, path, [path], unwrapped, extra)


def is_deepspeed_folder(path: Path) -> bool:
    return path.is_dir() and (
        (path / "latest").is_file() or any(path.glob("*/*mp_rank_*_model_states.pt")) or any(path.glob("*mp_rank_*"))
    )


def read_deepspeed(path: str | os.PathLike, tag: str | None = None, trust_pickle: bool = False) -> SourceCheckpoint:
    """A DeepSpeed checkpoint folder (ZeRO stage 1–3, any number of ranks), consolidated to fp32 by DeepSpeed's own
    `get_fp32_state_dict_from_zero_checkpoint`.

    DeepSpeed unpickles its files without restriction, so every file of the tag is first read here with the
    weights-only loader (allowing only DeepSpeed's data-only `ZeroStageEnum`); a file that needs anything else is
    refused unless `trust_pickle`."""
    path = Path(path)
    if not is_deepspeed_folder(path):
        raise ConversionError(
            f"{path}: not a DeepSpeed checkpoint folder (expected a `latest` file or "
            "`<tag>/mp_rank_00_model_states.pt` / `<tag>/zero_pp_rank_*_mp_rank_00_model_states.pt`)"
        )
    if tag is None:
        latest = path / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
    folder = path / tag if tag else path
    if not folder.is_dir():
        raise ConversionError(f"{path}: the checkpoint tag {tag!r} (from `latest`) has no folder {folder}")
    files = sorted(folder.glob("*.pt"))
    if not files:
        raise ConversionError(f"{folder}: no DeepSpeed state files (*.pt)")
    if not trust_pickle:
        for file in files:
            load_checkpoint_file(file, safe_globals=DEEPSPEED_SAFE_GLOBALS)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as err:
        raise ConversionError(f"{path}: DeepSpeed could not consolidate tag {folder.name!r}: {err}") from err
    unwrapped = [f"DeepSpeed ZeRO consolidation (tag {folder.name})"]
    state = strip_shared_prefixes({k: v for k, v in state.items()}, unwrapped)
    return SourceCheckpoint(state, path, files, unwrapped, {"tag": folder.name})


PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA_TRAINABLES = ("non_lora_trainables.safetensors", "non_lora_trainables.bin")


def read_peft(path: str | os.PathLike, trust_pickle: bool = False) -> SourceCheckpoint:
    """A PEFT adapter folder: `adapter_config.json`, `adapter_model.safetensors` or `.bin`, and (LLaVA / Libra
    stage 2) `non_lora_trainables.bin` with the fully trained non-LoRA weights (projector, heads).

    The state dict holds the adapter keys as PEFT saves them (`base_model.model.<module>.lora_A.weight`, …); the
    non-LoRA trainables go to `extra["non_lora_trainables"]` with their `base_model.model.` prefix removed;
    `extra["adapter_config"]` is the parsed config."""
    path = Path(path)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ConversionError(f"{path}: a PEFT adapter folder holds `adapter_config.json`; not found")
    try:
        adapter_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{config_file}: not valid JSON: {err}") from err
    weights = next((path / name for name in PEFT_WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        raise ConversionError(f"{path}: no adapter weights (expected one of {list(PEFT_WEIGHTS)})")
    unwrapped: list[str] = []
    state = extract_state_dict(load_checkpoint_file(weights, trust_pickle), weights, unwrapped)
    files = [config_file, weights]
    extra: dict[str, Any] = {"adapter_config": adapter_config, "non_lora_trainables": {}}
    trainables = next((path / name for name in NON_LORA_TRAINABLES if (path / name).is_file()), None)
    if trainables is not None:
        extra_unwrapped: list[str] = []
        non_lora = extract_state_dict(load_checkpoint_file(trainables, trust_pickle), trainables, extra_unwrapped)
        extra["non_lora_trainables"] = strip_shared_prefixes(
            non_lora, extra_unwrapped, ("base_model.model.", "module.")
        )
        files.append(trainables)
    return SourceCheckpoint(state, path, files, unwrapped, extra)
