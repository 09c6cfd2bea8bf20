"""Admission control: a bounded number of calls active and waiting, overall and per caller; beyond that,
refuse at once."""

from __future__ import annotations

import asyncio
import collections

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

    def slot(self) -> _Slot:
        """`async with admission.slot():` runs the block in a slot (waiting in line for one), or raises
        ResourceExhausted at once when the limits are reached."""
        return _Slot(self)


class _Slot:
    """One call's slot. A class rather than a generator-based context manager: it runs on every call."""

    __slots__ = ("_admission", "_client")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._client: str | None = None  # counted against max_per_client

    async def __aenter__(self) -> None:
        a = self._admission
        client = caller_identity.get()
        if a.max_per_client and a._per_client[client] >= a.max_per_client:
            raise a._refuse(
                "client",
                f"caller {client!r} already has {a._per_client[client]} calls in progress on {a.pool}; "
                f"at most {a.max_per_client} per caller, retry later",
            )
        if a.active >= a.max_active and a.waiting >= a.max_waiting:
            raise a._refuse(
                "pool", f"{a.pool} is at capacity ({a.active} running, {a.waiting} waiting); retry later"
            )
        if a.max_per_client:
            a._per_client[client] += 1
            self._client = client
        try:
            if a._slots.locked():  # every slot taken: wait in line (a free one is taken without waiting)
                a.waiting += 1
                a._waiting_gauge.set(a.waiting)
                try:
                    await a._slots.acquire()
                finally:
                    a.waiting -= 1
                    a._waiting_gauge.set(a.waiting)
            else:
                await a._slots.acquire()
        except BaseException:
            self._leave()
            raise
        a.active += 1
        a._active_gauge.set(a.active)

    async def __aexit__(self, *exc_info: object) -> None:
        a = self._admission
        a.active -= 1
        a._active_gauge.set(a.active)
        a._slots.release()
        self._leave()

    def _leave(self) -> None:
        client = self._client
        if client is not None:
            per_client = self._admission._per_client
            per_client[client] -= 1
            if per_client[client] <= 0:
                del per_client[client]
