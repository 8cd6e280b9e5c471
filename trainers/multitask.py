"""Multitask fine-tuning: one vision encoder trained on every supervised term at once (the `multitask` recipe).

`ReCTMultitaskModel` is a training composite, not a Hub model: a [`ReCTModel`] (vision and text towers, projections,
global and region contrastive terms), the classification head of a [`ReCTForVolumeClassification`] and the prompt
fusion and decoder of a [`ReCTForLesionLocalization`], all on the `ReCTModel`'s encoder (and, for the localizer's
prompts, its text tower). Each step sums the contrastive, region-alignment, classification and localization (Dice +
focal + IoU) losses with the recipe's weights, so the encoder learns from all of them together, as seed 003's
fine-tuning phase does.

After training, `export_multitask` writes each component as its own Hub folder: the `ReCTModel` in the output folder
itself (what `AutoModel` loads there), `classifier/` (`ReCTForVolumeClassification`) and `localizer/`
(`ReCTForLesionLocalization`), each with the trained shared encoder and its processor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from hf_models import ReCTConfig, ReCTForLesionLocalization, ReCTForVolumeClassification, ReCTModel
from hf_models.modeling_rect import ReCTPreTrainedModel

from .data.collators import ContrastiveCollator, stack_field, tokenize_prompts


#: Subfolders of a multitask output with the classifier and the localizer (the `ReCTModel` is the folder itself).
CLASSIFIER_DIR = "classifier"
LOCALIZER_DIR = "localizer"

#: Loss weights the composite starts with (the recipe's `losses` replace them): seed 003's contrastive and region
#: terms; classification and localization unweighted (the seeds give no weights for them in a joint loss).
DEFAULT_LOSS_WEIGHTS = {"contrastive": 1.0, "region": 0.5, "classification": 1.0, "localization": 1.0}


@dataclass
class ReCTMultitaskOutput(ModelOutput):
    """The weighted sum `loss` and each term (`*_loss`, which `ReCTTrainer` logs), with the heads' outputs."""

    loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    region_loss: torch.FloatTensor | None = None
    classification_loss: torch.FloatTensor | None = None
    dice_loss: torch.FloatTensor | None = None
    focal_loss: torch.FloatTensor | None = None
    iou_loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


def _share(owner: nn.Module, name: str, module: nn.Module) -> None:
    """Make `owner.<name>` the very module `module` without registering it under `owner`: its parameters keep one
    name in the composite (the `ReCTModel`'s), so its state dict, optimizer, checkpoints and ZeRO partitions hold
    each weight once, while `owner.forward` runs on the shared module."""
    del owner._modules[name]
    object.__setattr__(owner, name, module)


class ReCTMultitaskModel(ReCTPreTrainedModel):
    """`ReCTModel` + classification head + localizer decoder on one encoder (see the module docstring).

    Args:
        config: a [`ReCTConfig`] (its `id2label` are the classifier's labels; `localizer_config` the decoder's).

    `ReCTMultitaskModel.from_pretrained(folder)` on a `ReCTModel` folder (a `vision_pretrain` output) loads it into
    `composite.model` and initialises the classification head and the localizer's own parts (`build_multitask` does).
    """

    _auto_class = None  # a training composite: `export_multitask` writes the Hub folders
    base_model_prefix = "model"  # `from_pretrained` on a `ReCTModel` folder loads it into `self.model`
    main_input_name = "pixel_values"

    def __init__(self, config: ReCTConfig):
        super().__init__(config)
        self.model = ReCTModel(config)
        self.classifier = ReCTForVolumeClassification(config)
        self.localizer = ReCTForLesionLocalization(config)
        _share(self.classifier, "vision_model", self.model.vision_model)
        _share(self.localizer, "vision_model", self.model.vision_model)
        _share(self.localizer, "text_model", self.model.text_model)
        self.loss_weights = dict(DEFAULT_LOSS_WEIGHTS)
        self.post_init()

    def auto_map(self) -> dict[str, str]:
        return {}

    def get_input_embeddings(self) -> nn.Module:
        return self.model.vision_model.get_input_embeddings()

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        anatomy_mask: torch.Tensor | None = None,
        region_mentions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        prompt_input_ids: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        mask_labels: torch.Tensor | None = None,
        return_loss: bool | None = True,
        **kwargs,
    ) -> ReCTMultitaskOutput:
        r"""
        Args:
            pixel_values, input_ids, attention_mask, token_type_ids, anatomy_mask, region_mentions: as
                [`ReCTModel.forward`] (the volumes and their reports).
            labels (`torch.FloatTensor` of shape `(batch, num_labels)`, *optional*): the classifier's labels.
            prompt_input_ids, prompt_attention_mask (`torch.LongTensor` of shape `(batch, K, seq)`, *optional*): K
                text prompts per volume for the localizer, with `mask_labels (batch, K, depth, height, width)`.

        The encoder runs once per step: the classifier and the localizer read the `ReCTModel`'s vision output (its
        tokens do not depend on the anatomy mask, which only pools the region features). A term whose inputs are
        missing is left out of `loss`.
        """
        weights = self.loss_weights
        if prompt_input_ids is not None:
            kwargs["output_hidden_states"] = True  # the localizer's decoder reads the encoder's layers
        if self.classifier.lesion_map_decoder is not None:
            kwargs["output_stem_features"] = True  # its lesion map reads the stem's feature maps
        clip = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            anatomy_mask=anatomy_mask,
            region_mentions=region_mentions,
            return_loss=return_loss,
            **kwargs,
        )
        terms = {"contrastive_loss": clip.contrastive_loss, "region_loss": clip.region_loss}
        loss = None
        for key in ("contrastive", "region"):
            if terms[f"{key}_loss"] is not None:
                loss = weighted_sum(loss, weights[key], terms[f"{key}_loss"])
        vision = clip.vision_model_output
        classified = self.classifier(labels=labels, vision_outputs=vision)
        if classified.loss is not None:
            terms["classification_loss"] = classified.loss
            loss = weighted_sum(loss, weights["classification"], classified.loss)
        if prompt_input_ids is not None:
            located = self.localizer(
                pixel_values=pixel_values,
                input_ids=prompt_input_ids,
                attention_mask=prompt_attention_mask,
                labels=mask_labels,
                vision_outputs=vision,
            )
            if located.loss is not None:
                terms.update(dice_loss=located.dice_loss, focal_loss=located.focal_loss, iou_loss=located.iou_loss)
                loss = weighted_sum(loss, weights["localization"], located.loss)
        return ReCTMultitaskOutput(
            loss=loss, logits_per_image=clip.logits_per_image, logits=classified.logits, **terms
        )

    def components(self) -> dict[str, ReCTPreTrainedModel]:
        """The three models as standalone Hub classes, each with its own copy of the shared weights: `"model"`
        (`ReCTModel`), `"classifier"`, `"localizer"`. Every weight of each is copied (a strict load)."""
        out = {"model": self.model}
        shared = {"vision_model": self.model.vision_model, "text_model": self.model.text_model}
        for name, cls in (("classifier", ReCTForVolumeClassification), ("localizer", ReCTForLesionLocalization)):
            part = getattr(self, name)
            standalone = cls(self.config)
            state = dict(part.state_dict())  # its own weights: the shared towers are not registered under it
            for tower_name, tower in shared.items():
                if not hasattr(standalone, tower_name):
                    continue
                wanted = getattr(standalone, tower_name).state_dict()
                # The classifier's and localizer's encoders have no region queries (see their __init__).
                state.update({f"{tower_name}.{k}": v for k, v in tower.state_dict().items() if k in wanted})
            standalone.load_state_dict(state)
            out[name] = standalone
        return out


def weighted_sum(loss: torch.Tensor | None, weight: float, term: torch.Tensor) -> torch.Tensor:
    return weight * term if loss is None else loss + weight * term


class MultitaskExamples(torch.utils.data.Dataset):
    """Per volume, everything every head trains on: the volume example of a `CachedVolumeDataset` (pixel values,
    anatomy mask, report text, region mentions, labels) and, from `LocalizationTargets` on the same volumes, its K
    localizer prompts and target masks (`prompt`, `mask_labels`)."""

    def __init__(self, targets):
        self.targets = targets
        self.volumes = targets.volumes

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.volumes[int(index)]
        localization = self.targets.localization_example(index, example)
        example = {k: v for k, v in example.items() if k != "lesion_mask"}
        example.update(prompt=localization["prompt"], mask_labels=localization["lesion_mask"])
        return example


@dataclass
class MultitaskCollator:
    """→ what `ReCTMultitaskModel` takes: `ContrastiveCollator`'s fields (volumes, anatomy masks, tokenised reports,
    region mentions, `return_loss`), `labels`, and the K tokenised prompts per volume (`prompt_input_ids`,
    `prompt_attention_mask`) with their target masks (`mask_labels`)."""

    tokenizer: Any
    max_length: int = 256
    prompt_max_length: int = 32

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = ContrastiveCollator(self.tokenizer, self.max_length)(examples)
        labels = stack_field(examples, "labels", optional=True)
        if labels is not None:
            batch["labels"] = labels.float()
        batch["prompt_input_ids"], batch["prompt_attention_mask"] = tokenize_prompts(
            self.tokenizer, examples, self.prompt_max_length
        )
        batch["mask_labels"] = stack_field(examples, "mask_labels")
        return batch


def export_multitask(output_dir: Path, processor: Any) -> None:
    """Replace the composite the Trainer saved in `output_dir` by its components' Hub folders: the `ReCTModel` in
    `output_dir` (config, weights, code; the `ReCTProcessor` the Trainer saved stays), `classifier/` with the
    processor's image processor and `localizer/` with `processor`. Read back from the saved weights, so under ZeRO-3
    they are the gathered model's."""
    output_dir = Path(output_dir)
    composite = ReCTMultitaskModel.from_pretrained(output_dir)
    parts = composite.components()
    parts["model"].save_pretrained(output_dir)
    parts["classifier"].save_pretrained(output_dir / CLASSIFIER_DIR)
    processor.image_processor.save_pretrained(output_dir / CLASSIFIER_DIR)
    parts["localizer"].save_pretrained(output_dir / LOCALIZER_DIR)
    processor.save_pretrained(output_dir / LOCALIZER_DIR)


__all__ = [
    "CLASSIFIER_DIR",
    "LOCALIZER_DIR",
    "MultitaskCollator",
    "MultitaskExamples",
    "ReCTMultitaskModel",
    "ReCTMultitaskOutput",
    "export_multitask",
]
