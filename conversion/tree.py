"""The seed-000 checkpoint tree → one Hub folder per component (`rect-vlm convert TREE --format rect-tree`).

    checkpoints/
    ├── vision_encoder/   best_model.pt | model_epoch_N.pt                 → OUT/vision_encoder/  (ReCTVisionModel)
    ├── classification/   best_model.pt | model_epoch_N.pt                 → OUT/classification/  (classifier)
    │                     biobert_projectors.pt                              (left out, reason in the report)
    ├── localization/     best_model.pt | model_epoch_N.pt, or the parts   → OUT/localization/    (localizer)
    │                     text_embedder.pt, denoising_transformer.pt, attention_unet.pt
    ├── report_generator/                                                   (left out until the report generator)
    └── full_model/                                                         (left out: convert per component)

Each component's target config is `<component>/config.json` in the tree or `configs[<component>]`. In a component
folder the checkpoint is `best_model.pt`, else the `model_epoch_N.pt` with the highest N. Keys are in ReCT naming
(any wrapping `readers.read_raw` unwraps). A classifier or localizer checkpoint without `vision_model.*` keys (a
head saved alone) takes its encoder from `vision_encoder/`; the report says so. The localizer's part files hold the
keys of its parts: `text_embedder.pt` the prompt text tower, `denoising_transformer.pt` the prompt/image fusion,
`attention_unet.pt` the shared U-Net decoder and mask heads (`LOCALIZER_PARTS`); a key outside its file's part
fails the conversion.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from hf_models import ReCTForLesionLocalization, ReCTForVolumeClassification, ReCTVisionModel

from .mapping import ConversionReport, Drop, identity_mapping
from .readers import ConversionError, SourceCheckpoint, read_raw, source_sha256
from .writer import atomic_folder, save_model_folder


TREE_COMPONENTS = {
    "vision_encoder": ReCTVisionModel,
    "classification": ReCTForVolumeClassification,
    "localization": ReCTForLesionLocalization,
}
#: Tree folders that are not converted here, and why.
NOT_CONVERTED = {
    "report_generator": "the report generator (projector + LoRA) converts with its own class, not yet in this version",
    "full_model": "a multi-task checkpoint: convert its components from their own folders",
}
#: Files of a component folder that are not the component's weights, and why they are left out.
SIDE_FILES = {
    "biobert_projectors.pt": "vision/text projectors of the contrastive model: the ReCT classifier is vision-only "
    "(a SigLIP-style head); convert them with ReCTModel",
}
#: The localizer's part files → the top-level modules of `ReCTForLesionLocalization` each holds.
LOCALIZER_PARTS = {
    "text_embedder.pt": ("text_model", "prompt_text_projection"),
    "denoising_transformer.pt": (
        "fusion_layers",
        "fusion_norm",
        "query_tokens",
        "point_embeddings",
        "box_embeddings",
        "position_projection",
        "image_projection",
        "image_norm",
    ),
    "attention_unet.pt": (
        "decoder_input",
        "stages",
        "input_pyramid",
        "skip_projections",
        "mask_embedding",
        "coarse_mask_embedding",
        "iou_head",
    ),
}


def component_checkpoint(folder: Path) -> Path | None:
    """`best_model.pt`, else the `model_epoch_N.pt` with the highest N, else None."""
    if (folder / "best_model.pt").is_file():
        return folder / "best_model.pt"
    epochs = [
        (int(m.group(1)), p)
        for p in folder.glob("model_epoch_*.pt")
        if (m := re.fullmatch(r"model_epoch_(\d+)\.pt", p.name))
    ]
    return max(epochs)[1] if epochs else None


def _read_localizer_parts(folder: Path, trust_pickle: bool) -> SourceCheckpoint:
    missing = [name for name in LOCALIZER_PARTS if not (folder / name).is_file()]
    if missing:
        raise ConversionError(
            f"{folder}: no best_model.pt / model_epoch_N.pt and the part files {missing} are missing"
        )
    state: dict[str, torch.Tensor] = {}
    files, unwrapped = [], []
    for name, modules in LOCALIZER_PARTS.items():
        part = read_raw(folder / name, trust_pickle=trust_pickle)
        outside = [k for k in part.state_dict if k.split(".")[0] not in modules]
        if outside:
            raise ConversionError(
                f"{folder / name}: keys {outside[:5]} are not part of the {name[:-3]} part (modules {list(modules)})"
            )
        state.update(part.state_dict)
        files.append(folder / name)
        unwrapped += [f"{name}: {step}" for step in part.unwrapped]
    return SourceCheckpoint(state, folder, files, unwrapped)


def _target_config(tree: Path, name: str, configs: dict[str, Any]) -> dict[str, Any]:
    from .convert import load_json_arg

    if name in configs:
        return load_json_arg(configs[name], f"--config[{name}]")
    path = tree / name / "config.json"
    if path.is_file():
        return load_json_arg(path, "config")
    raise ConversionError(
        f"{tree / name}: no target config; put its config.json there or pass --config '{{\"{name}\": PATH}}'"
    )


def convert_tree(
    src: str | os.PathLike,
    out: str | os.PathLike,
    configs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert every component of a seed-000 tree into `out/<component>/`; everything or nothing is written.
    Returns `{component: ConversionReport}` plus `"skipped": {path: reason}`."""
    from .convert import target_from_config

    tree = Path(src)
    configs = dict(configs or {})
    unknown = sorted(set(configs) - set(TREE_COMPONENTS))
    if unknown:
        raise ConversionError(f"--config names unknown tree components {unknown}; known: {sorted(TREE_COMPONENTS)}")
    present = [name for name in TREE_COMPONENTS if (tree / name).is_dir()]
    if not present:
        raise ConversionError(f"{tree}: none of the component folders {sorted(TREE_COMPONENTS)} (seed-000 tree)")
    skipped = {f"{name}/": reason for name, reason in NOT_CONVERTED.items() if (tree / name).is_dir()}
    encoder = None
    if (tree / "vision_encoder").is_dir():
        path = component_checkpoint(tree / "vision_encoder")
        if path is None:
            raise ConversionError(f"{tree / 'vision_encoder'}: no best_model.pt or model_epoch_N.pt")
        encoder = read_raw(path, trust_pickle=trust_pickle)

    built: dict[str, tuple[torch.nn.Module, dict[str, Any]]] = {}
    reports: dict[str, ConversionReport] = {}
    for name in present:
        folder = tree / name
        for side, reason in SIDE_FILES.items():
            if (folder / side).is_file():
                skipped[f"{name}/{side}"] = reason
        if name == "vision_encoder":
            checkpoint = encoder
        else:
            path = component_checkpoint(folder)
            if path is not None:
                checkpoint = read_raw(path, trust_pickle=trust_pickle)
            elif name == "localization":
                checkpoint = _read_localizer_parts(folder, trust_pickle)
            else:
                raise ConversionError(f"{folder}: no best_model.pt or model_epoch_N.pt")
        cls, config = target_from_config(_target_config(tree, name, configs))
        if cls is not TREE_COMPONENTS[name] and name != "vision_encoder":
            raise ConversionError(
                f"{tree / name}: its config describes {cls.__name__}, not {TREE_COMPONENTS[name].__name__}"
            )
        torch.manual_seed(0)
        model = cls(config).eval()
        state = dict(checkpoint.state_dict)
        notes = [f"unwrapped: {', '.join(checkpoint.unwrapped)}"] if checkpoint.unwrapped else []
        mapping = identity_mapping()
        if name != "vision_encoder" and not any(k.startswith("vision_model.") for k in state):
            if encoder is None:
                raise ConversionError(
                    f"{folder}: the checkpoint has no vision_model.* keys and the tree no vision_encoder/"
                )
            shared = {f"vision_model.{k}": v for k, v in encoder.state_dict.items()}
            state.update(shared)
            notes.append(f"vision_model.* taken from {encoder.path.relative_to(tree)} (the shared encoder)")
            # What the shared encoder has and this component's encoder does not (the localizer's has no region
            # queries) is dropped, by name, with the reason.
            target_keys = model.state_dict()
            unused = [k for k in shared if k not in target_keys]
            mapping.rules[:0] = [
                Drop(re.escape(k), f"shared encoder weight that {cls.__name__}'s encoder does not have")
                for k in unused
            ]
        loaded, report = mapping.apply(state, model.state_dict())
        model.load_state_dict(loaded, strict=True)
        report.notes[:0] = notes
        files = sorted({str(p.relative_to(tree)) for p in checkpoint.files})
        source = {
            "path": f"{tree.name}/{name}",
            "format": "rect-tree",
            "files": files,
            "sha256": source_sha256(folder),
        }
        built[name] = (model, {"source": source, "target": cls.__name__, **report.to_dict()})
        reports[name] = report

    with atomic_folder(out, overwrite) as tmp:
        from .convert import default_processor

        for name, (model, payload) in built.items():
            (tmp / name).mkdir()
            save_model_folder(tmp / name, model, payload, payload["source"], default_processor(model))
        (tmp / "conversion_tree.json").write_text(
            json.dumps(
                {"components": sorted(built), "skipped": skipped, "source_sha256": source_sha256(tree)}, indent=2
            )
            + "\n"
        )
    return {**reports, "skipped": skipped}
