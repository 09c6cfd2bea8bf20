"""Single flight: identical requests that miss the cache at the same time share one generation.

The first call that misses the cache starts a `Flight`: a task of its own searches for context, builds
the prompt and calls the generator. Every response is kept and handed to each listener, so a call that
joins late still receives the whole stream from the start. A listener that leaves (client gone,
deadline) leaves only itself; when the last one leaves, the generation is cancelled, and with it the
generator call and the engine's request. A flight is found by its key only while it runs, so a
finished or abandoned one is never joined; the first listener to finish stores the result.

A flight runs under the deadline of the call that started it. A later call joins only if its own
deadline is no more than `slack_s` later (or the flight has none): it could otherwise see the shared
generation stopped by someone else's deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from prometheus_client import Counter
from til.v1 import edge_pb2, generator_pb2

from services.common.errors import ServiceError, status_of
from services.common.streams import aclose
from services.edge.retrieval import Retrieval

FLIGHTS = Counter(
    "tilserve_edge_shared_generations_total",
    "Calls by whether they started a generation or joined an identical one in progress.",
    ["role"],
)

Generate = Callable[[generator_pb2.GenerateRequest], AsyncIterator[generator_pb2.GenerateResponse]]

JOINED_NOTICE = "an identical request was already being generated: this stream shares its output"


@dataclass(frozen=True)
class Plan:
    """What the generation was started with, for the `started` message and the checks of every listener."""

    request: generator_pb2.GenerateRequest
    retrieval: Retrieval = field(default_factory=Retrieval)
    sources: tuple[edge_pb2.Source, ...] = ()
    notices: tuple[str, ...] = ()


Prepare = Callable[[], Awaitable[Plan]]


class Flight:
    """One shared generation: its plan (once made), responses so far, how it ended, and who listens."""

    def __init__(self, key: str, deadline: float | None, cache_status: int, registry: SingleFlight) -> None:
        self.key = key
        self.plan: Plan | None = None
        self.deadline = deadline
        # What the first call's cache look-up found (a miss, or the cache unavailable).
        self.cache_status = cache_status
        self.responses: list[generator_pb2.GenerateResponse] = []
        self.done = False
        self.error: BaseException | None = None
        self.listeners = 0
        self._registry = registry
        self._changed = asyncio.Event()
        self._writer_claimed = False
        self._task: asyncio.Task[None] | None = None

    def run(self, prepare: Prepare, generate: Generate, cleanup: Callable[[], None] | None) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(prepare, generate))
        if cleanup is not None:
            # Also when the task is cancelled before it ever ran.
            self._task.add_done_callback(lambda _: cleanup())

    async def _run(self, prepare: Prepare, generate: Generate) -> None:
        stream: AsyncIterator[generator_pb2.GenerateResponse] | None = None
        try:
            self.plan = await prepare()
            stream = generate(self.plan.request)
            async for response in stream:
                self.responses.append(response)
                self._notify()
        except asyncio.CancelledError:
            self.error = asyncio.CancelledError()
            raise
        except Exception as exc:  # handed to every listener as its status
            self.error = exc
        finally:
            await aclose(stream)
            self.done = True
            self._registry.forget(self)
            self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def changed(self) -> None:
        """Returns once a response arrives or the flight ends."""
        await self._changed.wait()

    def claim_writes(self) -> bool:
        """True once: for the listener that stores and indexes the shared result."""
        if self._writer_claimed:
            return False
        self._writer_claimed = True
        return True

    def _leave(self) -> None:
        self.listeners -= 1
        if self.listeners == 0 and not self.done and self._task is not None:
            # Nobody wants the result any more: stop the generation (the generator call is cancelled).
            self._registry.forget(self)
            self._task.cancel()


class Listener:
    """Iterates a flight's responses from the first one, waiting for those still to come. Counted
    as listening from its creation until it is closed (`aclose`) or has seen the end."""

    def __init__(self, flight: Flight) -> None:
        self.flight = flight
        self._next = 0
        self._closed = False
        flight.listeners += 1

    def __aiter__(self) -> Listener:
        return self

    async def __anext__(self) -> generator_pb2.GenerateResponse:
        flight = self.flight
        while not self._closed:
            if self._next < len(flight.responses):
                self._next += 1
                return flight.responses[self._next - 1]
            if flight.done:
                self._close()
                if flight.error is not None:
                    raise _for_listener(flight.error)
                break
            await flight.changed()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self.flight._leave()


def _for_listener(exc: BaseException) -> ServiceError:
    """A fresh exception with the status `exc` maps to (one exception object is not raised twice)."""
    code, details, trailers = status_of(exc)
    if isinstance(exc, asyncio.CancelledError):
        code, details = grpc.StatusCode.UNAVAILABLE, "the shared generation was cancelled"
    error = ServiceError(details, trailing_metadata=trailers)
    error.code = code
    return error


class SingleFlight:
    """The flights in progress, by key."""

    def __init__(self, *, slack_s: float) -> None:
        self.slack_s = slack_s
        self._flights: dict[str, Flight] = {}

    def join(self, key: str, deadline: float | None) -> Listener | None:
        """A listener of the flight in progress for `key`, if a call with `deadline` may share it."""
        flight = self._flights.get(key)
        if flight is None:
            return None
        if flight.deadline is not None and (deadline is None or deadline > flight.deadline + self.slack_s):
            return None
        FLIGHTS.labels("joined").inc()
        return Listener(flight)

    def start(
        self,
        key: str,
        deadline: float | None,
        prepare: Prepare,
        generate: Generate,
        *,
        cache_status: int = edge_pb2.CACHE_STATUS_MISS,
        cleanup: Callable[[], None] | None = None,
    ) -> Listener:
        """Starts a flight for `key` and returns its first listener.

        The flight first awaits `prepare()` (context search and prompt), then streams
        `generate(plan.request)`, then calls `cleanup()`. It is joinable from now on, so calls that
        miss the cache while the first one prepares join it instead of starting their own."""
        flight = Flight(key, deadline, cache_status, self)
        listener = Listener(flight)
        self._flights[key] = flight
        flight.run(prepare, generate, cleanup)
        FLIGHTS.labels("started").inc()
        return listener

    def forget(self, flight: Flight) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    def __len__(self) -> int:
        return len(self._flights)
