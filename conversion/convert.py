"""`convert`: a raw checkpoint → a Hub-ready folder, with every key accounted for (`rect-vlm convert`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_models import (
    ReCTConfig,
    ReCTForConditionalGeneration,
    ReCTForFeatureExtraction,
    ReCTForLesionLocalization,
    ReCTForVolumeClassification,
    ReCTImageProcessor,
    ReCTModel,
    ReCTVisionConfig,
    ReCTVisionModel,
    ReCTVLMConfig,
)

from .layouts import monai_vit_layout, sam_med3d_layout
from .mapping import ConversionReport, KeyMapping, identity_mapping
from .readers import (
    PICKLE_SUFFIXES,
    ConversionError,
    SourceCheckpoint,
    is_deepspeed_folder,
    read_deepspeed,
    read_lightning,
    read_peft,
    read_raw,
    source_sha256,
)
from .writer import REPORT, atomic_folder, save_model_folder, write_manifest


FORMATS = ("auto", "raw", "lightning", "deepspeed", "peft", "rect-tree", "monai-vit", "sam-med3d", "llava")

#: Classes a target config's `architectures` may name.
TARGET_CLASSES = {
    cls.__name__: cls
    for cls in (
        ReCTVisionModel,
        ReCTForFeatureExtraction,
        ReCTModel,
        ReCTForVolumeClassification,
        ReCTForLesionLocalization,
        ReCTForConditionalGeneration,
    )
}
#: The class a config without `architectures` converts to.
DEFAULT_CLASS = {"rect_vision": ReCTVisionModel, "rect": ReCTModel, "rect_vlm": ReCTForConditionalGeneration}


@dataclass
class ConversionResult:
    out: Path
    report: ConversionReport
    model: torch.nn.Module | None
    #: rect-tree: one report per converted component, and the tree entries left out with their reasons.
    components: dict[str, ConversionReport] | None = None
    skipped: dict[str, str] | None = None


def detect_format(src: Path) -> str:
    """The format of `src` from its layout: a DeepSpeed folder, a PEFT folder, a Lightning `.ckpt`, a file."""
    if src.is_dir():
        if is_deepspeed_folder(src):
            return "deepspeed"
        if (src / "adapter_config.json").is_file():
            return "peft"
        from .tree import TREE_COMPONENTS

        if any((src / name).is_dir() for name in TREE_COMPONENTS):
            return "rect-tree"
        raise ConversionError(
            f"{src}: cannot tell the format of this folder (not a DeepSpeed checkpoint, no adapter_config.json, no "
            "seed-000 component folders); pass --format"
        )
    if src.suffix == ".ckpt":
        return "lightning"
    if src.suffix in (*PICKLE_SUFFIXES, ".safetensors"):
        return "raw"
    raise ConversionError(f"{src}: unknown checkpoint type {src.suffix!r}; pass --format")


def load_json_arg(value: str | os.PathLike | dict | None, name: str) -> dict[str, Any] | None:
    """A JSON object given as a dict, a path to a `.json` file, a folder holding `config.json`, or inline JSON."""
    if value is None or isinstance(value, dict):
        return value
    text = str(value)
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConversionError(f"{name} {path}: not valid JSON: {err}") from err
    elif text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConversionError(f"{name}: not valid JSON: {err}") from err
    else:
        raise ConversionError(
            f"{name} {text}: no such file (expected a JSON file, a folder with config.json, or JSON)"
        )
    if not isinstance(data, dict):
        raise ConversionError(f"{name}: expected a JSON object, got {type(data).__name__}")
    return data


def target_from_config(config_dict: dict[str, Any]) -> tuple[type, Any]:
    """The ReCT class and config a `config.json` describes (`architectures[0]`, else the `model_type` default)."""
    model_type = config_dict.get("model_type")
    config_classes = {"rect_vision": ReCTVisionConfig, "rect": ReCTConfig, "rect_vlm": ReCTVLMConfig}
    if model_type not in config_classes:
        raise ConversionError(f"--config: `model_type` must be one of {sorted(config_classes)}, got {model_type!r}")
    fields = {k: v for k, v in config_dict.items() if k not in ("auto_map", "transformers_version")}
    config = config_classes[model_type](**fields)
    names = config_dict.get("architectures") or []
    if names:
        if names[0] not in TARGET_CLASSES:
            raise ConversionError(f"--config: architectures[0] {names[0]!r} is not one of {sorted(TARGET_CLASSES)}")
        cls = TARGET_CLASSES[names[0]]
        if cls.config_class is not type(config):
            raise ConversionError(
                f"--config: {names[0]} takes a {cls.config_class.model_type!r} config, not {model_type!r}"
            )
        return cls, config
    return DEFAULT_CLASS[model_type], config


def _build(cls: type, config: Any) -> torch.nn.Module:
    torch.manual_seed(0)  # keys left at initialisation are reproducible
    return cls(config).eval()


def default_processor(model: torch.nn.Module) -> ReCTImageProcessor | None:
    """An image processor for the model's volume size when it reads one channel (one HU window)."""
    vision = model.config if isinstance(model.config, ReCTVisionConfig) else model.config.vision_config
    if vision.in_channels != 1:
        return None
    return ReCTImageProcessor(volume_size=list(vision.volume_size))


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    format: str = "auto",
    config: str | os.PathLike | dict | None = None,
    source_config: str | os.PathLike | dict | None = None,
    trust_pickle: bool = False,
    overwrite: bool = False,
    max_shard_size: str | int = "2GB",
) -> ConversionResult:
    """Convert the checkpoint `src` into the Hub folder `out`.

    Args:
        src: a checkpoint file (`.pt`, `.pth`, `.bin`, `.ckpt`, `.safetensors`) or folder (DeepSpeed, PEFT).
        out: destination folder; must be absent or empty unless `overwrite`.
        format: one of `FORMATS`; `"auto"` detects raw / lightning / deepspeed / peft from the layout.
        config: the target `config.json` (path, folder or dict). Required for raw, lightning, deepspeed (the
            architecture the keys belong to) and peft (the base model); optional overrides for monai-vit and
            sam-med3d (region queries, divided attention, projection size).
        source_config: upstream constructor arguments (monai-vit: MONAI `ViT`'s; sam-med3d: `num_heads` if the
            weights cannot tell).
        trust_pickle: read pickles that construct arbitrary objects (only for files you trust).
        overwrite: replace an existing non-empty `out` (atomically, once the new folder is complete).

    Raises:
        ConversionError: unreadable or unsafe input, an unexpected or missing key, a shape mismatch, a bad config.
    """
    src = Path(src)
    if not src.exists():
        raise ConversionError(f"{src}: no such file or folder")
    if format not in FORMATS:
        raise ConversionError(f"--format must be one of {list(FORMATS)}, got {format!r}")
    if format == "auto":
        format = detect_format(src)
    target_config = load_json_arg(config, "--config")
    args = load_json_arg(source_config, "--source-config")
    source_info = {"path": src.name, "format": format, "sha256": source_sha256(src)}

    if format == "rect-tree":
        from .tree import convert_tree

        result = convert_tree(src, out, target_config, trust_pickle, overwrite)
        skipped = result.pop("skipped")
        merged = ConversionReport()
        for name, report in result.items():
            merged.mapped.update({f"{name}/{k}": v for k, v in report.mapped.items()})
            merged.dropped.update({f"{name}/{k}": v for k, v in report.dropped.items()})
            merged.initialized.update({f"{name}/{k}": v for k, v in report.initialized.items()})
        merged.notes = [f"{path}: left out, {reason}" for path, reason in skipped.items()]
        return ConversionResult(Path(out), merged, None, components=result, skipped=skipped)

    if format == "llava":
        from .llava import convert_llava

        report = convert_llava(src, Path(out), target_config, trust_pickle, overwrite, source_info)
        return ConversionResult(Path(out), report, None)

    if format == "peft":
        return _convert_peft(src, Path(out), target_config, trust_pickle, overwrite, source_info)

    if format in ("raw", "lightning", "deepspeed"):
        if target_config is None:
            raise ConversionError(
                f"--config is required for --format {format}: the target config.json says which ReCT model the "
                "keys belong to"
            )
        reader = {"raw": read_raw, "lightning": read_lightning, "deepspeed": read_deepspeed}[format]
        checkpoint: SourceCheckpoint = reader(src, trust_pickle=trust_pickle)
        cls, model_config = target_from_config(target_config)
        mapping: KeyMapping = identity_mapping()
    else:
        checkpoint = read_raw(src, trust_pickle=trust_pickle)
        if format == "monai-vit":
            if args is None:
                raise ConversionError("--source-config is required for monai-vit: MONAI ViT's constructor arguments")
            model_config, mapping = monai_vit_layout(args, target_config)
        else:
            model_config, mapping = sam_med3d_layout(checkpoint.state_dict, args, target_config)
        cls = ReCTVisionModel

    model = _build(cls, model_config)
    state, report = mapping.apply(checkpoint.state_dict, model.state_dict())
    model.load_state_dict(state, strict=True)
    report.notes[:0] = [f"unwrapped: {', '.join(checkpoint.unwrapped)}"] if checkpoint.unwrapped else []
    processor = default_processor(model)
    if processor is not None:
        report.notes.append(
            "processor: ReCTImageProcessor defaults for this volume size (wide HU window, [-1, 1]); match them to "
            "the source model's training preprocessing before relying on its outputs"
        )
    payload = {"source": source_info, "target": cls.__name__, **report.to_dict()}
    with atomic_folder(out, overwrite) as tmp:
        save_model_folder(tmp, model, payload, source_info, processor, max_shard_size)
    return ConversionResult(Path(out), report, model)


def _convert_peft(
    src: Path, out: Path, base_config: dict | None, trust_pickle: bool, overwrite: bool, source_info: dict
) -> ConversionResult:
    """A PEFT adapter folder (`.bin` or safetensors, plus `non_lora_trainables.bin`) → the same adapter as
    safetensors, every key checked against the base model `base_config` describes: adapter keys against a PEFT
    model built from `adapter_config.json`, non-LoRA trainables against the base model's own keys."""
    if base_config is None:
        raise ConversionError("--config is required for --format peft: the base model's config.json")
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    checkpoint = read_peft(src, trust_pickle=trust_pickle)
    cls, config = target_from_config(base_config)
    base = _build(cls, config)
    adapter_config = {k: v for k, v in checkpoint.extra["adapter_config"].items() if k != "peft_type"}
    try:
        lora_config = LoraConfig(**{k: v for k, v in adapter_config.items() if k in LoraConfig.__dataclass_fields__})
    except (TypeError, ValueError) as err:
        raise ConversionError(f"{src}/adapter_config.json: not a LoRA config PEFT accepts: {err}") from err
    try:
        peft_model = get_peft_model(base, lora_config)
    except ValueError as err:
        raise ConversionError(f"{src}: the adapter's target modules do not exist in {cls.__name__}: {err}") from err
    expected = get_peft_model_state_dict(peft_model)
    # PEFT saves keys without the adapter name (`lora_A.weight`); the model's own state dict has `lora_A.default`.
    adapter_state, report = identity_mapping().apply(checkpoint.state_dict, expected)
    trainables = checkpoint.extra["non_lora_trainables"]
    trainable_state, trainable_report = (
        identity_mapping({".*": "not trained in stage 2"}).apply(trainables, base.state_dict())
        if trainables
        else ({}, ConversionReport())
    )
    report.mapped.update(
        {f"non_lora_trainables/{k}": f"non_lora_trainables/{v}" for k, v in trainable_report.mapped.items()}
    )
    payload = {"source": source_info, "target": f"PEFT LoRA adapter for {cls.__name__}", **report.to_dict()}

    def write(folder: Path) -> None:
        save_file({k: v.contiguous() for k, v in adapter_state.items()}, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps(checkpoint.extra["adapter_config"], indent=2) + "\n")
        if trainables:
            save_file(
                {k: trainable_state[k].contiguous() for k in trainables}, folder / "non_lora_trainables.safetensors"
            )
        (folder / REPORT).write_text(json.dumps(payload, indent=2) + "\n")
        write_manifest(folder, source_info)

    with atomic_folder(out, overwrite) as tmp:
        write(tmp)
    return ConversionResult(out, report, None)
