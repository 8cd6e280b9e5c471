"""The report generator at the demo's scale: a trained ReCT classifier (its encoder, and its head for the diagnosis
tokens) + SmolLM2-135M-Instruct, trained in Libra's two stages with the HF `Trainer` to write the impression of a
chest CT (comparing it with the prior scan where there is one), and evaluated on held-out scans by what its reports
say.

The image reaches the LM two ways: the TAC projector's tokens, and the diagnosis tokens (`ReCTVLMConfig.
diagnosis_labels`, PromptMRG's diagnosis-driven prompts): the findings the classifier's head finds, written as words
into the image tokens (on a follow-up, ", new" for a finding the prior scan lacked). A few hundred reports teach a
LoRA'd SmolLM2 to copy those words into a report; they do not teach it to read the projector's tokens alone (see the
README's numbers).

`ReportRecipe`'s defaults are the demo's (`rect-vlm demo`, stage "report generation"); `bench/report_generation.py`
trains the same recipe longer, over 3 seeds, next to an image-blind baseline (`ReportRecipe.image_blind`: the same
LM fine-tuned on the same reports with every volume replaced by zeros, so the image tokens carry nothing).

Why impressions: the phantom's impression states every positive finding and its change since the prior scan in
20–80 tokens, while its findings section runs to 250–350 tokens; one SmolLM2 training step on 4 findings sections
takes about 10 s on two cores, on 4 impressions about 2 s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class ReportRecipe:
    """Everything that defines a report-generator run (saved next to its outputs in `summary.json`)."""

    #: Report section to write (`trainers.data.reports.SECTIONS`).
    section: str = "impressions"
    projector_type: str = "tac"
    #: The projector's `<image>` tokens per volume (the LM's cost grows with every token); with `diagnosis`, the
    #: diagnosis tokens follow them.
    image_seq_length: int = 8
    #: Given a classifier folder, its head decides each finding and the findings it sees are written as words into
    #: `diagnosis_seq_length` more image tokens (`ReCTVLMConfig.diagnosis_labels`, PromptMRG's diagnosis-driven
    #: prompts). The image-blind baseline's head sees zero volumes, so its words are the same for every scan.
    diagnosis: bool = True
    #: Room for the findings of 99 % of the cohort's impressions (SmolLM2 needs 3–9 tokens per finding, 24 at the
    #: median and 47 at the 99th percentile per impression): 24 tokens cut half the teacher-forced training prompts
    #: short, and the findings left out were the ones late in label order (pleural effusion F1 0.60 → 0.65 at 48,
    #: seed 0). The head's own decisions at evaluation need at most 24.
    diagnosis_seq_length: int = 48
    #: Share of training samples whose diagnosis tokens hold the reference report's findings (the others, and every
    #: report written at evaluation, hold the classifier's). 1.0 (all) measured best on five large findings (F1 0.70
    #: against 0.61–0.63 for 0, 0.5 and 0.8 on 48 held-out scans, seed 0), at the cost of shorter reports: the LM
    #: then writes what the classifier sees and little else.
    diagnosis_teacher_forcing: float = 1.0
    projector_hidden_size: int = 256
    #: A one-line system turn instead of SmolLM2's 20-token default.
    system_prompt: str = "You are a radiologist."
    batch_size: int = 4
    #: Stage 1: the projector alone (encoder and LM frozen).
    stage1_steps: int = 5
    stage1_lr: float = 1e-3
    #: Stage 2: LoRA on every linear layer of the LM, the projector at its own learning rate.
    stage2_steps: int = 50
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_lr: float = 1e-3
    projector_lr: float = 3e-4
    warmup_steps: int = 3
    lr_scheduler_type: str = "cosine"
    max_new_tokens: int = 96
    eval_batch_size: int = 16
    #: Train and evaluate without the image (the volumes replaced by zeros): the image-blind baseline.
    image_blind: bool = False
    seed: int = 0
    logging_steps: int = 5


@dataclass
class ImageBlindCollator:
    """A report collator whose volumes (current and prior) are all zeros: the LM sees the same constant image
    tokens for every scan, so whatever it learns comes from the report texts alone."""

    collator: Any

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.blind(self.collator(examples))

    @staticmethod
    def blind(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`batch` with its volumes replaced by zeros."""
        for key in ("pixel_values", "prior_pixel_values"):
            batch[key] = torch.zeros_like(batch[key])
        batch.pop("diagnosis_targets", None)  # the reference's findings: nothing an image-blind model may see
        return batch


def _training_arguments(output_dir: Path, recipe: ReportRecipe, steps: int, lr: float, progress: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=recipe.batch_size,
        learning_rate=lr,
        weight_decay=0.0,
        lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=min(recipe.warmup_steps, max(steps - 1, 0)),
        max_grad_norm=1.0,
        seed=recipe.seed,
        data_seed=recipe.seed,
        logging_steps=recipe.logging_steps,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,  # volumes are memory-mapped cache entries
        remove_unused_columns=False,
        disable_tqdm=not progress,
    )


def build_report_generator(encoder_folder: str | Path, recipe: ReportRecipe):
    """`(model, tokenizer, image_processor)`: the encoder saved in `encoder_folder` (a `ReCTVisionModel` folder, or a
    classifier / ReCT model folder whose encoder is taken) with its image processor, SmolLM2 from the packaged GGUF
    file with `<image>` added, and a new projector, seeded by `recipe.seed`. From a classifier folder with
    `recipe.diagnosis`, the projector also gets the classifier's head (with its lesion-map decoder, when it has one)
    and labels, and each label's words in SmolLM2's
    tokens (`set_diagnosis_phrases`); `model.config.image_seq_length` is then `recipe.image_seq_length` +
    `recipe.diagnosis_seq_length`."""
    from transformers import PretrainedConfig, set_seed

    from hf_models import (
        ReCTForConditionalGeneration,
        ReCTForVolumeClassification,
        ReCTImageProcessor,
        ReCTModel,
        ReCTVisionModel,
    )

    from .text import IMAGE_TOKEN, smollm2

    folder = Path(encoder_folder)
    config, _ = PretrainedConfig.get_config_dict(folder)  # the project's own classes: no remote code involved
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    head = labels = lesion_map = None
    if model_type == "rect_vision":
        vision = ReCTVisionModel.from_pretrained(folder)
    elif model_type == "rect":
        owner = ReCTForVolumeClassification if "ReCTForVolumeClassification" in architectures else ReCTModel
        trained = owner.from_pretrained(folder)
        vision = trained.vision_model
        if recipe.diagnosis and owner is ReCTForVolumeClassification:
            head, lesion_map = trained.classifier, trained.lesion_map_decoder
            labels = [trained.config.id2label[i] for i in range(trained.config.num_labels)]
            pooling = trained.config.classifier_pooling
    else:
        raise ValueError(
            f"{folder}: expected a ReCT encoder, classifier or model folder, got model_type {model_type!r}"
        )
    image_processor = ReCTImageProcessor.from_pretrained(folder)
    tokenizer, language = smollm2()
    set_seed(recipe.seed)
    diagnosis = {}
    if head is not None:
        diagnosis = {
            "diagnosis_labels": labels,
            "diagnosis_pooling": pooling,
            "diagnosis_seq_length": recipe.diagnosis_seq_length,
        }
    model = ReCTForConditionalGeneration.from_vision_and_language(
        vision,
        language,
        tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        diagnosis_head=head,
        diagnosis_lesion_map=lesion_map,
        projector_type=recipe.projector_type,
        image_seq_length=recipe.image_seq_length + (recipe.diagnosis_seq_length if head is not None else 0),
        projector_hidden_size=recipe.projector_hidden_size,
        **diagnosis,
    )
    if head is not None:
        model.set_diagnosis_phrases(tokenizer)
    if tokenizer.pad_token_id is not None:
        model.config.text_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, image_processor


def report_datasets(cohort: str | Path, cache_dir: str | Path, image_processor, recipe: ReportRecipe, progress=True):
    """Training and held-out `ReportDataset`s of `recipe.section`, the volumes read through the shared cache."""
    from .data.cache import VolumeCache
    from .data.reports import ReportDataset, read_report_rows

    cache = VolumeCache(cache_dir, image_processor)
    out = []
    for split in ("train", "valid"):
        dataset = ReportDataset(read_report_rows(cohort, split, section=recipe.section), cache)
        dataset.prepare(progress=progress)
        out.append(dataset)
    return tuple(out)


@torch.no_grad()
def generate_reports(
    model,
    collator,
    dataset,
    indices: Sequence[int],
    recipe: ReportRecipe,
    *,
    use_prior: bool = True,
    progress: bool = False,
) -> list[str]:
    """Greedy reports for `dataset[indices]`, in batches of `recipe.eval_batch_size` left-padded prompts.

    `use_prior=False` gives every scan `has_prior=False` (the current scan stands in for the prior, with the same
    prompt), which is how a follow-up report is written without its prior. Image-blind recipes see zero volumes.
    """
    from tqdm.auto import tqdm

    tokenizer = collator.tokenizer
    model.eval()
    texts: list[str] = []
    chunks = [list(indices[i : i + recipe.eval_batch_size]) for i in range(0, len(indices), recipe.eval_batch_size)]
    for chunk in tqdm(chunks, desc="writing reports", unit="batch", disable=not progress):
        batch = collator.generation_batch([dataset[i] for i in chunk], use_prior=use_prior)
        if recipe.image_blind:
            batch = ImageBlindCollator.blind(batch)
        generated = model.generate(
            **batch,
            max_new_tokens=recipe.max_new_tokens,
            do_sample=False,
            pad_token_id=collator.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        prompt_length = batch["input_ids"].shape[1]
        texts += [t.strip() for t in tokenizer.batch_decode(generated[:, prompt_length:], skip_special_tokens=True)]
    return texts


def report_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Clinical efficacy (`clinical_f1_macro_five`: mean F1 over `EASY_LABELS`, plus micro/macro over every label),
    BLEU-1..4 and ROUGE-L of generated vs reference reports."""
    from .classification import EASY_LABELS
    from .metrics import bleu, clinical_efficacy_metrics, rouge_l

    # Not `text_overlap_metrics`: its METEOR needs nltk's WordNet data, which is not installed offline, and warns.

    clinical = clinical_efficacy_metrics(predictions, references)
    five = [clinical[f"clinical_f1/{name}"] for name in EASY_LABELS]
    result = {"clinical_f1_macro_five": float(sum(v or 0.0 for v in five) / len(five))}
    result.update(clinical)
    result.update(bleu(predictions, references))
    result.update(rouge_l(predictions, references))
    return result


def evaluate_report_generator(
    model, collator, dataset, recipe: ReportRecipe, limit: int | None = None, progress: bool = False
) -> dict[str, Any]:
    """Reports for the first `limit` held-out scans (all when None) and their metrics; follow-up scans are also
    written without their prior, and `follow_up_accuracy` is given both ways.

    Returns:
        `metrics` (`report_metrics` + `follow_up_with_prior` / `follow_up_without_prior`), `examples` (id, has_prior,
        prompt, reference, generated, generated_without_prior for follow-ups).
    """
    from .metrics import follow_up_accuracy

    indices = list(range(len(dataset) if limit is None else min(limit, len(dataset))))
    predictions = generate_reports(model, collator, dataset, indices, recipe, progress=progress)
    references = [dataset.rows[i]["report"] for i in indices]
    metrics = report_metrics(predictions, references)
    follow = [i for i in indices if dataset.rows[i]["has_prior"]]
    without: dict[int, str] = {}
    if follow:
        blind_prior = generate_reports(model, collator, dataset, follow, recipe, use_prior=False, progress=progress)
        without = dict(zip(follow, blind_prior))
        follow_refs = [dataset.rows[i]["report"] for i in follow]
        metrics["follow_up_with_prior"] = follow_up_accuracy([predictions[i] for i in follow], follow_refs)
        metrics["follow_up_without_prior"] = follow_up_accuracy(blind_prior, follow_refs)
    examples = []
    for i, text in zip(indices, predictions):
        row = dataset.rows[i]
        example = {
            "id": row["id"],
            "has_prior": bool(row["has_prior"]),
            "prompt": row["prompt"],
            "reference": row["report"],
            "generated": text,
        }
        if i in without:
            example["generated_without_prior"] = without[i]
        examples.append(example)
    return {"metrics": metrics, "examples": examples}


def train_report_generator(
    cohort: str | Path,
    encoder_folder: str | Path,
    output_dir: str | Path,
    recipe: ReportRecipe | None = None,
    *,
    cache_dir: str | Path | None = None,
    eval_limit: int | None = None,
    save: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the report generator on `cohort` in two stages and evaluate it on the held-out split.

    Stage 1 trains the projector alone (`trainers.report_generation.stage1`), stage 2 adds LoRA on every linear
    layer of SmolLM2 with the projector at `recipe.projector_lr` (`stage2`, `ReCTTrainer` parameter groups); the
    encoder from `encoder_folder` stays frozen throughout. With `save`, `output_dir` receives the stage-1 projector
    (`mm_projector.safetensors`), the stage-2 adapter with its non-LoRA trainables (`adapter/`), the merged Hub
    folder (`model/`, with `ReCTVLMProcessor`), `reports.json` (every held-out report) and `summary.json`.

    Returns:
        The summary: recipe, row counts, trainable counts, loss histories, seconds, `metrics` (see
        `evaluate_report_generator`) and the evaluation's `examples`. There is no untrained baseline: an untrained
        generator repeats its prompt and states no finding; `ReportRecipe.image_blind` is the baseline.
    """
    from transformers import Trainer

    from hf_models import ReCTVLMProcessor

    from .classification import compact_progress
    from .data.reports import ReportGenerationCollator
    from .report_generation import save_merged, save_projector, save_stage2, stage1, stage2, trainable_counts
    from .trainer import ReCTTrainer

    recipe = recipe or ReportRecipe()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, tokenizer, image_processor = build_report_generator(encoder_folder, recipe)
    load_seconds = time.perf_counter() - started
    train, valid = report_datasets(cohort, cache_dir or output_dir / "cache", image_processor, recipe, progress)
    image_tokens = model.config.image_seq_length
    collator = ReportGenerationCollator(
        tokenizer,
        image_tokens,
        system_prompt=recipe.system_prompt,
        max_length=None,
        diagnosis_labels=model.config.diagnosis_labels if recipe.diagnosis_teacher_forcing else None,
        diagnosis_teacher_forcing=recipe.diagnosis_teacher_forcing,
    )
    train_collator = ImageBlindCollator(collator) if recipe.image_blind else collator

    def run(trainer_class, model, name: str, steps: int, lr: float, **kwargs):
        args = _training_arguments(output_dir / name, recipe, steps, lr, progress)
        trainer = trainer_class(model=model, args=args, train_dataset=train, data_collator=train_collator, **kwargs)
        compact_progress(trainer, progress)
        started = time.perf_counter()
        trainer.train()
        losses = [round(float(e["loss"]), 4) for e in trainer.state.log_history if "loss" in e]
        return losses, time.perf_counter() - started

    # Stage 1: the projector alone.
    counts1 = stage1(model)
    losses1, stage1_seconds = run(Trainer, model, "stage1", recipe.stage1_steps, recipe.stage1_lr)
    if save:
        save_projector(model, output_dir)

    # Stage 2: LoRA on the LM, the projector at its own learning rate.
    peft_model = stage2(model, r=recipe.lora_r, alpha=recipe.lora_alpha, dropout=recipe.lora_dropout)
    counts2 = trainable_counts(peft_model)
    groups = [
        {"name": "lora", "modules": ["*lora_*"], "lr": recipe.lora_lr, "weight_decay": 0.0},
        {"name": "projector", "modules": ["*multi_modal_projector*"], "lr": recipe.projector_lr},
    ]
    losses2, stage2_seconds = run(
        ReCTTrainer, peft_model, "stage2", recipe.stage2_steps, recipe.lora_lr, param_groups=groups
    )

    t0 = time.perf_counter()
    evaluation = evaluate_report_generator(peft_model, collator, valid, recipe, limit=eval_limit, progress=progress)
    eval_seconds = time.perf_counter() - t0
    summary = {
        "recipe": asdict(recipe),
        "encoder": str(encoder_folder),
        "train_rows": len(train),
        "train_follow_up_rows": int(sum(bool(r["has_prior"]) for r in train.rows)),
        "eval_rows": len(evaluation["examples"]),
        "trainable": {"stage1": counts1, "stage2": counts2},
        "loss_history": {"stage1": losses1, "stage2": losses2},
        "seconds": {
            "load": round(load_seconds, 1),
            "stage1": round(stage1_seconds, 1),
            "stage2": round(stage2_seconds, 1),
            "evaluation": round(eval_seconds, 1),
        },
        "metrics": evaluation["metrics"],
    }
    if save:
        save_stage2(peft_model, output_dir / "adapter")
        processor = ReCTVLMProcessor(image_processor, tokenizer, image_seq_length=image_tokens)
        save_merged(peft_model, output_dir / "model", processor=processor)
        (output_dir / "reports.json").write_text(json.dumps(evaluation["examples"], indent=1))
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    summary["examples"] = evaluation["examples"]
    return summary


__all__ = [
    "ImageBlindCollator",
    "ReportRecipe",
    "build_report_generator",
    "evaluate_report_generator",
    "generate_reports",
    "report_datasets",
    "report_metrics",
    "train_report_generator",
]
