"""ReCT-VLM configurations.

`ReCTVisionConfig` describes the 3D CT vision encoder; `ReCTConfig` composes it with any BERT-like text
encoder for the contrastive dual encoder and the volume classifier.
"""

import math

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


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


def _as_int_triple(field: str, value) -> list[int]:
    """Validate a (depth, height, width) size field and return it as a list of three positive ints."""
    if isinstance(value, int):
        value = [value, value, value]
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"`{field}` must be a (depth, height, width) list of 3 positive ints, got {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ValueError(f"`{field}` must hold 3 positive ints, got {value!r}")
    return list(value)


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
        hidden_dropout_prob (`float`, defaults to 0.1): dropout after attention and MLP blocks.
        attention_probs_dropout_prob (`float`, defaults to 0.1): dropout on attention probabilities.
        initializer_range (`float`, defaults to 0.02): std of the truncated-normal initialiser.
        layer_norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.
        volume_size (`list[int]`, defaults to `[64, 512, 512]`): (depth, height, width) in voxels the position
            embeddings are laid out for; other sizes are interpolated (trilinear).
        patch_size (`list[int]`, defaults to `[4, 16, 16]`): (depth, height, width) of one patch in voxels.
        in_channels (`int`, defaults to 1): input channels (one per HU window).
        qkv_bias (`bool`, defaults to `True`): bias on the query/key/value projections.
        attention_type (`str`, defaults to `"divided"`): `"divided"` attends along z across slabs and then within
            each axial slab of tokens (slice-aware attention); `"joint"` is plain full attention (needed to load
            MONAI/M3D-style ViT weights exactly).
        num_regions (`int`, defaults to 20): anatomy regions with ids 1..R in `anatomy_mask` (0 is background).
        region_patch_fraction (`float`, defaults to 0.25): a patch token belongs to region r when at least this
            fraction of its voxels carries id r. A region with no such token is absent for that volume.
        projection_dim (`int`, defaults to 512): size of the embeddings [`ReCTForFeatureExtraction`] returns.

    Raises:
        ValueError: when a size is not positive, `volume_size` is not divisible by `patch_size`, `hidden_size` is
            not divisible by `num_attention_heads`, or an enum field has an unknown value.
    """

    model_type = "rect_vision"
    _auto_class = "AutoConfig"
    base_config_key = "vision_config"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    volume_size: list[int] | tuple[int, ...] = (64, 512, 512)
    patch_size: list[int] | tuple[int, ...] = (4, 16, 16)
    in_channels: int = 1
    qkv_bias: bool = True
    attention_type: str = "divided"
    num_regions: int = 20
    region_patch_fraction: float = 0.25
    projection_dim: int = 512

    def __post_init__(self, **kwargs):
        self.volume_size = _as_int_triple("volume_size", self.volume_size)
        self.patch_size = _as_int_triple("patch_size", self.patch_size)
        for field in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "in_channels",
            "projection_dim",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{field}` must be a positive int, got {value!r}")
        if not isinstance(self.num_regions, int) or self.num_regions < 0:
            raise ValueError(f"`num_regions` must be an int >= 0, got {self.num_regions!r}")
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
        if self.attention_type not in ATTENTION_TYPES:
            raise ValueError(f"`attention_type` must be one of {ATTENTION_TYPES}, got {self.attention_type!r}")
        for field in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ValueError(f"`{field}` must be in [0, 1), got {getattr(self, field)!r}")
        if not 0.0 < self.region_patch_fraction <= 1.0:
            raise ValueError(f"`region_patch_fraction` must be in (0, 1], got {self.region_patch_fraction!r}")
        super().__post_init__(**kwargs)

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        """Number of patches along (depth, height, width) for `volume_size`."""
        return tuple(v // p for v, p in zip(self.volume_size, self.patch_size))


class ReCTConfig(PreTrainedConfig):
    r"""
    Configuration of [`ReCTModel`] (contrastive vision–text dual encoder) and [`ReCTForVolumeClassification`].

    Args:
        vision_config (`dict` or [`ReCTVisionConfig`], *optional*): the 3D vision encoder.
        text_config (`dict` or `PreTrainedConfig`, *optional*): any BERT-like encoder loadable with
            `AutoModel.from_config` (a dict needs its `model_type`; defaults to BERT-base, the shape of
            Bio_ClinicalBERT).
        projection_dim (`int`, defaults to 512): size of the shared image/text embedding space.
        logit_scale_init_value (`float`, defaults to log(1 / 0.07)): initial log inverse temperature.
        region_alignment_weight (`float`, defaults to 0.5): weight of the region–report alignment loss.
        text_pooling (`str`, defaults to `"mean"`): how a text embedding is pooled from the text encoder:
            `"cls"` (first token), `"mean"` (mask-weighted mean of tokens) or `"pooler"` (`pooler_output`).
        classifier_dropout (`float`, defaults to 0.0): dropout before the classification head.
        classifier_pooling (`str`, defaults to `"cls_mean_max"`): features the classification head reads: the CLS
            token, plus the mean of the patch tokens (`"cls_mean"`), plus their max (`"cls_mean_max"`: a focal
            finding anywhere in the volume drives the max, an extended one the mean).
        pos_weight (`list[float]`, *optional*): per-label positive weights of the multi-label BCE (one per label).
        id2label (`dict[int, str]`, *optional*): defaults to the 18 CT-RATE abnormalities.
        problem_type (`str`, defaults to `"multi_label_classification"`).

    Raises:
        ValueError: on a non-positive `projection_dim`, a negative `region_alignment_weight` or an unknown
            `text_pooling`.
    """

    model_type = "rect"
    _auto_class = "AutoConfig"
    sub_configs_defaults = {
        "vision_config": ReCTVisionConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
    }

    vision_config: dict | ReCTVisionConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = math.log(1 / 0.07)
    region_alignment_weight: float = 0.5
    text_pooling: str = "mean"
    classifier_dropout: float = 0.0
    classifier_pooling: str = "cls_mean_max"
    pos_weight: list[float] | None = None

    def __post_init__(self, **kwargs):
        if self.id2label is None and kwargs.get("num_labels") is None:
            self.id2label = dict(enumerate(CT_RATE_ABNORMALITIES))
        if self.problem_type is None:
            self.problem_type = "multi_label_classification"
        if not isinstance(self.projection_dim, int) or self.projection_dim <= 0:
            raise ValueError(f"`projection_dim` must be a positive int, got {self.projection_dim!r}")
        if self.region_alignment_weight < 0:
            raise ValueError(f"`region_alignment_weight` must be >= 0, got {self.region_alignment_weight!r}")
        if self.text_pooling not in TEXT_POOLING_TYPES:
            raise ValueError(f"`text_pooling` must be one of {TEXT_POOLING_TYPES}, got {self.text_pooling!r}")
        if self.classifier_pooling not in CLASSIFIER_POOLING_TYPES:
            raise ValueError(
                f"`classifier_pooling` must be one of {CLASSIFIER_POOLING_TYPES}, got {self.classifier_pooling!r}"
            )
        if not 0.0 <= self.classifier_dropout < 1.0:
            raise ValueError(f"`classifier_dropout` must be in [0, 1), got {self.classifier_dropout!r}")
        super().__post_init__(**kwargs)
        if self.pos_weight is not None and len(self.pos_weight) != self.num_labels:
            raise ValueError(
                f"`pos_weight` must have one entry per label ({self.num_labels}), got {len(self.pos_weight)}"
            )
        if self.label2id is None or len(self.label2id) != len(self.id2label):
            self.label2id = {label: i for i, label in self.id2label.items()}


__all__ = ["ReCTVisionConfig", "ReCTConfig", "CT_RATE_ABNORMALITIES"]
