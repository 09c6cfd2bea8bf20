"""Thin clients of the generator, retriever and cacher, and the narrow Protocols the pipelines use.

The generator is essential: its errors reach the caller with their own status (after bounded retries
of UNAVAILABLE before the first token). The cache and the retriever are helpers with short deadlines:
every failure becomes `DependencyUnavailable`, which the pipelines turn into a degraded-but-working
answer.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Counter
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_any,
    wait_exponential,
    wait_random_exponential,
)
from tenacity.stop import stop_base
from til.v1 import (
    cacher_pb2,
    cacher_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    retriever_pb2,
    retriever_pb2_grpc,
)

from services.common import sent_at
from services.common.errors import Unavailable

log = logging.getLogger(__name__)

GENERATOR_RETRIES = Counter(
    "tilserve_edge_generator_retries_total", "Generations tried again after UNAVAILABLE before any text."
)


class DependencyUnavailable(Exception):
    """A cache or retriever call failed or ran past its deadline; the message says which and why.

    `code` is the call's status: UNAVAILABLE or DEADLINE_EXCEEDED say the dependency is away (a
    breaker counts them); any other code is about this one request (`is_dependency_failure`).
    """

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        super().__init__(message)
        self.code = code


_PEER_AWAY = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def is_dependency_failure(exc: BaseException) -> bool:
    """Whether `exc` says the dependency itself is down or slow (not that one request was refused)."""
    return isinstance(exc, DependencyUnavailable) and exc.code in _PEER_AWAY


class TilGenerator(Protocol):
    def generate(
        self, request: generator_pb2.GenerateRequest, *, timeout: float | None
    ) -> AsyncGenerator[generator_pb2.GenerateResponse, None]:
        """Streams one generation; closing the iterator cancels the call."""
        ...

    async def model_info(self, *, timeout: float | None = None) -> generator_pb2.GetModelInfoResponse:
        """The loaded model, fetched once and kept until the generator reports another model."""
        ...

    async def tokenize(
        self, request: generator_pb2.TokenizeRequest, *, timeout: float | None
    ) -> generator_pb2.TokenizeResponse:
        """Token counts of texts and chats with the model's own tokenizer."""
        ...


class DocumentStore(Protocol):
    async def search(
        self, request: retriever_pb2.SearchDocumentsRequest, *, timeout: float
    ) -> list[retriever_pb2.SearchHit]: ...

    async def upsert(self, documents: Sequence[retriever_pb2.Document], *, timeout: float) -> list[str]: ...

    async def get(self, document_id: str, *, owner: str, timeout: float) -> retriever_pb2.Document | None:
        """The document stored under `document_id` for `owner`, or None when there is none (another
        owner's included; the empty owner is an owner of its own)."""
        ...


@dataclass(frozen=True)
class CacheRead:
    """A value the cache holds, and how long it keeps it (None: no expiry)."""

    value_json: str
    expires_in_s: float | None = None


class ResultCache(Protocol):
    async def get(self, namespace: str, key: str, *, timeout: float) -> CacheRead | None:
        """The JSON stored under the key and its time left, or None on a miss."""
        ...

    async def put(self, namespace: str, key: str, value_json: str, *, ttl_s: int, timeout: float) -> None: ...


def _unavailable(service: str, exc: grpc.aio.AioRpcError) -> DependencyUnavailable:
    return DependencyUnavailable(f"{service}: {exc.code().name}: {exc.details() or 'no details'}", exc.code())


@dataclass(frozen=True)
class RetryPolicy:
    """Tries of one generation: only after UNAVAILABLE, only before any text, with doubling backoff
    (full jitter), within the call's deadline."""

    attempts: int = 3
    backoff_s: float = 0.1
    max_backoff_s: float = 2.0


@dataclass(eq=False)
class Replica:
    """One generator replica: its channel and what the edge knows of its load and health."""

    target: str
    channel: grpc.aio.Channel
    outstanding: int = 0
    """Streams the edge has open on it now."""
    serving: bool = True
    """Its readiness, as its health service last said (NOT_SERVING while it drains)."""
    failed_until: float = 0.0
    """After an UNAVAILABLE, skipped until then (monotonic time)."""

    def __post_init__(self) -> None:
        self.stub = generator_pb2_grpc.GeneratorServiceStub(self.channel)

    def usable(self, now: float) -> bool:
        return self.serving and self.failed_until <= now


def replica_targets(addr: str) -> tuple[list[str], tuple[str, int] | None]:
    """The fixed targets in EDGE_GENERATOR_ADDR (host:port, or a comma list), or for `dns:///name:port`
    no fixed target and the (name, port) to resolve."""
    addr = addr.strip()
    if addr.startswith("dns:"):
        name, _, port = addr.removeprefix("dns:").lstrip("/").rpartition(":")
        if not name or not port.isdigit():
            raise ValueError(f"{addr!r}: expected dns:///name:port")
        return [], (name.strip("[]"), int(port))
    return [part.strip() for part in addr.split(",") if part.strip()], None


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GeneratorReplicas:
    """The generator replicas behind one edge; each stream goes to the one with the fewest streams open.

    A replica whose health service says NOT_SERVING (draining, or not warmed up) or that just failed
    with UNAVAILABLE is skipped while another can take the stream. `dns:///name:port` is resolved
    again every `resolve_every_s`, so replicas that come and go are followed.
    """

    def __init__(
        self,
        targets: Sequence[str],
        connect: Callable[[str], grpc.aio.Channel],
        *,
        dns: tuple[str, int] | None = None,
        failure_cool_down_s: float = 2.0,
        resolve_every_s: float = 10.0,
        connections: int = 1,
    ) -> None:
        self._connect = connect
        self._dns = dns
        self._failure_cool_down_s = failure_cool_down_s
        self._resolve_every_s = resolve_every_s
        # Connections per target, each a `Replica` of its own (`connect` must give each its own
        # connection): a generator with several front-ends on one port gets one per connection, as the
        # kernel hands each connection to one of them, and streams spread over the connections.
        self._connections = connections
        self.replicas: list[Replica] = self._open(targets)
        self._retired: list[Replica] = []
        self._watches: dict[Replica, asyncio.Task[None]] = {}
        self._turn = 0

    def _open(self, targets: Sequence[str]) -> list[Replica]:
        return [
            Replica(target, self._connect(target)) for target in targets for _ in range(self._connections)
        ]

    @classmethod
    def from_addr(
        cls, addr: str, connect: Callable[[str], grpc.aio.Channel], *, connections: int = 1, **options: float
    ) -> GeneratorReplicas:
        targets, dns = replica_targets(addr)
        return cls(targets, connect, dns=dns, connections=connections, **options)

    @classmethod
    def of_channel(cls, channel: grpc.aio.Channel) -> GeneratorReplicas:
        """One channel as the only replica (its own load balancing spreads the calls)."""
        return cls(["channel"], lambda _: channel)

    def pick(self, exclude: Sequence[Replica] = ()) -> Replica:
        """The usable replica with the fewest open streams (ties in turn); an unusable one only if no other.

        `exclude`: replicas tried already; no connection to their targets is picked while another
        target is left."""
        if not self.replicas:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details=f"no generator replica resolved for {self._dns}",
            )
        now = time.monotonic()
        # A target tried already is skipped whole: its other connections reach the same replica.
        tried = {r.target for r in exclude}
        fresh = [r for r in self.replicas if r.target not in tried] or self.replicas
        candidates = [r for r in fresh if r.usable(now)] or fresh
        n = len(self.replicas)
        self._turn += 1
        order = {r: (i - self._turn) % n for i, r in enumerate(self.replicas)}
        return min(candidates, key=lambda r: (r.outstanding, order[r]))

    def failed(self, replica: Replica) -> None:
        """UNAVAILABLE from `replica`: its target, every connection to it, cools down."""
        until = time.monotonic() + self._failure_cool_down_s
        for other in self.replicas:
            if other.target == replica.target:
                other.failed_until = until

    async def watch(self) -> None:
        """Follows each replica's health (and the DNS name's addresses) until cancelled."""
        try:
            while True:
                if self._dns is not None:
                    await self._resolve()
                for replica in self.replicas:
                    if replica not in self._watches:
                        self._watches[replica] = asyncio.ensure_future(_follow_health(replica))
                if self._dns is None:
                    await asyncio.Event().wait()  # fixed targets: nothing more to follow
                await asyncio.sleep(self._resolve_every_s)
        finally:
            for task in self._watches.values():
                task.cancel()
            await asyncio.gather(*self._watches.values(), return_exceptions=True)
            self._watches.clear()

    async def _resolve(self) -> None:
        assert self._dns is not None
        name, port = self._dns
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning(
                "cannot resolve the generator name %s: %s; keeping %d replicas", name, exc, len(self.replicas)
            )
            return
        targets = sorted({_host_port(str(info[4][0]), port) for info in infos})
        known: dict[str, list[Replica]] = {}
        for replica in self.replicas:
            known.setdefault(replica.target, []).append(replica)
        if set(targets) == set(known):
            return
        log.info("generator replicas for %s: %s", name, ", ".join(targets))
        for target, replicas in known.items():
            if target not in targets:
                for replica in replicas:
                    self._retired.append(replica)  # closed at the end: streams may still run on it
                    task = self._watches.pop(replica, None)
                    if task is not None:
                        task.cancel()
        self.replicas = [r for t in targets for r in (known.get(t) or self._open([t]))]

    async def close(self) -> None:
        for replica in [*self.replicas, *self._retired]:
            await replica.channel.close()


_GENERATOR_SERVICE = generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"].full_name


async def _follow_health(replica: Replica) -> None:
    """Keeps `replica.serving` in step with its readiness (a Watch stream, opened again when it ends)."""
    stub = health_pb2_grpc.HealthStub(replica.channel)
    request = health_pb2.HealthCheckRequest(service=_GENERATOR_SERVICE)
    async for attempt in AsyncRetrying(wait=wait_exponential(multiplier=0.2, max=5.0)):
        with attempt:
            try:
                async for reply in stub.Watch(request):
                    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                    if serving != replica.serving:
                        log.info(
                            "generator %s is %s", replica.target, "SERVING" if serving else "NOT_SERVING"
                        )
                    replica.serving = serving
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                    return  # no health service: judged by its calls alone
                replica.serving = False
                raise
            raise ConnectionError("the health watch ended")


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() is grpc.StatusCode.UNAVAILABLE


class _stop_at_deadline(stop_base):  # named like tenacity's own stops
    """Stops before a retry whose wait would end past the deadline."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        wait = retry_state.upcoming_sleep or 0.0
        return self.deadline is not None and time.monotonic() + wait >= self.deadline


class GeneratorClient:
    """`TilGenerator` over the generator replicas (or one channel, which balances by itself).

    A generation that fails with UNAVAILABLE before it streamed any text (the replica went away, or
    is draining) is tried again on another replica, within the call's deadline. Once text has been
    streamed, a failure ends the stream: a retry would repeat it.
    """

    def __init__(
        self, replicas: GeneratorReplicas | grpc.aio.Channel, *, retry: RetryPolicy | None = None
    ) -> None:
        self.replicas = (
            GeneratorReplicas.of_channel(replicas) if isinstance(replicas, grpc.aio.Channel) else replicas
        )
        self._info: generator_pb2.GetModelInfoResponse | None = None
        self._retry = retry or RetryPolicy()

    async def generate(
        self, request: generator_pb2.GenerateRequest, *, timeout: float | None
    ) -> AsyncGenerator[generator_pb2.GenerateResponse, None]:
        deadline = None if timeout is None else time.monotonic() + timeout
        started: generator_pb2.GenerateStarted | None = None  # the one the caller was given
        text_sent = False
        tried: list[Replica] = []
        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda exc: _retryable(exc) and not text_sent),
            stop=stop_any(stop_after_attempt(self._retry.attempts), _stop_at_deadline(deadline)),
            wait=wait_random_exponential(multiplier=self._retry.backoff_s, max=self._retry.max_backoff_s),
            before_sleep=lambda state: _log_retry(request, state, self._retry.attempts),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                replica = self.replicas.pick(exclude=tried)
                tried.append(replica)
                remaining = None if deadline is None else deadline - time.monotonic()
                call = replica.stub.Generate(request, timeout=remaining, metadata=sent_at.stamp())
                replica.outstanding += 1
                try:
                    async for response in call:
                        if response.HasField("started"):
                            if self._info is not None and response.started.model != self._info.model:
                                self._info = None  # the generator was redeployed with another model
                            if started is not None:
                                # A retry: the caller already has its started event, which must hold
                                # for this replica too (its model names the text, and the cache key).
                                if response.started.model != started.model:
                                    raise Unavailable(
                                        f"the generator replica that took this retry serves "
                                        f"{response.started.model!r}, not {started.model!r} as the stream "
                                        "began with (a redeploy in progress?); call again"
                                    )
                                continue
                            started = response.started
                        elif response.HasField("delta"):
                            text_sent = True
                        yield response
                    return
                except grpc.aio.AioRpcError as exc:
                    if exc.code() is grpc.StatusCode.UNAVAILABLE:
                        self.replicas.failed(replica)
                    raise
                finally:
                    replica.outstanding -= 1
                    # Our caller left (client gone, error, or early close): stop the generation too.
                    call.cancel()

    async def tokenize(
        self, request: generator_pb2.TokenizeRequest, *, timeout: float | None
    ) -> generator_pb2.TokenizeResponse:
        """Counts on a usable replica; UNAVAILABLE is tried again on another, as a generation is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        tried: list[Replica] = []
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_retryable),
            stop=stop_any(stop_after_attempt(self._retry.attempts), _stop_at_deadline(deadline)),
            wait=wait_random_exponential(multiplier=self._retry.backoff_s, max=self._retry.max_backoff_s),
            reraise=True,
        ):
            with attempt:
                replica = self.replicas.pick(exclude=tried)
                tried.append(replica)
                remaining = None if deadline is None else deadline - time.monotonic()
                try:
                    return await replica.stub.Tokenize(request, timeout=remaining)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() is grpc.StatusCode.UNAVAILABLE:
                        self.replicas.failed(replica)
                    raise
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def model_info(self, *, timeout: float | None = None) -> generator_pb2.GetModelInfoResponse:
        if self._info is None:
            stub = self.replicas.pick().stub
            self._info = await stub.GetModelInfo(generator_pb2.GetModelInfoRequest(), timeout=timeout)
        return self._info


def _log_retry(request: generator_pb2.GenerateRequest, state: RetryCallState, attempts: int) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    GENERATOR_RETRIES.inc()
    log.info(
        "generation %s: the generator is unavailable (%s); try %d of %d in %.0f ms",
        request.request_id,
        error.details() if isinstance(error, grpc.aio.AioRpcError) else error,
        state.attempt_number + 1,
        attempts,
        (state.upcoming_sleep or 0.0) * 1000,
    )


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

    async def get(self, document_id: str, *, owner: str, timeout: float) -> retriever_pb2.Document | None:
        request = retriever_pb2.GetDocumentRequest(id=document_id, owner=owner)
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

    async def get(self, namespace: str, key: str, *, timeout: float) -> CacheRead | None:
        try:
            response = await self._stub.GetEntry(
                cacher_pb2.GetEntryRequest(namespace=namespace, key=key), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _unavailable("cacher", exc) from exc
        if not response.found:
            return None
        # The cacher rounds the time left up to whole seconds (0: no expiry): one less is a bound that
        # never outlives the entry there.
        ttl = response.ttl_seconds
        return CacheRead(response.value_json, None if ttl == 0 else float(ttl - 1))

    async def put(self, namespace: str, key: str, value_json: str, *, ttl_s: int, timeout: float) -> None:
        request = cacher_pb2.PutEntryRequest(
            namespace=namespace, key=key, value_json=value_json, ttl_seconds=ttl_s
        )
        try:
            await self._stub.PutEntry(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _unavailable("cacher", exc) from exc
