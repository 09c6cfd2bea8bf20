"""The two `VectorStore`s answer alike: a Qdrant Edge shard against the Query API of qdrant-client.

No Qdrant server runs here, so `ServerStore` talks to qdrant-client's in-memory implementation of the
Query API (the same requests a server gets); with RETRIEVER_TEST_QDRANT_URL set it talks to that server
instead. Every plan the index can make (each channel, weighted and plain fusion, filters, thresholds,
vectors for MMR) must give the same hits in the same order with the same scores.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest
from qdrant_client import AsyncQdrantClient
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from bench.retrieval import realset
from services.common.errors import FailedPrecondition, Unavailable
from services.retriever.documents import (
    Document,
    Hit,
    Plan,
    SearchFilter,
    SearchMode,
    SearchQuery,
    StoredHit,
    StoredPoint,
    document_id,
    filter_conditions,
    point_id,
)
from services.retriever.edge_store import EdgeStore
from services.retriever.index import HybridIndex
from services.retriever.lexical import SparseTerms
from services.retriever.morphemes import KiwiEncoder
from services.retriever.server_store import ServerStore, qdrant_errors

DIMENSIONS = 16
OWNERS = ("", "alice", "bob")
KINDS = ("til", "question", "doc")
TAGS = ("python", "db", "k8s", "rust")


def unit(rng: random.Random) -> list[float]:
    v = [rng.gauss(0, 1) for _ in range(DIMENSIONS)]
    norm = sum(x * x for x in v) ** 0.5
    return [x / norm for x in v]


def terms(rng: random.Random, n: int) -> SparseTerms:
    chosen = sorted(rng.sample(range(60), n))
    return SparseTerms(tuple(chosen), tuple(round(rng.uniform(0.2, 2.0), 3) for _ in chosen))


def points(seed: int = 3, count: int = 300) -> list[StoredPoint]:
    rng = random.Random(seed)
    out = []
    for n in range(count):
        doc_id = f"doc-{n}"
        payload = {
            "doc_id": doc_id,
            "kind": rng.choice(KINDS),
            "text": f"text {n}",
            "owner": rng.choice(OWNERS),
            "language": rng.choice(("python", "sql")),
            "difficulty": "",
            "tags": rng.sample(TAGS, rng.randint(0, 2)),
            "attributes": {},
        }
        out.append(StoredPoint(point_id(doc_id), unit(rng), terms(rng, rng.randint(1, 8)), payload))
    return out


def server_url() -> str:
    """The Qdrant server to test against; empty (or ':memory:') for qdrant-client's in-memory Query API."""
    url = os.environ.get("RETRIEVER_TEST_QDRANT_URL", "")
    return "" if url == ":memory:" else url


@pytest.fixture(scope="module")
async def stores(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[EdgeStore, ServerStore]]:
    edge = EdgeStore(tmp_path_factory.mktemp("edge") / "shard")
    url = server_url()
    collection = f"compare_{uuid.uuid4().hex[:8]}"
    server = (
        ServerStore(url, collection)
        if url
        else ServerStore("memory", collection, client=AsyncQdrantClient(location=":memory:"))
    )
    for store in (edge, server):
        await store.open(DIMENSIONS)
        stored = points()
        for start in range(0, len(stored), 64):
            await store.upsert(stored[start : start + 64])
    yield edge, server
    for store in (edge, server):
        if url and store is server:
            await server._client.delete_collection(collection)
        await store.close()


def plans() -> list[Plan]:
    rng = random.Random(9)
    filters = [
        SearchFilter(owner="alice"),
        SearchFilter(),
        SearchFilter(owner="bob", kinds=("til", "doc")),
        SearchFilter(owner="alice", tags=("python", "k8s"), language="sql"),
        SearchFilter(owner="nobody"),
    ]
    out = []
    for n in range(40):
        f = filters[n % len(filters)]
        dense, sparse = unit(rng), terms(rng, rng.randint(1, 4))
        shape = n % 4
        if shape == 0:
            out.append(Plan(5, 20, f, False, dense, 1.0, None, None, n % 8 == 0))
        elif shape == 1:
            out.append(Plan(7, 20, f, False, None, 1.0, sparse, None, False))
        elif shape == 2:
            out.append(Plan(5, 20, f, True, dense, 1.0, sparse, None, n % 6 == 2))
        else:
            weight = rng.choice((0.25, 0.5, 0.8))
            out.append(Plan(6, 20, f, True, dense, weight, sparse, None, False))
    # Thresholds on each scale: cosine, IDF overlap, RRF.
    out.append(Plan(10, 20, SearchFilter(owner="alice"), False, unit(rng), 1.0, None, 0.3, False))
    out.append(Plan(10, 20, SearchFilter(owner="alice"), False, None, 1.0, terms(rng, 3), 1.0, False))
    out.append(Plan(10, 20, SearchFilter(owner=""), True, unit(rng), 0.5, terms(rng, 3), 0.3, False))
    # Hybrid with one channel left (a pure-Korean query skips the English-only dense model).
    out.append(Plan(5, 20, SearchFilter(owner="bob"), True, None, 0.0, terms(rng, 3), None, False))
    return out


def ranked(hits: list[StoredHit]) -> list[tuple[float, str]]:
    """(score, id) best first, ids of equal scores (RRF ties) in id order: neither engine promises an
    order among ties, nor which of the ties at the cut are kept, so those (the last score's) are left out."""
    out = sorted(((round(h.score, 4), h.payload["doc_id"]) for h in hits), key=lambda x: (-x[0], x[1]))
    return (
        [x for x in out if x[0] > out[-1][0]] + [(out[-1][0], "") for x in out if x[0] == out[-1][0]]
        if out
        else []
    )


@pytest.mark.parametrize(
    "plan", plans(), ids=lambda p: f"{'fused' if p.fused else 'single'}-{p.filter.owner}"
)
async def test_edge_and_the_query_api_give_the_same_hits(
    stores: tuple[EdgeStore, ServerStore], plan: Plan
) -> None:
    edge, server = stores
    got, expected = await edge.query(plan), await server.query(plan)
    assert ranked(got) == ranked(expected)
    assert [h.score for h in got] == pytest.approx([h.score for h in expected], rel=1e-4, abs=1e-5)
    payloads = {h.payload["doc_id"]: h.payload for h in expected}
    assert all(h.payload == payloads.get(h.payload["doc_id"], h.payload) for h in got)
    if plan.with_vectors:
        vectors = {h.payload["doc_id"]: h.dense for h in expected}
        for hit in got:  # (a tie at the cut may keep another point)
            assert hit.dense == pytest.approx(vectors.get(hit.payload["doc_id"], hit.dense), abs=1e-5)
    # Every hit satisfies the filter, and the owner always holds (the empty one too).
    for hit in got:
        for key, values in filter_conditions(plan.filter):
            have = hit.payload[key] if isinstance(hit.payload[key], list) else [hit.payload[key]]
            assert set(have) & set(values), (key, values, hit.payload)


async def test_after_replacements_and_deletions_the_hits_still_agree(
    stores: tuple[EdgeStore, ServerStore],
) -> None:
    edge, server = stores
    for store in (edge, server):
        await store.upsert(points(seed=4, count=20))
        await store.delete([point_id(f"doc-{n}") for n in range(250, 260)])
    assert await edge.count() == await server.count() == 290
    for n in (0, 5, 255, 299):
        assert await edge.retrieve(point_id(f"doc-{n}")) == await server.retrieve(point_id(f"doc-{n}"))
    assert await edge.retrieve(point_id("doc-255")) is None
    assert (edge.disk_bytes() or 0) > 0 and server.disk_bytes() is None
    for plan in plans():
        got, expected = await edge.query(plan), await server.query(plan)
        if plan.sparse is None:
            assert ranked(got) == ranked(expected)
            continue
        # The engine's IDF still counts replaced points until they are vacuumed; qdrant-client's
        # in-memory one counts live points only: sparse scores differ by about 1%, which may swap the
        # last hit for the next one.
        same = {h.payload["doc_id"] for h in got} & {h.payload["doc_id"] for h in expected}
        assert len(same) >= len(expected) - 1 and len(got) == len(expected)


async def test_a_folder_that_is_not_a_shard_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FailedPrecondition, match="holds no Qdrant Edge shard"):
        await EdgeStore(tmp_path).open(DIMENSIONS)
    assert (tmp_path / "notes.txt").read_text() == "mine"


async def test_calls_on_a_closed_store_are_unavailable(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path / "shard")
    with pytest.raises(Unavailable, match="not open"):
        await store.count()
    await store.open(DIMENSIONS)
    await store.close()
    with pytest.raises(Unavailable, match="not open"):
        await store.count()


def test_ids() -> None:
    assert document_id("til", "a  b\n c") == document_id("til", " a b c ")
    assert document_id("til", "a b") != document_id("doc", "a b")
    assert uuid.UUID(point_id("til-queue")) == uuid.UUID(point_id("til-queue"))
    assert point_id("til-queue") != point_id("til-queue ")


def test_filter_conditions_always_hold_the_owner() -> None:
    assert filter_conditions(SearchFilter()) == [("owner", ("",))]
    assert filter_conditions(SearchFilter(kinds=("til",), owner="a", tags=("x",), difficulty="easy")) == [
        ("kind", ("til",)),
        ("tags", ("x",)),
        ("owner", ("a",)),
        ("difficulty", ("easy",)),
    ]


def http_error(status: int) -> UnexpectedResponse:
    return UnexpectedResponse(status, "reason", b"{}", httpx.Headers())


@pytest.mark.parametrize(
    ("error", "expected", "words"),
    [
        (ResponseHandlingException(httpx.ConnectError("refused")), Unavailable, "unreachable"),
        (http_error(503), Unavailable, "answered 503"),
        (http_error(429), Unavailable, "answered 429"),
        (http_error(401), Unavailable, "RETRIEVER_QDRANT_API_KEY"),
        (http_error(404), FailedPrecondition, "no such collection"),
        (ConnectionResetError("reset"), Unavailable, "unreachable"),
    ],
)
def test_qdrant_failures_map_to_statuses(error: Exception, expected: type[Exception], words: str) -> None:
    with pytest.raises(expected, match=words), qdrant_errors("Qdrant at http://qdrant:6333", "searching"):
        raise error


def test_a_bad_request_stays_an_internal_error() -> None:
    with pytest.raises(UnexpectedResponse), qdrant_errors("Qdrant at http://qdrant:6333", "searching"):
        raise http_error(400)


async def test_the_shard_is_optimised_in_the_background_after_many_writes(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path / "shard", maintain_every=100)
    await store.open(DIMENSIONS)
    stored = points(count=250)
    for start in range(0, 250, 50):
        await store.upsert(stored[start : start + 50])
    assert store._maintenance is not None
    await store._maintenance
    assert await store.count() == 250
    plan = Plan(3, 20, SearchFilter(owner="alice"), False, stored[0].dense, 1.0, None, None, False)
    assert len(await store.query(plan)) == 3
    await store.close()


def as_stored(hits: list[Hit]) -> list[StoredHit]:
    return [StoredHit({"doc_id": h.document.id}, round(h.score, 2)) for h in hits]


class HashedEmbeddings:
    """A stand-in dense model (the test is about the stores): a unit vector seeded by the text."""

    name = "hashed"

    def load(self) -> int:
        return DIMENSIONS

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([unit(random.Random(document_id("t", t))) for t in texts], dtype=np.float32)


@pytest.mark.skipif(
    not os.environ.get("RETRIEVER_TEST_QDRANT_URL"),
    reason="no Qdrant server: set RETRIEVER_TEST_QDRANT_URL=http://host:6333 (':memory:' runs qdrant-client's "
    "in-memory Query API); no Qdrant server binary installs from PyPI, Debian or npm",
)
async def test_a_qdrant_server_and_an_edge_shard_rank_real_korean_notes_alike(tmp_path: Path) -> None:
    url = os.environ["RETRIEVER_TEST_QDRANT_URL"]
    collection = f"korean_{uuid.uuid4().hex[:8]}"
    server = (
        ServerStore(url, collection, client=AsyncQdrantClient(location=":memory:"))
        if url == ":memory:"
        else ServerStore(url, collection)
    )
    labelled = realset.load()
    notes = labelled.documents[:80]
    chosen = {d.id for d in notes}
    queries = [q for q in labelled.queries if q.relevant[0] in chosen][:30]
    assert len(queries) >= 10
    sparse = KiwiEncoder()
    indexes = [
        HybridIndex(store, HashedEmbeddings(), sparse)
        for store in (EdgeStore(tmp_path / "shard", maintain_every=10**9), server)
    ]
    try:
        for index in indexes:
            await index.start()
            await index.upsert([Document(d.id, "doc", d.text, title=d.identifier) for d in notes])
        assert await indexes[0].count() == await indexes[1].count() == len(notes)
        found = 0
        for q in queries:
            for mode in SearchMode:
                query = SearchQuery(q.text, 5, mode)
                edge_hits, server_hits = [await index.search(query) for index in indexes]
                assert ranked(as_stored(edge_hits)) == ranked(as_stored(server_hits)), (q.text, mode)
                found += mode is SearchMode.HYBRID and q.relevant[0] in {h.document.id for h in edge_hits}
        assert found >= len(queries) * 0.8  # the stores agree on hits that are right, not merely alike
    finally:
        if url != ":memory:":
            await server._client.delete_collection(collection)
        for index in indexes:
            await index.close()


def test_the_benchmarks_query_subset_keeps_both_splits_and_every_type() -> None:
    from bench.retrieval.__main__ import spread_subset
    from bench.retrieval.dataset import Query

    types = ("title", "heading", "sentence")
    queries = [
        Query(f"q-{n:03d}", types[n // 600], f"q {n}", ["d"], "tune" if n % 2 == 0 else "held-out")
        for n in range(1800)
    ]
    subset = spread_subset(queries, 300)
    assert len(subset) == 300
    assert {q.split for q in subset} == {"tune", "held-out"}
    assert sum(q.split == "held-out" for q in subset) == 150
    assert {q.type for q in subset if q.split == "held-out"} == set(types)
