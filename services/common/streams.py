"""Closing async streams that may or may not be closable (async generators are; some iterators are not)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeVar

T = TypeVar("T", bound=AsyncIterator[Any])


async def aclose(stream: object) -> None:
    """Closes `stream` now if it can be closed (`aclose()`), so its work stops at once rather than
    whenever it is garbage-collected; does nothing for a plain iterator."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


@contextlib.asynccontextmanager
async def closing(stream: T) -> AsyncIterator[T]:
    """`async with closing(stream):` closes it on the way out, however the block ends."""
    try:
        yield stream
    finally:
        await aclose(stream)
