"""`HybridIndex`: documents in, hits out, over a `VectorStore` (a Qdrant Edge shard or a Qdrant server).

Every document is one point with two named vectors: `dense` (cosine over sentence-transformers
embeddings) and `sparse` (term frequencies that Qdrant weights by IDF). Hybrid search fuses the best of
each channel by weighted reciprocal rank (`fusion.py`), in the store's Query API; MMR re-ranking
(`mmr.py`) happens here, on the candidates' dense vectors, so both stores re-rank alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from services.common.errors import Unavailable
from services.retriever.documents import (
    Document,
    Hit,
    Plan,
    SearchMode,
    SearchQuery,
    StoredPoint,
    VectorStore,
    document_id,
    document_of,
    payload_of,
    point_id,
)
from services.retriever.embedding import DenseEncoder
from services.retriever.fusion import ENGLISH_ONLY_WEIGHT, dense_weight, readable_text
from services.retriever.lexical import SparseTerms
from services.retriever.mmr import mmr_order

log = logging.getLogger(__name__)


class SparseEncoder(Protocol):
    @property
    def name(self) -> str: ...

    def encode(self, text: str) -> SparseTerms: ...


# The dense model reads its first 256 word pieces (MiniLM) and Hangul costs several each: beyond this many
# characters the text only costs tokenising time.
DENSE_CHARS = 2_000


def searched_text(doc: Document) -> str:
    """What both channels index: the title (a TIL's title names what it is about) and the text."""
    return f"{doc.title}\n\n{doc.text}" if doc.title.strip() else doc.text


class HybridIndex:
    """`DocumentIndex` over one `VectorStore`; embeddings and sparse terms are computed in worker threads."""

    def __init__(
        self,
        store: VectorStore,
        dense: DenseEncoder,
        sparse: SparseEncoder,
        *,
        multilingual_embeddings: bool = False,
        english_only_weight: float = ENGLISH_ONLY_WEIGHT,
        upsert_batch: int = 64,
        mmr_candidates: int = 4,
        # Candidates each channel hands to the fusion, per hit asked for (at least `min_prefetch`).
        prefetch_factor: int = 2,
        min_prefetch: int = 20,
    ) -> None:
        """`multilingual_embeddings`: the dense model reads Korean, so its ranking always counts fully
        (`fusion.dense_weight`); otherwise it counts at most `english_only_weight`."""
        self.store = store
        self._dense = dense
        self._sparse = sparse
        self._multilingual = multilingual_embeddings
        self._english_only_weight = english_only_weight
        self._upsert_batch = upsert_batch
        self._mmr_candidates = mmr_candidates
        self._prefetch_factor = prefetch_factor
        self._min_prefetch = min_prefetch
        self._started = False

    async def start(self) -> None:
        size = await asyncio.to_thread(self._dense.load)
        await asyncio.to_thread(self._sparse.encode, "warm-up")  # loads the analyser's model
        await self.store.open(size)
        self._started = True
        # One real search so the first caller does not pay for lazy initialisation (~10x a warm search).
        await self.search(SearchQuery(text="warm-up 캐시 query_cache", top_k=1))
        log.info(
            "index ready: %s, %d documents, %d-dim embeddings from %s, sparse terms from %s",
            self.store.describe(),
            await self.store.count(),
            size,
            self._dense.name,
            self._sparse.name,
        )

    def _check_started(self) -> None:
        if not self._started:
            raise Unavailable("the retriever is still starting (the index is not open yet)")

    def _encode_documents(self, documents: list[Document]) -> list[StoredPoint]:
        texts = [searched_text(d) for d in documents]
        dense = self._dense.embed([t[:DENSE_CHARS] for t in texts])
        return [
            StoredPoint(point_id(d.id), vector.tolist(), self._sparse.encode(text), payload_of(d))
            for d, text, vector in zip(documents, texts, dense, strict=True)
        ]

    async def upsert(self, documents: Sequence[Document]) -> list[str]:
        self._check_started()
        ids = [doc.id or document_id(doc.kind, doc.text) for doc in documents]
        named = [dataclasses.replace(doc, id=doc_id) for doc, doc_id in zip(documents, ids, strict=True)]
        for start in range(0, len(named), self._upsert_batch):
            points = await asyncio.to_thread(
                self._encode_documents, named[start : start + self._upsert_batch]
            )
            await self.store.upsert(points)
        return ids

    async def get(self, doc_id: str) -> Document | None:
        self._check_started()
        payload = await self.store.retrieve(point_id(doc_id))
        return document_of(payload) if payload else None

    async def delete(self, ids: Sequence[str]) -> None:
        self._check_started()
        await self.store.delete([point_id(i) for i in ids])

    async def count(self) -> int:
        return await self.store.count()

    async def search(self, query: SearchQuery) -> list[Hit]:
        self._check_started()  # before paying for the query embedding
        plan = await self.plan(query)
        if plan is None:
            return []
        stored = await self.store.query(plan)
        hits = [Hit(document_of(s.payload), s.score) for s in stored]
        if query.mmr_lambda is None or len(hits) <= 1:
            return hits[: query.top_k]
        embeddings = np.array([s.dense for s in stored], dtype=np.float32)
        order = mmr_order([h.score for h in hits], embeddings, lambda_=query.mmr_lambda, k=query.top_k)
        return [hits[i] for i in order]

    def _query_terms(self, query: SearchQuery) -> SparseTerms | None:
        return self._sparse.encode(query.text) if query.mode is not SearchMode.DENSE else None

    async def plan(self, query: SearchQuery) -> Plan | None:
        """What `query` asks each channel for; None when nothing can match (no indexable term in a sparse search)."""
        rerank = query.mmr_lambda is not None
        limit = query.top_k * self._mmr_candidates if rerank else query.top_k
        weight = 1.0
        if query.mode is SearchMode.HYBRID:
            weight = dense_weight(
                query.text, multilingual=self._multilingual, english_only_weight=self._english_only_weight
            )
        terms = self._query_terms(query)
        if query.mode is SearchMode.SPARSE and not terms:
            return None
        if query.mode is SearchMode.HYBRID and not terms:
            weight = 1.0  # the dense channel alone, whatever it can read
        dense = None
        if weight > 0 and query.mode is not SearchMode.SPARSE:
            readable = readable_text(query.text, multilingual=self._multilingual)
            dense = (await asyncio.to_thread(self._dense.embed, [readable]))[0].tolist()
        return Plan(
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

    async def close(self) -> None:
        self._started = False
        await self.store.close()
