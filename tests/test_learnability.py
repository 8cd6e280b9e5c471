"""A real, seed-fixed training run: the tiny classifier learns the phantom cohort's easy findings.

Setting (the `ClassifierRecipe` defaults): phantom cohort `generate_cohort(n_train=240, n_val=40, seed=1,
shape=(32, 64, 64), p_second_recon=0.0)` → 335 train / 54 validation volumes; windows lung, mediastinum and a
low-attenuation window (−900/300 HU), zero-centred; `ReCTForVolumeClassification` with a 2-layer, 64-wide divided-
attention encoder, patch (4, 16, 16) → 128 tokens; HF `Trainer`, AdamW lr 2e-3, wd 0.05, cosine with 20 warm-up
steps, batch 8, 500 steps, seed 0. Labels: Cardiomegaly, Pleural effusion, Emphysema, Pericardial effusion,
Consolidation. Requirement: macro validation AUROC ≥ 0.85.
"""

import json

from trainers.classification import EASY_LABELS, ClassifierRecipe, train_classifier
from trainers.data.phantom import generate_cohort


def test_tiny_classifier_reaches_auroc_085_on_easy_labels(tmp_path):
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, n_train=240, n_val=40, seed=1, shape=(32, 64, 64), p_second_recon=0.0)
    recipe = ClassifierRecipe()
    assert recipe.label_names == EASY_LABELS and recipe.max_steps == 500
    summary = train_classifier(cohort, tmp_path / "run", recipe)
    auroc = summary["valid_auroc"]
    print(json.dumps({"valid_auroc": auroc, "loss_history": summary["loss_history"]}, indent=1))
    assert auroc["defined_labels"] == len(EASY_LABELS)
    assert summary["loss_history"][-1] < summary["loss_history"][0]
    assert auroc["macro"] >= 0.85, auroc
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
