"""Hub-ready ReCT-VLM model code: configurations, models, processors and their Auto-class registration."""

from .auto_registration import register_auto_classes
from .configuration_rect import (
    CT_RATE_ABNORMALITIES,
    ReCTConfig,
    ReCTLocalizerConfig,
    ReCTVisionConfig,
    ReCTVLMConfig,
)
from .image_processing_rect import ReCTImageProcessor, load_volume
from .modeling_localizer_rect import ReCTForLesionLocalization, ReCTLesionLocalizationOutput
from .modeling_rect import (
    ReCTFeatureExtractionOutput,
    ReCTForFeatureExtraction,
    ReCTForVolumeClassification,
    ReCTModel,
    ReCTOutput,
    ReCTPreTrainedModel,
    ReCTVisionModel,
    ReCTVisionModelOutput,
    ReCTVolumeClassifierOutput,
)
from .modeling_vlm_rect import ReCTForConditionalGeneration, ReCTVLMOutput
from .processing_rect import ReCTProcessor
from .processing_vlm_rect import ReCTVLMProcessor
from .volume_geometry_rect import VolumeMetadata


__all__ = [
    "CT_RATE_ABNORMALITIES",
    "ReCTConfig",
    "ReCTVisionConfig",
    "ReCTLocalizerConfig",
    "ReCTVLMConfig",
    "ReCTForConditionalGeneration",
    "ReCTVLMOutput",
    "ReCTVLMProcessor",
    "ReCTPreTrainedModel",
    "ReCTVisionModel",
    "ReCTForFeatureExtraction",
    "ReCTModel",
    "ReCTForVolumeClassification",
    "ReCTForLesionLocalization",
    "ReCTLesionLocalizationOutput",
    "ReCTVisionModelOutput",
    "ReCTFeatureExtractionOutput",
    "ReCTOutput",
    "ReCTVolumeClassifierOutput",
    "ReCTImageProcessor",
    "ReCTProcessor",
    "load_volume",
    "VolumeMetadata",
    "register_auto_classes",
]
