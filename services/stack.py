"""Runs the four services as local processes (`til up`, the demo, integration tests and benchmarks).

Each service is `python -m services.<name>` in its own process; the stack waits until every one reports
SERVING on the standard health service and stops them (SIGTERM, then SIGKILL) in reverse order.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_fixed

from services.common.process import dying_with_parent

# Start order: the edge comes last because its warm-up waits for the generator.
SERVICES = ("cacher", "retriever", "generator", "edge")
SERVICE_NAMES = {
    "cacher": "til.v1.CacherService",
    "retriever": "til.v1.RetrieverService",
    "generator": "til.v1.GeneratorService",
    "edge": "til.v1.EdgeService",
}
DEFAULT_PORTS = {"edge": 50051, "generator": 50052, "retriever": 50053, "cacher": 50054}
DEFAULT_METRICS_PORTS = {"edge": 9091, "generator": 9092, "retriever": 9093, "cacher": 9094}


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (Linux: ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: a port the kernel picked for `bind(0)` can be
    taken by any outgoing connection's local end before the service binds it (a test once failed so)."""
    low = _ephemeral_low()
    for _ in range(1000):
        port = random.randrange(10_000, max(low, 10_001))
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # nothing free below the range: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _NotServing(Exception):
    """A service that does not answer its readiness check with SERVING (yet)."""


async def _check_serving(stub: health_pb2_grpc.HealthStub, request: health_pb2.HealthCheckRequest) -> None:
    try:
        reply = await stub.Check(request, timeout=1.0)
    except grpc.aio.AioRpcError as exc:
        raise _NotServing(exc.code().name) from None
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise _NotServing(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


@dataclass
class ServiceProcess:
    name: str
    port: int
    metrics_port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class LocalStack:
    """The four services on loopback. `ports` and `env` override the defaults per service."""

    data_dir: Path
    ports: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    metrics_ports: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_METRICS_PORTS))
    env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    python: str = sys.executable
    services: tuple[str, ...] = SERVICES

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        log_dir = self.data_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, ServiceProcess] = {}
        for name in self.services:
            prefix = name.upper()
            env = {
                f"{prefix}_HOST": "127.0.0.1",
                f"{prefix}_PORT": str(self.ports[name]),
                f"{prefix}_METRICS_PORT": str(self.metrics_ports[name]),
            }
            if name == "edge":
                for peer in ("generator", "retriever", "cacher"):
                    env[f"EDGE_{peer.upper()}_ADDR"] = f"127.0.0.1:{self.ports[peer]}"
            if name == "retriever":
                env["RETRIEVER_QDRANT_PATH"] = str(self.data_dir / "qdrant")
            env.update(self.env.get(name, {}))
            self.processes[name] = ServiceProcess(
                name, self.ports[name], self.metrics_ports[name], env, log_dir / f"{name}.log"
            )

    def address(self, name: str) -> str:
        return self.processes[name].address

    def spawn(self, name: str) -> None:
        proc = self.processes[name]
        env = {**os.environ, **proc.env}
        with proc.log_path.open("ab") as log:
            proc.process = subprocess.Popen(
                dying_with_parent([self.python, "-m", f"services.{name}"]),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the launcher only; it stops the services in order.
            )

    async def wait_serving(self, name: str, timeout_s: float) -> None:
        proc = self.processes[name]
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAMES[name])

        def exited_early() -> None:
            if proc.process is not None and proc.process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with code {proc.process.returncode} before it was ready; "
                    f"last log lines ({proc.log_path}):\n{proc.log_tail()}"
                )

        async with grpc.aio.insecure_channel(proc.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type(_NotServing),
                    stop=stop_after_delay(timeout_s),
                    wait=wait_fixed(0.2),
                    reraise=True,
                ):
                    with attempt:
                        exited_early()
                        await _check_serving(stub, request)
            except _NotServing:
                raise TimeoutError(
                    f"{name} was not SERVING after {timeout_s:.0f}s; last log lines ({proc.log_path}):\n"
                    f"{proc.log_tail()}"
                ) from None

    async def start(
        self, *, timeout_s: float = 300.0, progress: Callable[[str], None] = lambda _: None
    ) -> None:
        """Starts every service and returns once all are SERVING; stops what started if one fails."""
        try:
            for name in self.services:
                self.spawn(name)
                progress(f"started {name} (pid {self.processes[name].process.pid})")  # type: ignore[union-attr]
            started = time.monotonic()
            for name in self.services:
                await self.wait_serving(name, timeout_s)
                progress(f"{name} SERVING on {self.address(name)} after {time.monotonic() - started:.1f}s")
        except BaseException:
            self.stop()
            raise

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.processes[name].process
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=30)

    def stop(self, timeout_s: float = 30.0) -> dict[str, int | None]:
        """SIGTERM in reverse start order, SIGKILL after `timeout_s`; returns each exit code."""
        codes: dict[str, int | None] = {}
        live = [p for p in reversed(list(self.processes.values())) if p.process and p.process.poll() is None]
        for p in live:
            p.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for p in reversed(list(self.processes.values())):
            if p.process is None:
                continue
            try:
                codes[p.name] = p.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                p.process.kill()
                codes[p.name] = p.process.wait()
        return codes
