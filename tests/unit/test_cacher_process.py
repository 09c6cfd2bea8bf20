"""The embedded redis-server's life cycle, and `python -m services.cacher` as a real process."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis
from til.v1 import cacher_pb2, cacher_pb2_grpc

from services.cacher.embedded import EmbeddedRedis, EmbeddedRedisError

pytestmark = [
    pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server on PATH"),
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="reads /proc; orphan guard is Linux-only"
    ),
]

REPO = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- EmbeddedRedis --------------------------------------------------------------------------------


async def test_embedded_redis_is_private_volatile_and_gone_after_close() -> None:
    redis = EmbeddedRedis(maxmemory="64mb")
    await redis.start()
    pid, folder = redis.pid, redis.socket_path.parent
    assert pid is not None
    try:
        assert stat.S_IMODE(redis.socket_path.stat().st_mode) == 0o700
        client = Redis.from_url(redis.url, decode_responses=True)
        try:
            assert await client.ping()
            config = await client.config_get("*")
        finally:
            await client.aclose()
        assert config["port"] == "0"  # no TCP listener at all
        assert config["save"] == ""
        assert config["appendonly"] == "no"
        assert config["maxmemory"] == str(64 * 1024 * 1024)
        assert config["maxmemory-policy"] == "allkeys-lru"
    finally:
        await redis.close()
    assert not alive(pid)
    assert not folder.exists()


async def test_embedded_redis_restarts_on_the_same_socket(tmp_path: Path) -> None:
    async with EmbeddedRedis(directory=tmp_path) as redis:
        first = redis.pid
        await redis.close()
        await redis.start()
        assert redis.pid != first
        assert redis.socket_path == tmp_path / "redis.sock"
        client = Redis.from_url(redis.url)
        assert await client.ping()
        await client.aclose()
    assert await asyncio.to_thread(tmp_path.is_dir)  # a folder the caller chose is kept


async def test_missing_redis_server_names_the_ways_out() -> None:
    with pytest.raises(EmbeddedRedisError, match="not found on PATH") as info:
        await EmbeddedRedis(server_bin="no-such-redis-server").start()
    assert "install" in str(info.value).lower()
    assert "CACHER_REDIS_URL" in str(info.value)


async def test_redis_that_fails_to_start_reports_its_own_error(tmp_path: Path) -> None:
    redis = EmbeddedRedis(directory=tmp_path, maxmemory="a-lot")
    with pytest.raises(EmbeddedRedisError, match="exited with code") as info:
        await redis.start()
    assert "maxmemory" in str(info.value)  # redis-server's own complaint, from its log
    assert redis.pid is None


def start_redis_holder(directory: Path) -> subprocess.Popen[bytes]:
    """A Python process that starts an EmbeddedRedis, prints its pid and then hangs."""
    script = textwrap.dedent(
        f"""
        import asyncio, sys, time
        from services.cacher.embedded import EmbeddedRedis

        async def main():
            redis = EmbeddedRedis(directory={str(directory)!r})
            await redis.start()
            print(redis.pid, flush=True)
            time.sleep(60)

        asyncio.run(main())
        """
    )
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=REPO)


async def test_embedded_redis_dies_with_a_killed_parent(tmp_path: Path) -> None:
    parent = start_redis_holder(tmp_path)
    try:
        assert parent.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(parent.stdout.readline), 15)
        redis_pid = int(line)
        assert alive(redis_pid)
    finally:
        parent.kill()  # SIGKILL: no cleanup code runs in the parent
        parent.wait()
    assert eventually(lambda: not alive(redis_pid)), "redis-server outlived its SIGKILLed parent"


# --- python -m services.cacher ----------------------------------------------------------------------


def start_cacher(**env: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CACHER_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cacher"],
        env=clean | {"CACHER_PORT": str(port), **env},
        cwd=REPO,
        stderr=subprocess.PIPE,
    )
    return process, port


async def wait_until_serving(port: int, process: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and process.poll() is None:
            try:
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service="til.v1.CacherService"), timeout=1
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"cacher never turned SERVING (exit code {process.poll()})")


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def stop(process: subprocess.Popen[bytes]) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
    return process.returncode, stderr.decode(errors="replace")


async def test_cacher_process_with_no_settings_serves_on_its_own_redis_and_stops_cleanly() -> None:
    metrics_port = free_port()
    process, port = start_cacher(CACHER_METRICS_PORT=str(metrics_port))
    try:
        await wait_until_serving(port, process)
        redis_children = [pid for pid in children(process.pid) if "redis-server" in command_line(pid)]
        assert len(redis_children) == 1

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = cacher_pb2_grpc.CacherServiceStub(channel)
            await stub.PutEntry(
                cacher_pb2.PutEntryRequest(namespace="til", key="k", value_json="[1]"), timeout=5
            )
            entry = await stub.GetEntry(cacher_pb2.GetEntryRequest(namespace="til", key="k"), timeout=5)
        assert entry.value_json == "[1]"
        assert entry.ttl_seconds == 7 * 24 * 3600

        metrics = await asyncio.to_thread(scrape, f"http://127.0.0.1:{metrics_port}/metrics")
        assert "tilserve_cacher_hits_total 1.0" in metrics
    finally:
        code, stderr = stop(process)
    assert code == 0, stderr
    assert "SERVING til.v1.CacherService" in stderr
    assert eventually(lambda: not alive(redis_children[0])), "the cacher left its redis-server running"


async def test_cacher_process_on_an_external_redis_starts_none(tmp_path: Path) -> None:
    async with EmbeddedRedis(directory=tmp_path) as external:
        process, port = start_cacher(CACHER_REDIS_URL=external.url, CACHER_METRICS_PORT="0")
        try:
            await wait_until_serving(port, process)
            assert children(process.pid) == []
        finally:
            code, stderr = stop(process)
        assert code == 0, stderr
        assert external.pid is not None and alive(external.pid)


def test_cacher_process_without_redis_server_exits_with_advice() -> None:
    process, _ = start_cacher(CACHER_REDIS_SERVER_BIN="no-such-redis-server", CACHER_METRICS_PORT="0")
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 1
    assert "CACHER_REDIS_URL" in stderr.decode()
