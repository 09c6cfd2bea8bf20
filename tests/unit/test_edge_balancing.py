"""The edge balances generator streams by load: two in-process fake generators behind one GeneratorClient."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from til.v1 import generator_pb2, generator_pb2_grpc

from services.common.channels import open_channel
from services.common.server import RunningServer
from services.edge.clients import GeneratorClient, GeneratorReplicas, RetryPolicy, replica_targets
from tests.conftest import in_process_server
from tests.unit.test_edge_resilience import UNAVAILABLE, wait_until
from tests.unit.test_edge_service import FakeGenerator, service

GENERATOR = "til.v1.GeneratorService"


@contextlib.asynccontextmanager
async def two_generators(
    *fakes: FakeGenerator, connections: int = 1
) -> AsyncIterator[tuple[GeneratorClient, GeneratorReplicas, list[RunningServer]]]:
    async with contextlib.AsyncExitStack() as stack:
        servers = []
        for fake in fakes:
            running, _ = await stack.enter_async_context(
                in_process_server(
                    [service(GENERATOR, generator_pb2_grpc.add_GeneratorServiceServicer_to_server, fake)]
                )
            )
            servers.append(running)
        addr = ",".join(f"127.0.0.1:{running.port}" for running in servers)
        replicas = GeneratorReplicas.from_addr(
            addr, lambda target: open_channel(target, own_connection=True), connections=connections
        )
        watching = asyncio.ensure_future(replicas.watch())
        try:
            yield GeneratorClient(replicas, retry=RetryPolicy(attempts=3, backoff_s=0.01)), replicas, servers
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
            await replicas.close()


async def run(client: GeneratorClient) -> list[str]:
    stream = client.generate(generator_pb2.GenerateRequest(prompt="x"), timeout=5)
    return [r.WhichOneof("event") async for r in stream]


async def hold(client: GeneratorClient, replicas: GeneratorReplicas) -> tuple[Any, asyncio.Task[Any], int]:
    """Opens a stream that stays open (its first message read); returns it and the replica it went to."""
    before = [r.outstanding for r in replicas.replicas]
    stream = client.generate(generator_pb2.GenerateRequest(prompt="x"), timeout=10)
    await anext(stream)
    after = [r.outstanding for r in replicas.replicas]
    [index] = [i for i, (b, a) in enumerate(zip(before, after, strict=True)) if a == b + 1]
    return stream, asyncio.ensure_future(anext(stream)), index


async def release(held: list[tuple[Any, asyncio.Task[Any], int]]) -> None:
    for stream, rest, _ in held:
        rest.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rest
        await stream.aclose()


def test_generator_addresses_stay_a_list_or_a_dns_name() -> None:
    assert replica_targets("10.0.0.1:50052, 10.0.0.2:50052") == (["10.0.0.1:50052", "10.0.0.2:50052"], None)
    assert replica_targets("dns:///generator.tilserve:50052") == ([], ("generator.tilserve", 50052))
    assert replica_targets("generator:50052") == (["generator:50052"], None)
    with pytest.raises(ValueError, match="dns:///name:port"):
        replica_targets("dns:///generator")


async def test_streams_go_to_the_replica_with_the_fewest_open_streams() -> None:
    fakes = (FakeGenerator(hang_after=0), FakeGenerator(hang_after=0))
    async with two_generators(*fakes) as (client, replicas, _):
        held = [await hold(client, replicas) for _ in range(4)]
        assert [r.outstanding for r in replicas.replicas] == [2, 2]  # spread evenly
        # Both streams on the first replica end: the next two both go there (round robin would split them).
        await release([h for h in held if h[2] == 0])
        assert [r.outstanding for r in replicas.replicas] == [0, 2]
        more = [await hold(client, replicas) for _ in range(2)]
        assert [index for *_, index in more] == [0, 0]
        assert [len(fake.requests) for fake in fakes] == [4, 2]
        await release([h for h in held if h[2] == 1] + more)
        assert [r.outstanding for r in replicas.replicas] == [0, 0]


async def test_a_draining_replica_gets_no_new_streams() -> None:
    draining, healthy = FakeGenerator(), FakeGenerator()
    async with two_generators(draining, healthy) as (client, replicas, servers):
        await wait_until(lambda: all(r.serving for r in replicas.replicas))
        await servers[0].health.set(GENERATOR, health_pb2.HealthCheckResponse.NOT_SERVING)
        await wait_until(lambda: not replicas.replicas[0].serving)
        outcomes = [await run(client) for _ in range(6)]
        assert all(kinds[-1] == "finished" for kinds in outcomes)
        assert len(draining.requests) == 0 and len(healthy.requests) == 6
        await servers[0].health.set(GENERATOR, health_pb2.HealthCheckResponse.SERVING)
        await wait_until(lambda: replicas.replicas[0].serving)
        await asyncio.gather(*(run(client) for _ in range(4)))
        assert len(draining.requests) == 2  # back in rotation


async def test_a_failing_replica_is_retried_elsewhere_then_skipped() -> None:
    failing, healthy = FakeGenerator(error=UNAVAILABLE), FakeGenerator()
    async with two_generators(failing, healthy) as (client, _, _):
        outcomes = [await run(client) for _ in range(6)]
    assert all(kinds[0] == "started" and kinds[-1] == "finished" for kinds in outcomes)
    assert len(failing.requests) == 1  # failed once, then skipped for the cool-down
    assert len(healthy.requests) == 6


async def test_with_several_connections_a_retry_goes_to_another_replica_not_another_connection() -> None:
    """EDGE_GENERATOR_CONNECTIONS=3: an UNAVAILABLE from one replica sends the retry to the other replica
    (not to a second connection to the same one), and every connection to the failed one cools down."""
    failing, healthy = FakeGenerator(error=UNAVAILABLE), FakeGenerator()
    async with two_generators(failing, healthy, connections=3) as (client, replicas, servers):
        outcomes = [await run(client) for _ in range(6)]
        failed_target = f"127.0.0.1:{servers[0].port}"
        cooling = [r.failed_until > 0 for r in replicas.replicas if r.target == failed_target]
    assert all(kinds[0] == "started" and kinds[-1] == "finished" for kinds in outcomes)
    assert len(failing.requests) == 1  # tried once; neither the retry nor later streams went back
    assert len(healthy.requests) == 6
    assert cooling == [True, True, True]


async def test_when_every_replica_is_draining_streams_still_go_somewhere() -> None:
    first, second = FakeGenerator(), FakeGenerator()
    async with two_generators(first, second) as (client, replicas, servers):
        for running in servers:
            await running.health.set(GENERATOR, health_pb2.HealthCheckResponse.NOT_SERVING)
        await wait_until(lambda: not any(r.serving for r in replicas.replicas))
        outcomes = await asyncio.gather(*(run(client) for _ in range(4)))
    assert all(kinds[-1] == "finished" for kinds in outcomes)
    assert len(first.requests) == len(second.requests) == 2


async def test_a_generator_that_goes_away_is_marked_not_serving() -> None:
    gone, healthy = FakeGenerator(), FakeGenerator()
    async with two_generators(gone, healthy) as (client, replicas, servers):
        await wait_until(lambda: all(r.serving for r in replicas.replicas))
        await servers[0].server.stop(0)
        await wait_until(lambda: not replicas.replicas[0].serving)
        outcomes = [await run(client) for _ in range(3)]
    assert all(kinds[-1] == "finished" for kinds in outcomes)
    assert len(healthy.requests) == 3


async def test_a_plain_channel_is_one_replica() -> None:
    fake = FakeGenerator()
    async with in_process_server(
        [service(GENERATOR, generator_pb2_grpc.add_GeneratorServiceServicer_to_server, fake)]
    ) as (running, _):
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        client = GeneratorClient(channel)
        assert (await run(client))[-1] == "finished"
        assert (await client.model_info()).model == "fake-model"
        await channel.close()


@pytest.mark.parametrize("own_connection", [True, False])
async def test_several_connections_to_one_address_spread_the_streams(own_connection: bool) -> None:
    """EDGE_GENERATOR_CONNECTIONS=3: a generator with front-ends on one port gets three connections from
    each edge worker (the kernel hands each to one front-end), with the streams spread over them. Without
    a connection of its own each channel would share one with the others (gRPC's global pool)."""
    fake = FakeGenerator(hang_after=0)
    async with in_process_server(
        [service(GENERATOR, generator_pb2_grpc.add_GeneratorServiceServicer_to_server, fake)]
    ) as (running, _):
        replicas = GeneratorReplicas.from_addr(
            f"127.0.0.1:{running.port}",
            lambda target: open_channel(target, own_connection=own_connection),
            connections=3,
        )
        try:
            client = GeneratorClient(replicas)
            held = [await hold(client, replicas) for _ in range(6)]
            assert [r.outstanding for r in replicas.replicas] == [2, 2, 2]
            assert len({r.channel for r in replicas.replicas}) == 3
            # The server's view: one TCP connection (client port) per channel, or one for all.
            assert len(set(fake.peers)) == (3 if own_connection else 1)
            await release(held)
        finally:
            await replicas.close()


async def test_a_resolved_name_gets_its_connections_per_address_and_keeps_them() -> None:
    opened: list[str] = []

    def connect(target: str) -> grpc.aio.Channel:
        opened.append(target)
        return open_channel(target, own_connection=True)

    replicas = GeneratorReplicas([], connect, dns=("127.0.0.1", 50052), connections=2)
    try:
        await replicas._resolve()
        first = list(replicas.replicas)
        assert [r.target for r in first] == ["127.0.0.1:50052", "127.0.0.1:50052"]
        assert first[0].channel is not first[1].channel
        await replicas._resolve()  # the same addresses: the same connections, none reopened
        assert replicas.replicas == first and len(opened) == 2
    finally:
        await replicas.close()
