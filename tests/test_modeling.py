"""Vision encoder, feature extractor, contrastive model and classifier on tiny configs (table-driven)."""

import math

import pytest
import torch

from hf_models import (
    ReCTConfig,
    ReCTForFeatureExtraction,
    ReCTForVolumeClassification,
    ReCTModel,
    ReCTVisionConfig,
    ReCTVisionModel,
)
from tests.conftest import tiny_text_kwargs, tiny_vision_kwargs


ATTENTION_TYPES = ["divided", "joint"]
BATCH = 2


def make_inputs(seed: int = 0, with_mask: bool = True, regions=(1, 2, 3)):
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.rand(BATCH, 1, 8, 32, 32, generator=g)
    mask = None
    if with_mask:
        # Region ids laid out in blocks so each listed region covers whole patches.
        mask = torch.zeros(BATCH, 1, 8, 32, 32, dtype=torch.long)
        for i, region in enumerate(regions):
            mask[:, :, :, (i * 8) : (i + 1) * 8, :16] = region
    input_ids = torch.randint(1000, 2000, (BATCH, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    return pixel_values, mask, input_ids, attention_mask


def rect_config(attention_type: str, **overrides) -> ReCTConfig:
    return ReCTConfig(
        vision_config=tiny_vision_kwargs(attention_type=attention_type),
        text_config=tiny_text_kwargs(),
        projection_dim=16,
        **overrides,
    )


def seeded(cls, config, seed=0):
    torch.manual_seed(seed)
    return cls(config).eval()


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
@pytest.mark.parametrize("with_mask", [True, False])
def test_vision_model_shapes_and_backward(attention_type, with_mask):
    config = ReCTVisionConfig(**tiny_vision_kwargs(attention_type=attention_type))
    model = seeded(ReCTVisionModel, config).train()
    pixel_values, mask, _, _ = make_inputs(with_mask=with_mask)
    out = model(pixel_values, mask, output_hidden_states=True, output_attentions=True)
    n = 4 * 4 * 4
    assert out.last_hidden_state.shape == (BATCH, 1 + n, 32)
    assert out.pooler_output.shape == (BATCH, 32)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert len(out.attentions) == config.num_hidden_layers
    if attention_type == "joint":
        assert out.attentions[0].shape == (BATCH, 4, 1 + n, 1 + n)
        assert out.depth_attentions is None
    else:
        assert out.attentions[0].shape == (BATCH * 4, 4, 1 + 16, 1 + 16)
        assert out.depth_attentions[0].shape == (BATCH * 16, 4, 4, 4)
    if with_mask:
        assert out.region_features.shape == (BATCH, 5, 32)
        assert out.region_present.tolist() == [[True, True, True, False, False]] * BATCH
    else:
        assert out.region_features is None and out.region_present is None
    # Random weights: a plain sum of LayerNorm outputs has zero gradient.
    weights = torch.randn(out.last_hidden_state.shape, generator=torch.Generator().manual_seed(1))
    loss = (out.last_hidden_state * weights).sum() + ((out.region_features**2).sum() if with_mask else 0)
    loss.backward()
    grads = [p.grad for n_, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.embeddings.projection.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
@pytest.mark.parametrize("with_mask", [True, False])
def test_feature_extraction_embeddings_are_normalised(attention_type, with_mask):
    model = seeded(ReCTForFeatureExtraction, ReCTVisionConfig(**tiny_vision_kwargs(attention_type=attention_type)))
    pixel_values, mask, _, _ = make_inputs(with_mask=with_mask)
    out = model(pixel_values, mask)
    assert out.image_embeds.shape == (BATCH, 16)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(BATCH))
    if with_mask:
        norms = out.region_embeds.norm(dim=-1)
        torch.testing.assert_close(norms[:, :3], torch.ones(BATCH, 3))
        assert torch.all(norms[:, 3:] == 0)
    else:
        assert out.region_embeds is None
    out.image_embeds.sum().backward()


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
@pytest.mark.parametrize("with_mask", [True, False])
def test_contrastive_model_loss_and_backward(attention_type, with_mask):
    model = seeded(ReCTModel, rect_config(attention_type)).train()
    pixel_values, mask, input_ids, attention_mask = make_inputs(with_mask=with_mask)
    mentions = torch.tensor([[1, 0, 1, 1, 1], [0, 1, 0, 1, 0]]) if with_mask else None
    out = model(
        input_ids=input_ids,
        pixel_values=pixel_values,
        attention_mask=attention_mask,
        anatomy_mask=mask,
        region_mentions=mentions,
    )
    assert out.logits_per_image.shape == (BATCH, BATCH)
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.t())
    assert out.text_embeds.shape == out.image_embeds.shape == (BATCH, 16)
    assert torch.isfinite(out.loss)
    if with_mask:
        assert out.region_logits.shape == (BATCH, 5)
        expected = out.contrastive_loss + model.config.region_alignment_weight * out.region_loss
        torch.testing.assert_close(out.loss, expected)
    else:
        assert out.region_loss is None
        torch.testing.assert_close(out.loss, out.contrastive_loss)
    out.loss.backward()
    assert model.contrastive_head.logit_scale.grad is not None
    assert model.text_projection.weight.grad.abs().sum() > 0
    if with_mask:
        assert model.vision_model.region_attention.region_queries.grad[:3].abs().sum() > 0
    # the learnable temperature starts at 1 / 0.07
    assert math.isclose(model.contrastive_head.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-5)


def test_get_features_match_forward_embeddings():
    model = seeded(ReCTModel, rect_config("divided"))
    pixel_values, _, input_ids, attention_mask = make_inputs(with_mask=False)
    out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
    image = torch.nn.functional.normalize(model.get_image_features(pixel_values), dim=-1)
    text = torch.nn.functional.normalize(model.get_text_features(input_ids, attention_mask), dim=-1)
    torch.testing.assert_close(image, out.image_embeds)
    torch.testing.assert_close(text, out.text_embeds)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_absent_region_gives_zero_features_and_finite_loss(attention_type):
    model = seeded(ReCTModel, rect_config(attention_type))
    pixel_values, _, input_ids, attention_mask = make_inputs(with_mask=False)
    # Sample 0 has regions 1 and 2; sample 1 has only background; region 5 is absent everywhere.
    mask = torch.zeros(BATCH, 1, 8, 32, 32, dtype=torch.long)
    mask[0, :, :, :16] = 1
    mask[0, :, :, 16:] = 2
    mentions = torch.ones(BATCH, 5)
    out = model(
        input_ids=input_ids,
        pixel_values=pixel_values,
        attention_mask=attention_mask,
        anatomy_mask=mask,
        region_mentions=mentions,
    )
    vision = out.vision_model_output
    assert vision.region_present.tolist() == [[True, True, False, False, False], [False] * 5]
    assert torch.all(vision.region_features[1] == 0) and torch.all(vision.region_features[0, 2:] == 0)
    assert torch.isfinite(out.loss) and torch.isfinite(out.region_loss)
    # Absent regions do not enter the loss: changing their mention targets changes nothing.
    mentions_flipped = mentions.clone()
    mentions_flipped[:, 2:] = 0
    mentions_flipped[1] = 0
    out2 = model(
        input_ids=input_ids,
        pixel_values=pixel_values,
        attention_mask=attention_mask,
        anatomy_mask=mask,
        region_mentions=mentions_flipped,
    )
    torch.testing.assert_close(out.region_loss, out2.region_loss)
    # A batch with no region at all: region loss is exactly zero, not NaN, and still backpropagates.
    empty = torch.zeros_like(mask)
    out3 = model.train()(
        input_ids=input_ids,
        pixel_values=pixel_values,
        attention_mask=attention_mask,
        anatomy_mask=empty,
        region_mentions=mentions,
    )
    assert out3.region_loss.item() == 0.0
    out3.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
@pytest.mark.parametrize("with_mask", [True, False])
def test_classifier_loss_and_zero_shot(attention_type, with_mask):
    model = seeded(ReCTForVolumeClassification, rect_config(attention_type)).train()
    assert model.config.num_labels == 18 and model.config.id2label[2] == "Cardiomegaly"
    pixel_values, mask, input_ids, attention_mask = make_inputs(with_mask=with_mask)
    labels = torch.zeros(BATCH, 18)
    labels[0, 2] = 1
    out = model(pixel_values, mask, labels=labels)
    assert out.logits.shape == (BATCH, 18)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.classifier.weight.grad.abs().sum() > 0
    scores = model.eval().zero_shot_logits(
        pixel_values, {"input_ids": input_ids, "attention_mask": attention_mask}, mask
    )
    assert scores.shape == (BATCH, BATCH) and torch.isfinite(scores).all()
    with pytest.raises(TypeError, match="tokenise"):
        model.zero_shot_logits(pixel_values, ["pleural effusion"])


def test_classifier_pos_weight_changes_loss():
    config = rect_config("divided", pos_weight=[3.0] * 18)
    model = seeded(ReCTForVolumeClassification, config)
    pixel_values, _, _, _ = make_inputs(with_mask=False)
    labels = torch.ones(BATCH, 18)
    out = model(pixel_values, labels=labels)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels)
    torch.testing.assert_close(out.loss, 3.0 * plain)
    with pytest.raises(ValueError, match="pos_weight"):
        rect_config("divided", pos_weight=[1.0, 2.0])


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_eager_and_sdpa_agree(attention_type):
    pixel_values, mask, input_ids, attention_mask = make_inputs()
    outputs = {}
    for impl in ("eager", "sdpa"):
        config = rect_config(attention_type)
        config._attn_implementation = impl
        config.vision_config._attn_implementation = impl
        model = seeded(ReCTModel, config)
        assert model.vision_model.config._attn_implementation == impl
        outputs[impl] = model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, anatomy_mask=mask
        )
    vision_e, vision_s = outputs["eager"].vision_model_output, outputs["sdpa"].vision_model_output
    torch.testing.assert_close(vision_e.last_hidden_state, vision_s.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vision_e.region_features, vision_s.region_features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        outputs["eager"].logits_per_image, outputs["sdpa"].logits_per_image, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_gradient_checkpointing_gives_same_gradients(attention_type):
    pixel_values, mask, input_ids, attention_mask = make_inputs()
    grads = []
    for checkpointing in (False, True):
        model = seeded(ReCTModel, rect_config(attention_type)).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.vision_model.layers)
        out = model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            anatomy_mask=mask,
            region_mentions=torch.ones(BATCH, 5),
        )
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_position_embeddings_interpolate_to_other_volume_sizes():
    model = seeded(ReCTVisionModel, ReCTVisionConfig(**tiny_vision_kwargs()))
    out = model(torch.rand(1, 1, 12, 48, 24))
    assert out.last_hidden_state.shape == (1, 1 + 6 * 6 * 3, 32)
    with pytest.raises(ValueError, match="divisible by `patch_size`"):
        model(torch.rand(1, 1, 9, 32, 32))
    with pytest.raises(ValueError, match="channels"):
        model(torch.rand(1, 2, 8, 32, 32))


def test_bad_anatomy_masks_are_rejected():
    model = seeded(ReCTVisionModel, ReCTVisionConfig(**tiny_vision_kwargs()))
    pixel_values, mask, _, _ = make_inputs()
    with pytest.raises(ValueError, match="0..5"):
        model(pixel_values, mask + 6)
    with pytest.raises(ValueError, match="spatial shape"):
        model(pixel_values, mask[..., :16])
    with pytest.raises(ValueError, match="integer region ids"):
        model(pixel_values, mask.float())


def test_models_build_on_meta_device():
    with torch.device("meta"):
        model = ReCTForVolumeClassification(ReCTConfig())  # seed geometry, BERT-base text tower
    assert model.rect.vision_model.embeddings.position_embeddings.shape == (1, 1 + 16 * 32 * 32, 768)
    assert model.rect.vision_model.embeddings.position_embeddings.is_meta


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(volume_size=[10, 512, 512]), "divisible by `patch_size`"),
        (dict(volume_size=[64, 512]), "volume_size"),
        (dict(patch_size=[4, 0, 16]), "patch_size"),
        (dict(hidden_size=100, num_attention_heads=12), "num_attention_heads"),
        (dict(attention_type="axial"), "attention_type"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
        (dict(region_patch_fraction=0.0), "region_patch_fraction"),
    ],
)
def test_vision_config_rejects_impossible_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReCTVisionConfig(**kwargs)


def test_rect_config_validation_and_defaults():
    config = ReCTConfig(vision_config=tiny_vision_kwargs(), text_config=tiny_text_kwargs())
    assert isinstance(config.vision_config, ReCTVisionConfig)
    assert config.text_config.model_type == "bert"
    assert config.problem_type == "multi_label_classification"
    assert config.label2id["Pleural effusion"] == 12
    with pytest.raises(ValueError, match="text_pooling"):
        ReCTConfig(text_pooling="max")
    with pytest.raises(ValueError, match="projection_dim"):
        ReCTConfig(projection_dim=0)
    reloaded = ReCTConfig.from_dict(config.to_dict())
    assert reloaded.vision_config.volume_size == [8, 32, 32]
    assert reloaded.to_dict() == config.to_dict()
