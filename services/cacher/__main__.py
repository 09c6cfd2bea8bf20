"""`python -m services.cacher`: the cache service on Redis; with no CACHER_REDIS_URL, on a private redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from til.v1 import cacher_pb2, cacher_pb2_grpc

from services.cacher.config import CacherSettings
from services.cacher.embedded import EmbeddedRedis, EmbeddedRedisError
from services.cacher.servicer import CacherServicer
from services.cacher.store import CacheStore, RedisStore
from services.common.errors import Unavailable
from services.common.logs import configure_logging
from services.common.server import Service, serve
from services.common.settings import load_settings

log = logging.getLogger("services.cacher")

SERVICE_NAME = cacher_pb2.DESCRIPTOR.services_by_name["CacherService"].full_name


async def wait_for_redis(store: CacheStore, *, retry_every_s: float = 0.5) -> None:
    """Warm-up: returns once Redis answers PING, so the service turns SERVING only with a live cache."""
    failures = 0
    while True:
        try:
            await store.ping()
        except Unavailable as exc:
            if failures % 20 == 0:
                log.warning("waiting for redis: %s", exc.message)
            failures += 1
            await asyncio.sleep(retry_every_s)
        else:
            return


async def main() -> None:
    settings = load_settings(CacherSettings)
    configure_logging(settings.log_level, json_lines=settings.log_json)

    async with contextlib.AsyncExitStack() as cleanup:
        redis_url = settings.redis_url
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
        await serve(settings, [service], warmup=lambda: wait_for_redis(store))


if __name__ == "__main__":
    asyncio.run(main())
