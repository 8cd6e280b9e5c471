"""LLaVA-style report-generator checkpoints → weights for `ReCTForConditionalGeneration` (`--format llava`).

A LLaVA (or Libra) training run leaves a stage-1 projector file and a stage-2 PEFT folder. Both layouts are read:

- transformers' LLaVA (`LlavaForConditionalGeneration`): `model.multi_modal_projector.linear_{1,2}.*`, the LM under
  `model.language_model.*` and `lm_head`;
- the original LLaVA training code: `model.mm_projector.{0,2}.*` (`mlp2x_gelu`), the LM under `model.*`.

The source folder may hold `mm_projector.bin` / `.safetensors` (stage 1), `adapter_config.json` + adapter weights and
`non_lora_trainables.bin` (stage 2). The output holds the same in ReCT names, ready for
`trainers.report_generation.load_projector` / `load_stage2` on a model with the `--config` architecture:
`mm_projector.safetensors`, `adapter_model.safetensors` + `adapter_config.json` (its `target_modules` narrowed to the
language model, whose layer names the ReCT vision encoder shares), `non_lora_trainables.safetensors`.

Every key is accounted for against the target built from `--config` (on the meta device: nothing is allocated):
projector keys by name and shape, LoRA keys by the in/out features of the linear layer they adapt. LLaVA's 2D vision
tower weights are dropped with the reason; Libra's TAC projector has no counterpart (ReCT's TAC is another module)
and fails the conversion by name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .mapping import ConversionReport, Drop, KeyMapping, Rename
from .readers import ConversionError, read_peft, read_raw
from .writer import REPORT, atomic_folder, write_manifest


PROJECTOR_FILES = ("mm_projector.safetensors", "mm_projector.bin")

#: Projector and language-model names, LLaVA → ReCT (rules tried in order; `(?:base_model\.model\.)?` covers PEFT).
LLAVA_RULES: list[Rename | Drop] = [
    Rename(
        r"(?:base_model\.model\.)?model\.multi_modal_projector\.linear_([12])\.(weight|bias)",
        r"multi_modal_projector.linear_\1.\2",
    ),
    Rename(r"(?:base_model\.model\.)?model\.mm_projector\.0\.(weight|bias)", r"multi_modal_projector.linear_1.\1"),
    Rename(r"(?:base_model\.model\.)?model\.mm_projector\.2\.(weight|bias)", r"multi_modal_projector.linear_2.\1"),
    Drop(r"(?:base_model\.model\.)?model\.vision_tower\..+", "LLaVA's 2D vision tower: ReCT uses its own 3D encoder"),
    Drop(
        r"(?:base_model\.model\.)?model\.image_newline", "LLaVA-NeXT's image-newline embedding has no 3D counterpart"
    ),
    Rename(r"base_model\.model\.model\.language_model\.(.+)", r"base_model.model.language_model.model.\1"),
    Rename(
        r"base_model\.model\.model\.(layers|embed_tokens|norm)\.(.+)", r"base_model.model.language_model.model.\1.\2"
    ),
    Rename(r"base_model\.model\.lm_head\.(.+)", r"base_model.model.language_model.lm_head.\1"),
]


def _module_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """`(out_features, in_features)` of every linear layer, by module name."""
    return {
        name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def _lora_targets(state: dict[str, torch.Tensor], model: torch.nn.Module, r: int) -> dict[str, torch.Tensor]:
    """The expected shape of every LoRA tensor in `state` (ReCT names), from the linear layer it adapts."""
    linear = _module_shapes(model)
    expected = {}
    for key in state:
        match = re.fullmatch(r"base_model\.model\.(.+)\.lora_(A|B)\.weight", key)
        if match is None:
            continue
        module, part = match.groups()
        if module not in linear:
            raise ConversionError(f"adapter key {key!r}: the target model has no linear layer {module!r}")
        out_features, in_features = linear[module]
        expected[key] = torch.empty((r, in_features) if part == "A" else (out_features, r), device="meta")
    return expected


def convert_llava(
    src: Path, out: Path, vlm_config: dict, trust_pickle: bool, overwrite: bool, source_info: dict
) -> ConversionReport:
    from hf_models import ReCTForConditionalGeneration, ReCTVLMConfig
    from trainers.report_generation import lora_target_pattern

    if vlm_config is None or vlm_config.get("model_type") != "rect_vlm":
        raise ConversionError(
            "--config for --format llava must be a ReCTVLMConfig (model_type 'rect_vlm') config.json"
        )
    config = ReCTVLMConfig(**{k: v for k, v in vlm_config.items() if k not in ("auto_map", "architectures")})
    if config.projector_type != "mlp":
        raise ConversionError(
            f"--config has projector_type {config.projector_type!r}; LLaVA's projector converts into 'mlp' (Libra's "
            "TAC weights have no counterpart in ReCT's TAC projector)"
        )
    with torch.device("meta"):
        model = ReCTForConditionalGeneration(config)
    targets = {k: v for k, v in model.state_dict().items()}

    report = ConversionReport(
        notes=[f"LLaVA layout → ReCTForConditionalGeneration (text model {config.text_config.model_type})"]
    )
    outputs: dict[str, dict[str, torch.Tensor]] = {}
    projector_file = next((src / n for n in PROJECTOR_FILES if (src / n).is_file()), None)
    libra = sorted(p.name for p in src.glob("mm_tac_projector*"))
    if libra:
        raise ConversionError(
            f"{src}: {libra} hold Libra's TAC projector, which has no counterpart in ReCT's TAC projector"
        )
    projector_rules = KeyMapping(LLAVA_RULES[:5], initialized={".*": "not in the projector file"})
    if projector_file is not None:
        state, part = projector_rules.apply(read_raw(projector_file, trust_pickle).state_dict, targets)
        outputs["mm_projector.safetensors"] = {k: state[k] for k in part.mapped_targets()}
        report.mapped.update({f"{projector_file.name}/{k}": v for k, v in part.mapped.items()})
        report.dropped.update({f"{projector_file.name}/{k}": v for k, v in part.dropped.items()})
    adapter_config = None
    if (src / "adapter_config.json").is_file():
        checkpoint = read_peft(src, trust_pickle)
        adapter_config = checkpoint.extra["adapter_config"]
        r = int(adapter_config.get("r", 8))
        renamed, part = KeyMapping(LLAVA_RULES).apply(checkpoint.state_dict, {}, allow_unknown_targets=True)
        expected = _lora_targets(renamed, model, r)
        others = sorted(set(renamed) - set(expected))
        if others:
            raise ConversionError(f"{src}: adapter keys {others[:5]} are neither LoRA A/B weights nor mapped")
        bad = [k for k, v in renamed.items() if tuple(v.shape) != tuple(expected[k].shape)]
        if bad:
            raise ConversionError(
                f"{src}: adapter tensors {bad[:3]} have shapes {[tuple(renamed[k].shape) for k in bad[:3]]}, the "
                f"target's layers need {[tuple(expected[k].shape) for k in bad[:3]]} (rank {r})"
            )
        outputs["adapter_model.safetensors"] = renamed
        report.mapped.update({f"adapter/{k}": v for k, v in part.mapped.items()})
        trainables = checkpoint.extra["non_lora_trainables"]
        if trainables:
            state, part = projector_rules.apply(trainables, targets)
            outputs["non_lora_trainables.safetensors"] = {k: state[k] for k in part.mapped_targets()}
            report.mapped.update({f"non_lora_trainables/{k}": v for k, v in part.mapped.items()})
            report.dropped.update({f"non_lora_trainables/{k}": v for k, v in part.dropped.items()})
        modules = sorted(
            {m for m in (adapter_config.get("target_modules") or [])}
            if isinstance(adapter_config.get("target_modules"), list)
            else set()
        )
        layer_names = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in renamed})
        adapter_config = {
            **adapter_config,
            "target_modules": lora_target_pattern(layer_names),
            "base_model_name_or_path": None,
        }
        report.notes.append(
            f"adapter target_modules {modules or adapter_config['target_modules']} narrowed to the language model"
        )
    if not outputs:
        raise ConversionError(
            f"{src}: no {' / '.join(PROJECTOR_FILES)} and no PEFT adapter folder (adapter_config.json)"
        )

    from safetensors.torch import save_file

    payload = {
        "source": source_info,
        "target": "ReCTForConditionalGeneration (projector / LoRA adapter)",
        **report.to_dict(),
    }
    with atomic_folder(out, overwrite) as tmp:
        for name, state in outputs.items():
            save_file({k: v.contiguous() for k, v in state.items()}, tmp / name)
        if adapter_config is not None:
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        (tmp / REPORT).write_text(json.dumps(payload, indent=2) + "\n")
        write_manifest(tmp, source_info)
    return report
