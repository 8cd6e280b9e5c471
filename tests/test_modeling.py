"""Model test suite: every model class × the common checks, as a table (transformers' `ModelTesterMixin`, peft's
`TEST_CASES`), then the checks that belong to one class.

A case is (model class, attention type): its config, its inputs for a batch, and the output tensors that must agree
between two runs. Every common check runs on every case.
"""

import copy
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from torch.nn import functional as F

from hf_models import (
    ReCTConfig,
    ReCTForFeatureExtraction,
    ReCTForLesionLocalization,
    ReCTForVolumeClassification,
    ReCTModel,
    ReCTVisionConfig,
    ReCTVisionModel,
)
from hf_models.modeling_rect import pool_vision_features
from tests.conftest import tiny_text_kwargs, tiny_vision_kwargs


SPATIAL = (8, 32, 32)  # tiny_vision_kwargs: patch (2, 8, 8) → grid (4, 4, 4) = 64 tokens
TINY_LOCALIZER = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, decoder_channels=[16, 8])
NUM_REGIONS = 5


def rect_config(attention_type: str = "divided", stem_channels=(), **overrides) -> ReCTConfig:
    return ReCTConfig(
        vision_config=tiny_vision_kwargs(attention_type=attention_type, stem_channels=list(stem_channels)),
        text_config=tiny_text_kwargs(),
        projection_dim=16,
        **overrides,
    )


def make_batch(batch: int, seed: int = 0, with_mask: bool = True) -> dict[str, torch.Tensor]:
    """Volumes, anatomy masks whose regions 1..3 cover whole patches, and tokenised texts with some padding."""
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.rand(batch, 1, *SPATIAL, generator=g)
    inputs = {"pixel_values": pixel_values}
    if with_mask:
        mask = torch.zeros(batch, 1, *SPATIAL, dtype=torch.long)
        for i, region in enumerate((1, 2, 3)):
            mask[:, :, :, i * 8 : (i + 1) * 8, :16] = region
        mask[0, :, :, 24:, 16:] = 4  # sample 0 has one region more than the others
        inputs["anatomy_mask"] = mask
    input_ids = torch.randint(1000, 2000, (batch, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, 6:] = 0
    inputs.update(input_ids=input_ids, attention_mask=attention_mask)
    return inputs


@dataclass
class ModelCase:
    """One model class on one attention type: how to build it, feed it and compare its outputs."""

    cls: type
    attention_type: str
    stem_channels: tuple[int, ...] = ()  # () = linear patch embedding; else a convolutional stem
    lesion_map: bool = False  # the classifier's lesion-map decoder (one stage per stem convolution)

    @property
    def id(self) -> str:
        suffix = ("-stem" if self.stem_channels else "") + ("-map" if self.lesion_map else "")
        return f"{self.cls.__name__}-{self.attention_type}{suffix}"

    def config(self):
        if self.cls in (ReCTVisionModel, ReCTForFeatureExtraction):
            kwargs = tiny_vision_kwargs(attention_type=self.attention_type, stem_channels=list(self.stem_channels))
            return ReCTVisionConfig(**kwargs)
        if self.cls is ReCTForLesionLocalization:
            return rect_config(self.attention_type, self.stem_channels, localizer_config=TINY_LOCALIZER)
        if self.lesion_map:
            return rect_config(
                self.attention_type, self.stem_channels, lesion_map_channels=[8] * len(self.stem_channels)
            )
        return rect_config(self.attention_type, self.stem_channels)

    def build(self, seed: int = 0, config=None):
        torch.manual_seed(seed)
        return self.cls(config if config is not None else self.config()).eval()

    def inputs(self, batch: int = 2, seed: int = 0, with_labels: bool = False) -> dict[str, Any]:
        data = make_batch(batch, seed)
        if self.cls is ReCTModel:
            data["region_mentions"] = (torch.arange(batch * NUM_REGIONS).reshape(batch, NUM_REGIONS) % 3 == 0).float()
            data["return_loss"] = with_labels
            return data
        if self.cls is ReCTForLesionLocalization:
            data.pop("anatomy_mask")
            data["input_ids"] = data["input_ids"].view(batch, 1, -1).expand(-1, 2, -1).clone()
            data["attention_mask"] = data["attention_mask"].view(batch, 1, -1).expand(-1, 2, -1).clone()
            data["input_points"] = torch.tensor([[3.0, 10, 10], [6, 20, 5], [1, 1, 30]]).expand(batch, -1, -1).clone()
            data["input_labels"] = torch.tensor([1, 0, -1]).expand(batch, -1).clone()
            data["input_boxes"] = (torch.tensor([1.0, 2, 3, 5, 20, 21]) + torch.arange(batch).view(-1, 1)).clone()
            if with_labels:
                masks = torch.zeros(batch, 2, *SPATIAL)
                masks[:, 0, 2:5, 8:16, 8:16] = 1
                data["labels"] = masks
            return data
        data.pop("input_ids"), data.pop("attention_mask")
        if self.cls is ReCTForVolumeClassification:
            data.pop("anatomy_mask")
            if with_labels:
                data["labels"] = (torch.arange(batch * 18).reshape(batch, 18) % 5 == 0).float()
        return data

    def per_sample_outputs(self, output) -> dict[str, torch.Tensor]:
        """Outputs whose row b depends on sample b alone (what batch independence compares)."""
        if self.cls is ReCTModel:
            return {"image_embeds": output.image_embeds, "text_embeds": output.text_embeds,
                    "region_logits": output.region_logits}  # fmt: skip
        if self.cls is ReCTForVolumeClassification:
            return {"logits": output.logits}
        if self.cls is ReCTForLesionLocalization:
            return {"pred_masks": output.pred_masks, "iou_scores": output.iou_scores}
        if self.cls is ReCTForFeatureExtraction:
            return {"image_embeds": output.image_embeds, "region_embeds": output.region_embeds}
        return {"last_hidden_state": output.last_hidden_state, "region_features": output.region_features}

    def scalar(self, output) -> torch.Tensor:
        """A loss, or a fixed random projection of the outputs (a plain sum of LayerNorm outputs has no gradient)."""
        if getattr(output, "loss", None) is not None:
            return output.loss
        total = 0.0
        for index, value in enumerate(self.per_sample_outputs(output).values()):
            weights = torch.randn(value.shape, generator=torch.Generator().manual_seed(index))
            total = total + (value.float() * weights).sum()
        return total


CASES = [
    ModelCase(cls, attention_type)
    for cls in (
        ReCTVisionModel,
        ReCTForFeatureExtraction,
        ReCTModel,
        ReCTForVolumeClassification,
        ReCTForLesionLocalization,
    )
    for attention_type in ("divided", "joint")
] + [
    # The convolutional stem (GroupNorm per sample, stride-2 convolutions before the patch projection).
    ModelCase(ReCTVisionModel, "joint", stem_channels=(6,)),
    ModelCase(ReCTForVolumeClassification, "divided", stem_channels=(6,)),
    ModelCase(ReCTForVolumeClassification, "joint", stem_channels=(6,), lesion_map=True),
]
cases = pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)


def assert_outputs_close(a: dict, b: dict, atol: float, rtol: float = 1e-5):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Common checks
# ----------------------------------------------------------------------------------------------------------------


@cases
def test_forward_backward_every_used_parameter_gets_a_gradient(case):
    """DDP with `find_unused_parameters=False` needs a gradient on every trainable parameter the task uses."""
    model = case.build().train()
    output = model(**case.inputs(with_labels=True))
    loss = case.scalar(output)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    # The vision tower's region queries serve only region features; without a loss on them they idle.
    allowed = {"ReCTVisionModel", "ReCTForFeatureExtraction"}
    if case.cls.__name__ in allowed:
        missing = [n for n in missing if "region_attention" not in n]
    assert not missing, missing


@cases
def test_batch_independence(case):
    """A sample's outputs do not depend on the rest of the batch (divided attention reshapes across it)."""
    model = case.build()
    batch = case.inputs(batch=3)
    with torch.no_grad():
        together = case.per_sample_outputs(model(**batch))
        for i in range(3):
            single = {k: v[i : i + 1] if torch.is_tensor(v) and v.ndim and k != "return_loss" else v
                      for k, v in batch.items()}  # fmt: skip
            alone = case.per_sample_outputs(model(**single))
            assert_outputs_close({k: v[i : i + 1] for k, v in together.items()}, alone, atol=1e-5)


@cases
def test_dict_and_tuple_outputs_agree(case):
    model = case.build()
    inputs = case.inputs(with_labels=True)
    with torch.no_grad():
        as_dict = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    expected = as_dict.to_tuple()
    assert len(as_tuple) == len(expected)

    def flat(items):
        for item in items:
            if isinstance(item, tuple):
                yield from flat(item)
            else:
                yield item

    for a, b in zip(flat(as_tuple), flat(expected)):
        torch.testing.assert_close(a, b)


@cases
def test_eager_and_sdpa_agree(case):
    model = case.build()
    inputs = case.inputs()
    results = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        vision = model if isinstance(model, ReCTVisionModel) else model.vision_model
        assert vision.config._attn_implementation == implementation
        with torch.no_grad():
            results[implementation] = case.per_sample_outputs(model(**inputs))
    assert_outputs_close(results["eager"], results["sdpa"], atol=1e-5)


@cases
def test_gradient_checkpointing_gives_the_same_gradients(case):
    gradients = []
    for checkpointing in (False, True):
        model = case.build().train()
        if checkpointing:
            model.activation_checkpointing_enable()
            vision = model if isinstance(model, ReCTVisionModel) else model.vision_model
            assert all(layer.gradient_checkpointing for layer in vision.layers)
        case.scalar(model(**case.inputs(with_labels=True))).backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[0][name], gradients[1][name], atol=1e-6, rtol=1e-5, msg=name)


@cases
def test_bf16_forward_is_finite_and_close_to_fp32(case):
    model = case.build()
    inputs = case.inputs()
    with torch.no_grad():
        reference = case.per_sample_outputs(model(**inputs))
        model.to(torch.bfloat16)
        half = {
            k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()
        }
        lowered = case.per_sample_outputs(model(**half))
    for name, value in lowered.items():
        assert value.dtype in (torch.bfloat16, torch.bool), name
        assert torch.isfinite(value.float()).all(), name
        similarity = F.cosine_similarity(value.float().flatten(), reference[name].float().flatten(), dim=0)
        assert similarity > 0.99, (name, similarity)


@cases
def test_save_and_reload_is_bit_identical(case, tmp_path):
    model = case.build()
    inputs = case.inputs()
    with torch.no_grad():
        expected = case.per_sample_outputs(model(**inputs))
    model.save_pretrained(tmp_path)
    reloaded = case.cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got = case.per_sample_outputs(reloaded(**inputs))
    assert_outputs_close(expected, got, atol=0.0, rtol=0.0)


@cases
def test_builds_on_the_meta_device_at_seed_size(case):
    config = ReCTVisionConfig() if case.cls in (ReCTVisionModel, ReCTForFeatureExtraction) else ReCTConfig()
    config = copy.deepcopy(config)
    vision = config if isinstance(config, ReCTVisionConfig) else config.vision_config
    vision.attention_type = case.attention_type
    with torch.device("meta"):
        model = case.cls(config)
    tower = model if isinstance(model, ReCTVisionModel) else model.vision_model
    assert tower.embeddings.position_embeddings.shape == (1, 1 + 16 * 32 * 32, 768)
    assert tower.embeddings.position_embeddings.is_meta


# ----------------------------------------------------------------------------------------------------------------
# Gradient accumulation through the HF Trainer
# ----------------------------------------------------------------------------------------------------------------


class _Volumes(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.batch = ModelCase(ReCTForVolumeClassification, "divided").inputs(batch=n, seed=3, with_labels=True)

    def __len__(self):
        return self.batch["pixel_values"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


@pytest.mark.parametrize("attention_type", ["divided", "joint"])
def test_trainer_gradient_accumulation_matches_one_big_batch(attention_type, tmp_path):
    """2 × batch 2 with accumulation must step exactly like 1 × batch 4 (the Trainer divides by the steps only when
    the model says it does not normalise by `num_items_in_batch`)."""
    from transformers import Trainer, TrainingArguments

    case = ModelCase(ReCTForVolumeClassification, attention_type)
    assert case.cls.accepts_loss_kwargs is False
    deltas = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model = case.build().train()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = TrainingArguments(
            output_dir=str(tmp_path / f"b{batch_size}"),
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            learning_rate=1.0,
            optim="sgd",
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=0.0,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        Trainer(model=model, args=args, train_dataset=_Volumes(4)).train()
        deltas.append({n: before[n] - p.detach() for n, p in model.named_parameters()})
    assert any(d.abs().sum() > 0 for d in deltas[0].values())
    for name in deltas[0]:
        torch.testing.assert_close(deltas[0][name], deltas[1][name], atol=1e-6, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Base → head loading
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source_cls", [ReCTVisionModel, ReCTForFeatureExtraction, ReCTModel], ids=lambda c: c.__name__
)
def test_classifier_loads_a_pretrained_encoder_and_reports_the_new_head(source_cls, tmp_path):
    source = ModelCase(source_cls, "divided").build(seed=5)
    source.save_pretrained(tmp_path)
    classifier, info = ReCTForVolumeClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert not info["mismatched_keys"]
    # region queries (not used by the head) and the text side are reported, never silently kept or dropped
    assert all(not key.startswith("vision_model.layers") for key in info["unexpected_keys"])
    encoder = source if isinstance(source, ReCTVisionModel) else source.vision_model
    pixel_values = make_batch(2)["pixel_values"]
    with torch.no_grad():
        expected = encoder(pixel_values).last_hidden_state
        got = classifier.eval().vision_model(pixel_values).last_hidden_state
    assert torch.equal(expected, got)
    assert classifier.config.num_labels == 18 and classifier.config.id2label[2] == "Cardiomegaly"


def test_feature_extractor_and_encoder_load_from_a_contrastive_folder(tmp_path):
    model = ModelCase(ReCTModel, "divided").build(seed=2)
    model.save_pretrained(tmp_path)
    inputs = make_batch(2)
    extractor = ReCTForFeatureExtraction.from_pretrained(tmp_path).eval()
    encoder = ReCTVisionModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        full = model(**inputs)
        torch.testing.assert_close(
            extractor(inputs["pixel_values"], inputs["anatomy_mask"]).image_embeds, full.image_embeds
        )
        torch.testing.assert_close(
            encoder(inputs["pixel_values"]).last_hidden_state, full.vision_model_output.last_hidden_state
        )


# ----------------------------------------------------------------------------------------------------------------
# Per-class checks
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention_type", ["divided", "joint"])
def test_vision_outputs_hidden_states_and_attentions(attention_type):
    model = ModelCase(ReCTVisionModel, attention_type).build()
    model.set_attn_implementation("eager")
    inputs = make_batch(2)
    out = model(inputs["pixel_values"], inputs["anatomy_mask"], output_hidden_states=True, output_attentions=True)
    n = 4 * 4 * 4
    assert out.last_hidden_state.shape == (2, 1 + n, 32) and out.pooler_output.shape == (2, 32)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert len(out.attentions) == model.config.num_hidden_layers
    if attention_type == "joint":
        assert out.attentions[0].shape == (2, 4, 1 + n, 1 + n)
        assert out.depth_attentions is None
    else:
        assert out.attentions[0].shape == (2 * 4, 4, 1 + 16, 1 + 16)
        assert out.depth_attentions[0].shape == (2 * 16, 4, 4, 4)
    assert out.region_features.shape == (2, NUM_REGIONS, 32)
    assert out.region_present.tolist() == [[True] * 4 + [False], [True] * 3 + [False] * 2]
    plain = model(inputs["pixel_values"])
    assert plain.region_features is None and plain.hidden_states is None and plain.attentions is None


@pytest.mark.parametrize("attention_type", ["joint", "divided"])
def test_encoder_without_cls_token(attention_type):
    """`use_cls_token=False` (MONAI ViT without classification, SAM-Med3D): patch tokens only, pooled by their
    mean; region attention, the classifier and the localizer read the patch tokens."""
    torch.manual_seed(0)
    config = ReCTVisionConfig(**tiny_vision_kwargs(attention_type=attention_type, use_cls_token=False))
    model = ReCTVisionModel(config).eval()
    assert model.embeddings.cls_token is None and model.embeddings.position_embeddings.shape[1] == 64
    inputs = make_batch(2)
    out = model(inputs["pixel_values"], inputs["anatomy_mask"], output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 64, 32) and out.hidden_states[-1].shape == (2, 64, 32)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean(dim=1))
    assert out.region_present.tolist() == [[True] * 4 + [False], [True] * 3 + [False] * 2]
    # Other volume sizes interpolate the patch positions alone.
    assert model(torch.randn(1, 1, 16, 32, 32)).last_hidden_state.shape == (1, 128, 32)

    vision = tiny_vision_kwargs(attention_type=attention_type, use_cls_token=False, num_regions=0)
    classifier = ReCTForVolumeClassification(ReCTConfig(vision_config=vision, text_config=None, num_labels=3))
    loss = classifier(inputs["pixel_values"], labels=torch.ones(2, 3)).loss
    loss.backward()
    assert torch.isfinite(loss)
    localizer = ReCTForLesionLocalization(
        ReCTConfig(vision_config=vision, text_config=tiny_text_kwargs(), localizer_config=TINY_LOCALIZER)
    )
    boxes = torch.tensor([[1, 4, 4, 5, 20, 20]], dtype=torch.float32).repeat(2, 1)
    masks = localizer(inputs["pixel_values"], input_boxes=boxes).pred_masks
    assert masks.shape[0] == 2 and masks.shape[-3:] == (8, 32, 32) and torch.isfinite(masks).all()


def test_feature_embeddings_are_unit_length_and_absent_regions_zero():
    model = ModelCase(ReCTForFeatureExtraction, "divided").build()
    inputs = make_batch(2)
    out = model(inputs["pixel_values"], inputs["anatomy_mask"])
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(2))
    norms = out.region_embeds.norm(dim=-1)
    torch.testing.assert_close(norms[1, :3], torch.ones(3))
    assert torch.all(norms[1, 3:] == 0)


def test_contrastive_loss_terms_temperature_and_return_loss_default():
    model = ModelCase(ReCTModel, "divided").build().train()
    assert ReCTModel.main_input_name == "input_ids"
    inputs = ModelCase(ReCTModel, "divided").inputs(with_labels=True)
    out = model(**inputs)
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.t())
    expected = out.contrastive_loss + model.config.region_alignment_weight * out.region_loss
    torch.testing.assert_close(out.loss, expected)
    assert math.isclose(model.contrastive_head.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-5)
    inputs.pop("return_loss")
    assert model(**inputs).loss is None  # CLIP's default: no loss unless asked


def test_get_features_return_projected_embeddings_in_pooler_output():
    model = ModelCase(ReCTModel, "divided").build()
    inputs = make_batch(2, with_mask=False)
    out = model(**inputs)
    image = model.get_image_features(inputs["pixel_values"])
    text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
    assert image.pooler_output.shape == text.pooler_output.shape == (2, 16)
    assert image.last_hidden_state.shape == (2, 65, 32)
    torch.testing.assert_close(F.normalize(image.pooler_output, dim=-1), out.image_embeds)
    torch.testing.assert_close(F.normalize(text.pooler_output, dim=-1), out.text_embeds)
    assert isinstance(model.get_image_features(inputs["pixel_values"], return_dict=False), tuple)


def test_absent_regions_give_zero_features_and_never_nan():
    model = ModelCase(ReCTModel, "divided").build()
    inputs = make_batch(2)
    mask = torch.zeros(2, 1, *SPATIAL, dtype=torch.long)
    mask[0, :, :, :16] = 1
    mask[0, :, :, 16:] = 2
    inputs["anatomy_mask"] = mask
    mentions = torch.ones(2, NUM_REGIONS)
    out = model(**inputs, region_mentions=mentions, return_loss=True)
    vision = out.vision_model_output
    assert vision.region_present.tolist() == [[True, True, False, False, False], [False] * 5]
    assert torch.all(vision.region_features[1] == 0) and torch.all(vision.region_features[0, 2:] == 0)
    # absent regions do not enter the loss: changing their targets changes nothing
    flipped = mentions.clone()
    flipped[:, 2:] = 0
    flipped[1] = 0
    torch.testing.assert_close(out.region_loss, model(**inputs, region_mentions=flipped, return_loss=True).region_loss)
    # no region at all: an exact zero that still backpropagates
    inputs["anatomy_mask"] = torch.zeros_like(mask)
    empty = model.train()(**inputs, region_mentions=mentions, return_loss=True)
    assert empty.region_loss.item() == 0.0
    empty.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_zero_shot_scores_findings_from_positive_and_negative_prompts():
    model = ModelCase(ReCTModel, "divided").build()
    inputs = make_batch(2)
    g = torch.Generator().manual_seed(4)
    positive = {"input_ids": torch.randint(1000, 2000, (3, 5), generator=g)}
    negative = {"input_ids": torch.randint(1000, 2000, (3, 5), generator=g)}
    logits = model.zero_shot_logits(inputs["pixel_values"], positive, negative)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    # swapping the prompts negates the evidence
    torch.testing.assert_close(model.zero_shot_logits(inputs["pixel_values"], negative, positive), -logits)
    with pytest.raises(TypeError, match="tokenise"):
        model.zero_shot_logits(inputs["pixel_values"], ["pleural effusion"], negative)
    with pytest.raises(ValueError, match="one negative prompt per positive"):
        model.zero_shot_logits(inputs["pixel_values"], positive, {"input_ids": negative["input_ids"][:2]})


def test_classifier_holds_only_the_vision_tower_and_its_head():
    model = ModelCase(ReCTForVolumeClassification, "divided").build()
    assert [name for name, _ in model.named_children()] == ["vision_model", "dropout", "classifier"]
    assert model.vision_model.region_attention is None
    assert not any("text" in name for name, _ in model.named_parameters())
    with pytest.raises(ValueError, match="anatomy_mask"):
        model(**make_batch(2, with_mask=True))


def test_classifier_infers_problem_type_from_labels():
    pixel_values = make_batch(2)["pixel_values"]
    multi = ModelCase(ReCTForVolumeClassification, "divided").build()
    assert multi.config.problem_type is None and multi.config.num_labels == 18
    labels = torch.zeros(2, 18)
    labels[0, 2] = 1
    out = multi(pixel_values, labels=labels)
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, labels))
    assert multi.config.problem_type == "multi_label_classification"

    single = ReCTForVolumeClassification(rect_config(id2label={0: "normal", 1: "abnormal", 2: "artefact"})).eval()
    targets = torch.tensor([2, 0])
    out = single(pixel_values, labels=targets)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, targets))
    assert single.config.problem_type == "single_label_classification"

    regression = ReCTForVolumeClassification(rect_config(num_labels=1)).eval()
    out = regression(pixel_values, labels=torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), torch.tensor([0.5, 2.0])))

    with pytest.raises(ValueError, match="multi-label `labels`"):
        multi(pixel_values, labels=torch.zeros(2, 3))


def test_classifier_pos_weight_scales_positive_terms():
    model = ReCTForVolumeClassification(rect_config(pos_weight=[3.0] * 18)).eval()
    labels = torch.ones(2, 18)
    out = model(make_batch(2)["pixel_values"], labels=labels)
    torch.testing.assert_close(out.loss, 3.0 * F.binary_cross_entropy_with_logits(out.logits, labels))
    with pytest.raises(StrictDataclassClassValidationError, match="pos_weight"):
        rect_config(pos_weight=[1.0, 2.0])


def test_classifier_lesion_token_loss_joins_the_loss_and_reloads(tmp_path):
    """`lesion_token_loss_weight` > 0 adds a token head; `lesion_tokens` (per patch token, per label) add its BCE,
    times the weight, to the classification loss; the head is saved and reloaded with the model."""
    model = ReCTForVolumeClassification(rect_config(lesion_token_loss_weight=0.5)).eval()
    inputs = {"pixel_values": make_batch(2)["pixel_values"]}
    labels = torch.tensor([[1.0, 0.0] * 9, [0.0, 1.0] * 9])
    tokens = torch.zeros(2, 64, 18)
    tokens[0, 5, 0] = tokens[1, 40:44, 1] = 1.0
    with torch.no_grad():
        out = model(**inputs, labels=labels, lesion_tokens=tokens)
        plain = model(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, out.classification_loss + 0.5 * out.lesion_token_loss)
    torch.testing.assert_close(out.classification_loss, plain.loss)
    torch.testing.assert_close(out.logits, plain.logits)  # the head never touches the prediction
    assert plain.lesion_token_loss is None and out.lesion_token_loss > 0
    with torch.no_grad():
        only_tokens = model(**inputs, lesion_tokens=tokens)
    torch.testing.assert_close(only_tokens.loss, 0.5 * out.lesion_token_loss)
    model.save_pretrained(tmp_path)
    reloaded = ReCTForVolumeClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs, lesion_tokens=tokens).lesion_token_loss, out.lesion_token_loss)
    with pytest.raises(ValueError, match=r"must be \(batch, num_patches, num_labels\) = \(2, 64, 18\)"):
        model(**inputs, lesion_tokens=tokens[:, :10])
    with pytest.raises(ValueError, match="lesion_token_loss_weight"):
        ReCTForVolumeClassification(rect_config())(**inputs, lesion_tokens=tokens)


def test_classifier_lesion_map_adds_its_maximum_to_the_logits_and_its_loss(tmp_path):
    """`lesion_map_channels` adds a decoder over the stem: its map (half the volume's size, one channel per label)
    adds each label's maximum to the head's logits; `lesion_maps` add its positively weighted per-voxel BCE, times
    the weight, to the loss; it reloads with the model; wrong shapes and missing stem features are named."""
    config = rect_config(stem_channels=(6,), lesion_map_channels=[8], lesion_map_loss_weight=0.5)
    model = ReCTForVolumeClassification(config).eval()
    pixel_values = make_batch(2)["pixel_values"]
    labels = torch.tensor([[1.0, 0.0] * 9, [0.0, 1.0] * 9])
    maps = torch.zeros(2, 18, 4, 16, 16)
    maps[0, 2, 1, 3:6, 4:7] = 1.0
    with torch.no_grad():
        out = model(pixel_values, labels=labels, lesion_maps=maps)
        vision = model.vision_model(pixel_values, output_stem_features=True)
    assert out.lesion_map_logits.shape == (2, 18, 4, 16, 16)
    assert vision.stem_features[0].shape == (2, 6, 4, 16, 16)
    head = model.classifier(pool_vision_features(vision, 1, config.classifier_pooling))
    torch.testing.assert_close(out.logits, head + out.lesion_map_logits.amax(dim=(2, 3, 4)))
    expected_map_loss = F.binary_cross_entropy_with_logits(
        out.lesion_map_logits, maps, pos_weight=torch.tensor(config.lesion_map_pos_weight)
    )
    torch.testing.assert_close(out.lesion_map_loss, expected_map_loss)
    torch.testing.assert_close(out.classification_loss, F.binary_cross_entropy_with_logits(out.logits, labels))
    torch.testing.assert_close(out.loss, out.classification_loss + 0.5 * out.lesion_map_loss)
    with torch.no_grad():
        reused = model(labels=labels, lesion_maps=maps, vision_outputs=vision)
    assert torch.equal(reused.logits, out.logits) and torch.equal(reused.loss, out.loss)
    model.save_pretrained(tmp_path)
    reloaded = ReCTForVolumeClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values).logits, out.logits)
    with pytest.raises(ValueError, match=r"`lesion_maps` must be .* = \(2, 18, 4, 16, 16\), got \(2, 18, 8, 32, 32\)"):
        model(pixel_values, lesion_maps=torch.zeros(2, 18, 8, 32, 32))
    with pytest.raises(ValueError, match="no `stem_features`"):
        model(vision_outputs=model.vision_model(pixel_values))
    with pytest.raises(ValueError, match="lesion_map_channels"):
        ReCTForVolumeClassification(rect_config())(pixel_values, lesion_maps=maps)
    with pytest.raises(StrictDataclassClassValidationError, match="at most one per stem convolution"):
        rect_config(stem_channels=(6,), lesion_map_channels=[8, 4])
    # Two stem convolutions: a stage per stem map gives cells of 2 voxels, one stage fewer cells of 4.
    vision = tiny_vision_kwargs(stem_channels=[4, 6], patch_size=[4, 8, 8])
    for widths, stride in (([8, 4], 2), ([8], 4)):
        config = ReCTConfig(vision_config=vision, text_config=None, lesion_map_channels=widths, lesion_map_depth=1)
        assert config.lesion_map_stride == stride
        output = ReCTForVolumeClassification(config).eval()(pixel_values)
        assert output.lesion_map_logits.shape == (2, 18, 8 // stride, 32 // stride, 32 // stride)


def test_classifier_reads_an_encoder_output_computed_elsewhere():
    """`vision_outputs` (a shared encoder's output for the same volumes, as the multitask composite passes) gives
    what encoding `pixel_values` gives; exactly one of the two is accepted."""
    model = ReCTForVolumeClassification(rect_config(lesion_token_loss_weight=0.5)).eval()
    pixel_values = make_batch(2)["pixel_values"]
    labels, tokens = torch.tensor([[1.0, 0.0] * 9, [0.0, 1.0] * 9]), torch.zeros(2, 64, 18)
    tokens[0, 5, 0] = 1.0
    with torch.no_grad():
        plain = model(pixel_values, labels=labels, lesion_tokens=tokens)
        vision = model.vision_model(pixel_values, output_hidden_states=True)
        reused = model(labels=labels, lesion_tokens=tokens, vision_outputs=vision)
    assert torch.equal(plain.logits, reused.logits) and torch.equal(plain.loss, reused.loss)
    with pytest.raises(ValueError, match="not both"):
        model(pixel_values, vision_outputs=vision)
    with pytest.raises(ValueError, match="not neither"):
        model(labels=labels)
    with pytest.raises(ValueError, match="`vision_outputs` has none"):
        model(lesion_tokens=tokens, vision_outputs=model.vision_model(pixel_values))
    other = ReCTForVolumeClassification(ReCTConfig(vision_config=tiny_vision_kwargs(hidden_size=48), text_config=None))
    with pytest.raises(
        ValueError, match=r"must be \(batch, tokens, hidden\) = \('\*', '\*', 32\) .* got \(2, 65, 48\)"
    ):
        model(vision_outputs=other.vision_model(pixel_values))


def test_position_embeddings_interpolate_to_other_volume_sizes():
    model = ModelCase(ReCTVisionModel, "divided").build()
    assert model(torch.rand(1, 1, 12, 48, 24)).last_hidden_state.shape == (1, 1 + 6 * 6 * 3, 32)
    with pytest.raises(ValueError, match="divisible by `patch_size`"):
        model(torch.rand(1, 1, 9, 32, 32))
    with pytest.raises(ValueError, match="channels"):
        model(torch.rand(1, 2, 8, 32, 32))


def test_bad_anatomy_masks_are_rejected():
    model = ModelCase(ReCTVisionModel, "divided").build()
    inputs = make_batch(2)
    pixel_values, mask = inputs["pixel_values"], inputs["anatomy_mask"]
    with pytest.raises(ValueError, match="0..5"):
        model(pixel_values, mask + 6)
    with pytest.raises(ValueError, match="spatial shape"):
        model(pixel_values, mask[..., :16])
    with pytest.raises(ValueError, match="integer region ids"):
        model(pixel_values, mask.float())


def test_vision_encoder_exports_with_torch_export():
    model = ModelCase(ReCTVisionModel, "divided").build()
    inputs = make_batch(2)
    args = (inputs["pixel_values"], inputs["anatomy_mask"])
    program = torch.export.export(model, args)
    exported = program.module()(*args)
    with torch.no_grad():
        eager = model(*args)
    torch.testing.assert_close(exported.last_hidden_state, eager.last_hidden_state)
    torch.testing.assert_close(exported.region_features, eager.region_features)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(volume_size=[10, 512, 512]), StrictDataclassClassValidationError, "divisible by `patch_size`"),
        (dict(volume_size=[64, 512]), ValueError, "volume_size"),
        (dict(patch_size=[4, 0, 16]), ValueError, "patch_size"),
        (dict(hidden_size=100, num_attention_heads=12), StrictDataclassClassValidationError, "num_attention_heads"),
        (dict(attention_type="axial"), StrictDataclassFieldValidationError, "attention_type"),
        (dict(num_hidden_layers=0), StrictDataclassFieldValidationError, "num_hidden_layers"),
        (dict(hidden_dropout_prob=1.5), StrictDataclassFieldValidationError, "hidden_dropout_prob"),
        (dict(region_patch_fraction=0.0), StrictDataclassFieldValidationError, "region_patch_fraction"),
        (dict(hidden_size="wide"), StrictDataclassFieldValidationError, "hidden_size"),
        (dict(stem_channels=[8, 8, 8]), StrictDataclassClassValidationError, r"2\*\*len\(`stem_channels`\) = 8"),
        (dict(stem_channels=[16, 0]), StrictDataclassClassValidationError, "positive channel counts"),
    ],
)
def test_vision_config_rejects_impossible_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        ReCTVisionConfig(**kwargs)


def test_config_assignment_is_validated_too():
    config = ReCTVisionConfig(**tiny_vision_kwargs())
    with pytest.raises(StrictDataclassFieldValidationError, match="attention_type"):
        config.attention_type = "axial"


def test_rect_config_defaults_round_trip_and_validation():
    config = rect_config()
    assert isinstance(config.vision_config, ReCTVisionConfig)
    assert config.text_config.model_type == "bert"
    assert config.problem_type is None
    assert config.label2id["Pleural effusion"] == 12
    with pytest.raises(StrictDataclassFieldValidationError, match="text_pooling"):
        ReCTConfig(text_pooling="max")
    with pytest.raises(StrictDataclassFieldValidationError, match="projection_dim"):
        ReCTConfig(projection_dim=0)
    reloaded = ReCTConfig.from_dict(config.to_dict())
    assert reloaded.vision_config.volume_size == [8, 32, 32]
    assert reloaded.to_dict() == config.to_dict()


# One volume on the CPU: the convolutions keep oneDNN (`ReCTConv3d`, `ReCTConvTranspose3d`).

ONE_VOLUME_CONVOLUTIONS = [  # (module kwargs, input shape): the stem, the decoders' blocks, gates and upsampling
    (dict(in_channels=4, out_channels=24, kernel_size=3, stride=2, padding=1, bias=False), (1, 4, 32, 64, 64)),
    (dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, bias=False), (1, 8, 32, 64, 64)),
    (dict(in_channels=8, out_channels=4, kernel_size=1), (1, 8, 32, 64, 64)),
    (dict(in_channels=48, out_channels=128, kernel_size=(1, 2, 2), stride=(1, 2, 2)), (1, 48, 8, 16, 16)),
]


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("kwargs, shape", ONE_VOLUME_CONVOLUTIONS, ids=["stem", "block", "gate", "patch"])
def test_one_volume_convolutions_match_torch_in_values_and_gradients(kwargs, shape, transposed):
    from hf_models.modeling_rect import ReCTConv3d, ReCTConvTranspose3d, _one_volume_runs_native_cpu_kernel

    ours_cls, torch_cls = (
        (ReCTConvTranspose3d, torch.nn.ConvTranspose3d) if transposed else (ReCTConv3d, torch.nn.Conv3d)
    )
    if transposed:  # an upsampling by the kernel's size, as the localizer's
        kwargs = {**kwargs, "padding": 0, "stride": kwargs["kernel_size"]}
    torch.manual_seed(0)
    ours = ours_cls(**kwargs)
    reference = torch_cls(**kwargs)
    reference.load_state_dict(ours.state_dict())
    volume = torch.randn(shape).contiguous(memory_format=torch.channels_last_3d)
    # The route is taken for these shapes (PyTorch would run its native kernel), on every thread count.
    assert _one_volume_runs_native_cpu_kernel(volume, ours.weight, ours.stride, ours.dilation, 1) or (
        kwargs["kernel_size"] == 1 and torch.get_num_threads() == 1
    )
    outputs, grads = [], []
    for module in (ours, reference):
        x = volume.clone().requires_grad_()
        y = module(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outputs.append(y)
        grads.append([x.grad, *(p.grad for p in module.parameters())])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_one_volume_route_follows_pytorchs_own_choice_of_kernel():
    """`_one_volume_runs_native_cpu_kernel` is PyTorch's rule: true exactly where one volume gets the native kernel
    and two get oneDNN (its backend choice, read through `torch._C._select_conv_backend`)."""
    from hf_models.modeling_rect import _one_volume_runs_native_cpu_kernel

    select = getattr(torch._C, "_select_conv_backend", None)
    if select is None:
        pytest.skip("this torch does not expose its convolution backend choice")
    threads = torch.get_num_threads()
    try:
        for channels, depth, height, kernel, threads_now, transposed in [
            (c, d, h, k, t, tr) for c in (4, 8, 64, 128) for d in (8, 32) for h in (16, 64, 200)
            for k in (1, 2, 3, 4) for t in (1, 2) for tr in (False, True)
        ]:  # fmt: skip
            torch.set_num_threads(threads_now)
            stride = kernel if transposed else 1
            weight = torch.randn(*((channels, 8) if transposed else (8, channels)), *(kernel,) * 3)

            args = ([stride] * 3, [0] * 3, [1] * 3, transposed, [0] * 3, 1, None)
            native = [
                "Slow" in str(select(torch.empty(n, channels, depth, height, 8), weight, None, *args)) for n in (1, 2)
            ]
            expected = native[0] and not native[1]
            volume = torch.empty(1, channels, depth, height, 8)
            assert _one_volume_runs_native_cpu_kernel(volume, weight, (stride,) * 3, (1,) * 3, 1) == expected, (
                channels, depth, height, kernel, threads_now, transposed,
            )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
