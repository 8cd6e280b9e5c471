"""A torch `Dataset` that turns reader rows (file references) into model-ready examples through the cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .cache import VolumeCache, VolumeSource


class CachedVolumeDataset(torch.utils.data.Dataset):
    """Rows of a reader's `datasets.Dataset` → examples of processed tensors, decoded once via a `VolumeCache`.

    An example holds `pixel_values (C, D, H, W)` in the cache's storage dtype and, as asked: `anatomy_mask` /
    `lesion_mask` `(1, D, H, W)` uint8, `labels` (the reader's `labels`, optionally a subset of columns), `text`
    (the row's `text_column`), `region_mentions` (from `region_mentions_fn(text)`), `prior_pixel_values` (the
    row's prior scan, or the current one when there is none). Tensors read from the cache are zero-copy views of
    the entry files; in DataLoader workers they reach the main process without a copy.

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
            it receives the example described above and returns the (possibly new) example dict. Writing into the
            example's tensors in place is safe: the cache files are mapped copy-on-write.

    Raises:
        KeyError: `rows` lack a column that the options need.
        ValueError: `region_mentions_fn` without `text_column`.
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

    def sources(self, row: dict) -> tuple[VolumeSource, VolumeSource | None]:
        """The cache sources of one row: its volume (with the masks asked for) and its prior scan, if any."""
        volume = VolumeSource(
            row[self.volume_column],
            anatomy_mask_path=row.get("anatomy_mask_path") if self.anatomy else None,
            lesion_mask_path=row.get(self.lesion_column) if self.lesion_column else None,
            rescale_slope=_number(row.get("rescale_slope"), 1.0),
            rescale_intercept=_number(row.get("rescale_intercept"), 0.0),
        )
        prior = None
        if self.prior_column and row.get(self.prior_column):
            prior = VolumeSource(
                row[self.prior_column],
                rescale_slope=_number(row.get("prior_rescale_slope"), 1.0),
                rescale_intercept=_number(row.get("prior_rescale_intercept"), 0.0),
            )
        return volume, prior

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[int(index)]
        volume, prior = self.sources(row)
        processed = self.cache.get(volume)
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
            example["prior_pixel_values"] = (
                self.cache.get(prior)["pixel_values"] if prior is not None else processed["pixel_values"]
            )
        if self.transform is not None:
            example = self.transform(example)
        return example

    def prepare(self, progress: bool = True) -> int:
        """Process and store every volume (and prior) that the cache lacks, with a tqdm bar; returns how many
        entries were filled. Run it once before training so that DataLoader workers only ever read."""
        from tqdm.auto import tqdm

        filled = 0
        for index in tqdm(range(len(self.rows)), desc="caching volumes", unit="volume", disable=not progress):
            for source in self.sources(self.rows[index]):
                if source is not None and source not in self.cache:
                    self.cache.get(source)
                    filled += 1
        return filled


def _number(value: Any, default: float) -> float:
    """A rescale value from a row: missing (None or empty) → the default; 0.0 is kept."""
    return default if value is None or value == "" else float(value)
