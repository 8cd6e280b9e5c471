"""ReCTProcessor: the CT image processor and a text tokenizer behind one call."""

from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin


class ReCTProcessor(ProcessorMixin):
    r"""
    Wraps a [`ReCTImageProcessor`] and any tokenizer (the text tower's, or the causal LM's).

    `processor(volumes=..., text=..., anatomy_mask=...)` returns one `BatchFeature` holding `pixel_values`,
    `anatomy_mask` / `lesion_mask` when given, `volume_meta` (per-volume geometry for mapping predictions back)
    and the tokenizer's `input_ids` / `attention_mask`.

    Args:
        image_processor ([`ReCTImageProcessor`]): CT volumes and masks → model tensors.
        tokenizer ([`PreTrainedTokenizerBase`]): text → token ids.
        text_max_length (`int`, *optional*, defaults to 512): truncation length for reports.
    """

    _auto_class = "AutoProcessor"

    def __init__(self, image_processor=None, tokenizer=None, text_max_length: int = 512, **kwargs):
        self.text_max_length = text_max_length
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(
        self,
        volumes=None,
        text: str | list[str] | None = None,
        anatomy_mask=None,
        lesion_mask=None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        truncation: bool = True,
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            volumes: one CT or a list (paths to `.nii`/`.nii.gz`/`.npy`/DICOM folders, nibabel images, arrays);
                see [`ReCTImageProcessor`].
            text: one string or a list, paired with the volumes row by row.
            anatomy_mask, lesion_mask: masks on the volumes' voxel grids, processed with nearest neighbour.
            kwargs: forwarded to the image processor (e.g. `affines`).

        Raises:
            ValueError: when neither `volumes` nor `text` is given.
        """
        if volumes is None and text is None:
            raise ValueError("ReCTProcessor needs `volumes`, `text`, or both")
        data, skip = {}, []
        if volumes is not None:
            image_inputs = self.image_processor(
                volumes, anatomy_mask=anatomy_mask, lesion_mask=lesion_mask, return_tensors=return_tensors, **kwargs
            )
            data.update(image_inputs)
            skip = ["volume_meta"]
        if text is not None:
            text_inputs = self.tokenizer(
                text,
                padding=padding,
                truncation=truncation,
                max_length=self.text_max_length,
                return_tensors=return_tensors,
            )
            data.update(text_inputs)
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=skip)

    def batch_decode(self, *args, **kwargs):
        """Forwarded to the tokenizer's `batch_decode`."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        """Forwarded to the tokenizer's `decode`."""
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_masks(self, masks, volume_meta, **kwargs):
        """Forwarded to [`ReCTImageProcessor.post_process_masks`]: model-space masks/logits → original voxel grids."""
        return self.image_processor.post_process_masks(masks, volume_meta, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return list(dict.fromkeys(self.tokenizer.model_input_names + self.image_processor.model_input_names))


__all__ = ["ReCTProcessor"]
