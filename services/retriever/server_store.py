"""`VectorStore` on a Qdrant server (RETRIEVER_QDRANT_URL) through qdrant-client's Query API.

The collection has the layout of `edge_store.EdgeStore` (a cosine `dense` vector, an IDF `sparse`
vector, keyword indexes on the filtered payload keys) and a plan becomes the same Query API request,
so a server and an Edge shard holding the same points answer a search with the same hits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from qdrant_client import AsyncQdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from services.common.errors import FailedPrecondition, Unavailable
from services.retriever.documents import (
    DENSE,
    FILTERED_KEYS,
    SPARSE,
    Plan,
    SearchFilter,
    StoredHit,
    StoredPoint,
)
from services.retriever.documents import filter_conditions as conditions_of
from services.retriever.lexical import SparseTerms


@contextlib.contextmanager
def qdrant_errors(where: str, action: str) -> Iterator[None]:
    """Turns "Qdrant is down or overloaded" into UNAVAILABLE; anything else stays an internal error."""
    try:
        yield
    except ResponseHandlingException as exc:  # connection refused, timeout, TLS, ...
        raise Unavailable(f"{where} is unreachable ({action}): {exc.source or exc}") from exc
    except UnexpectedResponse as exc:
        status = exc.status_code or 0
        if status == 429 or status >= 500:
            raise Unavailable(f"{where} answered {status} ({action}): {exc.reason_phrase}") from exc
        if status in (401, 403):
            raise Unavailable(
                f"{where} refused the credentials ({action}); check RETRIEVER_QDRANT_API_KEY"
            ) from exc
        if status == 404:
            raise FailedPrecondition(
                f"{where} has no such collection ({action}); restart the retriever to create it"
            ) from exc
        raise
    except (ConnectionError, TimeoutError) as exc:
        raise Unavailable(f"{where} is unreachable ({action}): {exc}") from exc


def payload_filter(f: SearchFilter) -> models.Filter | None:
    must: list[models.Condition] = []
    for key, values in conditions_of(f):
        match: models.Match = (
            models.MatchAny(any=list(values))
            if key in ("kind", "tags")
            else models.MatchValue(value=values[0])
        )
        must.append(models.FieldCondition(key=key, match=match))
    return models.Filter(must=must) if must else None


def _sparse(terms: SparseTerms) -> models.SparseVector:
    return models.SparseVector(indices=list(terms.indices), values=list(terms.values))


def query_request(plan: Plan) -> dict[str, Any]:
    """Keyword arguments of `query_points` for `plan` (the request `edge_store.edge_request` makes)."""
    flt = payload_filter(plan.filter)
    request: dict[str, Any]
    if not plan.fused:
        request = (
            {"query": plan.dense, "using": DENSE}
            if plan.dense is not None
            else {"query": _sparse(plan.sparse or SparseTerms((), ())), "using": SPARSE}
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
                    query=_sparse(plan.sparse), using=SPARSE, filter=flt, limit=plan.prefetch_limit
                )
            )
            weights.append(1.0)
        fusion: models.Query = (
            models.FusionQuery(fusion=models.Fusion.RRF)  # understood by servers without weighted RRF
            if all(w == 1.0 for w in weights)
            else models.RrfQuery(rrf=models.Rrf(weights=weights))
        )
        request = {"prefetch": prefetch, "query": fusion}
    return {
        **request,
        "query_filter": flt,
        "limit": plan.limit,
        "score_threshold": plan.score_threshold,
        "with_payload": True,
        "with_vectors": [DENSE] if plan.with_vectors else False,
    }


class ServerStore:
    """One collection on a Qdrant server. `client` may be given (tests pass qdrant-client's in-memory
    Query API implementation to compare it with an Edge shard); otherwise it is made from `url`."""

    def __init__(
        self,
        url: str,
        collection: str,
        *,
        api_key: str = "",
        timeout_s: int = 10,
        client: AsyncQdrantClient | None = None,
    ) -> None:
        self.url = url
        self.collection = collection
        self._client = client or AsyncQdrantClient(
            url=url, api_key=api_key or None, timeout=timeout_s, check_compatibility=False
        )
        self._open = False

    def describe(self) -> str:
        return f"Qdrant at {self.url}"

    def _errors(self, action: str) -> contextlib.AbstractContextManager[None]:
        if not self._open and action != "opening the collection":
            raise Unavailable("the index is not open (the retriever is starting or stopping)")
        return qdrant_errors(self.describe(), action)

    async def open(self, dimensions: int) -> None:
        client = self._client
        with self._errors("opening the collection"):
            if not await client.collection_exists(self.collection):
                try:
                    await client.create_collection(
                        self.collection,
                        vectors_config={
                            DENSE: models.VectorParams(size=dimensions, distance=models.Distance.COSINE)
                        },
                        sparse_vectors_config={
                            SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)
                        },
                    )
                except UnexpectedResponse as exc:
                    if exc.status_code != 409:  # another replica created it first
                        raise
            else:
                self._check(await client.get_collection(self.collection), dimensions)
            for key in FILTERED_KEYS:
                await client.create_payload_index(
                    self.collection, key, models.PayloadSchemaType.KEYWORD, wait=True
                )
        self._open = True

    def _check(self, info: models.CollectionInfo, dimensions: int) -> None:
        vectors = info.config.params.vectors
        dense = vectors.get(DENSE) if isinstance(vectors, dict) else None
        sparse = (info.config.params.sparse_vectors or {}).get(SPARSE)
        if dense is None or sparse is None or sparse.modifier != models.Modifier.IDF:
            raise FailedPrecondition(
                f"collection {self.collection!r} exists but was not made by the retriever (it needs a "
                f"{DENSE!r} vector and a {SPARSE!r} vector with IDF); choose another RETRIEVER_COLLECTION"
            )
        if dense.size != dimensions:
            raise FailedPrecondition(
                f"collection {self.collection!r} holds {dense.size}-dim vectors but the embedding model makes "
                f"{dimensions}-dim ones; re-index into a new RETRIEVER_COLLECTION after changing the model"
            )

    async def upsert(self, points: Sequence[StoredPoint]) -> None:
        structs = [
            models.PointStruct(id=p.id, vector={DENSE: p.dense, SPARSE: _sparse(p.sparse)}, payload=p.payload)
            for p in points
        ]
        with self._errors("upserting documents"):
            await self._client.upsert(self.collection, points=structs, wait=True)

    async def query(self, plan: Plan) -> list[StoredHit]:
        with self._errors("searching"):
            response = await self._client.query_points(self.collection, **query_request(plan))
        return [
            StoredHit(p.payload or {}, p.score, _dense_of(p) if plan.with_vectors else None)
            for p in response.points
        ]

    async def retrieve(self, point_id: str) -> dict[str, Any] | None:
        with self._errors("reading a document"):
            points = await self._client.retrieve(self.collection, ids=[point_id], with_payload=True)
        return (points[0].payload or {}) if points else None

    async def delete(self, point_ids: Sequence[str]) -> None:
        selector = models.PointIdsList(points=list(point_ids))
        with self._errors("deleting documents"):
            await self._client.delete(self.collection, points_selector=selector, wait=True)

    async def count(self) -> int:
        with self._errors("counting documents"):
            return (await self._client.count(self.collection, exact=True)).count

    def disk_bytes(self) -> int | None:
        return None

    async def close(self) -> None:
        self._open = False
        await self._client.close()


def _dense_of(point: models.ScoredPoint) -> list[float]:
    vector = point.vector
    if not isinstance(vector, dict) or not isinstance(vector.get(DENSE), list):
        raise RuntimeError(f"Qdrant returned point {point.id} without its {DENSE!r} vector")
    return vector[DENSE]  # type: ignore[return-value]
