"""External encoder layouts → `ReCTVisionModel`: MONAI's `ViT` (M3D-CLIP, SegVol) and SAM-Med3D's image encoder.

Each layout derives the target `ReCTVisionConfig` from the upstream constructor arguments (`--source-config`) or
from the weights themselves, and says as a `KeyMapping` where every upstream key goes.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from hf_models import ReCTVisionConfig

from .mapping import Drop, KeyMapping, Rename
from .readers import ConversionError


#: Target config fields a user may set beside a converted encoder (`--config`); the rest follow from the source.
FREE_VISION_FIELDS = {
    "attention_type",
    "num_regions",
    "region_patch_fraction",
    "projection_dim",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
}

#: Target keys no external ViT has; left at initialisation when the user's config asks for them.
_RECT_ONLY = {
    r"region_attention\..+": "region-aware attention queries: the source encoder has none (train them)",
    r"layers\.\d+\.depth_(attention|layernorm)\..+": "slice-aware z-attention (`attention_type='divided'`): the "
    "source encoder has joint attention only, so outputs differ until it is fine-tuned",
}


def _triple(name: str, value: Any) -> list[int]:
    values = [value] * 3 if isinstance(value, int) else list(value)
    if len(values) != 3 or not all(isinstance(v, int) and v > 0 for v in values):
        raise ConversionError(f"source config `{name}` must be a positive int or three of them (3D), got {value!r}")
    return values


def _apply_overrides(fields: dict[str, Any], overrides: dict[str, Any] | None, source: str) -> ReCTVisionConfig:
    overrides = {k: v for k, v in (overrides or {}).items() if k not in ("model_type", "architectures", "auto_map")}
    for key, value in overrides.items():
        if key in fields and fields[key] != value and key not in FREE_VISION_FIELDS:
            raise ConversionError(
                f"--config sets `{key}`={value!r} but the {source} checkpoint has {fields[key]!r}; only "
                f"{sorted(FREE_VISION_FIELDS)} may differ from the source"
            )
    return ReCTVisionConfig(**{**fields, **overrides})


def _split_qkv(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A fused `(3·hidden, …)` qkv projection, laid out (qkv, heads, head_dim), → q, k, v."""
    return tuple(tensor.chunk(3, dim=0))


def _vision_layer_rules(block: str, names: dict[str, str]) -> list[Rename]:
    """Per-layer renames from `block` (regex capturing the layer index) with upstream submodule `names`."""
    rules = []
    for ours, theirs in names.items():
        rules.append(Rename(rf"{block}\.{re.escape(theirs)}\.(weight|bias)", rf"layers.\1.{ours}.\2"))
    return rules


# ----------------------------------------------------------------------------------------------------------------
# MONAI ViT
# ----------------------------------------------------------------------------------------------------------------

MONAI_VIT_REQUIRED = ("img_size", "patch_size", "hidden_size", "mlp_dim", "num_layers", "num_heads")
MONAI_VIT_DEFAULTS = {
    "in_channels": 1,
    "proj_type": "conv",
    "pos_embed_type": "learnable",
    "classification": False,
    "qkv_bias": False,
    "dropout_rate": 0.0,
    "spatial_dims": 3,
}


def monai_vit_layout(
    source_args: dict[str, Any], overrides: dict[str, Any] | None = None
) -> tuple[ReCTVisionConfig, KeyMapping]:
    """MONAI `ViT(**source_args)` → `ReCTVisionModel` with joint attention and the same outputs: MONAI's tokens
    (`ViT(...)(x)[0]`) equal our `last_hidden_state` (patch tokens after the CLS token when `classification`).

    MONAI's layer norms use eps 1e-5 and its MLP exact GELU; a CLS token (`classification=True`) is prepended
    without a position embedding, so ours gets a zero one."""
    missing = [k for k in MONAI_VIT_REQUIRED if k not in source_args]
    if missing:
        raise ConversionError(
            f"--source-config for monai-vit lacks {missing}: MONAI's ViT constructor arguments "
            f"{list(MONAI_VIT_REQUIRED)} cannot be read from the weights alone"
        )
    args = {**MONAI_VIT_DEFAULTS, **source_args}
    unknown = sorted(
        set(args) - set(MONAI_VIT_DEFAULTS) - set(MONAI_VIT_REQUIRED) - {"num_classes", "post_activation"}
    )
    if unknown:
        raise ConversionError(f"--source-config has arguments the monai-vit converter does not know: {unknown}")
    if args["spatial_dims"] != 3:
        raise ConversionError(f"monai-vit converts 3D ViTs; --source-config has spatial_dims={args['spatial_dims']}")
    if args["proj_type"] not in ("conv", "perceptron"):
        raise ConversionError(f"monai-vit: proj_type must be 'conv' or 'perceptron', got {args['proj_type']!r}")
    patch = _triple("patch_size", args["patch_size"])
    fields = {
        "hidden_size": args["hidden_size"],
        "num_hidden_layers": args["num_layers"],
        "num_attention_heads": args["num_heads"],
        "intermediate_size": args["mlp_dim"],
        "hidden_act": "gelu",
        "hidden_dropout_prob": args["dropout_rate"],
        "attention_probs_dropout_prob": args["dropout_rate"],
        "layer_norm_eps": 1e-5,
        "volume_size": _triple("img_size", args["img_size"]),
        "patch_size": patch,
        "in_channels": args["in_channels"],
        "qkv_bias": bool(args["qkv_bias"]),
        "use_cls_token": bool(args["classification"]),
        "attention_type": "joint",
        "num_regions": 0,
    }
    config = _apply_overrides(fields, overrides, "MONAI ViT")
    hidden, channels, cls = config.hidden_size, config.in_channels, config.use_cls_token

    def position(tensor: torch.Tensor) -> torch.Tensor:
        # MONAI adds no position embedding to its CLS token: ours is zero.
        return torch.cat([tensor.new_zeros(1, 1, hidden), tensor], dim=1) if cls else tensor

    def perceptron(weight: torch.Tensor) -> torch.Tensor:
        # Linear over (p1 p2 p3 c) → Conv3d kernel (hidden, c, p1, p2, p3).
        return weight.reshape(hidden, *patch, channels).permute(0, 4, 1, 2, 3)

    block = r"blocks\.(\d+)"
    rules: list[Rename | Drop] = [
        Rename(r"patch_embedding\.patch_embeddings\.(weight|bias)", r"embeddings.projection.\1"),
        Rename(r"patch_embedding\.patch_embeddings\.1\.weight", "embeddings.projection.weight", perceptron),
        Rename(r"patch_embedding\.patch_embeddings\.1\.bias", "embeddings.projection.bias"),
        Rename(r"patch_embedding\.position_embeddings", "embeddings.position_embeddings", position),
        Rename(r"cls_token", "embeddings.cls_token"),
        Rename(r"norm\.(weight|bias)", r"layernorm.\1"),
        Rename(
            rf"{block}\.attn\.qkv\.(weight|bias)",
            (r"layers.\1.attention.q_proj.\2", r"layers.\1.attention.k_proj.\2", r"layers.\1.attention.v_proj.\2"),
            _split_qkv,
        ),
        *_vision_layer_rules(
            block,
            {
                "attention.q_proj": "attn.to_q",
                "attention.k_proj": "attn.to_k",
                "attention.v_proj": "attn.to_v",
                "attention.o_proj": "attn.out_proj",
                "layernorm_before": "norm1",
                "layernorm_after": "norm2",
                "mlp.fc1": "mlp.linear1",
                "mlp.fc2": "mlp.linear2",
            },
        ),
        Drop(
            rf"{block}\.norm_cross_attn\.(weight|bias)",
            "MONAI builds this LayerNorm even without cross-attention; ViT never uses it",
        ),
        Drop(r"classification_head\..+", "MONAI ViT's classification head: ReCTVisionModel is the encoder only"),
    ]
    notes = [
        f"MONAI ViT ({args['proj_type']} patches, {args['pos_embed_type']} positions, classification="
        f"{bool(args['classification'])}) as ReCTVisionModel attention_type={config.attention_type!r}"
    ]
    return config, KeyMapping(rules, initialized=dict(_RECT_ONLY), notes=notes)


# ----------------------------------------------------------------------------------------------------------------
# SAM-Med3D image encoder
# ----------------------------------------------------------------------------------------------------------------


def sam_med3d_layout(
    state_dict: dict[str, torch.Tensor],
    source_args: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[ReCTVisionConfig, KeyMapping]:
    """SAM-Med3D (a full model with `image_encoder.*`, or its image encoder alone) → its image encoder's weights in
    `ReCTVisionModel`: patch embedding, absolute positions (no CLS token) and every block's norms, attention and MLP.

    The architecture is read from the weights (`source_args` may state `num_heads` when the checkpoint has no
    relative-position tables to read it from). What has no counterpart is dropped with the reason: the decomposed
    relative-position tables, the neck, the prompt encoder and mask decoder. SAM-Med3D also runs 14³ window
    attention in its non-global blocks; ReCT attends jointly, so outputs differ until fine-tuned (a note in the
    report says which blocks)."""
    prefix = "image_encoder." if any(k.startswith("image_encoder.") for k in state_dict) else ""
    proj = state_dict.get(f"{prefix}patch_embed.proj.weight")
    pos = state_dict.get(f"{prefix}pos_embed")
    if proj is None or proj.ndim != 5:
        raise ConversionError(
            "sam-med3d: no 3D patch embedding `image_encoder.patch_embed.proj.weight` (hidden, channels, p, p, p) in "
            f"the checkpoint; found keys like {list(state_dict)[:5]}"
        )
    hidden, channels, *patch = proj.shape
    if pos is None or pos.ndim != 5:
        raise ConversionError("sam-med3d: the converter needs the absolute position table `pos_embed` (1, d, h, w, C)")
    grid = list(pos.shape[1:4])
    blocks = sorted(
        {int(m.group(1)) for k in state_dict if (m := re.match(rf"{re.escape(prefix)}blocks\.(\d+)\.", k))}
    )
    if blocks != list(range(len(blocks))) or not blocks:
        raise ConversionError(f"sam-med3d: transformer blocks must be numbered 0..N-1, found {blocks}")
    rel = state_dict.get(f"{prefix}blocks.0.attn.rel_pos_d")
    source_args = dict(source_args or {})
    if "num_heads" in source_args:
        heads = int(source_args["num_heads"])
    elif rel is not None:
        heads = hidden // rel.shape[1]
    else:
        raise ConversionError(
            "sam-med3d: without relative-position tables the head count must be given as "
            "--source-config '{\"num_heads\": N}'"
        )
    global_blocks = [
        i
        for i in blocks
        if rel is None or state_dict[f"{prefix}blocks.{i}.attn.rel_pos_d"].shape[0] == 2 * grid[0] - 1
    ]
    fields = {
        "hidden_size": hidden,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": heads,
        "intermediate_size": state_dict[f"{prefix}blocks.0.mlp.lin1.weight"].shape[0],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "volume_size": [g * p for g, p in zip(grid, patch)],
        "patch_size": patch,
        "in_channels": channels,
        "qkv_bias": f"{prefix}blocks.0.attn.qkv.bias" in state_dict,
        "use_cls_token": False,
        "attention_type": "joint",
        "num_regions": 0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    config = _apply_overrides(fields, overrides, "SAM-Med3D")
    p = re.escape(prefix)
    block = rf"{p}blocks\.(\d+)"
    rules: list[Rename | Drop] = [
        Rename(rf"{p}patch_embed\.proj\.(weight|bias)", r"embeddings.projection.\1"),
        Rename(rf"{p}pos_embed", "embeddings.position_embeddings", lambda t: t.reshape(1, -1, t.shape[-1])),
        Rename(
            rf"{block}\.attn\.qkv\.(weight|bias)",
            (r"layers.\1.attention.q_proj.\2", r"layers.\1.attention.k_proj.\2", r"layers.\1.attention.v_proj.\2"),
            _split_qkv,
        ),
        *_vision_layer_rules(
            block,
            {
                "attention.o_proj": "attn.proj",
                "layernorm_before": "norm1",
                "layernorm_after": "norm2",
                "mlp.fc1": "mlp.lin1",
                "mlp.fc2": "mlp.lin2",
            },
        ),
        Drop(
            rf"{block}\.attn\.rel_pos_[dhw]",
            "decomposed relative-position bias (SAM / ViTDet): ReCT attention has absolute positions only",
        ),
        Drop(
            rf"{p}neck\..+",
            "SAM-Med3D's neck (1×1 and 3×3 convs + LayerNorm3d) feeds its mask decoder; not part of a ReCT encoder",
        ),
        Drop(r"prompt_encoder\..+", "SAM-Med3D's prompt encoder: ReCT-Localizer embeds prompts its own way"),
        Drop(r"mask_decoder\..+", "SAM-Med3D's mask decoder: ReCT-Localizer has its own shared U-Net decoder"),
    ]
    windowed = [i for i in blocks if i not in global_blocks]
    notes = [
        f"SAM-Med3D image encoder: {len(blocks)} blocks, hidden {hidden}, {heads} heads, grid {grid}, patch {patch}",
        f"blocks {windowed} used window attention in SAM-Med3D and blocks {global_blocks} global attention with "
        "relative positions; the converted encoder attends jointly without them, so its outputs differ from "
        "SAM-Med3D's until fine-tuned",
    ]
    initialized = {
        **_RECT_ONLY,
        r"layernorm\.(weight|bias)": "final LayerNorm: SAM-Med3D's encoder ends in its neck instead (identity "
        "init: weight 1, bias 0)",
    }
    return config, KeyMapping(rules, initialized=initialized, notes=notes)
