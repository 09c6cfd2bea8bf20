"""til.v1.CacherService: validated get/put/delete of JSON values on a `CacheStore`."""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Iterator
from typing import NoReturn

import grpc
from prometheus_client import Counter, Histogram
from til.v1 import cacher_pb2, cacher_pb2_grpc

from services.cacher.config import CacherSettings
from services.cacher.store import CacheStore
from services.common.errors import InvalidArgument

HITS = Counter("tilserve_cacher_hits", "GetEntry calls that found an entry.")
MISSES = Counter("tilserve_cacher_misses", "GetEntry calls that found nothing.")
ERRORS = Counter("tilserve_cacher_errors", "Store calls that failed (Redis down, slow or refusing).", ["op"])
OP_SECONDS = Histogram(
    "tilserve_cacher_op_seconds", "Time of one store call, failed or not.", ["op"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)  # fmt: skip

# Namespaces never contain ':', so "<prefix>:<namespace>:<key>" names exactly one (namespace, key).
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)
_UINT32_MAX = 2**32 - 1


def validate_namespace(namespace: str) -> None:
    if not _NAMESPACE.fullmatch(namespace):
        shown = f"{namespace!r}" if namespace else "empty"
        raise InvalidArgument(
            f"namespace is {shown}: it must be 1-64 characters of letters, digits, '_', '.' and '-', "
            "starting with a letter or digit (e.g. 'til')"
        )


def validate_key(key: str, *, max_bytes: int) -> None:
    if not key:
        raise InvalidArgument("key is empty: use e.g. the hex SHA-256 of the canonical request")
    size = len(key.encode())
    if size > max_bytes:
        raise InvalidArgument(f"key is {size} bytes, over the limit of {max_bytes}: hash long keys")
    for position, char in enumerate(key):
        if char.isspace() or not char.isprintable():
            raise InvalidArgument(
                f"key has {char!r} at position {position}: whitespace and control characters are not allowed"
            )


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value")


def validate_value_json(value_json: str, *, max_bytes: int) -> None:
    size = len(value_json.encode())
    if size > max_bytes:
        raise InvalidArgument(f"value_json is {size} bytes, over the limit of {max_bytes}")
    try:
        json.loads(value_json, parse_constant=_reject_constant)
    except ValueError as exc:
        raise InvalidArgument(f"value_json is not a valid JSON document: {exc}") from None
    except RecursionError:
        raise InvalidArgument("value_json is nested too deeply") from None


def _ttl_seconds(expires_in_s: float | None) -> int:
    """Whole seconds left, rounded up so a live entry never reads as 0 ("does not expire")."""
    if expires_in_s is None:
        return 0
    return min(max(1, math.ceil(expires_in_s)), _UINT32_MAX)


class CacherServicer(cacher_pb2_grpc.CacherServiceServicer):
    """Checks every request, then reads or writes `store`; store failures surface as UNAVAILABLE."""

    def __init__(self, store: CacheStore, settings: CacherSettings) -> None:
        self._store = store
        self._default_ttl_s = settings.default_ttl_s
        self._max_ttl_s = settings.max_ttl_s
        self._max_key_bytes = settings.max_key_bytes
        self._max_value_bytes = settings.max_value_bytes

    async def GetEntry(
        self, request: cacher_pb2.GetEntryRequest, context: grpc.aio.ServicerContext
    ) -> cacher_pb2.GetEntryResponse:
        self._validate_address(request.namespace, request.key)
        with _measured("get"):
            entry = await self._store.get(request.namespace, request.key)
        if entry is None:
            MISSES.inc()
            return cacher_pb2.GetEntryResponse(found=False)
        HITS.inc()
        return cacher_pb2.GetEntryResponse(
            found=True, value_json=entry.value_json, ttl_seconds=_ttl_seconds(entry.expires_in_s)
        )

    async def PutEntry(
        self, request: cacher_pb2.PutEntryRequest, context: grpc.aio.ServicerContext
    ) -> cacher_pb2.PutEntryResponse:
        self._validate_address(request.namespace, request.key)
        validate_value_json(request.value_json, max_bytes=self._max_value_bytes)
        ttl_s = request.ttl_seconds if request.HasField("ttl_seconds") else self._default_ttl_s
        if ttl_s > self._max_ttl_s:
            raise InvalidArgument(f"ttl_seconds {ttl_s} is over the limit of {self._max_ttl_s}")
        with _measured("put"):
            await self._store.put(request.namespace, request.key, request.value_json, ttl_s)
        return cacher_pb2.PutEntryResponse()

    async def DeleteEntry(
        self, request: cacher_pb2.DeleteEntryRequest, context: grpc.aio.ServicerContext
    ) -> cacher_pb2.DeleteEntryResponse:
        self._validate_address(request.namespace, request.key)
        with _measured("delete"):
            deleted = await self._store.delete(request.namespace, request.key)
        return cacher_pb2.DeleteEntryResponse(deleted=deleted)

    def _validate_address(self, namespace: str, key: str) -> None:
        validate_namespace(namespace)
        validate_key(key, max_bytes=self._max_key_bytes)


@contextlib.contextmanager
def _measured(op: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    except Exception:
        ERRORS.labels(op).inc()
        raise
    finally:
        OP_SECONDS.labels(op).observe(time.perf_counter() - started)
