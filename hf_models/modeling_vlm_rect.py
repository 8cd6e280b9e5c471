"""ReCT report generator: the ReCT vision encoder → a projector → any causal language model (LLaVA's layout).

`ReCTForConditionalGeneration` replaces each run of `image_seq_length` `<image>` placeholder tokens (the processor
writes them) with the projected features of that sample's volume, as transformers' LLaVA does, and runs the
language model on the result. The `"tac"` projector (Libra's temporal alignment connector) reads every selected
encoder layer of the current scan and of a prior scan and fuses them into those same tokens: one placeholder run per
sample, whether or not a prior exists (without one, the current scan stands in for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, GenerationMixin
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import ModelOutput

from .configuration_rect import ReCTVLMConfig
from .modeling_rect import ReCTLesionMapDecoder, ReCTPreTrainedModel, ReCTVisionModel, pool_vision_features


@dataclass
class ReCTVLMOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*): language-modelling loss over the tokens whose `labels` are not -100.
    logits (`torch.FloatTensor` of shape `(batch, seq, vocab)`): next-token scores.
    cache (`Cache`, *optional*): the language model's key/value cache.
    hidden_states, attentions: the language model's, when asked for.
    diagnosis_logits (`torch.FloatTensor` of shape `(batch, len(config.diagnosis_labels))`, *optional*): the
        diagnosis head's logits for the current scans, when the model has one.
    image_hidden_states (`torch.FloatTensor` of shape `(batch, image_seq_length, text_hidden)`, *optional*): the
        projected volume features that replaced the `<image>` tokens.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    diagnosis_logits: torch.FloatTensor | None = None
    image_hidden_states: torch.FloatTensor | None = None


class ReCTDiagnosisPrompt(nn.Module):
    """Diagnosis-driven prompt tokens (PromptMRG's diagnosis prompts): a linear head over the encoder's pooled
    features (`config.diagnosis_pooling`) predicts each of `config.diagnosis_labels`; the labels whose probability
    reaches `config.diagnosis_threshold` are written out as words, in label order, into the last
    `config.diagnosis_seq_length` image tokens (the language model's own embeddings of `config.diagnosis_token_ids`,
    zero vectors after the last word); a finding whose words no longer fit is left out whole, never cut short. On a
    follow-up, a finding present now and absent on the prior scan is written with `config.diagnosis_new_token_ids`
    instead. With `config.diagnosis_lesion_map_channels` each label's logit also gets the highest logit of a
    lesion map over the stem, as the classifier it comes from scores. The head (and map decoder) is a trained
    classifier's (`from_vision_and_language(diagnosis_head=..., diagnosis_lesion_map=...)`); decisions are
    thresholded, so no gradient reaches it and the two-stage training keeps it frozen. The words come from the
    tokenizer (`ReCTForConditionalGeneration.set_diagnosis_phrases`).
    """

    def __init__(self, config: ReCTVLMConfig):
        super().__init__()
        pooled = len(config.diagnosis_pooling.split("_")) * config.vision_config.hidden_size
        self.classifier = nn.Linear(pooled, len(config.diagnosis_labels))
        self.lesion_map_decoder = None
        if config.diagnosis_lesion_map_channels:
            self.lesion_map_decoder = ReCTLesionMapDecoder(
                config.vision_config,
                config.diagnosis_lesion_map_channels,
                config.diagnosis_lesion_map_depth,
                len(config.diagnosis_labels),
            )
        self.threshold = config.diagnosis_threshold
        self.length = config.diagnosis_seq_length
        self.phrases = config.diagnosis_token_ids
        self.new_phrases = config.diagnosis_new_token_ids or self.phrases

    def token_ids(
        self,
        logits: torch.Tensor,
        prior_logits: torch.Tensor | None = None,
        has_prior: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`(batch, diagnosis_seq_length)` token ids of the written findings, -1 where nothing is written.

        Args:
            logits (`(batch, labels)`): the current scans' logits.
            prior_logits (`(prior_count, labels)`, *optional*): the prior scans' logits, one row per True in
                `has_prior`.
            targets (`(batch, labels)` integers, *optional*): what to write instead of the head's decisions (teacher
                forcing in training): 0 absent, 1 present, 2 present and new since the prior scan, -1 the head's.
        """
        if self.phrases is None:
            raise ValueError(
                "`config.diagnosis_token_ids` is not set: call `set_diagnosis_phrases(tokenizer)` on the model first"
            )
        present = logits.sigmoid() >= self.threshold
        before = torch.ones_like(present)
        if prior_logits is not None:
            before[has_prior] = prior_logits.sigmoid() >= self.threshold
        if targets is not None:
            if tuple(targets.shape) != tuple(logits.shape):
                raise ValueError(
                    f"`diagnosis_targets` must have shape {tuple(logits.shape)} (batch, diagnosis labels), got "
                    f"{tuple(targets.shape)}"
                )
            given = targets >= 0
            present = torch.where(given, targets >= 1, present)
            before = torch.where(given, targets != 2, before)
        ids = torch.full((logits.shape[0], self.length), -1, dtype=torch.long, device=logits.device)
        for row, (now, then) in enumerate(zip(present.tolist(), before.tolist())):
            words: list[int] = []
            for phrase, new_phrase, on, old in zip(self.phrases, self.new_phrases, now, then):
                chosen = phrase if old else new_phrase
                if on and len(words) + len(chosen) <= self.length:
                    words += chosen
            ids[row, : len(words)] = torch.tensor(words, dtype=torch.long)
        return ids


class ReCTMLPProjector(nn.Module):
    """LLaVA's projector: the last selected layer's patch tokens, average-pooled along the token order (d, h, w) to
    `projector_seq_length` tokens, then Linear → GELU → Linear into the language model's width."""

    def __init__(self, config: ReCTVLMConfig):
        super().__init__()
        self.image_seq_length = config.projector_seq_length
        text_hidden = config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, text_hidden)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(text_hidden, text_hidden)
        self.diagnosis = ReCTDiagnosisPrompt(config) if config.diagnosis_labels else None

    def forward(self, layers: list[torch.Tensor], **_) -> torch.Tensor:
        tokens = F.adaptive_avg_pool1d(layers[-1].transpose(1, 2), self.image_seq_length).transpose(1, 2)
        return self.linear_2(self.act(self.linear_1(tokens)))


class ReCTTACProjector(nn.Module):
    """Libra's temporal alignment connector, for 3D volumes.

    1. Layer-wise feature extraction: every selected encoder layer gets its own LayerNorm and projection; a learned
       score weighs the layers per token (softmax over layers), so each token mixes shallow and deep features.
    2. Resampling: `projector_seq_length` learned queries attend to the fused patch tokens (and, given an anatomy mask,
       to the present region features), giving a fixed number of tokens whatever the volume size.
    3. Temporal fusion: self-attention over the current and prior tokens together (each with a learned time
       embedding), then cross-attention from current to prior; without a prior the current scan stands in.
    4. An MLP into the language model's width.
    """

    def __init__(self, config: ReCTVLMConfig):
        super().__init__()
        vision_hidden, width = config.vision_config.hidden_size, config.projector_hidden_size
        heads, num_layers = config.projector_num_heads, len(config.feature_layers)
        self.layer_norms = nn.ModuleList([nn.LayerNorm(vision_hidden) for _ in range(num_layers)])
        self.layer_projections = nn.ModuleList([nn.Linear(vision_hidden, width) for _ in range(num_layers)])
        self.layer_scores = nn.Linear(width, 1)
        self.region_projection = nn.Linear(vision_hidden, width)
        self.queries = nn.Parameter(torch.zeros(config.projector_seq_length, width))
        self.resampler_norm = nn.LayerNorm(width)
        self.resampler = nn.MultiheadAttention(width, heads, batch_first=True)
        self.temporal_embeddings = nn.Parameter(torch.zeros(2, width))
        self.self_attention_norm = nn.LayerNorm(width)
        self.self_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attention_norm = nn.LayerNorm(width)
        self.cross_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.output_norm = nn.LayerNorm(width)
        text_hidden = config.text_config.hidden_size
        self.linear_1 = nn.Linear(width, text_hidden)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(text_hidden, text_hidden)
        self.diagnosis = ReCTDiagnosisPrompt(config) if config.diagnosis_labels else None

    def extract(
        self, layers: list[torch.Tensor], regions: torch.Tensor | None = None, present: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Selected layers' patch tokens `[(batch, N, vision_hidden)] * L` → `(batch, projector_seq_length, width)`."""
        features = torch.stack(
            [proj(norm(x)) for x, norm, proj in zip(layers, self.layer_norms, self.layer_projections)], dim=1
        )
        weights = self.layer_scores(features).softmax(dim=1)
        tokens = (weights * features).sum(dim=1)
        padding = None
        if regions is not None:
            tokens = torch.cat([tokens, self.region_projection(regions)], dim=1)
            padding = torch.cat([present.new_zeros(present.shape[0], layers[0].shape[1]), ~present], dim=1)
        queries = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        keys = self.resampler_norm(tokens)
        pooled, _ = self.resampler(queries, keys, keys, key_padding_mask=padding, need_weights=False)
        return queries + pooled

    def forward(
        self,
        layers: list[torch.Tensor],
        has_prior: torch.Tensor | None = None,
        regions: torch.Tensor | None = None,
        present: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`layers`: the selected encoder layers' patch tokens of the current scans, followed (with `has_prior`,
        `(batch,)` bool) by those of the prior scans that exist, in batch order; `regions`/`present` over the same
        rows. Both kinds go through `extract` together, so every module runs once whatever the batch holds."""
        tokens = self.extract(layers, regions, present)
        batch = tokens.shape[0] if has_prior is None else has_prior.shape[0]
        current = prior = tokens[:batch]
        if has_prior is not None:
            # Prior features exist only for the samples with a prior; the others' current scan stands in.
            prior = current.clone()
            prior[has_prior] = tokens[batch:]
        length = current.shape[1]
        both = torch.cat([current + self.temporal_embeddings[0], prior + self.temporal_embeddings[1]], dim=1)
        normed = self.self_attention_norm(both)
        both = both + self.self_attention(normed, normed, normed, need_weights=False)[0]
        current, prior = both[:, :length], both[:, length:]
        fused = self.cross_attention(self.cross_attention_norm(current), prior, prior, need_weights=False)[0]
        current = current + fused
        return self.linear_2(self.act(self.linear_1(self.output_norm(current))))


class ReCTForConditionalGeneration(ReCTPreTrainedModel, GenerationMixin):
    """CT volume (+ optional prior scan) + text → text: findings and impressions, conditioned on the volume.

    Built from a [`ReCTVLMConfig`]: `vision_model` ([`ReCTVisionModel`]), `multi_modal_projector` (TAC or MLP) and
    `language_model` (any `AutoModelForCausalLM`, including a GGUF or 4-bit one given to
    [`~ReCTForConditionalGeneration.from_vision_and_language`]).
    """

    config: ReCTVLMConfig
    config_class = ReCTVLMConfig
    base_model_prefix = "rect_vlm"
    main_input_name = "input_ids"  # as LLaVA: `generate` continues the text; the volume is a side input
    input_modalities = ("image", "text")
    _extra_auto_classes = ("AutoModelForImageTextToText",)
    _no_split_modules = ["ReCTLayer", "ReCTRegionAttention", "ReCTTACProjector"]
    # The language model's loss sums over the batch's answer tokens and divides by `num_items_in_batch` when the
    # Trainer passes it, so gradient accumulation is exact.
    accepts_loss_kwargs = True
    _supports_sdpa = True

    def __init__(self, config: ReCTVLMConfig):
        super().__init__(config)
        self.vision_model = ReCTVisionModel._from_config(config.vision_config)
        projector = ReCTTACProjector if config.projector_type == "tac" else ReCTMLPProjector
        self.multi_modal_projector = projector(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ReCTTACProjector):
            init.trunc_normal_(module.queries, std=self.config.vision_config.initializer_range)
            init.trunc_normal_(module.temporal_embeddings, std=self.config.vision_config.initializer_range)

    def set_diagnosis_phrases(self, tokenizer, phrase: str = " {label}.", new_phrase: str = " {label}, new.") -> None:
        """Write each diagnosis label's words with `tokenizer` into the config (`diagnosis_token_ids`: `phrase`;
        `diagnosis_new_token_ids`: `new_phrase`, for a finding absent on the prior scan)."""
        diagnosis = self.multi_modal_projector.diagnosis
        if diagnosis is None:
            raise ValueError("the model has no `diagnosis_labels`")

        def ids(template: str) -> list[list[int]]:
            out = [tokenizer(template.format(label=label), add_special_tokens=False)["input_ids"] for label in labels]
            empty = [label for label, i in zip(labels, out) if not i]
            if empty:
                raise ValueError(f"diagnosis labels {empty} tokenize to no tokens with {template!r}")
            return out

        labels = self.config.diagnosis_labels
        self.config.diagnosis_token_ids = diagnosis.phrases = ids(phrase)
        self.config.diagnosis_new_token_ids = diagnosis.new_phrases = ids(new_phrase)

    # Embeddings are the language model's (`resize_token_embeddings` after adding `<image>` works through these).
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    # ------------------------------------------------------------------------------------------------------------

    def _encoder_layers(self, pixel_values: torch.Tensor, anatomy_mask: torch.Tensor | None = None):
        vision = self.vision_model(
            pixel_values,
            anatomy_mask,
            output_hidden_states=True,
            output_stem_features=bool(self.config.diagnosis_lesion_map_channels),
            return_dict=True,
        )
        prefix = self.config.vision_config.num_prefix_tokens
        layers = [vision.hidden_states[i][:, prefix:] for i in self.config.feature_layers]
        return layers, vision

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        prior_pixel_values: torch.Tensor | None = None,
        has_prior: torch.Tensor | None = None,
        anatomy_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Projected volume features `(batch, image_seq_length, text_hidden)`: the projector's tokens, then the
        diagnosis tokens when the model has `diagnosis_labels`.

        Args:
            pixel_values (`(batch, channels, depth, height, width)`): the current scans.
            prior_pixel_values (same shape, *optional*): the prior scans; rows without one are ignored.
            has_prior (`(batch,)` bool, *optional*): which samples have a prior; all of them when
                `prior_pixel_values` is given without it.
            anatomy_mask (`(batch, 1, depth, height, width)`, *optional*): region ids of the current scans; the TAC
                projector's queries then also attend to the present regions' features.
        """
        return self._image_features(pixel_values, prior_pixel_values, has_prior, anatomy_mask)[0]

    def _image_features(
        self, pixel_values, prior_pixel_values=None, has_prior=None, anatomy_mask=None, diagnosis_targets=None
    ):
        """`(features, diagnosis_logits or None)`; see `get_image_features`."""
        batch = pixel_values.shape[0]
        if prior_pixel_values is not None:
            if tuple(prior_pixel_values.shape) != tuple(pixel_values.shape):
                raise ValueError(
                    f"`prior_pixel_values` must have the shape of `pixel_values` {tuple(pixel_values.shape)}, got "
                    f"{tuple(prior_pixel_values.shape)}"
                )
            if has_prior is None:
                has_prior = torch.ones(batch, dtype=torch.bool, device=pixel_values.device)
            if has_prior.dtype != torch.bool or tuple(has_prior.shape) != (batch,):
                raise ValueError(
                    f"`has_prior` must be a bool tensor of shape ({batch},), got {has_prior.dtype} "
                    f"{tuple(has_prior.shape)}"
                )
            if self.config.projector_type == "mlp" and bool(has_prior.any()):
                raise ValueError("projector_type 'mlp' reads the current scan only; prior scans need 'tac'")
        elif has_prior is not None and bool(has_prior.any()):
            raise ValueError("`has_prior` marks samples with a prior scan but `prior_pixel_values` is None")
        # One encoder pass over the current scans and the prior scans that exist, whatever the batch holds: every
        # module runs once per forward, as ZeRO-3 needs (it gathers a module's weights on all ranks when it runs).
        joint = pixel_values
        if prior_pixel_values is not None:
            joint = torch.cat([pixel_values, prior_pixel_values[has_prior]])
            if anatomy_mask is not None:  # priors have none: no region present
                anatomy_mask = torch.cat(
                    [anatomy_mask, anatomy_mask.new_zeros((joint.shape[0] - batch, *anatomy_mask.shape[1:]))]
                )
        joint_layers, vision = self._encoder_layers(joint, anatomy_mask)
        features = self.multi_modal_projector(
            joint_layers,
            has_prior=has_prior if prior_pixel_values is not None else None,
            regions=vision.region_features,
            present=vision.region_present,
        )
        diagnosis = self.multi_modal_projector.diagnosis
        if diagnosis is None:
            if diagnosis_targets is not None:
                raise ValueError("`diagnosis_targets` given, but the model has no `diagnosis_labels`")
            return features, None

        def logits_of(output):
            prefix = self.config.vision_config.num_prefix_tokens
            logits = diagnosis.classifier(pool_vision_features(output, prefix, self.config.diagnosis_pooling))
            if diagnosis.lesion_map_decoder is not None:
                logits = logits + diagnosis.lesion_map_decoder.label_maxima(output, prefix)
            return logits

        joint_logits = logits_of(vision)
        logits = joint_logits[:batch]
        prior_logits = joint_logits[batch:] if prior_pixel_values is not None else None
        ids = diagnosis.token_ids(logits, prior_logits, has_prior, diagnosis_targets)
        tokens = self.get_input_embeddings()(ids.clamp(min=0)) * (ids >= 0).unsqueeze(-1)
        tokens = tokens.to(features.dtype)
        return torch.cat([features, tokens], dim=1), logits

    def get_placeholder_mask(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """`(batch, seq)` bool mask of the `<image>` tokens; raises unless every sample has `image_seq_length`."""
        if self.config.image_token_id is None:
            raise ValueError(
                "`config.image_token_id` is not set: the id of `<image>` in the language model's vocabulary"
            )
        mask = input_ids == self.config.image_token_id
        counts = mask.sum(dim=1).tolist()
        expected = image_features.shape[1]
        if input_ids.shape[0] != image_features.shape[0] or any(c != expected for c in counts):
            raise ValueError(
                f"Image features and image tokens do not match: {image_features.shape[0]} volume(s) of {expected} "
                f"features each, but the samples hold {counts} `<image>` tokens (id {self.config.image_token_id}); "
                "let the processor expand one `<image>` per sample"
            )
        return mask

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        prior_pixel_values: torch.Tensor | None = None,
        has_prior: torch.Tensor | None = None,
        anatomy_mask: torch.Tensor | None = None,
        diagnosis_targets: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> ReCTVLMOutput:
        r"""
        Args:
            input_ids (`(batch, seq)`): prompt (+ answer) tokens with `image_seq_length` `<image>` tokens per sample
                wherever the volume goes (`ReCTVLMProcessor` writes them).
            pixel_values (`(batch, channels, depth, height, width)`, *optional*): the current scans.
            prior_pixel_values, has_prior, anatomy_mask: see [`~ReCTForConditionalGeneration.get_image_features`].
            diagnosis_targets (`(batch, len(config.diagnosis_labels))` integers, *optional*): findings to write into
                the diagnosis tokens instead of the head's (0 absent, 1 present, 2 new since the prior scan, -1 the
                head's decision): teacher forcing, so the LM learns to write what those tokens say.
            labels (`(batch, seq)`, *optional*): next-token targets, -100 where no loss is wanted (the prompt); the
                `<image>` positions never carry a loss.
            cache, attention_mask, position_ids, logits_to_keep, kwargs: passed to the language model.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of `input_ids` and `inputs_embeds`")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_features = diagnosis_logits = None
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError("`pixel_values` need `input_ids` holding the `<image>` placeholders")
            image_features, diagnosis_logits = self._image_features(
                pixel_values, prior_pixel_values, has_prior, anatomy_mask, diagnosis_targets
            )
            mask = self.get_placeholder_mask(input_ids, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(
                mask.unsqueeze(-1).to(inputs_embeds.device), image_features.to(inputs_embeds.dtype)
            )
        elif input_ids is not None and self.config.image_token_id is not None:
            if bool((input_ids == self.config.image_token_id).any()):
                raise ValueError("`input_ids` hold `<image>` tokens but no `pixel_values` were given")
        if labels is not None and input_ids is not None and self.config.image_token_id is not None:
            labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            logits_to_keep=logits_to_keep,
            **{**kwargs, "return_dict": True},
        )
        return ReCTVLMOutput(
            loss=outputs.loss,
            logits=outputs.logits,
            cache=getattr(outputs, "cache", None),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            diagnosis_logits=diagnosis_logits,
            image_hidden_states=image_features,
        )

    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_vision_and_language(
        cls,
        vision_model: ReCTVisionModel | str,
        language_model: nn.Module | str,
        image_token_id: int,
        diagnosis_head: nn.Linear | None = None,
        diagnosis_lesion_map: ReCTLesionMapDecoder | None = None,
        **config_kwargs,
    ) -> ReCTForConditionalGeneration:
        """Assemble a report generator from a (pre-trained) ReCT encoder and a causal LM, either a model object
        (e.g. loaded with `gguf_file=` or a bitsandbytes `quantization_config`) or a folder. The projector is new.

        Args:
            vision_model: a `ReCTVisionModel` or a folder holding one (a ReCT encoder or classifier's encoder).
            language_model: an `AutoModelForCausalLM` model, or a folder `from_pretrained` reads.
            image_token_id: the `<image>` id in the LM's (resized) vocabulary.
            diagnosis_head: a trained classifier's head over this encoder's pooled features (e.g.
                `ReCTForVolumeClassification.classifier`), one output per `config_kwargs["diagnosis_labels"]`; its
                weights are copied into the diagnosis prompt. Needs `diagnosis_labels`.
            diagnosis_lesion_map: the same classifier's lesion-map decoder
                (`ReCTForVolumeClassification.lesion_map_decoder`, when it has one), copied beside the head so
                the diagnosis scores each finding as the classifier does; sets `diagnosis_lesion_map_channels` and
                `diagnosis_lesion_map_depth`.
            config_kwargs: further [`ReCTVLMConfig`] fields (`projector_type`, `image_seq_length`, ...).
        """
        if isinstance(vision_model, str):
            vision_model = ReCTVisionModel.from_pretrained(vision_model)
        if isinstance(language_model, str):
            language_model = AutoModelForCausalLM.from_pretrained(language_model)
        vocab = language_model.get_input_embeddings().num_embeddings
        if not 0 <= image_token_id < vocab:
            raise ValueError(
                f"`image_token_id` {image_token_id} is outside the language model's vocabulary ({vocab}); add "
                "`<image>` to the tokenizer and `resize_token_embeddings` first"
            )
        text_config = language_model.config.to_dict()
        text_config.pop("quantization_config", None)
        if diagnosis_lesion_map is not None:
            if diagnosis_head is None:
                raise ValueError("`diagnosis_lesion_map` joins a `diagnosis_head`: give the classifier's head too")
            config_kwargs["diagnosis_lesion_map_channels"] = diagnosis_lesion_map.widths
            config_kwargs["diagnosis_lesion_map_depth"] = diagnosis_lesion_map.depth
        config = ReCTVLMConfig(
            vision_config=vision_model.config.to_dict(),
            text_config=text_config,
            image_token_id=image_token_id,
            **config_kwargs,
        )
        # The assembled model is built on the meta device, then given the two trained parts; only the projector is
        # initialised.
        with torch.device("meta"):
            model = cls(config)
        model.vision_model = vision_model
        model.language_model = language_model
        projector = type(model.multi_modal_projector)(config)
        model.multi_modal_projector = projector.to(next(vision_model.parameters()).device)
        for module in model.multi_modal_projector.modules():
            model._init_weights(module)
        diagnosis = model.multi_modal_projector.diagnosis
        if diagnosis_head is not None:
            if diagnosis is None:
                raise ValueError("`diagnosis_head` needs `diagnosis_labels`, one per output of the head")
            expected = tuple(diagnosis.classifier.weight.shape)
            if tuple(diagnosis_head.weight.shape) != expected:
                raise ValueError(
                    f"`diagnosis_head` weight has shape {tuple(diagnosis_head.weight.shape)}, expected {expected} "
                    f"({len(config.diagnosis_labels)} labels × the encoder's {config.diagnosis_pooling} features)"
                )
            diagnosis.classifier.load_state_dict(diagnosis_head.state_dict())
        if diagnosis_lesion_map is not None:
            diagnosis.lesion_map_decoder.load_state_dict(diagnosis_lesion_map.state_dict())
        return model


__all__ = [
    "ReCTForConditionalGeneration",
    "ReCTVLMOutput",
    "ReCTTACProjector",
    "ReCTMLPProjector",
    "ReCTDiagnosisPrompt",
]
