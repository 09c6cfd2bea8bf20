"""Hybrid search fuses a dense and a sparse ranking: what the dense model is shown, how much its ranking
counts, and Qdrant's fusion formula."""

from __future__ import annotations

from collections.abc import Sequence

from services.retriever.lexical import tokens

# Qdrant's default RRF constant (`Rrf.k`); the original paper's 60 corresponds to 61 in this formula.
RRF_K = 2


# How much an English-only model's ranking counts for a query all in Latin script (`dense_weight`): chosen
# on the real Korean set's tuning half (hybrid recall@5 0.963 at 1.0, 0.968 at 0.25, as high as sparse alone).
ENGLISH_ONLY_WEIGHT = 0.25


def dense_weight(text: str, *, multilingual: bool, english_only_weight: float = ENGLISH_ONLY_WEIGHT) -> float:
    """How much the dense ranking counts next to the sparse one (weight 1) in hybrid search: 0..1.

    An English-only embedding model (the packaged all-MiniLM-L6-v2) cannot read Hangul: its tokenizer
    breaks each syllable into jamo, so its ranking for a Korean query is close to random, and fused at
    full weight it pushes the lexical channel's right answers down. Its weight is therefore the share of
    the query's words that it can read, Latin-script words and identifiers (numbers count for neither
    side), times `english_only_weight`: even on English words its neighbours are weaker evidence than an
    exact term match. A multilingual model reads every word: weight 1, plain reciprocal rank fusion.
    """
    if multilingual:
        return 1.0
    readable = unreadable = 0
    for kind, _ in tokens(text):
        if kind == "code":
            readable += 1
        elif kind == "ngram":
            unreadable += 1
    return english_only_weight * (1.0 if readable + unreadable == 0 else readable / (readable + unreadable))


def readable_text(text: str, *, multilingual: bool) -> str:
    """What of a query an English-only model should embed: its Latin-script words, identifiers and
    numbers when it also has words in other scripts (their jamo only add noise, and tokens: time), else
    the query as it is. A multilingual model gets the query as it is."""
    if multilingual:
        return text
    kept, dropped = [], False
    for kind, token in tokens(text):
        if kind == "ngram":
            dropped = True
        else:
            kept.append(token)
    return " ".join(kept) if dropped and kept else text


def rrf(
    rankings: Sequence[Sequence[str]], weights: Sequence[float], *, k: int = RRF_K
) -> list[tuple[str, float]]:
    """Qdrant's weighted reciprocal rank fusion of rankings (ids, best first): the id at 0-based rank r of
    a ranking with weight w gains ``1 / ((r + 1) / w + k - 1)``, which is ``1 / (r + k)`` at w = 1, and
    nothing at w <= 0. Best first; equal scores keep the order in which ids first appear. The same
    arithmetic as qdrant_client/hybrid/fusion.py, which embedded Qdrant runs for `RrfQuery`."""
    if len(rankings) != len(weights):
        raise ValueError(f"{len(rankings)} rankings but {len(weights)} weights")
    scores: dict[str, float] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        for rank, point_id in enumerate(ranking):
            gain = 1.0 / ((rank + 1.0) / weight + k - 1.0) if weight > 0 else 0.0
            scores[point_id] = scores.get(point_id, 0.0) + gain
    return sorted(scores.items(), key=lambda item: item[1], reverse=True)
