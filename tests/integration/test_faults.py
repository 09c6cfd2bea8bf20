"""The fault suite: the four services as real processes with a real redis-server, each promise of the
resilience and security work shown under the failure it is about.

Two stacks. The first runs the real generator (llama.cpp, SmolLM2-135M) in plaintext: cancellation,
deadlines and shared generations are shown on the engine that matters. The second runs the generator's
fake engine (schema-shaped output at a fixed pace, so timing is controlled) with mutual TLS between all
services and bearer tokens at the edge: TLS refusals, tokens, overload, secrets, Redis dying under
load, fuzzing, and the SIGTERM drain. Each test prints what it measured (`pytest -s` shows it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from til.v1 import (
    common_pb2,
    edge_pb2,
    edge_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    retriever_pb2,
    retriever_pb2_grpc,
)

from services.stack import SERVICE_NAMES, LocalStack

pytestmark = pytest.mark.integration

DATE = "2026-11-24"
GENERATOR = "til.v1.GeneratorService"


def small_diff(tag: str, lines: int = 3) -> str:
    """A short diff, different for each tag (so its cache key and prompt are its own)."""
    body = "".join(f"+    ttl_{tag}_{i} = {60 * (i + 1)}\n" for i in range(lines))
    return (
        f"diff --git a/app/cache_{tag}.py b/app/cache_{tag}.py\n"
        f"--- a/app/cache_{tag}.py\n+++ b/app/cache_{tag}.py\n"
        f"@@ -1,2 +1,{lines + 2} @@ def configure():\n"
        f"     client = connect()\n{body}     return client\n"
    )


def til_request(tag: str, **fields: Any) -> edge_pb2.GenerateTilRequest:
    return edge_pb2.GenerateTilRequest(
        **{"diff": small_diff(tag), "commit_messages": [f"Cache TTL {tag}"], "date": DATE, **fields}
    )


def tokens(n: int) -> edge_pb2.GenerationOverrides:
    return edge_pb2.GenerationOverrides(max_tokens=n)


# --- measuring the processes ------------------------------------------------------------------------


def scrape(stack: LocalStack, service: str) -> list[tuple[str, dict[str, str], float]]:
    port = stack.processes[service].metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def metric(stack: LocalStack, service: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(
        value
        for sample, sample_labels, value in scrape(stack, service)
        if sample == name and labels.items() <= sample_labels.items()
    )


async def until(condition: Any, timeout_s: float, what: str, every_s: float = 0.02) -> float:
    """Polls `condition` until it holds; returns how long that took."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s}s")
        await asyncio.sleep(every_s)
    return time.monotonic() - began


def engine_idle(stack: LocalStack) -> bool:
    """The generator runs and queues nothing, and neither service has a call in flight."""
    return (
        metric(stack, "generator", "tilserve_generator_requests_running") == 0
        and metric(stack, "generator", "tilserve_generator_requests_waiting") == 0
        and metric(stack, "generator", "grpc_server_in_flight", grpc_method="Generate") == 0
        and metric(stack, "edge", "grpc_server_in_flight", grpc_method="GenerateTil") == 0
    )


def generations(stack: LocalStack) -> float:
    return metric(
        stack, "generator", "grpc_server_handled_total", grpc_service=GENERATOR, grpc_method="Generate"
    )


async def read_all(call: Any) -> list[Any]:
    messages = []
    while (message := await call.read()) is not grpc.aio.EOF:
        messages.append(message)
    return messages


def split(messages: Sequence[Any]) -> tuple[Any, list[Any], Any]:
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds[0] == "started" and kinds[-1] == "finished", kinds
    return messages[0].started, [m.delta for m in messages[1:-1]], messages[-1].finished


def report(what: str, **numbers: Any) -> None:
    print(f"\n[faults] {what}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


# =====================================================================================================
# Stack 1: the real llama.cpp generator, plaintext.
# =====================================================================================================


@pytest.fixture(scope="module")
async def llama_stack(stack_factory: Any, redis_server: Any) -> AsyncIterator[LocalStack]:
    stack = stack_factory(
        cacher={"CACHER_REDIS_URL": redis_server.url},
        # Small prompt batches: a cancelled or expired request stops between batches of 64 tokens.
        generator={"GENERATOR_N_BATCH": "64", "GENERATOR_MAX_WAITING_REQUESTS": "128"},
    )
    await stack.start(timeout_s=240)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
async def llama_edge(llama_stack: LocalStack) -> AsyncIterator[edge_pb2_grpc.EdgeServiceStub]:
    async with grpc.aio.insecure_channel(llama_stack.address("edge")) as channel:
        yield edge_pb2_grpc.EdgeServiceStub(channel)


@pytest.mark.model
async def test_identical_concurrent_misses_start_one_generation(
    llama_stack: LocalStack, llama_edge: edge_pb2_grpc.EdgeServiceStub, redis_server: Any
) -> None:
    request = til_request("shared", generation=tokens(24))
    before = generations(llama_stack)
    keys_before = set(redis.Redis(port=redis_server.port).keys("*"))
    began = time.monotonic()
    results = await asyncio.gather(
        *(read_all(llama_edge.GenerateTil(request, timeout=120)) for _ in range(50))
    )
    elapsed = time.monotonic() - began
    streams = [split(r) for r in results]
    texts = {"".join(d.text for d in deltas) for _, deltas, _ in streams}
    report(
        "50 identical concurrent misses",
        generations=generations(llama_stack) - before,
        distinct_outputs=len(texts),
        seconds=round(elapsed, 2),
    )
    assert generations(llama_stack) - before == 1
    assert len(texts) == 1 and len({f.til_json for _, _, f in streams}) == 1
    assert len({s.request_id for s, _, _ in streams}) == 50

    # 24 tokens cut the TIL short: a truncated result is never stored, so the same request misses again.
    assert streams[0][2].finish_reason == common_pb2.FINISH_REASON_LENGTH
    await asyncio.sleep(0.5)  # a store would run in the background after the stream
    assert set(redis.Redis(port=redis_server.port).keys("*")) == keys_before
    again = split(await read_all(llama_edge.GenerateTil(request, timeout=120)))
    assert again[0].cache_status == edge_pb2.CACHE_STATUS_MISS


@pytest.mark.model
async def test_hundred_cancelled_calls_leave_no_engine_request_within_a_second(
    llama_stack: LocalStack, llama_edge: edge_pb2_grpc.EdgeServiceStub
) -> None:
    request = til_request("cancel", generation=tokens(512), cache_policy=edge_pb2.CACHE_POLICY_BYPASS)
    calls = [llama_edge.GenerateTil(request, timeout=300) for _ in range(100)]
    first_text = asyncio.Event()

    async def watch(call: Any) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            while (message := await call.read()) is not grpc.aio.EOF:
                if message.WhichOneof("event") == "delta":
                    first_text.set()

    watchers = [asyncio.ensure_future(watch(call)) for call in calls]
    # One request generates on llama.cpp (it runs one at a time); 99 wait for it in the generator.
    await until(
        lambda: metric(llama_stack, "generator", "tilserve_generator_requests_waiting") == 99,
        60,
        "99 calls queued in the generator",
    )
    await asyncio.wait_for(first_text.wait(), 60)
    assert metric(llama_stack, "generator", "tilserve_generator_requests_running") == 1
    aborted_before = metric(llama_stack, "generator", "tilserve_generator_requests_aborted_total")

    for call in calls:
        call.cancel()
    idle_after = await until(lambda: engine_idle(llama_stack), 1.0, "engine idle after 100 cancels")
    await asyncio.gather(*watchers)
    aborted = metric(llama_stack, "generator", "tilserve_generator_requests_aborted_total") - aborted_before
    report("100 cancels", seconds_until_no_engine_request=round(idle_after, 3), generator_aborts=aborted)
    assert aborted >= 1  # the running generation was stopped, not left to finish
    # The engine is free at once for the next call.
    _, _, finished = split(
        await read_all(llama_edge.GenerateTil(til_request("after-cancel", generation=tokens(4))))
    )
    assert finished.usage.completion_tokens == 4


@pytest.mark.model
async def test_the_callers_deadline_is_honoured_at_each_hop(
    llama_stack: LocalStack, llama_edge: edge_pb2_grpc.EdgeServiceStub
) -> None:
    def aborted(reason: str | None = None) -> float:
        labels = {"reason": reason} if reason else {}
        return metric(llama_stack, "generator", "tilserve_generator_requests_aborted_total", **labels)

    # Through the edge: 512 tokens take ~15 s; the caller allows 3. The edge hands the generator the
    # time left (a unit test checks the value), so both stop at the same moment: which of the
    # generator's deadline timer and the edge's cancel lands first is a matter of microseconds.
    before = aborted()
    request = til_request("deadline", generation=tokens(512), cache_policy=edge_pb2.CACHE_POLICY_BYPASS)
    began = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await read_all(llama_edge.GenerateTil(request, timeout=3.0))
    late_s = time.monotonic() - began - 3.0
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    idle_s = await until(lambda: engine_idle(llama_stack), 2.0, "engine idle after the deadline")
    assert aborted() == before + 1  # the generation was stopped, not run to its 512 tokens

    # Straight to the generator: its own deadline stops the engine.
    by_deadline = aborted("deadline")
    async with grpc.aio.insecure_channel(llama_stack.address("generator")) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        direct = generator_pb2.GenerateRequest(
            prompt="Write a long story about caches.", stopping={"max_tokens": 512, "ignore_eos": True}
        )
        began = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as direct_raised:
            [r async for r in stub.Generate(direct, timeout=1.5)]
        direct_late_s = time.monotonic() - began - 1.5
    assert direct_raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    direct_idle_s = await until(
        lambda: engine_idle(llama_stack), 2.0, "engine idle after the direct deadline"
    )

    # A deadline shorter than the cache and retrieval work: DEADLINE_EXCEEDED at once.
    began = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as short:
        await read_all(llama_edge.GenerateTil(til_request("short-deadline"), timeout=0.05))
    short_s = time.monotonic() - began
    await until(lambda: engine_idle(llama_stack), 2.0, "engine idle after the short deadline")
    report(
        "deadlines",
        edge_status_late_s=round(late_s, 3),
        engine_idle_after_s=round(idle_s, 3),
        direct_status_late_s=round(direct_late_s, 3),
        direct_engine_idle_after_s=round(direct_idle_s, 3),
        short_deadline_status_s=round(short_s, 3),
    )
    assert short.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert late_s < 0.3 and direct_late_s < 0.3 and short_s < 0.3
    assert aborted("deadline") >= by_deadline + 1


@pytest.mark.model
async def test_tils_still_stream_when_the_retriever_is_killed(
    llama_stack: LocalStack, llama_edge: edge_pb2_grpc.EdgeServiceStub
) -> None:
    llama_stack.kill("retriever")
    request = til_request("no-retriever", generation=tokens(8), cache_policy=edge_pb2.CACHE_POLICY_BYPASS)
    results = [split(await read_all(llama_edge.GenerateTil(request, timeout=120))) for _ in range(4)]
    for started, deltas, finished in results:
        assert started.retrieval_status == edge_pb2.RETRIEVAL_STATUS_UNAVAILABLE
        assert any(n.startswith("retriever unavailable") for n in started.notices), started.notices
        assert deltas and finished.usage.completion_tokens == 8
    # After three failures the breaker skips the retriever without a network call.
    assert "skipped after" in " ".join(results[-1][0].notices)
    async with grpc.aio.insecure_channel(llama_stack.address("edge")) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAMES["edge"]), timeout=5
        )
    assert health.status == health_pb2.HealthCheckResponse.SERVING


# =====================================================================================================
# Stack 2: the fake engine, mutual TLS everywhere, bearer tokens at the edge.
# =====================================================================================================

TOKENS = {
    "alice": "alice-token-0123456789",
    "bob": "bob-token-0123456789ab",
    "ops": "ops-token-0123456789abc",
}
AWS_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a certificate for the services (localhost, 127.0.0.1), and one for their clients."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificates")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=tilserve-test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", "san.ext", "-out", f"{name}.pem", cwd=d)  # fmt: skip
    return d


@dataclass
class Secure:
    stack: LocalStack
    pki: Path

    def credentials(self, *, client_cert: bool = True) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=(self.pki / "ca.pem").read_bytes(),
            private_key=(self.pki / "client.key").read_bytes() if client_cert else None,
            certificate_chain=(self.pki / "client.pem").read_bytes() if client_cert else None,
        )

    def channel(self, service: str, *, client_cert: bool = True) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(self.stack.address(service), self.credentials(client_cert=client_cert))


def as_(who: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[who]}"),)


async def wait_serving_tls(secure: Secure, name: str, timeout_s: float) -> None:
    proc = secure.stack.processes[name]
    deadline = time.monotonic() + timeout_s
    async with secure.channel(name) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            assert proc.process is not None
            if proc.process.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.process.returncode}:\n{proc.log_tail()}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAMES[name]), timeout=1
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not SERVING after {timeout_s}s:\n{proc.log_tail()}")
            await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
async def secure(stack_factory: Any, redis_server: Any, pki: Path) -> AsyncIterator[Secure]:
    def tls(prefix: str) -> dict[str, str]:
        return {
            f"{prefix}_TLS_CERT_FILE": str(pki / "server.pem"),
            f"{prefix}_TLS_KEY_FILE": str(pki / "server.key"),
            f"{prefix}_TLS_CLIENT_CA_FILE": str(pki / "ca.pem"),
            f"{prefix}_LOG_LEVEL": "DEBUG",  # secrets must stay out of even the most detailed logs
        }

    stack = stack_factory(
        cacher={**tls("CACHER"), "CACHER_REDIS_URL": redis_server.url},
        retriever=tls("RETRIEVER"),
        generator={
            **tls("GENERATOR"),
            "GENERATOR_BACKEND": "fake",
            "GENERATOR_FAKE_TOKEN_INTERVAL_S": "0.04",
        },
        edge={
            **tls("EDGE"),
            "EDGE_PEER_TLS_CA_FILE": str(pki / "ca.pem"),
            "EDGE_PEER_TLS_CERT_FILE": str(pki / "client.pem"),
            "EDGE_PEER_TLS_KEY_FILE": str(pki / "client.key"),
            "EDGE_AUTH_TOKENS": ",".join(f"{who}:{token}" for who, token in TOKENS.items()),
            "EDGE_ADMIN_IDENTITIES": "ops",
            "EDGE_MAX_ACTIVE": "24",
            "EDGE_MAX_WAITING": "8",
            "EDGE_MAX_ACTIVE_PER_CLIENT": "16",
            "EDGE_RETRY_AFTER_S": "0.5",
            "EDGE_BREAKER_COOL_DOWN_S": "1",
            "EDGE_GRACE_PERIOD_S": "30",
        },
    )
    wrapped = Secure(stack, pki)
    try:
        for name in stack.services:
            stack.spawn(name)
        for name in stack.services:
            await wait_serving_tls(wrapped, name, 240)
    except BaseException:
        stack.stop()
        raise
    yield wrapped
    stack.stop()


@contextlib.asynccontextmanager
async def edge_stub(secure: Secure) -> AsyncIterator[edge_pb2_grpc.EdgeServiceStub]:
    async with secure.channel("edge") as channel:
        yield edge_pb2_grpc.EdgeServiceStub(channel)


async def test_mutual_tls_refuses_clients_without_a_certificate(secure: Secure) -> None:
    for name in ("edge", "generator", "retriever", "cacher"):
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAMES[name])
        async with secure.channel(name, client_cert=False) as no_cert:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_pb2_grpc.HealthStub(no_cert).Check(request, timeout=5)
        async with grpc.aio.insecure_channel(secure.stack.address(name)) as plaintext:
            with pytest.raises(grpc.aio.AioRpcError) as refused_plain:
                await health_pb2_grpc.HealthStub(plaintext).Check(request, timeout=5)
        async with secure.channel(name) as with_cert:
            reply = await health_pb2_grpc.HealthStub(with_cert).Check(request, timeout=5)
        assert refused.value.code() is refused_plain.value.code() is grpc.StatusCode.UNAVAILABLE, name
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


async def test_the_edge_checks_bearer_tokens_and_owners(secure: Secure) -> None:
    async with edge_stub(secure) as edge:
        outcomes = {}
        for label, metadata, owner in [
            ("no token", (), ""),
            ("wrong token", (("authorization", "Bearer not-a-valid-token-000"),), ""),
            ("alice as bob", as_("alice"), "bob"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await read_all(
                    edge.GenerateTil(til_request("auth", owner=owner), metadata=metadata, timeout=10)
                )
            outcomes[label] = raised.value.code()
        _, _, finished = split(await read_all(edge.GenerateTil(til_request("auth"), metadata=as_("alice"))))
        # The retriever's first search after it starts is slow (cold model): check the next call's.
        started, _, _ = split(await read_all(edge.GenerateTil(til_request("auth-2"), metadata=as_("alice"))))
    assert outcomes == {
        "no token": grpc.StatusCode.UNAUTHENTICATED,
        "wrong token": grpc.StatusCode.UNAUTHENTICATED,
        "alice as bob": grpc.StatusCode.PERMISSION_DENIED,
    }
    assert finished.til_json  # the edge reached every peer over mutual TLS
    assert started.retrieval_status == edge_pb2.RETRIEVAL_STATUS_OK
    assert started.cache_status == edge_pb2.CACHE_STATUS_MISS


async def test_overload_is_refused_fast_while_admitted_streams_complete(secure: Secure) -> None:
    async with edge_stub(secure) as edge:

        def call(who: str, i: int) -> Any:
            request = til_request(f"load-{who}-{i}", cache_policy=edge_pb2.CACHE_POLICY_BYPASS)
            return edge.GenerateTil(request, metadata=as_(who), timeout=60)

        admitted = [call("alice", i) for i in range(16)]
        for c in admitted:
            await c.wait_for_connection()
        await until(
            lambda: metric(secure.stack, "edge", "tilserve_admission_active", pool="edge") == 16,
            10,
            "alice's 16 running",
        )
        admitted += [call("bob", i) for i in range(16)]  # 8 run, 8 wait: the edge is full
        await until(
            lambda: metric(secure.stack, "edge", "tilserve_admission_waiting", pool="edge") == 8,
            10,
            "8 waiting",
        )
        refusals: list[tuple[str, float, Any]] = []
        for i in range(20):
            who = "alice" if i % 2 else "ops"  # alice is at her own limit; ops finds the edge full
            began = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await read_all(call(who, 100 + i))
            refusals.append((who, time.monotonic() - began, raised.value))
        results = await asyncio.gather(*(read_all(c) for c in admitted))

    latencies = sorted(seconds for _, seconds, _ in refusals)
    report(
        "overload",
        refused=len(refusals),
        refusal_ms_median=round(latencies[len(latencies) // 2] * 1000, 1),
        refusal_ms_max=round(latencies[-1] * 1000, 1),
        admitted_completed=sum(1 for r in results if r[-1].WhichOneof("event") == "finished"),
    )
    for who, _, error in refusals:
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("retry-after-ms", "500") in tuple(error.trailing_metadata() or ())
        assert ("caller 'alice'" in error.details()) == (who == "alice")
    assert latencies[int(len(latencies) * 0.9)] < 0.05
    assert all(split(r)[2].til_json for r in results)


async def test_a_planted_secret_reaches_no_log_cache_index_or_prompt(
    secure: Secure, redis_server: Any
) -> None:
    diff = small_diff("secret") + (
        "diff --git a/deploy/prod.env b/deploy/prod.env\n--- a/deploy/prod.env\n+++ b/deploy/prod.env\n"
        f"@@ -0,0 +1,2 @@\n+AWS_ACCESS_KEY_ID={AWS_ID}\n+aws_secret_access_key = {AWS_SECRET}\n"
    )
    request = edge_pb2.GenerateTilRequest(diff=diff, commit_messages=[f"Add key {AWS_ID}"], date=DATE)
    async with edge_stub(secure) as edge:
        messages = await read_all(edge.GenerateTil(request, metadata=as_("alice"), timeout=30))
    started, _, finished = split(messages)
    # The fake model echoes the end of its prompt: the prompt held the markers, not the keys.
    content = json.loads(finished.til_json)["content"]
    assert "+AWS_ACCESS_KEY_ID=[REDACTED:aws-access-key-id]" in content
    assert any("aws-access-key-id" in n and "aws-secret-access-key" in n for n in started.notices)

    # The cache store and the index upsert run after the stream, in the background.
    client = redis.Redis(port=redis_server.port)

    def cached_values() -> list[bytes]:
        return [client.get(key) or b"" for key in client.keys("*")]

    await until(
        lambda: any(b"[REDACTED:aws-access-key-id]" in v for v in cached_values()), 10, "the TIL cached", 0.1
    )
    cached = cached_values()
    async with secure.channel("retriever") as channel:
        stub = retriever_pb2_grpc.RetrieverServiceStub(channel)
        indexed = None
        for _ in range(100):
            with contextlib.suppress(grpc.aio.AioRpcError):
                indexed = await stub.GetDocument(
                    retriever_pb2.GetDocumentRequest(id=finished.til_id), timeout=5
                )
                break
            await asyncio.sleep(0.1)
    assert indexed is not None, "the TIL was not indexed"
    qdrant = b"".join(p.read_bytes() for p in (secure.stack.data_dir / "qdrant").rglob("*") if p.is_file())
    logs = b"".join(p.log_path.read_bytes() for p in secure.stack.processes.values())
    places = {
        "stream": b"".join(m.SerializeToString() for m in messages),
        "cache": b"".join(cached),
        "index": indexed.SerializeToString() + qdrant,
        "logs": logs,
    }
    report("planted secret", **{where: len(data) for where, data in places.items()})
    assert any(b"[REDACTED:aws-access-key-id]" in value for value in cached)
    assert "[REDACTED:aws-access-key-id]" in indexed.document.text
    for where, data in places.items():
        for secret in (AWS_ID, AWS_SECRET):
            assert secret.encode() not in data, f"{secret[:6]}... found in {where}"


async def test_redis_killed_under_load_fails_no_til_and_hits_resume(
    secure: Secure, redis_server: Any
) -> None:
    failures: list[BaseException] = []
    seen: list[tuple[float, int, float]] = []  # (when, cache status, seconds until started)
    stop = asyncio.Event()

    async with edge_stub(secure) as edge:

        async def worker(n: int) -> None:
            i = 0
            while not stop.is_set():
                request = til_request(f"redis-{(n + i) % 4}", generation=tokens(200))
                began = time.monotonic()
                try:
                    call = edge.GenerateTil(request, metadata=as_("bob"), timeout=30)
                    first = await call.read()
                    seen.append((began, first.started.cache_status, time.monotonic() - began))
                    split([first, *await read_all(call)])
                except BaseException as exc:
                    failures.append(exc)
                i += 1

        workers = [asyncio.ensure_future(worker(n)) for n in range(6)]
        await asyncio.sleep(3)
        killed_at = time.monotonic()
        redis_server.kill()
        # The workers' four repeating TILs mostly join generations in progress, which make no look-up
        # of their own; five new TILs one after another each look the dead cache up (or are skipped).
        await asyncio.sleep(0.3)
        probes = []
        for k in range(5):
            call = edge.GenerateTil(
                til_request(f"redis-probe-{k}", generation=tokens(8)), metadata=as_("bob"), timeout=30
            )
            probes.append(split(await read_all(call))[0].cache_status)
        await asyncio.sleep(max(0.0, killed_at + 4 - time.monotonic()))
        restarted_at = time.monotonic()
        redis_server.start()
        hits_resumed = await until(
            lambda: any(
                when > restarted_at and status == edge_pb2.CACHE_STATUS_HIT for when, status, _ in seen
            ),
            20,
            "cache hits after Redis came back",
            every_s=0.1,
        )
        stop.set()
        await asyncio.gather(*workers)

    during = [(status, s) for when, status, s in seen if killed_at + 0.1 < when < restarted_at]

    def unavailable_lookups(le: str | None = None) -> float:
        name = "tilserve_edge_cache_lookup_seconds_" + ("bucket" if le else "count")
        labels = {"namespace": "til", "status": "unavailable", **({"le": le} if le else {})}
        return metric(secure.stack, "edge", name, **labels)

    skipped = metric(secure.stack, "edge", "tilserve_edge_breaker_skipped_total", dependency="cacher")
    report(
        "redis killed under load",
        tils=len(seen),
        failed=len(failures),
        during_outage=len(during),
        unavailable_lookups=unavailable_lookups(),
        of_them_within_10ms=unavailable_lookups("0.01"),
        within_100ms=unavailable_lookups("0.1"),
        breaker_skips=skipped,
        probes=len(probes),
        hits_resumed_after_s=round(hits_resumed, 2),
    )
    assert failures == []
    assert during and all(status == edge_pb2.CACHE_STATUS_UNAVAILABLE for status, _ in during)
    assert probes == [edge_pb2.CACHE_STATUS_UNAVAILABLE] * 5
    assert skipped > 0  # after EDGE_BREAKER_FAILURES (3) the breaker stopped calling the dead cache
    # Every look-up of the dead cache gave up by its 100 ms timeout (EDGE_CACHE_TIMEOUT_S), most at once:
    # within the next bucket, 250 ms, since one that runs to its timeout ends a little after 100 ms.
    # (Calls that joined an identical generation in progress made no look-up of their own.)
    assert unavailable_lookups() > 0 and unavailable_lookups("0.25") == unavailable_lookups()


async def test_fuzzed_requests_get_clear_statuses_from_the_real_processes(secure: Secure) -> None:
    from tests.unit.test_fuzz import RPCS, SERVICES, fill, message_values

    accepted = {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
    }
    loop = asyncio.get_running_loop()
    channels = {name: secure.channel(name) for name in SERVICES}
    seen: dict[str, int] = {}

    async def send(name: str, method: Any, data: bytes) -> tuple[grpc.StatusCode, str]:
        path = f"/{SERVICES[name].full_name}/{method.name}"
        metadata = as_("alice") if name == "edge" else ()
        try:
            if method.server_streaming:
                call = channels[name].unary_stream(path)(data, metadata=metadata, timeout=30)
                await read_all(call)
            else:
                await channels[name].unary_unary(path)(data, metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""

    def fuzz(name: str, method: Any, strategy: Any) -> None:
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
        @given(strategy)
        def check(data: bytes) -> None:
            code, details = asyncio.run_coroutine_threadsafe(send(name, method, data), loop).result(60)
            seen[code.name] = seen.get(code.name, 0) + 1
            if code is grpc.StatusCode.RESOURCE_EXHAUSTED and len(data) > 1024 * 1024:
                # The transport's own answer to a message above the server's max_message_bytes.
                assert "larger than max" in details, details
                return
            assert code in accepted, f"{name}.{method.name} -> {code.name}: {details}"

        check()

    for name, method in RPCS:
        await asyncio.to_thread(fuzz, name, method, st.binary(max_size=512))
        # Random requests too (built from nothing: valid ones would each stream a whole TIL).
        cls = message_factory.GetMessageClass(method.input_type)
        requests = message_values(method.input_type).map(
            lambda v, cls=cls: fill(cls(), v).SerializeToString()
        )
        await asyncio.to_thread(fuzz, name, method, requests)
    for channel in channels.values():
        await channel.close()
    report("fuzz on the real processes", **seen)
    for name in SERVICES:
        await wait_serving_tls(secure, name, 5)
        process = secure.stack.processes[name].process
        assert process is not None and process.poll() is None, f"{name} died"


async def test_sigterm_drains_twenty_streams_then_exits_zero(secure: Secure) -> None:
    """Runs last in this stack: it stops the edge and the generator."""
    stack = secure.stack
    async with edge_stub(secure) as edge:
        calls = [
            edge.GenerateTil(
                til_request(f"drain-{i}", cache_policy=edge_pb2.CACHE_POLICY_BYPASS),
                metadata=as_("alice" if i % 2 else "bob"),
                timeout=60,
            )
            for i in range(20)
        ]
        firsts = [await c.read() for c in calls]
        assert all(f.WhichOneof("event") == "started" for f in firsts)
        began = time.monotonic()
        for name in ("edge", "generator"):
            process = stack.processes[name].process
            assert process is not None
            process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        # New calls are refused while the in-flight ones finish.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await read_all(edge.GenerateTil(til_request("drain-new"), metadata=as_("ops"), timeout=5))
        rests = await asyncio.gather(*(read_all(c) for c in calls), return_exceptions=True)
        drained_s = time.monotonic() - began
    codes = {}
    for name in ("edge", "generator"):
        process = stack.processes[name].process
        assert process is not None
        codes[name] = await asyncio.to_thread(process.wait, 35)
    completed = [r for r in rests if isinstance(r, list) and r and r[-1].WhichOneof("event") == "finished"]
    report(
        "SIGTERM drain",
        in_flight=len(calls),
        completed=len(completed),
        drained_s=round(drained_s, 2),
        exit=codes,
    )
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert len(completed) == 20, [r for r in rests if not isinstance(r, list)]
    assert codes == {"edge": 0, "generator": 0}


# --- The retriever's Edge shard: a SIGKILL mid-write, a damaged shard, its size in the metrics ---------


def retriever_only(tmp: Path) -> LocalStack:
    from services.stack import free_port

    return LocalStack(
        data_dir=tmp,
        ports={"retriever": free_port()},
        metrics_ports={"retriever": free_port()},
        services=("retriever",),
    )


def shard_docs(start: int, count: int) -> list[retriever_pb2.Document]:
    return [
        retriever_pb2.Document(
            id=f"kill-{n:05d}",
            kind=retriever_pb2.DOCUMENT_KIND_TIL,
            owner="alice",
            text=f"트랜잭션 격리 수준 {n}번째 노트: asyncio.Queue 와 retry_with_backoff 를 정리했다.",
        )
        for n in range(start, start + count)
    ]


@pytest.mark.model
async def test_the_retriever_shard_survives_sigkill_mid_write(tmp_path: Path) -> None:
    stack = retriever_only(tmp_path)
    await stack.start(timeout_s=180)
    acknowledged: list[str] = []
    try:
        async with grpc.aio.insecure_channel(stack.address("retriever")) as channel:
            stub = retriever_pb2_grpc.RetrieverServiceStub(channel)

            async def write_forever() -> None:
                n = 0
                while True:
                    request = retriever_pb2.UpsertDocumentsRequest(documents=shard_docs(n, 16))
                    response = await stub.UpsertDocuments(request, timeout=30)
                    acknowledged.extend(response.ids)
                    n += 16

            writer = asyncio.create_task(write_forever())
            await until(lambda: len(acknowledged) >= 96, 120, "96 acknowledged documents")
            assert metric(stack, "retriever", "tilserve_retriever_index_disk_bytes") > 0
            stack.kill("retriever")  # SIGKILL while the writer has its next batch in flight
            with pytest.raises(grpc.aio.AioRpcError):
                await writer
    finally:
        stack.stop()

    restarted = retriever_only(tmp_path)
    await restarted.start(timeout_s=180)
    try:
        async with grpc.aio.insecure_channel(restarted.address("retriever")) as channel:
            stub = retriever_pb2_grpc.RetrieverServiceStub(channel)
            for doc_id in acknowledged:  # every write that was answered is there
                got = await stub.GetDocument(retriever_pb2.GetDocumentRequest(id=doc_id, owner="alice"))
                assert got.document.id == doc_id
            search = retriever_pb2.SearchDocumentsRequest(
                query=f"{len(acknowledged) - 1}번째 노트",
                top_k=3,
                filter=retriever_pb2.SearchFilter(owner="alice"),
            )
            hits = (await stub.SearchDocuments(search, timeout=10)).hits
            assert hits and hits[0].document.id == acknowledged[-1]
        report(
            "retriever SIGKILL mid-write",
            acknowledged=len(acknowledged),
            found_after_restart=len(acknowledged),
        )
    finally:
        restarted.stop()


@pytest.mark.model
@pytest.mark.parametrize(
    ("damage", "words"),
    [
        ("config", "edge_config.json is missing"),
        ("segments", "lost its segments folder"),
        ("garbage", "cannot be loaded"),
    ],
)
async def test_a_damaged_shard_stops_the_retriever_with_a_clear_message(
    tmp_path: Path, damage: str, words: str
) -> None:
    stack = retriever_only(tmp_path)
    await stack.start(timeout_s=180)
    async with grpc.aio.insecure_channel(stack.address("retriever")) as channel:
        await retriever_pb2_grpc.RetrieverServiceStub(channel).UpsertDocuments(
            retriever_pb2.UpsertDocumentsRequest(documents=shard_docs(0, 4))
        )
    assert stack.stop() == {"retriever": 0}
    shard = tmp_path / "qdrant" / "til_documents"
    if damage == "config":
        (shard / "edge_config.json").unlink()
    elif damage == "segments":
        shutil.rmtree(shard / "segments")
    else:
        for segment in (shard / "segments").iterdir():
            for path in segment.rglob("*"):
                if path.is_file():
                    path.write_bytes(b"\xff" * 64)
    again = retriever_only(tmp_path)
    with pytest.raises(RuntimeError) as failed:
        await again.start(timeout_s=120)
    assert words in str(failed.value), str(failed.value)
    assert "RETRIEVER_QDRANT_PATH" in str(failed.value) or "restore" in str(failed.value)
