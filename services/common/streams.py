"""Async streams: closing them when they may or may not be closable, and merging items that wait."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T", bound=AsyncIterator[Any])
T_co = TypeVar("T_co")


async def aclose(stream: object) -> None:
    """Closes `stream` now if it can be closed (`aclose()`), so its work stops at once rather than
    whenever it is garbage-collected; does nothing for a plain iterator."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


class _Closing(Generic[T]):
    __slots__ = ("_stream",)

    def __init__(self, stream: T) -> None:
        self._stream = stream

    async def __aenter__(self) -> T:
        return self._stream

    async def __aexit__(self, *exc_info: object) -> None:
        await aclose(self._stream)


def closing(stream: T) -> _Closing[T]:
    """`async with closing(stream):` closes it on the way out, however the block ends. (A class, not
    a generator-based context manager: it runs on every call.)"""
    return _Closing(stream)


async def coalesced(
    source: AsyncIterator[T_co],
    *,
    mergeable: Callable[[T_co], bool],
    merge: Callable[[list[T_co]], T_co],
    interval_s: float = 0.0,
    pending: Iterable[T_co] = (),
) -> AsyncIterator[T_co]:
    """`source`'s items, with runs of mergeable items that are already waiting merged into one.

    `source` is read in a task of its own, so items pile up while the consumer is busy (sending the
    previous message); each time the consumer asks, every mergeable item waiting is merged. With
    `interval_s`, a mergeable item waits until `interval_s` after the previous merged one was handed out
    (gathering more meanwhile); the first is never held back, nor is any other item. Errors of `source`
    come after the items before them; closing this closes `source` (its task is cancelled). `pending`:
    items already read from `source`, handed out first.
    """
    waiting: collections.deque[T_co] = collections.deque(pending)
    arrived = asyncio.Event()
    ended = False
    error: BaseException | None = None

    async def pump() -> None:
        nonlocal ended, error
        try:
            async for item in source:
                waiting.append(item)
                arrived.set()
        except Exception as exc:
            error = exc
        finally:
            ended = True
            arrived.set()
            await aclose(source)

    pumping = asyncio.ensure_future(pump())
    last: float | None = None
    try:
        while True:
            if not waiting:
                if ended:
                    break
                arrived.clear()
                await arrived.wait()
                continue
            item = waiting.popleft()
            if not mergeable(item):
                yield item
                continue
            if interval_s and last is not None and (pause := last + interval_s - time.monotonic()) > 0:
                await asyncio.sleep(pause)
            batch = [item]
            while waiting and mergeable(waiting[0]):
                batch.append(waiting.popleft())
            last = time.monotonic()
            yield merge(batch) if len(batch) > 1 else item
        if error is not None:
            raise error
    finally:
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumping
