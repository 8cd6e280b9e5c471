"""ReCT-VLM 3D CT encoders: vision encoder, feature extractor, contrastive dual encoder, volume classifier.

Tensor layout throughout: `pixel_values (batch, channels, depth, height, width)` in the processor's canonical
orientation (depth = inferior→superior, height = anterior→posterior, width = patient right→left).

Shaped like transformers' SigLIP: sub-models are built with `_from_config` (attention implementation and dtype
propagate), attention goes through `ALL_ATTENTION_FUNCTIONS.get_interface`, hidden states and attentions are captured
by `_can_record_outputs` hooks, and the classifier is a head on the vision tower alone.
"""

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.import_utils import is_torchdynamo_compiling
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_rect import ReCTConfig, ReCTVisionConfig


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ReCTVisionModelOutput(BaseModelOutputWithPooling):
    r"""
    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, 1 + num_patches, hidden_size)`):
            Final-layer tokens after the last LayerNorm; index 0 is CLS, the rest are patch tokens ordered
            (depth, height, width) over the patch grid.
        pooler_output (`torch.FloatTensor` of shape `(batch, hidden_size)`): global feature (the CLS token).
            [`ReCTModel.get_image_features`] replaces it by the projected embedding `(batch, projection_dim)`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, with `output_hidden_states=True`): the embeddings
            plus the output of every layer, each `(batch, 1 + num_patches, hidden_size)`.
        attentions (`tuple(torch.FloatTensor)`, *optional*, with `output_attentions=True` and eager attention): per
            layer the attention probabilities. Joint attention: `(batch, heads, 1 + N, 1 + N)`. Divided attention:
            the within-slab attention `(batch * grid_depth, heads, 1 + grid_height * grid_width, 1 + grid_height *
            grid_width)`.
        region_features (`torch.FloatTensor` of shape `(batch, num_regions, hidden_size)`, *optional*):
            one feature per anatomy region; zero where the region is absent. `None` without `anatomy_mask`.
        region_present (`torch.BoolTensor` of shape `(batch, num_regions)`, *optional*):
            whether region r (id r + 1) covers at least one patch token. `None` without `anatomy_mask`.
        depth_attentions (`tuple(torch.FloatTensor)`, *optional*): divided attention with `output_attentions=True`,
            per layer the along-z attention `(batch * grid_height * grid_width, heads, grid_depth, grid_depth)`.
        stem_features (`tuple(torch.FloatTensor)`, *optional*, with `output_stem_features=True` and a stem): the
            output of each stem convolution, fine to coarse, `(batch, stem_channels[i], D / 2**(i+1), H / 2**(i+1),
            W / 2**(i+1))`.
    """

    region_features: torch.FloatTensor | None = None
    region_present: torch.BoolTensor | None = None
    depth_attentions: tuple[torch.FloatTensor, ...] | None = None
    stem_features: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ReCTFeatureExtractionOutput(ModelOutput):
    r"""
    Args:
        image_embeds (`torch.FloatTensor` of shape `(batch, projection_dim)`): L2-normalised global embedding.
        region_embeds (`torch.FloatTensor` of shape `(batch, num_regions, projection_dim)`, *optional*):
            L2-normalised region embeddings; zero rows where `region_present` is False.
        region_present (`torch.BoolTensor` of shape `(batch, num_regions)`, *optional*).
        last_hidden_state (`torch.FloatTensor` of shape `(batch, 1 + num_patches, hidden_size)`).
        hidden_states, attentions: as in [`ReCTVisionModelOutput`].
    """

    image_embeds: torch.FloatTensor | None = None
    region_embeds: torch.FloatTensor | None = None
    region_present: torch.BoolTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ReCTOutput(ModelOutput):
    r"""
    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, with `return_loss=True`): symmetric InfoNCE over the
            batch plus `region_alignment_weight` × the region alignment loss (when `region_mentions` is given).
        logits_per_image (`torch.FloatTensor` of shape `(image_batch, text_batch)`): scaled cosine similarities.
        logits_per_text (`torch.FloatTensor` of shape `(text_batch, image_batch)`): the transpose.
        text_embeds (`torch.FloatTensor` of shape `(batch, projection_dim)`): L2-normalised text embeddings.
        image_embeds (`torch.FloatTensor` of shape `(batch, projection_dim)`): L2-normalised image embeddings.
        region_embeds (`torch.FloatTensor` of shape `(batch, num_regions, projection_dim)`, *optional*).
        region_present (`torch.BoolTensor` of shape `(batch, num_regions)`, *optional*).
        region_logits (`torch.FloatTensor` of shape `(batch, num_regions)`, *optional*): logit that the paired
            report mentions region r; meaningful only where `region_present`.
        contrastive_loss (`torch.FloatTensor` of shape `()`, *optional*): the global InfoNCE term alone.
        region_loss (`torch.FloatTensor` of shape `()`, *optional*): the region term alone (0 when no region is
            present in the batch).
        vision_model_output ([`ReCTVisionModelOutput`]), text_model_output: the towers' raw outputs.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    region_embeds: torch.FloatTensor | None = None
    region_present: torch.BoolTensor | None = None
    region_logits: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    region_loss: torch.FloatTensor | None = None
    vision_model_output: ReCTVisionModelOutput | None = None
    text_model_output: ModelOutput | None = None

    def to_tuple(self):
        return tuple(v.to_tuple() if k in ("vision_model_output", "text_model_output") else v for k, v in self.items())


@dataclass
class ReCTVolumeClassifierOutput(ModelOutput):
    r"""
    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): with `labels`: BCE-with-logits over all labels
            (multi-label), cross-entropy (single-label) or MSE (regression), per `config.problem_type`; with
            `lesion_tokens` as well, plus `config.lesion_token_loss_weight` × `lesion_token_loss`; with
            `lesion_maps`, plus `config.lesion_map_loss_weight` × `lesion_map_loss`.
        logits (`torch.FloatTensor` of shape `(batch, num_labels)`): the head's logits, plus each label's highest
            lesion-map logit when the model has a lesion-map decoder.
        classification_loss (`torch.FloatTensor` of shape `()`, *optional*): with `labels` and an auxiliary target
            (`lesion_tokens`, `lesion_maps`): the `labels` term alone (otherwise it is `loss`, and this field is left
            empty).
        lesion_token_loss (`torch.FloatTensor` of shape `()`, *optional*): with `lesion_tokens`: BCE-with-logits of
            the token head against them (unweighted).
        lesion_map_loss (`torch.FloatTensor` of shape `()`, *optional*): with `lesion_maps`: the per-voxel
            BCE-with-logits of the lesion map against them (positive weight `config.lesion_map_pos_weight`,
            unweighted otherwise).
        lesion_map_logits (`torch.FloatTensor` of shape `(batch, num_labels, D / s, H / s, W / s)`, *optional*):
            with a lesion-map decoder (`config.lesion_map_channels`; s = `config.lesion_map_stride`): where the
            model sees each label's finding.
        pooler_output (`torch.FloatTensor` of shape `(batch, hidden_size)`): the vision CLS feature.
        hidden_states, attentions: as in [`ReCTVisionModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    classification_loss: torch.FloatTensor | None = None
    lesion_token_loss: torch.FloatTensor | None = None
    lesion_map_loss: torch.FloatTensor | None = None
    lesion_map_logits: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """query/key/value `(batch, heads, length, head_dim)`; additive `attention_mask` broadcastable to the scores."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class ReCTAttention(nn.Module):
    """Multi-head attention through transformers' attention interface (eager, SDPA, …).

    Self-attention when `key_value_states` is None, cross-attention otherwise.
    """

    def __init__(self, config: ReCTVisionConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states `(batch, q_len, hidden)`, key_value_states `(batch, kv_len, hidden)` → output, weights."""
        kv = hidden_states if key_value_states is None else key_value_states
        batch, q_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(kv).view(batch, kv.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(kv).view(batch, kv.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
            **kwargs,
        )
        attn_output = self.o_proj(attn_output.reshape(batch, q_len, -1))
        return attn_output, attn_weights


class ReCTMLP(nn.Module):
    def __init__(self, config: ReCTVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


def _one_volume_runs_native_cpu_kernel(
    input: torch.Tensor, weight: torch.Tensor, stride, dilation, groups: int
) -> bool:
    """Whether PyTorch runs this float32 CPU convolution through its native (im2col + GEMM) kernel only because the
    batch holds one volume. Its rule (`ConvParams::use_mkldnn`, aten/src/ATen/native/Convolution.cpp) takes oneDNN
    for a batch above one, but for a batch of one only with groups, a kernel larger than 3 in its last two sizes, or
    more than 20480 in the product of the input's first four sizes — a threshold written for 2D images, which for a
    volume is batch · channels · depth · height and stays below it for most convolutions of the demo's localizer
    (1 · 8 · 32 · 64 = 16384).
    The native kernel is 4–8× slower for one convolution of these shapes (an 8 → 8 3×3×3 one of a 32×64×64 volume:
    83.5 ms forward against 9.9 ms), the demo's whole localizer 2.2–2.4× (`bench/localize.py --demo`)."""
    if (
        input.device.type != "cpu"
        or input.dtype != torch.float32
        or input.dim() != 5
        or input.shape[0] != 1
        or groups != 1
        or is_torchdynamo_compiling()
        or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)
    ):
        return False
    kernel = weight.shape[-2:]
    # The rule's first half, which a batch size does not change: 1×1 kernels stay native on one thread.
    if all(s == 1 for s in stride) and all(d == 1 for d in dilation) and tuple(kernel) == (1, 1):
        if torch.get_num_threads() == 1:
            return False
    return not (min(kernel) > 3 or math.prod(input.shape[:4]) > 20480)


class ReCTConv3d(nn.Conv3d):
    """`nn.Conv3d` (the same parameters and state-dict keys) that runs a single volume on the CPU through oneDNN, as
    PyTorch already does for two or more (`_one_volume_runs_native_cpu_kernel`): the volume twice, as two groups,
    each computing half of the output channels from all input channels with its half of the same weight tensor — the
    plain convolution's result up to float rounding, with the same gradients."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (
            self.padding_mode == "zeros"
            and self.out_channels % 2 == 0
            and _one_volume_runs_native_cpu_kernel(input, weight, self.stride, self.dilation, self.groups)
        ):
            return F.conv3d(input.repeat(1, 2, 1, 1, 1), weight, bias, self.stride, self.padding, self.dilation, 2)
        return super()._conv_forward(input, weight, bias)


class ReCTConvTranspose3d(nn.ConvTranspose3d):
    """`nn.ConvTranspose3d` with [`ReCTConv3d`]'s two-group route for a single volume on the CPU (the weight's two
    halves of output channels stacked as the two groups' weights)."""

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if (
            output_size is None
            and self.padding_mode == "zeros"
            and self.out_channels % 2 == 0
            and _one_volume_runs_native_cpu_kernel(input, self.weight, self.stride, self.dilation, self.groups)
        ):
            half = self.out_channels // 2
            weight = torch.cat([self.weight[:, :half], self.weight[:, half:]])  # (2 · in, out / 2, *kernel)
            return F.conv_transpose3d(
                input.repeat(1, 2, 1, 1, 1), weight, self.bias, self.stride, self.padding, self.output_padding, 2,
                self.dilation,
            )  # fmt: skip
        return super().forward(input, output_size)


class ReCTStemConv(nn.Module):
    """3×3×3 convolution, GroupNorm, GELU. A stem step has stride 2 (halves depth, height and width); the lesion-map
    decoder's steps stride 1."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        self.conv = ReCTConv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm = nn.GroupNorm(math.gcd(8, out_channels), out_channels)
        self.activation = nn.GELU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(self.conv(hidden_states)))


class ReCTPatchEmbeddings(nn.Module):
    """Conv3d patch embedding plus CLS token and learnable position embeddings.

    Position embeddings are laid out for `config.volume_size`; another volume size gets them trilinearly
    interpolated over the patch grid.
    """

    def __init__(self, config: ReCTVisionConfig):
        super().__init__()
        self.patch_size = tuple(config.patch_size)
        self.in_channels = config.in_channels
        self.grid = config.patch_grid
        num_patches = self.grid[0] * self.grid[1] * self.grid[2]
        # Optional convolutional stem (`config.stem_channels`): stride-2 3×3×3 convolutions before the projection,
        # which then covers what is left of the patch. Without it `projection` is the ViT patch embedding.
        stem, channels = [], config.in_channels
        for width in config.stem_channels:
            stem.append(ReCTStemConv(channels, width))
            channels = width
        self.stem = nn.Sequential(*stem) if stem else None
        kernel = tuple(p // 2 ** len(stem) for p in self.patch_size)
        self.projection = ReCTConv3d(channels, config.hidden_size, kernel_size=kernel, stride=kernel)
        self.num_prefix_tokens = config.num_prefix_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if config.use_cls_token else None
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, self.num_prefix_tokens + num_patches, config.hidden_size)
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """Position embeddings `(1, prefix + prod(grid), hidden)` for a patch grid (depth, height, width)."""
        if tuple(grid) == self.grid:
            return self.position_embeddings
        cls_pos = self.position_embeddings[:, : self.num_prefix_tokens]
        patch_pos = self.position_embeddings[:, self.num_prefix_tokens :]
        hidden = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, *self.grid, hidden).permute(0, 4, 1, 2, 3)
        patch_pos = F.interpolate(patch_pos.float(), size=tuple(grid), mode="trilinear", align_corners=False)
        patch_pos = patch_pos.to(cls_pos.dtype).permute(0, 2, 3, 4, 1).reshape(1, -1, hidden)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(
        self, pixel_values: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[int, int, int], tuple[torch.Tensor, ...]]:
        """pixel_values `(batch, channels, depth, height, width)` → tokens `(batch, prefix + N, hidden)`, grid, and the
        output of each stem convolution (fine to coarse; empty without a stem)."""
        if pixel_values.ndim != 5:
            raise ValueError(
                "`pixel_values` must be (batch, channels, depth, height, width), got shape "
                f"{tuple(pixel_values.shape)}"
            )
        if pixel_values.shape[1] != self.in_channels:
            raise ValueError(
                f"`pixel_values` has {pixel_values.shape[1]} channels but the config expects "
                f"`in_channels`={self.in_channels} (one per HU window)"
            )
        spatial = tuple(pixel_values.shape[2:])
        if any(s % p for s, p in zip(spatial, self.patch_size)):
            raise ValueError(
                f"`pixel_values` spatial size {spatial} must be divisible by `patch_size` {self.patch_size}"
            )
        # (B, C, D, H, W) → (B, hidden, d, h, w) with d = D / pd etc.; tokens ordered (d, h, w). Inputs stored in
        # a compact dtype (float16 caches) are cast here, on the model's device. Channels-last: the convolutions
        # take oneDNN's / cuDNN's channels-last kernels (a training step of the demo's classifier on two CPU cores:
        # 0.105 s against 0.120 s), and the tokens come out already in (d, h, w, hidden) order.
        embeddings = pixel_values.to(self.projection.weight.dtype, memory_format=torch.channels_last_3d)
        stem_features = []
        for step in self.stem if self.stem is not None else ():
            embeddings = step(embeddings)
            stem_features.append(embeddings)
        embeddings = self.projection(embeddings)
        grid = tuple(embeddings.shape[2:])
        embeddings = embeddings.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            embeddings = torch.cat([self.cls_token.expand(embeddings.shape[0], -1, -1), embeddings], dim=1)
        embeddings = embeddings + self.interpolate_pos_encoding(grid)
        return self.dropout(embeddings), grid, tuple(stem_features)


class ReCTLayer(GradientCheckpointingLayer):
    """Pre-norm transformer layer.

    `"joint"`: full self-attention over all 1 + N tokens. `"divided"` (slice-aware, as TimeSformer's divided
    space–time attention with z as time): each patch token first attends along z to the tokens at the same
    (height, width) position in every slab, then within its axial slab of `h × w` tokens; the CLS token joins
    every slab (one copy per slab, averaged afterwards). Per layer this costs O(N·d + N·h·w) instead of O(N²)
    attention scores. Every reshape keeps the batch axis outermost, so a sample never attends to another.
    """

    def __init__(self, config: ReCTVisionConfig):
        super().__init__()
        self.attention_type = config.attention_type
        self.num_prefix_tokens = config.num_prefix_tokens
        if self.attention_type == "divided":
            self.depth_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.depth_attention = ReCTAttention(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = ReCTAttention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ReCTMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, grid: tuple[int, int, int], **kwargs) -> torch.Tensor:
        """hidden_states `(batch, prefix + d*h*w, hidden)` over the patch grid `(d, h, w)` → same shape."""
        if self.attention_type == "joint":
            attn_out, _ = self.attention(self.layernorm_before(hidden_states), **kwargs)
            hidden_states = hidden_states + self.dropout(attn_out)
        else:
            batch, _, hidden = hidden_states.shape
            d, h, w = grid
            prefix = self.num_prefix_tokens
            cls, tokens = hidden_states[:, :prefix], hidden_states[:, prefix:]
            # Along z: sequences of length d, one per (height, width) position.
            columns = tokens.reshape(batch, d, h * w, hidden).transpose(1, 2).reshape(batch * h * w, d, hidden)
            depth_out, _ = self.depth_attention(self.depth_layernorm(columns), **kwargs)
            depth_out = depth_out.reshape(batch, h * w, d, hidden).transpose(1, 2).reshape(batch, d * h * w, hidden)
            tokens = tokens + self.dropout(depth_out)
            # Within each axial slab: sequences of prefix + h*w tokens, the CLS token copied into every slab.
            slabs = torch.cat([cls.repeat_interleave(d, dim=0), tokens.reshape(batch * d, h * w, hidden)], dim=1)
            slab_out, _ = self.attention(self.layernorm_before(slabs), **kwargs)
            cls_out = slab_out[:, :prefix].reshape(batch, d, prefix, hidden).mean(dim=1)
            slab_out = slab_out[:, prefix:].reshape(batch, d * h * w, hidden)
            hidden_states = torch.cat([cls, tokens], dim=1) + self.dropout(torch.cat([cls_out, slab_out], dim=1))
        return hidden_states + self.dropout(self.mlp(self.layernorm_after(hidden_states)))


class ReCTRegionAttention(nn.Module):
    """Segmentation-guided region-aware attention.

    One learned query per anatomy region cross-attends only to the patch tokens that lie in that region. A region
    that covers no token is absent: its attention row is left unmasked (so no all-masked softmax, never NaN) and
    its feature is zeroed afterwards. Everything here has static shapes (no data-dependent Python values), so the
    encoder exports with `torch.export`; the id range of a mask is checked eagerly and by the processor.
    """

    def __init__(self, config: ReCTVisionConfig):
        super().__init__()
        self.num_regions = config.num_regions
        self.patch_size = tuple(config.patch_size)
        self.min_fraction = config.region_patch_fraction
        self.region_queries = nn.Parameter(torch.zeros(config.num_regions, config.hidden_size))
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # Not named `attention`: output capture records the encoder layers' `.attention` modules by that name.
        self.cross_attention = ReCTAttention(config)

    def region_membership(self, anatomy_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Downsample region ids to the patch grid by voxel fraction (never by interpolating ids).

        Args:
            anatomy_mask: `(batch, 1, depth, height, width)` or `(batch, depth, height, width)` integer ids 0..R.

        Returns:
            membership `(batch, R, N)` bool (token n belongs to region r) and present `(batch, R)` bool.
        """
        if anatomy_mask.ndim == 5:
            if anatomy_mask.shape[1] != 1:
                raise ValueError(f"`anatomy_mask` must have 1 channel, got shape {tuple(anatomy_mask.shape)}")
            anatomy_mask = anatomy_mask[:, 0]
        if anatomy_mask.is_floating_point():
            raise ValueError(f"`anatomy_mask` must hold integer region ids, got dtype {anatomy_mask.dtype}")
        ids = anatomy_mask.long()
        if not is_torchdynamo_compiling():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi > self.num_regions:
                raise ValueError(
                    f"`anatomy_mask` ids must be in 0..{self.num_regions} (`num_regions`), found range {lo}..{hi}"
                )
        batch, depth, height, width = ids.shape
        pd, ph, pw = self.patch_size
        d, h, w = depth // pd, height // ph, width // pw
        # (B, d, pd, h, ph, w, pw) → (B, N, voxels per patch); count ids per token with one scatter-add.
        ids = ids.reshape(batch, d, pd, h, ph, w, pw).permute(0, 1, 3, 5, 2, 4, 6).reshape(batch, d * h * w, -1)
        counts = torch.zeros(batch, d * h * w, self.num_regions + 1, device=ids.device)
        counts.scatter_add_(2, ids, torch.ones_like(ids, dtype=counts.dtype))
        fraction = counts[..., 1:] / ids.shape[-1]
        membership = (fraction >= self.min_fraction).transpose(1, 2)
        return membership, membership.any(dim=-1)

    def forward(self, tokens: torch.Tensor, anatomy_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens `(batch, N, hidden)` patch tokens → region features `(batch, R, hidden)`, present `(batch, R)`."""
        membership, present = self.region_membership(anatomy_mask)
        if membership.shape[-1] != tokens.shape[1]:
            raise ValueError(
                f"`anatomy_mask` covers {membership.shape[-1]} patch tokens but `pixel_values` has "
                f"{tokens.shape[1]}; the mask must have the volume's (depth, height, width)"
            )
        allowed = membership | ~present.unsqueeze(-1)
        additive = torch.zeros(allowed.shape, dtype=tokens.dtype, device=tokens.device)
        additive = additive.masked_fill(~allowed, torch.finfo(tokens.dtype).min).unsqueeze(1)
        queries = self.region_queries.to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        features, _ = self.cross_attention(queries, key_value_states=tokens, attention_mask=additive)
        features = self.layernorm(features) * present.unsqueeze(-1).to(features.dtype)
        return features, present


class ReCTProjectionHead(nn.Module):
    """Linear projections of the global and region features into the shared embedding space."""

    def __init__(self, hidden_size: int, projection_dim: int):
        super().__init__()
        self.visual_projection = nn.Linear(hidden_size, projection_dim, bias=False)
        self.region_projection = nn.Linear(hidden_size, projection_dim, bias=False)

    def forward(self, vision_outputs: ReCTVisionModelOutput) -> tuple[torch.Tensor, torch.Tensor | None]:
        """→ L2-normalised image embeds `(batch, P)` and region embeds `(batch, R, P)` (zero rows where absent)."""
        image_embeds = F.normalize(self.visual_projection(vision_outputs.pooler_output), dim=-1)
        region_embeds = None
        if vision_outputs.region_features is not None:
            region_embeds = F.normalize(self.region_projection(vision_outputs.region_features), dim=-1)
            region_embeds = region_embeds * vision_outputs.region_present.unsqueeze(-1).to(region_embeds.dtype)
        return image_embeds, region_embeds


class ReCTContrastiveHead(nn.Module):
    """Learnable temperatures: the global InfoNCE scale (init log(1/0.07)) and the region-alignment scale and bias
    (init scale 10, bias 0: BCE starts near log 2 whatever the mention prevalence). Each is a 1-element vector, as
    SigLIP's `logit_scale` and `logit_bias` are: DeepSpeed ZeRO-3 cannot partition 0-dimensional parameters."""

    region_logit_scale_init = math.log(10.0)

    def __init__(self, logit_scale_init: float):
        super().__init__()
        self.logit_scale_init = logit_scale_init
        self.logit_scale = nn.Parameter(torch.full((1,), logit_scale_init))
        self.region_logit_scale = nn.Parameter(torch.full((1,), self.region_logit_scale_init))
        self.region_logit_bias = nn.Parameter(torch.zeros(1))

    def scale(self, parameter: torch.Tensor) -> torch.Tensor:
        # CLIP's clamp: a temperature below 1/100 makes the softmax numerically brittle.
        return parameter.clamp(max=4.6052).exp()


def contrastive_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: the i-th text matches the i-th image. logits `(batch, batch)`."""
    targets = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    return (F.cross_entropy(logits_per_text, targets) + F.cross_entropy(logits_per_text.t(), targets)) / 2


def region_alignment_loss(
    region_logits: torch.Tensor, region_mentions: torch.Tensor, region_present: torch.Tensor
) -> torch.Tensor:
    """BCE between region–report logits `(batch, R)` and mentions `(batch, R)`, averaged over present regions only.

    Absent regions contribute nothing; a batch with no present region gives an exact zero (with a gradient path),
    never NaN.
    """
    weights = region_present.to(region_logits.dtype)
    per_region = F.binary_cross_entropy_with_logits(
        region_logits, region_mentions.to(region_logits.dtype), reduction="none"
    )
    return (per_region * weights).sum() / weights.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------------------------------------------
# Pre-trained base
# ----------------------------------------------------------------------------------------------------------------


class ReCTLesionMapDecoder(nn.Module):
    """Per-label lesion logits on a stem feature map's grid: a small U-Net decoder from the encoder's last patch
    tokens down through the stem's feature maps. Stage i (width `widths[i]`, coarse to fine, the coarsest stem map
    first) is a 1×1×1 projection, nearest-neighbour upsampling onto its stem map's grid, concatenation with that map
    (the skip connection) and `depth` 3×3×3 convolutions (GroupNorm, GELU); a 1×1×1 head gives one output per label.
    With as many stages as stem convolutions the map is half the volume's size; each stage fewer halves it again
    (`lesion_map_stride`). The stem keeps the detail a 16×16-voxel patch token averages away: a fully supervised 3D
    U-Net of this kind found the phantom's local findings where a head on the tokens did not."""

    def __init__(self, vision_config: ReCTVisionConfig, widths: list[int], depth: int, num_labels: int):
        super().__init__()
        self.widths, self.depth = list(widths), depth
        skips = list(reversed(vision_config.stem_channels))[: len(widths)]
        self.kernel = tuple(p // 2 ** len(vision_config.stem_channels) for p in vision_config.patch_size)
        inputs = [vision_config.hidden_size] + self.widths[:-1]
        self.projections = nn.ModuleList(ReCTConv3d(i, w, kernel_size=1) for i, w in zip(inputs, widths))
        self.stages = nn.ModuleList(
            nn.Sequential(
                ReCTStemConv(w + skip, w, stride=1), *(ReCTStemConv(w, w, stride=1) for _ in range(depth - 1))
            )
            for w, skip in zip(widths, skips)
        )
        self.head = ReCTConv3d(widths[-1], num_labels, kernel_size=1)
        for conv in self.modules():  # `ReCTPreTrainedModel._init_weights`: torch's own initialisation
            if isinstance(conv, nn.Conv3d):
                conv.torch_default_init = True

    def forward(self, patch_tokens: torch.Tensor, stem_features: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """patch tokens `(batch, N, hidden)` and the stem's feature maps (fine to coarse) → `(batch, num_labels,
        D / s, H / s, W / s)` logits, s = `lesion_map_stride`."""
        grid = tuple(s // k for s, k in zip(stem_features[-1].shape[2:], self.kernel))
        hidden = patch_tokens.transpose(1, 2).reshape(patch_tokens.shape[0], -1, *grid)
        for projection, stage, skip in zip(self.projections, self.stages, reversed(stem_features)):
            hidden = F.interpolate(projection(hidden), size=skip.shape[2:], mode="nearest")
            hidden = stage(torch.cat([hidden.to(memory_format=torch.channels_last_3d), skip], dim=1))
        return self.head(hidden)

    def label_maxima(self, vision_outputs: ReCTVisionModelOutput, num_prefix_tokens: int) -> torch.Tensor:
        """Each label's highest map logit `(batch, num_labels)` from an encoder output with `stem_features`."""
        logits = self(vision_outputs.last_hidden_state[:, num_prefix_tokens:], vision_outputs.stem_features)
        return logits.flatten(2).amax(dim=2)


def torch_default_conv_init(conv: nn.Module) -> None:
    """What `nn.Conv3d` / `nn.ConvTranspose3d` initialise themselves with (`reset_parameters`), through
    `transformers.initialization` so that weights loaded from a checkpoint are left alone."""
    init.kaiming_uniform_(conv.weight, a=math.sqrt(5))
    if conv.bias is not None:
        bound = 1 / math.sqrt(conv.weight.shape[1] * math.prod(conv.weight.shape[2:]))
        init.uniform_(conv.bias, -bound, bound)


class ReCTPreTrainedModel(PreTrainedModel):
    config: ReCTConfig
    config_class = ReCTConfig
    base_model_prefix = "rect"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["ReCTLayer", "ReCTRegionAttention"]
    _supports_sdpa = True
    _supports_attention_backend = True
    # The losses are means over the batch; they do not normalise by `num_items_in_batch`. Saying so makes the
    # `Trainer` divide by the accumulation steps, so gradient accumulation gives the same gradients as a big batch
    # (a `forward(**kwargs)` would otherwise be taken to accept loss kwargs).
    accepts_loss_kwargs = False
    _can_record_outputs = {
        "hidden_states": ReCTLayer,
        "attentions": OutputRecorder(ReCTAttention, index=1, layer_name="attention"),
        "depth_attentions": OutputRecorder(ReCTAttention, index=1, layer_name="depth_attention"),
    }
    # Auto classes written into the saved `config.json` `auto_map`, beyond AutoConfig/AutoModel.
    _extra_auto_classes: tuple[str, ...] = ()
    _auto_class = "AutoModel"

    def _init_weights(self, module):
        if isinstance(module, nn.ConvTranspose3d) or getattr(module, "torch_default_init", False):
            # The localizer's upsampling, which transformers' default skips (a model loaded with new decoder parts
            # would keep uninitialised memory there), and the lesion map's convolutions, which learnt faster so
            # than from N(0, 0.02) (seed 1, 1,500 steps: five large findings 0.970 against 0.904 held-out): torch's
            # own initialisation.
            torch_default_conv_init(module)
            return
        super()._init_weights(module)
        config = self.config
        std = getattr(config, "initializer_range", None)
        if std is None:
            std = config.vision_config.initializer_range
        if isinstance(module, ReCTPatchEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            if module.cls_token is not None:
                init.trunc_normal_(module.cls_token, mean=0.0, std=std)
        elif isinstance(module, ReCTRegionAttention):
            init.trunc_normal_(module.region_queries, mean=0.0, std=std)
        elif isinstance(module, ReCTContrastiveHead):
            init.constant_(module.logit_scale, module.logit_scale_init)
            init.constant_(module.region_logit_scale, module.region_logit_scale_init)
            init.zeros_(module.region_logit_bias)

    def auto_map(self) -> dict[str, str]:
        """The `auto_map` a folder saved from this class needs: every Auto class resolves to this class."""
        model_ref = f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
        config_ref = f"{type(self.config).__module__.split('.')[-1]}.{type(self.config).__name__}"
        entries = {"AutoConfig": config_ref, "AutoModel": model_ref}
        entries.update({auto_class: model_ref for auto_class in self._extra_auto_classes})
        return entries

    def save_pretrained(self, save_directory, *args, **kwargs):
        # A config object shared between models (or reloaded from another class's folder) may carry a stale
        # auto_map; rebuild it for exactly this class so AutoModel returns what was saved.
        self.config.auto_map = self.auto_map()
        return super().save_pretrained(save_directory, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Vision encoder
# ----------------------------------------------------------------------------------------------------------------


class ReCTVisionModel(ReCTPreTrainedModel):
    """3D CT vision encoder: Conv3d patches → slice-aware (or joint) transformer → global, local, region features."""

    config: ReCTVisionConfig
    config_class = ReCTVisionConfig
    base_model_prefix = "vision_model"
    input_modalities = ("image",)

    def __init__(self, config: ReCTVisionConfig):
        super().__init__(config)
        self.embeddings = ReCTPatchEmbeddings(config)
        self.layers = nn.ModuleList([ReCTLayer(config) for _ in range(config.num_hidden_layers)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.region_attention = ReCTRegionAttention(config) if config.num_regions > 0 else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.projection

    def forward(
        self, pixel_values: torch.Tensor, anatomy_mask: torch.Tensor | None = None, **kwargs
    ) -> ReCTVisionModelOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, channels, depth, height, width)`): processed CT;
                every spatial size must be divisible by `patch_size`.
            anatomy_mask (`torch.LongTensor` of shape `(batch, 1, depth, height, width)`, *optional*): region ids
                0..`num_regions` on the same grid as `pixel_values`; enables `region_features`.
            kwargs: `output_hidden_states`, `output_attentions` (with divided attention this also returns
                `depth_attentions`), `output_stem_features`, `return_dict`, and attention-implementation arguments.
        """
        output_attentions = kwargs.get("output_attentions", self.config.output_attentions)
        if output_attentions and self.config.attention_type == "divided":
            kwargs.setdefault("output_depth_attentions", True)
        return self._encode(pixel_values, anatomy_mask, **kwargs)

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def _encode(
        self,
        pixel_values: torch.Tensor,
        anatomy_mask: torch.Tensor | None = None,
        output_stem_features: bool = False,
        **kwargs,
    ) -> ReCTVisionModelOutput:
        if anatomy_mask is not None and tuple(anatomy_mask.shape[-3:]) != tuple(pixel_values.shape[-3:]):
            raise ValueError(
                f"`anatomy_mask` spatial shape {tuple(anatomy_mask.shape[-3:])} must equal `pixel_values` spatial "
                f"shape {tuple(pixel_values.shape[-3:])}"
            )
        hidden_states, grid, stem_features = self.embeddings(pixel_values)
        for layer in self.layers:
            hidden_states = layer(hidden_states, grid, **kwargs)
        last_hidden_state = self.layernorm(hidden_states)
        patch_tokens = last_hidden_state[:, self.config.num_prefix_tokens :]

        region_features = region_present = None
        if anatomy_mask is not None:
            if self.region_attention is None:
                raise ValueError("`anatomy_mask` was given but the config has `num_regions=0`")
            region_features, region_present = self.region_attention(patch_tokens, anatomy_mask)
        return ReCTVisionModelOutput(
            last_hidden_state=last_hidden_state,
            pooler_output=last_hidden_state[:, 0] if self.config.use_cls_token else patch_tokens.mean(dim=1),
            region_features=region_features,
            region_present=region_present,
            stem_features=stem_features if output_stem_features and stem_features else None,
        )


class ReCTForFeatureExtraction(ReCTPreTrainedModel):
    """Vision encoder + projections → L2-normalised global and region embeddings (for retrieval and reuse).

    Loads from a [`ReCTModel`] folder too (its `vision_config`, vision tower and image projections).
    """

    config: ReCTVisionConfig
    config_class = ReCTVisionConfig
    base_model_prefix = "vision_model"
    input_modalities = ("image",)

    def __init__(self, config: ReCTVisionConfig):
        super().__init__(config)
        self.vision_model = ReCTVisionModel._from_config(config)
        self.projection = ReCTProjectionHead(config.hidden_size, config.projection_dim)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.get_input_embeddings()

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor, anatomy_mask: torch.Tensor | None = None, **kwargs
    ) -> ReCTFeatureExtractionOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, channels, depth, height, width)`).
            anatomy_mask (`torch.LongTensor` of shape `(batch, 1, depth, height, width)`, *optional*).
        """
        vision = self.vision_model(pixel_values, anatomy_mask, **kwargs)
        image_embeds, region_embeds = self.projection(vision)
        return ReCTFeatureExtractionOutput(
            image_embeds=image_embeds,
            region_embeds=region_embeds,
            region_present=vision.region_present,
            last_hidden_state=vision.last_hidden_state,
            hidden_states=vision.hidden_states,
            attentions=vision.attentions,
        )


# ----------------------------------------------------------------------------------------------------------------
# Contrastive dual encoder
# ----------------------------------------------------------------------------------------------------------------


class ReCTModel(ReCTPreTrainedModel):
    """CLIP-style dual encoder: 3D CT vision tower + any BERT-like text tower, with region–report alignment.

    Also the zero-shot classifier: [`~ReCTModel.zero_shot_logits`] scores findings from positive and negative
    text prompts, with no labelled training.
    """

    main_input_name = "input_ids"

    def __init__(self, config: ReCTConfig):
        super().__init__(config)
        self.vision_model = ReCTVisionModel._from_config(config.vision_config)
        # Any BERT-like encoder, built as LLaVA builds its towers: the sub-config carries the attention
        # implementation and dtype chosen for the whole model.
        self.text_model = AutoModel.from_config(config.text_config)
        if config.text_pooling != "pooler" and isinstance(getattr(self.text_model, "pooler", None), nn.Module):
            # BERT-style pooler layers would never get a gradient (DDP with find_unused_parameters=False fails on
            # them); BERT-family models skip a `None` pooler.
            self.text_model.pooler = None
        self.projection = ReCTProjectionHead(config.vision_config.hidden_size, config.projection_dim)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.contrastive_head = ReCTContrastiveHead(config.logit_scale_init_value)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.text_model.set_input_embeddings(value)

    def _pool_text(self, text_outputs, attention_mask: torch.Tensor | None) -> torch.Tensor:
        pooling = self.config.text_pooling
        if pooling == "pooler":
            if getattr(text_outputs, "pooler_output", None) is None:
                raise ValueError(
                    f"`text_pooling='pooler'` but the text model {type(self.text_model).__name__} returns no "
                    "pooler_output; use 'cls' or 'mean'"
                )
            return text_outputs.pooler_output
        tokens = text_outputs.last_hidden_state
        if pooling == "cls":
            return tokens[:, 0]
        if attention_mask is None:
            return tokens.mean(dim=1)
        weights = attention_mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        r"""The text tower's output with the projected (not yet L2-normalised) text embedding
        `(batch, projection_dim)` in `pooler_output`, as CLIP's `get_text_features` in transformers 5.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq_len)`), attention_mask, token_type_ids: tokenised
                text (a report, a prompt).
        """
        text_kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            text_kwargs["token_type_ids"] = token_type_ids
        text_outputs = self.text_model(**text_kwargs, **kwargs, return_dict=True)
        projected = self.text_projection(self._pool_text(text_outputs, attention_mask))
        return BaseModelOutputWithPooling(
            last_hidden_state=text_outputs.last_hidden_state,
            pooler_output=projected,
            hidden_states=getattr(text_outputs, "hidden_states", None),
            attentions=getattr(text_outputs, "attentions", None),
        )

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, anatomy_mask: torch.Tensor | None = None, **kwargs
    ) -> ReCTVisionModelOutput:
        r"""The vision tower's output with the projected (not yet L2-normalised) global image embedding
        `(batch, projection_dim)` in `pooler_output`.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, channels, depth, height, width)`).
            anatomy_mask (`torch.LongTensor` of shape `(batch, 1, depth, height, width)`, *optional*).
        """
        vision = self.vision_model(pixel_values, anatomy_mask, **kwargs, return_dict=True)
        vision.pooler_output = self.projection.visual_projection(vision.pooler_output)
        return vision

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        anatomy_mask: torch.Tensor | None = None,
        region_mentions: torch.Tensor | None = None,
        return_loss: bool | None = None,
        output_stem_features: bool = False,
        **kwargs,
    ) -> ReCTOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq_len)`): tokenised reports, paired row by row with
                the volumes.
            pixel_values (`torch.FloatTensor` of shape `(batch, channels, depth, height, width)`).
            anatomy_mask (`torch.LongTensor` of shape `(batch, 1, depth, height, width)`, *optional*).
            region_mentions (`torch.Tensor` of shape `(batch, num_regions)`, *optional*): 1 where the report
                mentions region r (id r + 1); adds the region alignment loss (needs `anatomy_mask`).
            return_loss (`bool`, *optional*): compute `loss` (as CLIP: off unless asked; InfoNCE needs batch ≥ 2
                to mean anything). Training collators pass `return_loss=True`.
            output_stem_features (`bool`, defaults to `False`): keep the vision stem's feature maps in
                `vision_model_output`, for a head that reads them (the classifier's lesion map, when a composite
                model shares this encoder pass); the text tower never sees this flag.
        """
        if input_ids is None or pixel_values is None:
            raise ValueError("ReCTModel.forward needs both `input_ids` and `pixel_values`")
        if region_mentions is not None and anatomy_mask is None:
            raise ValueError("`region_mentions` needs `anatomy_mask`: region features come from the anatomy mask")
        vision = self.vision_model(
            pixel_values, anatomy_mask, output_stem_features=output_stem_features, **kwargs, return_dict=True
        )
        image_embeds, region_embeds = self.projection(vision)
        text_kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            text_kwargs["token_type_ids"] = token_type_ids
        text_outputs = self.text_model(**text_kwargs, **kwargs, return_dict=True)
        text_embeds = F.normalize(self.text_projection(self._pool_text(text_outputs, attention_mask)), dim=-1)

        head = self.contrastive_head
        logits_per_text = head.scale(head.logit_scale) * text_embeds @ image_embeds.t()
        region_logits = None
        if region_embeds is not None:
            similarity = torch.einsum("brp,bp->br", region_embeds, text_embeds)
            region_logits = head.scale(head.region_logit_scale) * similarity + head.region_logit_bias

        loss = global_loss = region_loss = None
        if return_loss:
            global_loss = contrastive_loss(logits_per_text)
            loss = global_loss
            if region_mentions is not None:
                if tuple(region_mentions.shape) != tuple(region_logits.shape):
                    raise ValueError(
                        f"`region_mentions` must be (batch, num_regions) = {tuple(region_logits.shape)}, "
                        f"got {tuple(region_mentions.shape)}"
                    )
                region_loss = region_alignment_loss(region_logits, region_mentions, vision.region_present)
                loss = loss + self.config.region_alignment_weight * region_loss

        return ReCTOutput(
            loss=loss,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            region_embeds=region_embeds,
            region_present=vision.region_present,
            region_logits=region_logits,
            contrastive_loss=global_loss,
            region_loss=region_loss,
            vision_model_output=vision,
            text_model_output=text_outputs,
        )

    @torch.no_grad()
    def zero_shot_logits(
        self,
        pixel_values: torch.Tensor,
        positive_prompts: Mapping[str, torch.Tensor],
        negative_prompts: Mapping[str, torch.Tensor],
        anatomy_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""Zero-shot finding scores from text prompts: one positive and one negative prompt per finding.

        For each finding f the volume's scaled cosine similarity to its positive prompt ("pleural effusion is
        present") and to its negative prompt ("no pleural effusion") are compared as a two-way softmax, as CT-CLIP
        scores findings; the returned logit is their difference, so `sigmoid(logit)` is the probability of the
        positive prompt.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, channels, depth, height, width)`).
            positive_prompts, negative_prompts (`dict` / `BatchEncoding`): tokenised prompts (`input_ids`,
                `attention_mask`, optionally `token_type_ids`), each `(num_findings, seq_len)`, row f for finding f
                (e.g. `processor(text=[...], padding=True)`).
            anatomy_mask (`torch.LongTensor` of shape `(batch, 1, depth, height, width)`, *optional*).

        Returns:
            `torch.FloatTensor` of shape `(batch, num_findings)`: logit that finding f is present.

        Raises:
            TypeError: prompts given as strings (tokenise them first). ValueError: missing `input_ids`, or a
                different number of positive and negative prompts.
        """
        encoded = []
        for name, prompts in (("positive_prompts", positive_prompts), ("negative_prompts", negative_prompts)):
            if isinstance(prompts, (str, list, tuple)):
                raise TypeError(
                    f"`{name}` must be tokenised (a dict with `input_ids` and `attention_mask`); tokenise the prompt "
                    "strings with the ReCTProcessor or the text tokenizer first"
                )
            if "input_ids" not in prompts:
                raise ValueError(f"`{name}` must contain `input_ids`, got keys {sorted(prompts)}")
            features = self.get_text_features(
                prompts["input_ids"], prompts.get("attention_mask"), prompts.get("token_type_ids")
            ).pooler_output
            encoded.append(F.normalize(features, dim=-1))
        positive, negative = encoded
        if positive.shape[0] != negative.shape[0]:
            raise ValueError(
                f"one negative prompt per positive prompt: got {positive.shape[0]} positive and "
                f"{negative.shape[0]} negative prompts"
            )
        image = F.normalize(self.get_image_features(pixel_values, anatomy_mask).pooler_output, dim=-1)
        scale = self.contrastive_head.scale(self.contrastive_head.logit_scale)
        return scale * (image @ positive.t() - image @ negative.t())


# ----------------------------------------------------------------------------------------------------------------
# Classification head
# ----------------------------------------------------------------------------------------------------------------


def pool_vision_features(vision, num_prefix_tokens: int, pooling: str) -> torch.Tensor:
    """`(batch, k * hidden)`: the features named in `pooling` ("cls", "cls_mean" or "cls_mean_max") of a
    `ReCTVisionModel` output, concatenated. "cls" is the encoder's pooled output (the CLS token, or the patch mean
    for an encoder without one); "mean" and "max" pool the patch tokens of the last layer."""
    tokens = vision.last_hidden_state[:, num_prefix_tokens:]
    pooled = {"cls": vision.pooler_output, "mean": tokens.mean(dim=1), "max": tokens.amax(dim=1)}
    return torch.cat([pooled[name] for name in pooling.split("_")], dim=-1)


def encode_or_reuse(
    vision_model: nn.Module, pixel_values: torch.Tensor | None, vision_outputs: ModelOutput | None, kwargs: dict
) -> ReCTVisionModelOutput:
    """`vision_model(pixel_values, **kwargs)`, or the `vision_outputs` a caller computed for the same volumes (a head
    sharing its encoder with another: one encoder pass for both). Exactly one of the two must be given."""
    if (pixel_values is None) == (vision_outputs is None):
        raise ValueError(
            "give either `pixel_values` or `vision_outputs` (an encoder output for these volumes), not "
            + ("both" if pixel_values is not None else "neither")
        )
    if vision_outputs is not None:
        return check_vision_outputs(vision_outputs, vision_model.config)
    return vision_model(pixel_values, **kwargs, return_dict=True)


def check_vision_outputs(
    vision_outputs: ModelOutput, vision_config, batch: int | None = None, tokens: int | None = None
) -> ReCTVisionModelOutput:
    """`vision_outputs` handed to a head instead of `pixel_values`, checked: `last_hidden_state` is `(batch, tokens,
    vision_config.hidden_size)` (`batch`/`tokens` only where the caller knows them).

    Raises:
        ValueError: any other shape (an output of another encoder, or of other volumes).
    """
    shape = tuple(getattr(vision_outputs, "last_hidden_state", torch.empty(0)).shape)
    expected = (batch, tokens, vision_config.hidden_size)
    if len(shape) != 3 or any(e is not None and e != s for e, s in zip(expected, shape)):
        written = tuple("*" if e is None else e for e in expected)
        raise ValueError(
            f"`vision_outputs.last_hidden_state` must be (batch, tokens, hidden) = {written} (an output of this "
            f"model's encoder for these volumes), got {shape}"
        )
    return vision_outputs


class ReCTForVolumeClassification(ReCTPreTrainedModel):
    """Abnormality classifier (18 CT-RATE labels by default, multi-label) on the 3D vision encoder alone.

    Shaped like `SiglipForImageClassification`: the vision tower (`_from_config`) and a linear head that reads the CLS
    feature, concatenated (per `config.classifier_pooling`) with the mean and the max of the patch tokens. Text
    prompts and zero-shot scoring live on [`ReCTModel`]. `from_pretrained` on a [`ReCTModel`],
    [`ReCTForFeatureExtraction`] or [`ReCTVisionModel`] folder loads the pre-trained encoder and reports the head as
    newly initialised.
    """

    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _auto_class = "AutoModelForImageClassification"
    _extra_auto_classes = ("AutoModelForImageClassification",)

    def __init__(self, config: ReCTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        # The head reads CLS/mean/max token features only, so the tower is built without region queries (they
        # would never get a gradient); a pre-trained encoder's region weights are reported as unused on loading.
        vision_config = copy.deepcopy(config.vision_config)
        vision_config.num_regions = 0
        self.vision_model = ReCTVisionModel._from_config(vision_config)
        hidden = config.vision_config.hidden_size
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(len(config.classifier_pooling.split("_")) * hidden, config.num_labels)
        self.lesion_token_classifier = None
        if config.lesion_token_loss_weight > 0:
            self.lesion_token_classifier = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, config.num_labels))
        self.lesion_map_decoder = None
        if config.lesion_map_channels:
            self.lesion_map_decoder = ReCTLesionMapDecoder(
                config.vision_config, config.lesion_map_channels, config.lesion_map_depth, config.num_labels
            )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.get_input_embeddings()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        lesion_tokens: torch.Tensor | None = None,
        lesion_maps: torch.Tensor | None = None,
        vision_outputs: ReCTVisionModelOutput | None = None,
        **kwargs,
    ) -> ReCTVolumeClassifierOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, channels, depth, height, width)`): the volumes;
                or give `vision_outputs` instead.
            labels (`torch.Tensor`, *optional*): `(batch, num_labels)` 0/1 floats for multi-label (BCE, weighted by
                `config.pos_weight` when set), `(batch,)` integer class ids for single-label, floats for
                regression. An unset `config.problem_type` is inferred from the first labels, as transformers does.
            lesion_tokens (`torch.FloatTensor` of shape `(batch, num_patches, num_labels)`, *optional*): training
                targets of the auxiliary token head (`config.lesion_token_loss_weight` > 0): 1 where patch token n
                (in the encoder's (depth, height, width) order) holds a lesion of label l, else 0.
            lesion_maps (`torch.Tensor` of shape `(batch, num_labels, D / s, H / s, W / s)`, *optional*): training
                targets of the lesion-map decoder (`config.lesion_map_channels`; s = `config.lesion_map_stride`): 1
                where a cell of the map's grid covers a lesion of label l, else 0.
            vision_outputs ([`ReCTVisionModelOutput`], *optional*): what `self.vision_model` (or an encoder with the
                same weights, such as a [`ReCTModel`]'s) returned for these volumes, with `hidden_states` when
                `lesion_tokens` is given and `stem_features` when the model has a lesion-map decoder; the head reads
                it instead of encoding `pixel_values` again.

        Raises:
            ValueError: neither or both of `pixel_values` and `vision_outputs`, `vision_outputs` without the hidden
                states `lesion_tokens` need or the stem features the lesion map needs; `lesion_tokens` without a
                token head, `lesion_maps` without a lesion-map decoder, or either of the wrong shape; an
                `anatomy_mask`.
        """
        if kwargs.get("anatomy_mask") is not None:
            raise ValueError(
                "ReCTForVolumeClassification reads CLS/mean/max token features and takes no `anatomy_mask`; "
                "region features come from ReCTVisionModel / ReCTModel"
            )
        kwargs.pop("anatomy_mask", None)
        if lesion_tokens is not None:
            if self.lesion_token_classifier is None:
                raise ValueError(
                    "`lesion_tokens` needs the auxiliary token head: build the model with "
                    "`config.lesion_token_loss_weight` > 0"
                )
            kwargs["output_hidden_states"] = True
        if lesion_maps is not None and self.lesion_map_decoder is None:
            raise ValueError(
                "`lesion_maps` needs the lesion-map decoder: build the model with `config.lesion_map_channels`"
            )
        if self.lesion_map_decoder is not None:
            kwargs["output_stem_features"] = True
        vision = encode_or_reuse(self.vision_model, pixel_values, vision_outputs, kwargs)
        if lesion_tokens is not None and vision.hidden_states is None:
            raise ValueError("`lesion_tokens` read the last layer's hidden states: `vision_outputs` has none")
        prefix = self.vision_model.config.num_prefix_tokens
        features = pool_vision_features(vision, prefix, self.config.classifier_pooling)
        logits = self.classifier(self.dropout(features))
        lesion_map_logits = lesion_map_loss = None
        if self.lesion_map_decoder is not None:
            if vision.stem_features is None:
                raise ValueError(
                    "the lesion-map decoder reads the stem's feature maps: `vision_outputs` has no `stem_features` "
                    "(encode with `output_stem_features=True`)"
                )
            lesion_map_logits = self.lesion_map_decoder(vision.last_hidden_state[:, prefix:], vision.stem_features)
            logits = logits + lesion_map_logits.flatten(2).amax(dim=2)
            if lesion_maps is not None:
                if tuple(lesion_maps.shape) != tuple(lesion_map_logits.shape):
                    raise ValueError(
                        f"`lesion_maps` must be (batch, num_labels, D / s, H / s, W / s) = "
                        f"{tuple(lesion_map_logits.shape)}, got {tuple(lesion_maps.shape)}"
                    )
                pos_weight = torch.tensor(self.config.lesion_map_pos_weight, dtype=lesion_map_logits.dtype)
                lesion_map_loss = F.binary_cross_entropy_with_logits(
                    lesion_map_logits, lesion_maps.to(lesion_map_logits.dtype), pos_weight=pos_weight.to(logits.device)
                )
        classification_loss = None if labels is None else self.classification_loss(logits, labels)
        lesion_token_loss = None
        if lesion_tokens is not None:
            tokens = vision.hidden_states[-1][:, prefix:]
            expected = (tokens.shape[0], tokens.shape[1], self.num_labels)
            if tuple(lesion_tokens.shape) != expected:
                raise ValueError(
                    f"`lesion_tokens` must be (batch, num_patches, num_labels) = {expected}, got "
                    f"{tuple(lesion_tokens.shape)}"
                )
            lesion_token_loss = F.binary_cross_entropy_with_logits(
                self.lesion_token_classifier(tokens), lesion_tokens.to(tokens.dtype)
            )
        loss = classification_loss
        for term, weight in (
            (lesion_token_loss, self.config.lesion_token_loss_weight),
            (lesion_map_loss, self.config.lesion_map_loss_weight),
        ):
            if term is not None:
                loss = weight * term if loss is None else loss + weight * term
        auxiliary = lesion_token_loss is not None or lesion_map_loss is not None
        return ReCTVolumeClassifierOutput(
            loss=loss,
            logits=logits,
            classification_loss=classification_loss if auxiliary else None,
            lesion_token_loss=lesion_token_loss,
            lesion_map_loss=lesion_map_loss,
            lesion_map_logits=lesion_map_logits,
            pooler_output=vision.pooler_output,
            hidden_states=vision.hidden_states,
            attentions=vision.attentions,
        )

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss per `config.problem_type`, inferred on first use as `ForSequenceClassificationLoss` does."""
        config = self.config
        if config.problem_type is None:
            if self.num_labels == 1:
                config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                config.problem_type = "single_label_classification"
            else:
                config.problem_type = "multi_label_classification"
        problem = config.problem_type
        if problem == "multi_label_classification":
            if tuple(labels.shape) != tuple(logits.shape):
                raise ValueError(
                    f"multi-label `labels` must be (batch, num_labels) = {tuple(logits.shape)}, "
                    f"got {tuple(labels.shape)} (integer class ids `(batch,)` mean single-label)"
                )
            pos_weight = config.pos_weight
            if pos_weight is not None:
                pos_weight = torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), pos_weight=pos_weight)
        if problem == "single_label_classification":
            if labels.is_floating_point():
                raise ValueError(
                    f"single-label `labels` must be integer class ids of shape (batch,), got dtype {labels.dtype}"
                )
            return F.cross_entropy(logits, labels.long().view(-1))
        if problem == "regression":
            labels = labels.to(logits.dtype)
            if self.num_labels == 1:
                return F.mse_loss(logits.squeeze(-1), labels.view(-1))
            return F.mse_loss(logits, labels)
        raise ValueError(
            f"unsupported `problem_type` {problem!r}; expected 'multi_label_classification', "
            "'single_label_classification' or 'regression'"
        )


__all__ = [
    "ReCTPreTrainedModel",
    "ReCTVisionModel",
    "ReCTForFeatureExtraction",
    "ReCTModel",
    "ReCTForVolumeClassification",
    "ReCTVisionModelOutput",
    "ReCTFeatureExtractionOutput",
    "ReCTOutput",
    "ReCTVolumeClassifierOutput",
]
