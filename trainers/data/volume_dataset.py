"""A torch `Dataset` that turns reader rows (file references) into model-ready examples through the cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .cache import VolumeCache


class CachedVolumeDataset(torch.utils.data.Dataset):
    """Rows of a reader's `datasets.Dataset` → examples of processed tensors, decoded once via a `VolumeCache`.

    An example holds `pixel_values (C, D, H, W)` and, as asked: `anatomy_mask` / `lesion_mask` `(1, D, H, W)`
    uint8, `labels` (the reader's `labels`, optionally a subset of columns), `text` (the row's `text_column`),
    `region_mentions` (from `region_mentions_fn(text)`), `prior_pixel_values` (the row's prior scan, or the
    current one when there is none).

    Args:
        rows: a reader's dataset (CT-RATE, segmentation, Libra …).
        cache: the processed-volume cache (its image processor fixes the geometry).
        volume_column: the column with the volume path (`volume_path`, `image_path`, `current_volume_path`).
        anatomy: include `anatomy_mask` from `anatomy_mask_path`.
        lesion_column: a column with a lesion mask path to include as `lesion_mask` (e.g. `lesion_mask_path`,
            `label_path`), or None.
        label_indices: positions of the reader's `labels` to keep (e.g. 5 of the 18 CT-RATE labels), or None for all.
        text_column: a text column to include as `text`, or None.
        region_mentions_fn: text → `(num_regions,)` 0/1 vector, for the region alignment loss.
        prior_column: a column with the prior scan's path (None values → the current scan stands in).
        transform: a callable applied to each example dict after loading (augmentation), in the DataLoader worker;
            it receives the example described above and returns the (possibly new) example dict.
    """

    def __init__(
        self,
        rows,
        cache: VolumeCache,
        *,
        volume_column: str = "volume_path",
        anatomy: bool = False,
        lesion_column: str | None = None,
        label_indices: Sequence[int] | None = None,
        text_column: str | None = None,
        region_mentions_fn: Callable[[str], Sequence[int]] | None = None,
        prior_column: str | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ):
        columns = set(rows.column_names)
        wanted = [volume_column, text_column, lesion_column, prior_column]
        if anatomy:
            wanted.append("anatomy_mask_path")
        if label_indices is not None:
            wanted.append("labels")
        missing = [c for c in wanted if c is not None and c not in columns]
        if missing:
            raise KeyError(f"CachedVolumeDataset: rows lack column(s) {missing}; available: {sorted(columns)}")
        if region_mentions_fn is not None and text_column is None:
            raise ValueError("`region_mentions_fn` needs `text_column`")
        self.rows = rows
        self.cache = cache
        self.volume_column = volume_column
        self.anatomy = anatomy
        self.lesion_column = lesion_column
        self.label_indices = list(label_indices) if label_indices is not None else None
        self.text_column = text_column
        self.region_mentions_fn = region_mentions_fn
        self.prior_column = prior_column
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def _rescale(self, row: dict) -> tuple[float, float]:
        return float(row.get("rescale_slope") or 1.0), float(row.get("rescale_intercept") or 0.0)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[int(index)]
        slope, intercept = self._rescale(row)
        processed = self.cache.get(
            row[self.volume_column],
            anatomy_mask_path=row.get("anatomy_mask_path") if self.anatomy else None,
            lesion_mask_path=row.get(self.lesion_column) if self.lesion_column else None,
            rescale_slope=slope,
            rescale_intercept=intercept,
        )
        example: dict[str, Any] = {"pixel_values": processed["pixel_values"]}
        if self.anatomy:
            example["anatomy_mask"] = processed["anatomy_mask"]
        if self.lesion_column:
            example["lesion_mask"] = processed["lesion_mask"]
        if "labels" in row and row["labels"] is not None:
            labels = torch.tensor(row["labels"], dtype=torch.float32)
            example["labels"] = labels[self.label_indices] if self.label_indices is not None else labels
        if self.text_column:
            example["text"] = row[self.text_column]
            if self.region_mentions_fn is not None:
                example["region_mentions"] = torch.tensor(
                    self.region_mentions_fn(row[self.text_column]), dtype=torch.float32
                )
        if self.prior_column:
            prior = row.get(self.prior_column)
            if prior:
                prior_slope = row.get("prior_rescale_slope")
                prior_intercept = row.get("prior_rescale_intercept")
                example["prior_pixel_values"] = self.cache.get(
                    prior,
                    rescale_slope=1.0 if prior_slope is None else float(prior_slope),
                    rescale_intercept=0.0 if prior_intercept is None else float(prior_intercept),
                )["pixel_values"]
            else:
                example["prior_pixel_values"] = processed["pixel_values"]
        if self.transform is not None:
            example = self.transform(example)
        return example

    def prepare(self, progress: bool = True) -> int:
        """Process and store every volume (and prior) that the cache lacks, with a tqdm bar; returns how many
        entries were filled. Run it once before training so DataLoader workers only ever read."""
        from tqdm.auto import tqdm

        filled = 0
        for index in tqdm(range(len(self.rows)), desc="caching volumes", unit="volume", disable=not progress):
            misses = self.cache.misses
            row = self.rows[index]
            slope, intercept = self._rescale(row)
            self.cache.get(
                row[self.volume_column],
                anatomy_mask_path=row.get("anatomy_mask_path") if self.anatomy else None,
                lesion_mask_path=row.get(self.lesion_column) if self.lesion_column else None,
                rescale_slope=slope,
                rescale_intercept=intercept,
            )
            if self.prior_column and row.get(self.prior_column):
                prior_slope = row.get("prior_rescale_slope")
                prior_intercept = row.get("prior_rescale_intercept")
                self.cache.get(
                    row[self.prior_column],
                    rescale_slope=1.0 if prior_slope is None else float(prior_slope),
                    rescale_intercept=0.0 if prior_intercept is None else float(prior_intercept),
                )
            filled += self.cache.misses - misses
        return filled
