"""A circuit breaker for the edge's optional dependencies (the cache and the retriever).

Closed, calls pass. After `failures` consecutive failed calls it opens: calls are refused at once, without
touching the network, for `cool_down_s`. Then one call goes through as a probe (half-open): its success
closes the breaker, its failure opens it for another cool-down. A dead cache thus costs a stream nothing
instead of one timeout per call, and the edge finds out by itself when the cache is back.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import Counter, Gauge
from til.v1 import retriever_pb2

from services.edge.clients import DependencyUnavailable, DocumentStore, ResultCache

log = logging.getLogger(__name__)

BREAKER_OPEN = Gauge(
    "tilserve_edge_breaker_open", "1 while calls to the dependency are skipped.", ["dependency"]
)
BREAKER_SKIPPED = Counter(
    "tilserve_edge_breaker_skipped_total", "Calls refused by an open breaker.", ["dependency"]
)


class CircuitBreaker:
    def __init__(
        self,
        dependency: str,
        *,
        failures: int,
        cool_down_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1 or cool_down_s <= 0:
            raise ValueError("failures must be >= 1 and cool_down_s > 0")
        self.dependency = dependency
        self.failures = failures
        self.cool_down_s = cool_down_s
        self._clock = clock
        self._consecutive = 0
        self._open_until: float | None = None
        self._probing = False
        BREAKER_OPEN.labels(dependency).set(0)

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Wraps one call: raises DependencyUnavailable at once while open; counts how the call ended.

        The call counts as failed when it raises DependencyUnavailable; a cancelled call counts as
        neither (its caller left, which says nothing about the dependency).
        """
        probe = False
        if self._open_until is not None:
            wait = self._open_until - self._clock()
            if wait > 0 or self._probing:
                BREAKER_SKIPPED.labels(self.dependency).inc()
                raise DependencyUnavailable(
                    f"{self.dependency}: skipped after {self.failures} consecutive failures; "
                    f"next try in {max(wait, 0.0):.1f}s"
                )
            probe = self._probing = True
        try:
            yield
        except DependencyUnavailable:
            self._failed()
            raise
        else:
            self._succeeded()
        finally:
            if probe:
                self._probing = False

    def _failed(self) -> None:
        self._consecutive += 1
        if self._consecutive >= self.failures:
            if self._open_until is None:
                log.warning(
                    "%s failed %d times in a row; skipping it for %.1fs",
                    self.dependency,
                    self._consecutive,
                    self.cool_down_s,
                )
            self._open_until = self._clock() + self.cool_down_s
            BREAKER_OPEN.labels(self.dependency).set(1)

    def _succeeded(self) -> None:
        if self._open_until is not None:
            log.info("%s answers again; calling it as usual", self.dependency)
        self._consecutive = 0
        self._open_until = None
        BREAKER_OPEN.labels(self.dependency).set(0)


class GuardedCache:
    """A `ResultCache` behind a breaker."""

    def __init__(self, cache: ResultCache, breaker: CircuitBreaker) -> None:
        self._cache = cache
        self.breaker = breaker

    async def get(self, namespace: str, key: str, *, timeout: float) -> str | None:
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

    async def get(self, document_id: str, *, timeout: float) -> retriever_pb2.Document | None:
        with self.breaker.guard():
            return await self._store.get(document_id, timeout=timeout)
