"""Admission control: a bounded number of calls active and waiting, overall and per caller; beyond that,
refuse at once."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from prometheus_client import Counter, Gauge

from services.common.auth import caller_identity
from services.common.errors import ResourceExhausted

ADMISSION_ACTIVE = Gauge("tilserve_admission_active", "Calls admitted and running.", ["pool"])
ADMISSION_WAITING = Gauge("tilserve_admission_waiting", "Calls admitted and waiting for a slot.", ["pool"])
ADMISSION_REJECTED = Counter(
    "tilserve_admission_rejected_total", "Calls refused as overload.", ["pool", "limit"]
)


class Admission:
    """At most `max_active` calls run and `max_waiting` wait (FIFO); any more get RESOURCE_EXHAUSTED.

    With `max_per_client`, one caller (`caller_identity`: the bearer token's identity, else the peer's
    address) may have at most that many calls running or waiting, so one busy client cannot fill the
    queue for everyone.
    """

    def __init__(
        self,
        pool: str,
        *,
        max_active: int,
        max_waiting: int,
        retry_after_s: float = 1.0,
        max_per_client: int = 0,
    ) -> None:
        if max_active < 1 or max_waiting < 0 or max_per_client < 0:
            raise ValueError("max_active must be >= 1, max_waiting and max_per_client >= 0")
        self.pool = pool
        self.max_active = max_active
        self.max_waiting = max_waiting
        self.max_per_client = max_per_client
        self.retry_after_s = retry_after_s
        self._slots = asyncio.Semaphore(max_active)
        self._per_client: collections.Counter[str] = collections.Counter()
        self.active = 0
        self.waiting = 0
        self._active_gauge = ADMISSION_ACTIVE.labels(pool)  # bound once: labels() costs more than set()
        self._waiting_gauge = ADMISSION_WAITING.labels(pool)

    def _refuse(self, limit: str, message: str) -> ResourceExhausted:
        ADMISSION_REJECTED.labels(self.pool, limit).inc()
        return ResourceExhausted(message, retry_after_s=self.retry_after_s)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        client = caller_identity.get()
        if self.max_per_client and self._per_client[client] >= self.max_per_client:
            raise self._refuse(
                "client",
                f"caller {client!r} already has {self._per_client[client]} calls in progress on {self.pool}; "
                f"at most {self.max_per_client} per caller, retry later",
            )
        if self.active >= self.max_active and self.waiting >= self.max_waiting:
            raise self._refuse(
                "pool",
                f"{self.pool} is at capacity ({self.active} running, {self.waiting} waiting); retry later",
            )
        self._per_client[client] += 1
        try:
            self.waiting += 1
            self._waiting_gauge.set(self.waiting)
            try:
                await self._slots.acquire()
            finally:
                self.waiting -= 1
                self._waiting_gauge.set(self.waiting)
            self.active += 1
            self._active_gauge.set(self.active)
            try:
                yield
            finally:
                self.active -= 1
                self._active_gauge.set(self.active)
                self._slots.release()
        finally:
            self._per_client[client] -= 1
            if self._per_client[client] <= 0:
                del self._per_client[client]
