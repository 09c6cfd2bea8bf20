"""`serve()`: the grpc.aio server every service runs in.

Health (grpc.health.v1: "" is liveness, each service's full name is readiness and turns SERVING
only after warm-up), reflection, Prometheus metrics, and SIGTERM -> NOT_SERVING -> drain -> exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from services.common.auth import BearerTokenAuth
from services.common.channels import KEEPALIVE_SERVER_OPTIONS
from services.common.interceptors import ServiceInterceptor
from services.common.logs import configure_logging
from services.common.settings import MAX_GRPC_MS, ServerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Service:
    """A servicer to mount: its full proto name and the generated `add_*_to_server` call."""

    name: str
    register: Callable[[grpc.aio.Server], None]


def _ms(seconds: float) -> int:
    return min(round(seconds * 1000), MAX_GRPC_MS)


def server_options(settings: ServerSettings) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        *KEEPALIVE_SERVER_OPTIONS,
    ]
    if settings.max_connection_age_s > 0:
        # Connections end after a while so clients re-resolve and new replicas get traffic; the calls
        # still running on one keep it for up to the grace, which outlasts any deadline we hand out.
        options += [
            ("grpc.max_connection_age_ms", _ms(settings.max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", _ms(settings.max_connection_age_grace_s)),
        ]
    return options


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise SystemExit(f"cannot read TLS file {path}: {exc.strerror}") from None


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files; mutual TLS when a client CA is given."""
    if not settings.tls_cert_file:
        return None
    client_ca = _read(settings.tls_client_ca_file) if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(_read(settings.tls_key_file), _read(settings.tls_cert_file))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class RunningServer:
    """A started server: its port, its health servicer, and how to drain and stop it."""

    def __init__(
        self,
        server: grpc.aio.Server,
        health_servicer: health.aio.HealthServicer,
        port: int,
        service_names: Sequence[str],
    ) -> None:
        self.server = server
        self.health = health_servicer
        self.port = port
        self.service_names = tuple(service_names)

    async def set_serving(self) -> None:
        for name in self.service_names:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def set_not_serving(self) -> None:
        """Readiness off (liveness stays on): for a service whose backend went away for a while."""
        for name in self.service_names:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace_s: float) -> None:
        """Turns NOT_SERVING, refuses new calls, and gives in-flight calls `grace_s` to finish."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start_server(settings: ServerSettings, services: Sequence[Service]) -> RunningServer:
    """Binds and starts a server with every service NOT_SERVING; liveness ("") is SERVING at once."""
    tokens = settings.token_identities()
    interceptor = ServiceInterceptor(BearerTokenAuth(tokens) if tokens else None)
    server = grpc.aio.server(interceptors=[interceptor], options=server_options(settings))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in services:
        service.register(server)
        await health_servicer.set(service.name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    names = [s.name for s in services]
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    address = f"{settings.host}:{settings.port}"
    credentials = server_credentials(settings)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise SystemExit(f"cannot listen on {address}")
    await server.start()
    return RunningServer(server, health_servicer, port, names)


async def _until_done_or_stopped(work: Awaitable[None], stop: asyncio.Event) -> BaseException | None:
    """Runs `work` until it ends or `stop` is set (then cancels it); returns its error, if it raised one."""
    working = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({working, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not working.done():
        working.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await working
        return None
    return None if working.cancelled() else working.exception()


async def serve(
    settings: ServerSettings,
    services: Sequence[Service],
    *,
    warmup: Callable[[], Awaitable[None]] | None = None,
    shutdown: Callable[[], Awaitable[None]] | None = None,
    monitor: Callable[[RunningServer], Awaitable[None]] | None = None,
    listen_after_warmup: bool = False,
) -> None:
    """Runs a service process until SIGTERM or SIGINT, then drains and returns (exit code 0).

    `monitor`, when given, runs from SERVING until the drain begins; it may turn readiness off and on
    (`set_not_serving`, `set_serving`) while a backend is away. Its failure stops the service.
    `listen_after_warmup`: the port is bound only once the warm-up is done, for processes that share
    it (SO_REUSEPORT): one still warming up must not be handed connections the others could serve.
    """
    configure_logging(settings.log_level, json_lines=settings.log_json)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.host)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    running = None if listen_after_warmup else await _listening(settings, services)
    try:
        if warmup is not None and (error := await _until_done_or_stopped(warmup(), stop)) is not None:
            log.error("warm-up failed: %s", error, exc_info=error)
            if running is not None:
                await running.stop(0)
            raise SystemExit(1)
        if not stop.is_set():
            if running is None:
                running = await _listening(settings, services)
            await running.set_serving()
            log.info("SERVING %s on port %d", ", ".join(running.service_names), running.port)
            error = None if monitor is None else await _until_done_or_stopped(monitor(running), stop)
            if error is None:
                await stop.wait()
            else:
                log.error("monitor failed: %s; stopping", error, exc_info=error)
        if running is not None:
            log.info("draining: NOT_SERVING, up to %.1fs for in-flight calls", settings.grace_period_s)
            await running.stop(settings.grace_period_s)
    finally:
        if shutdown is not None:
            await shutdown()
        log.info("stopped")


async def _listening(settings: ServerSettings, services: Sequence[Service]) -> RunningServer:
    running = await start_server(settings, services)
    log.info(
        "listening on %s:%d (%s); metrics on :%s; event loop: %s",
        settings.host,
        running.port,
        ", ".join(running.service_names),
        settings.metrics_port or "off",
        type(asyncio.get_running_loop()).__module__.split(".")[0],  # uvloop or asyncio
    )
    return running
