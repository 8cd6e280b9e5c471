"""Fine-tune `ReCTForVolumeClassification` on a CT-RATE-layout cohort with the HF `Trainer`.

Data flows files → reader (`read_ct_rate`) → processed-volume cache → `CachedVolumeDataset` →
`ClassificationCollator` → `Trainer`; evaluation reports per-label and macro AUROC on the validation split.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_models import CT_RATE_ABNORMALITIES, ReCTConfig, ReCTForVolumeClassification, ReCTImageProcessor

from .data.cache import VolumeCache
from .data.collators import ClassificationCollator
from .data.readers import read_ct_rate
from .data.volume_dataset import CachedVolumeDataset
from .metrics import multilabel_auroc


#: Findings of the phantom cohort that a tiny encoder trained from scratch learns at 32×64×64 (large or diffuse,
#: high-contrast). Nodules and other small findings need finer volumes than a CPU test can afford.
EASY_LABELS = ("Cardiomegaly", "Pleural effusion", "Emphysema", "Pericardial effusion", "Consolidation")

#: A narrow low-attenuation window (HU −1050…−750) that separates emphysematous lung (≈ −950) from normal
#: lung (≈ −850), which the wide lung window compresses into a few percent of its range.
LOW_ATTENUATION_WINDOW = (-900.0, 300.0)


@dataclass
class ClassifierRecipe:
    """Everything that defines a classification run (saved next to its outputs as `recipe.json`)."""

    label_names: tuple[str, ...] = EASY_LABELS
    volume_size: tuple[int, int, int] = (32, 64, 64)
    windows: tuple = ("lung", "mediastinum", LOW_ATTENUATION_WINDOW)
    # Large in-plane patches: at this size each token sees a 16×16 region, which a tiny encoder trained from
    # scratch on ~200 volumes learns from; (4, 8, 8) patches stayed at chance within the same step budget.
    patch_size: tuple[int, int, int] = (4, 16, 16)
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    attention_type: str = "divided"
    text_config: dict = field(
        default_factory=lambda: dict(
            model_type="bert",
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    max_steps: int = 500
    batch_size: int = 8
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    seed: int = 0

    def label_indices(self) -> list[int]:
        unknown = [n for n in self.label_names if n not in CT_RATE_ABNORMALITIES]
        if unknown:
            raise ValueError(f"unknown label name(s) {unknown}; choose from {list(CT_RATE_ABNORMALITIES)}")
        return [CT_RATE_ABNORMALITIES.index(n) for n in self.label_names]

    def image_processor(self) -> ReCTImageProcessor:
        # Zero-centred channels: a LayerNorm-ed linear patch embedding cannot tell a uniformly dark patch from a
        # uniformly bright one when every input is positive; centring gives them opposite signs.
        windows = [list(w) if isinstance(w, (list, tuple)) else w for w in self.windows]
        return ReCTImageProcessor(
            volume_size=list(self.volume_size),
            windows=windows,
            image_mean=[0.5] * len(self.windows),
            image_std=[0.5] * len(self.windows),
        )

    def model_config(self) -> ReCTConfig:
        vision = dict(
            volume_size=list(self.volume_size),
            patch_size=list(self.patch_size),
            in_channels=len(self.windows),
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=4 * self.hidden_size,
            attention_type=self.attention_type,
            projection_dim=self.hidden_size,
        )
        return ReCTConfig(
            vision_config=vision,
            text_config=dict(self.text_config),
            projection_dim=self.hidden_size,
            id2label=dict(enumerate(self.label_names)),
        )


def evaluate_classifier(model, dataset, batch_size: int, label_names) -> dict[str, Any]:
    """Sigmoid scores over a dataset → per-label AUROC (None where a label has one class) and macro AUROC."""
    collate = ClassificationCollator()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    scores, targets = [], []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            labels = batch.pop("labels")
            scores.append(model(**batch).logits.sigmoid().float().numpy())
            targets.append(labels.numpy())
    return multilabel_auroc(np.concatenate(scores), np.concatenate(targets), list(label_names))


def train_classifier(
    cohort_root: str | Path,
    output_dir: str | Path,
    recipe: ClassifierRecipe | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train on the cohort's `train` split, evaluate on `valid`, save model + processor to `output_dir/model`.

    Returns a summary: the recipe, train loss, seconds, and the validation AUROC per label and macro.
    """
    from transformers import Trainer, TrainingArguments, set_seed

    recipe = recipe or ClassifierRecipe()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(recipe.seed)
    indices = recipe.label_indices()
    image_processor = recipe.image_processor()
    cache = VolumeCache(cache_dir or output_dir / "cache", image_processor)
    train = CachedVolumeDataset(read_ct_rate(cohort_root, "train", cot=False), cache, label_indices=indices)
    valid = CachedVolumeDataset(read_ct_rate(cohort_root, "valid", cot=False), cache, label_indices=indices)

    model = ReCTForVolumeClassification(recipe.model_config())
    args = TrainingArguments(
        output_dir=str(output_dir / "trainer"),
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.999,
        lr_scheduler_type="cosine",
        warmup_steps=recipe.warmup_steps,
        max_grad_norm=1.0,
        seed=recipe.seed,
        data_seed=recipe.seed,
        logging_steps=max(1, recipe.max_steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    start = time.perf_counter()
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=ClassificationCollator())
    result = trainer.train()
    seconds = time.perf_counter() - start
    auroc = evaluate_classifier(model, valid, recipe.batch_size, recipe.label_names)

    model.save_pretrained(output_dir / "model")
    image_processor.save_pretrained(output_dir / "model")
    summary = {
        "recipe": asdict(recipe),
        "train_volumes": len(train),
        "valid_volumes": len(valid),
        "train_loss": result.training_loss,
        "train_seconds": round(seconds, 1),
        "valid_auroc": auroc,
        "loss_history": [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e],
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
