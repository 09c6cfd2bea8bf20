"""Admission.slot on every path a call can take: granted at once, waiting, refused, cancelled while
waiting, cancelled right after a slot was handed to it, cancelled while running; the counts, the
per-caller counts and the gauges always come back to what they were."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from services.common.admission import Admission
from services.common.auth import caller_identity
from services.common.errors import ResourceExhausted


def gauges(pool: str) -> tuple[float | None, float | None]:
    return (
        REGISTRY.get_sample_value("tilserve_admission_active", {"pool": pool}),
        REGISTRY.get_sample_value("tilserve_admission_waiting", {"pool": pool}),
    )


def refused(pool: str, limit: str) -> float:
    return (
        REGISTRY.get_sample_value("tilserve_admission_rejected_total", {"pool": pool, "limit": limit}) or 0.0
    )


def idle(admission: Admission) -> None:
    """Nothing running or waiting, every slot free, no caller counted."""
    assert (admission.active, admission.waiting) == (0, 0)
    assert gauges(admission.pool) == (0.0, 0.0)
    assert not admission._per_client
    assert admission._slots._value == admission.max_active and not admission._slots.locked()


class Held:
    """A call that holds its slot until released."""

    def __init__(self, admission: Admission, who: str = "") -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

        async def run() -> None:
            if who:
                caller_identity.set(who)
            async with admission.slot():
                self.entered.set()
                await self.release.wait()

        self.task = asyncio.ensure_future(run())


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def finish(*calls: Held) -> None:
    for call in calls:
        call.release.set()
    await asyncio.gather(*(call.task for call in calls), return_exceptions=True)


async def test_a_waiter_cancelled_while_waiting_leaves_no_trace() -> None:
    admission = Admission("adm-cancel-waiting", max_active=1, max_waiting=2, max_per_client=3)
    running = Held(admission, "a")
    await running.entered.wait()
    waiter = Held(admission, "a")
    await settle()
    assert (admission.active, admission.waiting) == (1, 1) and gauges(admission.pool) == (1.0, 1.0)
    assert admission._per_client["a"] == 2
    waiter.task.cancel()
    await settle()
    assert waiter.task.cancelled() and not waiter.entered.is_set()
    assert (admission.active, admission.waiting) == (1, 0) and gauges(admission.pool) == (1.0, 0.0)
    assert admission._per_client["a"] == 1
    after = Held(admission, "a")  # the slot freed next goes to the next waiter
    await settle()
    running.release.set()
    await after.entered.wait()
    await finish(running, after)
    idle(admission)


async def test_a_waiter_cancelled_right_after_it_was_handed_a_slot_passes_it_on() -> None:
    admission = Admission("adm-cancel-granted", max_active=1, max_waiting=2, max_per_client=3)
    caller_identity.set("a")
    async with admission.slot():
        granted, next_in_line = Held(admission, "a"), Held(admission, "b")
        await settle()
        assert admission.waiting == 2
    # The slot was handed to `granted` on the way out, and it has not run since: cancelled now.
    assert admission._slots._waiters and admission._slots._waiters[0].done()  # handed, not yet taken
    granted.task.cancel()
    await next_in_line.entered.wait()
    assert granted.task.cancelled() and not granted.entered.is_set()
    assert (admission.active, admission.waiting) == (1, 0) and gauges(admission.pool) == (1.0, 0.0)
    assert dict(admission._per_client) == {"b": 1}
    await finish(next_in_line)
    idle(admission)


async def test_a_call_cancelled_while_running_frees_its_slot() -> None:
    admission = Admission("adm-cancel-running", max_active=1, max_waiting=1, max_per_client=1)
    running, waiter = Held(admission, "a"), Held(admission, "b")
    await running.entered.wait()
    await settle()
    running.task.cancel()
    await waiter.entered.wait()
    assert running.task.cancelled()
    assert (admission.active, admission.waiting) == (1, 0) and dict(admission._per_client) == {"b": 1}
    await finish(waiter)
    idle(admission)


@pytest.mark.parametrize("max_per_client", [0, 1])
async def test_refusals_are_counted_by_limit_and_leave_no_trace(max_per_client: int) -> None:
    pool = f"adm-refusals-{max_per_client}"
    admission = Admission(pool, max_active=1, max_waiting=1, max_per_client=max_per_client)
    running = Held(admission, "a")
    await running.entered.wait()
    waiter = Held(admission, "b")
    await settle()

    async def call(who: str) -> None:
        caller_identity.set(who)
        async with admission.slot():
            raise AssertionError("admitted")

    pool_before, client_before = refused(pool, "pool"), refused(pool, "client")
    with pytest.raises(ResourceExhausted, match="at capacity"):
        await call("c")
    with pytest.raises(ResourceExhausted, match="per caller" if max_per_client else "at capacity"):
        await call("a")
    assert refused(pool, "pool") - pool_before == (1 if max_per_client else 2)
    assert refused(pool, "client") - client_before == (1 if max_per_client else 0)
    assert (admission.active, admission.waiting) == (1, 1) and gauges(pool) == (1.0, 1.0)
    if max_per_client:
        assert dict(admission._per_client) == {"a": 1, "b": 1}
    await finish(running, waiter)
    idle(admission)


async def test_an_error_in_the_block_propagates_and_frees_the_slot() -> None:
    admission = Admission("adm-error", max_active=1, max_waiting=0, max_per_client=1)
    caller_identity.set("a")
    with pytest.raises(KeyError):
        async with admission.slot():
            assert (admission.active, admission._per_client["a"]) == (1, 1)
            raise KeyError("x")
    idle(admission)


@pytest.mark.parametrize("cancel_at", [0, 1, 2, 3])
async def test_many_calls_cancelled_at_random_points_leave_the_pool_idle(cancel_at: int) -> None:
    admission = Admission(f"adm-storm-{cancel_at}", max_active=2, max_waiting=8, max_per_client=4)
    calls = [Held(admission, f"c{i % 3}") for i in range(8)]
    for i, call in enumerate(calls):
        if i % 4 == cancel_at:
            call.task.cancel()
        await settle()
        calls[(i + cancel_at) % len(calls)].release.set()
    await finish(*calls)
    idle(admission)
