"""Where cached values live: the `CacheStore` Protocol the servicer needs, and `RedisStore`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from services.common.errors import Unavailable


@dataclass(frozen=True)
class CacheEntry:
    value_json: str
    expires_in_s: float | None
    """Seconds until the entry expires; None when it has no expiry."""


class CacheStore(Protocol):
    """A namespaced key-value store with expiry. Every method raises `Unavailable` when the backend is down."""

    async def get(self, namespace: str, key: str) -> CacheEntry | None: ...

    async def put(self, namespace: str, key: str, value_json: str, ttl_s: int) -> None:
        """Stores `value_json`, replacing any earlier value; `ttl_s` 0 means no expiry."""
        ...

    async def delete(self, namespace: str, key: str) -> bool:
        """Removes the entry; True when there was one."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def describe_redis_url(url: str) -> str:
    """The URL's host:port/db or socket path, without credentials (safe for logs and error details)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    where = f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
    return f"{where}{parts.path}" if parts.path not in ("", "/") else where


class RedisStore:
    """A `CacheStore` on Redis: keys `<prefix>:<namespace>:<key>`, expiry with SET EX.

    Every Redis call times out after the pool's socket timeout, and a failure surfaces as `Unavailable`
    at once (no backoff), so callers can treat the cache as a miss. Connections broken by a Redis
    restart are dropped and reopened by the pool, so the store recovers by itself when Redis returns.
    """

    def __init__(self, client: Redis, *, key_prefix: str, where: str) -> None:
        self._client = client
        self._prefix = key_prefix
        self._where = where

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        key_prefix: str,
        op_timeout_s: float,
        connect_timeout_s: float,
        max_connections: int,
    ) -> RedisStore:
        """A store for `url`; it connects lazily, on the first call."""
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=op_timeout_s,  # waiting for a free pooled connection
            socket_timeout=op_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            # No retries: a failure costs at most one timeout. Pooled connections that a Redis restart
            # broke need none either, as the pool checks each one and reconnects before handing it out.
            retry=Retry(NoBackoff(), 0),
        )
        return cls(Redis.from_pool(pool), key_prefix=key_prefix, where=describe_redis_url(url))

    def redis_key(self, namespace: str, key: str) -> str:
        return f"{self._prefix}:{namespace}:{key}"

    async def get(self, namespace: str, key: str) -> CacheEntry | None:
        name = self.redis_key(namespace, key)
        with self._unavailable_on_error("read"):
            # GET and PTTL in one MULTI/EXEC round trip, so the TTL belongs to the value read.
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.get(name)
                pipe.pttl(name)
                value, pttl_ms = await pipe.execute()
        if value is None:
            return None
        return CacheEntry(value.decode(), pttl_ms / 1000 if pttl_ms >= 0 else None)

    async def put(self, namespace: str, key: str, value_json: str, ttl_s: int) -> None:
        with self._unavailable_on_error("write"):
            await self._client.set(self.redis_key(namespace, key), value_json, ex=ttl_s or None)

    async def delete(self, namespace: str, key: str) -> bool:
        with self._unavailable_on_error("delete"):
            return bool(await self._client.delete(self.redis_key(namespace, key)))

    async def ping(self) -> None:
        with self._unavailable_on_error("ping"):
            await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()

    @contextlib.contextmanager
    def _unavailable_on_error(self, op: str) -> Iterator[None]:
        try:
            yield
        except redis_errors.TimeoutError as exc:
            raise Unavailable(
                f"cache {op} failed: redis at {self._where} did not answer in time ({exc})"
            ) from exc
        except (redis_errors.ConnectionError, OSError) as exc:
            raise Unavailable(f"cache {op} failed: redis at {self._where} is unreachable ({exc})") from exc
        except redis_errors.RedisError as exc:
            raise Unavailable(f"cache {op} failed: redis at {self._where} refused it ({exc})") from exc
