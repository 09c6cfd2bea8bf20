"""`python -m services.cacher`: the cache service on Redis; with no CACHER_REDIS_URL, on a private redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_fixed
from til.v1 import cacher_pb2, cacher_pb2_grpc

from services.cacher.config import CacherSettings
from services.cacher.embedded import EmbeddedRedis, EmbeddedRedisError
from services.cacher.servicer import CacherServicer
from services.cacher.store import CacheStore, RedisStore
from services.common.errors import Unavailable
from services.common.logs import configure_logging
from services.common.server import RunningServer, Service, serve
from services.common.settings import load_settings

log = logging.getLogger("services.cacher")

SERVICE_NAME = cacher_pb2.DESCRIPTOR.services_by_name["CacherService"].full_name


def _log_waiting(state: RetryCallState) -> None:
    if state.attempt_number % 20 == 1 and state.outcome is not None:
        log.warning("waiting for redis: %s", state.outcome.exception())


async def wait_for_redis(store: CacheStore, *, retry_every_s: float = 0.5) -> None:
    """Warm-up: returns once Redis answers PING, so the service turns SERVING only with a live cache."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(Unavailable), wait=wait_fixed(retry_every_s), before_sleep=_log_waiting
    ):
        with attempt:
            await store.ping()


async def watch_redis(store: CacheStore, running: RunningServer, *, every_s: float = 1.0) -> None:
    """Readiness follows a Redis given by URL: NOT_SERVING while it does not answer PING, SERVING again
    when it does (the store's pool reconnects by itself)."""
    up = True
    while True:
        await asyncio.sleep(every_s)
        try:
            await store.ping()
        except Unavailable as exc:
            if up:
                log.error("redis went away (%s); NOT_SERVING until it answers again", exc.message)
                await running.set_not_serving()
            up = False
        else:
            if not up:
                log.warning("redis answers again; SERVING")
                await running.set_serving()
            up = True


async def main() -> None:
    settings = load_settings(CacherSettings)
    configure_logging(settings.log_level, json_lines=settings.log_json)

    async with contextlib.AsyncExitStack() as cleanup:
        redis_url = settings.redis_url
        embedded: EmbeddedRedis | None = None
        if not redis_url:
            # Started before the gRPC server exists, so the fork happens while the process has few threads.
            embedded = EmbeddedRedis(
                server_bin=settings.redis_server_bin,
                directory=settings.embedded_dir or None,
                maxmemory=settings.embedded_maxmemory,
                start_timeout_s=settings.embedded_start_timeout_s,
            )
            try:
                await embedded.start()
            except EmbeddedRedisError as exc:
                raise SystemExit(str(exc)) from None
            cleanup.push_async_callback(embedded.close)
            redis_url = embedded.url

        store = RedisStore.from_url(
            redis_url,
            key_prefix=settings.key_prefix,
            op_timeout_s=settings.op_timeout_s,
            connect_timeout_s=settings.connect_timeout_s,
            max_connections=settings.max_connections,
        )
        cleanup.push_async_callback(store.close)
        servicer = CacherServicer(store, settings)
        service = Service(
            SERVICE_NAME, lambda server: cacher_pb2_grpc.add_CacherServiceServicer_to_server(servicer, server)
        )
        monitor: Callable[[RunningServer], Awaitable[None]]
        if embedded is not None:
            private = embedded
            monitor = lambda running: private.supervise(running.set_not_serving, running.set_serving)  # noqa: E731
        else:
            monitor = lambda running: watch_redis(store, running)  # noqa: E731
        await serve(settings, [service], warmup=lambda: wait_for_redis(store), monitor=monitor)


if __name__ == "__main__":
    asyncio.run(main())
