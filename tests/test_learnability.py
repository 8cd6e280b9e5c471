"""A real, seed-fixed training run: a tiny classifier learns the phantom cohort's five large findings in seconds.

Setting: phantom cohort `generate_cohort(n_train=240, n_val=40, seed=1, shape=(32, 64, 64), p_second_recon=0.0)`
(the `learnability_cohort` fixture)
→ about 330 train / 55 validation volumes; `LEARNABILITY_RECIPE`: windows lung, mediastinum and low-attenuation
(−900/300 HU), zero-centred; `ReCTForVolumeClassification` with a 2-layer, 64-wide divided-attention encoder,
patch (4, 16, 16) → 128 tokens; HF `Trainer`, AdamW lr 2e-3, wd 0.05, cosine with 20 warm-up steps, batch 8,
500 steps, seed 0, no augmentation. Labels: `EASY_LABELS` (cardiomegaly, pleural effusion, emphysema, pericardial
effusion, consolidation). Requirement: macro validation AUROC ≥ 0.70 (chance is 0.5; measured 0.746 — the
phantom's appearance varies widely, in contrast phase, kernel, noise, pose and habitus, and this one-minute model
learns the findings through it only partly: emphysema 0.91, cardiomegaly 0.80, the others 0.63–0.70).

What the demo's recipe reaches on all 18 findings is measured by `bench/learning.py`, not asserted here: it takes
minutes, not seconds.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from trainers.classification import (
    EASY_LABELS,
    LOW_ATTENUATION_WINDOW,
    ClassifierRecipe,
    LesionMapTargets,
    LesionTokenTargets,
    train_classifier,
)


LEARNABILITY_RECIPE = ClassifierRecipe(
    label_names=EASY_LABELS,
    volume_size=(32, 64, 64),
    windows=("lung", "mediastinum", LOW_ATTENUATION_WINDOW),
    patch_size=(4, 16, 16),
    stem_channels=(),  # the linear patch embedding: the convolutional stem needs more steps than this test takes
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    dropout=0.1,
    max_steps=500,
    batch_size=8,
    learning_rate=2e-3,
    warmup_steps=20,
    augmentation=0.0,
    lesion_supervision=0.0,
    lesion_map_channels=(),  # the decoder climbs a stem, which this encoder does not have
    logging_steps=50,
    seed=0,
)


def test_tiny_classifier_learns_the_easy_labels(learnability_cohort, tmp_path):
    summary = train_classifier(learnability_cohort, tmp_path / "run", LEARNABILITY_RECIPE, progress=False)
    auroc = summary["valid_auroc"]
    print(json.dumps({"valid_auroc": auroc, "loss_history": summary["loss_history"]}, indent=1))
    assert auroc["defined_labels"] == len(EASY_LABELS)
    assert summary["loss_history"][-1] < summary["loss_history"][0]
    assert auroc["macro"] >= 0.70, auroc
    assert auroc["macro_easy"] == auroc["macro"]
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_lesion_token_targets_match_max_pooled_one_hot_masks():
    """Each token's target is 1 for a label when any voxel of its patch holds that label's lesion id (checked
    against one-hot masks max-pooled over the patches, in the encoder's (depth, height, width) token order)."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(1, 8, 32, 48, dtype=torch.uint8)
    sparse = torch.rand(mask.shape, generator=generator) < 0.01
    mask[sparse] = torch.randint(1, 19, (int(sparse.sum()),), generator=generator, dtype=torch.uint8)
    lesion_ids = [3, 10, 13, 18]
    out = LesionTokenTargets((2, 8, 8), lesion_ids)({"pixel_values": torch.zeros(2, 8, 32, 48), "lesion_mask": mask})
    one_hot = torch.stack([(mask[0] == i).float() for i in lesion_ids])[None]
    reference = F.max_pool3d(one_hot, kernel_size=(2, 8, 8)).flatten(2).transpose(1, 2)[0]
    assert "lesion_mask" not in out
    assert out["lesion_tokens"].shape == (4 * 4 * 6, len(lesion_ids))
    assert torch.equal(out["lesion_tokens"], reference)
    assert reference.sum() > 0


def test_lesion_map_targets_cover_each_label_on_the_half_size_grid():
    """A map cell's target is 1 for a label when any of its s×s×s voxels holds that label's lesion id (checked by
    reshaping the one-hot mask into cells, s = 2 and 4); `keep_mask` leaves the mask for a token transform."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(1, 8, 32, 48, dtype=torch.uint8)
    sparse = torch.rand(mask.shape, generator=generator) < 0.01
    mask[sparse] = torch.randint(1, 19, (int(sparse.sum()),), generator=generator, dtype=torch.uint8)
    lesion_ids = [3, 10, 13, 18]
    out = LesionMapTargets(lesion_ids)({"pixel_values": torch.zeros(2, 8, 32, 48), "lesion_mask": mask})
    one_hot = torch.stack([mask[0] == i for i in lesion_ids])
    reference = one_hot.reshape(4, 4, 2, 16, 2, 24, 2).any(dim=6).any(dim=4).any(dim=2).to(torch.uint8)
    assert "lesion_mask" not in out and out["lesion_maps"].dtype == torch.uint8
    assert torch.equal(out["lesion_maps"], reference) and reference.sum() > 0
    kept = LesionMapTargets(lesion_ids, keep_mask=True)({"lesion_mask": mask})
    assert kept["lesion_mask"] is mask and torch.equal(kept["lesion_maps"], reference)
    coarse = LesionMapTargets(lesion_ids, stride=4)({"lesion_mask": mask})["lesion_maps"]
    assert torch.equal(coarse, reference.reshape(4, 2, 2, 8, 2, 12, 2).amax(dim=(2, 4, 6)))
    with pytest.raises(ValueError, match="no `lesion_mask`"):
        LesionMapTargets([1])({"pixel_values": torch.zeros(1, 8, 32, 32)})
    with pytest.raises(ValueError, match="not divisible by the map's stride 4"):
        LesionMapTargets([1], stride=4)({"lesion_mask": torch.zeros(1, 6, 32, 32, dtype=torch.uint8)})


def test_lesion_token_targets_need_a_mask_on_the_patch_grid():
    with pytest.raises(ValueError, match="no `lesion_mask`"):
        LesionTokenTargets((2, 8, 8), [1])({"pixel_values": torch.zeros(1, 8, 32, 32)})
    with pytest.raises(ValueError, match="not divisible by patch size"):
        LesionTokenTargets((2, 8, 8), [1])({"lesion_mask": torch.zeros(1, 8, 30, 32, dtype=torch.uint8)})
