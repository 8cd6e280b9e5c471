"""Training recipes: YAML files in this folder → a validated `Recipe` → `TrainingArguments` + `ReCTTrainer` keywords.

Each file holds one full recipe (the design documents' hyper-parameters; comments cite the source of each number)
and a `tiny:` section whose values override the full ones for a run on a few CPU cores in minutes (the tests'
tiny configs; seed 002's `--test` quick mode). The schema is the dataclasses below: every key of a file must be a
field, every field without a default must be given, and every value must have the field's type, else
`load_recipe` raises a `ValueError` that names the file, the key and the allowed keys or type. No torch or
transformers import happens until `Recipe.training_arguments` is called.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


RECIPE_DIR = Path(__file__).resolve().parent

#: The recipes shipped in this folder (`load_recipe("localization")`).
RECIPE_NAMES = ("vision_pretrain", "classification", "localization", "report_stage1", "report_stage2", "multitask")

Task = Literal["vision_pretrain", "classification", "localization", "report_generation", "multitask"]
Scheduler = Literal["cosine", "linear", "constant", "plateau", "step"]

#: Recipe scheduler name → `TrainingArguments.lr_scheduler_type` ("step" is `ReCTTrainer(lr_step=...)` on a
#: constant base schedule; "cosine" with `min_lr` becomes "cosine_with_min_lr").
_LR_SCHEDULER_TYPES = {
    "cosine": "cosine",
    "linear": "linear",
    "constant": "constant_with_warmup",
    "plateau": "reduce_lr_on_plateau",
    "step": "constant",
}


@dataclass
class ModelSection:
    """Which model class to build and the config values that differ from its defaults."""

    #: A class name of `hf_models` (`ReCTModel`, `ReCTForVolumeClassification`, `ReCTForLesionLocalization`,
    #: `ReCTForConditionalGeneration`).
    model_class: str
    #: Keyword arguments of the model's config (nested dicts for `vision_config`/`text_config`).
    config: dict[str, Any] = field(default_factory=dict)
    #: A folder or Hub id to start from (`from_pretrained`); None = random initialisation.
    pretrained: str | None = None
    #: `ReCTModel` / `ReCTForLesionLocalization`: a BERT-like text model folder or Hub id (weights + tokenizer, e.g.
    #: Bio_ClinicalBERT) whose weights initialise the text tower and whose config replaces `config.text_config`, as
    #: CLIP-style dual encoders start from a pretrained text encoder. `ReCTForConditionalGeneration`: the causal
    #: language model (a folder with its tokenizer, or `smollm2` for the packaged SmolLM2 GGUF). None =
    #: `config.text_config`, randomly initialised.
    text_pretrained: str | None = None
    gradient_checkpointing: bool = False


@dataclass
class DataSection:
    """Where the examples come from and how they are read."""

    #: Reader: `ct_rate` (CT-RATE layout, SPEC §6), `segmentation_csv` (seed 002: `path, label, patient_id`),
    #: `llava_json` (Libra/LLaVA conversations with current and prior image paths), `phantom` (generated cohort).
    format: Literal["ct_rate", "segmentation_csv", "llava_json", "phantom"]
    root: str | None = None
    train_split: str = "train"
    valid_split: str | None = "valid"
    volume_size: list[int] | None = None
    #: HU window names (`lung`, `mediastinum`, ...) or `[low, high]` pairs, one input channel each.
    windows: list[str | list[float]] | None = None
    mask_dir: str | None = None
    #: Report fields fed to the text tower / language model.
    text_fields: list[str] | None = None
    max_length: int | None = None
    #: `vision_pretrain`: strength of `ct_augmentation` on the training split (None or 0 = none), without its
    #: left-right flip (reports and anatomy regions name sides).
    augmentation: float | None = None
    #: Label columns (classification); None = all 18 CT-RATE findings.
    labels: list[str] | None = None
    #: Volumes generated per split for `format: phantom` (`trainers.data.phantom.generate_cohort`).
    n_train: int | None = None
    n_val: int | None = None
    #: Localization: masks (prompts) per volume and training step, answered in one decoder pass (K).
    targets_per_volume: int | None = None
    #: Localization: prompt mode of each batch, cycled (`trainers.data.localization.PromptModeCollator`): `text`
    #: (the K text prompts), `text+box` or `text+points` (the first target's text with its box or points). Repeat a
    #: mode to give it more batches; None = each mode once.
    prompt_modes: list[Literal["text", "text+box", "text+points"]] | None = None


@dataclass
class OptimizationSection:
    """Optimizer, schedule and loop (AdamW as `TrainingArguments` builds it)."""

    lr: float
    weight_decay: float
    scheduler: Scheduler
    batch_size: int
    seed: int
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    #: Floor of the cosine schedule (absolute lr; scaled for each param group by its lr / `lr`).
    min_lr: float | None = None
    #: "step" scheduler: × `gamma` every `step_size` optimizer steps.
    step_size: int | None = None
    gamma: float | None = None
    warmup_ratio: float | None = None
    warmup_steps: int | None = None
    epochs: float | None = None
    max_steps: int | None = None
    eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    #: Used only where the device supports it: on CPU the run is float32 whatever this says.
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    #: A DeepSpeed JSON config file (relative to the recipe file or absolute); None = no DeepSpeed.
    deepspeed: str | None = None
    logging_steps: int = 10
    #: "no", "steps" or "epoch": how often to evaluate and save (early stopping and the plateau schedule need it).
    eval_strategy: Literal["no", "steps", "epoch"] = "no"
    eval_steps: int | None = None


@dataclass
class ParamGroup:
    """One optimizer parameter group (`ReCTTrainer(param_groups=...)`)."""

    name: str
    #: Parameter-name prefixes (`vision_model`) or fnmatch patterns (`*lora_*`).
    modules: list[str]
    lr: float
    weight_decay: float | None = None


@dataclass
class LoraSection:
    """peft `LoraConfig` values (report stage 2)."""

    r: int
    alpha: int
    dropout: float
    target_modules: list[str]
    #: Non-LoRA modules that also train and are saved with the adapter (peft `modules_to_save`).
    modules_to_save: list[str] = field(default_factory=list)
    bias: Literal["none", "all", "lora_only"] = "none"


@dataclass
class EarlyStoppingSection:
    patience: int
    #: An evaluation metric key without the `eval_` prefix (`loss`, `dice`).
    metric: str
    greater_is_better: bool = False
    threshold: float = 0.0


@dataclass
class LossesSection:
    """Weights of each loss term (None = the term is not used by this recipe)."""

    contrastive: float | None = None
    region: float | None = None
    classification: float | None = None
    dice: float | None = None
    focal: float | None = None
    lm: float | None = None
    #: Temperature of the global InfoNCE at initialisation (learnable).
    temperature: float | None = None


@dataclass
class Recipe:
    """A validated training recipe (see the module docstring)."""

    task: Task
    model: ModelSection
    data: DataSection
    optimization: OptimizationSection
    description: str = ""
    param_groups: list[ParamGroup] = field(default_factory=list)
    freeze: list[str] = field(default_factory=list)
    lora: LoraSection | None = None
    early_stopping: EarlyStoppingSection | None = None
    losses: LossesSection = field(default_factory=LossesSection)
    #: The file this recipe was read from (set by `load_recipe`, not a YAML key).
    source: str | None = field(default=None, metadata={"yaml": False})
    tiny: bool = field(default=False, metadata={"yaml": False})

    def trainer_kwargs(self) -> dict[str, Any]:
        """`ReCTTrainer` keyword arguments: `param_groups`, `freeze` and (step scheduler) `lr_step`."""
        opt = self.optimization
        lr_step = {"step_size": opt.step_size, "gamma": opt.gamma} if opt.scheduler == "step" else None
        return {
            "param_groups": [dataclasses.asdict(g) for g in self.param_groups],
            "freeze": list(self.freeze),
            "lr_step": lr_step,
        }

    def callbacks(self) -> list:
        """Trainer callbacks the recipe asks for (`EarlyStoppingCallback` when `early_stopping` is set)."""
        if self.early_stopping is None:
            return []
        from transformers import EarlyStoppingCallback

        return [
            EarlyStoppingCallback(
                early_stopping_patience=self.early_stopping.patience,
                early_stopping_threshold=self.early_stopping.threshold,
            )
        ]

    def deepspeed_config(self) -> str | None:
        """`optimization.deepspeed` as a JSON path: `zero2` / `zero3` name the shipped configs
        (`trainers/deepspeed/`), a relative path is relative to the recipe file; None without DeepSpeed."""
        from ..distributed import DEEPSPEED_CONFIGS, resolve_deepspeed

        value = self.optimization.deepspeed
        if value is None or value in DEEPSPEED_CONFIGS or Path(value).is_absolute():
            return resolve_deepspeed(value)
        return resolve_deepspeed(Path(self.source or ".").parent / value)

    def training_arguments(self, output_dir: str | Path, **overrides) -> Any:
        """`transformers.TrainingArguments` from the recipe; `overrides` are `TrainingArguments` keywords that
        replace the recipe's values (`report_to`, `use_cpu`, `max_steps`, ...).

        Mixed precision is enabled only when the recipe asks for it and a CUDA device is present (bf16 only where
        the device supports it).
        """
        import torch
        from transformers import TrainingArguments

        opt = self.optimization
        kwargs: dict[str, Any] = dict(
            output_dir=str(output_dir),
            learning_rate=opt.lr,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.betas[0],
            adam_beta2=opt.betas[1],
            adam_epsilon=opt.eps,
            lr_scheduler_type=_LR_SCHEDULER_TYPES[opt.scheduler],
            per_device_train_batch_size=opt.batch_size,
            per_device_eval_batch_size=opt.eval_batch_size or opt.batch_size,
            gradient_accumulation_steps=opt.gradient_accumulation_steps,
            max_grad_norm=opt.max_grad_norm,
            seed=opt.seed,
            data_seed=opt.seed,
            logging_steps=opt.logging_steps,
            eval_strategy=opt.eval_strategy,
            save_strategy=opt.eval_strategy,
            activation_checkpointing=self.model.gradient_checkpointing,
            remove_unused_columns=False,
            report_to="none",
            dataloader_pin_memory=torch.cuda.is_available(),  # pinned memory only helps copies to a GPU
        )
        if opt.eval_steps is not None:
            kwargs.update(eval_steps=opt.eval_steps, save_steps=opt.eval_steps)
        if opt.scheduler == "cosine" and opt.min_lr is not None:
            kwargs.update(
                lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": opt.min_lr / opt.lr}
            )
        # TrainingArguments takes a warm-up ratio as a float < 1 in `warmup_steps`.
        kwargs["warmup_steps"] = opt.warmup_steps if opt.warmup_steps is not None else (opt.warmup_ratio or 0.0)
        if opt.max_steps is not None:
            kwargs["max_steps"] = opt.max_steps
        if opt.epochs is not None:
            kwargs["num_train_epochs"] = opt.epochs
        cuda = torch.cuda.is_available()
        kwargs["bf16"] = opt.mixed_precision == "bf16" and cuda and torch.cuda.is_bf16_supported()
        kwargs["fp16"] = opt.mixed_precision == "fp16" and cuda
        if opt.deepspeed is not None:
            kwargs["deepspeed"] = self.deepspeed_config()
        if self.early_stopping is not None:
            kwargs.update(
                load_best_model_at_end=True,
                metric_for_best_model=self.early_stopping.metric,
                greater_is_better=self.early_stopping.greater_is_better,
            )
        kwargs.update(overrides)
        return TrainingArguments(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------------------------


def _yaml_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _fail(source: str, key: str, message: str) -> typing.NoReturn:
    raise ValueError(f"{source}: {key}: {message}")


def _convert(value: Any, tp, source: str, key: str) -> Any:
    """`value` checked against type `tp` (dataclass, list[...], dict[str, ...], Literal, X | None, scalars)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            _fail(source, key, f"must not be null (expected {_type_name(tp)})")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, source, key)
            except ValueError as error:
                errors.append(error)
        if len(errors) == 1:
            raise errors[0]
        _fail(source, key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            _fail(source, key, f"expected one of {list(allowed)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            _fail(source, key, f"expected a list ({_type_name(tp)}), got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(source, key, f"expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, key)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = ""
            if isinstance(value, str):
                hint = " (YAML 1.1 reads '1e-4' as a string: write 1.0e-4)"
            _fail(source, key, f"expected float, got {type(value).__name__} {value!r}{hint}")
        return float(value)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        _fail(source, key, f"expected int, got {type(value).__name__} {value!r}")
    if tp in (str, bool) and not isinstance(value, tp):
        _fail(source, key, f"expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, data: Any, source: str, prefix: str = ""):
    """An instance of dataclass `cls` from mapping `data`; unknown, missing and mistyped keys raise ValueError."""
    where = prefix or "<top level>"
    if not isinstance(data, dict):
        _fail(source, where, f"expected a mapping with keys {sorted(_yaml_fields(cls))}, got {type(data).__name__}")
    fields = _yaml_fields(cls)
    hints = typing.get_type_hints(cls)
    dotted = (prefix + ".") if prefix else ""
    for key in data:
        if key not in fields:
            _fail(source, f"{dotted}{key}", f"unknown key; allowed keys of {where}: {sorted(fields)}")
    missing = [
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        _fail(source, f"{dotted}{missing[0]}", f"missing required key(s) {missing} of {where}")
    values = {name: _convert(value, hints[name], source, f"{dotted}{name}") for name, value in data.items()}
    return cls(**values)


def _merge(base: dict, override: dict) -> dict:
    """`base` with `override` merged in: mappings merge key by key, every other value (lists included) replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _check_rules(recipe: Recipe, source: str) -> None:
    """Cross-field rules the types cannot express."""
    opt = recipe.optimization
    if opt.epochs is None and opt.max_steps is None:
        _fail(source, "optimization.epochs", "give `epochs` or `max_steps`")
    if opt.warmup_ratio is not None and opt.warmup_steps is not None:
        _fail(source, "optimization.warmup_ratio", "give `warmup_ratio` or `warmup_steps`, not both")
    if opt.warmup_ratio is not None and not 0.0 <= opt.warmup_ratio < 1.0:
        _fail(source, "optimization.warmup_ratio", f"must be in [0, 1), got {opt.warmup_ratio}")
    if opt.scheduler == "step" and (opt.step_size is None or opt.gamma is None):
        _fail(source, "optimization.step_size", "scheduler 'step' needs `step_size` and `gamma`")
    if opt.min_lr is not None and opt.scheduler != "cosine":
        _fail(source, "optimization.min_lr", f"only the cosine schedule has a floor; scheduler is {opt.scheduler!r}")
    if opt.scheduler == "plateau" and opt.eval_strategy == "no":
        _fail(
            source, "optimization.eval_strategy", "the plateau schedule steps on evaluations: set 'epoch' or 'steps'"
        )
    if recipe.early_stopping is not None and opt.eval_strategy == "no":
        _fail(source, "optimization.eval_strategy", "early stopping needs evaluations: set 'epoch' or 'steps'")
    if len(opt.betas) != 2:
        _fail(source, "optimization.betas", f"expected two values, got {opt.betas}")
    if recipe.data.prompt_modes is not None and recipe.task != "localization":
        _fail(source, "data.prompt_modes", f"only the localization task has prompt modes; task is {recipe.task!r}")
    if recipe.data.prompt_modes == []:
        _fail(source, "data.prompt_modes", "expected at least one mode (text, text+box, text+points), got []")
    names = [g.name for g in recipe.param_groups]
    if len(set(names)) != len(names):
        _fail(source, "param_groups", f"group names must be unique, got {names}")


def recipe_path(name_or_path: str | Path) -> Path:
    """A shipped recipe's file (`"localization"`) or the given YAML path.

    Raises:
        FileNotFoundError: neither a shipped recipe name nor an existing file.
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        return path
    if str(name_or_path) in RECIPE_NAMES:
        return RECIPE_DIR / f"{name_or_path}.yaml"
    raise FileNotFoundError(f"unknown recipe {str(name_or_path)!r}: give a .yaml path or one of {list(RECIPE_NAMES)}")


def load_recipe(name_or_path: str | Path, tiny: bool = False) -> Recipe:
    """Read, merge (`tiny=True`: the file's `tiny:` section over the full recipe) and validate a recipe.

    Raises:
        FileNotFoundError: see `recipe_path`.
        ValueError: an unknown, missing or mistyped key, or a broken cross-field rule; the message names the file
            and the dotted key (e.g. `localization.yaml: optimization.lrr: unknown key; allowed keys ...`).
    """
    path = recipe_path(name_or_path)
    source = str(path)
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, dict):
        _fail(source, "<top level>", f"expected a mapping, got {type(data).__name__}")
    tiny_section = data.pop("tiny", None)
    if tiny_section is not None and not isinstance(tiny_section, dict):
        _fail(source, "tiny", f"expected a mapping of overrides, got {type(tiny_section).__name__}")
    if tiny:
        if tiny_section is None:
            _fail(source, "tiny", "this recipe has no `tiny:` section")
        # Check the overrides' keys against the schema on their own, so a typo under `tiny:` is reported there.
        _check_override_keys(Recipe, tiny_section, source, "tiny")
        data = _merge(data, tiny_section)
    recipe = _build(Recipe, data, source)
    recipe.source, recipe.tiny = source, tiny
    _check_rules(recipe, source)
    return recipe


def _check_override_keys(cls, data: dict, source: str, prefix: str) -> None:
    fields = _yaml_fields(cls)
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key not in fields:
            _fail(source, f"{prefix}.{key}", f"unknown key; allowed keys: {sorted(fields)}")
        tp = hints[key]
        inner = [t for t in typing.get_args(tp) if t is not type(None)] if typing.get_origin(tp) else [tp]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]) and isinstance(value, dict):
            _check_override_keys(inner[0], value, source, f"{prefix}.{key}")


__all__ = [
    "RECIPE_NAMES",
    "DataSection",
    "EarlyStoppingSection",
    "LoraSection",
    "LossesSection",
    "ModelSection",
    "OptimizationSection",
    "ParamGroup",
    "Recipe",
    "load_recipe",
    "recipe_path",
]
