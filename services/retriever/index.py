"""The document index: what the servicer asks of it (`DocumentIndex`), and Qdrant behind it (`QdrantIndex`).

One Qdrant collection holds every document as a point with two named vectors: `dense` (cosine over
sentence-transformers embeddings) and `sparse` (term frequencies that Qdrant weights by IDF). Hybrid
search asks Qdrant's Query API for the best of each and fuses the two lists by reciprocal rank.
The same code runs against a Qdrant server (`url`) and Qdrant embedded in the process (`path`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import re
import unicodedata
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
from qdrant_client import AsyncQdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from services.common.errors import FailedPrecondition, Unavailable
from services.retriever.embedding import DenseEncoder
from services.retriever.lexical import SparseTerms
from services.retriever.mmr import mmr_order

log = logging.getLogger(__name__)
T = TypeVar("T")

DENSE = "dense"
SPARSE = "sparse"
# Payload keys that filters match on; a Qdrant server gets a keyword index for each.
FILTERED_KEYS = ("doc_id", "kind", "owner", "language", "difficulty", "tags")
# Points ids must be UUIDs or integers; document ids are any string, mapped into this namespace.
POINT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "tilserve:retriever:point")
DOCUMENT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "tilserve:retriever:document")


@dataclass(frozen=True)
class Document:
    id: str
    kind: str
    text: str
    title: str = ""
    owner: str = ""
    language: str = ""
    difficulty: str = ""
    tags: tuple[str, ...] = ()
    attributes: dict[str, str] = field(default_factory=dict)


class SearchMode(enum.Enum):
    DENSE = "dense"
    SPARSE = "sparse"
    HYBRID = "hybrid"


@dataclass(frozen=True)
class SearchFilter:
    """Every set field must match; `kinds` and `tags` match any of their values."""

    kinds: tuple[str, ...] = ()
    owner: str = ""
    language: str = ""
    difficulty: str = ""
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class SearchQuery:
    """A search. Scores, and so `score_threshold`, are on the mode's scale: cosine similarity for DENSE,
    the IDF-weighted term overlap for SPARSE, the reciprocal-rank-fusion score for HYBRID.
    `mmr_lambda` (0..1) re-ranks `top_k * mmr_candidates` candidates for diversity; hits keep their scores.
    """

    text: str
    top_k: int
    mode: SearchMode = SearchMode.HYBRID
    filter: SearchFilter = field(default_factory=SearchFilter)
    score_threshold: float | None = None
    mmr_lambda: float | None = None


@dataclass(frozen=True)
class Hit:
    document: Document
    score: float


class SparseEncoder(Protocol):
    def encode(self, text: str) -> SparseTerms: ...


class DocumentIndex(Protocol):
    """What the retriever servicer needs from an index. Errors: `Unavailable` when the store is down."""

    async def start(self) -> None:
        """Loads the models and makes sure the collection exists (the service's warm-up)."""
        ...

    async def upsert(self, documents: Sequence[Document]) -> list[str]:
        """Stores the documents, replacing any with the same id; returns their ids in order."""
        ...

    async def search(self, query: SearchQuery) -> list[Hit]: ...

    async def get(self, doc_id: str) -> Document | None:
        """The document stored under `doc_id`, or None."""
        ...

    async def delete(self, ids: Sequence[str]) -> None:
        """Removes the documents with these ids; unknown ids are ignored."""
        ...

    async def close(self) -> None:
        """Releases the store; the index is not used again afterwards."""
        ...


def normalize_text(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()


def document_id(kind: str, text: str) -> str:
    """The id of a document stored without one: the same kind and text (up to whitespace) give the same id."""
    return str(uuid.uuid5(DOCUMENT_NAMESPACE, f"{kind}\n{normalize_text(text)}"))


def point_id(doc_id: str) -> str:
    return str(uuid.uuid5(POINT_NAMESPACE, doc_id))


@dataclass(frozen=True)
class QdrantLocation:
    """A Qdrant server (`url`) or, when `url` is empty, an embedded one stored in `path`."""

    url: str = ""
    api_key: str = ""
    path: str = ".data/qdrant"
    timeout_s: int = 10

    @property
    def embedded(self) -> bool:
        return not self.url

    def describe(self) -> str:
        return f"embedded Qdrant in {self.path}" if self.embedded else f"Qdrant at {self.url}"

    def connect(self) -> AsyncQdrantClient:
        if self.embedded:
            # Reads every stored point: QdrantIndex calls this on the thread that makes every later call.
            return AsyncQdrantClient(path=self.path)
        return AsyncQdrantClient(
            url=self.url, api_key=self.api_key or None, timeout=self.timeout_s, check_compatibility=False
        )


@contextlib.contextmanager
def qdrant_errors(location: QdrantLocation, action: str) -> Iterator[None]:
    """Turns "Qdrant is down or overloaded" into UNAVAILABLE; anything else stays an internal error."""
    try:
        yield
    except ResponseHandlingException as exc:  # connection refused, timeout, TLS, ...
        raise Unavailable(f"{location.describe()} is unreachable ({action}): {exc.source or exc}") from exc
    except UnexpectedResponse as exc:
        status = exc.status_code or 0
        if status == 429 or status >= 500:
            raise Unavailable(
                f"{location.describe()} answered {status} ({action}): {exc.reason_phrase}"
            ) from exc
        if status in (401, 403):
            raise Unavailable(
                f"{location.describe()} refused the credentials ({action}); check RETRIEVER_QDRANT_API_KEY"
            ) from exc
        if status == 404:
            raise FailedPrecondition(
                f"{location.describe()} has no such collection ({action}); restart the retriever to create it"
            ) from exc
        raise
    except (ConnectionError, TimeoutError) as exc:
        raise Unavailable(f"{location.describe()} is unreachable ({action}): {exc}") from exc


def payload_filter(f: SearchFilter) -> models.Filter | None:
    must: list[models.Condition] = []
    if f.kinds:
        must.append(models.FieldCondition(key="kind", match=models.MatchAny(any=list(f.kinds))))
    for key in ("owner", "language", "difficulty"):
        if value := getattr(f, key):
            must.append(models.FieldCondition(key=key, match=models.MatchValue(value=value)))
    if f.tags:
        must.append(models.FieldCondition(key="tags", match=models.MatchAny(any=list(f.tags))))
    return models.Filter(must=must) if must else None


def _payload(doc: Document) -> dict[str, Any]:
    return {
        "doc_id": doc.id,
        "kind": doc.kind,
        "text": doc.text,
        "title": doc.title,
        "owner": doc.owner,
        "language": doc.language,
        "difficulty": doc.difficulty,
        "tags": list(doc.tags),
        "attributes": dict(doc.attributes),
    }


def _document(payload: dict[str, Any]) -> Document:
    return Document(
        id=payload["doc_id"],
        kind=payload["kind"],
        text=payload["text"],
        title=payload.get("title", ""),
        owner=payload.get("owner", ""),
        language=payload.get("language", ""),
        difficulty=payload.get("difficulty", ""),
        tags=tuple(payload.get("tags", ())),
        attributes=dict(payload.get("attributes", {})),
    )


def _sparse_vector(terms: SparseTerms) -> models.SparseVector:
    return models.SparseVector(indices=list(terms.indices), values=list(terms.values))


class QdrantIndex:
    """`DocumentIndex` on one Qdrant collection; embeddings are computed in a worker thread."""

    def __init__(
        self,
        location: QdrantLocation,
        dense: DenseEncoder,
        sparse: SparseEncoder,
        *,
        collection: str,
        upsert_batch: int = 64,
        mmr_candidates: int = 4,
        # Candidates each channel hands to the fusion, per hit asked for (at least `min_prefetch`).
        prefetch_factor: int = 2,
        min_prefetch: int = 20,
    ) -> None:
        self.location = location
        self.collection = collection
        self._dense = dense
        self._sparse = sparse
        self._upsert_batch = upsert_batch
        self._mmr_candidates = mmr_candidates
        self._prefetch_factor = prefetch_factor
        self._min_prefetch = min_prefetch
        self._client: AsyncQdrantClient | None = None
        # Embedded Qdrant searches exhaustively, partly in pure Python, inside its coroutines: they run
        # on this one thread (which also opens it: SQLite wants one thread), and the event loop keeps
        # serving other calls meanwhile.
        self._embedded_worker = ThreadPoolExecutor(1, thread_name_prefix="embedded-qdrant")

    async def _call(self, action: str, call: Callable[[AsyncQdrantClient], Coroutine[Any, Any, T]]) -> T:
        """Runs `call(client)`; on embedded Qdrant, on its worker thread. Errors as in `qdrant_errors`."""
        if self._client is None:
            raise Unavailable("the retriever is still starting (the index is not open yet)")
        client = self._client
        with qdrant_errors(self.location, action):
            if not self.location.embedded:
                return await call(client)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._embedded_worker, lambda: asyncio.run(call(client)))

    async def start(self) -> None:
        size = await asyncio.to_thread(self._dense.load)
        if self._client is None:
            loop = asyncio.get_running_loop()
            self._client = await loop.run_in_executor(self._embedded_worker, self.location.connect)
        await self._call("creating the collection", lambda client: self._ensure_collection(client, size))
        # One real search so the first caller does not pay for lazy initialisation (~10x a warm search).
        await self.search(SearchQuery(text="warm-up 캐시 query_cache", top_k=1))
        log.info(
            "index ready: collection %r on %s, %d-dim embeddings from %s",
            self.collection,
            self.location.describe(),
            size,
            self._dense.name,
        )

    async def _ensure_collection(self, client: AsyncQdrantClient, size: int) -> None:
        if not await client.collection_exists(self.collection):
            try:
                await client.create_collection(
                    self.collection,
                    vectors_config={DENSE: models.VectorParams(size=size, distance=models.Distance.COSINE)},
                    sparse_vectors_config={SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)},
                )
            except UnexpectedResponse as exc:
                if exc.status_code != 409:  # another replica created it first
                    raise
        else:
            self._check_collection(await client.get_collection(self.collection), size)
        if not self.location.embedded:  # embedded Qdrant scans every point and has no payload indexes
            for key in FILTERED_KEYS:
                await client.create_payload_index(
                    self.collection, key, models.PayloadSchemaType.KEYWORD, wait=True
                )

    def _check_collection(self, info: models.CollectionInfo, size: int) -> None:
        vectors = info.config.params.vectors
        dense = vectors.get(DENSE) if isinstance(vectors, dict) else None
        sparse = (info.config.params.sparse_vectors or {}).get(SPARSE)
        if dense is None or sparse is None or sparse.modifier != models.Modifier.IDF:
            raise FailedPrecondition(
                f"collection {self.collection!r} exists but was not made by the retriever (it needs a "
                f"{DENSE!r} vector and a {SPARSE!r} vector with IDF); choose another RETRIEVER_COLLECTION"
            )
        if dense.size != size:
            raise FailedPrecondition(
                f"collection {self.collection!r} holds {dense.size}-dim vectors but {self._dense.name} makes "
                f"{size}-dim ones; re-index into a new RETRIEVER_COLLECTION after changing the model"
            )

    def _encode_documents(self, texts: list[str]) -> tuple[np.ndarray, list[SparseTerms]]:
        return self._dense.embed(texts), [self._sparse.encode(t) for t in texts]

    async def upsert(self, documents: Sequence[Document]) -> list[str]:
        ids = [doc.id or document_id(doc.kind, doc.text) for doc in documents]
        for start in range(0, len(documents), self._upsert_batch):
            batch = documents[start : start + self._upsert_batch]
            batch_ids = ids[start : start + self._upsert_batch]
            dense, sparse = await asyncio.to_thread(self._encode_documents, [d.text for d in batch])
            points = [
                models.PointStruct(
                    id=point_id(doc_id),
                    vector={DENSE: vector.tolist(), SPARSE: _sparse_vector(terms)},
                    payload=_payload(dataclasses.replace(doc, id=doc_id)),
                )
                for doc, doc_id, vector, terms in zip(batch, batch_ids, dense, sparse, strict=True)
            ]
            await self._call(
                "upserting documents",
                # Called and awaited before the loop moves on, so `points` is this batch's.
                lambda client: client.upsert(self.collection, points=points, wait=True),  # noqa: B023
            )
        return ids

    async def get(self, doc_id: str) -> Document | None:
        points = await self._call(
            "reading a document",
            lambda client: client.retrieve(self.collection, ids=[point_id(doc_id)], with_payload=True),
        )
        return _document(points[0].payload or {}) if points else None

    async def delete(self, ids: Sequence[str]) -> None:
        selector = models.PointIdsList(points=[point_id(i) for i in ids])
        await self._call(
            "deleting documents",
            lambda client: client.delete(self.collection, points_selector=selector, wait=True),
        )

    async def search(self, query: SearchQuery) -> list[Hit]:
        if self._client is None:  # before paying for the query embedding
            raise Unavailable("the retriever is still starting (the index is not open yet)")
        rerank = query.mmr_lambda is not None
        limit = query.top_k * self._mmr_candidates if rerank else query.top_k
        prefetch_limit = max(limit * self._prefetch_factor, self._min_prefetch)
        flt = payload_filter(query.filter)

        dense_query: list[float] | None = None
        if query.mode is not SearchMode.SPARSE or rerank:
            dense_query = (await asyncio.to_thread(self._dense.embed, [query.text]))[0].tolist()
        terms = self._sparse.encode(query.text) if query.mode is not SearchMode.DENSE else None
        if query.mode is SearchMode.SPARSE and not terms:
            return []  # nothing to match on: no term of the query is indexable

        request: dict[str, Any]
        if query.mode is SearchMode.DENSE:
            request = {"query": dense_query, "using": DENSE}
        elif query.mode is SearchMode.SPARSE:
            assert terms is not None
            request = {"query": _sparse_vector(terms), "using": SPARSE}
        else:
            prefetch = [models.Prefetch(query=dense_query, using=DENSE, filter=flt, limit=prefetch_limit)]
            if terms:
                prefetch.append(
                    models.Prefetch(
                        query=_sparse_vector(terms), using=SPARSE, filter=flt, limit=prefetch_limit
                    )
                )
            request = {"prefetch": prefetch, "query": models.FusionQuery(fusion=models.Fusion.RRF)}

        response = await self._call(
            "searching",
            lambda client: client.query_points(
                self.collection,
                **request,
                query_filter=flt,
                limit=limit,
                score_threshold=query.score_threshold,
                with_payload=True,
                with_vectors=[DENSE] if rerank else False,
            ),
        )
        hits = [Hit(_document(p.payload or {}), p.score) for p in response.points]
        if not rerank or len(hits) <= 1:
            return hits[: query.top_k]
        assert query.mmr_lambda is not None
        embeddings = np.array([_dense_of(p) for p in response.points], dtype=np.float32)
        order = mmr_order([h.score for h in hits], embeddings, lambda_=query.mmr_lambda, k=query.top_k)
        return [hits[i] for i in order]

    async def close(self) -> None:
        if self._client is not None:
            await self._call("closing", lambda client: client.close())
            self._client = None
        self._embedded_worker.shutdown(wait=False)


def _dense_of(point: models.ScoredPoint) -> list[float]:
    vector = point.vector
    if not isinstance(vector, dict) or not isinstance(vector.get(DENSE), list):
        raise RuntimeError(f"Qdrant returned point {point.id} without its {DENSE!r} vector")
    return vector[DENSE]  # type: ignore[return-value]
