"""Localizer training examples from a cohort with lesion and anatomy masks: one example per volume, with K targets.

A target is a finding present in the volume's lesion mask, an anatomy region present in its anatomy mask, or a
finding absent from it, whose target is empty: the localizer must learn to answer "nothing" as well. Each example
carries the K text prompts (a finding's name in lower case, or a region's name) and their target masks, which the
model answers in one pass (the decoder runs once per volume), and the box and points a user could give for its first
target (that target's bounding box, a point inside it and one outside). `PromptModeCollator` decides per batch which
prompts the model sees — the K text prompts alone, or the first target's text + box, or text + points — from the
batch's example indices, so a resumed run sees exactly the batches an uninterrupted one would.
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
    """One training target: which mask (`lesion` or `anatomy`) and id, and the prompt."""

    source: str
    mask_id: int
    prompt: str


class LocalizationTargets(torch.utils.data.Dataset):
    """Per volume of a `CachedVolumeDataset` read with a lesion column (and `anatomy=True` for region targets): K
    targets.

    The K targets of volume i (chosen with a generator seeded by `(seed, i)`, so an example is the same in every
    epoch and in a resumed run): its first target is a finding present in the volume (a region where none is, an
    absent finding where neither is), then
    `absent_per_volume` absent findings, every other present finding and present regions, in this order until there
    are K; whatever is still missing to K is filled with more absent findings (so every example has the same K and
    batches stack).

    Args:
        volumes: the volume dataset (examples with `pixel_values`, `lesion_mask` and, for regions, `anatomy_mask`).
        findings: finding name → lesion-mask id (e.g. `trainers.data.phantom.LESION_IDS` for some names; `{"pleural
            effusion": 1}` for the binary masks of a segmentation CSV).
        regions: anatomy region ids to use as targets (default: every region of the anatomy table but background;
            `[]` for volumes without anatomy masks).
        targets_per_volume: K.
        absent_per_volume: findings absent from a volume among its targets (more when K leaves room).
        seed: the choice of targets and of the points.

    Raises:
        ValueError: `targets_per_volume` larger than the findings and regions together, or below 1.
    """

    def __init__(
        self,
        volumes,
        findings: dict[str, int],
        regions: list[int] | None = None,
        targets_per_volume: int = 16,
        absent_per_volume: int = 2,
        seed: int = 0,
    ):
        self.volumes = volumes
        self.seed = seed
        self.findings = {name: int(i) for name, i in findings.items()}
        self._finding_names = {i: name for name, i in self.findings.items()}
        names = {region.id: region.name for region in ANATOMY_REGIONS}
        self.regions = {int(r): names[r] for r in (regions if regions is not None else names) if r != 0}
        if not 1 <= targets_per_volume <= len(self.findings) + len(self.regions):
            raise ValueError(
                f"LocalizationTargets: targets_per_volume must be in [1, {len(self.findings) + len(self.regions)}] "
                f"({len(self.findings)} findings + {len(self.regions)} regions), got {targets_per_volume}"
            )
        self.targets_per_volume = targets_per_volume
        self.absent_per_volume = absent_per_volume
        self.present: list[tuple[list[int], list[int]]] = []  # per volume: present lesion ids, present region ids
        for index in range(len(volumes)):
            example = volumes[index]
            lesion_ids = set(np.unique(np.asarray(example["lesion_mask"])).tolist())
            anatomy_ids = set(np.unique(np.asarray(example["anatomy_mask"])).tolist()) if self.regions else set()
            self.present.append(([i for i in self.findings.values() if i in lesion_ids],
                                 [r for r in self.regions if r in anatomy_ids]))  # fmt: skip

    def __len__(self) -> int:
        return len(self.volumes)

    def targets(self, index: int) -> list[Target]:
        """The K targets of volume `index` (see the class docstring)."""
        rng = np.random.default_rng((self.seed, int(index)))
        lesion_ids, region_ids = self.present[int(index)]
        present = [Target("lesion", int(i), self._finding_names[i].lower()) for i in rng.permutation(lesion_ids)]
        absent = [Target("lesion", i, name.lower()) for name, i in self.findings.items() if i not in lesion_ids]
        absent = [absent[j] for j in rng.permutation(len(absent))]
        regions = [Target("anatomy", int(r), self.regions[int(r)]) for r in rng.permutation(region_ids)]
        chosen = present[:1] or regions[:1] or absent[:1]
        rest = [t for t in absent[: self.absent_per_volume] + present + regions if t not in chosen]
        chosen += rest[: self.targets_per_volume - 1]
        chosen += absent[self.absent_per_volume :][: self.targets_per_volume - len(chosen)]
        return chosen[: self.targets_per_volume]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.localization_example(index, self.volumes[int(index)])

    def localization_example(self, index: int, example: dict[str, Any]) -> dict[str, Any]:
        """Volume `index`'s training example from its volume example `example` (`self.volumes[index]`, read once
        by a caller that needs its other fields too): `pixel_values`, the K target masks as `lesion_mask`, the K
        prompts, `item` and, when the first target is not empty, its box and points."""
        targets = self.targets(index)
        masks = {source: np.asarray(example[f"{source}_mask"])[0] for source in {t.source for t in targets}}
        stacked = np.stack([masks[t.source] == t.mask_id for t in targets])
        out = {
            "pixel_values": example["pixel_values"],
            "lesion_mask": torch.from_numpy(stacked.astype(np.float32)),
            "prompt": [t.prompt for t in targets],
            "item": int(index),
        }
        mask = torch.from_numpy(stacked[0])
        voxels = torch.nonzero(mask)
        if len(voxels):
            rng = np.random.default_rng((self.seed, int(index), 1))
            low, high = voxels.min(dim=0).values, voxels.max(dim=0).values
            shape = torch.tensor(mask.shape)
            jitter = torch.from_numpy(rng.integers(-1, 2, size=6))
            low = torch.minimum(torch.clamp(low + jitter[:3], min=0), shape - 1)
            high = torch.minimum(torch.clamp(high + jitter[3:], min=0), shape - 1)
            box = torch.cat([torch.minimum(low, high), torch.maximum(low, high)])
            inside = voxels[int(rng.integers(len(voxels)))]
            outside = torch.nonzero(~mask)
            negative = outside[int(rng.integers(len(outside)))] if len(outside) else inside
            out["input_boxes"] = box.float()
            # Lists, as `LocalizationCollator` pads them per batch.
            out["input_points"] = [inside.tolist(), negative.tolist()]
            out["input_labels"] = [1, 0 if len(outside) else -1]
        return out


@dataclass
class PromptModeCollator(LocalizationCollator):
    """`LocalizationCollator` over `LocalizationTargets` examples, with the prompts of one mode per batch: `text`
    (every example's K text prompts), `text+box` or `text+points` (each example's first target only, with its box
    or points), chosen from the sum of the batch's example indices (deterministic, so resumed runs match). A box or
    point batch that holds an example with an empty first target falls back to text (there is no box around
    nothing). Repeating a mode in `modes` gives it more batches (`("text", "text", "text+box")`: two in three text).

    Raises:
        ValueError: `modes` empty or naming a mode other than `PROMPT_MODES`.
    """

    modes: tuple[str, ...] = PROMPT_MODES

    def __post_init__(self):
        self.modes = tuple(self.modes)
        unknown = [m for m in self.modes if m not in PROMPT_MODES]
        if not self.modes or unknown:
            raise ValueError(f"PromptModeCollator: modes must be a non-empty list of {PROMPT_MODES}, got {self.modes}")

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        mode = self.modes[sum(int(e["item"]) for e in examples) % len(self.modes)]
        if any("input_boxes" not in e for e in examples):
            mode = "text"
        keep = {"text": (), "text+box": ("input_boxes",), "text+points": ("input_points", "input_labels")}[mode]
        drop = {"input_boxes", "input_points", "input_labels", "item"} - set(keep)
        examples = [{k: v for k, v in e.items() if k not in drop} for e in examples]
        if mode != "text":
            for example in examples:
                example["prompt"] = example["prompt"][:1]
                example["lesion_mask"] = example["lesion_mask"][:1]
        return super().__call__(examples)
