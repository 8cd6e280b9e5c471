"""Report-generation training data: Libra conversations with their volumes, and the collator that turns them into
`ReCTForConditionalGeneration` batches (chat template, `<image>` expanded, loss on the answer only)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .readers import DatasetFormatError, read_ct_rate, read_libra
from .volume_dataset import CachedVolumeDataset


#: Report sections a model can be trained to write: the Libra conversations' answer (the findings) or the
#: impression of the same scan's CT-RATE report.
SECTIONS = ("findings", "impressions")

#: The instruction of an impression row (`read_report_rows(..., section="impressions")`); a follow-up scan's adds
#: `COMPARE_PROMPT`, as the Libra conversations do.
IMPRESSION_PROMPT = "<image>\nWrite the impression of the radiology report for this chest CT."
COMPARE_PROMPT = " Compare with the prior examination."


def read_report_rows(cohort: str | Path, split: str, section: str = "findings"):
    """A cohort's `libra/{split}.json` rows (`id`, `current_volume_path`, `prior_volume_path`, `has_prior`,
    `prompt`, `report`) with each volume's rescale slope and intercept from the CT-RATE metadata of the same split
    (`rescale_*` for the current scan, `prior_rescale_*` for the prior), so raw-stored volumes become Hounsfield
    units as in every other task.

    `section="impressions"` replaces each answer with the current scan's impression from the CT-RATE reports and
    the instruction with `IMPRESSION_PROMPT` (plus `COMPARE_PROMPT` where there is a prior): the short section that
    states every positive finding and its change since the prior scan.

    Raises:
        DatasetFormatError: a volume has no metadata row, or (impressions) an empty impression.
        ValueError: `section` is not one of `SECTIONS`.
    """
    if section not in SECTIONS:
        raise ValueError(f"section must be one of {SECTIONS}, got {section!r}")
    cohort = Path(cohort)
    rows = read_libra(cohort / "libra" / f"{split}.json")
    meta = {
        str(Path(r["volume_path"]).resolve()): (r["rescale_slope"], r["rescale_intercept"], r["impressions"])
        for r in read_ct_rate(cohort, split, anatomy_masks=False, cot=False)
    }

    def rescale(path: str) -> tuple[Any, Any, Any]:
        key = str(Path(path).resolve())
        if key not in meta:
            raise DatasetFormatError(f"{path}: in libra/{split}.json but not in the {split} metadata of {cohort}")
        return meta[key]

    def add(row: dict) -> dict:
        slope, intercept, impression = rescale(row["current_volume_path"])
        prior_slope, prior_intercept, _ = rescale(row["prior_volume_path"])
        if section == "impressions":
            if not str(impression or "").strip():
                raise DatasetFormatError(f"{row['current_volume_path']}: empty Impressions_EN in the {split} reports")
            prompt = IMPRESSION_PROMPT + (COMPARE_PROMPT if row["has_prior"] else "")
            row = {**row, "prompt": prompt, "report": str(impression).strip()}
        return {
            **row,
            "rescale_slope": slope,
            "rescale_intercept": intercept,
            "prior_rescale_slope": prior_slope,
            "prior_rescale_intercept": prior_intercept,
        }

    return rows.map(add)


class ReportDataset(CachedVolumeDataset):
    """`read_report_rows` rows → examples with `pixel_values`, `prior_pixel_values` (the current scan where there is
    no prior), `has_prior`, `prompt` and `report`, the volumes read through the cache."""

    def __init__(self, rows, cache, transform=None):
        super().__init__(
            rows,
            cache,
            volume_column="current_volume_path",
            prior_column="prior_volume_path",
            text_column="report",
            transform=transform,
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = super().__getitem__(index)
        row = self.rows[int(index)]
        example["report"] = example.pop("text")
        example["prompt"] = row["prompt"]
        example["has_prior"] = bool(row["has_prior"])
        return example


@dataclass
class ReportGenerationCollator:
    """Examples (`ReportDataset`) → a training batch for `ReCTForConditionalGeneration`.

    Each prompt (one `<image>`) becomes the user turn of the tokenizer's chat template, followed by the generation
    prompt (a tokenizer without a template: the prompt and a newline); the report plus the end-of-turn token is the
    answer; `system_prompt` replaces the template's default system turn. `<image>` is expanded to
    `image_seq_length` tokens.
    `labels` are the answer tokens and -100 elsewhere (prompt, image tokens, padding); rows are padded on the right
    (teacher forcing needs no left padding). `max_length` caps each sequence (Libra's MAX_LENGTH): the answer is cut
    to fit after its prompt, never the prompt (it holds the image tokens); None keeps everything.
    With `diagnosis_labels` (a generator with a diagnosis prompt, `ReCTVLMConfig.diagnosis_labels`), each batch also
    holds `diagnosis_targets`: for a `diagnosis_teacher_forcing` share of the samples (drawn with torch's generator,
    which the Trainer seeds) the findings the reference report states, so the diagnosis tokens say what the report
    says and the LM learns to write what they say; -1 (the head's decisions, as at generation) for the others, so
    it also learns to write what the head misses.
    """

    tokenizer: Any
    image_seq_length: int
    image_token: str = "<image>"
    max_length: int | None = None
    #: The chat template's system turn; None keeps the template's default (SmolLM2's is a 20-token self
    #: introduction, which every training step would pay for).
    system_prompt: str | None = None
    diagnosis_labels: Sequence[str] | None = None
    #: 1.0, `trainers.report_training.ReportRecipe`'s measured best (its field says what was compared).
    diagnosis_teacher_forcing: float = 1.0

    def prompt_ids(self, prompt: str) -> list[int]:
        if prompt.count(self.image_token) != 1:
            raise ValueError(f"a prompt must hold exactly one {self.image_token}, got {prompt!r}")
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            if self.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:  # a tokenizer without a chat template (a base LM): the prompt, then the answer on the next line
            text = prompt + "\n"
        text = text.replace(self.image_token, self.image_token * self.image_seq_length)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def answer_ids(self, report: str, room: int | None = None) -> list[int]:
        """The report's tokens and the end-of-turn token, cut to `room` tokens (None: all)."""
        ids = self.tokenizer(report, add_special_tokens=False)["input_ids"]
        if self.tokenizer.eos_token_id is not None:
            ids = ids + [self.tokenizer.eos_token_id]
        return ids if room is None else ids[:room]

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's padding id, its end-of-sequence id where it has none."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    @staticmethod
    def volumes(examples: list[dict[str, Any]], use_prior: bool = True) -> dict[str, torch.Tensor]:
        """`pixel_values`, `prior_pixel_values` and `has_prior` (all False when not `use_prior`: the current scan
        then stands in for the prior, as for a scan without one)."""
        return {
            "pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples]).float(),
            "prior_pixel_values": torch.stack([torch.as_tensor(e["prior_pixel_values"]) for e in examples]).float(),
            "has_prior": torch.tensor([bool(e["has_prior"]) and use_prior for e in examples]),
        }

    def generation_batch(self, examples: list[dict[str, Any]], use_prior: bool = True) -> dict[str, torch.Tensor]:
        """The prompts alone, padded on the left for `generate()`, with the volumes (see `volumes`)."""
        prompts = [self.prompt_ids(e["prompt"]) for e in examples]
        length = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, length - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, length - len(prompt) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, **self.volumes(examples, use_prior)}

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences, targets = [], []
        for example in examples:
            prompt = self.prompt_ids(example["prompt"])
            room = None
            if self.max_length is not None:
                room = self.max_length - len(prompt)
                if room < 1:
                    raise ValueError(
                        f"max_length {self.max_length} leaves no room for an answer after a prompt of {len(prompt)} "
                        f"tokens ({self.image_seq_length} of them image tokens)"
                    )
            answer = self.answer_ids(example["report"], room)
            sequences.append(prompt + answer)
            targets.append([-100] * len(prompt) + answer)
        length = max(len(s) for s in sequences)
        # Right padding: the padded positions are masked and carry no label, so any id serves.
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        input_ids = torch.full((len(examples), length), pad, dtype=torch.long)
        labels = torch.full((len(examples), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for i, (sequence, target) in enumerate(zip(sequences, targets)):
            input_ids[i, : len(sequence)] = torch.tensor(sequence)
            labels[i, : len(target)] = torch.tensor(target)
            attention_mask[i, : len(sequence)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **self.volumes(examples)}
        if self.diagnosis_labels is not None:
            targets = self.diagnosis_targets([example["report"] for example in examples])
            forced = torch.rand(len(examples)) < self.diagnosis_teacher_forcing
            batch["diagnosis_targets"] = torch.where(forced.unsqueeze(1), targets, -1)
        return batch

    def diagnosis_targets(self, reports: list[str]) -> torch.Tensor:
        """`(batch, len(diagnosis_labels))`: 2 where the report states a finding as new since the prior scan, 1
        where it states it otherwise, 0 where it does not (`trainers.data.phantom_reports`' label and change
        readers)."""
        from .phantom_reports import extract_changes, extract_labels

        rows = []
        for report in reports:
            present, changes = extract_labels(report), extract_changes(report)
            rows.append([0 if not present[n] else 2 if changes.get(n) == "new" else 1 for n in self.diagnosis_labels])
        return torch.tensor(rows, dtype=torch.long)


__all__ = [
    "SECTIONS",
    "IMPRESSION_PROMPT",
    "COMPARE_PROMPT",
    "read_report_rows",
    "ReportDataset",
    "ReportGenerationCollator",
]
