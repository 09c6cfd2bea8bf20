"""Several gRPC front-ends sharing one vLLM engine core (GENERATOR_FRONTENDS > 1).

At many streams one event loop carries every stream's work besides the GPU's: taking calls,
tokenizing, vLLM's output processing and detokenizing, one message per delta. When it saturates,
new calls wait before their handler runs (bench/results/issue13-h200-s19-diag: a burst of 100 calls
waited 150-190 ms p50). vLLM's answer for its own server is `vllm serve --api-server-count N`: N API
server processes, each with an `AsyncLLM` client, and one engine core that serves them all. This is
the same layout with the generator's gRPC server in each front-end:

- this process (the supervisor) configures the engine, sets the mask-filling variables that our
  vLLM plugin reads in the engine core, and launches the engine core (`SharedEngineCore`);
- it starts the front-ends (spawned: fresh interpreters, no state of this one) before the engine's
  start-up handshake, as vLLM does: the engine core connects to each front-end's ZMQ sockets;
- each front-end serves the generator on GENERATOR_PORT (SO_REUSEPORT: the kernel spreads
  connections over them), its metrics on GENERATOR_METRICS_PORT + index, its own health; they bind
  the port together, once all have warmed up (a connection stays with the front-end it reached);
- SIGTERM or SIGINT is passed to the front-ends, each drains by itself; then the engine core stops.
  A front-end or the engine core that dies stops the rest: whatever supervises the service restarts it
  whole.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

from services.common.logs import configure_logging
from services.common.workers import all_warmed, die_with_parent, run_loop, worker_metrics_port
from services.generator.config import GeneratorSettings
from services.generator.vllm_compat import FrontEnd

log = logging.getLogger("services.generator.frontends")

# After SIGTERM, how long past the drain's grace the front-ends get before they are killed.
_EXIT_MARGIN_S = 10.0


def frontend_settings(settings: GeneratorSettings, index: int) -> GeneratorSettings:
    """A front-end's settings: its metrics on their own port (metrics_port + index), and its share of
    the generator's admission limits (each limit over the front-ends, rounded up), so that the
    generator as a whole admits about what GENERATOR_MAX_ACTIVE/WAITING_REQUESTS say."""
    count = settings.frontends
    update: dict[str, Any] = {
        "max_active_requests": -(-settings.active_limit // count),
        "max_waiting_requests": -(-settings.waiting_limit // count),
    }
    update["metrics_port"] = worker_metrics_port(settings.metrics_port, index)
    return settings.model_copy(update=update)


def _serve_frontend(settings: GeneratorSettings, frontend: FrontEnd, parent: int, barrier: Any) -> None:
    """A front-end process: the generator service on its share of the engine core."""
    die_with_parent(parent)
    from services.generator.__main__ import main

    run_loop(
        lambda: main(
            frontend_settings(settings, frontend.index), frontend, lambda: all_warmed(barrier, "front-end")
        ),
        uvloop=settings.uvloop,
    )


class Supervisor:
    """Waits on the front-end processes and the engine core; passes signals on; stops all when one ends.

    `processes`: the front-ends (multiprocessing processes); `engine_sentinels()`: what becomes ready
    when an engine process ends. Returns the exit code: 0 when every front-end exited cleanly after a
    signal (by itself, or by the signal's default action when it came before the front-end's own
    handler was in place), else the first failure's.
    """

    def __init__(
        self, processes: list[Any], engine_sentinels: Callable[[], list[Any]], grace_s: float
    ) -> None:
        self.processes = processes
        self._engine_sentinels = engine_sentinels
        self._grace_s = grace_s
        self._stopping = False
        self._running = False
        self._deadline: float | None = None
        self._signalled: set[int] = set()  # pids sent a stop already

    def forward(self, signum: int, _frame: object = None) -> None:
        """SIGTERM/SIGINT: every front-end drains by itself. Before `run` (the engine core still
        starting), the start is abandoned: SystemExit, as `vllm serve` does; the caller cleans up."""
        self._stopping = True
        self._signal_all(signum)
        if not self._running:
            raise SystemExit(0)

    def cleaning_up(self) -> None:
        """From now on a signal only passes on (no SystemExit): the caller is stopping everything."""
        self._running = True
        self._stopping = True

    def _stop_all(self) -> None:
        log.error("stopping the other front-ends")
        self._stopping = True
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, signum: int, *, unsignalled_only: bool = False) -> None:
        for proc in self.processes:
            if proc.pid is None or proc.exitcode is not None:
                continue
            if unsignalled_only and proc.pid in self._signalled:
                continue
            self._signalled.add(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signum)

    def _clean(self, code: int | None) -> bool:
        if not self._stopping:
            return False  # exiting at all before a stop was asked for is a failure, even with 0
        return code in (0, -signal.SIGTERM, -signal.SIGINT)

    def run(self) -> int:
        self._running = True
        result = 0
        # Every front-end from the start, dead or alive: one that ended before now is seen at once.
        live = {p.sentinel: p for p in self.processes}
        engine = list(self._engine_sentinels())
        if self._stopping:  # a signal came while starting: pass it on to the ones started since
            self._signal_all(signal.SIGTERM, unsignalled_only=True)
        while live:
            if self._stopping and self._deadline is None:
                self._deadline = time.monotonic() + self._grace_s + _EXIT_MARGIN_S
            if self._deadline is not None and time.monotonic() > self._deadline:
                log.error("front-ends still running %.0fs after the stop; killing them", self._grace_s)
                self._signal_all(signal.SIGKILL)
            for sentinel in wait([*live, *engine], timeout=1.0):
                if sentinel in engine:
                    engine.remove(sentinel)
                    if not self._stopping:
                        log.error("the engine core exited; stopping the front-ends")
                        result = result or 1
                        self._stop_all()
                    continue
                proc = live.pop(sentinel)
                proc.join()
                code = proc.exitcode
                if not self._clean(code):
                    log.error("front-end %s (pid %s) exited with %s", proc.name, proc.pid, code)
                    result = result or (code if code is not None and code > 0 else 1)
                    if not self._stopping:
                        self._stop_all()
        return result


def end_processes(processes: list[Any], timeout_s: float) -> None:
    """SIGTERM to those still running, then SIGKILL to any left after `timeout_s` (all together)."""
    for proc in processes:
        if proc.pid is not None and proc.exitcode is None:
            proc.terminate()
    deadline = time.monotonic() + timeout_s
    for proc in processes:
        if proc.pid is not None:
            proc.join(max(0.0, deadline - time.monotonic()))
    for proc in processes:
        if proc.pid is not None and proc.exitcode is None:
            proc.kill()
            proc.join()


def check_port_free(host: str, port: int) -> None:
    """SystemExit when something listens on host:port already. The front-ends bind it with SO_REUSEPORT
    and only after warm-up: another process of this user doing the same would silently share it."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the server binds it: connections of an earlier generator left in TIME_WAIT do not hold the
        # port (without it, a restart on the same host was refused for a minute). On Linux a listener
        # still does; elsewhere (Windows: over a listener; BSD: beside a wildcard one) it would not.
        if sys.platform.startswith("linux"):
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            raise SystemExit(
                f"cannot use {host}:{port} for the generator's front-ends: {exc.strerror}"
            ) from None


class _NoSharedCore:
    """The fake backend's stand-in for `SharedEngineCore`: each front-end has its own fake engine, so
    the layout (processes, one port, signals, metrics ports) runs without vLLM."""

    def __init__(self, count: int) -> None:
        self.count = count

    def frontends(self) -> list[FrontEnd]:
        return [FrontEnd(i, self.count, "", "") for i in range(self.count)]

    def launching(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def sentinels(self) -> list[Any]:
        return []

    def shutdown(self) -> None:
        pass


def _engine_core(settings: GeneratorSettings) -> Any:
    if settings.backend == "fake":
        return _NoSharedCore(settings.frontends)
    from services.generator import vllm_compat
    from services.generator.vllm_engine import apply_bitmask_environment, engine_args

    # Before the engine core exists: it inherits this environment (our vLLM plugin reads it there).
    apply_bitmask_environment(settings)
    return vllm_compat.SharedEngineCore(engine_args(settings), settings.frontends)


def run_frontends(settings: GeneratorSettings) -> int:
    """Launches the engine core, starts GENERATOR_FRONTENDS front-ends on it, supervises them."""
    configure_logging(settings.log_level, json_lines=settings.log_json)
    count = settings.frontends
    check_port_free(settings.host, settings.port)
    core = _engine_core(settings)
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(count)
    processes = [
        spawn.Process(
            target=_serve_frontend,
            args=(settings, frontend, os.getpid(), barrier),
            name=f"generator-frontend-{frontend.index}",
        )
        for frontend in core.frontends()
    ]
    supervisor = Supervisor(processes, core.sentinels, settings.grace_period_s)
    signal.signal(signal.SIGTERM, supervisor.forward)
    signal.signal(signal.SIGINT, supervisor.forward)
    log.info("starting the engine core and %d front-ends on port %d", count, settings.port)
    try:
        with core.launching():
            for proc in processes:
                proc.start()
        log.info("front-ends started: %s", ", ".join(str(p.pid) for p in processes))
        return supervisor.run()
    finally:
        supervisor.cleaning_up()  # a second signal must not cut this short
        end_processes(processes, _EXIT_MARGIN_S)
        core.shutdown()
