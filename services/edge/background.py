"""Best-effort work beside a stream (cache stores and index upserts after it, counting a chat format for
the prompt bound) that must neither delay nor fail it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from prometheus_client import Counter

from services.edge.clients import DependencyUnavailable

log = logging.getLogger(__name__)

BACKGROUND_WRITES = Counter(
    "tilserve_edge_background_writes_total",
    "Best-effort background work: cache stores and index upserts after a stream, chat format counts.",
    ["what", "result"],
)


class Background:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, what: str, write: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(self._run(what, write))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _run(what: str, write: Coroutine[Any, Any, object]) -> None:
        try:
            await write
        except DependencyUnavailable as exc:
            BACKGROUND_WRITES.labels(what, "unavailable").inc()
            log.warning("%s skipped: %s", what, exc)
        except Exception:
            BACKGROUND_WRITES.labels(what, "error").inc()
            log.exception("%s failed", what)
        else:
            BACKGROUND_WRITES.labels(what, "ok").inc()

    async def drain(self, timeout_s: float | None = None) -> None:
        """Waits for the writes under way (at shutdown, and in tests)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
