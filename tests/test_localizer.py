"""ReCTForLesionLocalization: prompt combinations, input checks, loss policy, freezing, save/reload and a fresh-process
Hub load."""

import json
import textwrap

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

import hf_models.modeling_localizer_rect as localizer_module
from hf_models import (
    ReCTConfig,
    ReCTForLesionLocalization,
    ReCTForVolumeClassification,
    ReCTImageProcessor,
    ReCTLocalizerConfig,
    ReCTModel,
    ReCTProcessor,
)
from hf_models.modeling_localizer_rect import (
    NUM_DENSE_PROMPTS,
    decoder_scales,
    default_skip_layers,
    linear_resize,
    linear_resize_matrix,
    sigmoid_focal_loss,
    soft_dice_loss,
)
from tests.conftest import tiny_text_kwargs, tiny_vision_kwargs
from tests.test_real_ct import NIFTI_CT, REAL_CT, SERIES
from trainers.fresh_process import run_without_project


SPATIAL = (8, 32, 32)  # tiny_vision_kwargs: patch (2, 8, 8) → grid (4, 4, 4); three decoder stages


def localizer_config(**localizer) -> ReCTConfig:
    loc = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, decoder_channels=[16, 8])
    loc.update(localizer)
    return ReCTConfig(vision_config=tiny_vision_kwargs(), text_config=tiny_text_kwargs(), localizer_config=loc)


def build(seed: int = 0, **localizer) -> ReCTForLesionLocalization:
    torch.manual_seed(seed)
    return ReCTForLesionLocalization(localizer_config(**localizer)).eval()


def prompts(batch: int = 2, num_text: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 2000, (batch, num_text, 6), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[:, -1, 4:] = 0
    points = torch.tensor([[3.0, 10, 10], [0, 0, 0], [7, 31, 31]]).expand(batch, -1, -1).clone()
    labels = torch.tensor([1, -1, 0]).expand(batch, -1).clone()
    boxes = torch.tensor([1.0, 2, 3, 5, 20, 21]).expand(batch, -1).clone()
    return {
        "pixel_values": torch.rand(batch, 1, *SPATIAL, generator=g),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "input_points": points,
        "input_labels": labels,
        "input_boxes": boxes,
    }


COMBINATIONS = {
    "text": ("input_ids", "attention_mask"),
    "points": ("input_points", "input_labels"),
    "box": ("input_boxes",),
    "text+points": ("input_ids", "attention_mask", "input_points", "input_labels"),
    "text+box": ("input_ids", "attention_mask", "input_boxes"),
    "points+box": ("input_points", "input_labels", "input_boxes"),
    "all": ("input_ids", "attention_mask", "input_points", "input_labels", "input_boxes"),
}


@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_every_prompt_combination_gives_one_mask_per_prompt(combination):
    model = build()
    data = prompts()
    inputs = {"pixel_values": data["pixel_values"], **{k: data[k] for k in COMBINATIONS[combination]}}
    with torch.no_grad():
        out = model(**inputs)
    k = 3 if "input_ids" in inputs else 1
    assert out.pred_masks.shape == (2, k, *SPATIAL)
    assert out.iou_scores.shape == (2, k)
    assert torch.isfinite(out.pred_masks).all()
    assert ((out.iou_scores >= 0) & (out.iou_scores <= 1)).all()
    assert out.loss is None


def test_a_single_text_prompt_per_volume_is_k_1():
    data = prompts(num_text=1)
    with torch.no_grad():
        flat = build()(pixel_values=data["pixel_values"], input_ids=data["input_ids"][:, 0])
        nested = build()(pixel_values=data["pixel_values"], input_ids=data["input_ids"])
    assert flat.pred_masks.shape == (2, 1, *SPATIAL)
    torch.testing.assert_close(flat.pred_masks, nested.pred_masks)


def test_prompts_change_the_mask_and_padding_points_do_not():
    model = build()
    data = prompts()
    with torch.no_grad():
        box = model(pixel_values=data["pixel_values"], input_boxes=data["input_boxes"]).pred_masks
        other = model(pixel_values=data["pixel_values"], input_boxes=torch.tensor([[0.0, 0, 0, 7, 31, 31]] * 2))
        points = data["input_points"].clone()
        base = model(pixel_values=data["pixel_values"], input_points=points, input_labels=data["input_labels"])
        points[:, 1] = torch.tensor([6.0, 20, 5])  # the padding point (label -1) moves
        moved = model(pixel_values=data["pixel_values"], input_points=points, input_labels=data["input_labels"])
    assert not torch.allclose(box, other.pred_masks)
    torch.testing.assert_close(base.pred_masks, moved.pred_masks)


def test_batch_independence():
    model = build()
    data = prompts(batch=3)
    with torch.no_grad():
        full = model(**data)
        single = model(**{k: v[1:2] for k, v in data.items()})
    torch.testing.assert_close(full.pred_masks[1:2], single.pred_masks, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(full.iou_scores[1:2], single.iou_scores, atol=1e-5, rtol=1e-4)


def test_no_prompt_is_refused():
    with pytest.raises(ValueError, match="at least one prompt"):
        build()(pixel_values=torch.rand(1, 1, *SPATIAL))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(input_points=torch.tensor([[[3.0, 10, 32]]]), input_labels=torch.tensor([[1]])), "inside the processed"),
        (
            dict(input_points=torch.tensor([[[-1.0, 10, 10]]]), input_labels=torch.tensor([[0]])),
            "inside the processed",
        ),
        (dict(input_points=torch.tensor([[[3.0, 10, 10]]]), input_labels=None), "input_labels"),
        (dict(input_points=torch.tensor([[3.0, 10, 10]]), input_labels=torch.tensor([[1]])), r"\(batch, P, 3\)"),
        (dict(input_points=torch.tensor([[[3.0, 10, 10]]]), input_labels=torch.tensor([[2]])), "1 \\(positive\\)"),
        (dict(input_boxes=torch.tensor([[0.0, 0, 0, 8, 31, 31]])), "inside the processed volume"),
        (dict(input_boxes=torch.tensor([[5.0, 0, 0, 2, 31, 31]])), "z0 <= z1"),
        (dict(input_boxes=torch.tensor([[0.0, 0, 0, 7, 31]])), r"\(batch, 6\)"),
        (dict(input_ids=torch.ones(2, 5, dtype=torch.long)), "input_ids"),
    ],
)
def test_bad_prompts_get_specific_errors(change, match):
    with pytest.raises(ValueError, match=match):
        build()(pixel_values=torch.rand(1, 1, *SPATIAL), **change)


def test_out_of_range_padding_points_are_ignored():
    out = build()(
        pixel_values=torch.rand(1, 1, *SPATIAL),
        input_points=torch.tensor([[[3.0, 10, 10], [-5.0, 99, 99]]]),
        input_labels=torch.tensor([[1, -1]]),
    )
    assert out.pred_masks.shape == (1, 1, *SPATIAL)


def test_loss_terms_and_empty_target_policy():
    model = build()
    data = prompts(batch=2, num_text=2)
    labels = torch.zeros(2, 2, *SPATIAL)
    labels[0, 0, 2:5, 8:16, 8:16] = 1
    out = model(**data, labels=labels)
    for name in ("loss", "dice_loss", "focal_loss", "iou_loss"):
        assert torch.isfinite(getattr(out, name)), name
    loc = model.config.localizer_config
    expected = loc.dice_weight * out.dice_loss + loc.focal_weight * out.focal_loss + loc.iou_weight * out.iou_loss
    torch.testing.assert_close(out.loss, expected)

    # Dice is taken over non-empty targets only; an all-empty batch gives 0 (attached), never NaN.
    empty = torch.zeros(3, 100)
    logits = torch.randn(3, 100, requires_grad=True)
    dice = soft_dice_loss(logits, empty)
    assert dice.item() == 0.0 and dice.requires_grad
    # A non-empty target is not satisfied by predicting nothing (Dice loss ≈ 1) ...
    target = torch.zeros(1, 100)
    target[0, :10] = 1
    assert soft_dice_loss(torch.full((1, 100), -20.0), target).item() > 0.99
    # ... and on an empty target the total loss prefers predicting nothing to predicting everything (focal term).
    nothing = model.localization_loss(
        torch.full((1, 1, *SPATIAL), -8.0), torch.zeros(1, 1), torch.zeros(1, 1, *SPATIAL)
    )
    everything = model.localization_loss(
        torch.full((1, 1, *SPATIAL), 8.0), torch.zeros(1, 1), torch.zeros(1, 1, *SPATIAL)
    )
    assert sum(t.item() for t in nothing) < sum(t.item() for t in everything)


def test_deep_supervision_adds_the_coarser_masks_losses_against_averaged_targets():
    data = prompts(batch=2, num_text=2)
    labels = torch.zeros(2, 2, *SPATIAL)
    labels[0, 0, 2:5, 8:16, 8:16] = 1
    labels[1, 1, 0:8, 0:13, 20:32] = 1  # not aligned with the coarse grids: fractions there
    plain = build()(**data, labels=labels)
    model = build(deep_supervision_weight=0.5)
    supervised = model(**data, labels=labels)
    assert plain.deep_supervision_loss is None
    torch.testing.assert_close(supervised.pred_masks, plain.pred_masks)  # the forward pass is the same
    assert torch.isfinite(supervised.deep_supervision_loss) and supervised.deep_supervision_loss > 0
    torch.testing.assert_close(supervised.loss, plain.loss + supervised.deep_supervision_loss)

    # Against the formula: the finest coarser mask weighted 0.5, the next 0.25; targets are the fraction of each coarse
    # voxel's fine voxels in the target (averaged by reshaping here).
    def fraction(target, size):
        factors = [n // s for n, s in zip(target.shape[2:], size)]
        shape = (*target.shape[:2], *(x for s, f in zip(size, factors) for x in (s, f)))
        return target.reshape(shape).mean(dim=(3, 5, 7))

    coarse, finer = torch.randn(2, 2, 4, 4, 4), torch.randn(2, 2, 8, 16, 16)
    expected = sum(
        weight * (dice + focal)
        for weight, masks in ((0.25, coarse), (0.5, finer))
        for dice, focal in [model._mask_losses(masks, fraction(labels, masks.shape[2:]))]
    )
    torch.testing.assert_close(model.deep_supervision_loss([coarse, finer], labels), expected)
    partial = fraction(labels, (4, 4, 4))[1, 1]
    assert ((partial > 0) & (partial < 1)).any()  # the second target's edges are fractions on the coarse grid


def test_balanced_focal_reduction_keeps_a_small_missed_target_in_the_loss():
    # Two masks of 1,000 voxels: a 10-voxel target predicted confidently absent (logit −12 there), and an empty target
    # predicted well. Averaged over every voxel the miss is a rounding error; balanced, it is alpha × its own loss.
    logits = torch.full((2, 1000), -6.0)
    targets = torch.zeros(2, 1000)
    targets[0, :10] = 1
    logits[0, :10] = -12.0
    mean = sigmoid_focal_loss(logits, targets, 0.25, 2.0)
    balanced = sigmoid_focal_loss(logits, targets, 0.25, 2.0, reduction="balanced")
    focal = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    focal = focal * (1 - torch.where(targets > 0, logits.sigmoid(), 1 - logits.sigmoid())) ** 2
    inside = focal[0, :10].mean()
    outside = torch.stack([focal[0, 10:].mean(), focal[1].mean()])
    torch.testing.assert_close(balanced, (0.25 * inside + 0.75 * outside[0] + 0.75 * outside[1]) / 2)
    assert balanced.item() > 1.0 and balanced.item() > 50 * mean.item()
    # The gradient on the missed voxels does not vanish with the sigmoid: a tenth of alpha per voxel, per mask pair.
    logits.requires_grad_(True)
    sigmoid_focal_loss(logits, targets, 0.25, 2.0, reduction="balanced").backward()
    assert (logits.grad[0, :10] < -0.25 / 10 / 2 * 0.99).all()
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'balanced'"):
        sigmoid_focal_loss(logits, targets, 0.25, 2.0, reduction="sum")
    # The config chooses it (and refuses other values); the model's focal term follows it.
    model = build(focal_reduction="balanced")
    labels = torch.zeros(1, 1, *SPATIAL)
    labels[0, 0, 2:4, 8:12, 8:12] = 1
    with torch.no_grad():
        out = model(**prompts(batch=1, num_text=1), labels=labels)
    loc = model.config.localizer_config
    assert loc.focal_alpha == 0.05  # the default that suits the balanced reduction
    expected = sigmoid_focal_loss(out.pred_masks.flatten(2).flatten(0, 1), labels.flatten(2).flatten(0, 1),
                                  loc.focal_alpha, loc.focal_gamma, reduction="balanced")  # fmt: skip
    torch.testing.assert_close(out.focal_loss, expected)
    with pytest.raises(Exception, match="focal_reduction"):
        ReCTLocalizerConfig(focal_reduction="sum")


def test_labels_of_the_wrong_shape_are_refused():
    data = prompts(batch=1, num_text=2)
    with pytest.raises(ValueError, match=r"one mask per prompt"):
        build()(**data, labels=torch.zeros(1, 1, *SPATIAL))


def test_freeze_encoder_sends_gradients_to_the_prompt_fusion_and_decoder_only():
    model = build().train()
    model.freeze_encoder()
    data = prompts(batch=1, num_text=1)
    labels = torch.zeros(1, 1, *SPATIAL)
    labels[0, 0, 2:5, 8:16, 8:16] = 1
    model(**data, labels=labels).loss.backward()
    for name, param in model.named_parameters():
        frozen = name.startswith(("vision_model.", "text_model."))
        assert param.requires_grad is not frozen, name
        if frozen:
            assert param.grad is None, name
        elif not name.startswith("point_embeddings"):  # both point labels occur; checked below
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert model.point_embeddings.weight.grad is not None


@pytest.mark.parametrize("combination", ["text", "points", "box"])
def test_every_parameter_gets_a_gradient_whatever_the_prompts(combination):
    """Absent point and box prompts are masked padding tokens, not skipped layers: each weight takes part in every
    step, as DDP (`find_unused_parameters=False`) and DeepSpeed ZeRO-3 (processes with different prompt kinds
    gather the same weights) need."""
    model = build().train()
    inputs = prompts(batch=2, num_text=2)
    chosen = {k: inputs[k] for k in ("pixel_values", *COMBINATIONS[combination])}
    k = 2 if combination == "text" else 1
    model(**chosen, labels=(torch.rand(2, k, *SPATIAL) > 0.7).float()).loss.backward()
    text_used = combination == "text"
    missing = [n for n, p in model.named_parameters() if p.grad is None and (text_used or "text" not in n)]
    assert missing == []


def test_k_prompts_together_get_the_masks_they_get_alone():
    """The decoder runs once per volume and each prompt only steers it: asking K prompts of a volume at once gives
    each the mask (and IoU) it gets when asked alone, whatever the other prompts are."""
    model = build()
    inputs = prompts(batch=2, num_text=3)
    together = model(**inputs)
    for k in range(3):
        alone = model(**dict(inputs, input_ids=inputs["input_ids"][:, k : k + 1],
                             attention_mask=inputs["attention_mask"][:, k : k + 1]))  # fmt: skip
        torch.testing.assert_close(alone.pred_masks[:, 0], together.pred_masks[:, k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone.iou_scores[:, 0], together.iou_scores[:, k], atol=1e-5, rtol=1e-5)


def test_precomputed_image_embeddings_give_the_same_masks_and_are_checked():
    """`get_image_embeddings` once, then any prompts through `vision_outputs`: the masks, scores and loss of a plain
    forward, without encoding again; embeddings without hidden states or of other volumes are refused."""
    model = build()
    inputs = prompts(batch=2, num_text=3)
    labels = (torch.rand(2, 3, *SPATIAL) > 0.7).float()
    embeddings = model.get_image_embeddings(inputs["pixel_values"])
    assert embeddings.hidden_states is not None and not embeddings.last_hidden_state.requires_grad
    for combination in ("text", "box", "all"):
        chosen = {k: inputs[k] for k in ("pixel_values", *COMBINATIONS[combination])}
        k = 3 if "input_ids" in chosen else 1
        plain = model(**chosen, labels=labels[:, :k])
        reused = model(**chosen, labels=labels[:, :k], vision_outputs=embeddings)
        assert torch.equal(plain.pred_masks, reused.pred_masks) and torch.equal(plain.iou_scores, reused.iou_scores)
        assert torch.equal(plain.loss, reused.loss)
    with pytest.raises(ValueError, match="no `hidden_states`.*get_image_embeddings"):
        model(**inputs, vision_outputs=model.vision_model(inputs["pixel_values"]))
    with pytest.raises(ValueError, match=r"must be \(batch, tokens, hidden\) = \(1, 65, 32\).*got \(2, 65, 32\)"):
        single = {k: v[:1] for k, v in inputs.items()}
        model(**single, vision_outputs=embeddings)


def test_dense_prompt_maps_hold_the_box_and_the_points_by_label():
    model = build()
    spatial, batch = SPATIAL, 2
    boxes = torch.tensor([[1.0, 2, 3, 5, 20, 21], [0, 0, 0, 7, 31, 31]])
    points = torch.tensor([[[3.0, 10, 10], [6, 25, 5], [0, 0, 0]], [[2.0, 3, 4], [0, 0, 0], [0, 0, 0]]])
    labels = torch.tensor([[1, 0, -10], [0, -1, -1]])
    dense = model._dense_prompts(batch, spatial, points, labels, boxes, torch.float32, torch.device("cpu"))
    assert dense.shape == (batch, NUM_DENSE_PROMPTS, *spatial)
    inside = torch.zeros(spatial, dtype=torch.bool)
    inside[1:6, 2:21, 3:22] = True
    assert torch.equal(dense[0, 0], inside.float() * 2 - 1) and (dense[1, 0] == 1).all()
    assert dense[0, 1, 3, 10, 10] == 1 and dense[0, 1].argmax() == 3 * 32 * 32 + 10 * 32 + 10  # positive point
    assert dense[0, 2, 6, 25, 5] == 1 and dense[0, 2, 3, 10, 10] < 1e-6  # negative point, in its own map
    assert dense[0, 1, 0, 0, 0] < 1e-6 and dense[0, 2, 0, 0, 0] < 1e-6  # the padding point adds nothing
    assert (dense[1, 1] == 0).all() and dense[1, 2, 2, 3, 4] == 1
    assert dense[0, 1, 3, 10, 12] == pytest.approx(np.exp(-4 / (2 * 2.0**2)))  # σ = point_sigma (2 voxels)
    none = model._dense_prompts(batch, spatial, None, None, None, torch.float32, torch.device("cpu"))
    assert (none == 0).all()


def test_a_roi_box_cuts_the_text_prompts_masks_to_it_and_steers_nothing_else():
    """`box_prompt="roi"` (the default): beside text prompts, the box leaves each prompt's mask (and IoU) as it is
    without a box inside the box, corners included, and sets `OUTSIDE_BOX_LOGIT` outside; a box in another volume
    of the batch cuts only that volume's masks."""
    model = build()
    assert model.config.localizer_config.box_prompt == "roi"
    data = prompts(batch=2, num_text=3)
    data["input_boxes"] = torch.tensor([[1.0, 2, 3, 5, 20, 21], [0, 0, 0, 7, 31, 31]])
    text = {k: data[k] for k in ("pixel_values", *COMBINATIONS["text"])}
    with torch.no_grad():
        plain = model(**text)
        boxed = model(**text, input_boxes=data["input_boxes"])
    inside = torch.zeros(SPATIAL, dtype=torch.bool)
    inside[1:6, 2:21, 3:22] = True
    for k in range(3):
        torch.testing.assert_close(boxed.pred_masks[0, k][inside], plain.pred_masks[0, k][inside], atol=0, rtol=0)
        assert (boxed.pred_masks[0, k][~inside] == localizer_module.OUTSIDE_BOX_LOGIT).all()
    torch.testing.assert_close(boxed.pred_masks[1], plain.pred_masks[1], atol=0, rtol=0)  # the whole volume
    torch.testing.assert_close(boxed.iou_scores, plain.iou_scores, atol=0, rtol=0)
    # The cut's value is exact in half precision, where post-processing must still recognise it.
    for dtype in (torch.bfloat16, torch.float16):
        assert (
            torch.tensor(localizer_module.OUTSIDE_BOX_LOGIT, dtype=dtype).item() == localizer_module.OUTSIDE_BOX_LOGIT
        )
    # A fractional box keeps the voxels whose indices lie within it.
    with torch.no_grad():
        fractional = model(**text, input_boxes=torch.tensor([[0.5, 2.0, 2.5, 5.5, 20.9, 21.0]] * 2)).pred_masks
    assert torch.equal(fractional[0] > localizer_module.OUTSIDE_BOX_LOGIT, inside.expand(3, -1, -1, -1))


def test_a_box_without_text_steers_the_mask_and_roi_cuts_it_too():
    """Without text the box steers the mask in both modes (the same weights give the same logits inside the box);
    `"roi"` cuts the mask to the box, `"dense"` does not. With `"dense"` a box beside text changes the masks inside
    it too (it is a prompt token and a dense map)."""
    roi, dense = build(), build(box_prompt="dense")
    dense.load_state_dict(roi.state_dict())
    data = prompts(batch=2, num_text=3)
    box = {k: data[k] for k in ("pixel_values", "input_boxes")}
    with torch.no_grad():
        cut, uncut = roi(**box).pred_masks, dense(**box).pred_masks
        text = {k: data[k] for k in ("pixel_values", *COMBINATIONS["text"])}
        dense_text, dense_boxed = dense(**text).pred_masks, dense(**text, input_boxes=data["input_boxes"]).pred_masks
    inside = localizer_module.ReCTForLesionLocalization._inside_boxes(data["input_boxes"], SPATIAL).unsqueeze(1)
    assert torch.equal(cut[inside], uncut[inside])
    assert (cut[~inside] == localizer_module.OUTSIDE_BOX_LOGIT).all()
    assert (uncut[~inside] != localizer_module.OUTSIDE_BOX_LOGIT).all()
    assert not torch.allclose(dense_text[inside.expand_as(dense_text)], dense_boxed[inside.expand_as(dense_boxed)])


def test_a_target_outside_its_roi_box_keeps_the_loss_finite():
    """Voxels of a target outside its box can never be predicted: the loss stays finite there and sends no
    gradient through them, and the mask inside the box still learns."""
    model = build().train()
    data = prompts(batch=1, num_text=1)
    labels = torch.zeros(1, 1, *SPATIAL)
    labels[0, 0, 0:4, 0:16, 0:16] = 1  # partly outside the box (1, 2, 3)–(5, 20, 21)
    out = model(**{k: data[k] for k in ("pixel_values", *COMBINATIONS["text+box"])}, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.mask_embedding[-1].weight.grad.abs().sum() > 0


def test_box_prompt_mode_is_validated_and_saved(tmp_path):
    with pytest.raises(Exception, match="box_prompt"):
        ReCTLocalizerConfig(box_prompt="crop")
    model = build(box_prompt="dense")
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["localizer_config"]["box_prompt"] == "dense"
    assert ReCTForLesionLocalization.from_pretrained(tmp_path).config.localizer_config.box_prompt == "dense"


@pytest.mark.parametrize("sizes", [((4, 4, 4), (8, 32, 32)), ((8, 4, 4), (32, 64, 64)), ((3, 5, 2), (7, 11, 2))])
def test_separable_resize_is_trilinear_interpolation(sizes):
    grid, spatial = sizes
    coarse = torch.randn(3, *grid, dtype=torch.float64)
    expected = F.interpolate(coarse[:, None], size=spatial, mode="trilinear", align_corners=False)[:, 0]
    resized = torch.einsum(
        "mabc,za,yb,xc->mzyx", coarse, *[linear_resize_matrix(g, s, torch.float64) for g, s in zip(grid, spatial)]
    )
    torch.testing.assert_close(resized, expected)
    torch.testing.assert_close(linear_resize(coarse, spatial), expected)


def test_decoder_layout_follows_the_config():
    assert decoder_scales((4, 16, 16)) == [(2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2)]
    with pytest.raises(ValueError, match=r"must be a power of two, got \(2, 6, 8\)"):
        decoder_scales((2, 6, 8))  # the ×2 stages would never reach a side of 6: refused, not a shape error later
    odd = tiny_vision_kwargs(patch_size=[2, 6, 8], volume_size=[8, 36, 32])
    with pytest.raises(ValueError, match="power of two"):
        ReCTForLesionLocalization(ReCTConfig(vision_config=odd, text_config=tiny_text_kwargs()))
    assert default_skip_layers(12, 3) == [9, 6, 3]
    model = build()
    assert model.skip_layers == [1, 1]  # 2-layer encoder, two skips; the last stage reads the input volume
    custom = build(skip_layers=[2, 0])
    assert custom.skip_layers == [2, 0]
    with pytest.raises(ValueError, match="must name 2 encoder layer"):
        build(skip_layers=[1])
    with pytest.raises(Exception, match="skip_layers"):
        localizer_config(skip_layers=[3, 1])


def test_localizer_config_defaults_are_stored():
    config = ReCTConfig(vision_config=tiny_vision_kwargs(), text_config=tiny_text_kwargs())
    assert config.localizer_config is None
    model = ReCTForLesionLocalization(config)
    assert isinstance(model.config.localizer_config, ReCTLocalizerConfig)
    assert model.config.to_dict()["localizer_config"]["decoder_channels"] == [64, 32, 16, 16]


def test_starts_from_a_contrastive_model_folder(tmp_path):
    torch.manual_seed(3)
    dual = ReCTModel(ReCTConfig(vision_config=tiny_vision_kwargs(), text_config=tiny_text_kwargs()))
    dual.save_pretrained(tmp_path / "dual")
    model = ReCTForLesionLocalization.from_pretrained(
        tmp_path / "dual", localizer_config=localizer_config().localizer_config
    )
    dual_state = dual.state_dict()
    fresh = build(seed=4).state_dict()
    for name, value in model.state_dict().items():
        if name.startswith(("vision_model.", "text_model.")) and name in dual_state:
            torch.testing.assert_close(value, dual_state[name], atol=0, rtol=0, msg=name)
        elif value.is_floating_point() and value.numel() >= 64:
            # new parts are initialised as in a new model (loading builds them empty: every kind of layer must be
            # covered by `_init_weights`, or it keeps whatever the memory held)
            assert torch.isfinite(value).all(), name
            assert 0.5 <= (value.std() + 1e-6) / (fresh[name].std() + 1e-6) <= 2, name
    assert type(model.config.localizer_config) is ReCTLocalizerConfig


def test_starts_from_a_classifier_folder(tmp_path):
    # The demo's localizer starts from the classifier it just trained: its encoder loads, its heads are left out.
    torch.manual_seed(5)
    config = localizer_config()
    classifier = ReCTForVolumeClassification(
        ReCTConfig(vision_config=tiny_vision_kwargs(), text_config=tiny_text_kwargs(), num_labels=3)
    )
    classifier.save_pretrained(tmp_path / "classifier")
    model, info = ReCTForLesionLocalization.from_pretrained(
        tmp_path / "classifier", config=config, output_loading_info=True
    )
    vision = classifier.vision_model.state_dict()
    loaded = {
        k.removeprefix("vision_model."): v for k, v in model.state_dict().items() if k.startswith("vision_model.")
    }
    assert loaded.keys() <= vision.keys()
    for name, value in loaded.items():
        torch.testing.assert_close(value, vision[name], atol=0, rtol=0, msg=name)
    assert {k for k in info["unexpected_keys"] if not k.startswith("vision_model.")} == {
        k for k in classifier.state_dict() if k.startswith("classifier")
    }
    assert not any(k.startswith("vision_model.") for k in info["missing_keys"])


def test_decoder_memory_format_changes_only_rounding(monkeypatch):
    # Channels-last is a speed choice (`DECODER_MEMORY_FORMAT`): masks, loss and gradients match the default layout.
    data = prompts(batch=2)
    labels = (torch.rand(2, 3, *SPATIAL, generator=torch.Generator().manual_seed(1)) > 0.8).float()
    results = {}
    for layout in (torch.channels_last_3d, torch.contiguous_format):
        monkeypatch.setattr(localizer_module, "DECODER_MEMORY_FORMAT", layout)
        model = build().train()
        out = model(**data, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[layout] = (out.pred_masks.detach(), out.loss.detach(), grads)
    (masks_a, loss_a, grads_a), (masks_b, loss_b, grads_b) = results.values()
    torch.testing.assert_close(masks_a, masks_b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-3, msg=name)


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from transformers import AutoModel, AutoModelForMaskGeneration

    root = Path(sys.argv[1])
    inputs = torch.load(root / "inputs.pt")
    model = AutoModel.from_pretrained(root / "localizer", trust_remote_code=True).eval()
    mask_model = AutoModelForMaskGeneration.from_pretrained(root / "localizer", trust_remote_code=True).eval()
    with torch.no_grad():
        results = {"auto": model(**inputs).pred_masks, "mask_generation": mask_model(**inputs).pred_masks}
    torch.save(results, root / "results.pt")
    modules = sorted(m for m in sys.modules if m.split(".")[0] in ("hf_models", "trainers", "tests"))
    (root / "classes.json").write_text(json.dumps({
        "auto": type(model).__name__, "mask_generation": type(mask_model).__name__, "project_modules": modules}))
    """
)


def test_save_reload_and_fresh_process_auto_load(tmp_path):
    model = build()
    data = prompts(batch=1, num_text=2)
    with torch.no_grad():
        expected = model(**data).pred_masks
    model.save_pretrained(tmp_path / "localizer")
    saved = json.loads((tmp_path / "localizer" / "config.json").read_text())
    assert saved["auto_map"]["AutoModel"] == "modeling_localizer_rect.ReCTForLesionLocalization"
    assert saved["auto_map"]["AutoModelForMaskGeneration"] == "modeling_localizer_rect.ReCTForLesionLocalization"
    assert {p.name for p in (tmp_path / "localizer").glob("*.py")} >= {
        "modeling_localizer_rect.py",
        "modeling_rect.py",
        "configuration_rect.py",
    }
    reloaded = ReCTForLesionLocalization.from_pretrained(tmp_path / "localizer").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**data).pred_masks, expected, atol=0, rtol=0)

    torch.save(data, tmp_path / "inputs.pt")
    proc = run_without_project(
        FRESH_PROCESS_SCRIPT, tmp_path, cwd=tmp_path, timeout=300, env={"HF_MODULES_CACHE": str(tmp_path / "mods")}
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "classes.json").read_text())
    assert report == {"auto": "ReCTForLesionLocalization", "mask_generation": "ReCTForLesionLocalization",
                      "project_modules": []}  # fmt: skip
    results = torch.load(tmp_path / "results.pt")
    for name in ("auto", "mask_generation"):
        torch.testing.assert_close(results[name], expected, atol=0, rtol=0, msg=name)


def fit(model, optimizer, sample, prompt: str, steps: int) -> None:
    """`steps` optimizer steps on batches `sample(generator)` → (volumes, masks, prompts), the prompts passed as the
    `prompt` keyword (`input_boxes`, `input_ids`), from a generator seeded 1."""
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        volumes, masks, prompts = sample(generator)
        loss = model(pixel_values=volumes, labels=masks, **{prompt: prompts}).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_learns_a_box_prompted_blob():
    """Seed-fixed and small: 60 steps on random volumes with a bright cube and its box prompt (`"dense"`, whose
    masks are not cut to the box, so the box alone must be learned); the Dice of the thresholded mask on new volumes
    rises from near 0 to well above it."""
    torch.manual_seed(0)
    model = build(box_prompt="dense").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def sample(generator, batch=4):
        volumes = torch.rand(batch, 1, *SPATIAL, generator=generator) * 0.2
        masks = torch.zeros(batch, 1, *SPATIAL)
        boxes = []
        for b in range(batch):
            z, y, x = (int(torch.randint(0, s - e, (1,), generator=generator)) for s, e in zip(SPATIAL, (3, 8, 8)))
            volumes[b, 0, z : z + 3, y : y + 8, x : x + 8] += 0.8
            masks[b, 0, z : z + 3, y : y + 8, x : x + 8] = 1
            boxes.append([z, y, x, z + 2, y + 7, x + 7])
        return volumes, masks, torch.tensor(boxes, dtype=torch.float32)

    def dice(generator):
        volumes, masks, boxes = sample(generator, 8)
        with torch.no_grad():
            predicted = (model.eval()(pixel_values=volumes, input_boxes=boxes).pred_masks > 0).float()
        model.train()
        return (2 * (predicted * masks).sum() / (predicted.sum() + masks.sum())).item()

    before = dice(torch.Generator().manual_seed(99))
    fit(model, optimizer, sample, "input_boxes", steps=60)
    after = dice(torch.Generator().manual_seed(99))
    assert after > 0.6 and after > before + 0.3, (before, after)


def test_learns_to_segment_what_the_text_prompt_names():
    """Seed-fixed and small, the text-prompt counterpart of the box test above: volumes hold a bright cube and a
    dimmer slab at random places; the prompts name one or the other (fixed token ids standing for "cube" and "slab"),
    K = 2 per volume. After 80 steps the thresholded masks of new volumes match what each prompt names (Dice well
    above the untrained model's)."""
    torch.manual_seed(0)
    model = build().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    names = torch.tensor([[101, 2001, 102], [101, 2002, 102]])  # "cube", "slab"

    def sample(generator, batch=4):
        volumes = torch.rand(batch, 1, *SPATIAL, generator=generator) * 0.2
        masks = torch.zeros(batch, 2, *SPATIAL)
        for b in range(batch):
            z, y, x = (int(torch.randint(0, s - e, (1,), generator=generator)) for s, e in zip(SPATIAL, (3, 8, 8)))
            volumes[b, 0, z : z + 3, y : y + 8, x : x + 8] += 0.8
            masks[b, 0, z : z + 3, y : y + 8, x : x + 8] = 1
            free = [d for d in range(SPATIAL[0] - 1) if not z - 2 <= d <= z + 3]
            d = free[int(torch.randint(0, len(free), (1,), generator=generator))]
            slab = torch.zeros(SPATIAL, dtype=torch.bool)
            slab[d : d + 2, 4:28, 4:28] = True
            slab &= masks[b, 0] == 0
            volumes[b, 0][slab] += 0.4
            masks[b, 1][slab] = 1
        return volumes, masks, names.expand(batch, -1, -1)

    def dice(generator):
        volumes, masks, ids = sample(generator, 8)
        with torch.no_grad():
            predicted = (model.eval()(pixel_values=volumes, input_ids=ids).pred_masks > 0).float()
        model.train()
        return [(2 * (predicted[:, k] * masks[:, k]).sum() / (predicted[:, k].sum() + masks[:, k].sum())).item()
                for k in range(2)]  # fmt: skip

    before = dice(torch.Generator().manual_seed(99))
    fit(model, optimizer, sample, "input_ids", steps=80)
    after = dice(torch.Generator().manual_seed(99))
    for k in range(2):
        assert after[k] > 0.6 and after[k] > before[k] + 0.3, (before, after)


# ----------------------------------------------------------------------------------------------------------------
# Prompts in the scan's coordinates and masks back in its geometry
# ----------------------------------------------------------------------------------------------------------------

LPS_AFFINE = np.array([[-0.8, 0, 0, 20.0], [0, -0.8, 0, 30.0], [0, 0, 2.5, -10.0], [0, 0, 0, 1]])
BLOB_CENTRE = np.array([40.0, 18.0, 9.0])


@pytest.fixture(scope="module")
def lps_scan(tmp_path_factory):
    """An LPS, anisotropic (0.8 × 0.8 × 2.5 mm) scan of 60 × 50 × 24 voxels with a 10 mm sphere and its mask."""
    folder = tmp_path_factory.mktemp("lps")
    shape = (60, 50, 24)
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    spacing = np.abs(np.diag(LPS_AFFINE)[:3])
    blob = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, BLOB_CENTRE, spacing)) < 10.0**2
    volume = np.random.default_rng(0).normal(-800, 20, shape).astype(np.int16)
    volume[blob] = 60
    nib.save(nib.Nifti1Image(volume, LPS_AFFINE), folder / "ct.nii.gz")
    nib.save(nib.Nifti1Image(blob.astype(np.uint8), LPS_AFFINE), folder / "blob.nii.gz")
    assert nib.aff2axcodes(LPS_AFFINE) == ("L", "P", "S")
    return folder, blob


def test_post_processing_puts_a_blob_back_in_an_lps_anisotropic_scan(lps_scan, tmp_path):
    folder, blob = lps_scan
    processor = ReCTImageProcessor(volume_size=[24, 48, 48], windows=["lung"])
    out = processor([str(folder / "ct.nii.gz")], lesion_mask=[str(folder / "blob.nii.gz")], return_tensors="pt")
    meta = out["volume_meta"][0]
    # What a perfect localizer would output on the model grid: the processed blob as logits.
    logits = (out["lesion_mask"].float() * 2 - 1) * 5
    restored = processor.post_process_masks(logits, out["volume_meta"], threshold=0.0, largest_component=True)[0]
    assert restored.shape == blob.shape and restored.dtype == np.uint8
    dice = 2 * (restored * blob).sum() / (restored.sum() + blob.sum())
    assert dice >= 0.95, dice
    path = processor.save_mask(restored, meta, tmp_path / "blob_back.nii.gz")
    saved = nib.load(path)
    np.testing.assert_allclose(saved.affine, LPS_AFFINE)
    np.testing.assert_allclose(saved.get_qform(), LPS_AFFINE)

    (row,) = processor.mask_findings(restored, meta, names=["blob"])
    expected_ml = blob.sum() * 0.8 * 0.8 * 2.5 / 1000
    assert row["finding"] == "blob" and row["lesion"] == 1
    assert abs(row["volume_ml"] - expected_ml) / expected_ml < 0.05, (row, expected_ml)
    centre_ras = (LPS_AFFINE @ np.append(BLOB_CENTRE, 1))[:3]
    assert np.abs(np.array(row["centroid_ras"]) - centre_ras).max() < 1.0, (row, centre_ras)


def test_a_roi_box_cut_comes_back_at_the_boxs_edges_not_half_a_voxel_inside(lps_scan):
    """A perfect mask cut to its own box (`OUTSIDE_BOX_LOGIT` outside, as a region-of-interest box prompt gives it)
    comes back in the scan's grid as the uncut mask does, on a model grid about 3× coarser than the scan's; resampled
    linearly against a large negative value its edges would move in by half a model voxel wherever it meets the box.
    A box that cuts part of the mask cuts it at the box's edges, and the logits outside it stay the cut's value."""
    folder, blob = lps_scan
    processor = ReCTImageProcessor(volume_size=[8, 16, 16], windows=["lung"])
    out = processor([str(folder / "ct.nii.gz")], lesion_mask=[str(folder / "blob.nii.gz")], return_tensors="pt")
    meta = out["volume_meta"]
    logits = (out["lesion_mask"].float() * 2 - 1) * 5
    voxels = torch.nonzero(out["lesion_mask"][0, 0])
    low, high = voxels.min(0).values.float(), voxels.max(0).values.float()
    half = low.clone()
    half[0] = (low[0] + high[0]) // 2  # the upper half of the blob along the first axis
    inside = {}
    for name, (a, b) in {"whole": (low, high), "half": (half, high)}.items():
        inside[name] = ReCTForLesionLocalization._inside_boxes(torch.cat([a, b])[None], logits.shape[2:])[:, None]
    cut = {name: logits.masked_fill(~box, localizer_module.OUTSIDE_BOX_LOGIT) for name, box in inside.items()}

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    def restored(values):
        return processor.post_process_masks(values, meta, threshold=0.0)[0].astype(bool)

    plain, whole = restored(logits), restored(cut["whole"])
    naive = restored(cut["whole"].clamp(min=-1e3))  # −10³ is not the cut's value: resampled as any logits
    # Not identical: linear resampling rounds a mask's corners, the box comes back (nearest) with sharp ones.
    assert dice(whole, plain) > 0.95 and dice(whole, blob) >= dice(plain, blob) - 0.03, dice(whole, plain)
    assert dice(naive, plain) < dice(whole, plain) - 0.1, (dice(naive, plain), dice(whole, plain))
    box_back = processor.post_process_masks(inside["half"].to(torch.uint8), meta)[0].astype(bool)
    halved = restored(cut["half"])
    assert not (halved & ~box_back).any()
    assert dice(halved, plain & box_back) > 0.95, dice(halved, plain & box_back)
    logits_back = processor.post_process_masks(cut["half"], meta)[0]
    assert (logits_back[~box_back] == localizer_module.OUTSIDE_BOX_LOGIT).all()


def test_largest_component_keeps_the_biggest_lesion_and_findings_list_both(lps_scan):
    folder, blob = lps_scan
    processor = ReCTImageProcessor(volume_size=[24, 48, 48], windows=["lung"])
    meta = processor([str(folder / "ct.nii.gz")])["volume_meta"][0]
    logits = np.full((1, 1, 24, 48, 48), -5.0, dtype=np.float32)
    logits[0, 0, 2:8, 4:20, 4:20] = 5.0
    logits[0, 0, 15:17, 30:34, 30:34] = 5.0
    both = processor.post_process_masks(logits, [meta], threshold=0.0)[0]
    largest = processor.post_process_masks(logits, [meta], threshold=0.0, largest_component=True)[0]
    rows = processor.mask_findings(both, meta)
    assert [r["lesion"] for r in rows] == [1, 2] and rows[0]["voxels"] > rows[1]["voxels"]
    assert largest.sum() == rows[0]["voxels"]
    with pytest.raises(ValueError, match="needs a `threshold`"):
        processor.post_process_masks(logits, [meta], largest_component=True)
    with pytest.raises(ValueError, match="original grid"):
        processor.mask_findings(logits[0], meta)


def test_processor_maps_prompts_from_the_scan_onto_the_model_grid(lps_scan, minilm_dir):
    folder, blob = lps_scan
    processor = ReCTProcessor(
        image_processor=ReCTImageProcessor(volume_size=[24, 48, 48], windows=["lung"]),
        tokenizer=AutoTokenizer.from_pretrained(minilm_dir),
    )
    ct = str(folder / "ct.nii.gz")
    low, high = np.argwhere(blob).min(0), np.argwhere(blob).max(0)
    world = (LPS_AFFINE @ np.append(BLOB_CENTRE, 1))[:3]
    batch = processor(
        images=[ct, ct],
        text=[["pleural effusion", "a nodule in the left lower lobe"], ["aorta", "heart"]],
        input_points=[[BLOB_CENTRE.tolist()], [BLOB_CENTRE.tolist(), [10, 10, 5]]],
        input_labels=[[1], [1, 0]],
        input_boxes=[np.concatenate([low, high])] * 2,
        lesion_mask=[str(folder / "blob.nii.gz")] * 2,
        return_tensors="pt",
    )
    assert batch["input_ids"].shape[:2] == (2, 2) and batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["input_points"].shape == (2, 2, 3) and batch["input_labels"].tolist() == [[1, -1], [1, 0]]
    processed = batch["lesion_mask"][0, 0].numpy()
    point = batch["input_points"][0, 0].numpy()
    assert processed[tuple(np.round(point).astype(int))] == 1
    np.testing.assert_allclose(point, np.argwhere(processed).mean(0), atol=0.5)
    for space, coords in (("ras", world), ("lps", world * [-1, -1, 1])):
        again = processor(images=[ct], input_points=[[coords.tolist()]], input_labels=[[1]], prompt_space=space)
        np.testing.assert_allclose(again["input_points"][0][0], point, atol=1e-4)
    box = batch["input_boxes"][0].numpy()
    inside = np.argwhere(processed)
    assert (inside >= np.floor(box[:3]) - 0.5).all() and (inside <= np.ceil(box[3:]) + 0.5).all()

    # The batch drives the localizer as it is (a model built for this grid; untrained).
    config = ReCTConfig(
        vision_config=tiny_vision_kwargs(volume_size=[24, 48, 48], patch_size=[4, 8, 8], in_channels=1),
        text_config=tiny_text_kwargs(),
        localizer_config=dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, decoder_channels=[16, 8]),
    )
    inputs = {k: v for k, v in batch.items() if k not in ("volume_meta", "lesion_mask")}
    with torch.no_grad():
        out = ReCTForLesionLocalization(config).eval()(**inputs)
    assert out.pred_masks.shape == (2, 2, 24, 48, 48)
    masks = processor.post_process_masks(out.pred_masks, batch["volume_meta"], threshold=0.0)
    assert [m.shape for m in masks] == [(2, *blob.shape)] * 2

    with pytest.raises(ValueError, match="outside the model grid"):
        processor(images=[ct], input_points=[[[0, 0, 40]]], input_labels=[[1]])
    with pytest.raises(ValueError, match="`input_labels` are needed"):
        processor(images=[ct], input_points=[[[3, 3, 3]]])
    with pytest.raises(ValueError, match="entirely outside"):
        processor(images=[ct], input_boxes=[[100, 100, 40, 120, 120, 50]])
    with pytest.raises(ValueError, match="same number of prompts"):
        processor(images=[ct, ct], text=[["aorta"], ["aorta", "heart"]])
    with pytest.raises(ValueError, match="space must be"):
        processor(images=[ct], input_points=[[[3, 3, 3]]], input_labels=[[1]], prompt_space="mm")


@pytest.mark.skipif(not REAL_CT.is_dir(), reason=f"real CT files not found at {REAL_CT}")
@pytest.mark.parametrize("scan", [NIFTI_CT, SERIES], ids=["nifti", "dicom-series"])
def test_runs_on_real_ct_and_writes_masks_in_the_scans_geometry(scan, tmp_path, minilm_dir):
    """No lesion ground truth on these scans: the localizer must run from a text prompt and a box given in world
    coordinates, and its masks must land on the scan's own grid with its affine."""
    processor = ReCTProcessor(
        image_processor=ReCTImageProcessor(volume_size=[32, 64, 64], windows=["lung", "mediastinum"]),
        tokenizer=AutoTokenizer.from_pretrained(minilm_dir),
    )
    meta = processor(images=[str(scan)])["volume_meta"][0]
    centre = np.asarray(meta.original_shape) / 2
    corners = np.concatenate([centre - 5, centre + 5])
    batch = processor(
        images=[str(scan)], text=[["liver", "pleural effusion"]], input_boxes=[corners], return_tensors="pt"
    )
    config = ReCTConfig(
        vision_config=tiny_vision_kwargs(volume_size=[32, 64, 64], patch_size=[4, 16, 16], in_channels=2),
        text_config=tiny_text_kwargs(),
        localizer_config=dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, decoder_channels=[16, 8]),
    )
    torch.manual_seed(0)
    with torch.no_grad():
        out = ReCTForLesionLocalization(config).eval()(**{k: v for k, v in batch.items() if k != "volume_meta"})
    assert torch.isfinite(out.pred_masks).all()
    (masks,) = processor.post_process_masks(out.pred_masks, batch["volume_meta"], threshold=0.0)
    assert masks.shape == (2, *meta.original_shape)
    path = processor.save_mask(masks[0], batch["volume_meta"][0], tmp_path / "liver.nii.gz")
    saved = nib.load(path)
    assert saved.shape == tuple(meta.original_shape)
    np.testing.assert_allclose(saved.affine, np.asarray(meta.original_affine), atol=1e-4)
    np.testing.assert_allclose(saved.get_qform(), np.asarray(meta.original_affine), atol=1e-4)
