"""Maximal marginal relevance: re-order candidates so that the top hits are relevant and unlike each other."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mmr_order(relevance: Sequence[float], embeddings: np.ndarray, *, lambda_: float, k: int) -> list[int]:
    """Indices of up to `k` candidates, picked greedily by λ·relevance − (1−λ)·(max cosine to those picked).

    `relevance` may be on any scale (cosine, IDF-weighted overlap, RRF); it is divided by the best
    candidate's, so that the top candidate has relevance 1 and a cosine-scored list stays close to
    its own scale. `embeddings` are the candidates' unit-length vectors, one row each. λ = 1 keeps
    the relevance order (ties in input order); λ = 0 only avoids what was already picked.
    """
    n = len(relevance)
    if n == 0 or k <= 0:
        return []
    rel = np.asarray(relevance, dtype=np.float64)
    best = rel.max()
    # All scores <= 0 (cosine can be negative): shift instead, so that the best is 1 all the same.
    rel = rel / best if best > 0 else rel - best + 1.0
    vectors = np.asarray(embeddings, dtype=np.float64)
    similarity = vectors @ vectors.T

    picked: list[int] = []
    # Highest similarity of each candidate to anything picked so far.
    redundancy = np.full(n, -np.inf)
    available = np.ones(n, dtype=bool)
    for _ in range(min(k, n)):
        penalty = np.where(np.isfinite(redundancy), redundancy, 0.0)
        score = lambda_ * rel - (1.0 - lambda_) * penalty
        score[~available] = -np.inf
        best = int(np.argmax(score))
        picked.append(best)
        available[best] = False
        redundancy = np.maximum(redundancy, similarity[best])
    return picked
