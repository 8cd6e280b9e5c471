"""Two-stage training of the report generator (SPEC §5, Libra): what is trainable in each stage and how each stage's
weights are saved and loaded.

- Stage 1 trains the projector only (vision encoder and language model frozen); `save_projector` writes its weights
  alone as `mm_projector.safetensors` (LLaVA's `mm_projector.bin`, without the pickle).
- Stage 2 adds LoRA (r 128, α 256, dropout 0.05 by default) on every linear layer of the language model; the
  projector stays trainable (at its own lower learning rate, a parameter group of `ReCTTrainer`) or is frozen.
  `save_stage2` writes the PEFT adapter and `non_lora_trainables.safetensors` (the trained non-LoRA weights);
  `load_stage2` puts both back onto a model holding the stage-1 weights.
- `save_merged` folds the adapter into the language model (`merge_and_unload`) and writes a plain Hub folder that
  loads with `AutoModel…from_pretrained(folder, trust_remote_code=True)` without peft.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from torch import nn


PROJECTOR_FILE = "mm_projector.safetensors"
NON_LORA_FILE = "non_lora_trainables.safetensors"
PROJECTOR_PREFIX = "multi_modal_projector."
#: The diagnosis prompt's classifier head: a trained classifier's, frozen in both stages.
DIAGNOSIS_HEAD_PREFIX = "multi_modal_projector.diagnosis.classifier."


def _projector_trainable(name: str) -> bool:
    name = name.removeprefix("base_model.model.")
    return name.startswith(PROJECTOR_PREFIX) and not name.startswith(DIAGNOSIS_HEAD_PREFIX)


def _base(model: nn.Module) -> nn.Module:
    """The `ReCTForConditionalGeneration` under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def trainable_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per top-level part (`vision_model`, `multi_modal_projector`, `language_model`, `lora`)."""
    counts = {"vision_model": 0, "multi_modal_projector": 0, "language_model": 0, "lora": 0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_" in name:
            counts["lora"] += param.numel()
            continue
        part = name.removeprefix("base_model.model.").split(".")[0]
        counts[part] = counts.get(part, 0) + param.numel()
    return counts


def language_model_linear_layers(model: nn.Module) -> list[str]:
    """Names (suffixes) of every `nn.Linear` type inside the language model except its output head: for a Llama,
    q/k/v/o and gate/up/down projections. Read from the model, never hard-coded."""
    language = _base(model).language_model
    head = language.get_output_embeddings()
    names = set()
    for name, module in language.named_modules():
        if module is head or not name:
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def lora_target_pattern(layer_names) -> str:
    """peft `target_modules` regex for the language model's layers named `layer_names` only: the ReCT encoder's
    attention has `q_proj`/`k_proj`/`v_proj`/`o_proj` too, which plain names would also adapt."""
    return rf"language_model\..*\.({'|'.join(map(re.escape, layer_names))})"


def stage1(model: nn.Module) -> dict[str, int]:
    """Freeze everything but the projector (its diagnosis head, a trained classifier's, stays frozen too); returns
    `trainable_counts`."""
    for name, param in model.named_parameters():
        param.requires_grad = _projector_trainable(name)
    return trainable_counts(model)


def stage2(
    model: nn.Module,
    r: int = 128,
    alpha: int = 256,
    dropout: float = 0.05,
    train_projector: bool = True,
    quantized: bool = False,
):
    """LoRA on every linear layer of the language model (`language_model_linear_layers`); the vision encoder and
    the language model's own weights frozen; the projector (but its diagnosis head) trainable when
    `train_projector`. With a 4-bit or 8-bit language model (`quantized`), PEFT's `prepare_model_for_kbit_training`
    runs first. Returns the PEFT model."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    layers = language_model_linear_layers(model)
    if not layers:
        raise ValueError("the language model has no linear layers for LoRA")
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for param in model.parameters():
        param.requires_grad = False
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_pattern(layers), bias="none"
    )
    with warnings.catch_warnings():
        # peft (0.21) reads `model.is_gradient_checkpointing`, which transformers 5 deprecates in favour of
        # `is_activation_checkpointing`: a message for peft's authors, not for our users.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if _projector_trainable(name):
            param.requires_grad = train_projector
    return peft_model


def save_projector(model: nn.Module, path: str | os.PathLike) -> Path:
    """The projector's weights alone (`mm_projector.safetensors` in a folder, or the given file name)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / PROJECTOR_FILE
    state = {
        f"{PROJECTOR_PREFIX}{k}": v.detach().contiguous()
        for k, v in _base(model).multi_modal_projector.state_dict().items()
    }
    save_file(state, path)
    return path


def load_projector(model: nn.Module, path: str | os.PathLike) -> None:
    """Load `save_projector`'s file into `model`'s projector (strict: every key, every shape)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / PROJECTOR_FILE
    state = load_file(path)
    wrong = [k for k in state if not k.startswith(PROJECTOR_PREFIX)]
    if wrong:
        raise ValueError(f"{path}: keys {wrong[:5]} are not projector weights ({PROJECTOR_PREFIX}*)")
    _base(model).multi_modal_projector.load_state_dict(
        {k[len(PROJECTOR_PREFIX) :]: v for k, v in state.items()}, strict=True
    )


def save_stage2(peft_model, folder: str | os.PathLike) -> Path:
    """The PEFT adapter (`adapter_model.safetensors`, `adapter_config.json`) plus `non_lora_trainables.safetensors`:
    every trainable non-LoRA weight, named as in the model without the PEFT prefix."""
    from safetensors.torch import save_file

    folder = Path(folder)
    peft_model.save_pretrained(folder)
    trainables = {
        name.removeprefix("base_model.model."): param.detach().contiguous()
        for name, param in peft_model.named_parameters()
        if param.requires_grad and "lora_" not in name
    }
    if trainables:
        save_file(trainables, folder / NON_LORA_FILE)
    return folder


def load_stage2(model: nn.Module, folder: str | os.PathLike, is_trainable: bool = False):
    """`save_stage2`'s folder onto `model` (the base `ReCTForConditionalGeneration`): the non-LoRA trainables, then
    the adapter. Returns the PEFT model."""
    from peft import PeftModel
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / NON_LORA_FILE).is_file():
        state = load_file(folder / NON_LORA_FILE)
        own = model.state_dict()
        unknown = [k for k in state if k not in own]
        if unknown:
            raise ValueError(f"{folder / NON_LORA_FILE}: keys {unknown[:5]} are not in {type(model).__name__}")
        model.load_state_dict({**own, **state}, strict=True)
    return PeftModel.from_pretrained(model, folder, is_trainable=is_trainable)


def save_merged(peft_model, folder: str | os.PathLike, processor=None) -> Path:
    """Merge the LoRA weights into the language model and save a plain folder (no adapter, no peft needed)."""
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    return Path(folder)


__all__ = [
    "PROJECTOR_FILE",
    "NON_LORA_FILE",
    "trainable_counts",
    "language_model_linear_layers",
    "stage1",
    "stage2",
    "save_projector",
    "load_projector",
    "save_stage2",
    "load_stage2",
    "save_merged",
]
