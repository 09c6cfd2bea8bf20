"""One server interceptor that every service installs: safe request decoding, status mapping, metrics.

It wraps unary and server-streaming handlers alike (the latter are async generators), so a handler
only raises `ServiceError`s and never touches status codes itself.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Gauge, Histogram

from services.common.auth import OPEN_METHOD_PREFIXES, BearerTokenAuth, caller_identity, peer_identity
from services.common.errors import InvalidArgument, status_of

log = logging.getLogger(__name__)

RPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
RPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from an RPC's arrival until its status was sent.",
    ["grpc_service", "grpc_method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
RPC_IN_FLIGHT = Gauge("grpc_server_in_flight", "RPCs being handled now.", ["grpc_service", "grpc_method"])
STREAM_MESSAGES_SENT = Counter(
    "grpc_server_msg_sent_total", "Stream messages sent.", ["grpc_service", "grpc_method"]
)


class MalformedRequest:
    """Stands in for a request whose bytes did not decode, so the handler can answer INVALID_ARGUMENT."""

    def __init__(self, type_name: str, reason: str) -> None:
        self.message = (
            f"request is not a valid {type_name}: {reason}. "
            "Check that string fields hold UTF-8 text and the message matches the til.v1 protos."
        )


def _safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None
    type_name = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = type_name.full_name if type_name is not None else "message"

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, or a string field with invalid UTF-8
            return MalformedRequest(name, str(exc) or type(exc).__name__)

    return decode


# Status details travel percent-encoded in the grpc-message trailer (up to 9 bytes a character), and a
# client starts dropping trailers past 8 KiB (its soft metadata limit), which turns the status into
# RESOURCE_EXHAUSTED: details that quote a large input are cut to fit well within that.
MAX_DETAILS_BYTES = 4096


def fit_details(details: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """`details`, cut (with an ellipsis) so that its percent-encoded form takes at most `limit` bytes."""
    size = 0
    for i, char in enumerate(details):
        size += sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in char.encode("utf-8", "replace"))
        if size > limit - 9:  # room for the ellipsis
            return details[:i] + "…"
    return details


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    code, details, trailers = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("unhandled error in %s", method, exc_info=exc)
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(code, fit_details(details))


class _MethodMetrics:
    """One method's metric children, looked up once: `labels()` on every call costs more than the
    counting itself. Children are made when first used, so no series appears before its first call."""

    def __init__(self, method: str) -> None:
        service, _, name = method.lstrip("/").rpartition("/")
        self.labels = (service, name)
        self.in_flight = RPC_IN_FLIGHT.labels(service, name)
        self.seconds = RPC_SECONDS.labels(service, name)
        self._sent: Counter | None = None
        self._handled: dict[grpc.StatusCode, Counter] = {}

    @property
    def sent(self) -> Counter:
        if self._sent is None:
            self._sent = STREAM_MESSAGES_SENT.labels(*self.labels)
        return self._sent

    def handled(self, code: grpc.StatusCode) -> Counter:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = RPC_HANDLED.labels(*self.labels, code.name)
        return child


class _Handling:
    """One RPC however its handler answers: identity, decoding errors, status mapping, metrics.

    A class rather than a generator-based context manager: it runs on every call."""

    __slots__ = ("_context", "_interceptor", "_method", "_metrics", "_request", "_started")

    def __init__(
        self,
        interceptor: ServiceInterceptor,
        method: str,
        metrics: _MethodMetrics,
        request: Any,
        context: grpc.aio.ServicerContext,
    ) -> None:
        self._interceptor = interceptor
        self._method = method
        self._metrics = metrics
        self._request = request
        self._context = context

    async def __aenter__(self) -> None:
        self._started = time.perf_counter()
        self._metrics.in_flight.inc()
        try:
            self._interceptor._identify(self._method, self._context)
            if isinstance(self._request, MalformedRequest):
                raise InvalidArgument(self._request.message)
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        code = grpc.StatusCode.OK
        try:
            if isinstance(exc, asyncio.CancelledError):
                code = grpc.StatusCode.CANCELLED
            elif isinstance(exc, grpc.aio.AbortError):
                code = self._context.code() or grpc.StatusCode.UNKNOWN
            elif isinstance(exc, Exception):
                code = status_of(exc)[0]
                await _abort_for(exc, self._context, self._method)  # raises AbortError
        finally:
            metrics = self._metrics
            metrics.in_flight.dec()
            metrics.handled(code).inc()
            metrics.seconds.observe(time.perf_counter() - self._started)
        return False


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Decodes requests safely, authenticates, maps exceptions to statuses, and counts every RPC.

    gRPC asks it for every call; the wrapped handler of each method is made once and reused."""

    def __init__(self, auth: BearerTokenAuth | None = None) -> None:
        self._auth = auth
        # method -> (the handler gRPC resolved, its wrapped form)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def _identify(self, method: str, context: grpc.aio.ServicerContext) -> None:
        if self._auth is None or method.startswith(OPEN_METHOD_PREFIXES):
            caller_identity.set(peer_identity(context.peer() or ""))
        else:
            caller_identity.set(self._auth.identify(context.invocation_metadata() or ()))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method: str = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        metrics = _MethodMetrics(method)
        options = {
            "request_deserializer": _safe_deserializer(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if not handler.response_streaming:
            inner_unary = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with _Handling(self, method, metrics, request, context):
                    return await inner_unary(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, **options)

        inner_stream = handler.unary_stream
        if not inspect.isasyncgenfunction(inner_stream):
            # A handler that writes its messages itself (context.write), as the health service's Watch.

            async def written(request: Any, context: grpc.aio.ServicerContext) -> None:
                async with _Handling(self, method, metrics, request, context):
                    await inner_stream(request, context)

            return grpc.unary_stream_rpc_method_handler(written, **options)

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with _Handling(self, method, metrics, request, context):
                sent = metrics.sent
                responses = inner_stream(request, context)
                # Closed on the way out however the call ends: a cancellation that lands while a
                # message is being sent must still reach the handler (and stop its work) at once.
                try:
                    async for response in responses:
                        sent.inc()
                        yield response
                finally:
                    await responses.aclose()

        return grpc.unary_stream_rpc_method_handler(stream, **options)
