"""The in-memory ranking of embedded mode (`ExactIndex`, `rrf`, `dense_weight`) against Qdrant's own Query API.

No model: a hashing encoder stands in for the dense one, so these run in seconds. The agreement tests
store the same documents in two embedded Qdrants, one ranked by `ExactIndex` and one by Qdrant's Query
API (the requests a Qdrant server gets), and expect the same hits with the same scores.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import models
from qdrant_client.hybrid.fusion import reciprocal_rank_fusion

from services.retriever.exact import ExactIndex, qdrant_idf
from services.retriever.fusion import dense_weight, readable_text, rrf
from services.retriever.index import (
    Document,
    Hit,
    QdrantIndex,
    QdrantLocation,
    SearchFilter,
    SearchMode,
    SearchQuery,
)
from services.retriever.lexical import LexicalEncoder, SparseTerms

DIMENSIONS = 16


class HashingEncoder:
    """A stand-in dense model: the normalised sum of one fixed random vector per word."""

    name = "hashing-16"

    def load(self) -> int:
        return DIMENSIONS

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), DIMENSIONS), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.split():
                seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
                out[i] += np.random.default_rng(seed).standard_normal(DIMENSIONS).astype(np.float32)
            out[i] /= np.linalg.norm(out[i]) or 1.0
        return out


class JitteredLexicalEncoder(LexicalEncoder):
    """The lexical encoder with each weight nudged by a hash of (text, term), so that no two texts tie on
    a score and the two rankings being compared cannot differ merely in how they order equal scores."""

    def encode(self, text: str) -> SparseTerms:
        plain = super().encode(text)
        nudged = []
        for term, value in zip(plain.indices, plain.values, strict=True):
            digest = hashlib.blake2b(f"{term}:{text}".encode(), digest_size=4).digest()
            nudged.append(value * (1.0 + int.from_bytes(digest, "little") / 2**32))
        return SparseTerms(plain.indices, tuple(nudged))


def terms(*pairs: tuple[int, float]) -> SparseTerms:
    ordered = sorted(pairs)
    return SparseTerms(tuple(i for i, _ in ordered), tuple(v for _, v in ordered))


def unit(*values: float) -> np.ndarray:
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


# --- ExactIndex on its own --------------------------------------------------------------------------


def test_sparse_scores_are_idf_weighted_dot_products_of_matching_points_only() -> None:
    index = ExactIndex(2)
    index.put("a", unit(1, 0), terms((1, 2.0), (2, 1.0)), {})
    index.put("b", unit(0, 1), terms((2, 1.0)), {})
    index.put("c", unit(1, 1), terms((3, 1.0)), {})
    ranking = dict(index.sparse_ranking(terms((1, 1.0), (2, 3.0)), 10))
    idf1, idf2 = qdrant_idf(np.array([1, 2]), 3)
    assert set(ranking) == {"a", "b"}  # c shares no term: not a match, not a zero score
    assert ranking["a"] == pytest.approx(1.0 * idf1 * 2.0 + 3.0 * idf2 * 1.0)
    assert ranking["b"] == pytest.approx(3.0 * idf2 * 1.0)
    assert index.sparse_ranking(terms((99, 1.0)), 10) == []


def test_dense_scores_are_cosine_similarities_best_first() -> None:
    index = ExactIndex(2)
    index.put("x", np.array([3.0, 0.0]), terms(), {})  # stored vectors are normalised
    index.put("y", np.array([1.0, 1.0]), terms(), {})
    index.put("z", np.array([0.0, -2.0]), terms(), {})
    ranking = index.dense_ranking(np.array([2.0, 0.0]), 10)
    assert [p for p, _ in ranking] == ["x", "y", "z"]
    assert [s for _, s in ranking] == pytest.approx([1.0, 2**-0.5, 0.0])
    assert [p for p, _ in index.dense_ranking(np.array([1.0, 0.0]), 2)] == ["x", "y"]
    assert [p for p, _ in index.dense_ranking(np.array([1.0, 0.0]), 10, score_threshold=0.5)] == ["x", "y"]


def test_replacing_and_removing_points_updates_rankings_and_idf() -> None:
    index = ExactIndex(2)
    index.put("a", unit(1, 0), terms((1, 1.0)), {"kind": ["til"]})
    index.put("b", unit(0, 1), terms((1, 1.0)), {"kind": ["til"]})
    index.put("a", unit(0, 1), terms((2, 1.0)), {"kind": ["doc"]})  # replaces a
    assert len(index) == 2
    assert [p for p, _ in index.sparse_ranking(terms((1, 1.0)), 10)] == ["b"]
    assert dict(index.sparse_ranking(terms((2, 1.0)), 10))["a"] == pytest.approx(
        float(qdrant_idf(np.array([1]), 2)[0])
    )
    assert [p for p, _ in index.dense_ranking(unit(1, 0), 10, [("kind", ("doc",))])] == ["a"]
    index.remove(["b", "never-stored"])
    assert "b" not in index and len(index) == 1
    assert index.sparse_ranking(terms((1, 1.0)), 10) == []
    assert [p for p, _ in index.dense_ranking(unit(1, 0), 10)] == ["a"]


def test_compaction_keeps_every_live_point_and_its_scores() -> None:
    rng = random.Random(3)
    index = ExactIndex(4, min_compaction=8)
    reference: dict[str, tuple[np.ndarray, SparseTerms, dict[str, list[str]]]] = {}
    for step in range(400):
        point = f"p{rng.randrange(60)}"
        if rng.random() < 0.3:
            index.remove([point])
            reference.pop(point, None)
        else:
            vector = np.array([rng.gauss(0, 1) for _ in range(4)], dtype=np.float32)
            term_ids = sorted(rng.sample(range(30), 4))
            sparse = SparseTerms(tuple(term_ids), tuple(float(rng.randint(1, 3)) for _ in term_ids))
            keywords = {"tags": [f"t{rng.randrange(3)}", f"t{step % 3}"]}
            index.put(point, vector, sparse, keywords)
            reference[point] = (vector, sparse, keywords)
    fresh = ExactIndex(4)
    for point, (vector, sparse, keywords) in reference.items():
        fresh.put(point, vector, sparse, keywords)
    assert len(index) == len(fresh) == len(reference)
    for query_terms in (terms((1, 1.0), (2, 2.0)), terms((5, 1.0))):
        for conditions in ((), [("tags", ("t0",))]):
            got = dict(index.sparse_ranking(query_terms, 100, conditions))
            want = dict(fresh.sparse_ranking(query_terms, 100, conditions))
            assert got.keys() == want.keys()
            assert [got[p] for p in want] == pytest.approx(list(want.values()))
    query = np.ones(4, dtype=np.float32)
    assert dict(index.dense_ranking(query, 100)) == pytest.approx(dict(fresh.dense_ranking(query, 100)))


def test_filters_need_every_condition_and_any_of_its_values() -> None:
    index = ExactIndex(2)
    index.put("a", unit(1, 0), terms(), {"kind": ["til"], "owner": ["alice"], "tags": ["x", "y"]})
    index.put("b", unit(1, 0), terms(), {"kind": ["doc"], "owner": ["alice"], "tags": ["y"]})
    index.put("c", unit(1, 0), terms(), {"kind": ["til"], "owner": ["bob"], "tags": []})

    def matching(*conditions: tuple[str, tuple[str, ...]]) -> set[str]:
        return {p for p, _ in index.dense_ranking(unit(1, 0), 10, conditions)}

    assert matching() == {"a", "b", "c"}
    assert matching(("kind", ("til",))) == {"a", "c"}
    assert matching(("kind", ("til", "doc")), ("owner", ("alice",))) == {"a", "b"}
    assert matching(("tags", ("x", "z"))) == {"a"}
    assert matching(("owner", ("carol",))) == set()


def test_a_vector_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(ValueError, match="3-dim"):
        ExactIndex(2).put("a", np.ones(3), terms(), {})


# --- fusion -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.25, 1.0], [1.0, 3.0], [0.0, 1.0]])
def test_rrf_is_qdrants_weighted_reciprocal_rank_fusion(weights: list[float]) -> None:
    rankings = [["a", "b", "c", "d"], ["c", "e", "a"]]
    ours = rrf(rankings, weights)
    theirs = reciprocal_rank_fusion(
        [[models.ScoredPoint(id=p, version=0, score=0.0) for p in r] for r in rankings],
        limit=10,
        weights=weights,
    )
    assert ours == [(str(p.id), pytest.approx(p.score)) for p in theirs]
    assert rrf([["a"]], [1.0]) == [("a", 0.5)]  # 1 / (0 + k), k = 2


def test_rrf_needs_one_weight_per_ranking() -> None:
    with pytest.raises(ValueError, match="2 rankings but 1 weights"):
        rrf([["a"], ["b"]], [1.0])


@pytest.mark.parametrize(
    ("text", "weight"),
    [
        ("How do I set a Redis TTL?", 1.0),
        ("트랜잭션 격리 수준", 0.0),
        ("parse_http_header 함수는 헤더를 나눈다", 1 / 4),
        ("asyncio.Queue 정리", 1 / 2),
        ("2024 12 31", 1.0),  # nothing to read either way
        ("?!", 1.0),
    ],
)
def test_the_dense_weight_is_the_share_of_words_the_model_reads(text: str, weight: float) -> None:
    assert dense_weight(text, multilingual=False) == pytest.approx(weight)
    assert dense_weight(text, multilingual=True) == 1.0


@pytest.mark.parametrize(
    ("text", "readable"),
    [
        ("parse_http_header 함수는 헤더를 나눈다", "parse_http_header"),
        ("asyncio.Queue에서 2개씩 꺼내기", "asyncio.Queue 2"),
        ("How do I set a Redis TTL?", "How do I set a Redis TTL?"),  # nothing to drop: as it is
        ("트랜잭션 격리 수준", "트랜잭션 격리 수준"),  # nothing readable: as it is
    ],
)
def test_an_english_only_model_embeds_the_words_it_reads(text: str, readable: str) -> None:
    assert readable_text(text, multilingual=False) == readable
    assert readable_text(text, multilingual=True) == text


# --- ExactIndex against Qdrant's Query API ------------------------------------------------------------

WORDS = (
    "캐시", "트랜잭션", "커넥션", "타임아웃", "재시도", "로그", "인덱스", "직렬화", "스레드", "잠금", "메모리", "배포",
    "이벤트", "토큰", "세션", "cache", "transaction", "timeout", "retry", "index", "thread", "lock", "memory",
    "deploy", "event", "token", "session", "parse_http_header", "retryWithBackoff", "asyncio.Queue",
)  # fmt: skip
PARTICLES = ("", "을", "를", "이", "가", "에서", "의", "로")


def corpus(seed: int, size: int) -> list[Document]:
    rng = random.Random(seed)
    docs = []
    for n in range(size):
        words = [rng.choice(WORDS) + rng.choice(PARTICLES) for _ in range(rng.randint(3, 12))]
        docs.append(
            Document(
                id=f"d{n}",
                kind=rng.choice(["til", "question", "doc"]),
                text=" ".join([*words, f"doc{n}"]),  # no two texts alike
                owner=rng.choice(["alice", "bob", ""]),
                tags=tuple(rng.sample(["python", "db", "k8s", "cache"], rng.randint(0, 2))),
            )
        )
    return docs


def make_index(path: Path, *, exact: bool) -> QdrantIndex:
    return QdrantIndex(
        QdrantLocation(path=str(path)),
        HashingEncoder(),
        JitteredLexicalEncoder(),
        collection="c",
        exact_embedded=exact,
    )


@pytest.fixture(scope="module")
async def both(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[QdrantIndex, QdrantIndex]]:
    docs = corpus(seed=5, size=300)
    pair = []
    for exact in (True, False):
        index = make_index(tmp_path_factory.mktemp("qdrant"), exact=exact)
        await index.start()
        await index.upsert(docs)
        # Replaced and deleted points must leave the rankings and the IDF statistics alike.
        await index.upsert(
            [Document(d.id, d.kind, d.text + " 배포 deploy", owner="carol") for d in docs[:40]]
        )
        await index.delete([d.id for d in docs[40:70]])
        pair.append(index)
    yield pair[0], pair[1]
    for index in pair:
        await index.close()


def assert_same_hits(got: list[Hit], want: list[Hit]) -> None:
    """The same scores in order and the same documents, except that equal scores may come in any order."""
    assert [h.score for h in got] == pytest.approx([h.score for h in want], rel=1e-5, abs=1e-6)
    groups: dict[float, tuple[set[str], set[str]]] = {}
    for g, w in zip(got, want, strict=True):
        key = round(w.score, 5)
        groups.setdefault(key, (set(), set()))[0].add(g.document.id)
        groups[key][1].add(w.document.id)
    last = round(want[-1].score, 5) if want else None
    for key, (got_ids, want_ids) in groups.items():
        if key != last:  # a tie cut off by the limit may keep different members
            assert got_ids == want_ids, key


QUERIES = [
    "캐시를 배포에서 재시도",
    "트랜잭션이 타임아웃",
    "retry timeout with backoff",
    "parseHttpHeader 로그",
    "asyncio.Queue 스레드의 잠금",
    "session token 세션",
    "nothing matches 없는말",
]
FILTERS = [
    SearchFilter(),
    SearchFilter(kinds=("til", "doc")),
    SearchFilter(owner="alice", tags=("db", "cache")),
    SearchFilter(owner="carol"),
]


@pytest.mark.parametrize("mode", list(SearchMode))
@pytest.mark.parametrize("search_filter", FILTERS)
async def test_exact_ranking_agrees_with_the_query_api(
    both: tuple[QdrantIndex, QdrantIndex], mode: SearchMode, search_filter: SearchFilter
) -> None:
    exact, query_api = both
    compared = 0
    for text in QUERIES:
        query = SearchQuery(text, top_k=15, mode=mode, filter=search_filter)
        want = await query_api.search(query)
        assert_same_hits(await exact.search(query), want)
        compared += len(want)
    assert compared > 0


@pytest.mark.parametrize("mode", list(SearchMode))
async def test_thresholds_and_mmr_agree_with_the_query_api(
    both: tuple[QdrantIndex, QdrantIndex], mode: SearchMode
) -> None:
    exact, query_api = both
    for text in QUERIES[:5]:
        everything = await query_api.search(SearchQuery(text, top_k=30, mode=mode))
        scores = sorted({round(h.score, 6) for h in everything}, reverse=True)
        if len(scores) < 3:
            continue
        threshold = (scores[1] + scores[2]) / 2  # between two scores: no tie at the boundary
        query = SearchQuery(text, top_k=30, mode=mode, score_threshold=threshold)
        want = await query_api.search(query)
        assert want and all(h.score >= threshold for h in want)
        assert_same_hits(await exact.search(query), want)

        diverse = SearchQuery(text, top_k=5, mode=mode, mmr_lambda=0.5)
        got, want = await exact.search(diverse), await query_api.search(diverse)
        assert [h.score for h in got] == pytest.approx([h.score for h in want], rel=1e-5, abs=1e-6)


async def test_a_reopened_index_reads_its_ranking_back_from_qdrant(tmp_path: Path) -> None:
    docs = corpus(seed=9, size=80)
    first = make_index(tmp_path, exact=True)
    await first.start()
    await first.upsert(docs)
    await first.delete([d.id for d in docs[:10]])
    queries = [SearchQuery(text, top_k=10, mode=mode) for text in QUERIES for mode in SearchMode]
    before = [await first.search(q) for q in queries]
    await first.close()

    second = make_index(tmp_path, exact=True)
    await second.start()
    try:
        for query, hits in zip(queries, before, strict=True):
            assert_same_hits(await second.search(query), hits)
    finally:
        await second.close()


async def test_korean_queries_skip_the_embedding_of_an_english_only_model(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    class CountingEncoder(HashingEncoder):
        def embed(self, texts: Sequence[str]) -> np.ndarray:
            calls.append(list(texts))
            return super().embed(texts)

    index = QdrantIndex(
        QdrantLocation(path=str(tmp_path)), CountingEncoder(), LexicalEncoder(), collection="c"
    )
    await index.start()
    try:
        await index.upsert(corpus(seed=1, size=20))
        calls.clear()
        korean = await index.search(SearchQuery("캐시를 배포에서 재시도", top_k=3))
        assert calls == [] and korean  # ranked by the sparse channel alone
        await index.search(SearchQuery("캐시 retry", top_k=3))
        await index.search(SearchQuery("캐시를 배포에서 재시도", top_k=3, mode=SearchMode.DENSE))
        # A mixed query embeds only what the model reads; a dense search asked for by mode embeds all.
        assert calls == [["retry"], ["캐시를 배포에서 재시도"]]
    finally:
        await index.close()
