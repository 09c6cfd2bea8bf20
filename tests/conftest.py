"""Shared test helpers: real grpc.aio servers on 127.0.0.1:0 in the test's own process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest

from services.common.server import RunningServer, Service, start_server
from services.common.settings import ServerSettings


@contextlib.asynccontextmanager
async def in_process_server(
    services: Sequence[Service], settings: ServerSettings | None = None, *, serving: bool = True
) -> AsyncIterator[tuple[RunningServer, grpc.aio.Channel]]:
    """Starts `services` on a free loopback port and yields the server and a channel to it."""
    settings = settings or ServerSettings(host="127.0.0.1", port=0)
    running = await start_server(settings, services)
    if serving:
        await running.set_serving()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield running, channel
    finally:
        await channel.close()
        await running.stop(0)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
