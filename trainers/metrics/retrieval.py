"""Cross-modal retrieval metrics from a similarity matrix: Recall@K and mean reciprocal rank, both directions.

Ranks come from `scipy.stats.rankdata` with `method="max"`: a candidate that ties the match counts as ranked above
it, so a constant similarity matrix scores the worst, not the best (tests cross-check the numbers against
scikit-learn's `label_ranking_average_precision_score`, which is the MRR when each query has one match).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

from ._validation import finite_array


__all__ = ["retrieval_metrics", "retrieval_ranks"]


def retrieval_ranks(similarity) -> np.ndarray:
    """1-based rank of the match of each query (row) among the candidates (columns); the match is on the diagonal.

    Raises:
        ValueError: `similarity` is not a square 2-D matrix or holds NaN/inf.
    """
    similarity = finite_array(similarity, "similarity", ndim=2)
    if similarity.shape[0] != similarity.shape[1] or similarity.shape[0] == 0:
        raise ValueError(
            f"`similarity` must be a non-empty square (queries, candidates) matrix, got {similarity.shape}"
        )
    ranks = rankdata(-similarity, method="max", axis=1)
    return ranks[np.arange(len(ranks)), np.arange(len(ranks))].astype(np.int64)


def retrieval_metrics(similarity, targets=None, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K and MRR of image→text and text→image retrieval.

    Args:
        similarity (`(images, texts)` array): similarity of image i to text j (e.g. `ReCTModel` logits). Image→text
            ranks each row, text→image each column.
        targets (`(images,)` ints, optional): the text index that matches each image; it must be a permutation
            (one text per image). Default: the diagonal (`targets[i] = i`).
        ks: the cut-offs K. With fewer than K candidates, Recall@K is 1 by definition.

    Returns:
        `image_to_text/R@K`, `image_to_text/MRR`, `text_to_image/R@K`, `text_to_image/MRR` (fractions in [0, 1]).

    Raises:
        ValueError: `similarity` is not square or holds NaN/inf; `targets` is not a permutation of its columns.
    """
    similarity = finite_array(similarity, "similarity", ndim=2)
    if targets is not None:
        targets = np.asarray(targets)
        if targets.shape != (similarity.shape[0],) or sorted(targets.tolist()) != list(range(similarity.shape[1])):
            raise ValueError(
                f"`targets` must be a permutation of the {similarity.shape[1]} candidate indices, one per query"
            )
        similarity = similarity[:, targets]  # the match of query i moves to column i
    result: dict[str, float] = {}
    for direction, matrix in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        ranks = retrieval_ranks(matrix)
        for k in ks:
            result[f"{direction}/R@{k}"] = float(np.mean(ranks <= k))
        result[f"{direction}/MRR"] = float(np.mean(1.0 / ranks))
    return result
