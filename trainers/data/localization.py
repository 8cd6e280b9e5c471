"""Localizer training examples from a cohort with lesion and anatomy masks: one example per (volume, target).

A target is a finding present in the volume's lesion mask, an anatomy region present in its anatomy mask, or (a few
per volume) a finding absent from it, whose target is empty: the localizer must learn to answer "nothing" as well.
Each example carries its text prompt (the finding's name in lower case, or the region's name), its target mask, and
the box and points a user could give for it (the target's bounding box, a point inside it and one outside).
`PromptModeCollator` decides per batch which prompts the model sees — text alone, text + box, or text + points —
from the batch's example indices, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hf_models.anatomy_rect import ANATOMY_REGIONS

from .collators import LocalizationCollator


#: Prompt modes `PromptModeCollator` cycles through.
PROMPT_MODES = ("text", "text+box", "text+points")


@dataclass(frozen=True)
class Target:
    """One training target: the volume (index into the volume dataset), which mask and id, and the prompt."""

    volume: int
    source: str  # "lesion" or "anatomy"
    mask_id: int
    prompt: str


class LocalizationTargets(torch.utils.data.Dataset):
    """Every (volume, target) pair of a `CachedVolumeDataset` read with `anatomy=True` and a lesion column.

    Args:
        volumes: the volume dataset (examples with `pixel_values`, `anatomy_mask`, `lesion_mask`).
        findings: finding name → lesion-mask id (e.g. `trainers.data.phantom.LESION_IDS` for some names).
        regions: anatomy region ids to use as targets (default: every region of the anatomy table but background).
        absent_per_volume: findings absent from a volume added as empty targets, per volume (chosen with `seed`).
        seed: the choice of absent findings and of the points.

    Raises:
        ValueError: no target at all (no finding or region present in any volume).
    """

    def __init__(
        self,
        volumes,
        findings: dict[str, int],
        regions: list[int] | None = None,
        absent_per_volume: int = 1,
        seed: int = 0,
    ):
        self.volumes = volumes
        self.seed = seed
        names = {region.id: region.name for region in ANATOMY_REGIONS}
        regions = [r for r in (regions if regions is not None else names) if r != 0]
        rng = np.random.default_rng(seed)
        targets: list[Target] = []
        for index in range(len(volumes)):
            example = volumes[index]
            lesion_ids = set(np.unique(np.asarray(example["lesion_mask"])).tolist())
            anatomy_ids = set(np.unique(np.asarray(example["anatomy_mask"])).tolist())
            present = [name for name, i in findings.items() if i in lesion_ids]
            absent = [name for name, i in findings.items() if i not in lesion_ids]
            targets += [Target(index, "lesion", findings[name], name.lower()) for name in present]
            targets += [Target(index, "anatomy", r, names[r]) for r in regions if r in anatomy_ids]
            for name in rng.permutation(absent)[:absent_per_volume] if absent else []:
                targets.append(Target(index, "lesion", findings[str(name)], str(name).lower()))
        if not targets:
            raise ValueError("LocalizationTargets: no finding or anatomy region is present in any volume")
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict[str, Any]:
        target = self.targets[int(index)]
        example = self.volumes[target.volume]
        mask = torch.as_tensor(np.asarray(example[f"{target.source}_mask"]) == target.mask_id)
        out = {
            "pixel_values": example["pixel_values"],
            "lesion_mask": mask.to(torch.float32),
            "prompt": target.prompt,
            "target_kind": target.source,
            "item": int(index),
        }
        voxels = torch.nonzero(mask[0])
        if len(voxels):
            rng = np.random.default_rng((self.seed, int(index)))
            low, high = voxels.min(dim=0).values, voxels.max(dim=0).values
            shape = torch.tensor(mask.shape[1:])
            jitter = torch.from_numpy(rng.integers(-1, 2, size=6))
            low = torch.minimum(torch.clamp(low + jitter[:3], min=0), shape - 1)
            high = torch.minimum(torch.clamp(high + jitter[3:], min=0), shape - 1)
            box = torch.cat([torch.minimum(low, high), torch.maximum(low, high)])
            inside = voxels[int(rng.integers(len(voxels)))]
            outside = torch.nonzero(~mask[0])
            negative = outside[int(rng.integers(len(outside)))] if len(outside) else inside
            out["input_boxes"] = box.float()
            # Lists, as `LocalizationCollator` pads them per batch.
            out["input_points"] = [inside.tolist(), negative.tolist()]
            out["input_labels"] = [1, 0 if len(outside) else -1]
        return out


@dataclass
class PromptModeCollator(LocalizationCollator):
    """`LocalizationCollator` over `LocalizationTargets` examples, with the prompts of one mode per batch: `text`,
    `text+box` or `text+points` (`modes`), chosen from the sum of the batch's example indices (deterministic, so
    resumed runs match). A box or point batch that holds an empty target falls back to text alone (there is no
    box around nothing)."""

    modes: tuple[str, ...] = PROMPT_MODES

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        mode = self.modes[sum(int(e["item"]) for e in examples) % len(self.modes)]
        if any("input_boxes" not in e for e in examples):
            mode = "text"
        keep = {"text": (), "text+box": ("input_boxes",), "text+points": ("input_points", "input_labels")}[mode]
        drop = {"input_boxes", "input_points", "input_labels", "target_kind", "item"} - set(keep)
        return super().__call__([{k: v for k, v in e.items() if k not in drop} for e in examples])
