"""ReCT-VLM configurations.

`ReCTVisionConfig` describes the 3D CT vision encoder; `ReCTConfig` composes it with any BERT-like text
encoder for the contrastive dual encoder and the volume classifier. Both are `@strict` dataclasses (transformers
5.24): field types and `Literal` choices are checked on construction and on assignment; cross-field rules live in
`validate_architecture`.
"""

import math
from typing import Literal

# `strict` is huggingface_hub's dataclass validator, re-exported by transformers' configuration module (which uses
# it for every config); importing it from there keeps this Hub file's imports to torch/transformers/numpy/stdlib.
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec, strict
from transformers.utils.type_validators import interval

from .anatomy_rect import NUM_ANATOMY_REGIONS


# The 18 multi-abnormality labels of CT-RATE, in the column order of its labels CSV.
CT_RATE_ABNORMALITIES = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

ATTENTION_TYPES = ("divided", "joint")
TEXT_POOLING_TYPES = ("cls", "mean", "pooler")
CLASSIFIER_POOLING_TYPES = ("cls", "cls_mean", "cls_mean_max")

#: Anatomy regions of the encoder's region-aware attention: ids 1..R of the anatomy table (0 is background).
DEFAULT_NUM_REGIONS = NUM_ANATOMY_REGIONS


def _as_int_triple(field: str, value) -> list[int]:
    """A (depth, height, width) size field as a list of three positive ints (an int means the same on every axis)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value, value]
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"`{field}` must be a (depth, height, width) list of 3 positive ints, got {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ValueError(f"`{field}` must hold 3 positive ints, got {value!r}")
    return list(value)


def check_lesion_map_channels(name: str, channels: list[int], vision_config) -> None:
    """A lesion-map decoder's widths: none, or one positive width per decoder stage, at most one stage per stem
    convolution of `vision_config`."""
    stem = vision_config.stem_channels
    if channels and (len(channels) > len(stem) or min(channels) < 1):
        raise ValueError(
            f"`{name}` {channels} must hold positive widths, at most one per stem convolution "
            f"(`vision_config.stem_channels` = {stem}): the lesion-map decoder descends the stem's feature maps"
        )


def lesion_map_stride(channels: list[int], stem_channels: list[int]) -> int:
    """How many voxels of the volume one cell of a lesion-map decoder's map spans along each axis."""
    return 2 ** (len(stem_channels) - len(channels) + 1)


@strict
class ReCTVisionConfig(PreTrainedConfig):
    r"""
    Configuration of [`ReCTVisionModel`], a 3D ViT over CT volumes with slice-aware and region-aware attention.
    Defaults follow the seed encoder: patch (4, 16, 16) over a (64, 512, 512) volume → 16 × 32 × 32 = 16,384
    patch tokens plus one CLS token, hidden 768, 12 layers, 12 heads.

    Args:
        hidden_size (`int`, defaults to 768): width of the token embeddings.
        num_hidden_layers (`int`, defaults to 12): number of transformer layers.
        num_attention_heads (`int`, defaults to 12): heads per attention block; must divide `hidden_size`.
        intermediate_size (`int`, defaults to 3072): MLP width (MLP ratio 4).
        hidden_act (`str`, defaults to `"gelu"`): MLP activation.
        hidden_dropout_prob (`float`, defaults to 0.1): dropout after attention and MLP blocks, in [0, 1).
        attention_probs_dropout_prob (`float`, defaults to 0.1): dropout on attention probabilities, in [0, 1).
        initializer_range (`float`, defaults to 0.02): std of the truncated-normal initialiser.
        layer_norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.
        volume_size (`list[int]`, defaults to `[64, 512, 512]`): (depth, height, width) in voxels the position
            embeddings are laid out for; other sizes are interpolated (trilinear).
        patch_size (`list[int]`, defaults to `[4, 16, 16]`): (depth, height, width) of one patch in voxels.
        in_channels (`int`, defaults to 1): input channels (one per HU window).
        stem_channels (`list[int]`, defaults to `[]`): empty: each patch is embedded by one linear map (a Conv3d with
            kernel = stride = `patch_size`), as in ViT, MONAI and M3D. Otherwise a convolutional stem ("early
            convolutions", Xiao et al. 2021): one 3×3×3 convolution of stride 2 per entry, with that many output
            channels (GroupNorm, GELU), then the patch projection over the remaining `patch_size / 2**len`
            voxels; same token grid. It costs more compute per token and trains much faster from scratch on small
            data; every axis of `patch_size` must be divisible by `2**len(stem_channels)`.
        qkv_bias (`bool`, defaults to `True`): bias on the query/key/value projections.
        use_cls_token (`bool`, defaults to `True`): prepend a learned CLS token (with its own position embedding);
            `pooler_output` is its final state. `False` (MONAI's `ViT(classification=False)`, SegVol, SAM-Med3D)
            keeps patch tokens only and pools by their mean.
        attention_type (`"divided"` or `"joint"`, defaults to `"divided"`): `"divided"` attends along z across slabs
            and then within each axial slab of tokens (slice-aware attention); `"joint"` is plain full attention
            (needed to load MONAI/M3D-style ViT weights exactly).
        num_regions (`int`, defaults to `NUM_ANATOMY_REGIONS` = 20): anatomy regions with ids 1..R in
            `anatomy_mask` (0 is background; the ids of `anatomy_rect.ANATOMY_REGIONS`); 0 disables region-aware
            attention.
        region_patch_fraction (`float`, defaults to 0.25): a patch token belongs to region r when at least this
            fraction of its voxels carries id r. A region with no such token is absent for that volume.
        projection_dim (`int`, defaults to 512): size of the embeddings [`ReCTForFeatureExtraction`] returns.

    Raises:
        huggingface_hub.errors.StrictDataclassFieldValidationError: a field of the wrong type, out of its range or
            not one of its `Literal` choices (the message names the field).
        huggingface_hub.errors.StrictDataclassClassValidationError: a cross-field rule (`volume_size` divisible by
            `patch_size`, `hidden_size` by `num_attention_heads`) is broken; the message names both fields.
    """

    model_type = "rect_vision"
    _auto_class = "AutoConfig"
    base_config_key = "vision_config"

    hidden_size: int = interval(min=1)(default=768)
    num_hidden_layers: int = interval(min=1)(default=12)
    num_attention_heads: int = interval(min=1)(default=12)
    intermediate_size: int = interval(min=1)(default=3072)
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = interval(min=0.0, max=1.0, exclude_max=True)(default=0.1)
    attention_probs_dropout_prob: float | int = interval(min=0.0, max=1.0, exclude_max=True)(default=0.1)
    initializer_range: float = interval(min=0.0)(default=0.02)
    layer_norm_eps: float = interval(min=0.0, exclude_min=True)(default=1e-6)
    volume_size: list[int] | tuple[int, ...] | int = (64, 512, 512)
    patch_size: list[int] | tuple[int, ...] | int = (4, 16, 16)
    in_channels: int = interval(min=1)(default=1)
    stem_channels: list[int] | tuple[int, ...] = ()
    qkv_bias: bool = True
    use_cls_token: bool = True
    attention_type: Literal["divided", "joint"] = "divided"
    num_regions: int = interval(min=0)(default=DEFAULT_NUM_REGIONS)
    region_patch_fraction: float = interval(min=0.0, max=1.0, exclude_min=True)(default=0.25)
    projection_dim: int = interval(min=1)(default=512)

    def __post_init__(self, **kwargs):
        self.volume_size = _as_int_triple("volume_size", self.volume_size)
        self.patch_size = _as_int_triple("patch_size", self.patch_size)
        self.stem_channels = [int(c) for c in self.stem_channels]
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Cross-field rules (run by `@strict` after construction)."""
        bad = [f"{v} % {p}" for v, p in zip(self.volume_size, self.patch_size) if v % p]
        if bad:
            raise ValueError(
                f"`volume_size` {self.volume_size} must be divisible by `patch_size` {self.patch_size} along every "
                f"axis (depth, height, width); non-zero remainders: {', '.join(bad)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})"
            )
        if any(c < 1 for c in self.stem_channels):
            raise ValueError(f"`stem_channels` must hold positive channel counts, got {self.stem_channels}")
        factor = 2 ** len(self.stem_channels)
        if any(p % factor for p in self.patch_size):
            raise ValueError(
                f"`patch_size` {self.patch_size} must be divisible by 2**len(`stem_channels`) = {factor} along every "
                f"axis: each of the {len(self.stem_channels)} stem convolutions halves the grid"
            )

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in `last_hidden_state` and `hidden_states` (the CLS token, if any)."""
        return int(self.use_cls_token)

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        """Number of patches along (depth, height, width) for `volume_size`."""
        return tuple(v // p for v, p in zip(self.volume_size, self.patch_size))


@strict
class ReCTLocalizerConfig(PreTrainedConfig):
    r"""
    Configuration of the prompt fusion and mask decoder of [`ReCTForLesionLocalization`] (the `localizer_config`
    of a [`ReCTConfig`]; the vision and text towers are the `ReCTConfig`'s).

    Args:
        hidden_size (`int`, defaults to 128): width of the prompt tokens and of the fusion transformer (image tokens
            are projected to it).
        num_fusion_layers (`int`, defaults to 2): two-way fusion layers (prompt self-attention, prompt→image and
            image→prompt cross-attention, as SAM's mask decoder).
        num_attention_heads (`int`, defaults to 4): heads per fusion attention; must divide `hidden_size`.
        intermediate_size (`int`, defaults to 512): MLP width in the fusion layers.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation in the fusion layers.
        attention_probs_dropout_prob (`float`, defaults to 0.0): dropout on fusion attention probabilities.
        qkv_bias (`bool`, defaults to `True`): bias on the fusion query/key/value projections.
        decoder_channels (`list[int]`, defaults to `[64, 32, 16, 16]`): channels of the U-Net decoder stages, coarse
            to fine. There is one stage per halving of the largest patch side (`log2(max(patch_size))`: 4 for
            (4, 16, 16) patches); a shorter list repeats its last entry.
        skip_layers (`list[int]`, *optional*): the encoder layer (1..`num_hidden_layers`; 0 = patch embeddings) whose
            tokens feed the skip connection of each decoder stage but the last (which takes the input volume), coarse
            to fine. None: evenly spaced from the last layer down, computed from the encoder's depth.
        mask_feature_stages (`int`, *optional*): how many decoder stages, counted from the finest, whose features the
            hypernetwork weighs into each prompt's mask (each adds its channels to the mask token's weights). None:
            every stage.
        num_fourier_features (`int`, defaults to 10): sine/cosine frequencies per axis (π·2^0 … π·2^(F-1) over
            coordinates normalised to [0, 1]) encoding point, box and token positions; 10 resolves about a thousandth
            of the volume's extent.
        point_sigma (`float`, defaults to 2.0): width (voxels of the processed volume) of the Gaussian bump each point
            prompt adds to the decoder's dense prompt maps.
        box_prompt (`"roi"` or `"dense"`, defaults to `"roi"`): what a box prompt does. `"roi"`: the box is a region
            of interest: every mask of its volume is cut to it (logits outside set to a large negative value); with a
            text prompt that is all it does, so the text prompt's mask is found as without a box and kept inside it
            (SegVol zooms into its box the same way); without text it also steers the mask, as with `"dense"`.
            `"dense"`: the box steers the mask only, as two corner tokens and a dense map (+1 inside, −1 outside)
            beside the volume (SAM's box prompt), and the mask may spill over it. On the demo's phantoms
            (`bench/localization.py`, 3 seeds, README) a localizer trained on text prompts alone, asked with a
            finding's name and its box, scores a Dice of 0.817 on its third-best finding with `"roi"`; `"dense"` box
            prompts, trained in one batch in five, scored 0.669.
        dice_weight (`float`, defaults to 1.0), focal_weight (`float`, defaults to 1.0), iou_weight (`float`,
            defaults to 1.0): weights of the Dice, focal and predicted-IoU (MSE) losses.
        focal_alpha (`float`, defaults to 0.05), focal_gamma (`float`, defaults to 2.0): sigmoid focal loss (Lin et
            al.) parameters: `focal_alpha` weighs the target's voxels, 1 − `focal_alpha` the others. 0.05 suits the
            `"balanced"` reduction (`bench/localization.py`, 3 seeds: against 0.25, mean finding Dice from text 0.34
            instead of 0.29 and mean region Dice 0.74 instead of 0.69, as a larger weight on the target's mean makes
            small targets' masks spill over their edges); torchvision's 0.25 goes with `"mean"`.
        focal_reduction (`"balanced"` or `"mean"`, defaults to `"balanced"`): how the focal loss is averaged.
            `"balanced"`: per mask, `focal_alpha` × the mean over the target's voxels + (1 − `focal_alpha`) × the mean
            over the others (an empty target: the latter alone), then the mean over the masks, so a missed target
            pulls as hard whatever its size. `"mean"`: over every voxel of every mask (torchvision's); a target of a
            few hundred voxels then weighs almost nothing, and once its logits are confidently wrong the Dice term's
            gradient vanishes too (the sigmoid saturates), so it may never be learned (the phantom's sternum: Dice
            0.00 on every seed of `bench/localization.py` with `"mean"`, 0.96–0.97 with `"balanced"`).
        deep_supervision_weight (`float`, defaults to 0.0): deep supervision (nnU-Net's): each prompt's coarser masks —
            at the patch grid and after every decoder stage but the last — get the Dice and focal losses too, against
            the targets averaged down to their grid, the one a stage coarser than `pred_masks` weighted by this value,
            each further one by half the previous. 0 turns it off. On the demo's phantoms 0.5 lowered every held-out
            score (`bench/localization.py --deep-supervision`; README).

    Raises:
        huggingface_hub.errors.StrictDataclassFieldValidationError: a field of the wrong type or out of range.
        huggingface_hub.errors.StrictDataclassClassValidationError: `hidden_size` not divisible by
            `num_attention_heads`.
    """

    model_type = "rect_localizer"
    base_config_key = "localizer_config"

    hidden_size: int = interval(min=1)(default=128)
    num_fusion_layers: int = interval(min=1)(default=2)
    num_attention_heads: int = interval(min=1)(default=4)
    intermediate_size: int = interval(min=1)(default=512)
    hidden_act: str = "gelu"
    attention_probs_dropout_prob: float | int = interval(min=0.0, max=1.0, exclude_max=True)(default=0.0)
    qkv_bias: bool = True
    decoder_channels: list[int] | tuple[int, ...] = (64, 32, 16, 16)
    skip_layers: list[int] | tuple[int, ...] | None = None
    mask_feature_stages: int | None = None
    num_fourier_features: int = interval(min=1)(default=10)
    point_sigma: float | int = interval(min=0.0, exclude_min=True)(default=2.0)
    box_prompt: Literal["roi", "dense"] = "roi"
    dice_weight: float | int = interval(min=0.0)(default=1.0)
    focal_weight: float | int = interval(min=0.0)(default=1.0)
    iou_weight: float | int = interval(min=0.0)(default=1.0)
    focal_alpha: float | int = interval(min=0.0, max=1.0)(default=0.05)
    focal_gamma: float | int = interval(min=0.0)(default=2.0)
    focal_reduction: Literal["balanced", "mean"] = "balanced"
    deep_supervision_weight: float | int = interval(min=0.0)(default=0.0)

    def __post_init__(self, **kwargs):
        self.decoder_channels = [int(c) for c in self.decoder_channels]
        if self.skip_layers is not None:
            self.skip_layers = [int(i) for i in self.skip_layers]
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Cross-field rules (run by `@strict` after construction)."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})"
            )
        if not self.decoder_channels or min(self.decoder_channels) < 1:
            raise ValueError(f"`decoder_channels` must hold positive channel counts, got {self.decoder_channels}")
        if self.mask_feature_stages is not None and self.mask_feature_stages < 1:
            raise ValueError(f"`mask_feature_stages` must be None or at least 1, got {self.mask_feature_stages}")


@strict
class ReCTConfig(PreTrainedConfig):
    r"""
    Configuration of [`ReCTModel`] (contrastive vision–text dual encoder) and [`ReCTForVolumeClassification`]
    (which builds only the vision tower and its head from it, as `SiglipForImageClassification` does).

    Args:
        vision_config (`dict` or [`ReCTVisionConfig`], *optional*): the 3D vision encoder.
        text_config (`dict` or `PreTrainedConfig`, *optional*): any BERT-like encoder loadable with
            `AutoModel.from_config` (a dict needs its `model_type`; defaults to BERT-base, the shape of
            Bio_ClinicalBERT).
        projection_dim (`int`, defaults to 512): size of the shared image/text embedding space.
        logit_scale_init_value (`float`, defaults to log(1 / 0.07)): initial log inverse temperature.
        region_alignment_weight (`float`, defaults to 0.5): weight of the region–report alignment loss, >= 0.
        text_pooling (`"cls"`, `"mean"` or `"pooler"`, defaults to `"mean"`): how a text embedding is pooled from
            the text encoder: first token, mask-weighted mean of tokens, or the encoder's `pooler_output`.
        classifier_dropout (`float`, defaults to 0.0): dropout before the classification head, in [0, 1).
        classifier_pooling (`"cls"`, `"cls_mean"` or `"cls_mean_max"`, defaults to `"cls_mean_max"`): features the
            classification head reads: the CLS token, plus the mean of the patch tokens, plus their max (a focal
            finding anywhere in the volume drives the max, an extended one the mean).
        pos_weight (`list[float]`, *optional*): per-label positive weights of the multi-label BCE (one per label).
        lesion_token_loss_weight (`float`, defaults to 0.0): [`ReCTForVolumeClassification`]'s auxiliary per-token
            loss, >= 0. Above 0 the classifier gets a token head (`lesion_token_classifier`) and `forward` takes
            `lesion_tokens`: for each patch token, which labels' lesions it holds; the BCE of the token head against
            them, times this weight, joins the loss. Dense, localised supervision that teaches the encoder where
            each finding lies; inference never uses the head.
        lesion_map_channels (`list[int]`, defaults to `[]`): [`ReCTForVolumeClassification`]'s lesion-map decoder,
            one width per stage, coarse to fine, at most one stage per stem convolution (`vision_config.
            stem_channels`); empty: none. The decoder (a small U-Net from the last patch tokens down through the
            stem's feature maps, from the coarsest) gives each label a logit map on the grid of the last stem map
            it reaches (`lesion_map_stride`: 2 with a stage per stem convolution, 4 with one fewer), and each
            label's highest map logit is added to the head's logit: a finding seen anywhere in the volume raises
            its score, and the map shows where it was seen (`lesion_map_logits`).
        lesion_map_depth (`int`, defaults to 2): 3×3×3 convolutions per decoder stage, >= 1.
        lesion_map_loss_weight (`float`, defaults to 1.0): weight of the lesion-map loss, >= 0, when `forward` is
            given `lesion_maps` (the labels' lesion masks on the map's grid).
        lesion_map_pos_weight (`float`, defaults to 20.0): positive weight of that per-voxel BCE, > 0 (lesions
            fill a small fraction of the map).
        localizer_config (`dict` or [`ReCTLocalizerConfig`], *optional*): prompt fusion and mask decoder of
            [`ReCTForLesionLocalization`]; None: that model uses the defaults (and stores them).
        id2label (`dict[int, str]`, *optional*): defaults to the 18 CT-RATE abnormalities.
        problem_type (`str`, *optional*): as in transformers; when unset it is inferred from the first `labels`
            (float `(batch, num_labels)` → multi-label, integer `(batch,)` → single-label, one label → regression).

    A folder saved from a [`ReCTVisionConfig`] model (`ReCTVisionModel`, `ReCTForFeatureExtraction`) loads as a
    `ReCTConfig` whose `vision_config` is that config, so `ReCTForVolumeClassification.from_pretrained(folder)`
    fine-tunes a pre-trained encoder.

    Raises:
        huggingface_hub.errors.StrictDataclassFieldValidationError: a field of the wrong type, out of range or not
            one of its choices.
        huggingface_hub.errors.StrictDataclassClassValidationError: `pos_weight` does not have one entry per label.
    """

    model_type = "rect"
    _auto_class = "AutoConfig"
    sub_configs_defaults = {
        "vision_config": ReCTVisionConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
        "localizer_config": SubConfigSpec(config_class=ReCTLocalizerConfig, optional=True),
    }

    vision_config: dict | ReCTVisionConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projection_dim: int = interval(min=1)(default=512)
    logit_scale_init_value: float = math.log(1 / 0.07)
    region_alignment_weight: float | int = interval(min=0.0)(default=0.5)
    text_pooling: Literal["cls", "mean", "pooler"] = "mean"
    classifier_dropout: float | int = interval(min=0.0, max=1.0, exclude_max=True)(default=0.0)
    classifier_pooling: Literal["cls", "cls_mean", "cls_mean_max"] = "cls_mean_max"
    pos_weight: list[float] | None = None
    lesion_token_loss_weight: float | int = interval(min=0.0)(default=0.0)
    lesion_map_channels: list[int] | tuple[int, ...] = ()
    lesion_map_depth: int = interval(min=1)(default=2)
    lesion_map_loss_weight: float | int = interval(min=0.0)(default=1.0)
    lesion_map_pos_weight: float | int = interval(min=0.0, exclude_min=True)(default=20.0)
    localizer_config: dict | ReCTLocalizerConfig | None = None

    def __post_init__(self, **kwargs):
        if self.id2label is None and kwargs.get("num_labels") is None:
            self.id2label = dict(enumerate(CT_RATE_ABNORMALITIES))
        self.lesion_map_channels = [int(c) for c in self.lesion_map_channels]
        super().__post_init__(**kwargs)
        if self.label2id is None or len(self.label2id) != len(self.id2label):
            self.label2id = {label: i for i, label in self.id2label.items()}

    def validate_architecture(self):
        """Cross-field rules (run by `@strict` after construction)."""
        if self.pos_weight is not None and len(self.pos_weight) != self.num_labels:
            raise ValueError(
                f"`pos_weight` must have one entry per label ({self.num_labels}), got {len(self.pos_weight)}"
            )
        check_lesion_map_channels("lesion_map_channels", self.lesion_map_channels, self.vision_config)
        skips = self.localizer_config.skip_layers if self.localizer_config is not None else None
        depth = self.vision_config.num_hidden_layers
        if skips is not None and any(not 0 <= i <= depth for i in skips):
            raise ValueError(
                f"`localizer_config.skip_layers` {skips} must name encoder layers 0..{depth} "
                f"(`vision_config.num_hidden_layers` = {depth}; 0 = patch embeddings)"
            )

    @property
    def lesion_map_stride(self) -> int:
        """Voxels of the volume one lesion-map cell spans along each axis (`lesion_map_channels` set)."""
        return lesion_map_stride(self.lesion_map_channels, self.vision_config.stem_channels)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """Read a folder's config; a vision-encoder folder (`rect_vision`) becomes this config's `vision_config`.

        That is how `ReCTForVolumeClassification.from_pretrained(encoder_folder)` starts from a pre-trained encoder:
        the classifier needs a `ReCTConfig`, the folder holds the `ReCTVisionConfig` it was built from.
        """
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == ReCTVisionConfig.model_type:
            vision = {k: v for k, v in config_dict.items() if k not in ("auto_map", "architectures")}
            config_dict = {"model_type": cls.model_type, "vision_config": vision}
        return config_dict, kwargs


@strict
class ReCTVLMConfig(PreTrainedConfig):
    r"""
    Configuration of [`ReCTForConditionalGeneration`]: the ReCT vision encoder, a projector, and any causal language
    model (LLaVA's layout: `vision_config` + `text_config`).

    Args:
        vision_config (`dict` or [`ReCTVisionConfig`], *optional*): the 3D vision encoder.
        text_config (`dict` or `PreTrainedConfig`, *optional*): any causal LM `AutoModelForCausalLM.from_config`
            builds (a dict needs its `model_type`; defaults to Llama).
        projector_type (`"tac"` or `"mlp"`, defaults to `"tac"`): `"tac"` is Libra's temporal alignment connector
            (every selected encoder layer, current and prior scan fused by self- and cross-attention); `"mlp"` is
            LLaVA's two-layer GELU MLP over the last selected layer (current scan only).
        image_token_id (`int`, *optional*): id of the `<image>` placeholder in the LM's vocabulary (the processor
            adds the token); required to run the model on images.
        image_seq_length (`int`, defaults to 32): embeddings per volume, i.e. `<image>` tokens the processor writes:
            the projector's `projector_seq_length` tokens, then (with `diagnosis_labels`) `diagnosis_seq_length`.
        vision_feature_layers (`list[int]`, *optional*): encoder layers (1..`num_hidden_layers`; 0 = patch
            embeddings) the projector reads; None: all of them. Never a fixed count: a deeper encoder feeds more.
        projector_hidden_size (`int`, defaults to 256): width inside the TAC projector.
        projector_num_heads (`int`, defaults to 8): attention heads of the TAC projector; must divide its width.
        projector_hidden_act (`str`, defaults to `"gelu"`): activation of the projector MLPs.
        diagnosis_labels (`list[str]`, *optional*): findings a diagnosis head predicts from the encoder's pooled
            features (a trained classifier's head, see [`ReCTForConditionalGeneration.from_vision_and_language`]);
            the findings it finds are written as words into the last `diagnosis_seq_length` image tokens
            (diagnosis-driven prompts, as PromptMRG's). None: the image tokens are the projector's alone.
        diagnosis_pooling (`"cls"`, `"cls_mean"` or `"cls_mean_max"`, defaults to `"cls_mean_max"`): the encoder
            features the diagnosis head reads, as [`ReCTConfig`]'s `classifier_pooling`.
        diagnosis_lesion_map_channels (`list[int]`, defaults to `[]`), diagnosis_lesion_map_depth (`int`, defaults
            to 2): the diagnosis head's lesion-map decoder, as [`ReCTConfig`]'s `lesion_map_channels` and
            `lesion_map_depth` (a classifier trained with one scores a finding by its head's logit plus the map's
            maximum, and so does the diagnosis head built from it); empty: the linear head alone.
        diagnosis_threshold (`float`, defaults to 0.5): probability from which a finding is written.
        diagnosis_seq_length (`int`, defaults to 32): image tokens the written findings fill (a finding whose words
            no longer fit is left out whole).
        diagnosis_token_ids (`list[list[int]]`, *optional*): each label's words in the language model's vocabulary;
            `diagnosis_new_token_ids` the words for a finding absent on the prior scan. Written by
            [`ReCTForConditionalGeneration.set_diagnosis_phrases`].

    Raises:
        huggingface_hub.errors.StrictDataclassClassValidationError: `vision_feature_layers` outside the encoder,
            `projector_hidden_size` not divisible by `projector_num_heads`, or no image token left for the projector
            beside the diagnosis labels.
    """

    model_type = "rect_vlm"
    _auto_class = "AutoConfig"
    sub_configs_defaults = {
        "vision_config": ReCTVisionConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | ReCTVisionConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_type: Literal["tac", "mlp"] = "tac"
    image_token_id: int | None = None
    image_seq_length: int = interval(min=1)(default=32)
    vision_feature_layers: list[int] | None = None
    projector_hidden_size: int = interval(min=1)(default=256)
    projector_num_heads: int = interval(min=1)(default=8)
    projector_hidden_act: str = "gelu"
    diagnosis_labels: list[str] | None = None
    diagnosis_pooling: Literal["cls", "cls_mean", "cls_mean_max"] = "cls_mean_max"
    diagnosis_lesion_map_channels: list[int] | tuple[int, ...] = ()
    diagnosis_lesion_map_depth: int = interval(min=1)(default=2)
    diagnosis_threshold: float = interval(min=0.0, max=1.0)(default=0.5)
    diagnosis_seq_length: int = interval(min=1)(default=32)
    diagnosis_token_ids: list[list[int]] | None = None
    diagnosis_new_token_ids: list[list[int]] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        self.diagnosis_lesion_map_channels = [int(c) for c in self.diagnosis_lesion_map_channels]
        super().__post_init__(**kwargs)
        # As LLaVA: a text config that ties its embeddings keeps them tied inside the composite model.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    @property
    def feature_layers(self) -> list[int]:
        """The encoder layers the projector reads (`vision_feature_layers`, or every layer 1..N)."""
        if self.vision_feature_layers is None:
            return list(range(1, self.vision_config.num_hidden_layers + 1))
        return list(self.vision_feature_layers)

    @property
    def projector_seq_length(self) -> int:
        """Image tokens the projector writes: `image_seq_length` less the diagnosis tokens."""
        return self.image_seq_length - (self.diagnosis_seq_length if self.diagnosis_labels else 0)

    def validate_architecture(self):
        """Cross-field rules (run by `@strict` after construction)."""
        if self.projector_seq_length < 1:
            raise ValueError(
                f"`image_seq_length` ({self.image_seq_length}) must exceed `diagnosis_seq_length` "
                f"({self.diagnosis_seq_length}): the projector needs at least one image token of its own"
            )
        for name in ("diagnosis_token_ids", "diagnosis_new_token_ids"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.diagnosis_labels or ()):
                raise ValueError(
                    f"`{name}` holds {len(value)} phrases, expected one per `diagnosis_labels` "
                    f"({len(self.diagnosis_labels or ())})"
                )
        check_lesion_map_channels(
            "diagnosis_lesion_map_channels", self.diagnosis_lesion_map_channels, self.vision_config
        )
        if self.diagnosis_lesion_map_channels and not self.diagnosis_labels:
            raise ValueError("`diagnosis_lesion_map_channels` belong to a diagnosis head: set `diagnosis_labels`")
        depth = self.vision_config.num_hidden_layers
        layers = self.vision_feature_layers
        if layers is not None and (not layers or any(not 0 <= i <= depth for i in layers)):
            raise ValueError(
                f"`vision_feature_layers` {layers} must be a non-empty list of encoder layers 0..{depth} "
                f"(`vision_config.num_hidden_layers` = {depth}; 0 = patch embeddings)"
            )
        if self.projector_hidden_size % self.projector_num_heads:
            raise ValueError(
                f"`projector_hidden_size` ({self.projector_hidden_size}) must be divisible by `projector_num_heads` "
                f"({self.projector_num_heads})"
            )


__all__ = ["ReCTVisionConfig", "ReCTLocalizerConfig", "ReCTConfig", "ReCTVLMConfig", "CT_RATE_ABNORMALITIES"]
