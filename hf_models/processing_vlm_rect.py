"""ReCTVLMProcessor: CT volumes (+ prior scans) and prompts for `ReCTForConditionalGeneration` (LLaVA's convention)."""

import numpy as np
import torch

from .processing_rect import ReCTProcessor


class ReCTVLMProcessor(ReCTProcessor):
    r"""
    [`ReCTProcessor`] for the report generator: every `<image>` in `text` (exactly one per sample when `images` are
    given) becomes `image_seq_length` `<image>` tokens, which the model replaces with the projected volume features.
    A prior scan is fused by the projector into those same tokens, so it needs no placeholder of its own.

    `processor(images=[current, ...], text=[prompt, ...], prior_images=[prior or None, ...], return_tensors="pt")`
    returns `input_ids`, `attention_mask`, `pixel_values`, `volume_meta` and, with `prior_images`,
    `prior_pixel_values` (zeros where a sample has no prior) and `has_prior` (bool per sample).
    `apply_chat_template` formats conversations with the tokenizer's chat template; put `<image>` where the volume
    goes (`{"type": "image"}` content entries are rendered as `<image>`).

    Args:
        image_processor ([`ReCTImageProcessor`]): CT volumes → model tensors.
        tokenizer ([`PreTrainedTokenizerBase`]): the language model's tokenizer, holding `image_token` (add it with
            `tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})` and resize the model's
            embeddings).
        image_seq_length (`int`, defaults to 32): placeholder tokens per volume (the model config's).
        image_token (`str`, defaults to `"<image>"`).
        chat_template (`str`, *optional*): defaults to the tokenizer's.

    The tokenizer is switched to left padding (what batched generation needs; training is indifferent).
    """

    text_kwargs = {"padding": True}

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_seq_length: int = 32,
        image_token: str = "<image>",
        chat_template=None,
        **kwargs,
    ):
        if not isinstance(image_seq_length, int) or image_seq_length < 1:
            raise ValueError(f"image_seq_length must be a positive int, got {image_seq_length!r}")
        self.image_seq_length = image_seq_length
        self.image_token = image_token
        self.image_token_id = None
        if tokenizer is not None:
            token_id = tokenizer.convert_tokens_to_ids(image_token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(
                    f"the tokenizer has no {image_token!r} token: add it with tokenizer.add_special_tokens("
                    f"{{'additional_special_tokens': [{image_token!r}]}}) and resize the model's token embeddings"
                )
            self.image_token_id = token_id
            # Batched generation continues every row from its last token: prompts are padded on the left (the
            # tokenizer's own setting wins over a processor default, so it is set there and saved with it).
            tokenizer.padding_side = "left"
            if chat_template is None:
                chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def validate_inputs(self, images=None, text=None, **kwargs):
        """One `<image>` per sample when `images` are given (one volume per sample), none otherwise."""
        if images is None and text is None:
            raise ValueError("ReCTVLMProcessor needs `images`, `text` or both")
        if text is None:
            return
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("`text` must be a string or a list of strings (one prompt per sample)")
        counts = [t.count(self.image_token) for t in texts]
        if images is None:
            if any(counts):
                raise ValueError(f"the prompts hold {counts} {self.image_token} but no `images` were given")
            return
        volumes = len(images) if isinstance(images, (list, tuple)) else 1
        if volumes != len(texts) or any(c != 1 for c in counts):
            raise ValueError(
                f"expected one volume and exactly one {self.image_token} per sample; got {volumes} volume(s) for "
                f"{len(texts)} prompt(s) holding {counts} {self.image_token}"
            )

    def _process_images(self, images, **kwargs):
        processed = self.image_processor(images, **kwargs)
        count = len(images) if isinstance(images, (list, tuple)) else 1
        return processed, [self.image_token * self.image_seq_length] * count

    def __call__(self, images=None, text=None, prior_images=None, **kwargs):
        """See the class docstring."""
        # No length limit unless asked for: truncating a prompt could cut its `<image>` run (a tokenizer's saved
        # `max_length` would otherwise apply).
        if not kwargs.get("truncation") and "max_length" not in kwargs:
            kwargs["text_kwargs"] = {"max_length": None, **(kwargs.get("text_kwargs") or {})}
        output = super().__call__(images=images, text=text, **kwargs)
        if prior_images is None:
            return output
        if images is None:
            raise ValueError("prior_images: given without the current `images`")
        volumes = list(images) if isinstance(images, (list, tuple)) else [images]
        priors = list(prior_images) if isinstance(prior_images, (list, tuple)) else [prior_images]
        if len(priors) != len(volumes):
            raise ValueError(
                f"prior_images: expected one entry (a scan or None) per volume ({len(volumes)}), got {len(priors)}"
            )
        has_prior = [p is not None for p in priors]
        current = output["pixel_values"]
        shapes = {tuple(np.shape(v)) for v in current}
        prior_values = [np.zeros_like(np.asarray(v)) for v in current]
        metas = [None] * len(priors)
        present = [p for p in priors if p is not None]
        if present:
            processed = self.image_processor(
                present, **{**(kwargs.get("images_kwargs") or {}), "return_tensors": None}
            )
            rows = iter(range(len(present)))
            for i, flag in enumerate(has_prior):
                if flag:
                    j = next(rows)
                    prior_values[i] = np.asarray(processed["pixel_values"][j])
                    metas[i] = processed["volume_meta"][j]
            bad = {tuple(np.shape(v)) for v in prior_values} - shapes
            if bad:
                raise ValueError(
                    f"prior_images: processed to shapes {sorted(bad)}, the current scans to {sorted(shapes)}"
                )
        return_tensors = kwargs.get("return_tensors")
        if return_tensors == "pt":
            output["prior_pixel_values"] = torch.from_numpy(np.stack(prior_values))
            output["has_prior"] = torch.tensor(has_prior, dtype=torch.bool)
        elif return_tensors == "np":
            output["prior_pixel_values"] = np.stack(prior_values)
            output["has_prior"] = np.asarray(has_prior, dtype=bool)
        else:
            output["prior_pixel_values"] = prior_values
            output["has_prior"] = has_prior
        output["prior_volume_meta"] = metas
        return output


__all__ = ["ReCTVLMProcessor"]
