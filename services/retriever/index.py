"""The document index: what the servicer asks of it (`DocumentIndex`), and Qdrant behind it (`QdrantIndex`).

One Qdrant collection holds every document as a point with two named vectors: `dense` (cosine over
sentence-transformers embeddings) and `sparse` (term frequencies that Qdrant weights by IDF). Hybrid
search fuses the best of each channel by weighted reciprocal rank (`fusion.py`). Against a Qdrant
server it is one Query API request. Embedded Qdrant (qdrant-client local mode) stays the store of
record, but ranks by scanning every point in Python, so there the two rankings come from an
`ExactIndex` kept next to it (same scores, same fusion), and only the hits are read from Qdrant.
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
from services.retriever.exact import ExactIndex, Ranking
from services.retriever.fusion import dense_weight, readable_text, rrf
from services.retriever.lexical import SparseTerms
from services.retriever.mmr import mmr_order

log = logging.getLogger(__name__)
T = TypeVar("T")

DENSE = "dense"
SPARSE = "sparse"
# Payload keys that a `SearchFilter` matches on.
CONDITION_KEYS = ("kind", "owner", "language", "difficulty", "tags")
# Payload keys that a Qdrant server gets a keyword index for.
FILTERED_KEYS = ("doc_id", *CONDITION_KEYS)
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


def filter_conditions(f: SearchFilter) -> list[tuple[str, tuple[str, ...]]]:
    """The filter as (payload key, accepted values) pairs that must all hold."""
    conditions = [("kind", f.kinds), ("tags", f.tags)]
    conditions += [
        (key, (value,)) for key in ("owner", "language", "difficulty") if (value := getattr(f, key))
    ]
    return [(key, values) for key, values in conditions if values]


def payload_filter(f: SearchFilter) -> models.Filter | None:
    must: list[models.Condition] = []
    for key, values in filter_conditions(f):
        match: models.Match = (
            models.MatchAny(any=list(values))
            if key in ("kind", "tags")
            else models.MatchValue(value=values[0])
        )
        must.append(models.FieldCondition(key=key, match=match))
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


def _keywords(payload: dict[str, Any]) -> dict[str, list[str]]:
    """The payload values that filters match on, each key's as a list."""
    out: dict[str, list[str]] = {}
    for key in CONDITION_KEYS:
        value = payload.get(key)
        if isinstance(value, list):
            out[key] = [str(v) for v in value]
        else:
            out[key] = [] if value is None else [str(value)]
    return out


def _sparse_vector(terms: SparseTerms) -> models.SparseVector:
    return models.SparseVector(indices=list(terms.indices), values=list(terms.values))


@dataclass(frozen=True)
class _Plan:
    """One search, resolved: which channels rank, with what, and how much each counts."""

    limit: int  # hits to rank (before MMR)
    prefetch_limit: int  # candidates each channel hands to the fusion
    filter: SearchFilter
    fused: bool  # hybrid: the channels' rankings are fused by weighted RRF
    dense: list[float] | None  # the query embedding, when the dense channel ranks
    dense_weight: float
    sparse: SparseTerms | None  # the query terms, when the sparse channel ranks
    score_threshold: float | None
    with_vectors: bool


class QdrantIndex:
    """`DocumentIndex` on one Qdrant collection; embeddings are computed in a worker thread."""

    def __init__(
        self,
        location: QdrantLocation,
        dense: DenseEncoder,
        sparse: SparseEncoder,
        *,
        collection: str,
        multilingual_embeddings: bool = False,
        exact_embedded: bool = True,
        upsert_batch: int = 64,
        mmr_candidates: int = 4,
        # Candidates each channel hands to the fusion, per hit asked for (at least `min_prefetch`).
        prefetch_factor: int = 2,
        min_prefetch: int = 20,
    ) -> None:
        """`multilingual_embeddings`: the dense model reads Korean, so its ranking always counts fully
        (`fusion.dense_weight`). `exact_embedded`: embedded Qdrant ranks with an `ExactIndex`; False sends
        the server's Query API requests to embedded Qdrant too (slow: for comparisons and tests)."""
        self.location = location
        self.collection = collection
        self._dense = dense
        self._sparse = sparse
        self._multilingual = multilingual_embeddings
        self._upsert_batch = upsert_batch
        self._mmr_candidates = mmr_candidates
        self._prefetch_factor = prefetch_factor
        self._min_prefetch = min_prefetch
        self._client: AsyncQdrantClient | None = None
        # Embedded Qdrant, its event loop and the ExactIndex live on this one thread (which also opens
        # Qdrant: SQLite wants one thread), so writes reach both in the same order, and the service's
        # event loop keeps serving other calls meanwhile.
        self._embedded_worker = ThreadPoolExecutor(1, thread_name_prefix="embedded-qdrant")
        self._worker_loop: asyncio.AbstractEventLoop | None = None
        self._use_exact = location.embedded and exact_embedded
        self._exact: ExactIndex | None = None

    def _client_or_unavailable(self) -> AsyncQdrantClient:
        if self._client is None:
            raise Unavailable("the retriever is still starting (the index is not open yet)")
        return self._client

    def _await_on_worker(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Runs a coroutine of embedded Qdrant to completion; only on the worker thread."""
        if self._worker_loop is None:
            self._worker_loop = asyncio.new_event_loop()
        return self._worker_loop.run_until_complete(coroutine)

    async def _on_worker(self, action: str, job: Callable[[], T]) -> T:
        """Runs `job` on the embedded worker thread; errors as in `qdrant_errors`."""
        with qdrant_errors(self.location, action):
            return await asyncio.get_running_loop().run_in_executor(self._embedded_worker, job)

    async def _call(
        self,
        action: str,
        call: Callable[[AsyncQdrantClient], Coroutine[Any, Any, T]],
        *,
        then: Callable[[ExactIndex], None] | None = None,
    ) -> T:
        """Runs `call(client)`, then (embedded, once it succeeded) `then` on the ExactIndex, both on the
        worker thread. Errors as in `qdrant_errors`."""
        client = self._client_or_unavailable()
        if not self.location.embedded:
            with qdrant_errors(self.location, action):
                return await call(client)

        def job() -> T:
            result = self._await_on_worker(call(client))
            if then is not None and self._exact is not None:
                then(self._exact)
            return result

        return await self._on_worker(action, job)

    async def start(self) -> None:
        size = await asyncio.to_thread(self._dense.load)
        if self._client is None:
            self._client = await self._on_worker("opening", self.location.connect)
        await self._call("creating the collection", lambda client: self._ensure_collection(client, size))
        if self._use_exact and self._exact is None:
            self._exact = await self._on_worker("reading the collection", lambda: self._read_exact(size))
        # One real search so the first caller does not pay for lazy initialisation (~10x a warm search).
        await self.search(SearchQuery(text="warm-up 캐시 query_cache", top_k=1))
        log.info(
            "index ready: collection %r on %s%s, %d-dim embeddings from %s",
            self.collection,
            self.location.describe(),
            f" ({len(self._exact)} documents ranked in memory)" if self._exact is not None else "",
            size,
            self._dense.name,
        )

    def _read_exact(self, size: int) -> ExactIndex:
        """An ExactIndex of every point in the collection; on the worker thread."""
        client = self._client_or_unavailable()
        exact = ExactIndex(size)
        offset: models.ExtendedPointId | None = None
        while True:
            points, offset = self._await_on_worker(
                client.scroll(
                    self.collection,
                    limit=1024,
                    offset=offset,
                    with_payload=list(CONDITION_KEYS),
                    with_vectors=True,
                )
            )
            for point in points:
                vectors = point.vector if isinstance(point.vector, dict) else {}
                sparse = vectors.get(SPARSE)
                terms = (
                    SparseTerms(tuple(sparse.indices), tuple(sparse.values))
                    if isinstance(sparse, models.SparseVector)
                    else SparseTerms((), ())
                )
                exact.put(str(point.id), np.asarray(vectors[DENSE]), terms, _keywords(point.payload or {}))
            if offset is None:
                return exact

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
        if not self.location.embedded:  # embedded Qdrant has no payload indexes
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
        named = [dataclasses.replace(doc, id=doc_id) for doc, doc_id in zip(documents, ids, strict=True)]
        for start in range(0, len(named), self._upsert_batch):
            await self._store(named[start : start + self._upsert_batch])
        return ids

    async def _store(self, batch: list[Document]) -> None:
        dense, sparse = await asyncio.to_thread(self._encode_documents, [d.text for d in batch])
        points = [
            models.PointStruct(
                id=point_id(doc.id),
                vector={DENSE: vector.tolist(), SPARSE: _sparse_vector(terms)},
                payload=_payload(doc),
            )
            for doc, vector, terms in zip(batch, dense, sparse, strict=True)
        ]

        def mirror(exact: ExactIndex) -> None:
            for point, vector, terms in zip(points, dense, sparse, strict=True):
                exact.put(str(point.id), vector, terms, _keywords(point.payload or {}))

        await self._call(
            "upserting documents",
            lambda client: client.upsert(self.collection, points=points, wait=True),
            then=mirror,
        )

    async def get(self, doc_id: str) -> Document | None:
        points = await self._call(
            "reading a document",
            lambda client: client.retrieve(self.collection, ids=[point_id(doc_id)], with_payload=True),
        )
        return _document(points[0].payload or {}) if points else None

    async def delete(self, ids: Sequence[str]) -> None:
        points = [point_id(i) for i in ids]
        await self._call(
            "deleting documents",
            lambda client: client.delete(
                self.collection, points_selector=models.PointIdsList(points=points), wait=True
            ),
            then=lambda exact: exact.remove(points),
        )

    async def search(self, query: SearchQuery) -> list[Hit]:
        self._client_or_unavailable()  # before paying for the query embedding
        if self._use_exact and self._exact is None:
            raise Unavailable("the retriever is still starting (the collection is being read)")
        plan = await self._plan(query)
        if plan is None:
            return []
        if self._use_exact:
            points = await self._on_worker("searching", lambda: self._exact_search(plan))
        else:
            points = await self._call("searching", lambda client: self._query_api_search(client, plan))
        hits = [Hit(_document(p.payload or {}), p.score) for p in points]
        if query.mmr_lambda is None or len(hits) <= 1:
            return hits[: query.top_k]
        embeddings = np.array([_dense_of(p) for p in points], dtype=np.float32)
        order = mmr_order([h.score for h in hits], embeddings, lambda_=query.mmr_lambda, k=query.top_k)
        return [hits[i] for i in order]

    async def _plan(self, query: SearchQuery) -> _Plan | None:
        """What `query` asks each channel for; None when nothing can match (no indexable term in a sparse search)."""
        rerank = query.mmr_lambda is not None
        limit = query.top_k * self._mmr_candidates if rerank else query.top_k
        weight = 1.0
        if query.mode is SearchMode.HYBRID:
            weight = dense_weight(query.text, multilingual=self._multilingual)
        terms = self._sparse.encode(query.text) if query.mode is not SearchMode.DENSE else None
        if query.mode is SearchMode.SPARSE and not terms:
            return None
        if query.mode is SearchMode.HYBRID and not terms:
            weight = 1.0  # the dense channel alone, whatever it can read
        dense = None
        if weight > 0 and query.mode is not SearchMode.SPARSE:
            readable = readable_text(query.text, multilingual=self._multilingual)
            dense = (await asyncio.to_thread(self._dense.embed, [readable]))[0].tolist()
        return _Plan(
            limit=limit,
            prefetch_limit=max(limit * self._prefetch_factor, self._min_prefetch),
            filter=query.filter,
            fused=query.mode is SearchMode.HYBRID,
            dense=dense,
            dense_weight=weight,
            sparse=terms or None,
            score_threshold=query.score_threshold,
            with_vectors=rerank,
        )

    async def _query_api_search(self, client: AsyncQdrantClient, plan: _Plan) -> list[models.ScoredPoint]:
        flt = payload_filter(plan.filter)
        request: dict[str, Any]
        if not plan.fused:
            request = (
                {"query": plan.dense, "using": DENSE}
                if plan.dense is not None
                else {"query": _sparse_vector(plan.sparse or SparseTerms((), ())), "using": SPARSE}
            )
        else:
            prefetch, weights = [], []
            if plan.dense is not None:
                prefetch.append(
                    models.Prefetch(query=plan.dense, using=DENSE, filter=flt, limit=plan.prefetch_limit)
                )
                weights.append(plan.dense_weight)
            if plan.sparse is not None:
                prefetch.append(
                    models.Prefetch(
                        query=_sparse_vector(plan.sparse), using=SPARSE, filter=flt, limit=plan.prefetch_limit
                    )
                )
                weights.append(1.0)
            fusion: models.Query = (
                models.FusionQuery(fusion=models.Fusion.RRF)  # understood by servers without weighted RRF
                if all(w == 1.0 for w in weights)
                else models.RrfQuery(rrf=models.Rrf(weights=weights))
            )
            request = {"prefetch": prefetch, "query": fusion}
        response = await client.query_points(
            self.collection,
            **request,
            query_filter=flt,
            limit=plan.limit,
            score_threshold=plan.score_threshold,
            with_payload=True,
            with_vectors=[DENSE] if plan.with_vectors else False,
        )
        return response.points

    def _exact_search(self, plan: _Plan) -> list[models.ScoredPoint]:
        """The Query API's answer to `plan`, ranked by the ExactIndex; hits read from embedded Qdrant. On the worker."""
        exact, client = self._exact, self._client_or_unavailable()
        if exact is None:
            raise Unavailable("the index is closed")
        conditions = filter_conditions(plan.filter)
        ranked: Ranking
        if not plan.fused:
            ranked = (
                exact.dense_ranking(np.asarray(plan.dense), plan.limit, conditions, plan.score_threshold)
                if plan.dense is not None
                else exact.sparse_ranking(
                    plan.sparse or SparseTerms((), ()), plan.limit, conditions, plan.score_threshold
                )
            )
        else:
            rankings, weights = [], []
            if plan.dense is not None:
                rankings.append(exact.dense_ranking(np.asarray(plan.dense), plan.prefetch_limit, conditions))
                weights.append(plan.dense_weight)
            if plan.sparse is not None:
                rankings.append(exact.sparse_ranking(plan.sparse, plan.prefetch_limit, conditions))
                weights.append(1.0)
            ranked = rrf([[point for point, _ in r] for r in rankings], weights)[: plan.limit]
            if plan.score_threshold is not None:
                ranked = [(point, score) for point, score in ranked if score >= plan.score_threshold]
        if not ranked:
            return []
        records = self._await_on_worker(
            client.retrieve(
                self.collection,
                ids=[point for point, _ in ranked],
                with_payload=True,
                with_vectors=[DENSE] if plan.with_vectors else False,
            )
        )
        by_id = {str(r.id): r for r in records}
        return [
            models.ScoredPoint(
                id=point, version=0, score=score, payload=by_id[point].payload, vector=by_id[point].vector
            )
            for point, score in ranked
            if point in by_id
        ]

    async def close(self) -> None:
        if self._client is not None:
            await self._call("closing", lambda client: client.close())
            self._client = None
        if self._worker_loop is not None:
            await asyncio.get_running_loop().run_in_executor(self._embedded_worker, self._worker_loop.close)
            self._worker_loop = None
        self._exact = None
        self._embedded_worker.shutdown(wait=False)


def _dense_of(point: models.ScoredPoint) -> list[float]:
    vector = point.vector
    if not isinstance(vector, dict) or not isinstance(vector.get(DENSE), list):
        raise RuntimeError(f"Qdrant returned point {point.id} without its {DENSE!r} vector")
    return vector[DENSE]  # type: ignore[return-value]
