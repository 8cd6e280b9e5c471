"""Hub-ready ReCT-VLM model code: configurations, models, processors and their Auto-class registration."""

from .configuration_rect import CT_RATE_ABNORMALITIES, ReCTConfig, ReCTVisionConfig
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
