"""The edge under failure: shared generations, retries, breakers, cancellation and deadlines, over real gRPC
with fake generator, retriever and cacher servicers (see test_edge_service.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import grpc
import pytest
from til.v1 import edge_pb2, generator_pb2, generator_pb2_grpc

from services.common.admission import Admission
from services.common.channels import open_channel
from services.common.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.edge.breaker import GuardedCache, GuardedStore, dependency_breaker
from services.edge.clients import DependencyUnavailable, GeneratorClient, GeneratorReplicas, RetryPolicy
from services.edge.config import EdgeSettings
from services.edge.flights import JOINED_NOTICE
from tests.conftest import in_process_server
from tests.unit.test_edge_service import (
    GOOD_TIL_JSON,
    QUESTIONS,
    FakeGenerator,
    chunks,
    edge_stack,
    free_port,
    questions_request,
    service,
    split,
    til_request,
)

UNAVAILABLE = Unavailable("the generator is draining")


async def collect(call: Any) -> list[Any]:
    """The rest of a call's stream (read() and iteration may not be mixed on one call)."""
    messages = []
    while (message := await call.read()) is not grpc.aio.EOF:
        messages.append(message)
    return messages


async def wait_until(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- single flight ----------------------------------------------------------------------------------


async def test_identical_concurrent_misses_share_one_generation() -> None:
    admission = Admission("edge-wide", max_active=32, max_waiting=0)
    async with edge_stack(generator=FakeGenerator(delay_s=0.03), admission=admission) as stack:
        results = await asyncio.gather(*(stack.til(til_request()) for _ in range(20)))
        await stack.settle()
    assert len(stack.generator.requests) == 1
    streams = [split(r) for r in results]
    assert len({started.request_id for started, _, _ in streams}) == 20  # each call keeps its own id
    for started, deltas, finished in streams:
        assert "".join(d.text for d in deltas) == finished.til_json == GOOD_TIL_JSON
        assert started.cache_status == edge_pb2.CACHE_STATUS_MISS
        assert finished.til_id == streams[0][2].til_id != ""
    joined = [started for started, _, _ in streams if JOINED_NOTICE in started.notices]
    assert len(joined) == 19
    # The shared result is stored and indexed once.
    assert len(stack.cacher.puts) == 1 and len(stack.retriever.upserts) == 1


async def test_a_late_joiner_gets_the_whole_stream_from_the_start() -> None:
    async with edge_stack(generator=FakeGenerator(delay_s=0.03)) as stack:
        first = stack.stub.GenerateTil(til_request())
        await first.read()  # started
        await first.read()  # a delta: the generation is under way
        late = await stack.til(til_request())
        early = await collect(first)
    assert len(stack.generator.requests) == 1
    _, deltas, finished = split(late)
    assert JOINED_NOTICE in late[0].started.notices
    assert "".join(d.text for d in deltas) == finished.til_json == GOOD_TIL_JSON
    assert early[-1].finished.til_json == GOOD_TIL_JSON


@pytest.mark.parametrize("leaver", ["leader", "follower"])
async def test_one_listener_leaving_does_not_stop_the_others(leaver: str) -> None:
    generator = FakeGenerator(delay_s=0.03)
    async with edge_stack(generator=generator) as stack:
        leader = stack.stub.GenerateTil(til_request())
        await leader.read()
        follower = stack.stub.GenerateTil(til_request())
        await follower.read()
        (leader if leaver == "leader" else follower).cancel()
        stays = follower if leaver == "leader" else leader
        rest = await collect(stays)
        await stack.settle()
    assert rest[-1].finished.til_json == GOOD_TIL_JSON
    assert not generator.cancelled.is_set() and len(generator.requests) == 1
    assert len(stack.cacher.puts) == 1


async def test_when_every_listener_leaves_the_generator_call_is_cancelled() -> None:
    generator = FakeGenerator(hang_after=2)
    async with edge_stack(generator=generator) as stack:
        calls = [stack.stub.GenerateTil(til_request()) for _ in range(3)]
        for call in calls:
            await call.read()
        for call in calls:
            call.cancel()
        await asyncio.wait_for(generator.cancelled.wait(), 2.0)
        await stack.settle()
        # The abandoned flight is gone: the next call starts a new generation, and nothing was stored.
        generator.hang_after = None
        started, _, finished = split(await stack.til(til_request()))
    assert len(generator.requests) == 2 and JOINED_NOTICE not in started.notices
    assert finished.til_json == GOOD_TIL_JSON


async def test_bypass_refresh_and_different_requests_are_not_shared() -> None:
    async with edge_stack(generator=FakeGenerator(delay_s=0.005)) as stack:
        await asyncio.gather(
            stack.til(til_request(cache_policy=edge_pb2.CACHE_POLICY_BYPASS)),
            stack.til(til_request(cache_policy=edge_pb2.CACHE_POLICY_BYPASS)),
            stack.til(til_request(cache_policy=edge_pb2.CACHE_POLICY_REFRESH)),
            stack.til(til_request(owner="bob")),
            stack.til(til_request()),
        )
    assert len(stack.generator.requests) == 5


async def test_a_call_joins_only_a_flight_whose_deadline_covers_its_own() -> None:
    async with edge_stack(generator=FakeGenerator(delay_s=0.03)) as stack:
        leader = stack.stub.GenerateTil(til_request(), timeout=10)
        await leader.read()
        close = stack.til(til_request(), timeout=10.2)  # within the 1 s slack: joins
        unbounded = stack.til(til_request())  # no deadline: may outlive the flight, so its own generation
        results = await asyncio.gather(close, unbounded, collect(leader))
    assert len(stack.generator.requests) == 2
    assert JOINED_NOTICE in results[0][0].started.notices
    assert JOINED_NOTICE not in results[1][0].started.notices


async def test_an_error_in_the_shared_generation_reaches_every_listener_with_its_status() -> None:
    generator = FakeGenerator(
        delay_s=0.03, failures=[(ResourceExhausted("engine full", retry_after_s=2.5), 10)]
    )
    async with edge_stack(generator=generator) as stack:
        calls = [stack.stub.GenerateTil(til_request()) for _ in range(4)]
        outcomes = await asyncio.gather(*(collect(c) for c in calls), return_exceptions=True)
        await stack.settle()
    assert len(generator.requests) == 1
    for outcome in outcomes:
        assert isinstance(outcome, grpc.aio.AioRpcError)
        assert outcome.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("retry-after-ms", "2500") in tuple(outcome.trailing_metadata() or ())
    assert stack.cacher.puts == [] and stack.retriever.upserts == []


async def test_questions_share_one_generation_too() -> None:
    generator = FakeGenerator(output=chunks(json.dumps(QUESTIONS, ensure_ascii=False)), delay_s=0.03)
    async with edge_stack(generator=generator) as stack:
        results = await asyncio.gather(
            *(collect(stack.stub.GenerateQuestions(questions_request())) for _ in range(5))
        )
        await stack.settle()
    assert len(generator.requests) == 1
    assert len({r[-1].finished.questions_json for r in results}) == 1
    assert all(list(r[-1].finished.violations) == [] for r in results)
    assert len(stack.cacher.puts) == 1


# --- retries ----------------------------------------------------------------------------------------


async def test_unavailable_before_the_first_token_is_retried() -> None:
    generator = FakeGenerator(failures=[(UNAVAILABLE, 0), (UNAVAILABLE, 0)])
    async with edge_stack(generator=generator) as stack:
        responses = await stack.til(til_request())
    _, deltas, finished = split(responses)
    assert len(generator.requests) == 3
    assert [r.WhichOneof("event") for r in responses].count("started") == 1
    assert "".join(d.text for d in deltas) == finished.til_json == GOOD_TIL_JSON


@pytest.mark.parametrize(
    ("failures", "code", "calls"),
    [
        ([(UNAVAILABLE, 2)], grpc.StatusCode.UNAVAILABLE, 1),  # after text: a retry would repeat it
        ([(InvalidArgument("bad schema"), 0)], grpc.StatusCode.INVALID_ARGUMENT, 1),
        ([(ResourceExhausted("full"), 0)], grpc.StatusCode.RESOURCE_EXHAUSTED, 1),
        ([(UNAVAILABLE, 0)] * 5, grpc.StatusCode.UNAVAILABLE, 3),  # bounded: 3 tries
    ],
)
async def test_retries_only_unavailable_before_text_and_bounded(
    failures: list[Any], code: grpc.StatusCode, calls: int
) -> None:
    generator = FakeGenerator(failures=list(failures))
    async with edge_stack(generator=generator) as stack:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stack.til(til_request(cache_policy=edge_pb2.CACHE_POLICY_BYPASS))
    assert raised.value.code() is code
    assert len(generator.requests) == calls


async def generator_servers(servers: contextlib.AsyncExitStack, *fakes: FakeGenerator) -> list[int]:
    """Serves each fake generator on its own port, for as long as `servers` is open; their ports."""
    name, add = "til.v1.GeneratorService", generator_pb2_grpc.add_GeneratorServiceServicer_to_server
    ports = []
    for fake in fakes:
        running, _ = await servers.enter_async_context(in_process_server([service(name, add, fake)]))
        ports.append(running.port)
    return ports


async def test_calls_spread_over_several_generators_and_skip_a_draining_one() -> None:
    draining = FakeGenerator(error=UNAVAILABLE)
    healthy = FakeGenerator()
    async with contextlib.AsyncExitStack() as servers:
        ports = await generator_servers(servers, draining, healthy)
        # EDGE_GENERATOR_ADDR as a comma list: one channel, round robin over both.
        settings = EdgeSettings(port=0, generator_addr=",".join(f"127.0.0.1:{port}" for port in ports))
        channel = open_channel(settings.generator_target)
        client = GeneratorClient(channel, retry=RetryPolicy(attempts=3, backoff_s=0.01))
        outcomes = []
        for _ in range(8):
            stream = client.generate(generator_pb2.GenerateRequest(prompt="x"), timeout=5)
            outcomes.append([r.WhichOneof("event") async for r in stream])
        await channel.close()
    assert all(kinds[0] == "started" and kinds[-1] == "finished" for kinds in outcomes)
    assert len(draining.requests) >= 1 and len(healthy.requests) == 8  # both were tried; all succeeded


async def test_a_retry_on_a_replica_with_another_model_ends_the_stream_instead_of_mixing_them() -> None:
    # During a rollout the replicas may serve different models. A stream that began on one (its started
    # event, which names the model for the caller and the cache key, already sent) must not take its text
    # from another: that retry is refused with UNAVAILABLE, for the caller to call again.
    old, new = (FakeGenerator(model=m, failures=[(UNAVAILABLE, 0)]) for m in ("model-old", "model-new"))
    async with contextlib.AsyncExitStack() as servers:
        ports = await generator_servers(servers, old, new)
        # Two replicas (a channel each): a retry goes to the target not tried yet.
        channels: list[grpc.aio.Channel] = []

        def connect(target: str) -> grpc.aio.Channel:
            channels.append(open_channel(target))
            return channels[-1]

        replicas = GeneratorReplicas([f"127.0.0.1:{port}" for port in ports], connect)
        client = GeneratorClient(replicas, retry=RetryPolicy(attempts=3, backoff_s=0.01))
        seen = []
        with pytest.raises(Unavailable) as raised:
            async for response in client.generate(generator_pb2.GenerateRequest(prompt="x"), timeout=5):
                seen.append(response)
        for channel in channels:
            await channel.close()
    assert [r.WhichOneof("event") for r in seen] == ["started"]  # no text from either replica
    assert len(old.requests) == 1 and len(new.requests) == 1  # the second try was made, then refused
    first = seen[0].started.model
    other = ({"model-old", "model-new"} - {first}).pop()
    assert first in str(raised.value) and other in str(raised.value)


# --- circuit breaker --------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_breaker_opens_after_consecutive_failures_then_probes() -> None:
    clock = Clock()
    breaker = dependency_breaker("cacher", failures=3, cool_down_s=5.0, clock=clock)
    calls = 0

    async def call(ok: bool) -> None:
        nonlocal calls
        with breaker.guard():
            calls += 1
            if not ok:
                raise DependencyUnavailable("cacher: UNAVAILABLE")

    for ok in (False, True, False, False):  # a success resets the count
        with contextlib.suppress(DependencyUnavailable):
            await call(ok)
    assert not breaker.is_open
    with contextlib.suppress(DependencyUnavailable):
        await call(False)
    assert breaker.is_open and calls == 5
    with pytest.raises(DependencyUnavailable, match="skipped after 3 consecutive failures"):
        await call(True)
    assert calls == 5  # refused without calling
    clock.now += 5.0
    with contextlib.suppress(DependencyUnavailable):
        await call(False)  # the probe fails: open for another cool-down
    assert calls == 6 and breaker.is_open
    with pytest.raises(DependencyUnavailable):
        await call(True)
    clock.now += 5.0
    await call(True)  # the probe succeeds: closed
    await call(True)
    assert calls == 8 and not breaker.is_open


async def test_only_one_probe_at_a_time_and_a_cancelled_probe_counts_for_nothing() -> None:
    clock = Clock()
    breaker = dependency_breaker("retriever", failures=1, cool_down_s=1.0, clock=clock)
    with pytest.raises(DependencyUnavailable), breaker.guard():
        raise DependencyUnavailable("down")
    clock.now += 1.0
    entered = asyncio.Event()

    async def slow_probe() -> None:
        with breaker.guard():
            entered.set()
            await asyncio.sleep(10)

    probe = asyncio.ensure_future(slow_probe())
    await entered.wait()
    with pytest.raises(DependencyUnavailable), breaker.guard():
        pass  # a second call while the probe runs is skipped
    probe.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await probe
    with breaker.guard():
        pass  # the next call probes again, and closes the breaker
    assert not breaker.is_open


async def test_a_dead_cache_is_skipped_after_the_breaker_opens() -> None:
    def guarded(clients: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
        generator, store, cache = clients
        return (
            generator,
            GuardedStore(store, dependency_breaker("retriever", failures=2, cool_down_s=60)),
            GuardedCache(cache, dependency_breaker("cacher", failures=2, cool_down_s=60)),
        )

    async with edge_stack(down=["cacher"], wrap=guarded) as stack:
        stack.cacher.hang = True
        notices = []
        for _ in range(4):
            started, _, finished = split(await stack.til(til_request(cache_policy=0)))
            notices.append(" ".join(started.notices))
            assert started.cache_status == edge_pb2.CACHE_STATUS_UNAVAILABLE
            assert finished.til_json == GOOD_TIL_JSON
    assert "skipped after 2 consecutive failures" not in notices[0]
    assert "skipped after 2 consecutive failures" in notices[-1]


# --- cancellation and deadlines ---------------------------------------------------------------------


async def test_a_client_that_leaves_cancels_the_generator_call() -> None:
    generator = FakeGenerator(hang_after=1)
    async with edge_stack(generator=generator) as stack:
        call = stack.stub.GenerateTil(til_request(cache_policy=edge_pb2.CACHE_POLICY_BYPASS))
        await call.read()
        await call.read()
        began = time.monotonic()
        call.cancel()
        await asyncio.wait_for(generator.cancelled.wait(), 2.0)
    assert time.monotonic() - began < 1.0


async def test_the_callers_deadline_ends_the_stream_promptly_and_reaches_the_generator() -> None:
    generator = FakeGenerator(hang_after=1)
    async with edge_stack(generator=generator) as stack:
        began = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stack.til(til_request(), timeout=0.5)
        elapsed = time.monotonic() - began
        await asyncio.wait_for(generator.cancelled.wait(), 2.0)
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.45 <= elapsed < 0.5 + 0.5
    (remaining,) = generator.time_remaining
    # Not more than the caller had (grpc-timeout is sent in whole units and rounded up: allow 10 ms).
    assert remaining is not None and remaining <= 0.5 + 0.01


async def test_token_counting_moves_to_a_live_replica_when_one_is_gone() -> None:
    """Tokenize, like a generation before its first token, is tried again on another replica."""
    from services.edge.clients import GeneratorReplicas

    fake = FakeGenerator()
    name, add = "til.v1.GeneratorService", generator_pb2_grpc.add_GeneratorServiceServicer_to_server
    async with in_process_server([service(name, add, fake)]) as (running, _):
        replicas = GeneratorReplicas.from_addr(
            f"127.0.0.1:{free_port()},127.0.0.1:{running.port}", open_channel
        )
        client = GeneratorClient(replicas, retry=RetryPolicy(attempts=3, backoff_s=0.01))
        request = generator_pb2.TokenizeRequest(inputs=[generator_pb2.TokenizeInput(text="캐시 cache")])
        try:
            counts = [(await client.tokenize(request, timeout=5)).results[0].token_count for _ in range(4)]
        finally:
            await replicas.close()
    assert counts == [4, 4, 4, 4] and len(fake.tokenized) == 4
