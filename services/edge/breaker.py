"""The edge's optional dependencies (the cache and the retriever) behind one kind of circuit breaker.

A dead cache thus costs a stream nothing instead of one timeout per call, and the edge finds out by
itself when it is back. Only the dependency's own failures (UNAVAILABLE, DEADLINE_EXCEEDED) count: a
refusal of one request (an oversized document, bad data) never trips the breaker for everyone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from til.v1 import retriever_pb2

from services.common.breaker import CircuitBreaker
from services.edge.clients import (
    CacheRead,
    DependencyUnavailable,
    DocumentStore,
    ResultCache,
    is_dependency_failure,
)


def dependency_breaker(
    dependency: str, *, failures: int, cool_down_s: float, clock: Callable[[], float] = time.monotonic
) -> CircuitBreaker:
    """A breaker that refuses with `DependencyUnavailable` and counts only the dependency's failures."""
    return CircuitBreaker(
        dependency,
        failures=failures,
        cool_down_s=cool_down_s,
        refuse=DependencyUnavailable,
        counts=is_dependency_failure,
        clock=clock,
    )


class GuardedCache:
    """A `ResultCache` behind a breaker."""

    def __init__(self, cache: ResultCache, breaker: CircuitBreaker) -> None:
        self._cache = cache
        self.breaker = breaker

    async def get(self, namespace: str, key: str, *, timeout: float) -> CacheRead | None:
        with self.breaker.guard():
            return await self._cache.get(namespace, key, timeout=timeout)

    async def put(self, namespace: str, key: str, value_json: str, *, ttl_s: int, timeout: float) -> None:
        with self.breaker.guard():
            await self._cache.put(namespace, key, value_json, ttl_s=ttl_s, timeout=timeout)


class GuardedStore:
    """A `DocumentStore` behind a breaker."""

    def __init__(self, store: DocumentStore, breaker: CircuitBreaker) -> None:
        self._store = store
        self.breaker = breaker

    async def search(
        self, request: retriever_pb2.SearchDocumentsRequest, *, timeout: float
    ) -> list[retriever_pb2.SearchHit]:
        with self.breaker.guard():
            return await self._store.search(request, timeout=timeout)

    async def upsert(self, documents: Sequence[retriever_pb2.Document], *, timeout: float) -> list[str]:
        with self.breaker.guard():
            return await self._store.upsert(documents, timeout=timeout)

    async def get(self, document_id: str, *, owner: str, timeout: float) -> retriever_pb2.Document | None:
        with self.breaker.guard():
            return await self._store.get(document_id, owner=owner, timeout=timeout)
