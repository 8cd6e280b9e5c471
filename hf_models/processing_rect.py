"""ReCTProcessor: the CT image processor and a text tokenizer behind one call (as `SiglipProcessor`)."""

import inspect
import warnings

import numpy as np
import torch
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

    Localizer prompts (`ReCTForLesionLocalization`): `text` may be a list of K prompts per volume (a list of
    lists, the same K for every volume), which gives `input_ids` / `attention_mask` of shape `(batch, K, seq)`;
    `input_points` (per volume `(P, 3)`) with `input_labels` (per volume `(P,)`: 1 positive, 0 negative) and
    `input_boxes` (per volume 6 numbers: two opposite corners) are given in the ORIGINAL scan's coordinates —
    `prompt_space="voxel"` (its voxel indices, in the file's axis order), `"ras"` or `"lps"` (mm) — and come back
    on the model grid (see [`ReCTImageProcessor.coordinates_to_model_grid`] / `boxes_to_model_grid`), points padded
    to the longest with label -1.

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

    def __call__(
        self,
        images=None,
        text=None,
        input_points=None,
        input_labels=None,
        input_boxes=None,
        prompt_space: str = "voxel",
        **kwargs,
    ):
        """See the class docstring; everything but the localizer prompts is `ProcessorMixin.__call__`'s."""
        per_volume = isinstance(text, (list, tuple)) and bool(text) and all(isinstance(t, (list, tuple)) for t in text)
        if per_volume:
            counts = sorted({len(t) for t in text})
            if len(counts) != 1 or counts[0] == 0:
                raise ValueError(f"text: expected the same number of prompts (>= 1) for every volume, found {counts}")
            flat = [prompt for prompts in text for prompt in prompts]
        if (input_points is not None or input_boxes is not None) and images is None:
            raise ValueError("input_points / input_boxes: map onto the model grid of `images`, which were not given")
        output = super().__call__(images=images, text=flat if per_volume else text, **kwargs)
        return_tensors = kwargs.get("return_tensors")
        if per_volume:
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                if key in output:
                    output[key] = _group(output[key], len(text), counts[0])
        metas = output.get("volume_meta")
        if input_points is not None:
            points, labels = self._points(input_points, input_labels, metas, prompt_space)
            output["input_points"] = _as_tensors(points, return_tensors, np.float32)
            output["input_labels"] = _as_tensors(labels, return_tensors, np.int64)
        elif input_labels is not None:
            raise ValueError("input_labels: given without input_points")
        if input_boxes is not None:
            boxes = _per_volume(input_boxes, len(metas), "input_boxes")
            converted = [
                self.image_processor.boxes_to_model_grid(box, meta, prompt_space, f"input_boxes[{i}]")
                for i, (box, meta) in enumerate(zip(boxes, metas))
            ]
            output["input_boxes"] = _as_tensors(converted, return_tensors, np.float32)
        return output

    def _points(self, input_points, input_labels, metas, space):
        if input_labels is None:
            raise ValueError("input_points: `input_labels` are needed too (per point: 1 positive, 0 negative)")
        points = _per_volume(input_points, len(metas), "input_points")
        labels = _per_volume(input_labels, len(metas), "input_labels")
        converted, label_rows = [], []
        for i, (pts, lab, meta) in enumerate(zip(points, labels, metas)):
            pts = np.asarray(pts, dtype=np.float64).reshape(-1, 3) if np.size(pts) else np.zeros((0, 3))
            lab = np.asarray(lab, dtype=np.int64).reshape(-1)
            if len(lab) != len(pts) or not np.isin(lab, (0, 1)).all():
                raise ValueError(
                    f"input_labels[{i}]: expected one label (1 positive, 0 negative) per point ({len(pts)}), found "
                    f"{lab.tolist()}"
                )
            converted.append(self.image_processor.coordinates_to_model_grid(pts, meta, space, f"input_points[{i}]"))
            label_rows.append(lab)
        longest = max(len(p) for p in converted)
        if longest == 0:
            raise ValueError("input_points: no point for any volume")
        padded = [np.concatenate([p, np.zeros((longest - len(p), 3), np.float32)]) for p in converted]
        label_rows = [np.concatenate([lab, -np.ones(longest - len(lab), np.int64)]) for lab in label_rows]
        return padded, label_rows

    @classmethod
    def _known_keys(cls, processor_dict):
        """`processor_dict` without the keys this version does not know, each said in a warning (a folder written by
        another version still loads; nothing is dropped silently)."""
        own = {name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "kwargs")}
        known = set(cls.get_attributes()) | own | {"auto_map", "processor_class", "chat_template", "audio_tokenizer"}
        unknown = sorted(set(processor_dict) - known)
        if unknown:
            warnings.warn(
                f"{cls.__name__}: ignoring unknown key(s) {unknown} in the saved processor config", UserWarning, 3
            )
        return {k: v for k, v in processor_dict.items() if k not in unknown}

    @classmethod
    def from_args_and_dict(cls, args, processor_dict, **kwargs):
        """As `ProcessorMixin` (transformers 5.24 loads through it), after `_known_keys`."""
        return super().from_args_and_dict(args, cls._known_keys(processor_dict), **kwargs)

    @classmethod
    def from_dict(cls, processor_dict, **kwargs):
        """As `ProcessorMixin` (transformers 5.25 loads through it), after `_known_keys`."""
        return super().from_dict(cls._known_keys(processor_dict), **kwargs)

    def post_process_masks(self, masks, volume_meta, **kwargs):
        """Forwarded to [`ReCTImageProcessor.post_process_masks`]: model-space masks/logits → original voxel grids."""
        return self.image_processor.post_process_masks(masks, volume_meta, **kwargs)

    def mask_findings(self, mask, volume_meta, names=None):
        """Forwarded to [`ReCTImageProcessor.mask_findings`]: per-lesion volume (mL) and centroid (mm)."""
        return self.image_processor.mask_findings(mask, volume_meta, names)

    def save_mask(self, mask, volume_meta, path):
        """Forwarded to [`ReCTImageProcessor.save_mask`]: a mask on the original grid → NIfTI."""
        return self.image_processor.save_mask(mask, volume_meta, path)


def _per_volume(values, count: int, name: str) -> list:
    """One entry per volume from a list or a batched array/tensor; a single volume may give its entry alone."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    items = list(values)
    if count == 1 and len(items) != 1:
        items = [values]
    if len(items) != count:
        raise ValueError(f"{name}: expected one entry per volume ({count}), found {len(items)}")
    return items


def _as_tensors(items: list, return_tensors, dtype):
    """Per-volume arrays → as the processor returns everything else: a list (None), stacked numpy or torch."""
    if return_tensors is None:
        return [np.asarray(item, dtype=dtype) for item in items]
    stacked = np.stack([np.asarray(item, dtype=dtype) for item in items])
    return torch.from_numpy(stacked) if return_tensors == "pt" else stacked


def _group(values, batch: int, per_volume: int):
    """Flat per-prompt tokenizer output (batch · K rows) → (batch, K, ...)."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        return values.reshape(batch, per_volume, *values.shape[1:])
    return [list(values[i * per_volume : (i + 1) * per_volume]) for i in range(batch)]


__all__ = ["ReCTProcessor"]
