"""The cacher servicer and RedisStore through real stubs, against a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from til.v1 import cacher_pb2, cacher_pb2_grpc

from services.cacher.__main__ import SERVICE_NAME
from services.cacher.config import CacherSettings
from services.cacher.embedded import EmbeddedRedis
from services.cacher.servicer import CacherServicer
from services.cacher.store import RedisStore
from services.common.errors import Unavailable
from services.common.server import Service
from services.common.settings import load_settings
from tests.conftest import in_process_server

pytestmark = pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server on PATH")

INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def settings(**overrides: object) -> CacherSettings:
    values: dict[str, object] = {"port": 0, "metrics_port": 0, "key_prefix": f"t{uuid.uuid4().hex[:8]}"}
    return CacherSettings(**(values | overrides))  # type: ignore[arg-type]


def store_for(url: str, config: CacherSettings) -> RedisStore:
    return RedisStore.from_url(
        url,
        key_prefix=config.key_prefix,
        op_timeout_s=config.op_timeout_s,
        connect_timeout_s=config.connect_timeout_s,
        max_connections=config.max_connections,
    )


@contextlib.asynccontextmanager
async def cacher(url: str, config: CacherSettings) -> AsyncIterator[cacher_pb2_grpc.CacherServiceStub]:
    store = store_for(url, config)
    servicer = CacherServicer(store, config)
    service = Service(
        SERVICE_NAME, lambda server: cacher_pb2_grpc.add_CacherServiceServicer_to_server(servicer, server)
    )
    try:
        async with in_process_server([service]) as (_, channel):
            yield cacher_pb2_grpc.CacherServiceStub(channel)
    finally:
        await store.close()


@pytest_asyncio.fixture(scope="module")
async def redis_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    async with EmbeddedRedis(directory=tmp_path_factory.mktemp("redis")) as redis:
        yield redis.url


@pytest_asyncio.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def config() -> CacherSettings:
    return settings(default_ttl_s=3600, max_ttl_s=86400, max_value_bytes=300_000, max_key_bytes=64)


@pytest_asyncio.fixture
async def stub(redis_url: str, config: CacherSettings) -> AsyncIterator[cacher_pb2_grpc.CacherServiceStub]:
    async with cacher(redis_url, config) as stub:
        yield stub


def put(
    namespace: str, key: str, value_json: str, ttl_seconds: int | None = None
) -> cacher_pb2.PutEntryRequest:
    request = cacher_pb2.PutEntryRequest(namespace=namespace, key=key, value_json=value_json)
    if ttl_seconds is not None:
        request.ttl_seconds = ttl_seconds
    return request


def get(namespace: str, key: str) -> cacher_pb2.GetEntryRequest:
    return cacher_pb2.GetEntryRequest(namespace=namespace, key=key)


def delete(namespace: str, key: str) -> cacher_pb2.DeleteEntryRequest:
    return cacher_pb2.DeleteEntryRequest(namespace=namespace, key=key)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- round trips -----------------------------------------------------------------------------------


async def test_put_get_delete_round_trip(stub: cacher_pb2_grpc.CacherServiceStub) -> None:
    value = '{"title": "오늘 배운 것", "items": [1, 2.5, null, true]}'
    await stub.PutEntry(put("til", "abc123", value), timeout=5)

    found = await stub.GetEntry(get("til", "abc123"), timeout=5)
    assert found.found
    assert found.value_json == value

    assert (await stub.DeleteEntry(delete("til", "abc123"), timeout=5)).deleted
    gone = await stub.GetEntry(get("til", "abc123"), timeout=5)
    assert not gone.found
    assert gone.value_json == ""
    assert gone.ttl_seconds == 0
    assert not (await stub.DeleteEntry(delete("til", "abc123"), timeout=5)).deleted


async def test_keys_are_prefix_namespace_key(
    stub: cacher_pb2_grpc.CacherServiceStub, config: CacherSettings, redis: Redis
) -> None:
    await stub.PutEntry(put("til", "k:with:colons", "[1]"), timeout=5)
    assert await redis.get(f"{config.key_prefix}:til:k:with:colons") == "[1]"


async def test_a_put_replaces_value_and_ttl(
    stub: cacher_pb2_grpc.CacherServiceStub, config: CacherSettings, redis: Redis
) -> None:
    await stub.PutEntry(put("til", "replace", '"old"', ttl_seconds=100), timeout=5)
    await stub.PutEntry(put("til", "replace", '"new"', ttl_seconds=0), timeout=5)

    entry = await stub.GetEntry(get("til", "replace"), timeout=5)
    assert entry.value_json == '"new"'
    assert entry.ttl_seconds == 0  # 0 keeps the entry until it is evicted
    assert await redis.ttl(f"{config.key_prefix}:til:replace") == -1


async def test_short_ttl_is_reported_and_expires(stub: cacher_pb2_grpc.CacherServiceStub) -> None:
    await stub.PutEntry(put("til", "short", "{}", ttl_seconds=1), timeout=5)
    entry = await stub.GetEntry(get("til", "short"), timeout=5)
    assert entry.found
    assert entry.ttl_seconds == 1

    await asyncio.sleep(1.1)
    assert not (await stub.GetEntry(get("til", "short"), timeout=5)).found


async def test_default_ttl_applies_when_unset(
    stub: cacher_pb2_grpc.CacherServiceStub, config: CacherSettings, redis: Redis
) -> None:
    await stub.PutEntry(put("til", "default", "{}"), timeout=5)

    assert (await stub.GetEntry(get("til", "default"), timeout=5)).ttl_seconds == config.default_ttl_s
    assert config.default_ttl_s - 2 < await redis.ttl(f"{config.key_prefix}:til:default") <= 3600


async def test_explicit_ttl_is_reported(stub: cacher_pb2_grpc.CacherServiceStub) -> None:
    await stub.PutEntry(put("til", "explicit", "{}", ttl_seconds=500), timeout=5)
    assert (await stub.GetEntry(get("til", "explicit"), timeout=5)).ttl_seconds == 500


async def test_namespaces_are_isolated(stub: cacher_pb2_grpc.CacherServiceStub) -> None:
    await stub.PutEntry(put("til", "same-key", '"til value"'), timeout=5)
    await stub.PutEntry(put("questions", "same-key", '"questions value"'), timeout=5)

    assert (await stub.GetEntry(get("til", "same-key"), timeout=5)).value_json == '"til value"'
    assert (await stub.GetEntry(get("questions", "same-key"), timeout=5)).value_json == '"questions value"'

    await stub.DeleteEntry(delete("til", "same-key"), timeout=5)
    assert not (await stub.GetEntry(get("til", "same-key"), timeout=5)).found
    assert (await stub.GetEntry(get("questions", "same-key"), timeout=5)).found


async def test_limits_are_inclusive(stub: cacher_pb2_grpc.CacherServiceStub, config: CacherSettings) -> None:
    key = "k" * config.max_key_bytes
    value = '"' + "v" * (config.max_value_bytes - 2) + '"'
    await stub.PutEntry(put("n" * 64, key, value, ttl_seconds=config.max_ttl_s), timeout=5)

    entry = await stub.GetEntry(get("n" * 64, key), timeout=5)
    assert entry.value_json == value
    assert entry.ttl_seconds == config.max_ttl_s


async def test_hits_misses_and_latency_are_counted(stub: cacher_pb2_grpc.CacherServiceStub) -> None:
    hits, misses = sample("tilserve_cacher_hits_total"), sample("tilserve_cacher_misses_total")
    gets = sample("tilserve_cacher_op_seconds_count", op="get")

    await stub.PutEntry(put("til", "counted", "1"), timeout=5)
    await stub.GetEntry(get("til", "counted"), timeout=5)
    await stub.GetEntry(get("til", "counted"), timeout=5)
    await stub.GetEntry(get("til", "not-there"), timeout=5)

    assert sample("tilserve_cacher_hits_total") == hits + 2
    assert sample("tilserve_cacher_misses_total") == misses + 1
    assert sample("tilserve_cacher_op_seconds_count", op="get") == gets + 3


# --- bad input -----------------------------------------------------------------------------------

BAD_ADDRESSES = [
    pytest.param("", "k", "namespace is empty", id="empty-namespace"),
    pytest.param("a:b", "k", "namespace is 'a:b'", id="colon-in-namespace"),
    pytest.param("a b", "k", "namespace is 'a b'", id="space-in-namespace"),
    pytest.param("n" * 65, "k", "1-64 characters", id="long-namespace"),
    pytest.param("til", "", "key is empty", id="empty-key"),
    pytest.param("til", "a b", "key has ' ' at position 1", id="space-in-key"),
    pytest.param("til", "a\tb", "key has '\\t'", id="tab-in-key"),
    pytest.param("til", "ab\n", "key has '\\n' at position 2", id="newline-in-key"),
    pytest.param("til", "\x00", "key has '\\x00'", id="nul-in-key"),
    pytest.param("til", "a\u200bb", "key has '\\u200b'", id="zero-width-space-in-key"),
    pytest.param("til", "k" * 65, "key is 65 bytes, over the limit of 64", id="long-key"),
    pytest.param("til", "가" * 22, "key is 66 bytes", id="long-key-in-utf8-bytes"),
]


@pytest.mark.parametrize(("namespace", "key", "message"), BAD_ADDRESSES)
async def test_bad_addresses_are_invalid_argument_on_every_method(
    stub: cacher_pb2_grpc.CacherServiceStub, namespace: str, key: str, message: str
) -> None:
    calls = [
        stub.GetEntry(get(namespace, key), timeout=5),
        stub.PutEntry(put(namespace, key, "{}"), timeout=5),
        stub.DeleteEntry(delete(namespace, key), timeout=5),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() is INVALID
        assert message in (info.value.details() or "")


@pytest.mark.parametrize(
    ("value_json", "ttl_seconds", "message"),
    [
        pytest.param("", None, "not a valid JSON document", id="empty-value"),
        pytest.param('{"a": ', None, "not a valid JSON document", id="truncated-json"),
        pytest.param("{'a': 1}", None, "not a valid JSON document", id="single-quotes"),
        pytest.param("[1] [2]", None, "not a valid JSON document", id="two-documents"),
        pytest.param("NaN", None, "NaN is not a JSON value", id="nan"),
        pytest.param('{"a": -Infinity}', None, "-Infinity is not a JSON value", id="infinity"),
        pytest.param("[" * 300_001, None, "300001 bytes, over the limit of 300000", id="over-max-bytes"),
        pytest.param("[" * 150_000, None, "nested too deeply", id="deep-nesting"),
        pytest.param('"' + "가" * 100_000 + '"', None, "300002 bytes, over the limit", id="over-in-utf8"),
        pytest.param("{}", 86401, "ttl_seconds 86401 is over the limit of 86400", id="ttl-over-max"),
    ],
)
async def test_bad_puts_are_invalid_argument_and_store_nothing(
    stub: cacher_pb2_grpc.CacherServiceStub, value_json: str, ttl_seconds: int | None, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.PutEntry(put("til", "bad-put", value_json, ttl_seconds), timeout=5)
    assert info.value.code() is INVALID
    assert message in (info.value.details() or "")
    assert not (await stub.GetEntry(get("til", "bad-put"), timeout=5)).found


def test_default_ttl_over_max_is_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHER_DEFAULT_TTL_S", "100")
    monkeypatch.setenv("CACHER_MAX_TTL_S", "10")
    with pytest.raises(SystemExit, match="CACHER_DEFAULT_TTL_S \\(100\\) exceeds CACHER_MAX_TTL_S"):
        load_settings(CacherSettings)


def test_unknown_redis_url_scheme_is_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHER_REDIS_URL", "http://localhost:6379")
    with pytest.raises(SystemExit, match=r"CACHER_REDIS_URL: .*redis://"):
        load_settings(CacherSettings)


# --- Redis outages -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TcpRedis:
    """A throwaway redis-server on a loopback port that a test can kill, freeze and restart."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2) as conn,
            ):
                conn.sendall(b"PING\r\n")
                if conn.recv(16) == b"+PONG\r\n":
                    return
            time.sleep(0.01)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()


class OutageTarget:
    """One Redis to break: a unix-socket EmbeddedRedis or a TCP redis-server."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.embedded = EmbeddedRedis(directory=workdir)
        self.tcp = TcpRedis(workdir)

    async def start(self) -> None:
        if self.kind == "unix":
            await self.embedded.start()
        else:
            self.tcp.start()

    @property
    def url(self) -> str:
        return self.embedded.url if self.kind == "unix" else self.tcp.url

    @property
    def pid(self) -> int:
        pid = self.embedded.pid if self.kind == "unix" else self.tcp.process.pid if self.tcp.process else None
        assert pid is not None
        return pid

    async def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        if self.kind == "unix":
            await self.embedded.close()  # reaps it; the socket file stays behind, as after a crash
        else:
            self.tcp.kill()

    async def close(self) -> None:
        if self.kind == "unix":
            await self.embedded.close()
        elif self.tcp.process is not None and self.tcp.process.poll() is None:
            self.tcp.kill()


@pytest_asyncio.fixture(params=["unix", "tcp"])
async def outage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OutageTarget]:
    target = OutageTarget(request.param, tmp_path)
    await target.start()
    yield target
    await target.close()


async def timed_failure(call: Awaitable[object]) -> tuple[grpc.aio.AioRpcError, float]:
    started = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value, time.perf_counter() - started


async def test_killed_redis_is_unavailable_fast_and_recovers(outage: OutageTarget) -> None:
    async with cacher(outage.url, settings()) as stub:
        await stub.PutEntry(put("til", "k", '"before"'), timeout=5)
        errors = sample("tilserve_cacher_errors_total", op="get")

        await outage.kill()
        for call in (
            stub.GetEntry(get("til", "k"), timeout=5),
            stub.PutEntry(put("til", "k", "1"), timeout=5),
            stub.DeleteEntry(delete("til", "k"), timeout=5),
        ):
            error, elapsed = await timed_failure(call)
            assert error.code() is UNAVAILABLE
            assert "is unreachable" in (error.details() or "")
            assert elapsed < 0.2, f"UNAVAILABLE took {elapsed * 1000:.0f} ms"
        assert sample("tilserve_cacher_errors_total", op="get") == errors + 1

        await outage.start()  # same socket path or port; nothing persisted
        assert not (await stub.GetEntry(get("til", "k"), timeout=5)).found
        await stub.PutEntry(put("til", "k", '"after"'), timeout=5)
        assert (await stub.GetEntry(get("til", "k"), timeout=5)).value_json == '"after"'


async def test_frozen_redis_times_out_fast_and_recovers(outage: OutageTarget) -> None:
    config = settings(op_timeout_s=0.1)
    async with cacher(outage.url, config) as stub:
        await stub.PutEntry(put("til", "k", '"before"'), timeout=5)

        os.kill(outage.pid, signal.SIGSTOP)
        try:
            # The first call waits on a pooled connection, the second on a new one (connect + handshake).
            failures = [await timed_failure(stub.GetEntry(get("til", "k"), timeout=5)) for _ in range(2)]
        finally:
            os.kill(outage.pid, signal.SIGCONT)
        for error, elapsed in failures:
            assert error.code() is UNAVAILABLE
            assert "Timeout reading" in (error.details() or "")
            assert elapsed < config.op_timeout_s + 0.1, f"UNAVAILABLE took {elapsed * 1000:.0f} ms"

        assert (await stub.GetEntry(get("til", "k"), timeout=5)).value_json == '"before"'


async def test_error_details_never_show_the_redis_password() -> None:
    store = RedisStore.from_url(
        f"redis://admin:hunter2@127.0.0.1:{free_port()}/3",
        key_prefix="t", op_timeout_s=0.1, connect_timeout_s=0.1, max_connections=2,
    )  # fmt: skip
    try:
        with pytest.raises(Unavailable) as info:
            await store.ping()
    finally:
        await store.close()
    assert "127.0.0.1" in info.value.message
    assert "/3" in info.value.message
    assert "hunter2" not in info.value.message
