"""ReCTProcessor: the CT image processor and a text tokenizer behind one call (as `SiglipProcessor`)."""

import warnings

from transformers.processing_utils import ProcessorMixin


class ReCTProcessor(ProcessorMixin):
    r"""
    Wraps a [`ReCTImageProcessor`] and any tokenizer (the text tower's, or the causal LM's).

    `processor(images=..., text=..., anatomy_mask=..., return_tensors="pt")` returns one `BatchFeature` holding
    `pixel_values`, `anatomy_mask` / `lesion_mask` when given, `volume_meta` (one `VolumeMetadata` per volume, for
    mapping predictions back; never converted to tensors) and the tokenizer's `input_ids` / `attention_mask`.
    `ProcessorMixin` does the rest: the image arguments (`anatomy_mask`, `lesion_mask`, `affines`, setting
    overrides) go to the image processor, the text arguments to the tokenizer, and `return_tensors=None` (the
    default) means no conversion (lists of numpy arrays, one per volume). Text is padded to the longest and
    truncated to 512 tokens unless the call says otherwise.

    Args:
        image_processor ([`ReCTImageProcessor`]): CT volumes and masks → model tensors.
        tokenizer ([`PreTrainedTokenizerBase`]): text → token ids.
    """

    # `save_pretrained` copies this file (and the image processor's) and writes the `auto_map` for `AutoProcessor`.
    _auto_class = "AutoProcessor"
    text_kwargs = {"padding": True, "truncation": True, "max_length": 512}
    skip_tensor_conversion = [*ProcessorMixin.skip_tensor_conversion, "volume_meta"]

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_args_and_dict(cls, args, processor_dict, **kwargs):
        """As `ProcessorMixin`, but say which saved keys this version does not know instead of dropping them
        silently (a folder written by another version still loads)."""
        known = set(cls.get_attributes()) | {"auto_map", "processor_class", "chat_template", "audio_tokenizer"}
        unknown = sorted(set(processor_dict) - known)
        if unknown:
            warnings.warn(
                f"ReCTProcessor: ignoring unknown key(s) {unknown} in the saved processor config", UserWarning, 2
            )
        return super().from_args_and_dict(
            args, {k: v for k, v in processor_dict.items() if k not in unknown}, **kwargs
        )

    def post_process_masks(self, masks, volume_meta, **kwargs):
        """Forwarded to [`ReCTImageProcessor.post_process_masks`]: model-space masks/logits → original voxel grids."""
        return self.image_processor.post_process_masks(masks, volume_meta, **kwargs)

    def save_mask(self, mask, volume_meta, path):
        """Forwarded to [`ReCTImageProcessor.save_mask`]: a mask on the original grid → NIfTI."""
        return self.image_processor.save_mask(mask, volume_meta, path)


__all__ = ["ReCTProcessor"]
