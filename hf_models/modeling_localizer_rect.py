"""ReCT-VLM lesion localizer: text, point and box prompts → 3D mask logits at the processor's resolution.

`ReCTForLesionLocalization` = the 3D vision encoder ([`ReCTVisionModel`]) + a BERT-like text tower (the prompt
embedder) + a two-way prompt/image fusion transformer (SAM's mask decoder, in 3D; the seeds' "denoising
transformer") + an attention U-Net decoder whose skip connections come from several encoder layers (as UNETR) and
from a convolutional pyramid over the input volume. Each of the K prompts of a volume gets its own mask and a
predicted IoU.

As in SAM, the expensive part runs once per volume and the prompts only steer it: the U-Net decodes the volume once
into per-voxel mask features at each of its stages (points and the box enter it as dense maps beside the input
volume, SAM's dense prompt embedding), and each prompt's mask is the dot product of those features with weights made
from its fused mask token (SAM's hypernetwork), plus that prompt's coarse mask at the patch grid, read from the
image tokens after fusion; the coarser maps are resized trilinearly and summed. Asking for K masks of one volume
costs K fusion passes at the patch grid and K dot products, not K decoders.

Prompt names and layouts follow transformers' SAM: `input_ids` / `attention_mask` `(batch, K, seq)` (or `(batch,
seq)` for K = 1), `input_points (batch, P, 3)` with `input_labels (batch, P)` (1 positive, 0 negative, any negative
value padding: -1, or SAM's pad value -10),
`input_boxes (batch, 6)` as (z0, y0, x0, z1, y1, x1); coordinates are voxel indices (depth, height, width) of the
processed volume. Points and boxes apply to every one of the K prompts of their volume. A box is by default a region
of interest (`localizer_config.box_prompt = "roi"`): the masks are cut to it, and with a text prompt it steers
nothing else; `"dense"` makes it SAM's box prompt (corner tokens and a dense map) with no cut.
"""

import copy
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel
from transformers.utils import ModelOutput, can_return_tuple
from transformers.utils.import_utils import is_torchdynamo_compiling

from .configuration_rect import ReCTConfig, ReCTLocalizerConfig
from .modeling_rect import (
    ReCTAttention,
    ReCTConv3d,
    ReCTConvTranspose3d,
    ReCTMLP,
    ReCTPreTrainedModel,
    ReCTVisionModel,
    ReCTVisionModelOutput,
    check_vision_outputs,
)
from .volume_geometry_rect import OUTSIDE_BOX_LOGIT  # the logit outside a region-of-interest box: finite losses


#: Dense prompt maps the decoder reads beside the volume: box (+1 inside, −1 outside, 0 without a box), positive
#: points and negative points (Gaussian bumps of `point_sigma` voxels, 0 without points).
NUM_DENSE_PROMPTS = 3

#: Memory format of the decoder's convolutions: channels-last, in which oneDNN's 3D convolutions with few channels
#: (8–64 here) run several times faster on the CPU than in PyTorch's default layout, forward and backward
#: (`bench/localizer_step.py` times a training step both ways). The results are the same up to float rounding.
DECODER_MEMORY_FORMAT = torch.channels_last_3d


@dataclass
class ReCTLesionLocalizationOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*): `dice_weight · dice_loss + focal_weight · focal_loss +
        iou_weight · iou_loss` (+ `deep_supervision_loss`), when `labels` are given.
    pred_masks (`torch.FloatTensor` of shape `(batch, K, depth, height, width)`): mask logits per prompt, at the
        resolution of `pixel_values`.
    iou_scores (`torch.FloatTensor` of shape `(batch, K)`): predicted IoU of each mask (after a sigmoid).
    dice_loss, focal_loss, iou_loss (`torch.FloatTensor` of shape `()`, *optional*): the loss terms.
    deep_supervision_loss (`torch.FloatTensor` of shape `()`, *optional*): the weighted Dice and focal losses of the
        coarser masks (`localizer_config.deep_supervision_weight` > 0).
    vision_hidden_states (`tuple[torch.FloatTensor]`): encoder hidden states (embeddings and every layer).
    """

    loss: torch.FloatTensor | None = None
    pred_masks: torch.FloatTensor | None = None
    iou_scores: torch.FloatTensor | None = None
    dice_loss: torch.FloatTensor | None = None
    focal_loss: torch.FloatTensor | None = None
    iou_loss: torch.FloatTensor | None = None
    deep_supervision_loss: torch.FloatTensor | None = None
    vision_hidden_states: tuple[torch.FloatTensor, ...] | None = None


def fourier_features(coords: torch.Tensor, num_frequencies: int) -> torch.Tensor:
    """`(..., 3)` coordinates normalised to [0, 1] → `(..., 6 · num_frequencies)` sines and cosines at frequencies
    π·2^0 … π·2^(F-1) per axis (deterministic, so nothing random needs saving)."""
    frequencies = math.pi * 2.0 ** torch.arange(num_frequencies, device=coords.device, dtype=coords.dtype)
    angles = (coords.unsqueeze(-1) * frequencies).flatten(-2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def linear_resize_matrix(in_size: int, out_size: int, dtype=None, device=None) -> torch.Tensor:
    """`(out_size, in_size)` weights of 1D linear interpolation as `F.interpolate(mode="linear", align_corners=False)`
    computes it: a trilinear resize is three of these, one per axis (`einsum`), whose backward pass is a matrix
    product instead of a scatter over every output voxel. Built once per size pair (cached), then cast."""
    weights = _linear_resize_weights(int(in_size), int(out_size))
    return weights.to(dtype=dtype or torch.get_default_dtype(), device=device)


@functools.lru_cache(maxsize=64)
def _linear_resize_weights(in_size: int, out_size: int) -> torch.Tensor:
    source = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
    low = source.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    frac = source - low
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    weights.index_put_((rows, low), 1 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights


def linear_resize(maps: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """`(..., d, h, w)` → `(..., *size)` by trilinear interpolation (`F.interpolate(mode="trilinear",
    align_corners=False)`), as one matrix product per axis."""
    if tuple(maps.shape[-3:]) == tuple(size):
        return maps
    depth, height, width = (linear_resize_matrix(n, s, maps.dtype, maps.device) for n, s in zip(maps.shape[-3:], size))
    maps = maps @ width.T
    maps = (maps.transpose(-1, -2) @ height.T).transpose(-1, -2)
    return torch.einsum("...ayx,za->...zyx", maps, depth)


def decoder_scales(patch_size) -> list[tuple[int, int, int]]:
    """Upsampling factor per decoder stage, coarse to fine: ×2 along each axis until it reaches its patch side.

    Raises:
        ValueError: a patch side that is not a power of two (the ×2 stages could not reach it).
    """
    if any(p < 1 or p & (p - 1) for p in patch_size):
        raise ValueError(
            f"the localizer's decoder doubles the resolution per stage: every side of `vision_config.patch_size` "
            f"must be a power of two, got {tuple(patch_size)}"
        )
    stages = max(int(math.log2(p)) for p in patch_size)
    return [tuple(2 if 2 ** (s + 1) <= p else 1 for p in patch_size) for s in range(stages)]


def default_skip_layers(num_layers: int, num_skips: int) -> list[int]:
    """Encoder layers for `num_skips` skip connections, coarse to fine: evenly spaced from the last layer down
    (UNETR's 12 → 9, 6, 3 for a 12-layer encoder and three skips)."""
    return [round(num_layers * (num_skips - s) / (num_skips + 1)) for s in range(num_skips)]


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float, reduction: str = "mean"
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017; torchvision's `sigmoid_focal_loss`) of masks `(M, voxels)`.

    `reduction="mean"`: the mean over every element, each weighted by `alpha` (target) or `1 − alpha` (background).
    `"balanced"`: per mask, `alpha` × the mean over its target voxels + `(1 − alpha)` × the mean over the others (a
    mask with an empty target or no background has that part 0), then the mean over the masks.
    """
    probabilities = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probabilities * targets + (1 - probabilities) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if reduction == "balanced":
        background = 1 - targets
        inside = (loss * targets).sum(dim=1) / targets.sum(dim=1).clamp(min=1.0)
        outside = (loss * background).sum(dim=1) / background.sum(dim=1).clamp(min=1.0)
        return (alpha * inside + (1 - alpha) * outside).mean()
    if reduction != "mean":
        raise ValueError(f"sigmoid_focal_loss: reduction must be 'mean' or 'balanced', got {reduction!r}")
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean()


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 − soft Dice per mask `(M, voxels)`, averaged over the masks whose target is not empty.

    A mask with an empty target has no Dice (0/0): it is left out here, and the focal loss (which penalises every
    false-positive voxel) is what trains it, so predicting nothing is never rewarded by a Dice of 1 and nothing is
    divided by zero. With no non-empty target at all the term is 0 (still attached to the graph).
    """
    probabilities = logits.sigmoid()
    present = targets.sum(dim=1) > 0
    intersection = (probabilities * targets).sum(dim=1)
    denominator = probabilities.sum(dim=1) + targets.sum(dim=1)
    dice = 2 * intersection / denominator.clamp(min=1e-6)
    weights = present.to(logits.dtype)
    return ((1 - dice) * weights).sum() / weights.sum().clamp(min=1.0)


class ReCTFusionLayer(nn.Module):
    """One two-way fusion layer: prompt self-attention, prompt→image cross-attention, MLP, image→prompt
    cross-attention; pre-norm, residual. Position encodings are added to queries and keys at every attention, as in
    SAM's two-way transformer."""

    def __init__(self, config: ReCTLocalizerConfig):
        super().__init__()
        self.self_attention = ReCTAttention(config)
        self.prompt_to_image = ReCTAttention(config)
        self.image_to_prompt = ReCTAttention(config)
        self.mlp = ReCTMLP(config)
        self.norms = nn.ModuleList([nn.LayerNorm(config.hidden_size) for _ in range(5)])

    def forward(
        self,
        prompts: torch.Tensor,
        image: torch.Tensor,
        prompt_pe: torch.Tensor,
        image_pe: torch.Tensor,
        prompt_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts `(M, T, C)`, image `(M, N, C)`, their position encodings, `prompt_mask` `(M, 1, 1, T)` additive
        (−inf-like on padding prompt tokens) → updated prompts and image tokens."""
        q = self.norms[0](prompts)
        prompts = prompts + self.self_attention(q + prompt_pe, attention_mask=prompt_mask)[0]
        q = self.norms[1](prompts)
        kv = self.norms[2](image)
        # Cross-attention: keys carry their positions, values do not (ReCTAttention projects one tensor for both,
        # so the position is added before projection to keys and values alike, as in a ViT's absolute encodings).
        prompts = prompts + self.prompt_to_image(q + prompt_pe, key_value_states=kv + image_pe)[0]
        prompts = prompts + self.mlp(self.norms[3](prompts))
        q = self.norms[4](image)
        image = image + self.image_to_prompt(q + image_pe, key_value_states=prompts + prompt_pe,
                                             attention_mask=prompt_mask)[0]  # fmt: skip
        return prompts, image


class ReCTAttentionGate(nn.Module):
    """Attention U-Net gate (Oktay et al. 2018): skip features × sigmoid(ψ(ReLU(W_x·skip + W_g·decoder)))."""

    def __init__(self, skip_channels: int, gate_channels: int, inner_channels: int):
        super().__init__()
        self.skip_proj = ReCTConv3d(skip_channels, inner_channels, kernel_size=1)
        self.gate_proj = ReCTConv3d(gate_channels, inner_channels, kernel_size=1)
        self.psi = ReCTConv3d(inner_channels, 1, kernel_size=1)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return skip * torch.sigmoid(self.psi(F.relu(self.skip_proj(skip) + self.gate_proj(gate))))


class ReCTConvBlock(nn.Module):
    """Two 3×3×3 convolutions with GroupNorm and GELU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        groups = math.gcd(8, out_channels)
        self.block = nn.Sequential(
            ReCTConv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.GELU(),
            ReCTConv3d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.GELU(),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.block(hidden_states.contiguous(memory_format=DECODER_MEMORY_FORMAT))


class ReCTDecoderStage(nn.Module):
    """Upsample ×`scale` (transposed convolution), gate the skip features with the upsampled decoder features,
    concatenate, convolve."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, scale: tuple[int, int, int]):
        super().__init__()
        self.upsample = ReCTConvTranspose3d(in_channels, out_channels, kernel_size=scale, stride=scale)
        self.gate = ReCTAttentionGate(skip_channels, out_channels, max(out_channels // 2, 1))
        self.block = ReCTConvBlock(out_channels + skip_channels, out_channels)

    def forward(self, hidden_states: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        hidden_states = self.upsample(hidden_states)
        return self.block(torch.cat([hidden_states, self.gate(skip, hidden_states)], dim=1))


class ReCTInputPyramid(nn.Module):
    """The input volume and the dense prompt maps → features at every decoder stage's resolution: a conv block at
    full resolution, then per stage, fine to coarse, a strided convolution undoing that stage's upsampling and a conv
    block (a U-Net's contracting path). Its high-resolution detail; the encoder's tokens give the semantics."""

    def __init__(self, in_channels: int, channels: list[int], scales: list[tuple[int, int, int]]):
        super().__init__()
        self.full = ReCTConvBlock(in_channels, channels[-1])
        self.downs = nn.ModuleList()
        for s in range(len(channels) - 1, 0, -1):  # stage s's resolution → stage s - 1's
            self.downs.append(
                nn.Sequential(
                    ReCTConv3d(channels[s], channels[s - 1], kernel_size=scales[s], stride=scales[s], bias=False),
                    nn.GroupNorm(math.gcd(8, channels[s - 1]), channels[s - 1]),
                    nn.GELU(),
                    ReCTConvBlock(channels[s - 1], channels[s - 1]),
                )
            )

    def forward(self, volume: torch.Tensor) -> list[torch.Tensor]:
        """→ features per decoder stage, coarse to fine (stage order)."""
        features = [self.full(volume)]  # channels-last from here on (see `ReCTConvBlock`)
        for down in self.downs:
            features.append(down(features[-1]))
        return features[::-1]


class ReCTForLesionLocalization(ReCTPreTrainedModel):
    """Promptable 3D lesion (and anatomy) segmentation: text, point and box prompts → mask logits and IoU scores.

    Built from a [`ReCTConfig`]: its `vision_config` (the encoder, without region queries), `text_config` (the prompt
    embedder) and `localizer_config` ([`ReCTLocalizerConfig`]; None = defaults, stored in the config). Loads the
    encoder and text tower of a [`ReCTModel`] folder with `from_pretrained` (the fusion and decoder start new).
    `AutoModel` on a saved localizer folder returns this class, as does `AutoModelForMaskGeneration`.
    """

    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    _auto_class = "AutoModel"
    _extra_auto_classes = ("AutoModelForMaskGeneration",)
    _no_split_modules = ["ReCTLayer", "ReCTFusionLayer"]

    def __init__(self, config: ReCTConfig):
        if config.localizer_config is None:
            config.localizer_config = ReCTLocalizerConfig()
        super().__init__(config)
        loc = config.localizer_config
        vision_config = copy.deepcopy(config.vision_config)
        vision_config.num_regions = 0  # the decoder reads tokens; region queries would never get a gradient
        self.vision_model = ReCTVisionModel._from_config(vision_config)
        if loc._attn_implementation is None:
            # The fusion attention follows the encoder's (resolved by `_from_config`); `set_attn_implementation`
            # later updates this sub-config with the others.
            loc._attn_implementation = self.vision_model.config._attn_implementation
        self.text_model = AutoModel.from_config(config.text_config)
        if isinstance(getattr(self.text_model, "pooler", None), nn.Module):
            self.text_model.pooler = None  # prompts are mean-pooled; an unused pooler breaks DDP
        hidden, width = vision_config.hidden_size, loc.hidden_size
        fourier = 6 * loc.num_fourier_features

        # Prompt encoder (SAM's, in 3D): text → one token; point → position + positive/negative embedding; box →
        # two corner tokens. Plus the learned mask and IoU query tokens.
        self.prompt_text_projection = nn.Linear(config.text_config.hidden_size, width)
        self.position_projection = nn.Linear(fourier, width)
        self.point_embeddings = nn.Embedding(2, width)  # 0 negative, 1 positive
        self.box_embeddings = nn.Embedding(2, width)  # (z0, y0, x0) corner, (z1, y1, x1) corner
        self.query_tokens = nn.Embedding(2, width)  # mask token, IoU token
        self.image_projection = nn.Linear(hidden, width)
        self.fusion_layers = nn.ModuleList([ReCTFusionLayer(loc) for _ in range(loc.num_fusion_layers)])
        self.fusion_norm = nn.LayerNorm(width)

        # Attention U-Net decoder: fused tokens at the patch grid → input resolution.
        self.scales = decoder_scales(vision_config.patch_size)
        stages = len(self.scales)
        channels = [loc.decoder_channels[min(s, len(loc.decoder_channels) - 1)] for s in range(stages)]
        self.skip_layers = list(loc.skip_layers or default_skip_layers(vision_config.num_hidden_layers, stages - 1))
        if len(self.skip_layers) != stages - 1:
            raise ValueError(
                f"`localizer_config.skip_layers` must name {stages - 1} encoder layer(s) (one per decoder stage but "
                f"the last; patch size {vision_config.patch_size} gives {stages} stages), got {self.skip_layers}"
            )
        self.decoder_input = ReCTConv3d(width, channels[0], kernel_size=1)
        # Skip s: the input pyramid's features at stage s's resolution, plus (every stage but the last) the tokens of
        # encoder layer skip_layers[s], upsampled (transposed convolution) from the patch grid to that resolution.
        # The pyramid reads the volume and the dense prompt maps (box, positive points, negative points).
        self.skip_projections = nn.ModuleList()
        for s in range(stages - 1):
            factor = tuple(math.prod(scale[axis] for scale in self.scales[: s + 1]) for axis in range(3))
            self.skip_projections.append(ReCTConvTranspose3d(hidden, channels[s], kernel_size=factor, stride=factor))
        self.input_pyramid = ReCTInputPyramid(vision_config.in_channels + NUM_DENSE_PROMPTS, channels, self.scales)
        self.stages = nn.ModuleList(
            ReCTDecoderStage(channels[s - 1] if s else channels[0], channels[s], channels[s], self.scales[s])
            for s in range(stages)
        )
        # SAM's hypernetwork: the fused mask token → per-channel weights over the features of the finest
        # `mask_feature_stages` decoder stages, and weights over the fused image tokens for the prompt's coarse mask at
        # the patch grid.
        mask_stages = loc.mask_feature_stages or stages
        if mask_stages > stages:
            raise ValueError(
                f"`localizer_config.mask_feature_stages` must be at most the decoder's {stages} stages (patch size "
                f"{vision_config.patch_size}), got {mask_stages}"
            )
        self.mask_channels = channels[-mask_stages:]
        self.mask_embedding = nn.Sequential(
            nn.Linear(width, width), nn.GELU(), nn.Linear(width, sum(self.mask_channels))
        )
        self.coarse_mask_embedding = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.image_norm = nn.LayerNorm(width)
        self.iou_head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.get_input_embeddings()

    def freeze_encoder(self, text: bool = True) -> None:
        """Stop gradients into the vision encoder (and the text tower unless `text=False`): seed 002's
        `freeze_encoder`; the prompt encoder, fusion and decoder stay trainable."""
        self.vision_model.requires_grad_(False)
        if text:
            self.text_model.requires_grad_(False)

    @torch.no_grad()
    def get_image_embeddings(self, pixel_values: torch.Tensor, **kwargs) -> ReCTVisionModelOutput:
        """The encoder's output for `pixel_values` with every layer's hidden states: pass it to `forward` as
        `vision_outputs` to ask many prompts of the same volumes without encoding them again (SAM's
        `get_image_embeddings`)."""
        return self._encode(pixel_values, **kwargs)

    def _encode(self, pixel_values: torch.Tensor, **kwargs) -> ReCTVisionModelOutput:
        kwargs.pop("output_hidden_states", None)
        return self.vision_model(pixel_values, output_hidden_states=True, return_dict=True, **kwargs)

    def save_vision_encoder(self, save_directory, **kwargs) -> None:
        """Save the vision encoder alone as a Hub folder (its config, weights and code): seed 002's
        `sam_encoder.pth`, for reuse as another model's vision tower. `ReCTVisionModel.from_pretrained(folder)` and
        `AutoModel.from_pretrained(folder, trust_remote_code=True)` load it; `kwargs` go to `save_pretrained`."""
        self.vision_model.save_pretrained(save_directory, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # Prompts
    # ------------------------------------------------------------------------------------------------------------

    def _check_prompts(self, spatial, batch, input_ids, input_points, input_labels, input_boxes) -> None:
        if input_ids is None and input_points is None and input_boxes is None:
            raise ValueError(
                "ReCTForLesionLocalization needs at least one prompt: text (`input_ids`), points (`input_points` + "
                "`input_labels`) or a box (`input_boxes`)"
            )
        if input_ids is not None and (input_ids.ndim not in (2, 3) or input_ids.shape[0] != batch):
            raise ValueError(
                f"`input_ids` must be (batch, seq) or (batch, K, seq) with batch {batch}, got {tuple(input_ids.shape)}"
            )
        if input_points is not None:
            if input_points.ndim != 3 or input_points.shape[0] != batch or input_points.shape[-1] != 3:
                raise ValueError(
                    f"`input_points` must be (batch, P, 3) (z, y, x) with batch {batch}, got "
                    f"{tuple(input_points.shape)}"
                )
            if input_labels is None or tuple(input_labels.shape) != tuple(input_points.shape[:2]):
                raise ValueError(
                    f"`input_labels` must be (batch, P) = {tuple(input_points.shape[:2])} beside `input_points` "
                    f"(1 positive, 0 negative, negative = padding), got "
                    f"{None if input_labels is None else tuple(input_labels.shape)}"
                )
        if input_boxes is not None and tuple(input_boxes.shape) != (batch, 6):
            raise ValueError(
                f"`input_boxes` must be (batch, 6) as (z0, y0, x0, z1, y1, x1), got {tuple(input_boxes.shape)}"
            )
        if is_torchdynamo_compiling():
            return  # the value checks below read tensor values; a compiled graph takes them as given
        upper = torch.tensor([s - 1 for s in spatial], dtype=torch.float32)
        if input_points is not None:
            used = input_labels >= 0
            points = input_points.detach().float().cpu()[used.cpu()]
            outside = ((points < 0) | (points > upper)).any(dim=-1)
            if outside.any():
                raise ValueError(
                    f"`input_points` must lie inside the processed volume: voxel (z, y, x) in [0, {spatial[0] - 1}] "
                    f"× [0, {spatial[1] - 1}] × [0, {spatial[2] - 1}], got {points[outside].tolist()}"
                )
            if (input_labels > 1).any():
                raise ValueError(
                    "`input_labels` must hold 1 (positive), 0 (negative) or a negative pad value (-1, or SAM's -10)"
                )
        if input_boxes is not None:
            boxes = input_boxes.detach().float().cpu().view(batch, 2, 3)
            if ((boxes < 0) | (boxes > upper)).any() or (boxes[:, 0] > boxes[:, 1]).any():
                raise ValueError(
                    "`input_boxes` (z0, y0, x0, z1, y1, x1) must lie inside the processed volume (voxel indices "
                    f"[0, {spatial[0] - 1}] × [0, {spatial[1] - 1}] × [0, {spatial[2] - 1}]) with z0 <= z1, y0 <= y1, "
                    f"x0 <= x1; got {input_boxes.tolist()}"
                )

    def _positions(self, coords: torch.Tensor, spatial) -> torch.Tensor:
        """Voxel coordinates `(..., 3)` → position embeddings `(..., width)` (normalised by the volume size)."""
        # In float32 whatever the model's dtype: bf16 keeps 8 significant bits, too few for the finer frequencies.
        coords = coords.float()
        size = torch.tensor(spatial, dtype=coords.dtype, device=coords.device)
        features = fourier_features((coords + 0.5) / size, self.config.localizer_config.num_fourier_features)
        return self.position_projection(features.to(self.position_projection.weight.dtype))

    def _prompt_tokens(self, batch, spatial, input_ids, attention_mask, token_type_ids, input_points, input_labels,
                       input_boxes):  # fmt: skip
        """Prompt tokens `(batch · K, T, width)`, their position encodings and additive padding mask, and K.

        Point and box tokens are always there, masked out (padding) when the prompt has none: every parameter then
        takes part in every forward, whatever prompts a batch holds, which DeepSpeed ZeRO-3 needs when the processes
        of a run get different prompt kinds (each gathers a module's weights collectively when it runs). Masked
        tokens get exactly zero attention, so the masks are those of a model without them."""
        width = self.config.localizer_config.hidden_size
        dtype = self.query_tokens.weight.dtype
        device = self.query_tokens.weight.device
        num_prompts = 1 if input_ids is None or input_ids.ndim == 2 else input_ids.shape[1]
        if input_points is None:  # one padding point
            input_points = torch.zeros(batch, 1, 3, dtype=dtype, device=device)
            input_labels = torch.full((batch, 1), -1, dtype=torch.long, device=device)
        labels = input_labels.long()
        point_tokens = self.point_embeddings(labels.clamp(min=0)) * (labels >= 0).unsqueeze(-1).to(dtype)
        corners = torch.zeros(batch, 2, 3, dtype=dtype, device=device) if input_boxes is None else input_boxes
        tokens = [
            self.query_tokens.weight.unsqueeze(0).expand(batch, -1, -1),
            point_tokens,
            self.box_embeddings.weight.unsqueeze(0).expand(batch, -1, -1),
        ]
        positions = [
            torch.zeros(batch, 2, width, dtype=dtype, device=device),
            self._positions(input_points, spatial),
            self._positions(corners.reshape(batch, 2, 3), spatial),
        ]
        valid = [
            torch.ones(batch, 2, dtype=torch.bool, device=device),
            labels >= 0,
            torch.full((batch, 2), input_boxes is not None, dtype=torch.bool, device=device),
        ]
        tokens, positions, valid = (torch.cat(t, dim=1) for t in (tokens, positions, valid))
        # Every one of the K prompts of a volume shares its points and box: repeat per prompt.
        tokens, positions, valid = (t.repeat_interleave(num_prompts, dim=0) for t in (tokens, positions, valid))
        if input_ids is not None:
            ids = input_ids.reshape(-1, input_ids.shape[-1])
            mask = None if attention_mask is None else attention_mask.reshape(ids.shape)
            text_kwargs = {"input_ids": ids, "attention_mask": mask}
            if token_type_ids is not None:
                text_kwargs["token_type_ids"] = token_type_ids.reshape(ids.shape)
            text = self.text_model(**text_kwargs, return_dict=True).last_hidden_state
            weights = (torch.ones_like(ids) if mask is None else mask).unsqueeze(-1).to(text.dtype)
            pooled = (text * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
            text_token = self.prompt_text_projection(pooled).unsqueeze(1)
            tokens = torch.cat([tokens, text_token], dim=1)
            positions = torch.cat([positions, torch.zeros_like(text_token)], dim=1)
            valid = torch.cat([valid, torch.ones(valid.shape[0], 1, dtype=torch.bool, device=device)], dim=1)
        additive = torch.zeros(valid.shape, dtype=dtype, device=device).masked_fill(~valid, torch.finfo(dtype).min)
        return tokens, positions, additive[:, None, None, :], num_prompts

    @staticmethod
    def _inside_boxes(input_boxes: torch.Tensor, spatial) -> torch.Tensor:
        """`(batch, D, H, W)` bool: the voxels inside each volume's box, corners included."""
        boxes = input_boxes.float()
        inside = torch.ones(boxes.shape[0], *spatial, dtype=torch.bool, device=boxes.device)
        for axis, size in enumerate(spatial):
            coords = torch.arange(size, dtype=torch.float32, device=boxes.device)
            shape = [boxes.shape[0], 1, 1, 1]
            shape[axis + 1] = -1
            low, high = boxes[:, axis, None], boxes[:, axis + 3, None]
            inside = inside & ((coords >= low) & (coords <= high)).view(shape)
        return inside

    def _dense_prompts(self, batch, spatial, input_points, input_labels, input_boxes, dtype, device) -> torch.Tensor:
        """`(batch, NUM_DENSE_PROMPTS, D, H, W)`: the box as +1 inside / −1 outside (0 everywhere without one), and
        the positive and negative points as the maximum of Gaussian bumps (σ = `point_sigma` voxels)."""
        dense = torch.zeros(batch, NUM_DENSE_PROMPTS, *spatial, dtype=torch.float32, device=device)
        axes = [torch.arange(size, dtype=torch.float32, device=device) for size in spatial]
        if input_boxes is not None:
            dense[:, 0] = self._inside_boxes(input_boxes, spatial).float() * 2 - 1
        if input_points is not None:
            sigma = self.config.localizer_config.point_sigma
            grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (D, H, W, 3)
            labels = input_labels.long()
            for p in range(input_points.shape[1]):
                distance = ((grid - input_points[:, p].float().view(batch, 1, 1, 1, 3)) ** 2).sum(-1)
                bump = torch.exp(-distance / (2 * sigma**2))
                for channel, label in ((1, 1), (2, 0)):
                    chosen = (labels[:, p] == label).view(batch, 1, 1, 1)
                    dense[:, channel] = torch.where(chosen, torch.maximum(dense[:, channel], bump), dense[:, channel])
        return dense.to(dtype)

    # ------------------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------------------

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        input_points: torch.Tensor | None = None,
        input_labels: torch.Tensor | None = None,
        input_boxes: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        vision_outputs: ReCTVisionModelOutput | None = None,
        **kwargs,
    ) -> ReCTLesionLocalizationOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, channels, depth, height, width)`): processed CT.
            input_ids, attention_mask, token_type_ids (`torch.LongTensor` of shape `(batch, K, seq)` or `(batch,
                seq)`, *optional*): K tokenised text prompts per volume (a finding, a report sentence, a region name).
            input_points (`torch.FloatTensor` of shape `(batch, P, 3)`, *optional*): (z, y, x) voxel coordinates in
                the processed volume; `input_labels (batch, P)`: 1 positive, 0 negative, negative values padding.
            input_boxes (`torch.FloatTensor` of shape `(batch, 6)`, *optional*): (z0, y0, x0, z1, y1, x1) voxel
                coordinates in the processed volume, corners included. With `localizer_config.box_prompt = "roi"`
                (the default) every mask of the volume is cut to its box (`OUTSIDE_BOX_LOGIT` outside), and a box
                beside text prompts steers nothing else (the IoU scores are those of the uncut masks then); with
                `"dense"` it steers the masks as corner tokens and a dense map, uncut.
            labels (`torch.FloatTensor` of shape `(batch, K, depth, height, width)`, *optional*): target masks (0/1)
                per prompt; give the loss.
            vision_outputs ([`ReCTVisionModelOutput`], *optional*): the encoder's output for `pixel_values` with
                `hidden_states` (`get_image_embeddings`, or an encoder with the same weights, such as a
                [`ReCTModel`]'s, run with `output_hidden_states=True`); used instead of encoding the volumes again.

        Raises:
            ValueError: no prompt, prompt shapes that do not match, coordinates outside the volume, a box with a
                corner after the other, `labels` of the wrong shape, `vision_outputs` without hidden states or of
                other volumes' shape.
        """
        batch, spatial = pixel_values.shape[0], tuple(pixel_values.shape[2:])
        self._check_prompts(spatial, batch, input_ids, input_points, input_labels, input_boxes)
        grid = tuple(s // p for s, p in zip(spatial, self.config.vision_config.patch_size))
        if vision_outputs is None:
            vision = self._encode(pixel_values, **kwargs)
        else:
            vision = self._check_vision_outputs(vision_outputs, batch, grid)
        # A region-of-interest box beside text prompts only cuts their masks (below); otherwise it steers them too.
        roi = input_boxes is not None and self.config.localizer_config.box_prompt == "roi"
        steering_boxes = None if roi and input_ids is not None else input_boxes
        prompts, prompt_pe, prompt_mask, num_prompts = self._prompt_tokens(
            batch, spatial, input_ids, attention_mask, token_type_ids, input_points, input_labels, steering_boxes
        )

        # Shared decoder, once per volume: projected tokens at the patch grid → stages with gated skips (encoder
        # layers + the input pyramid over the volume and the dense prompts) → mask features at input resolution.
        prefix = self.config.vision_config.num_prefix_tokens
        image = self.image_projection(vision.last_hidden_state[:, prefix:])
        dense = self._dense_prompts(
            batch, spatial, input_points, input_labels, steering_boxes, pixel_values.dtype, pixel_values.device
        )
        pyramid = self.input_pyramid(torch.cat([pixel_values, dense], dim=1))
        hidden = self.decoder_input(image.transpose(1, 2).reshape(batch, -1, *grid))
        stage_features = []
        for s, stage in enumerate(self.stages):
            skip = pyramid[s]
            if s < len(self.skip_projections):
                tokens = vision.hidden_states[self.skip_layers[s]][:, prefix:]
                skip = skip + self.skip_projections[s](tokens.transpose(1, 2).reshape(batch, -1, *grid))
            hidden = stage(hidden, skip)
            stage_features.append(hidden)

        # Fusion, per prompt (batch · K) at the patch grid: prompt tokens ↔ image tokens (with positions).
        image = image.repeat_interleave(num_prompts, dim=0)
        centres = torch.stack(
            torch.meshgrid(*[torch.arange(g, device=image.device, dtype=image.dtype) for g in grid], indexing="ij"),
            dim=-1,
        ).reshape(-1, 3)
        patch = torch.tensor(self.config.vision_config.patch_size, device=image.device, dtype=image.dtype)
        image_pe = self._positions(centres * patch + (patch - 1) / 2, spatial).unsqueeze(0).to(image.dtype)
        for layer in self.fusion_layers:
            prompts, image = layer(prompts, image, prompt_pe, image_pe, prompt_mask)
        prompts = self.fusion_norm(prompts)
        mask_token, iou_token = prompts[:, 0], prompts[:, 1]

        # Mask per prompt: its coarse mask (its weights · its fused image tokens) at the patch grid, then per used
        # decoder stage, coarse to fine: resized to that stage and added to its weights · that stage's features (SAM's
        # hypernetwork, over `mask_feature_stages` scales).
        weights = self.mask_embedding(mask_token).view(batch, num_prompts, -1).split(self.mask_channels, dim=-1)
        logits = torch.einsum("mc,mnc->mn", self.coarse_mask_embedding(mask_token), self.image_norm(image))
        logits = logits.view(batch, num_prompts, *grid)
        coarser = []  # the masks before each stage, for deep supervision
        for stage_weights, features in zip(weights, stage_features[-len(weights) :]):
            coarser.append(logits)
            logits = linear_resize(logits, tuple(features.shape[2:]))
            logits = logits + torch.einsum("bkc,bczyx->bkzyx", stage_weights, features)
        if roi:
            inside = self._inside_boxes(input_boxes, spatial).unsqueeze(1)
            logits = logits.masked_fill(~inside, OUTSIDE_BOX_LOGIT)
        pred_masks = logits
        iou_scores = self.iou_head(iou_token).sigmoid().reshape(batch, num_prompts)

        loss = dice_loss = focal_loss = iou_loss = deep_supervision_loss = None
        if labels is not None:
            dice_loss, focal_loss, iou_loss = self.localization_loss(pred_masks, iou_scores, labels)
            loc = self.config.localizer_config
            loss = loc.dice_weight * dice_loss + loc.focal_weight * focal_loss + loc.iou_weight * iou_loss
            if loc.deep_supervision_weight > 0:
                deep_supervision_loss = self.deep_supervision_loss(coarser, labels)
                loss = loss + deep_supervision_loss
        return ReCTLesionLocalizationOutput(
            loss=loss,
            pred_masks=pred_masks,
            iou_scores=iou_scores,
            dice_loss=dice_loss,
            focal_loss=focal_loss,
            iou_loss=iou_loss,
            deep_supervision_loss=deep_supervision_loss,
            vision_hidden_states=vision.hidden_states,
        )

    def _check_vision_outputs(
        self, vision: ReCTVisionModelOutput, batch: int, grid: tuple[int, ...]
    ) -> ReCTVisionModelOutput:
        if vision.hidden_states is None:
            raise ValueError(
                "`vision_outputs` has no `hidden_states`: the decoder's skips read them (run the encoder with "
                "`output_hidden_states=True`, or use `get_image_embeddings`)"
            )
        tokens = self.config.vision_config.num_prefix_tokens + math.prod(grid)
        return check_vision_outputs(vision, self.config.vision_config, batch, tokens)

    def _mask_losses(self, masks: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dice and focal loss of mask logits `(batch, K, ...)` against targets (0/1, or fractions) of their shape."""
        loc = self.config.localizer_config
        logits = masks.flatten(2).flatten(0, 1).float()
        targets = targets.flatten(2).flatten(0, 1).to(logits.dtype)
        dice = soft_dice_loss(logits, targets)
        return dice, sigmoid_focal_loss(logits, targets, loc.focal_alpha, loc.focal_gamma, loc.focal_reduction)

    def deep_supervision_loss(self, coarser: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Deep supervision: the Dice and focal losses (with their weights) of the masks `coarser` (coarse to fine,
        each a decoder stage before `pred_masks`) against `labels` averaged down to each one's grid (each coarse voxel
        the fraction of its fine voxels in the target); the finest weighted by `deep_supervision_weight`, each coarser
        by half the next."""
        loc = self.config.localizer_config
        total = labels.new_zeros((), dtype=torch.float32)
        for k, masks in enumerate(reversed(coarser)):
            size = tuple(masks.shape[2:])
            factor = tuple(n // s for n, s in zip(labels.shape[2:], size))
            targets = (
                F.avg_pool3d(labels.float(), kernel_size=factor, stride=factor) if factor != (1, 1, 1) else labels
            )
            dice, focal = self._mask_losses(masks, targets)
            total = total + loc.deep_supervision_weight / 2**k * (loc.dice_weight * dice + loc.focal_weight * focal)
        return total

    def localization_loss(
        self, pred_masks: torch.Tensor, iou_scores: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dice (non-empty targets only, see `soft_dice_loss`), sigmoid focal loss (every voxel) and the MSE of the
        predicted IoU against the IoU of the thresholded mask (SAM's IoU head loss)."""
        if tuple(labels.shape) != tuple(pred_masks.shape):
            raise ValueError(
                f"`labels` must be (batch, K, depth, height, width) = {tuple(pred_masks.shape)} (one mask per "
                f"prompt), got {tuple(labels.shape)}"
            )
        dice, focal = self._mask_losses(pred_masks, labels)
        logits = pred_masks.flatten(2).flatten(0, 1).float()
        targets = labels.flatten(2).flatten(0, 1).to(logits.dtype)
        with torch.no_grad():
            predicted = (logits > 0).to(logits.dtype)
            intersection = (predicted * targets).sum(dim=1)
            union = ((predicted + targets) > 0).to(logits.dtype).sum(dim=1)
            actual_iou = torch.where(union > 0, intersection / union.clamp(min=1.0), torch.ones_like(union))
        iou = F.mse_loss(iou_scores.flatten().float(), actual_iou)
        return dice, focal, iou


__all__ = ["ReCTForLesionLocalization", "ReCTLesionLocalizationOutput"]
