"""Admission control: a bounded number of calls active and waiting; beyond that, refuse at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from prometheus_client import Counter, Gauge

from services.common.errors import ResourceExhausted

ADMISSION_ACTIVE = Gauge("tilserve_admission_active", "Calls admitted and running.", ["pool"])
ADMISSION_WAITING = Gauge("tilserve_admission_waiting", "Calls admitted and waiting for a slot.", ["pool"])
ADMISSION_REJECTED = Counter("tilserve_admission_rejected_total", "Calls refused as overload.", ["pool"])


class Admission:
    """At most `max_active` calls run and `max_waiting` wait (FIFO); any more get RESOURCE_EXHAUSTED."""

    def __init__(self, pool: str, *, max_active: int, max_waiting: int, retry_after_s: float = 1.0) -> None:
        if max_active < 1 or max_waiting < 0:
            raise ValueError("max_active must be >= 1 and max_waiting >= 0")
        self.pool = pool
        self.max_active = max_active
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self._slots = asyncio.Semaphore(max_active)
        self.active = 0
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.active >= self.max_active and self.waiting >= self.max_waiting:
            ADMISSION_REJECTED.labels(self.pool).inc()
            raise ResourceExhausted(
                f"{self.pool} is at capacity ({self.active} running, {self.waiting} waiting); retry later",
                retry_after_s=self.retry_after_s,
            )
        self.waiting += 1
        ADMISSION_WAITING.labels(self.pool).set(self.waiting)
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
            ADMISSION_WAITING.labels(self.pool).set(self.waiting)
        self.active += 1
        ADMISSION_ACTIVE.labels(self.pool).set(self.active)
        try:
            yield
        finally:
            self.active -= 1
            ADMISSION_ACTIVE.labels(self.pool).set(self.active)
            self._slots.release()
