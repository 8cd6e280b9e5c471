"""Explicit registration of the ReCT classes with transformers' Auto classes (never done at import time)."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForImageTextToText,
    AutoModelForMaskGeneration,
    AutoProcessor,
)

from .configuration_rect import ReCTConfig, ReCTVisionConfig, ReCTVLMConfig
from .image_processing_rect import ReCTImageProcessor
from .modeling_localizer_rect import ReCTForLesionLocalization
from .modeling_rect import ReCTForVolumeClassification, ReCTModel, ReCTVisionModel
from .modeling_vlm_rect import ReCTForConditionalGeneration
from .processing_rect import ReCTProcessor
from .processing_vlm_rect import ReCTVLMProcessor


def register_auto_classes() -> None:
    """Make `AutoConfig`, `AutoModel`, `AutoModelForImageClassification`, `AutoModelForMaskGeneration`,
    `AutoImageProcessor` and `AutoProcessor` resolve `rect_vision` / `rect` configs to the ReCT classes in this
    process (`AutoModel` on a `rect` config gives `ReCTModel`; a saved localizer folder's `auto_map` gives
    `ReCTForLesionLocalization`; a `rect_vlm` config gives `ReCTForConditionalGeneration` and `ReCTVLMProcessor`).

    Folders saved by `save_pretrained` do not need this: their `config.json` / `processor_config.json` carry an
    `auto_map` and the code files, and load anywhere with `trust_remote_code=True`. Safe to call repeatedly.
    """
    AutoConfig.register(ReCTVisionConfig.model_type, ReCTVisionConfig, exist_ok=True)
    AutoConfig.register(ReCTConfig.model_type, ReCTConfig, exist_ok=True)
    AutoConfig.register(ReCTVLMConfig.model_type, ReCTVLMConfig, exist_ok=True)
    AutoModel.register(ReCTVLMConfig, ReCTForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(ReCTVLMConfig, ReCTForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(ReCTVLMConfig, ReCTVLMProcessor, exist_ok=True)
    AutoModel.register(ReCTVisionConfig, ReCTVisionModel, exist_ok=True)
    AutoModel.register(ReCTConfig, ReCTModel, exist_ok=True)
    AutoModelForImageClassification.register(ReCTConfig, ReCTForVolumeClassification, exist_ok=True)
    AutoModelForMaskGeneration.register(ReCTConfig, ReCTForLesionLocalization, exist_ok=True)
    for config_class in (ReCTVisionConfig, ReCTConfig, ReCTVLMConfig):
        AutoImageProcessor.register(config_class, image_processor_classes={"torch": ReCTImageProcessor}, exist_ok=True)
    AutoProcessor.register(ReCTConfig, ReCTProcessor, exist_ok=True)
