"""Word-overlap metrics of generated reports against references: BLEU-1..4 (sacrebleu), ROUGE-L (rouge-score), CIDEr-D
(pycocoevalcap) and METEOR (nltk, only where its WordNet data is installed).

All metrics see the same tokens: lower-cased text split by `nltk.tokenize.wordpunct_tokenize` (a regular
expression, no downloaded model), except ROUGE-L, which keeps rouge-score's own tokenizer (lower case,
alphanumeric words). Scores are fractions in [0, 1] (CIDEr-D: 0 to 10). BLEU is corpus-level without smoothing
(an n-gram order with no match gives 0), as in the captioning toolkits; ROUGE-L is the mean per-report F-measure.
CIDEr-D weights n-grams by their document frequency over the references, so it needs a corpus: on a single
report every n-gram is in every reference and CIDEr-D is 0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from ._validation import text_pairs


__all__ = ["bleu", "cider", "meteor", "meteor_available", "rouge_l", "text_overlap_metrics", "tokenize"]

logger = logging.getLogger(__name__)


def tokenize(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens (`nltk.tokenize.wordpunct_tokenize`)."""
    from nltk.tokenize import wordpunct_tokenize

    return wordpunct_tokenize(text.lower())


def _pairs(predictions, references) -> tuple[list[str], list[list[str]]]:
    """Validated `(predictions, references)`: one text per prediction, one or more reference texts each."""
    predictions, references = text_pairs(predictions, references)
    if not all(isinstance(p, str) for p in predictions):
        raise ValueError("`predictions` must hold strings")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if not all(r and all(isinstance(t, str) for t in r) for r in refs):
        raise ValueError("`references` must hold a string (or a non-empty list of strings) per prediction")
    return predictions, refs


def bleu(predictions: Sequence[str], references, max_order: int = 4) -> dict[str, float]:
    """Corpus BLEU-1 .. BLEU-`max_order` (`sacrebleu`'s BLEU with uniform weights, no smoothing, on `tokenize`d
    text; brevity penalty from the closest reference length). An order with no matching n-gram gives 0.

    Returns:
        `{"bleu_1": ..., "bleu_4": ...}` in [0, 1].
    """
    from sacrebleu.metrics import BLEU

    predictions, references = _pairs(predictions, references)
    hypotheses = [" ".join(tokenize(p)) for p in predictions]
    streams = [  # sacrebleu takes one stream per reference slot; None where a prediction has fewer references
        [" ".join(tokenize(r[k])) if k < len(r) else None for r in references]
        for k in range(max(len(r) for r in references))
    ]
    result = {}
    for n in range(1, max_order + 1):
        scorer = BLEU(tokenize="none", smooth_method="none", max_ngram_order=n, force=True)
        result[f"bleu_{n}"] = scorer.corpus_score(hypotheses, streams).score / 100.0
    return result


def rouge_l(predictions: Sequence[str], references) -> dict[str, float]:
    """Mean ROUGE-L F-measure (`rouge_score.rouge_scorer`; best over a prediction's references)."""
    from rouge_score import rouge_scorer

    predictions, references = _pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [max(scorer.score(t, p)["rougeL"].fmeasure for t in r) for p, r in zip(predictions, references)]
    return {"rouge_l": float(np.mean(scores))}


def cider(predictions: Sequence[str], references) -> dict[str, float]:
    """Corpus CIDEr-D (`pycocoevalcap.cider.Cider`, n-grams 1..4, sigma 6), on `tokenize`d text.

    Raises:
        ImportError: `pycocoevalcap` is not installed (it is a dependency of this package; CIDEr is not
            re-implemented here).
    """
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError as error:
        raise ImportError("CIDEr needs the `pycocoevalcap` package: pip install 'pycocoevalcap>=1.2'") from error
    predictions, references = _pairs(predictions, references)
    res = {i: [" ".join(tokenize(p))] for i, p in enumerate(predictions)}
    gts = {i: [" ".join(tokenize(t)) for t in r] for i, r in enumerate(references)}
    score, _ = Cider().compute_score(gts, res)
    return {"cider": float(score)}


def meteor_available() -> bool:
    """Whether nltk's METEOR can run: it needs the WordNet corpus (`nltk.download("wordnet")`), which no package
    installs."""
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
    except LookupError:
        return False
    return True


def meteor(predictions: Sequence[str], references) -> dict[str, float]:
    """Mean METEOR (`nltk.translate.meteor_score.meteor_score`) where nltk's WordNet data is installed.

    Returns:
        `{"meteor": ...}`, or `{}` with a logged warning when WordNet is missing (the key is absent, never a
        made-up value).
    """
    predictions, references = _pairs(predictions, references)
    if not meteor_available():
        logger.warning(
            "METEOR skipped: nltk's WordNet data is not installed (python -m nltk.downloader wordnet); "
            "the result has no 'meteor' key"
        )
        return {}
    from nltk.translate.meteor_score import meteor_score

    scores = [meteor_score([tokenize(t) for t in r], tokenize(p)) for p, r in zip(predictions, references)]
    return {"meteor": float(np.mean(scores))}


def text_overlap_metrics(predictions: Sequence[str], references) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L, CIDEr-D and (where available) METEOR of generated texts against references.

    Args:
        predictions: generated texts.
        references: one reference text per prediction, or a list of reference texts per prediction.

    Raises:
        ValueError: the two differ in length, are empty, or hold something other than strings.
    """
    result = bleu(predictions, references)
    result.update(rouge_l(predictions, references))
    result.update(cider(predictions, references))
    result.update(meteor(predictions, references))
    return result
