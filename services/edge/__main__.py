"""`python -m services.edge`: settings -> channels -> clients -> pipelines -> servicer -> serve().

The edge turns SERVING once the generator answers GetModelInfo; it retries until then, for at most
EDGE_WARMUP_TIMEOUT_S. The cache and the retriever are not waited for: without them the edge works,
degraded, and says so in each stream's notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_before_delay,
    wait_exponential,
)

from services.common.admission import Admission
from services.common.breaker import CircuitBreaker
from services.common.channels import open_channel
from services.common.server import serve
from services.common.settings import load_settings
from services.common.workers import run_loop, run_workers, warm_up_together, worker_metrics_port
from services.edge.background import Background
from services.edge.breaker import GuardedCache, GuardedStore, dependency_breaker
from services.edge.clients import (
    CacherClient,
    GeneratorClient,
    GeneratorReplicas,
    RetrieverClient,
    RetryPolicy,
)
from services.edge.config import EdgeSettings
from services.edge.questions import QuestionPipeline
from services.edge.servicer import EdgeServicer, edge_service
from services.edge.til import TilPipeline

log = logging.getLogger("services.edge")


async def wait_for_generator(generator: GeneratorClient, settings: EdgeSettings) -> None:
    """Retries GetModelInfo with backoff until it answers or EDGE_WARMUP_TIMEOUT_S passes."""

    def waiting(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        code = error.code().name if isinstance(error, grpc.aio.AioRpcError) else error
        log.info("waiting for the generator at %s (%s)", settings.generator_addr, code)

    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(grpc.aio.AioRpcError),
            stop=stop_before_delay(settings.warmup_timeout_s),
            wait=wait_exponential(multiplier=0.5, max=5.0),
            before_sleep=waiting,
            reraise=True,
        ):
            with attempt:
                info = await generator.model_info(timeout=5.0)
    except grpc.aio.AioRpcError as exc:
        raise SystemExit(
            f"the generator at {settings.generator_addr} did not answer within "
            f"{settings.warmup_timeout_s:.0f}s (last: {exc.code().name}: {exc.details()})"
        ) from None
    log.info(
        "generator ready: model %s on %s, %d-token context", info.model, info.backend, info.max_model_len
    )


async def main(settings: EdgeSettings, worker: int = 0, barrier: Any = None) -> None:
    """The edge in this process: worker `worker` of EDGE_WORKERS, which join the port together once
    every one has reached the generator (`barrier`, from run_workers; None: the only one, listening
    at once and NOT_SERVING until then)."""
    settings = settings.model_copy(
        update={"metrics_port": worker_metrics_port(settings.metrics_port, worker)}
    )

    def connect(target: str, own: bool = False) -> grpc.aio.Channel:
        return open_channel(
            target, max_message_bytes=settings.max_message_bytes, tls=settings.peer_tls, own_connection=own
        )

    try:
        channels = [connect(target) for target in (settings.retriever_target, settings.cacher_target)]
        replicas = GeneratorReplicas.from_addr(
            settings.generator_addr,
            lambda target: connect(target, own=True),
            connections=settings.generator_connections,
        )
    except OSError as exc:
        raise SystemExit(f"cannot read the EDGE_PEER_TLS_* files: {exc}") from None
    following = asyncio.ensure_future(replicas.watch())
    generator = GeneratorClient(
        replicas,
        retry=RetryPolicy(attempts=settings.generator_attempts, backoff_s=settings.generator_backoff_s),
    )

    def breaker(dependency: str) -> CircuitBreaker:
        return dependency_breaker(
            dependency, failures=settings.breaker_failures, cool_down_s=settings.breaker_cool_down_s
        )

    store = GuardedStore(RetrieverClient(channels[0]), breaker("retriever"))
    cache = GuardedCache(CacherClient(channels[1]), breaker("cacher"))
    background = Background()
    servicer = EdgeServicer(
        TilPipeline(generator, store, cache, settings, background=background),
        QuestionPipeline(generator, store, cache, settings, background=background),
        Admission(
            "edge",
            max_active=settings.max_active,
            max_waiting=settings.max_waiting,
            retry_after_s=settings.retry_after_s,
            max_per_client=settings.max_active_per_client,
        ),
        coalesce_s=settings.coalesce_ms / 1000,
    )

    async def shutdown() -> None:
        await background.drain(settings.write_timeout_s)
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following
        await replicas.close()
        for channel in channels:
            await channel.close()

    async def warmup() -> None:
        if barrier is None:
            await wait_for_generator(generator, settings)
        else:
            await warm_up_together(
                wait_for_generator(generator, settings), barrier, "edge worker", settings.warmup_timeout_s
            )

    await serve(
        settings,
        [edge_service(servicer)],
        warmup=warmup,
        shutdown=shutdown,
        listen_after_warmup=barrier is not None,
    )


def run() -> int:
    """Loads the settings, then runs the edge: in this process, or in EDGE_WORKERS forked ones."""
    settings = load_settings(EdgeSettings)
    if settings.workers > 1 and settings.port == 0:
        raise SystemExit(
            "invalid settings: EDGE_WORKERS > 1 needs a fixed EDGE_PORT for the workers to share"
        )

    def work(worker: int, barrier: Any = None) -> None:
        run_loop(lambda: main(settings, worker, barrier), uvloop=settings.uvloop)

    if settings.workers == 1:
        work(0)
        return 0
    return run_workers(settings.workers, work)


if __name__ == "__main__":
    raise SystemExit(run())
