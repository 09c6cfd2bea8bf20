"""Maximal-marginal-relevance re-ranking on hand-made vectors."""

from __future__ import annotations

import numpy as np
import pytest

from services.retriever.mmr import mmr_order


def unit(*rows: list[float]) -> np.ndarray:
    m = np.array(rows, dtype=np.float64)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


# Candidates 0 and 1 are the same direction; 2 is orthogonal to both; 3 is halfway.
VECTORS = unit([1, 0], [1, 0], [0, 1], [1, 1])
RELEVANCE = [0.9, 0.85, 0.6, 0.5]


def test_lambda_one_keeps_the_relevance_order() -> None:
    assert mmr_order(RELEVANCE, VECTORS, lambda_=1.0, k=4) == [0, 1, 2, 3]


def test_a_low_lambda_skips_the_duplicate() -> None:
    assert mmr_order(RELEVANCE, VECTORS, lambda_=0.5, k=2) == [0, 2]
    # Relevance is scaled to 1, .94, .67, .56: the duplicate (relevant, fully redundant) still beats
    # the halfway vector (less relevant, redundant with both picks).
    assert mmr_order(RELEVANCE, VECTORS, lambda_=0.5, k=4) == [0, 2, 1, 3]
    assert mmr_order(RELEVANCE, VECTORS, lambda_=0.2, k=4) == [0, 2, 3, 1]


def test_the_first_pick_is_always_the_most_relevant() -> None:
    for lambda_ in (0.0, 0.3, 0.7, 1.0):
        assert mmr_order(RELEVANCE, VECTORS, lambda_=lambda_, k=1) == [0]


def test_scale_of_relevance_does_not_matter() -> None:
    scaled = [r * 40 for r in RELEVANCE]  # e.g. IDF-weighted overlap instead of cosine
    assert mmr_order(scaled, VECTORS, lambda_=0.5, k=4) == mmr_order(RELEVANCE, VECTORS, lambda_=0.5, k=4)


def test_negative_scores_are_handled() -> None:
    negative = [r - 2 for r in RELEVANCE]
    assert mmr_order(negative, VECTORS, lambda_=1.0, k=4) == [0, 1, 2, 3]


@pytest.mark.parametrize("k", [0, 1, 3, 4, 10])
def test_returns_each_candidate_at_most_once(k: int) -> None:
    picked = mmr_order(RELEVANCE, VECTORS, lambda_=0.2, k=k)
    assert len(picked) == min(k, 4)
    assert len(set(picked)) == len(picked)


def test_no_candidates() -> None:
    assert mmr_order([], np.zeros((0, 2)), lambda_=0.5, k=3) == []
