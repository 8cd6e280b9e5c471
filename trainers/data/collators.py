"""Batch collators, one per task, producing exactly the keyword arguments the ReCT models take.

Volumes of one batch must share a shape (the image processor makes them so) and keep their dtype (float16 cache
entries stay float16; the models cast `pixel_values` to their own dtype); masks stay uint8 (the models accept any
integer ids) to keep seed-size batches small; text is padded by the tokenizer, with attention masks.

In a DataLoader worker, batches are stacked straight into shared memory that the worker recycles (torch's
`default_collate` stacks into new shared memory each time), so sending the batch to the main process copies
nothing more: one copy per volume, from the page cache into the batch, into pages that already exist.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from .zero_copy import shared_batch_buffer


# SAM's convention for padded prompt points: label -10 marks "no point here".
POINT_PAD_LABEL = -10


def stack_field(examples: list[dict[str, Any]], key: str, optional: bool = False) -> torch.Tensor | None:
    """Stack `key` across examples; all or none of them must have it (a mixed batch is a data bug, not a pad)."""
    present = [example.get(key) is not None for example in examples]
    if not any(present):
        if optional:
            return None
        raise KeyError(f"collator: no example has `{key}`")
    if not all(present):
        raise ValueError(f"collator: `{key}` is present in {sum(present)} of {len(examples)} examples; all or none")
    values = [torch.as_tensor(example[key]) for example in examples]
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) > 1:
        raise ValueError(f"collator: `{key}` shapes differ within the batch: {sorted(shapes)}")
    return stack(values)


def stack(values: list[torch.Tensor]) -> torch.Tensor:
    """`torch.stack(values)`; in a DataLoader worker, into a recycled shared-memory buffer that torch sends to the
    main process as it is (see `zero_copy.shared_batch_buffer`): one copy per volume, and no new pages to fault in."""
    if torch.utils.data.get_worker_info() is None or values[0].device.type != "cpu":
        return torch.stack(values)
    dtype = functools.reduce(torch.promote_types, (value.dtype for value in values))  # what torch.stack gives
    return torch.stack(values, out=shared_batch_buffer((len(values), *values[0].shape), dtype))


def volume_fields(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = {"pixel_values": stack_field(examples, "pixel_values")}
    mask = stack_field(examples, "anatomy_mask", optional=True)
    if mask is not None:
        batch["anatomy_mask"] = mask
    return batch


@dataclass
class ClassificationCollator:
    """→ `pixel_values` and `labels (batch, num_labels)` float for multi-label BCE: what
    `ReCTForVolumeClassification` takes (its head reads token features, not anatomy masks)."""

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {"pixel_values": stack_field(examples, "pixel_values")}
        labels = stack_field(examples, "labels", optional=True)
        if labels is not None:
            batch["labels"] = labels.float()
        return batch


@dataclass
class ContrastiveCollator:
    """→ `pixel_values`, optional `anatomy_mask`, tokenised `input_ids` / `attention_mask` (/ `token_type_ids`) of
    the paired reports, `region_mentions (batch, num_regions)` when the examples carry them, and `return_loss=True`
    (`ReCTModel`, like CLIP, computes its loss only when asked)."""

    tokenizer: Any
    max_length: int = 256
    text_key: str = "text"

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = volume_fields(examples)
        texts = [example[self.text_key] for example in examples]
        batch.update(
            self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        )
        mentions = stack_field(examples, "region_mentions", optional=True)
        if mentions is not None:
            batch["region_mentions"] = mentions.float()
        batch["return_loss"] = True
        return batch


def tokenize_prompts(tokenizer: Any, examples: list[dict[str, Any]], max_length: int) -> tuple[torch.Tensor, ...]:
    """The examples' text prompts (`prompt`: one string each → `(batch, seq)`, or a list of K each → `(batch, K,
    seq)`) tokenised: `input_ids` and `attention_mask`."""
    if tokenizer is None:
        raise ValueError("text prompts (`prompt`) need a tokenizer: the collator has none")
    prompts = [example.get("prompt") or "" for example in examples]
    nested = [isinstance(p, (list, tuple)) for p in prompts]
    if any(nested) and not all(nested) or len({len(p) for p in prompts if isinstance(p, (list, tuple))}) > 1:
        raise ValueError(
            "`prompt`: every example of a batch needs one prompt, or the same number K of prompts (a list), "
            f"got {[len(p) if isinstance(p, (list, tuple)) else 'one' for p in prompts]}"
        )
    flat = [q for p in prompts for q in p] if all(nested) else prompts
    text = tokenizer(flat, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    input_ids, attention_mask = text["input_ids"], text["attention_mask"]
    if all(nested):  # K prompts per volume → (batch, K, seq)
        input_ids = input_ids.view(len(examples), -1, input_ids.shape[-1])
        attention_mask = attention_mask.view(input_ids.shape)
    return input_ids, attention_mask


@dataclass
class LocalizationCollator:
    """→ `pixel_values`, `labels` (the lesion masks: `(batch, 1, D, H, W)`, or `(batch, K, D, H, W)` from K masks per
    example), optional tokenised text prompts (one string per example → `(batch, seq)`; a list of K → `(batch, K,
    seq)`), `input_points (batch, P, 3)` + `input_labels (batch, P)` padded to the batch's largest P with label -10
    (SAM's pad), and `input_boxes (batch, 6)` as (z0, y0, x0, z1, y1, x1)."""

    tokenizer: Any = None
    max_length: int = 64

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = volume_fields(examples)
        batch["labels"] = stack_field(examples, "lesion_mask")
        if any(example.get("prompt") is not None for example in examples):
            batch["input_ids"], batch["attention_mask"] = tokenize_prompts(self.tokenizer, examples, self.max_length)
        if any(example.get("input_points") is not None for example in examples):
            count = max(len(example.get("input_points") or []) for example in examples)
            points = torch.zeros(len(examples), count, 3)
            labels = torch.full((len(examples), count), POINT_PAD_LABEL, dtype=torch.long)
            for i, example in enumerate(examples):
                example_points = torch.as_tensor(example.get("input_points") or torch.zeros(0, 3), dtype=torch.float)
                n = example_points.shape[0]
                if n:
                    points[i, :n] = example_points
                    labels[i, :n] = torch.as_tensor(example["input_labels"], dtype=torch.long)
            batch["input_points"], batch["input_labels"] = points, labels
        boxes = stack_field(examples, "input_boxes", optional=True)
        if boxes is not None:
            if boxes.shape[-1] != 6:
                raise ValueError(f"`input_boxes` must be (z0, y0, x0, z1, y1, x1), got shape {tuple(boxes.shape)}")
            batch["input_boxes"] = boxes.float()
        return batch
