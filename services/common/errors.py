"""Exceptions that carry a gRPC status code, and the one place that turns them into statuses."""

from __future__ import annotations

import grpc

# Trailing metadata with a RESOURCE_EXHAUSTED status: milliseconds the caller should wait before retrying.
RETRY_AFTER_KEY = "retry-after-ms"


class ServiceError(Exception):
    """An error with a gRPC status code; the message is shown to the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, trailing_metadata: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.trailing_metadata = trailing_metadata


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ServiceError):
    """Overload: the caller may retry after `retry_after_s` (sent as trailing metadata)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message, trailing_metadata=((RETRY_AFTER_KEY, str(int(retry_after_s * 1000))),))
        self.retry_after_s = retry_after_s


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status a handler that raised `exc` ends with: code, details and trailing metadata."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.message, exc.trailing_metadata
    if isinstance(exc, grpc.aio.AioRpcError):
        # A downstream call failed: pass its status on, so that e.g. INVALID_ARGUMENT from the
        # generator reaches the edge's caller as INVALID_ARGUMENT.
        code = exc.code()
        if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED):
            code = grpc.StatusCode.UNAVAILABLE
        # A retry hint from downstream (RESOURCE_EXHAUSTED) is the caller's hint too.
        trailers = tuple(
            (key, value)
            for key, value in exc.trailing_metadata() or ()
            if key == RETRY_AFTER_KEY and isinstance(value, str)
        )
        return code, exc.details() or code.name, trailers
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, str(exc) or "not implemented", ()
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", ()
    return grpc.StatusCode.INTERNAL, "internal error", ()
