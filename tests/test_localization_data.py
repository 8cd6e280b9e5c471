"""Localizer training examples (`trainers.data.localization`) on a phantom cohort with lesion and anatomy masks."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from hf_models.anatomy_rect import ANATOMY_REGIONS
from trainers.classification import ct_image_processor
from trainers.data.cache import VolumeCache
from trainers.data.localization import PROMPT_MODES, LocalizationTargets, PromptModeCollator
from trainers.data.phantom import LESION_IDS, generate_cohort
from trainers.data.readers import read_ct_rate
from trainers.data.volume_dataset import CachedVolumeDataset


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    root = tmp_path_factory.mktemp("localization_data")
    generate_cohort(root / "cohort", n_train=4, n_val=1, seed=2, shape=(8, 32, 32), prevalence=0.5,
                    p_second_recon=0.0, num_workers=1)  # fmt: skip
    rows = read_ct_rate(root / "cohort", "train", anatomy_masks=True, lesion_masks=True, cot=False)
    cache = VolumeCache(root / "cache", ct_image_processor((8, 32, 32), ["lung"]))
    return CachedVolumeDataset(rows, cache, anatomy=True, lesion_column="lesion_mask_path")


def test_k_targets_per_volume_present_findings_first_then_absent_and_regions(volumes):
    targets = LocalizationTargets(volumes, dict(LESION_IDS), targets_per_volume=24, absent_per_volume=2, seed=0)
    assert len(targets) == len(volumes)
    region_names = {r.name for r in ANATOMY_REGIONS}
    finding_prompts = {name.lower() for name in LESION_IDS}
    for index in range(len(volumes)):
        lesion = np.asarray(volumes[index]["lesion_mask"])[0]
        anatomy = np.asarray(volumes[index]["anatomy_mask"])[0]
        present = {name.lower() for name, i in LESION_IDS.items() if (lesion == i).any()}
        example = targets[index]
        prompts, masks = example["prompt"], example["lesion_mask"]
        assert len(prompts) == 24 and len(set(prompts)) == 24
        assert masks.shape == (24, 8, 32, 32) and masks.dtype == torch.float32
        findings = [p for p in prompts if p in finding_prompts]
        assert present <= set(findings) and len(set(findings) - present) >= 2  # every present one, absent ones too
        assert (prompts[0] in present) if present else (prompts[0] in region_names)
        for prompt, mask in zip(prompts, masks):
            if prompt in finding_prompts:
                expected = lesion == LESION_IDS[next(n for n in LESION_IDS if n.lower() == prompt)]
            else:
                expected = anatomy == next(r.id for r in ANATOMY_REGIONS if r.name == prompt)
            assert np.array_equal(mask.numpy().astype(bool), expected)
        # The first target's box and points (it is never empty).
        box = example["input_boxes"]
        inside = torch.nonzero(masks[0])
        assert len(inside) and (inside.min(0).values >= box[:3] - 1).all()
        assert (inside.max(0).values <= box[3:] + 1).all()
        positive, negative = (torch.tensor(p, dtype=torch.long) for p in example["input_points"])
        assert masks[0][tuple(positive)] == 1 and masks[0][tuple(negative)] == 0
        again = targets[index]
        assert again["prompt"] == prompts and torch.equal(again["lesion_mask"], masks)


def test_bad_targets_per_volume_is_refused(volumes):
    most = len(LESION_IDS) + sum(1 for r in ANATOMY_REGIONS if r.id)
    for bad in (0, most + 1):
        with pytest.raises(ValueError, match=rf"targets_per_volume must be in \[1, {most}\]"):
            LocalizationTargets(volumes, dict(LESION_IDS), targets_per_volume=bad)


def test_prompt_mode_follows_the_batch_and_is_deterministic(volumes, minilm_dir):
    targets = LocalizationTargets(volumes, dict(LESION_IDS), targets_per_volume=5, seed=0)
    collator = PromptModeCollator(AutoTokenizer.from_pretrained(minilm_dir))
    seen = set()
    pairs = [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]
    for pair in pairs:
        items = [targets[i] for i in pair]
        batch = collator(items)
        mode = PROMPT_MODES[sum(pair) % len(PROMPT_MODES)]
        seen.add(mode)
        assert ("input_boxes" in batch) == (mode == "text+box")
        assert ("input_points" in batch) == (mode == "text+points")
        k = 5 if mode == "text" else 1
        assert batch["labels"].shape == (2, k, 8, 32, 32) and batch["input_ids"].shape[:2] == (2, k)
        assert torch.equal(batch["labels"][0], items[0]["lesion_mask"][:k])
        again = collator(items)
        assert batch.keys() == again.keys() and torch.equal(batch["input_ids"], again["input_ids"])
    assert seen == set(PROMPT_MODES)


def test_collator_refuses_examples_with_different_prompt_counts(volumes, minilm_dir):
    targets = LocalizationTargets(volumes, dict(LESION_IDS), targets_per_volume=5, seed=0)
    collator = PromptModeCollator(AutoTokenizer.from_pretrained(minilm_dir), modes=("text",))
    short = dict(targets[1], prompt=targets[1]["prompt"][:3])
    with pytest.raises(ValueError, match="same number K of prompts"):
        collator([targets[0], short])


def test_prompt_modes_weigh_by_repetition_and_bad_modes_are_refused(volumes, minilm_dir):
    targets = LocalizationTargets(volumes, dict(LESION_IDS), targets_per_volume=5, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    collator = PromptModeCollator(tokenizer, modes=["text", "text", "text+box"])
    counts = {"text": 0, "text+box": 0}
    for pair in [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]:  # index sums 1..5
        counts["text+box" if "input_boxes" in collator([targets[i] for i in pair]) else "text"] += 1
    assert counts == {"text": 4, "text+box": 2}
    for bad in ((), ("text", "box")):
        with pytest.raises(ValueError, match="modes must be a non-empty list"):
            PromptModeCollator(tokenizer, modes=bad)
