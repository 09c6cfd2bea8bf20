"""The shared server core: status mapping, safe decoding, health, reflection, drain and admission."""

from __future__ import annotations

import asyncio
import itertools
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY
from pydantic_settings import SettingsConfigDict
from til.v1 import cacher_pb2, cacher_pb2_grpc, generator_pb2, generator_pb2_grpc

from services.common.admission import Admission
from services.common.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.common.server import Service
from services.common.settings import ServerSettings, load_settings
from tests.conftest import in_process_server

CACHER = "til.v1.CacherService"


class ScriptedCacher(cacher_pb2_grpc.CacherServiceServicer):
    """GetEntry raises whatever the key names; DeleteEntry sleeps for `key` seconds."""

    def __init__(self, downstream: grpc.aio.Channel | None = None) -> None:
        self.downstream = downstream

    async def GetEntry(self, request, context):
        errors = {
            "invalid": InvalidArgument("key is bad: use hex"),
            "missing": NotFound("no such entry"),
            "busy": ResourceExhausted("too busy", retry_after_s=2.5),
            "down": Unavailable("redis is down"),
            "bug": RuntimeError("secret internal detail"),
        }
        if request.key in errors:
            raise errors[request.key]
        if request.key == "downstream" and self.downstream is not None:
            stub = cacher_pb2_grpc.CacherServiceStub(self.downstream)
            await stub.GetEntry(cacher_pb2.GetEntryRequest(key="invalid"))
        return cacher_pb2.GetEntryResponse(found=True, value_json='{"k": 1}')

    async def DeleteEntry(self, request, context):
        await asyncio.sleep(float(request.key))
        return cacher_pb2.DeleteEntryResponse(deleted=True)


def cacher_service(servicer: cacher_pb2_grpc.CacherServiceServicer) -> Service:
    return Service(
        CACHER, lambda server: cacher_pb2_grpc.add_CacherServiceServicer_to_server(servicer, server)
    )


async def get(channel: grpc.aio.Channel, key: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await cacher_pb2_grpc.CacherServiceStub(channel).GetEntry(cacher_pb2.GetEntryRequest(key=key))
    return info.value


async def test_service_errors_map_to_their_status_codes() -> None:
    async with in_process_server([cacher_service(ScriptedCacher())]) as (_, channel):
        assert (await get(channel, "invalid")).code() is grpc.StatusCode.INVALID_ARGUMENT
        assert (await get(channel, "invalid")).details() == "key is bad: use hex"
        assert (await get(channel, "missing")).code() is grpc.StatusCode.NOT_FOUND
        assert (await get(channel, "down")).code() is grpc.StatusCode.UNAVAILABLE
        busy = await get(channel, "busy")
        assert busy.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("retry-after-ms", "2500") in tuple(busy.trailing_metadata())
        bug = await get(channel, "bug")
        assert bug.code() is grpc.StatusCode.INTERNAL  # never UNKNOWN
        assert "secret" not in bug.details()


def sample(name: str, method: str, **labels: str) -> float:
    service, _, rpc = method.rpartition("/")
    return REGISTRY.get_sample_value(name, {"grpc_service": service, "grpc_method": rpc, **labels}) or 0.0


async def test_every_call_is_counted_by_method_and_code_however_often_the_method_is_called() -> None:
    get_entry, generate = "til.v1.CacherService/GetEntry", "til.v1.GeneratorService/Generate"

    class Streaming(generator_pb2_grpc.GeneratorServiceServicer):
        async def Generate(self, request, context):
            for _ in range(3):
                yield generator_pb2.GenerateResponse()

    streaming = Service(
        "til.v1.GeneratorService",
        lambda server: generator_pb2_grpc.add_GeneratorServiceServicer_to_server(Streaming(), server),
    )

    def counts() -> tuple[float, ...]:
        return (
            sample("grpc_server_handled_total", get_entry, grpc_code="OK"),
            sample("grpc_server_handled_total", get_entry, grpc_code="INVALID_ARGUMENT"),
            sample("grpc_server_handling_seconds_count", get_entry),
            sample("grpc_server_handled_total", generate, grpc_code="OK"),
            sample("grpc_server_msg_sent_total", generate),
        )

    before = counts()
    async with in_process_server([cacher_service(ScriptedCacher()), streaming]) as (_, channel):
        stub = cacher_pb2_grpc.CacherServiceStub(channel)
        for _ in range(3):
            await stub.GetEntry(cacher_pb2.GetEntryRequest(key="k"))
            await get(channel, "invalid")
        generator = generator_pb2_grpc.GeneratorServiceStub(channel)
        for _ in range(2):
            assert len([r async for r in generator.Generate(generator_pb2.GenerateRequest())]) == 3
    after = counts()
    assert [b - a for a, b in zip(before, after, strict=True)] == [3, 3, 6, 2, 6]
    assert sample("grpc_server_in_flight", get_entry) == sample("grpc_server_in_flight", generate) == 0
    assert sample("grpc_server_msg_sent_total", get_entry) == 0  # only streams count messages


async def test_downstream_status_passes_through() -> None:
    async with in_process_server([cacher_service(ScriptedCacher())]) as (_, downstream):
        async with in_process_server([cacher_service(ScriptedCacher(downstream))]) as (_, channel):
            err = await get(channel, "downstream")
            assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert err.details() == "key is bad: use hex"


@pytest.mark.parametrize(
    "payload",
    [b"\x12\x02\xff\xfe", b"\xff\xff\xff", b"\x0a\x05ab"],
    ids=["invalid-utf8-string", "garbage", "truncated"],
)
async def test_undecodable_requests_get_invalid_argument(payload: bytes) -> None:
    async with in_process_server([cacher_service(ScriptedCacher())]) as (_, channel):
        call = channel.unary_unary("/til.v1.CacherService/GetEntry")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(payload)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "til.v1.GetEntryRequest" in info.value.details()


async def test_unimplemented_method_is_unimplemented() -> None:
    async with in_process_server([cacher_service(ScriptedCacher())]) as (_, channel):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await cacher_pb2_grpc.CacherServiceStub(channel).PutEntry(cacher_pb2.PutEntryRequest())
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_streaming_handler_errors_are_mapped() -> None:
    class Failing(generator_pb2_grpc.GeneratorServiceServicer):
        async def Generate(self, request, context):
            yield generator_pb2.GenerateResponse(started=generator_pb2.GenerateStarted(request_id="r"))
            raise InvalidArgument("prompt is too long")

    service = Service(
        "til.v1.GeneratorService",
        lambda server: generator_pb2_grpc.add_GeneratorServiceServicer_to_server(Failing(), server),
    )
    async with in_process_server([service]) as (_, channel):
        call = generator_pb2_grpc.GeneratorServiceStub(channel).Generate(generator_pb2.GenerateRequest())
        first = await call.read()
        assert first.started.request_id == "r"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_health_is_not_serving_until_warm_and_after_drain() -> None:
    async with in_process_server([cacher_service(ScriptedCacher())], serving=False) as (running, channel):
        health = health_pb2_grpc.HealthStub(channel)

        async def status(name: str) -> int:
            return (await health.Check(health_pb2.HealthCheckRequest(service=name))).status

        assert await status("") == health_pb2.HealthCheckResponse.SERVING  # liveness
        assert await status(CACHER) == health_pb2.HealthCheckResponse.NOT_SERVING
        await running.set_serving()
        assert await status(CACHER) == health_pb2.HealthCheckResponse.SERVING
        await running.health.enter_graceful_shutdown()
        assert await status(CACHER) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await status("") == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_reflection_lists_services() -> None:
    async with in_process_server([cacher_service(ScriptedCacher())]) as (_, channel):
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = [r async for r in stub.ServerReflectionInfo(iter([request]))]
        names = {s.name for s in responses[0].list_services_response.service}
        assert {CACHER, "grpc.health.v1.Health"} <= names


async def test_drain_finishes_in_flight_calls_and_refuses_new_ones() -> None:
    async with in_process_server([cacher_service(ScriptedCacher())]) as (running, channel):
        stub = cacher_pb2_grpc.CacherServiceStub(channel)
        in_flight = asyncio.ensure_future(stub.DeleteEntry(cacher_pb2.DeleteEntryRequest(key="0.5")))
        await asyncio.sleep(0.1)
        stopping = asyncio.ensure_future(running.stop(5.0))
        await asyncio.sleep(0.1)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.DeleteEntry(cacher_pb2.DeleteEntryRequest(key="0"), timeout=2)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert (await in_flight).deleted
        await stopping


async def test_admission_bounds_active_and_waiting_and_refuses_fast() -> None:
    admission = Admission("test", max_active=2, max_waiting=1)
    release = asyncio.Event()
    entered: list[int] = []

    async def worker(i: int) -> None:
        async with admission.slot():
            entered.append(i)
            await release.wait()

    tasks = [asyncio.ensure_future(worker(i)) for i in range(3)]
    await asyncio.sleep(0.05)
    assert entered == [0, 1] and admission.waiting == 1
    started = time.perf_counter()
    with pytest.raises(ResourceExhausted):
        async with admission.slot():
            pass
    assert time.perf_counter() - started < 0.05
    release.set()
    await asyncio.gather(*tasks)
    assert entered == [0, 1, 2] and admission.active == 0 and admission.waiting == 0


def test_settings_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    class DemoSettings(ServerSettings):
        model_config = SettingsConfigDict(env_prefix="DEMO_", extra="ignore", frozen=True)

    monkeypatch.setenv("DEMO_PORT", "not-a-port")
    with pytest.raises(SystemExit, match="DEMO_PORT"):
        load_settings(DemoSettings)
    monkeypatch.setenv("DEMO_PORT", "6000")
    assert load_settings(DemoSettings).port == 6000


@pytest.mark.parametrize(("grace_s", "survives"), [(0.3, False), (30.0, True), (86_400.0, True)])
async def test_a_call_on_an_aged_connection_runs_for_the_grace(grace_s: float, survives: bool) -> None:
    """GOAWAY at the connection age: a 1.5 s call survives a 0.3 s age only when the grace covers it."""
    settings = ServerSettings(
        host="127.0.0.1", port=0, max_connection_age_s=0.3, max_connection_age_grace_s=grace_s
    )
    async with in_process_server([cacher_service(ScriptedCacher())], settings) as (_, channel):
        stub = cacher_pb2_grpc.CacherServiceStub(channel)
        call = stub.DeleteEntry(cacher_pb2.DeleteEntryRequest(key="1.5"), timeout=10)
        if survives:
            assert (await call).deleted
            # New calls after the GOAWAY go over a new connection.
            assert (await stub.DeleteEntry(cacher_pb2.DeleteEntryRequest(key="0"), timeout=5)).deleted
        else:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("variable", "value"),
    [("DEMO_MAX_CONNECTION_AGE_S", "-1"), ("DEMO_MAX_CONNECTION_AGE_GRACE_S", "a week"),
     ("DEMO_MAX_CONNECTION_AGE_GRACE_S", "1e10")],
)  # fmt: skip
def test_bad_connection_ages_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    class DemoSettings(ServerSettings):
        model_config = SettingsConfigDict(env_prefix="DEMO_", extra="ignore", frozen=True)

    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit, match=variable):
        load_settings(DemoSettings)


def test_default_connection_age_grace_outlasts_the_longest_deadline() -> None:
    from services.cli import DEFAULT_TIMEOUT_S

    settings = ServerSettings()
    assert settings.max_connection_age_grace_s >= DEFAULT_TIMEOUT_S


def test_a_breaker_counts_only_the_dependencys_own_failures() -> None:
    """One request's bad data (an oversized document, a refused key) never opens the breaker for everyone."""
    from services.edge.breaker import dependency_breaker
    from services.edge.clients import DependencyUnavailable

    breaker = dependency_breaker("retriever", failures=2, cool_down_s=60)
    for code in (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.NOT_FOUND,
    ) * 3:
        with pytest.raises(DependencyUnavailable), breaker.guard():
            raise DependencyUnavailable(f"retriever: {code.name}", code)
    assert not breaker.is_open
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        with pytest.raises(DependencyUnavailable), breaker.guard():
            raise DependencyUnavailable(f"retriever: {code.name}", code)
    assert breaker.is_open
    with pytest.raises(DependencyUnavailable, match="skipped after 2 consecutive failures"), breaker.guard():
        pass


async def test_coalesced_merges_what_waits_and_never_holds_back_the_first() -> None:
    from services.common.streams import coalesced

    release = asyncio.Event()
    closed = asyncio.Event()

    async def source():  # "s", then a burst of 5 deltas, a pause, 2 more, then "f"
        try:
            yield "s"
            yield 1
            await release.wait()
            for n in (2, 3, 4, 5, 6):
                yield n
            await asyncio.sleep(0.05)
            yield 7
            yield 8
            yield "f"
        finally:
            closed.set()

    out = coalesced(source(), mergeable=lambda x: isinstance(x, int), merge=lambda xs: tuple(xs))
    assert await anext(out) == "s"
    assert await asyncio.wait_for(anext(out), 1) == 1  # the first is out before the rest exists
    release.set()
    await asyncio.sleep(0.01)
    assert [item async for item in out] == [(2, 3, 4, 5, 6), (7, 8), "f"]
    assert closed.is_set()


async def test_coalesced_hands_out_what_was_read_first_while_it_reads_on() -> None:
    from services.common.streams import coalesced

    async def rest():
        for n in (1, 2, 3):
            yield n

    out = coalesced(rest(), mergeable=lambda x: isinstance(x, int), merge=lambda xs: tuple(xs), pending=["s"])
    assert await anext(out) == "s"
    await asyncio.sleep(0.01)  # the source is read meanwhile: what it gave waits, and is merged
    assert [item async for item in out] == [(1, 2, 3)]


async def test_coalesced_spaces_merged_items_and_passes_errors_on_after_the_items() -> None:
    from services.common.streams import coalesced

    async def ticking():
        for n in range(20):
            await asyncio.sleep(0.005)
            yield n
        raise Unavailable("the generator went away")

    got, times = [], []
    out = coalesced(ticking(), mergeable=lambda x: True, merge=lambda xs: xs[-1], interval_s=0.03)
    with pytest.raises(Unavailable):
        async for item in out:
            got.append(item)
            times.append(time.monotonic())
    assert got[0] == 0 and got[-1] == 19 and len(got) < 10  # merged, none lost at the end
    assert all(b - a >= 0.025 for a, b in itertools.pairwise(times))


async def test_closing_coalesced_stops_its_source() -> None:
    from services.common.streams import closing, coalesced

    cancelled = asyncio.Event()

    async def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
                await asyncio.sleep(0.001)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with closing(coalesced(endless(), mergeable=lambda x: True, merge=lambda xs: xs)) as out:
        await anext(out)
    assert cancelled.is_set()


@pytest.mark.parametrize("after_warmup", [False, True])
async def test_a_process_sharing_its_port_binds_it_only_once_warmed_up(after_warmup: bool) -> None:
    """serve(listen_after_warmup=True), as each generator front-end runs: while it warms up the kernel
    must not hand it connections that the front-ends already up could serve."""
    import os
    import signal
    import socket

    from services.common.server import serve
    from services.stack import free_port

    port = free_port()
    settings = ServerSettings(port=port, grace_period_s=0)
    warming, warmed = asyncio.Event(), asyncio.Event()

    async def warmup() -> None:
        warming.set()
        await warmed.wait()

    def accepts() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    serving = asyncio.create_task(
        serve(settings, [_health_only()], warmup=warmup, listen_after_warmup=after_warmup)
    )
    await asyncio.wait_for(warming.wait(), 10)
    assert accepts() is not after_warmup  # bound during the warm-up only without the option
    warmed.set()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(100):
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service="test.Only"), timeout=1)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)
                continue
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.05)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    os.kill(os.getpid(), signal.SIGTERM)  # serve's own handler: drain and return
    await asyncio.wait_for(serving, 10)
    assert not accepts()


def _health_only() -> Service:
    return Service("test.Only", lambda server: None)
