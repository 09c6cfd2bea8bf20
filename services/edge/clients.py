"""Thin clients of the generator, retriever and cacher, and the narrow Protocols the pipelines use.

The generator is essential: its errors reach the caller with their own status (after bounded retries
of UNAVAILABLE before the first token). The cache and the retriever are helpers with short deadlines:
every failure becomes `DependencyUnavailable`, which the pipelines turn into a degraded-but-working
answer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
from prometheus_client import Counter
from til.v1 import (
    cacher_pb2,
    cacher_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    retriever_pb2,
    retriever_pb2_grpc,
)

log = logging.getLogger(__name__)

GENERATOR_RETRIES = Counter(
    "tilserve_edge_generator_retries_total", "Generations tried again after UNAVAILABLE before any text."
)


class DependencyUnavailable(Exception):
    """A cache or retriever call failed or ran past its deadline; the message says which and why."""


class TilGenerator(Protocol):
    def generate(
        self, request: generator_pb2.GenerateRequest, *, timeout: float | None
    ) -> AsyncGenerator[generator_pb2.GenerateResponse, None]:
        """Streams one generation; closing the iterator cancels the call."""
        ...

    async def model_info(self, *, timeout: float | None = None) -> generator_pb2.GetModelInfoResponse:
        """The loaded model, fetched once and kept until the generator reports another model."""
        ...


class DocumentStore(Protocol):
    async def search(
        self, request: retriever_pb2.SearchDocumentsRequest, *, timeout: float
    ) -> list[retriever_pb2.SearchHit]: ...

    async def upsert(self, documents: Sequence[retriever_pb2.Document], *, timeout: float) -> list[str]: ...

    async def get(self, document_id: str, *, timeout: float) -> retriever_pb2.Document | None:
        """The document stored under `document_id`, or None when there is none."""
        ...


class ResultCache(Protocol):
    async def get(self, namespace: str, key: str, *, timeout: float) -> str | None:
        """The JSON stored under the key, or None on a miss."""
        ...

    async def put(self, namespace: str, key: str, value_json: str, *, ttl_s: int, timeout: float) -> None: ...


def _unavailable(service: str, exc: grpc.aio.AioRpcError) -> DependencyUnavailable:
    return DependencyUnavailable(f"{service}: {exc.code().name}: {exc.details() or 'no details'}")


@dataclass(frozen=True)
class RetryPolicy:
    """Tries of one generation: only after UNAVAILABLE, only before any text, with doubling backoff."""

    attempts: int = 3
    backoff_s: float = 0.1
    max_backoff_s: float = 2.0

    def delay(self, retry: int) -> float:
        """Seconds before retry number `retry` (1, 2, ...): full jitter over a doubling cap."""
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1)))


class GeneratorClient:
    """`TilGenerator` over a channel to til.v1.GeneratorService.

    A generation that fails with UNAVAILABLE before it streamed any text (the replica went away, or
    is draining) is tried again, on the next replica the channel's round robin picks, within the
    call's deadline. Once text has been streamed, a failure ends the stream: a retry would repeat it.
    """

    def __init__(self, channel: grpc.aio.Channel, *, retry: RetryPolicy | None = None) -> None:
        self._stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        self._info: generator_pb2.GetModelInfoResponse | None = None
        self._retry = retry or RetryPolicy()

    async def generate(
        self, request: generator_pb2.GenerateRequest, *, timeout: float | None
    ) -> AsyncGenerator[generator_pb2.GenerateResponse, None]:
        deadline = None if timeout is None else time.monotonic() + timeout
        started_sent = False
        attempt = 1
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            call = self._stub.Generate(request, timeout=remaining)
            text_sent = False
            try:
                async for response in call:
                    if response.HasField("started"):
                        if self._info is not None and response.started.model != self._info.model:
                            self._info = None  # the generator was redeployed with another model
                        if started_sent:
                            continue  # a retry: the caller already has its started event
                        started_sent = True
                    elif response.HasField("delta"):
                        text_sent = True
                    yield response
                return
            except grpc.aio.AioRpcError as exc:
                delay = self._retry.delay(attempt)
                if (
                    exc.code() is not grpc.StatusCode.UNAVAILABLE
                    or text_sent
                    or attempt >= self._retry.attempts
                    or (deadline is not None and time.monotonic() + delay >= deadline)
                ):
                    raise
                GENERATOR_RETRIES.inc()
                log.info(
                    "generation %s: the generator is unavailable (%s); try %d of %d in %.0f ms",
                    request.request_id,
                    exc.details(),
                    attempt + 1,
                    self._retry.attempts,
                    delay * 1000,
                )
            finally:
                # Our caller left (client gone, error, or early close): stop the generation too.
                call.cancel()
            await asyncio.sleep(delay)
            attempt += 1

    async def model_info(self, *, timeout: float | None = None) -> generator_pb2.GetModelInfoResponse:
        if self._info is None:
            self._info = await self._stub.GetModelInfo(generator_pb2.GetModelInfoRequest(), timeout=timeout)
        return self._info


class RetrieverClient:
    """`DocumentStore` over a channel to til.v1.RetrieverService."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = retriever_pb2_grpc.RetrieverServiceStub(channel)

    async def search(
        self, request: retriever_pb2.SearchDocumentsRequest, *, timeout: float
    ) -> list[retriever_pb2.SearchHit]:
        try:
            response = await self._stub.SearchDocuments(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _unavailable("retriever", exc) from exc
        return list(response.hits)

    async def upsert(self, documents: Sequence[retriever_pb2.Document], *, timeout: float) -> list[str]:
        request = retriever_pb2.UpsertDocumentsRequest(documents=documents)
        try:
            response = await self._stub.UpsertDocuments(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _unavailable("retriever", exc) from exc
        return list(response.ids)

    async def get(self, document_id: str, *, timeout: float) -> retriever_pb2.Document | None:
        request = retriever_pb2.GetDocumentRequest(id=document_id)
        try:
            response = await self._stub.GetDocument(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                return None
            raise _unavailable("retriever", exc) from exc
        return response.document


class CacherClient:
    """`ResultCache` over a channel to til.v1.CacherService."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = cacher_pb2_grpc.CacherServiceStub(channel)

    async def get(self, namespace: str, key: str, *, timeout: float) -> str | None:
        try:
            response = await self._stub.GetEntry(
                cacher_pb2.GetEntryRequest(namespace=namespace, key=key), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _unavailable("cacher", exc) from exc
        return response.value_json if response.found else None

    async def put(self, namespace: str, key: str, value_json: str, *, ttl_s: int, timeout: float) -> None:
        request = cacher_pb2.PutEntryRequest(
            namespace=namespace, key=key, value_json=value_json, ttl_seconds=ttl_s
        )
        try:
            await self._stub.PutEntry(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _unavailable("cacher", exc) from exc
