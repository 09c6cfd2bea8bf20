"""Fixtures that start real processes: a redis-server and the four services."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from services.stack import SERVICES, LocalStack, free_port


@dataclass
class RedisProcess:
    port: int
    dir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not installed: run scripts/setup.sh (it installs the Debian package)"
            )
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(port=free_port(), dir=tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def stack_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[type]:
    """Builds LocalStacks on free ports in a temp dir; stops every one at the end."""
    stacks: list[LocalStack] = []

    def make(**env: dict[str, str]) -> LocalStack:
        stack = LocalStack(
            data_dir=tmp_path_factory.mktemp("stack"),
            ports={name: free_port() for name in SERVICES},
            metrics_ports={name: free_port() for name in SERVICES},
            env=env,
        )
        stacks.append(stack)
        return stack

    yield make  # type: ignore[misc]
    for stack in stacks:
        stack.stop()
