"""How the edge's servicer streams what a pipeline yields: a cache hit's replay goes out as it is from the
handler's own task (its events are all ready; a reading task would only cost), while a generation's
deltas are read by a task of their own and merged when they wait."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from til.v1 import common_pb2, edge_pb2

from services.common.admission import Admission
from services.edge.call import CallContext
from services.edge.servicer import EdgeServicer


class Writer:
    """A TilWriter whose stream is `started` with `cache_status`, `deltas` at once, then `finished`;
    it notes the task that read each event."""

    def __init__(self, cache_status: int, deltas: list[str]) -> None:
        self.cache_status = cache_status
        self.deltas = deltas
        self.tasks: list[asyncio.Task[Any] | None] = []

    def job(self, request: edge_pb2.GenerateTilRequest) -> edge_pb2.GenerateTilRequest:
        return request

    async def generate(self, job: Any, ctx: CallContext) -> AsyncIterator[Any]:
        self.tasks.append(asyncio.current_task())
        yield edge_pb2.StreamStarted(request_id=ctx.request_id, cache_status=self.cache_status)
        for text in self.deltas:
            self.tasks.append(asyncio.current_task())
            yield common_pb2.TextDelta(text=text, token_count=1)
        self.tasks.append(asyncio.current_task())
        yield edge_pb2.TilFinished(til_json="{}")


class Context:
    def time_remaining(self) -> None:
        return None

    def invocation_metadata(self) -> tuple[()]:
        return ()


async def stream(writer: Writer) -> list[tuple[str, str]]:
    servicer = EdgeServicer(writer, None, Admission("edge-hit-path", max_active=1, max_waiting=0))  # type: ignore[arg-type]
    out = []
    async for response in servicer.GenerateTil(edge_pb2.GenerateTilRequest(), Context()):  # type: ignore[arg-type]
        kind = response.WhichOneof("event")
        out.append((kind, response.delta.text if kind == "delta" else ""))
    return out


async def test_a_replay_goes_out_as_it_is_from_the_handlers_own_task() -> None:
    writer = Writer(edge_pb2.CACHE_STATUS_HIT, ["a", "b"])
    assert await stream(writer) == [("started", ""), ("delta", "a"), ("delta", "b"), ("finished", "")]
    assert writer.tasks == [asyncio.current_task()] * 4


async def test_a_generations_deltas_are_read_by_a_task_of_their_own_and_merged_when_they_wait() -> None:
    writer = Writer(edge_pb2.CACHE_STATUS_MISS, ["a", "b", "c"])
    assert await stream(writer) == [("started", ""), ("delta", "abc"), ("finished", "")]
    handler = asyncio.current_task()
    assert writer.tasks[0] is handler and all(task is not handler for task in writer.tasks[1:])
