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


def test_targets_cover_present_findings_regions_and_one_absent_finding_per_volume(volumes):
    targets = LocalizationTargets(volumes, dict(LESION_IDS), seed=0)
    region_names = {r.name for r in ANATOMY_REGIONS}
    for index in range(len(volumes)):
        lesion = np.asarray(volumes[index]["lesion_mask"])
        present = {name.lower() for name, i in LESION_IDS.items() if (lesion == i).any()}
        mine = [t for t in targets.targets if t.volume == index]
        findings = [t for t in mine if t.source == "lesion"]
        assert {t.prompt for t in findings} - present and len({t.prompt for t in findings} - present) == 1
        assert present <= {t.prompt for t in findings}
        assert {t.prompt for t in mine if t.source == "anatomy"} <= region_names
    for index in range(len(targets)):
        example = targets[index]
        mask = example["lesion_mask"]
        assert mask.shape == (1, 8, 32, 32) and mask.dtype == torch.float32
        if mask.sum() == 0:
            assert "input_boxes" not in example  # nothing to put a box around
            continue
        box = example["input_boxes"]
        inside = torch.nonzero(mask[0])
        assert (inside.min(0).values >= box[:3] - 1).all() and (inside.max(0).values <= box[3:] + 1).all()
        positive, negative = (torch.tensor(p, dtype=torch.long) for p in example["input_points"])
        assert mask[0][tuple(positive)] == 1 and mask[0][tuple(negative)] == 0


def test_prompt_mode_follows_the_batch_and_is_deterministic(volumes, minilm_dir):
    targets = LocalizationTargets(volumes, dict(LESION_IDS), seed=0)
    collator = PromptModeCollator(AutoTokenizer.from_pretrained(minilm_dir))
    with_boxes = [i for i in range(len(targets)) if "input_boxes" in targets[i]]
    seen = set()
    for start in range(0, 12, 2):
        items = [targets[i] for i in with_boxes[start : start + 2]]
        batch = collator(items)
        mode = PROMPT_MODES[sum(int(e["item"]) for e in items) % len(PROMPT_MODES)]
        seen.add(mode)
        assert ("input_boxes" in batch) == (mode == "text+box")
        assert ("input_points" in batch) == (mode == "text+points")
        assert batch["labels"].shape == (2, 1, 8, 32, 32) and batch["input_ids"].shape[0] == 2
        again = collator(items)
        assert batch.keys() == again.keys()
    assert len(seen) > 1
    empty = next(i for i in range(len(targets)) if "input_boxes" not in targets[i])
    mixed = collator([targets[empty], targets[with_boxes[0]]])
    assert "input_boxes" not in mixed and "input_points" not in mixed and "input_ids" in mixed
