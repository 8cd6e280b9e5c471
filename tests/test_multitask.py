"""ReCTMultitaskModel: one encoder pass per step gives each head the loss its standalone model gives, and every
parameter of the composite learns from the summed loss."""

import pytest
import torch

from hf_models import ReCTConfig
from tests.conftest import tiny_text_kwargs, tiny_vision_kwargs
from tests.test_modeling import make_batch
from trainers.multitask import ReCTMultitaskModel


def composite(lesion_map: bool = False) -> ReCTMultitaskModel:
    """The tiny composite; `lesion_map`: an encoder with a convolutional stem and a classifier whose lesion-map
    decoder reads the stem's feature maps from the shared encoder pass."""
    torch.manual_seed(0)
    stem = dict(stem_channels=[6]) if lesion_map else {}
    config = ReCTConfig(
        vision_config=tiny_vision_kwargs(**stem),
        lesion_map_channels=[8] if lesion_map else [],
        text_config=tiny_text_kwargs(),
        localizer_config=dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, decoder_channels=[16, 8]),
        num_labels=3,
        classifier_dropout=0.0,
    )
    return ReCTMultitaskModel(config).eval()


def batch() -> dict[str, torch.Tensor]:
    inputs = make_batch(2)
    g = torch.Generator().manual_seed(1)
    inputs.update(
        region_mentions=torch.tensor([[1.0, 0, 1, 0, 0], [0, 1, 0, 0, 0]]),
        labels=torch.tensor([[1.0, 0, 1], [0, 1, 0]]),
        prompt_input_ids=torch.randint(1000, 2000, (2, 3, 5), generator=g),
        prompt_attention_mask=torch.ones(2, 3, 5, dtype=torch.long),
        mask_labels=(torch.rand(2, 3, 8, 32, 32, generator=g) > 0.8).float(),
    )
    return inputs


@pytest.mark.parametrize("lesion_map", [False, True], ids=["linear-patches", "stem-lesion-map"])
def test_one_encoder_pass_gives_each_head_its_standalone_loss(lesion_map):
    model, inputs = composite(lesion_map), batch()
    calls = []
    hook = model.model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        out = model(**inputs)
    hook.remove()
    assert len(calls) == 1  # the classifier and the localizer read the ReCTModel's encoder output

    parts = {name: part.eval() for name, part in model.components().items()}
    with torch.no_grad():
        clip = parts["model"](
            **{k: inputs[k] for k in ("pixel_values", "input_ids", "attention_mask", "anatomy_mask")},
            region_mentions=inputs["region_mentions"],
            return_loss=True,
        )
        classified = parts["classifier"](inputs["pixel_values"], labels=inputs["labels"])
        located = parts["localizer"](
            inputs["pixel_values"],
            input_ids=inputs["prompt_input_ids"],
            attention_mask=inputs["prompt_attention_mask"],
            labels=inputs["mask_labels"],
        )
    expected = {
        "contrastive_loss": clip.contrastive_loss,
        "region_loss": clip.region_loss,
        "classification_loss": classified.loss,
        "dice_loss": located.dice_loss,
        "focal_loss": located.focal_loss,
        "iou_loss": located.iou_loss,
    }
    for name, value in expected.items():
        torch.testing.assert_close(getattr(out, name), value, rtol=1e-5, atol=1e-6, msg=f"{name} differs")
    weights = model.loss_weights
    total = (
        weights["contrastive"] * clip.contrastive_loss
        + weights["region"] * clip.region_loss
        + weights["classification"] * classified.loss
        + weights["localization"] * located.loss
    )
    torch.testing.assert_close(out.loss, total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, classified.logits, rtol=1e-5, atol=1e-6)


def test_the_summed_loss_reaches_every_trained_part():
    model, inputs = composite(), batch()
    model.train()
    model(**inputs).loss.backward()
    # Point and box tokens are masked in a text-only step, yet take part (ZeRO-3 gathers every weight on each rank).
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
