"""Fine-tune `ReCTForVolumeClassification` on a CT-RATE-layout cohort with the HF `Trainer`.

Data flows files → reader (`read_ct_rate`) → processed-volume cache → `CachedVolumeDataset` (+ augmentation on the
training split) → `ClassificationCollator` → `Trainer`; evaluation reports per-label and macro AUROC on the
validation split. `DEMO_COHORT` and the `ClassifierRecipe` defaults are the demo's (`rect-vlm demo`): all 18
CT-RATE findings, which the phantom cohort renders, within the demo's 15-minute budget on two CPU cores.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_models import CT_RATE_ABNORMALITIES, ReCTConfig, ReCTForVolumeClassification, ReCTImageProcessor

from .data.augmentation import Compose, ct_augmentation
from .data.cache import VolumeCache
from .data.collators import ClassificationCollator, stack_field
from .data.phantom import LESION_IDS
from .data.readers import read_ct_rate
from .data.volume_dataset import CachedVolumeDataset
from .metrics import multilabel_auroc, multilabel_classification_metrics


logger = logging.getLogger(__name__)

#: Large or diffuse, high-contrast findings of the phantom cohort: learnable even at 32×64×64 within seconds of CPU
#: training (the fast learnability test uses them); `macro_easy` in a summary is the mean AUROC over them.
EASY_LABELS = ("Cardiomegaly", "Pleural effusion", "Emphysema", "Pericardial effusion", "Consolidation")

#: A narrow low-attenuation window (HU −1050…−750) that separates emphysematous lung (≈ −950) from normal
#: lung (≈ −850), which the wide lung window compresses into a few percent of its range.
LOW_ATTENUATION_WINDOW = (-900.0, 300.0)

#: A high window (HU 0…1400): calcified plaque (≈ 550–950 HU) and metal (saturated) against bone (≤ 780 HU) and
#: soft tissue, all of which the lung and mediastinal windows clip to white.
DENSE_WINDOW = (700.0, 1400.0)

#: `generate_cohort` keyword arguments of the demo's phantom cohort (`rect-vlm demo`, `bench/learning.py`).
#: 800 + 120 patients (a third with a follow-up scan) → 1,088 training and 166 held-out volumes: the global
#: findings need this many (with 328 training volumes cardiomegaly reached 0.67 and pleural effusion 0.54).
DEMO_COHORT: dict[str, Any] = dict(n_train=800, n_val=120, seed=1, shape=(32, 64, 64), p_second_recon=0.0)


def ct_image_processor(volume_size: Sequence[int], windows: Sequence[Any]) -> ReCTImageProcessor:
    """The image processor of the project's recipes: `volume_size`, one channel per HU window (a preset name or
    `(center, width)`), each channel centred to [-1, 1]. A LayerNorm-ed linear patch embedding cannot tell a
    uniformly dark patch from a uniformly bright one when every input is positive; centring gives them opposite
    signs."""
    windows = [list(w) if isinstance(w, (list, tuple)) else w for w in windows]
    return ReCTImageProcessor(
        volume_size=list(volume_size),
        windows=windows,
        image_mean=[0.5] * len(windows),
        image_std=[0.5] * len(windows),
    )


@dataclass
class ClassifierRecipe:
    """Everything that defines a classification run (saved next to its outputs in `summary.json`).

    The defaults are the demo's recipe; `bench/learning.py` measures what it reaches.
    """

    label_names: tuple[str, ...] = CT_RATE_ABNORMALITIES
    volume_size: tuple[int, int, int] = (32, 64, 64)
    windows: tuple = ("lung", "mediastinum", LOW_ATTENUATION_WINDOW, DENSE_WINDOW)
    # Large in-plane patches: each token sees a 16×16 region, which a small encoder trained from scratch on a few
    # hundred volumes learns from quickly.
    patch_size: tuple[int, int, int] = (4, 16, 16)
    #: Convolutional stem before the patch projection (`ReCTVisionConfig.stem_channels`; () = linear patch
    #: embedding). Two stride-2 convolutions made the encoder learn far faster from scratch: all 18 findings,
    #: 1,062 training volumes, 1,000 steps: macro AUROC 0.61 (five large findings 0.85) vs 0.59 (0.74) without.
    stem_channels: tuple[int, ...] = (24, 48)
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    dropout: float = 0.0
    attention_type: str = "divided"
    classifier_pooling: str = "cls_mean_max"
    #: 1,500 with the lesion-map decoder (whose steps cost about twice the encoder's alone), inside the demo's budget.
    max_steps: int = 1500
    batch_size: int = 8
    #: 3e-4 rather than 1e-3: at 1e-3 the encoder stayed on the initial loss plateau (the label prior) for 1,300 to
    #: over 2,500 steps depending on the seed (median five-finding AUROC 0.655 over 3 seeds); at 3e-4 every seed left
    #: it by about step 1,000 (median 0.809).
    learning_rate: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    #: Positive weight of each label's BCE term: `(negatives / positives) ** pos_weight_power` from the training
    #: labels (0 = unweighted, 1 = balanced), capped at 10.
    pos_weight_power: float = 0.0
    #: Strength of `ct_augmentation` on the training split (0 = none). Off in the demo recipe: within its step budget
    #: augmentation slowed learning (all 18 findings, 32×64×64: macro AUROC 0.55 with strength 1.0 vs 0.58 without
    #: after 1,200 steps); pass `augmentation=1.0` for longer runs.
    augmentation: float = 0.0
    #: Weight of the auxiliary per-token loss on the cohort's lesion masks (`LesionTokenTargets`; 0 = none):
    #: `ReCTConfig.lesion_token_loss_weight`. Its token head is saved with the classifier (so a resumed or further
    #: fine-tuning run keeps it); inference reads images only and never uses it. Off since the lesion-map decoder:
    #: the token head learnt where findings may lie, not where they are (bench/encoder_probe.py).
    lesion_supervision: float = 0.0
    #: The lesion-map decoder (`ReCTConfig.lesion_map_channels`: one width per stage, at most one per stem
    #: convolution; () = none; `lesion_map_depth` convolutions per stage), whose per-label maximum joins the logits,
    #: and the weight of its per-voxel loss on the cohort's lesion masks (`LesionMapTargets`;
    #: `ReCTConfig.lesion_map_loss_weight`). One stage on the stem's 8×16×16 output: README "Learning on the phantom
    #: cohort" has what it and the larger decoders reached.
    lesion_map_channels: tuple[int, ...] = (48,)
    lesion_map_depth: int = 2
    lesion_map_supervision: float = 1.0
    seed: int = 0
    #: A `ReCTModel` / `ReCTForFeatureExtraction` / `ReCTVisionModel` folder whose vision encoder the classifier
    #: starts from (its vision config must equal this recipe's); None = random initialisation.
    pretrained: str | None = None
    eval_batch_size: int = 16
    logging_steps: int = 100
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

    def label_indices(self) -> list[int]:
        unknown = [n for n in self.label_names if n not in CT_RATE_ABNORMALITIES]
        if unknown:
            raise ValueError(f"label_names: unknown label(s) {unknown}; choose from {list(CT_RATE_ABNORMALITIES)}")
        return [CT_RATE_ABNORMALITIES.index(n) for n in self.label_names]

    def image_processor(self) -> ReCTImageProcessor:
        return ct_image_processor(self.volume_size, self.windows)

    def vision_config(self) -> dict[str, Any]:
        """`ReCTVisionConfig` keyword arguments of this recipe's encoder."""
        return dict(
            volume_size=list(self.volume_size),
            patch_size=list(self.patch_size),
            in_channels=len(self.windows),
            stem_channels=list(self.stem_channels),
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=4 * self.hidden_size,
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout,
            attention_type=self.attention_type,
            projection_dim=self.hidden_size,
        )

    def model_config(self, pos_weight: list[float] | None = None) -> ReCTConfig:
        return ReCTConfig(
            vision_config=self.vision_config(),
            text_config=dict(self.text_config),
            projection_dim=self.hidden_size,
            classifier_pooling=self.classifier_pooling,
            id2label=dict(enumerate(self.label_names)),
            problem_type="multi_label_classification",
            pos_weight=pos_weight,
            lesion_token_loss_weight=self.lesion_supervision,
            lesion_map_channels=list(self.lesion_map_channels),
            lesion_map_depth=self.lesion_map_depth,
            lesion_map_loss_weight=self.lesion_map_supervision,
        )


def label_pos_weight(labels: np.ndarray, power: float, cap: float = 10.0) -> list[float] | None:
    """Per-label BCE positive weights `(negatives / positives) ** power` (capped) from `(samples, labels)` 0/1
    training labels; None for `power == 0`.

    Raises:
        ValueError: a label has no positive or no negative example (it cannot be trained).
    """
    labels = np.asarray(labels, dtype=np.float64)
    positives = labels.sum(axis=0)
    negatives = labels.shape[0] - positives
    if (positives == 0).any() or (negatives == 0).any():
        raise ValueError(
            f"every label needs positive and negative training examples; positives per label: {positives}"
        )
    if power == 0:
        return None
    return [float(min(cap, w)) for w in (negatives / positives) ** power]


class LesionTokenTargets:
    """Dict transform: `lesion_mask (1, D, H, W)` (abnormality ids, `trainers.data.phantom.LESION_IDS`) →
    `lesion_tokens (num_patches, num_labels)`: 1.0 where some voxel of patch token n (patches of `patch_size`,
    tokens ordered (depth, height, width) as the encoder orders them) holds the lesion id of label l, else 0.0.
    The mask itself is dropped from the example (the model does not take it). Runs after augmentation, so the
    targets follow a flipped or rotated mask.

    Raises:
        ValueError: the example has no lesion mask, or its size is not divisible by `patch_size`.
    """

    def __init__(self, patch_size: Sequence[int], lesion_ids: Sequence[int]):
        self.patch_size = tuple(int(p) for p in patch_size)
        self.lesion_ids = torch.tensor([int(i) for i in lesion_ids], dtype=torch.long)

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        out = dict(example)
        mask = out.pop("lesion_mask", None)
        if mask is None:
            raise ValueError(
                "LesionTokenTargets: the example has no `lesion_mask` (read the cohort with lesion masks)"
            )
        spatial = tuple(mask.shape[-3:])
        if any(s % p for s, p in zip(spatial, self.patch_size)):
            raise ValueError(
                f"LesionTokenTargets: mask size {spatial} is not divisible by patch size {self.patch_size}"
            )
        grid = [s // p for s, p in zip(spatial, self.patch_size)]
        voxels = torch.nonzero(mask[0])  # lesions are sparse: visit only their voxels
        ids = mask[0][voxels[:, 0], voxels[:, 1], voxels[:, 2]].long()
        patch = torch.tensor(self.patch_size)
        cell = voxels // patch
        token = (cell[:, 0] * grid[1] + cell[:, 1]) * grid[2] + cell[:, 2]
        present = torch.zeros(grid[0] * grid[1] * grid[2], 256, dtype=torch.bool)
        present[token, ids] = True
        out["lesion_tokens"] = present[:, self.lesion_ids].float()
        return out


class LesionMapTargets:
    """Dict transform: `lesion_mask (1, D, H, W)` (abnormality ids, `trainers.data.phantom.LESION_IDS`) →
    `lesion_maps (num_labels, D / s, H / s, W / s)` uint8 for cells of `stride` s: 1 where one of the s×s×s voxels a
    cell covers holds the lesion id of label l, the targets of `ReCTForVolumeClassification`'s lesion-map decoder
    (`ReCTConfig.lesion_map_stride`). With `keep_mask` the mask stays in the example (for a `LesionTokenTargets`
    after it).

    Raises:
        ValueError: the example has no lesion mask, or a spatial size not divisible by the stride.
    """

    def __init__(self, lesion_ids: Sequence[int], stride: int = 2, keep_mask: bool = False):
        self.lesion_ids = [int(i) for i in lesion_ids]
        self.stride = int(stride)
        self.keep_mask = keep_mask

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        out = dict(example)
        mask = out.get("lesion_mask") if self.keep_mask else out.pop("lesion_mask", None)
        if mask is None:
            raise ValueError("LesionMapTargets: the example has no `lesion_mask` (read the cohort with lesion masks)")
        spatial = tuple(mask.shape[-3:])
        if any(s % self.stride for s in spatial):
            raise ValueError(
                f"LesionMapTargets: mask size {spatial} is not divisible by the map's stride {self.stride}"
            )
        maps = torch.stack([mask[0] == i for i in self.lesion_ids]).to(torch.uint8)
        out["lesion_maps"] = torch.nn.functional.max_pool3d(maps[None].float(), self.stride)[0].to(torch.uint8)
        return out


def disable_lesion_losses(config: ReCTConfig, cohort_root: str | Path) -> None:
    """Switch off `config`'s lesion losses (token head, lesion map) for a cohort without lesion masks, with a warning;
    a lesion-map decoder stays and learns from the labels alone (through its maximum in the logits)."""
    logger.warning(
        "%s has no lesion masks (masks/lesion/): training without the lesion losses (lesion_token_loss_weight=%s, "
        "lesion_map_loss_weight=%s are set to 0)",
        cohort_root,
        config.lesion_token_loss_weight,
        config.lesion_map_loss_weight if config.lesion_map_channels else 0.0,
    )
    config.lesion_token_loss_weight = 0.0
    config.lesion_map_loss_weight = 0.0


def lesion_target_transforms(config: ReCTConfig, label_names: Sequence[str]) -> list:
    """The transforms that turn a training example's lesion mask into the targets `config`'s auxiliary heads take:
    `LesionMapTargets` for a lesion-map decoder (`config.lesion_map_channels`), `LesionTokenTargets` for a token
    head (`config.lesion_token_loss_weight` > 0); empty for neither."""
    lesion_ids = [LESION_IDS[name] for name in label_names]
    transforms = []
    tokens = config.lesion_token_loss_weight > 0
    if config.lesion_map_channels and config.lesion_map_loss_weight > 0:
        transforms.append(LesionMapTargets(lesion_ids, config.lesion_map_stride, keep_mask=tokens))
    if tokens:
        transforms.append(LesionTokenTargets(config.vision_config.patch_size, lesion_ids))
    return transforms


@dataclass
class LesionSupervisedCollator(ClassificationCollator):
    """`ClassificationCollator` plus `lesion_tokens (batch, num_patches, num_labels)` from `LesionTokenTargets` and
    `lesion_maps (batch, num_labels, D / s, H / s, W / s)` from `LesionMapTargets` when the examples have them
    (training), without them otherwise (evaluation)."""

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)
        for key in ("lesion_tokens", "lesion_maps"):
            value = stack_field(examples, key, optional=True)
            if value is not None:
                batch[key] = value
        return batch


def classifier_scores(model, dataset, batch_size: int, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores `(volumes, labels)` of `model` over `dataset` and the targets beside them. The global RNG
    is left as it was (a DataLoader draws its base seed from it), so scoring before training changes nothing."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=ClassificationCollator()
    )
    scores, targets = [], []
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for batch in tqdm(loader, desc="evaluating", unit="batch", disable=not progress, leave=False):
            labels = batch.pop("labels")
            scores.append(model(**batch).logits.sigmoid().float().numpy())
            targets.append(labels.numpy())
    model.train(was_training)
    return np.concatenate(scores), np.concatenate(targets)


def evaluate_classifier(model, dataset, batch_size: int, label_names, progress: bool = True) -> dict[str, Any]:
    """Sigmoid scores over a dataset → per-label AUROC (None where a label has one class), `macro` over the
    defined labels and `macro_easy` over the `EASY_LABELS` among them."""
    return _auroc_summary(*classifier_scores(model, dataset, batch_size, progress), label_names)


def _auroc_summary(scores: np.ndarray, targets: np.ndarray, label_names) -> dict[str, Any]:
    result = multilabel_auroc(scores, targets, list(label_names))
    easy = [result[name] for name in EASY_LABELS if result.get(name) is not None]
    if easy:
        result["macro_easy"] = float(np.mean(easy))
    return result


def _compact_progress_callback():
    """The Trainer's tqdm bar, writing one short line per log (`step 300/3000  loss 0.4123 (classification 0.3012,
    lesion_token 0.1111)  lr 9.6e-04`) instead of the raw log dict."""
    from transformers.trainer_callback import ProgressCallback

    class CompactProgressCallback(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or self.training_bar is None or not logs:
                return
            if "loss" in logs:
                line = f"step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}"
                terms = [f"{k.removesuffix('_loss')} {v:.4f}" for k, v in logs.items() if k.endswith("_loss")]
                if terms:
                    line += f" ({', '.join(terms)})"
                if "learning_rate" in logs:
                    line += f"  lr {logs['learning_rate']:.1e}"
                if "grad_norm" in logs:
                    line += f"  grad-norm {logs['grad_norm']:.2f}"
            elif "train_runtime" in logs:
                line = f"trained {state.global_step} steps in {logs['train_runtime']:.0f} s"
                if "train_loss" in logs:
                    line += f", mean loss {logs['train_loss']:.4f}"
            else:
                return
            self.training_bar.write(line)

    return CompactProgressCallback


def compact_progress(trainer, progress: bool = True) -> None:
    """Swap `trainer`'s tqdm callback for the compact one (`_compact_progress_callback`) when `progress`."""
    from transformers.trainer_callback import ProgressCallback

    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_compact_progress_callback())


def train_classifier(
    cohort_root: str | Path,
    output_dir: str | Path,
    recipe: ClassifierRecipe | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train on the cohort's `train` split, evaluate on `valid`, save model + image processor to `output_dir/model`.

    Returns a summary (also written to `output_dir/summary.json`): the recipe, volume counts, `train_loss`,
    `train_seconds` (wall) and `train_cpu_seconds` (this process's CPU time, which other jobs on the machine do not
    inflate), `loss_history` (one value per `logging_steps`) and `loss_terms` (each logged loss term, likewise),
    `valid_auroc` (per label, `macro`, `macro_easy`, `defined_labels`), and `valid_metrics` / `untrained_metrics`:
    `multilabel_classification_metrics` of the trained model and of the same model before training (scored before
    the first step; training is unchanged by it).

    Raises:
        ValueError: an unknown label name, or a label without positive or negative training examples.
    """
    from transformers import TrainingArguments, set_seed

    from .trainer import ReCTTrainer

    recipe = recipe or ClassifierRecipe()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(recipe.seed)
    indices = recipe.label_indices()
    image_processor = recipe.image_processor()
    cache = VolumeCache(cache_dir or output_dir / "cache", image_processor)
    has_lesion_masks = (Path(cohort_root) / "masks" / "lesion").is_dir()
    wants_masks = bool(lesion_target_transforms(recipe.model_config(), recipe.label_names))
    lesion_supervision = wants_masks and has_lesion_masks
    train_rows = read_ct_rate(cohort_root, "train", cot=False, lesion_masks=lesion_supervision)
    train_labels = np.asarray(train_rows["labels"], dtype=np.float64)[:, indices]
    config = recipe.model_config(label_pos_weight(train_labels, recipe.pos_weight_power))
    if wants_masks and not has_lesion_masks:  # said once the cohort itself has been read
        disable_lesion_losses(config, cohort_root)
    transforms = []
    if recipe.augmentation > 0:
        transforms.append(ct_augmentation(recipe.augmentation, seed=recipe.seed))
    transforms += lesion_target_transforms(config, recipe.label_names)
    train = CachedVolumeDataset(
        train_rows,
        cache,
        label_indices=indices,
        lesion_column="lesion_mask_path" if lesion_supervision else None,
        transform=Compose(transforms) if transforms else None,
    )
    valid = CachedVolumeDataset(read_ct_rate(cohort_root, "valid", cot=False), cache, label_indices=indices)
    train.prepare(progress=progress)
    valid.prepare(progress=progress)
    if recipe.pretrained:
        model = ReCTForVolumeClassification.from_pretrained(recipe.pretrained, config=config)
    else:
        model = ReCTForVolumeClassification(config)
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
        logging_steps=recipe.logging_steps,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        # Volumes are memory-mapped cache entries and the augmentation is a few milliseconds per volume: worker
        # processes would only take CPU from the two training threads.
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=not progress,
    )
    collator = LesionSupervisedCollator() if lesion_supervision else ClassificationCollator()
    trainer = ReCTTrainer(model=model, args=args, train_dataset=train, data_collator=collator)
    compact_progress(trainer, progress)
    names = list(recipe.label_names)
    untrained = multilabel_classification_metrics(
        *classifier_scores(model, valid, recipe.eval_batch_size, progress=progress), names
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    result = trainer.train()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    scores, targets = classifier_scores(model, valid, recipe.eval_batch_size, progress=progress)
    auroc = _auroc_summary(scores, targets, names)

    model.save_pretrained(output_dir / "model")
    image_processor.save_pretrained(output_dir / "model")
    summary = {
        "recipe": asdict(recipe),
        "train_volumes": len(train),
        "valid_volumes": len(valid),
        "train_loss": result.training_loss,
        "train_seconds": round(seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "lesion_supervision_used": lesion_supervision,
        "valid_auroc": auroc,
        "valid_metrics": multilabel_classification_metrics(scores, targets, names),
        "untrained_metrics": untrained,
        "loss_history": [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e],
        # Each loss term the trainer logged (`classification_loss`, `lesion_token_loss` with lesion supervision).
        "loss_terms": {
            key: [e[key] for e in trainer.state.log_history if key in e]
            for key in sorted({k for e in trainer.state.log_history if "loss" in e for k in e if k.endswith("_loss")})
        },
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
