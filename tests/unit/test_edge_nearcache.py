"""The edge's near cache: bounds of the cache itself, and through the edge over real gRPC that it serves
only what the cacher holds (same key, so per owner; not past the cacher's expiry or its own max age;
replaced by a REFRESH; never a result the cacher did not store)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from til.v1 import edge_pb2

from services.edge.nearcache import NearCache
from tests.unit.test_edge_service import GOOD_TIL, chunks, edge_stack, split, til_request


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def near(**bounds: Any) -> tuple[NearCache[str], Clock]:
    clock = Clock()
    settings = {"max_entries": 3, "max_bytes": 100, "max_age_s": 2.0, **bounds}
    return NearCache(clock=clock, **settings), clock


def test_an_entry_lives_until_its_max_age_or_the_cachers_expiry_whichever_is_first() -> None:
    cache, clock = near()
    cache.put("til", "a", "A", size=1, expires_in_s=None)  # no expiry at the cacher: the max age
    cache.put("til", "b", "B", size=1, expires_in_s=0.5)
    clock.now += 0.4
    assert (cache.get("til", "a"), cache.get("til", "b")) == ("A", "B")
    clock.now += 0.2
    assert (cache.get("til", "a"), cache.get("til", "b")) == ("A", None)
    clock.now += 1.4
    assert cache.get("til", "a") is None and len(cache) == 0 and cache.bytes == 0


def test_entries_and_bytes_are_bounded_least_recently_used_out() -> None:
    cache, _ = near()
    for key in "abc":
        cache.put("til", key, key.upper(), size=10, expires_in_s=None)
    assert cache.get("til", "a") == "A"  # now b is the least recently used
    cache.put("til", "d", "D", size=10, expires_in_s=None)
    assert [cache.get("til", k) for k in "abcd"] == ["A", None, "C", "D"]
    cache.put("til", "e", "E", size=85, expires_in_s=None)  # 105 bytes: the oldest go until it fits
    assert len(cache) <= 3 and cache.bytes <= 100 and cache.get("til", "e") == "E"
    cache.put("til", "f", "F", size=101, expires_in_s=None)  # larger than the whole cache: not kept
    assert cache.get("til", "f") is None and cache.bytes <= 100


def test_namespaces_keys_and_replacement_are_apart_and_zero_keeps_nothing() -> None:
    cache, _ = near()
    cache.put("til", "k", "TIL", size=1, expires_in_s=None)
    cache.put("questions", "k", "Q", size=1, expires_in_s=None)
    assert (cache.get("til", "k"), cache.get("questions", "k")) == ("TIL", "Q")
    cache.put("til", "k", "TIL2", size=1, expires_in_s=None)
    assert cache.get("til", "k") == "TIL2" and cache.bytes == 2
    cache.discard("til", "k")
    assert cache.get("til", "k") is None
    cache.put("til", "x", "X", size=1, expires_in_s=0)  # expired at the cacher already
    assert cache.get("til", "x") is None
    off, _ = near(max_entries=0)
    off.put("til", "k", "V", size=1, expires_in_s=None)
    assert not off.enabled and off.get("til", "k") is None


async def test_a_repeated_request_is_answered_without_the_cacher_and_exactly_as_a_cacher_hit() -> None:
    async with edge_stack(near_cache_entries=16) as stack:
        first = split(await stack.til(til_request()))
        await stack.settle()
        started, deltas, finished = split(await stack.til(til_request()))
        again = split(await stack.til(til_request()))
    assert len(stack.generator.requests) == 1 and len(stack.cacher.puts) == 1
    assert len(stack.cacher.gets) == 1  # only the first call (a miss) asked the cacher
    assert started.cache_status == again[0].cache_status == edge_pb2.CACHE_STATUS_HIT
    assert started.model == "fake-model" and started.retrieval_status == edge_pb2.RETRIEVAL_STATUS_SKIPPED
    assert "".join(d.text for d in deltas) == finished.til_json == first[2].til_json
    assert finished.til == first[2].til and finished.til_id == first[2].til_id
    assert finished.usage.completion_tokens == first[2].usage.completion_tokens
    assert finished.timings.total_ms > 0 and again[2].til_json == finished.til_json
    assert list(finished.violations) == []


async def test_a_cacher_hit_fills_it_and_another_owner_never_sees_it() -> None:
    async with edge_stack(near_cache_entries=16) as stack:
        await stack.til(til_request())
        await stack.settle()
        stack.servicer._tils.near.clear()  # type: ignore[attr-defined]  # as another process
        hit = split(await stack.til(til_request()))  # from the cacher, and now near
        gets = len(stack.cacher.gets)
        near_hit = split(await stack.til(til_request()))
        assert len(stack.cacher.gets) == gets
        other = split(await stack.til(til_request(owner="bob")))
    assert hit[0].cache_status == near_hit[0].cache_status == edge_pb2.CACHE_STATUS_HIT
    assert other[0].cache_status == edge_pb2.CACHE_STATUS_MISS  # bob's key: asked the cacher, missed
    assert len(stack.cacher.gets) == gets + 1 and len(stack.generator.requests) == 2


async def test_refresh_replaces_it_and_bypass_neither_reads_nor_fills_it() -> None:
    async with edge_stack(near_cache_entries=16) as stack:
        await stack.til(til_request())
        await stack.settle()
        newer = {**GOOD_TIL, "keywords": ["만료일"]}
        stack.generator.output = chunks(json.dumps(newer, ensure_ascii=False))
        refreshed = split(await stack.til(til_request(cache_policy=edge_pb2.CACHE_POLICY_REFRESH)))
        await stack.settle()
        hit = split(await stack.til(til_request()))
        bypassed = split(await stack.til(til_request(cache_policy=edge_pb2.CACHE_POLICY_BYPASS)))
    assert list(refreshed[2].til.keywords) == ["만료일"], list(refreshed[2].violations)
    assert hit[0].cache_status == edge_pb2.CACHE_STATUS_HIT and list(hit[2].til.keywords) == ["만료일"]
    assert bypassed[0].cache_status == edge_pb2.CACHE_STATUS_BYPASSED
    assert len(stack.generator.requests) == 3 and len(stack.cacher.gets) == 1


async def test_entries_expire_with_the_max_age_and_with_the_cachers_ttl() -> None:
    async with edge_stack(near_cache_entries=16, near_cache_max_age_s=0.3) as stack:
        await stack.til(til_request())
        await stack.settle()
        await stack.til(til_request())
        assert len(stack.cacher.gets) == 1
        await asyncio.sleep(0.4)
        aged = split(await stack.til(til_request()))  # past the max age: the cacher is asked again
        assert len(stack.cacher.gets) == 2 and aged[0].cache_status == edge_pb2.CACHE_STATUS_HIT

        # An entry with at most a second left at the cacher is not kept near at all.
        stack.cacher.ttl_seconds = 1
        stack.servicer._tils.near.clear()  # type: ignore[attr-defined]
        for _ in range(2):
            started, _, _ = split(await stack.til(til_request()))
            assert started.cache_status == edge_pb2.CACHE_STATUS_HIT
        assert len(stack.cacher.gets) == 4


async def test_a_result_the_cacher_did_not_store_is_not_served_near() -> None:
    async with edge_stack(near_cache_entries=16, down=["cacher"]) as stack:
        first = split(await stack.til(til_request()))
        await stack.settle()
        second = split(await stack.til(til_request()))
    assert first[0].cache_status == second[0].cache_status == edge_pb2.CACHE_STATUS_UNAVAILABLE
    assert len(stack.generator.requests) == 2


async def test_identical_requests_that_arrive_together_share_one_cacher_read() -> None:
    async with edge_stack(cache_timeout_s=2.0) as stack:  # near cache off: every call reads the cacher
        await stack.til(til_request())
        await stack.settle()
        stack.cacher.delay_s = 0.2
        burst = await asyncio.gather(
            *(stack.til(til_request()) for _ in range(8))
        )  # 8: what the test edge admits at once
        other = split(await stack.til(til_request(owner="bob")))
    assert [split(r)[0].cache_status for r in burst] == [edge_pb2.CACHE_STATUS_HIT] * 8
    assert len(stack.cacher.gets) == 1 + 1 + 1  # the first (a miss), the burst's one, bob's own
    assert other[0].cache_status == edge_pb2.CACHE_STATUS_MISS


def test_edge_workers_auto_is_one_per_cpu_this_process_may_use(monkeypatch: Any) -> None:
    import os

    import pydantic

    from services.edge.config import EdgeSettings

    monkeypatch.setenv("EDGE_WORKERS", "auto")
    assert EdgeSettings().workers == min(256, len(os.sched_getaffinity(0)))
    monkeypatch.setenv("EDGE_WORKERS", "3")
    assert EdgeSettings().workers == 3
    monkeypatch.setenv("EDGE_WORKERS", "many")
    try:
        EdgeSettings()
    except pydantic.ValidationError as exc:
        assert "workers" in str(exc)
    else:
        raise AssertionError("EDGE_WORKERS=many was accepted")
