"""Platform faults on real processes: connections that age under long streams, bad settings, and the
cacher's Redis (private or given by URL) going away. Each test prints what it measured (`pytest -s`)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from til.v1 import (
    cacher_pb2,
    cacher_pb2_grpc,
    common_pb2,
    edge_pb2,
    edge_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
)

from services.stack import LocalStack, free_port
from tests.integration.test_faults import read_all, report, split, til_request, tokens

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CACHER = "til.v1.CacherService"


# --- connection age ---------------------------------------------------------------------------------


ENGINES = {
    # The packaged model: TILs of up to 384 tokens.
    "llama_cpp": ({}, edge_pb2.GenerationOverrides(max_tokens=384)),
    # No model: a TIL-shaped document at a fixed pace, run on to 50 tokens (15 s), past the age.
    "fake": (
        {"GENERATOR_BACKEND": "fake", "GENERATOR_FAKE_TOKEN_INTERVAL_S": "0.3"},
        edge_pb2.GenerationOverrides(max_tokens=50, ignore_eos=True),
    ),
}


@pytest.fixture(scope="module", params=[pytest.param("llama_cpp", marks=pytest.mark.model), "fake"])
async def aging_stack(
    stack_factory: Any, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[LocalStack, edge_pb2.GenerationOverrides]]:
    """The edge and the generator send GOAWAY after 5 s; the grace is the default."""
    generator_env, generation = ENGINES[request.param]
    stack = stack_factory(
        edge={"EDGE_MAX_CONNECTION_AGE_S": "5", "EDGE_ALLOW_IGNORE_EOS": "true"},
        generator={
            "GENERATOR_MAX_CONNECTION_AGE_S": "5",
            "GENERATOR_MAX_WAITING_REQUESTS": "16",
            **generator_env,
        },
    )
    await stack.start(timeout_s=240)
    yield stack, generation
    stack.stop()


async def test_four_concurrent_tils_on_one_channel_outlive_a_five_second_connection_age(
    aging_stack: tuple[LocalStack, edge_pb2.GenerationOverrides],
) -> None:
    stack, generation = aging_stack
    async with grpc.aio.insecure_channel(stack.address("edge")) as channel:
        edge = edge_pb2_grpc.EdgeServiceStub(channel)
        began = time.monotonic()

        async def til(n: int) -> tuple[float, Any]:
            request = til_request(
                f"age-{n}", generation=generation, cache_policy=edge_pb2.CACHE_POLICY_BYPASS
            )
            messages = await read_all(edge.GenerateTil(request, timeout=300))
            return time.monotonic() - began, split(messages)[2]

        results = await asyncio.gather(*(til(n) for n in range(4)))
        # The channel was sent GOAWAY meanwhile; a new call opens a new connection and works too.
        after = await read_all(edge.GenerateTil(til_request("age-after", generation=tokens(16)), timeout=300))
    durations = sorted(round(seconds, 1) for seconds, _ in results)
    report("4 TILs under a 5 s connection age", seconds=durations, after=split(after)[2].finish_reason)
    assert all(finished.til_json for _, finished in results)
    # The streams ran past the connection age (with gRPC's +-10% jitter) on both hops, so each
    # connection was aged while calls were open on it.
    assert durations[-1] > 5.5 * 2, "the TILs finished too fast to cross the connection age"


@pytest.mark.parametrize(
    ("service", "variable", "value"),
    [
        ("edge", "EDGE_MAX_CONNECTION_AGE_S", "-5"),
        ("edge", "EDGE_MAX_CONNECTION_AGE_GRACE_S", "soon"),
        ("generator", "GENERATOR_MAX_CONNECTION_AGE_S", "forever"),
        ("generator", "GENERATOR_MAX_CONNECTION_AGE_GRACE_S", "1e12"),
    ],
)
def test_a_bad_connection_age_stops_the_service_naming_the_variable(
    service: str, variable: str, value: str
) -> None:
    env = {
        **os.environ,
        variable: value,
        f"{service.upper()}_PORT": "0",
        f"{service.upper()}_METRICS_PORT": "0",
    }
    done = subprocess.run(
        [sys.executable, "-m", f"services.{service}"], env=env, capture_output=True, timeout=120, cwd=REPO
    )
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode != 0
    assert variable in stderr, stderr[-2000:]


# --- the cacher's Redis -----------------------------------------------------------------------------


def redis_children(pid: int) -> list[int]:
    """The cacher's redis-server children, zombies included (a zombie's cmdline is empty: match its name)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and name.startswith("redis-server"):
            found.append(int(entry.name))
    return found


def state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.fixture
def cacher(tmp_path: Path) -> Iterator[Any]:
    def start(**env: str) -> LocalStack:
        stack = LocalStack(
            data_dir=tmp_path,
            ports={"cacher": free_port()},
            metrics_ports={"cacher": free_port()},
            env={"cacher": env},
            services=("cacher",),
        )
        started.append(stack)
        return stack

    started: list[LocalStack] = []
    yield start
    for stack in started:
        stack.stop()


async def put_get_until_it_works(stub: Any, key: str, timeout_s: float) -> float:
    """Puts then gets `key` until both work; returns how long that took."""
    began = time.monotonic()
    while True:
        try:
            await stub.PutEntry(
                cacher_pb2.PutEntryRequest(namespace="til", key=key, value_json='{"n": 1}'), timeout=1
            )
            entry = await stub.GetEntry(cacher_pb2.GetEntryRequest(namespace="til", key=key), timeout=1)
            assert entry.found and entry.value_json == '{"n": 1}'
            return time.monotonic() - began
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc
            assert time.monotonic() - began < timeout_s, f"put and get still fail: {exc.details()}"
            await asyncio.sleep(0.1)


async def readiness(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=CACHER), timeout=1)).status


async def test_the_private_redis_server_killed_is_reaped_restarted_and_serves_again(cacher: Any) -> None:
    stack = cacher()
    await stack.start(timeout_s=60)
    pid = stack.processes["cacher"].process.pid  # type: ignore[union-attr]
    async with grpc.aio.insecure_channel(stack.address("cacher")) as channel:
        stub = cacher_pb2_grpc.CacherServiceStub(channel)
        await put_get_until_it_works(stub, "before", 5)
        [redis_pid] = redis_children(pid)
        # Readiness as the server pushes it (the standard health Watch): the restart can take well under
        # one Check round trip on a busy machine, so polling may never see the NOT_SERVING between.
        statuses: list[int] = []
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=CACHER))

        watching = asyncio.Event()

        async def follow() -> None:
            async for update in watch:
                statuses.append(update.status)
                watching.set()

        following = asyncio.create_task(follow())
        await asyncio.wait_for(watching.wait(), 5)
        os.kill(redis_pid, signal.SIGKILL)
        killed = time.monotonic()
        await put_get_until_it_works(stub, "after", 20)
        recovered_s = time.monotonic() - killed
        serving_again = await readiness(channel)
        for _ in range(100):  # readiness turns back on just after redis-server answers PING
            if serving_again == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.01)
            serving_again = await readiness(channel)
        [new_pid] = redis_children(pid)
        watch.cancel()
        await asyncio.gather(following, return_exceptions=True)
    log = stack.processes["cacher"].log_tail(40)
    report(
        "private redis-server SIGKILLed",
        put_get_again_after_s=round(recovered_s, 2),
        old=f"{redis_pid}:{state(redis_pid)}",
        new=new_pid,
    )
    assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses  # readiness dropped while it was down
    assert serving_again == health_pb2.HealthCheckResponse.SERVING
    assert new_pid != redis_pid and state(redis_pid) == "gone"  # reaped: no zombie left behind
    assert recovered_s < 20
    assert "exited with code -9" in log and "restarted" in log


async def test_a_redis_given_by_url_that_goes_away_is_reconnected(cacher: Any, redis_server: Any) -> None:
    stack = cacher(CACHER_REDIS_URL=redis_server.url)
    await stack.start(timeout_s=60)
    async with grpc.aio.insecure_channel(stack.address("cacher")) as channel:
        stub = cacher_pb2_grpc.CacherServiceStub(channel)
        await put_get_until_it_works(stub, "before", 5)
        redis_server.kill()
        went_down = time.monotonic()
        while await readiness(channel) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() - went_down < 5, "still SERVING with its Redis gone"
            await asyncio.sleep(0.1)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.GetEntry(cacher_pb2.GetEntryRequest(namespace="til", key="before"), timeout=2)
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
        redis_server.start()
        restarted = time.monotonic()
        await put_get_until_it_works(stub, "after", 20)
        recovered_s = time.monotonic() - restarted
        while await readiness(channel) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() - went_down < 30, "not SERVING again"
            await asyncio.sleep(0.1)
    report("redis by URL restarted", put_get_again_after_s=round(recovered_s, 2))


# --- edge workers -----------------------------------------------------------------------------------


def handled(metrics_port: int, method: str = "GenerateTil") -> float:
    """Calls of `method` that the process serving these metrics finished."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "grpc_server_handled_total" and s.labels.get("grpc_method") == method
    )


def free_port_pair() -> int:
    """A free port whose next one is free too (at the time of asking)."""
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


async def test_edge_workers_share_one_port_and_drain_on_sigterm(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("cacher", "retriever", "generator", "edge")}
    metrics = {name: free_port() for name in ports}
    metrics["edge"] = free_port_pair()  # worker i serves metrics on EDGE_METRICS_PORT + i
    stack = LocalStack(
        data_dir=tmp_path,
        ports=ports,
        metrics_ports=metrics,
        services=("cacher", "generator", "edge"),
        env={
            "generator": {"GENERATOR_BACKEND": "fake", "GENERATOR_FAKE_TOKEN_INTERVAL_S": "0.001"},
            "edge": {"EDGE_WORKERS": "2", "EDGE_RETRIEVAL_TOP_K": "0", "EDGE_INDEX_TILS": "false"},
        },
    )
    await stack.start(timeout_s=120)
    try:
        edge = stack.processes["edge"].process
        assert edge is not None
        workers = children(edge.pid)
        assert len(workers) == 2

        async def til(n: int) -> Any:  # a connection of its own: the kernel picks a worker for each
            own = [("grpc.use_local_subchannel_pool", 1)]  # else channels in one process share one
            async with grpc.aio.insecure_channel(stack.address("edge"), options=own) as channel:
                stub = edge_pb2_grpc.EdgeServiceStub(channel)
                return split(await read_all(stub.GenerateTil(til_request(f"w{n}"), timeout=60)))[2]

        try:
            finished = await asyncio.gather(*(til(n) for n in range(24)))
        except grpc.aio.AioRpcError:
            print("edge log:\n" + stack.processes["edge"].log_tail(60))
            raise
        per_worker = [handled(metrics["edge"]), handled(metrics["edge"] + 1)]
        report("2 edge workers on one port", tils=len(finished), handled_per_worker=per_worker)
        assert all(f.til_json for f in finished)
        assert sum(per_worker) == 24 and min(per_worker) > 0  # both workers took calls
        edge.send_signal(signal.SIGTERM)
        assert edge.wait(timeout=30) == 0
        assert all(state(pid) == "gone" for pid in workers)
    finally:
        stack.stop()


async def test_edge_workers_join_the_port_together_once_all_have_reached_the_generator(
    tmp_path: Path,
) -> None:
    """Pods start together: the edge's workers come up while the generator is not listening yet, and
    each backs off on its own. A worker listening before it reached the generator took calls and
    failed them UNAVAILABLE while another already said SERVING (CI, once). Now no worker listens until
    every one has reached the generator."""
    ports = {name: free_port() for name in ("cacher", "retriever", "generator", "edge")}
    metrics = {name: free_port() for name in ports}
    metrics["edge"] = free_port_pair()
    env = {
        "generator": {"GENERATOR_BACKEND": "fake", "GENERATOR_FAKE_TOKEN_INTERVAL_S": "0.001"},
        "edge": {"EDGE_WORKERS": "2", "EDGE_RETRIEVAL_TOP_K": "0", "EDGE_INDEX_TILS": "false"},
    }
    front = LocalStack(tmp_path / "front", ports, metrics, env, services=("cacher", "edge"))
    back = LocalStack(tmp_path / "back", ports, metrics, env, services=("generator",))
    try:
        for name in front.services:
            front.spawn(name)
        await asyncio.sleep(3)  # both workers have been refused by the generator's port, and back off
        with pytest.raises(ConnectionRefusedError):  # no worker on the port yet
            socket.create_connection(("127.0.0.1", ports["edge"]), timeout=5).close()
        await back.start(timeout_s=120)
        await front.wait_serving("edge", 120)

        async def til(n: int) -> Any:  # a connection of its own: the kernel picks a worker for each
            own = [("grpc.use_local_subchannel_pool", 1)]
            async with grpc.aio.insecure_channel(front.address("edge"), options=own) as channel:
                stub = edge_pb2_grpc.EdgeServiceStub(channel)
                return split(await read_all(stub.GenerateTil(til_request(f"early{n}"), timeout=60)))[2]

        finished = await asyncio.gather(*(til(n) for n in range(24)))
        per_worker = [handled(metrics["edge"]), handled(metrics["edge"] + 1)]
        assert all(f.til_json for f in finished)
        assert sum(per_worker) == 24 and min(per_worker) > 0  # both workers were listening
    finally:
        front.stop()
        back.stop()


async def test_generator_frontends_share_one_port_and_drain_on_sigterm(tmp_path: Path) -> None:
    """GENERATOR_FRONTENDS=2 on the fake backend (each front-end its own fake engine): the layout a vLLM
    engine core is shared in (processes, one port, signals, metrics ports), without vLLM."""
    metrics = free_port_pair()  # front-end i serves metrics on GENERATOR_METRICS_PORT + i
    stack = LocalStack(
        data_dir=tmp_path,
        ports={"generator": free_port()},
        metrics_ports={"generator": metrics},
        services=("generator",),
        env={
            "generator": {
                "GENERATOR_BACKEND": "fake",
                "GENERATOR_FAKE_TOKEN_INTERVAL_S": "0.001",
                "GENERATOR_FRONTENDS": "2",
            }
        },
    )
    await stack.start(timeout_s=120)
    try:
        supervisor = stack.processes["generator"].process
        assert supervisor is not None
        children_now = children(supervisor.pid)
        # The spawned front-ends (multiprocessing may start its resource tracker beside them).
        frontends = [pid for pid in children_now if "resource_tracker" not in cmdline(pid)]
        assert len(frontends) == 2, [cmdline(pid) for pid in children_now]

        async def generate(n: int) -> str:  # a connection of its own: the kernel picks a front-end
            own = [("grpc.use_local_subchannel_pool", 1)]
            async with grpc.aio.insecure_channel(stack.address("generator"), options=own) as channel:
                stub = generator_pb2_grpc.GeneratorServiceStub(channel)
                request = generator_pb2.GenerateRequest(
                    prompt=f"p{n}", stopping=common_pb2.StoppingCriteria(max_tokens=8)
                )
                text = ""
                async for reply in stub.Generate(request, timeout=60):
                    if reply.HasField("delta"):
                        text += reply.delta.text
                return text

        try:
            texts = await asyncio.gather(*(generate(n) for n in range(24)))
        except grpc.aio.AioRpcError:
            print("generator log:\n" + stack.processes["generator"].log_tail(60))
            raise
        per_frontend = [handled(metrics, "Generate"), handled(metrics + 1, "Generate")]
        report("2 generator front-ends on one port", calls=len(texts), handled_per_frontend=per_frontend)
        assert all(texts)
        assert sum(per_frontend) == 24 and min(per_frontend) > 0  # both front-ends took calls
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0
        assert all(state(pid) == "gone" for pid in frontends)
    finally:
        stack.stop()


def children(pid: int) -> list[int]:
    """The pids of `pid`'s child processes (Linux)."""
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
