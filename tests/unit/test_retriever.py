"""The retriever service through real stubs: the packaged MiniLM model, Kiwi, and a Qdrant Edge shard in tmp_path."""

from __future__ import annotations

import math
import socket
import threading
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
import qdrant_edge as qe
from prometheus_client import REGISTRY
from til.v1 import retriever_pb2 as pb
from til.v1 import retriever_pb2_grpc

from services.common.errors import FailedPrecondition, Unavailable
from services.retriever.__main__ import make_sparse_encoder
from services.retriever.config import RetrieverSettings
from services.retriever.documents import (
    DENSE,
    SPARSE,
    Document,
    SearchMode,
    SearchQuery,
    VectorStore,
    document_id,
)
from services.retriever.edge_store import EdgeStore
from services.retriever.embedding import SentenceTransformerEncoder
from services.retriever.index import HybridIndex
from services.retriever.server_store import ServerStore
from services.retriever.servicer import INDEX_DISK_BYTES, RequestLimits, RetrieverServicer, retriever_service
from tests.conftest import in_process_server

pytestmark = pytest.mark.model

TIL, QUESTION, DOC = pb.DOCUMENT_KIND_TIL, pb.DOCUMENT_KIND_QUESTION, pb.DOCUMENT_KIND_DOC
DENSE_MODE, SPARSE_MODE, HYBRID_MODE = pb.SEARCH_MODE_DENSE, pb.SEARCH_MODE_SPARSE, pb.SEARCH_MODE_HYBRID
LIMITS = RequestLimits(default_top_k=3, max_top_k=20, max_text_chars=2_000, max_batch=30)


# Searches see one owner's documents: most tests work in this owner's namespace.
OWNER = "team"


def doc(doc_id: str, kind: int, text: str, **fields: object) -> pb.Document:
    fields.setdefault("owner", OWNER)
    return pb.Document(id=doc_id, kind=kind, text=text, **fields)  # type: ignore[arg-type]


CORPUS = [
    doc("til-queue", TIL, "asyncio.Queue를 쓰면 생산자와 소비자가 이벤트 루프를 막지 않고 데이터를 주고받을 수 있다.",
        language="python", tags=["python", "asyncio"], title="asyncio 큐",
        attributes={"repo": "tilserve", "commit": "abc123"}),
    doc("til-isolation", TIL, "데이터베이스에서 트랜잭션을 격리하는 수준에 따라 팬텀 읽기가 생길 수 있다.",
        language="sql", tags=["database"]),
    doc("til-parse", TIL, "parse_http_header 함수는 헤더 이름을 소문자로 바꾼 다음 값을 쉼표로 나눈다.",
        language="python", tags=["http"]),
    doc("q-oom", QUESTION, "Why does Kubernetes kill a container with OOMKilled when it exceeds its memory limit?",
        language="en", difficulty="medium", tags=["kubernetes"]),
    doc("q-rebase", QUESTION, "What is the difference between git rebase and git merge?",
        language="en", difficulty="easy", tags=["git"]),
    doc("doc-ttl", DOC, "Redis keys expire after their TTL; the EXPIRE command sets the time to live in seconds.",
        language="en", tags=["redis", "cache"]),
    doc("doc-grpc", DOC, "A gRPC deadline tells the server how long the client is willing to wait for an answer.",
        language="en", tags=["grpc"]),
    doc("til-borrow", TIL, "Rust의 빌림 검사기는 가변 참조가 하나만 존재하도록 컴파일할 때 확인한다.",
        language="rust", tags=["rust"]),
]  # fmt: skip


@pytest.fixture(scope="module")
def encoder() -> SentenceTransformerEncoder:
    model = SentenceTransformerEncoder()
    model.load()
    return model


def make_index(encoder: SentenceTransformerEncoder, store: VectorStore) -> HybridIndex:
    return HybridIndex(store, encoder, make_sparse_encoder(RetrieverSettings()))


@pytest.fixture
async def index(encoder: SentenceTransformerEncoder, tmp_path: Path) -> AsyncIterator[HybridIndex]:
    idx = make_index(encoder, EdgeStore(tmp_path / "shard"))
    await idx.start()
    yield idx
    await idx.close()


@pytest.fixture
async def stub(index: HybridIndex) -> AsyncIterator[retriever_pb2_grpc.RetrieverServiceStub]:
    servicer = RetrieverServicer(index, LIMITS)
    async with in_process_server([retriever_service(servicer)]) as (_, channel):
        yield retriever_pb2_grpc.RetrieverServiceStub(channel)


@pytest.fixture
async def corpus(stub: retriever_pb2_grpc.RetrieverServiceStub) -> retriever_pb2_grpc.RetrieverServiceStub:
    await stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=CORPUS))
    return stub


async def search(
    stub: retriever_pb2_grpc.RetrieverServiceStub, query: str, **fields: object
) -> list[pb.SearchHit]:
    fields.setdefault("filter", pb.SearchFilter(owner=OWNER))
    response = await stub.SearchDocuments(pb.SearchDocumentsRequest(query=query, **fields))  # type: ignore[arg-type]
    return list(response.hits)


def ids(hits: Iterable[pb.SearchHit]) -> list[str]:
    return [h.document.id for h in hits]


async def test_upsert_search_get_delete_round_trip(stub: retriever_pb2_grpc.RetrieverServiceStub) -> None:
    response = await stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=CORPUS))
    assert list(response.ids) == [d.id for d in CORPUS]

    hits = await search(stub, "How long does a gRPC client wait for the server?", top_k=1)
    assert ids(hits) == ["doc-grpc"]
    assert hits[0].document == CORPUS[6]

    got = await stub.GetDocument(pb.GetDocumentRequest(id="til-queue"))
    assert got.document == CORPUS[0]  # every field, tags and attributes included

    await stub.DeleteDocuments(pb.DeleteDocumentsRequest(ids=["doc-grpc", "never-stored"]))
    hits = await search(stub, "How long does a gRPC client wait for the server?", top_k=20)
    assert "doc-grpc" not in ids(hits)
    assert len(hits) == len(CORPUS) - 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetDocument(pb.GetDocumentRequest(id="doc-grpc"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reupserting_an_id_replaces_the_document(
    corpus: retriever_pb2_grpc.RetrieverServiceStub,
) -> None:
    changed = doc(
        "doc-ttl",
        DOC,
        "Memcached evicts the least recently used items when memory is full.",
        difficulty="hard",
        tags=["memcached"],
    )
    await corpus.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[changed, changed]))
    await corpus.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[changed]))

    hits = await search(corpus, "memcached eviction", top_k=20, mode=DENSE_MODE)
    assert len(hits) == len(CORPUS)
    assert ids(hits).count("doc-ttl") == 1
    assert hits[0].document == changed
    assert (await corpus.GetDocument(pb.GetDocumentRequest(id="doc-ttl"))).document.difficulty == "hard"


async def test_documents_without_id_get_one_from_kind_and_text(
    stub: retriever_pb2_grpc.RetrieverServiceStub,
) -> None:
    text = "Python의 GIL은 한 번에 한 스레드만 바이트코드를 실행하게 한다."
    response = await stub.UpsertDocuments(
        pb.UpsertDocumentsRequest(
            documents=[
                doc("", TIL, text),
                doc("", TIL, f"  {text.replace(' ', '   ')}\n"),  # the same text up to whitespace
                doc("", QUESTION, text),
            ]
        )
    )
    first, again, question = response.ids
    assert first == again == document_id("til", text)
    assert question != first

    hits = await search(stub, "GIL 스레드", top_k=20)
    assert sorted(ids(hits)) == sorted([first, question])
    got = await stub.GetDocument(pb.GetDocumentRequest(id=first))
    assert got.document.id == first and got.document.kind == TIL


@pytest.mark.parametrize(
    ("search_filter", "expected"),
    [
        (pb.SearchFilter(kinds=[QUESTION], owner=OWNER), {"q-oom", "q-rebase"}),
        (pb.SearchFilter(kinds=[QUESTION, DOC], owner=OWNER), {"q-oom", "q-rebase", "doc-ttl", "doc-grpc"}),
        (pb.SearchFilter(tags=["redis", "git"], owner=OWNER), {"doc-ttl", "q-rebase"}),
        (pb.SearchFilter(kinds=[TIL], language="rust", owner=OWNER), {"til-borrow"}),
        (pb.SearchFilter(language="python", tags=["http"], owner=OWNER), {"til-parse"}),
        (pb.SearchFilter(difficulty="easy", owner=OWNER), {"q-rebase"}),
        (pb.SearchFilter(owner="nobody"), set()),
        (pb.SearchFilter(), set()),  # the empty owner's namespace: nothing was written there
    ],
)
@pytest.mark.parametrize("mode", [DENSE_MODE, HYBRID_MODE])
async def test_filters_return_exactly_the_matching_documents(
    corpus: retriever_pb2_grpc.RetrieverServiceStub,
    search_filter: pb.SearchFilter,
    expected: set[str],
    mode: int,
) -> None:
    hits = await search(
        corpus, "what did I learn about programming", top_k=20, filter=search_filter, mode=mode
    )
    assert set(ids(hits)) == expected


async def test_top_k_and_its_default(corpus: retriever_pb2_grpc.RetrieverServiceStub) -> None:
    for top_k in (1, 2, 5):
        assert len(await search(corpus, "database transaction", top_k=top_k)) == top_k
    assert len(await search(corpus, "database transaction")) == LIMITS.default_top_k
    assert len(await search(corpus, "database transaction", top_k=LIMITS.max_top_k)) == len(CORPUS)


async def test_score_threshold_drops_low_scores(corpus: retriever_pb2_grpc.RetrieverServiceStub) -> None:
    query = "Kubernetes container memory limit"
    everything = await search(corpus, query, top_k=20, mode=DENSE_MODE)
    scores = [h.score for h in everything]
    assert scores == sorted(scores, reverse=True)
    threshold = (scores[0] + scores[1]) / 2
    kept = await search(corpus, query, top_k=20, mode=DENSE_MODE, score_threshold=threshold)
    assert ids(kept) == ["q-oom"]
    assert await search(corpus, query, top_k=20, mode=DENSE_MODE, score_threshold=scores[0] + 0.01) == []
    # A threshold below every score keeps everything (0 is a meaningful value, not "unset").
    low = await search(corpus, query, top_k=20, mode=DENSE_MODE, score_threshold=min(scores) - 0.01)
    assert len(low) == len(CORPUS)


async def test_each_mode_ranks_on_its_own_channel(corpus: retriever_pb2_grpc.RetrieverServiceStub) -> None:
    # No word in common with any document: only the dense channel can find its target.
    paraphrase = "combining two lines of development while rewriting history"
    assert await search(corpus, paraphrase, top_k=20, mode=SPARSE_MODE) == []
    dense = await search(corpus, paraphrase, top_k=3, mode=DENSE_MODE)
    assert ids(dense)[0] == "q-rebase"
    assert all(-1.0 <= h.score <= 1.0 for h in dense)
    # Sparse hits share at least one term with the query, and nothing else is returned.
    sparse = await search(corpus, "EXPIRE", top_k=20, mode=SPARSE_MODE)
    assert ids(sparse) == ["doc-ttl"]
    # Hybrid fuses both: the exact keyword and the paraphrase are each found.
    assert ids(await search(corpus, "EXPIRE", top_k=1, mode=HYBRID_MODE)) == ["doc-ttl"]
    assert ids(await search(corpus, paraphrase, top_k=1, mode=HYBRID_MODE)) == ["q-rebase"]
    # UNSPECIFIED is hybrid: the same hits and scores.
    default = await search(corpus, "EXPIRE time to live", top_k=5)
    hybrid = await search(corpus, "EXPIRE time to live", top_k=5, mode=HYBRID_MODE)
    assert [(h.document.id, h.score) for h in default] == [(h.document.id, h.score) for h in hybrid]


async def test_korean_words_with_other_particles_are_found_by_sparse_and_hybrid(
    corpus: retriever_pb2_grpc.RetrieverServiceStub,
) -> None:
    # The target says 데이터베이스에서 / 트랜잭션을 / 격리하는; the query 데이터베이스의 / 트랜잭션이 / 격리.
    query = "데이터베이스의 트랜잭션이 격리"
    target = next(d for d in CORPUS if d.id == "til-isolation")
    assert not set(query.split()) & set(target.text.split())
    assert ids(await search(corpus, query, top_k=1, mode=SPARSE_MODE)) == ["til-isolation"]
    assert ids(await search(corpus, query, top_k=1, mode=HYBRID_MODE)) == ["til-isolation"]


@pytest.mark.parametrize("mode", [SPARSE_MODE, HYBRID_MODE])
async def test_a_camel_case_query_finds_the_snake_case_identifier(
    corpus: retriever_pb2_grpc.RetrieverServiceStub, mode: int
) -> None:
    assert ids(await search(corpus, "parseHttpHeader", top_k=1, mode=mode)) == ["til-parse"]
    await corpus.UpsertDocuments(
        pb.UpsertDocumentsRequest(
            documents=[
                doc("til-camel", TIL, "retryWithBackoff 는 실패한 호출을 점점 늦게 다시 시도한다."),
            ]
        )
    )
    assert ids(await search(corpus, "retry_with_backoff", top_k=1, mode=mode)) == ["til-camel"]


async def test_mmr_trades_near_duplicates_for_diverse_hits(
    stub: retriever_pb2_grpc.RetrieverServiceStub,
) -> None:
    near_duplicates = [
        "Python list comprehensions build a new list from an iterable in one expression.",
        "A list comprehension in Python creates a new list from an iterable in a single expression.",
        "In Python, list comprehensions make a new list out of an iterable with one expression.",
    ]
    others = [
        "Python generator expressions yield items lazily instead of building a list.",
        "Python dictionaries map hashable keys to values.",
    ]
    documents = [doc(f"dup-{i}", DOC, t) for i, t in enumerate(near_duplicates)]
    documents += [doc(f"other-{i}", DOC, t) for i, t in enumerate(others)]
    await stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=documents))
    query = "Python list comprehension"

    plain = ids(await search(stub, query, top_k=3, mode=DENSE_MODE))
    assert sorted(plain) == ["dup-0", "dup-1", "dup-2"]
    pure_relevance = ids(await search(stub, query, top_k=3, mode=DENSE_MODE, mmr_lambda=1.0))
    assert pure_relevance == plain
    diverse = await search(stub, query, top_k=3, mode=DENSE_MODE, mmr_lambda=0.3)
    assert ids(diverse)[0] == plain[0]
    assert sum(i.startswith("dup-") for i in ids(diverse)) == 1
    assert len(set(ids(diverse))) == 3
    hybrid = ids(await search(stub, query, top_k=3, mmr_lambda=0.3))
    assert sum(i.startswith("dup-") for i in hybrid) == 1


async def test_queries_with_no_indexable_terms(corpus: retriever_pb2_grpc.RetrieverServiceStub) -> None:
    assert await search(corpus, "?!", mode=SPARSE_MODE) == []
    # Hybrid falls back to the dense channel alone.
    assert len(await search(corpus, "?!", top_k=2)) == 2


@pytest.mark.parametrize(
    ("call", "request_message", "detail"),
    [
        ("SearchDocuments", pb.SearchDocumentsRequest(query=""), "query is empty"),
        ("SearchDocuments", pb.SearchDocumentsRequest(query=" \n\t"), "query is empty"),
        ("SearchDocuments", pb.SearchDocumentsRequest(query="x" * 2_001), "at most 2000"),
        ("SearchDocuments", pb.SearchDocumentsRequest(query="q", top_k=21), "at most 20"),
        ("SearchDocuments", pb.SearchDocumentsRequest(query="q", mode=7), "mode 7 is unknown"),  # type: ignore[arg-type]
        ("SearchDocuments", pb.SearchDocumentsRequest(query="q", mmr_lambda=1.5), "between 0 and 1"),
        ("SearchDocuments", pb.SearchDocumentsRequest(query="q", score_threshold=math.nan), "finite"),
        (
            "SearchDocuments",
            pb.SearchDocumentsRequest(query="q", filter=pb.SearchFilter(kinds=[pb.DOCUMENT_KIND_UNSPECIFIED])),
            "filter.kinds[0] is unset",
        ),
        ("UpsertDocuments", pb.UpsertDocumentsRequest(), "documents is empty"),
        (
            "UpsertDocuments",
            pb.UpsertDocumentsRequest(documents=[doc(f"d{i}", TIL, "t") for i in range(31)]),
            "at most 30",
        ),
        ("UpsertDocuments", pb.UpsertDocumentsRequest(documents=[CORPUS[0], doc("x", TIL, "  ")]),
         "documents[1].text is empty"),
        ("UpsertDocuments", pb.UpsertDocumentsRequest(documents=[doc("x", TIL, "y" * 2_001)]), "at most 2000"),
        ("UpsertDocuments", pb.UpsertDocumentsRequest(documents=[pb.Document(id="x", text="t")]),
         "documents[0].kind is unset"),
        ("UpsertDocuments", pb.UpsertDocumentsRequest(documents=[doc("x", 9, "t")]),
         "documents[0].kind is unknown (9)"),
        ("UpsertDocuments", pb.UpsertDocumentsRequest(documents=[doc("x" * 513, TIL, "t")]), "id is longer"),
        ("DeleteDocuments", pb.DeleteDocumentsRequest(), "ids is empty"),
        ("DeleteDocuments", pb.DeleteDocumentsRequest(ids=["a", ""]), "ids[1] is empty"),
        ("GetDocument", pb.GetDocumentRequest(), "id is empty"),
    ],
)  # fmt: skip
async def test_bad_input_is_invalid_argument(
    corpus: retriever_pb2_grpc.RetrieverServiceStub, call: str, request_message: object, detail: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(corpus, call)(request_message)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in (err.value.details() or "")
    # Nothing was stored by a refused upsert.
    assert len(await search(corpus, "anything", top_k=20)) == len(CORPUS)


@pytest.mark.parametrize(
    ("document", "detail"),
    [
        (doc("x", TIL, "t", title="y" * 101), "documents[0].title has 101 characters; at most 100 (RETRIEVER_MAX_TITLE_CHARS)"),
        (doc("x", TIL, "t", owner="o" * 33), "documents[0].owner has 33 characters; at most 32 (RETRIEVER_MAX_FIELD_CHARS)"),
        (doc("x", TIL, "t", language="l" * 33), "at most 32 (RETRIEVER_MAX_FIELD_CHARS)"),
        (doc("x", TIL, "t", difficulty="d" * 33), "at most 32 (RETRIEVER_MAX_FIELD_CHARS)"),
        (doc("x", TIL, "t", tags=[str(i) for i in range(5)]), "documents[0].tags has 5 entries; at most 4 (RETRIEVER_MAX_TAGS)"),
        (doc("x", TIL, "t", tags=["a", "t" * 33]), "documents[0].tags[1] has 33 characters"),
        (doc("x", TIL, "t", attributes={str(i): "v" for i in range(5)}), "at most 4 (RETRIEVER_MAX_ATTRIBUTES)"),
        (doc("x", TIL, "t", attributes={"k" * 33: "v"}), "at most 32 (RETRIEVER_MAX_FIELD_CHARS)"),
        (doc("x", TIL, "t", attributes={"k": "v" * 201}), "at most 200 (RETRIEVER_MAX_ATTRIBUTE_CHARS)"),
    ],
)  # fmt: skip
async def test_every_stored_field_is_bounded(index: HybridIndex, document: pb.Document, detail: str) -> None:
    limits = RequestLimits(
        max_title_chars=100, max_field_chars=32, max_tags=4, max_attributes=4, max_attribute_chars=200
    )
    async with in_process_server([retriever_service(RetrieverServicer(index, limits))]) as (_, channel):
        stub = retriever_pb2_grpc.RetrieverServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[document]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert detail in (err.value.details() or "")
        for bad in (pb.SearchFilter(tags=["t"] * 5), pb.SearchFilter(owner="o" * 33)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SearchDocuments(pb.SearchDocumentsRequest(query="q", filter=bad))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # At the limits everything is stored and read back whole.
        full = doc(
            "x",
            TIL,
            "t",
            title="y" * 100,
            tags=["t" * 32] * 4,
            attributes={str(i): "v" * 200 for i in range(4)},
        )
        await stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[full]))
        assert (await stub.GetDocument(pb.GetDocumentRequest(id="x"))).document == full
    assert await index.count() == 1


async def test_the_empty_owner_is_a_namespace_of_its_own(
    stub: retriever_pb2_grpc.RetrieverServiceStub,
) -> None:
    text = "Redis 캐시의 TTL이 지나면 키가 사라진다."
    await stub.UpsertDocuments(
        pb.UpsertDocumentsRequest(
            documents=[doc("alice-1", TIL, text, owner="alice"), doc("nobody-1", TIL, text, owner="")]
        )
    )
    for mode in (DENSE_MODE, SPARSE_MODE, HYBRID_MODE):
        assert ids(await search(stub, "Redis TTL", top_k=10, mode=mode, filter=pb.SearchFilter())) == [
            "nobody-1"
        ]
        alice = pb.SearchFilter(owner="alice")
        assert ids(await search(stub, "Redis TTL", top_k=10, mode=mode, filter=alice)) == ["alice-1"]
    for owner, found in (("", "nobody-1"), ("alice", "alice-1")):
        got = await stub.GetDocument(pb.GetDocumentRequest(id=found, owner=owner))
        assert got.document.owner == owner
    for doc_id, owner in (("alice-1", ""), ("alice-1", "bob"), ("nobody-1", "alice")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetDocument(pb.GetDocumentRequest(id=doc_id, owner=owner))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # Unset (deprecated): any owner.
    assert (await stub.GetDocument(pb.GetDocumentRequest(id="alice-1"))).document.owner == "alice"


async def test_metrics_count_upserts_and_time_searches(
    index: HybridIndex, stub: retriever_pb2_grpc.RetrieverServiceStub
) -> None:
    def sample(name: str, labels: dict[str, str] | None = None) -> float:
        return REGISTRY.get_sample_value(name, labels or {}) or 0.0

    upserted = sample("tilserve_retriever_documents_upserted_total")
    searched = sample("tilserve_retriever_search_seconds_count", {"mode": "sparse"})
    await stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=CORPUS[:3]))
    await search(stub, "asyncio", mode=SPARSE_MODE)
    assert sample("tilserve_retriever_documents_upserted_total") == upserted + 3
    INDEX_DISK_BYTES.set_function(lambda: index.store.disk_bytes() or 0)
    assert sample("tilserve_retriever_index_disk_bytes") > 0
    assert sample("tilserve_retriever_search_seconds_count", {"mode": "sparse"}) == searched + 1


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_qdrant_is_unavailable(encoder: SentenceTransformerEncoder) -> None:
    index = make_index(
        encoder, ServerStore(f"http://127.0.0.1:{closed_port()}", "test_documents", timeout_s=2)
    )
    with pytest.raises(Unavailable, match="unreachable"):
        await index.start()
    servicer = RetrieverServicer(index, LIMITS)
    try:
        async with in_process_server([retriever_service(servicer)]) as (_, channel):
            stub = retriever_pb2_grpc.RetrieverServiceStub(channel)
            for call in (
                stub.SearchDocuments(pb.SearchDocumentsRequest(query="q")),
                stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=CORPUS[:1])),
                stub.GetDocument(pb.GetDocumentRequest(id="x")),
                stub.DeleteDocuments(pb.DeleteDocumentsRequest(ids=["x"])),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "not open yet" in (err.value.details() or "")  # its start failed
    finally:
        await index.close()


async def test_calls_before_start_are_unavailable(
    encoder: SentenceTransformerEncoder, tmp_path: Path
) -> None:
    index = make_index(encoder, EdgeStore(tmp_path / "shard"))
    async with in_process_server([retriever_service(RetrieverServicer(index, LIMITS))]) as (_, channel):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await retriever_pb2_grpc.RetrieverServiceStub(channel).SearchDocuments(
                pb.SearchDocumentsRequest(query="q")
            )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_shard_from_another_model_is_refused_at_start(
    encoder: SentenceTransformerEncoder, tmp_path: Path
) -> None:
    config = qe.EdgeConfig(
        vectors={DENSE: qe.EdgeVectorParams(size=8, distance=qe.Distance.Cosine)},
        sparse_vectors={SPARSE: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)},
    )
    qe.EdgeShard.create(str(tmp_path / "shard"), config).close()
    index = make_index(encoder, EdgeStore(tmp_path / "shard"))
    with pytest.raises(FailedPrecondition, match="8-dim"):
        await index.start()
    await index.close()


async def test_the_index_survives_a_restart(encoder: SentenceTransformerEncoder, tmp_path: Path) -> None:
    first = make_index(encoder, EdgeStore(tmp_path / "shard"))
    await first.start()
    await first.upsert([])
    servicer = RetrieverServicer(first, LIMITS)
    async with in_process_server([retriever_service(servicer)]) as (_, channel):
        await retriever_pb2_grpc.RetrieverServiceStub(channel).UpsertDocuments(
            pb.UpsertDocumentsRequest(documents=CORPUS)
        )
    await first.close()

    second = make_index(encoder, EdgeStore(tmp_path / "shard"))
    await second.start()
    try:
        got = await second.get("til-queue")
        assert got is not None and got.text == CORPUS[0].text
        assert await second.count() == len(CORPUS)
    finally:
        await second.close()


async def test_the_shard_is_used_off_the_event_loop(index: HybridIndex) -> None:
    # Edge calls block (ranking, disk): on the loop's thread they would stall every other call.
    store = index.store
    assert isinstance(store, EdgeStore) and store._shard is not None
    threads: list[str] = []

    class Recording:
        def __init__(self, shard: Any) -> None:
            self._shard = shard

        def __getattr__(self, name: str) -> Any:
            method = getattr(self._shard, name)

            def call(*args: Any, **kwargs: Any) -> Any:
                threads.append(threading.current_thread().name)
                return method(*args, **kwargs)

            return call

    store._shard = Recording(store._shard)  # type: ignore[assignment]
    await index.upsert([Document("a", "til", "asyncio.Queue를 배웠다", owner="")])
    hits = await index.search(SearchQuery("asyncio", 1, SearchMode.HYBRID))
    assert [h.document.id for h in hits] == ["a"]
    assert await index.get("a") is not None
    assert len(threads) == 3 and threading.current_thread().name not in threads
