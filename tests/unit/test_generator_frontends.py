"""GENERATOR_FRONTENDS: the settings, the supervisor of the front-end processes, and how the front-ends
and the engine core are built from vLLM's pieces (stand-ins here, with vLLM 0.25.1's signatures; the
real ones run on the GPU, bench/results)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from pydantic import ValidationError

from services.common.workers import all_warmed, warm_up_together
from services.generator import frontends, vllm_compat
from services.generator.config import GeneratorSettings
from services.generator.frontends import Supervisor, frontend_settings
from services.generator.vllm_compat import FrontEnd

SPAWN = multiprocessing.get_context("spawn")


# --- settings ---------------------------------------------------------------------------------------


def test_several_frontends_need_an_engine_core_to_share() -> None:
    with pytest.raises(ValidationError, match="GENERATOR_FRONTENDS=2 needs GENERATOR_BACKEND=vllm"):
        GeneratorSettings(backend="llama_cpp", frontends=2)


def test_several_frontends_need_a_fixed_port() -> None:
    with pytest.raises(ValidationError, match="needs a fixed GENERATOR_PORT"):
        GeneratorSettings(backend="vllm", model="m", frontends=2, port=0)


def test_one_frontend_is_the_default_and_any_backend_takes_it() -> None:
    assert GeneratorSettings(backend="llama_cpp").frontends == 1
    assert GeneratorSettings(backend="vllm", model="m", frontends=4).frontends == 4


def test_the_generators_admission_limits_are_shared_over_its_frontends() -> None:
    settings = GeneratorSettings(backend="vllm", model="m", frontends=3, max_num_seqs=256)
    shares = [frontend_settings(settings, i) for i in range(3)]
    # 256 active and 256 waiting for the generator: 86 and 86 for each of three (rounded up).
    assert {(s.active_limit, s.waiting_limit) for s in shares} == {(86, 86)}
    asked = settings.model_copy(update={"max_active_requests": 10, "max_waiting_requests": 0})
    assert (frontend_settings(asked, 0).active_limit, frontend_settings(asked, 0).waiting_limit) == (4, 0)


def test_each_frontend_serves_metrics_on_its_own_port() -> None:
    settings = GeneratorSettings(backend="vllm", model="m", frontends=3, metrics_port=9300)
    assert [frontend_settings(settings, i).metrics_port for i in range(3)] == [9300, 9301, 9302]
    off = settings.model_copy(update={"metrics_port": 0})
    assert frontend_settings(off, 2).metrics_port == 0


# --- the supervisor, on real processes ----------------------------------------------------------------


def _until_sigterm(code: int, ready: Any) -> None:  # a front-end that drains on SIGTERM, exits `code`
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ready.set()
    stop.wait(60)
    sys.exit(code if stop.is_set() else 99)


def _exit_at_once(code: int, ready: Any) -> None:
    ready.set()
    sys.exit(code)


@contextmanager
def started(*targets: tuple[Any, int]) -> Iterator[list[Any]]:
    readiness = [SPAWN.Event() for _ in targets]
    processes = [
        SPAWN.Process(target=target, args=(code, ready))
        for (target, code), ready in zip(targets, readiness, strict=True)
    ]
    try:
        for proc in processes:
            proc.start()
        for ready in readiness:  # each has its SIGTERM handler in place
            assert ready.wait(60)
        yield processes
    finally:
        for proc in processes:
            if proc.exitcode is None:
                proc.kill()
                proc.join()


def _later(seconds: float, action: Any) -> None:
    threading.Timer(seconds, action).start()


def test_a_signal_reaches_every_frontend_and_clean_exits_give_zero() -> None:
    with started((_until_sigterm, 0), (_until_sigterm, 0)) as processes:
        supervisor = Supervisor(processes, list, grace_s=5)
        _later(1.0, lambda: supervisor.forward(signal.SIGTERM))
        assert supervisor.run() == 0
        assert [p.exitcode for p in processes] == [0, 0]  # each drained after the signal, not killed


def test_a_frontend_that_fails_stops_the_others_and_gives_its_code() -> None:
    with started((_exit_at_once, 3), (_until_sigterm, 0)) as processes:
        supervisor = Supervisor(processes, list, grace_s=5)
        assert supervisor.run() == 3
        assert processes[1].exitcode == 0  # stopped by the supervisor's SIGTERM, not left running


def test_a_frontend_that_exits_unasked_counts_as_a_failure_even_with_zero() -> None:
    with started((_exit_at_once, 0), (_until_sigterm, 0)) as processes:
        assert Supervisor(processes, list, grace_s=5).run() == 1
        assert processes[1].exitcode == 0


def test_a_frontend_that_died_before_the_supervisor_ran_is_seen_at_once() -> None:
    with started((_exit_at_once, 3), (_until_sigterm, 0)) as processes:
        processes[0].join()  # dead, and reaped, before run(): e.g. during the engine core's start-up
        assert processes[0].exitcode == 3
        started_at = time.monotonic()
        assert Supervisor(processes, list, grace_s=5).run() == 3
        assert time.monotonic() - started_at < 10  # not left to the other front-end's own timeout
        assert processes[1].exitcode == 0


def test_a_signal_while_the_engine_core_starts_abandons_the_start_and_reaches_every_frontend() -> None:
    with started((_until_sigterm, 0), (_until_sigterm, 0)) as processes:
        supervisor = Supervisor(processes, list, grace_s=5)
        with pytest.raises(SystemExit):  # what vLLM's serve does: the launch wait is left
            supervisor.forward(signal.SIGTERM)
        assert supervisor.run() == 0  # e.g. a caller that runs on: each drained, cleanly
        assert [p.exitcode for p in processes] == [0, 0]


def test_a_signal_during_the_clean_up_only_passes_on() -> None:
    with started((_until_sigterm, 0)) as processes:
        supervisor = Supervisor(processes, list, grace_s=5)
        supervisor.cleaning_up()
        supervisor.forward(signal.SIGTERM)  # no SystemExit: the clean-up goes on
        processes[0].join(30)
        assert processes[0].exitcode == 0


def test_a_frontend_ended_by_the_stop_before_its_handler_was_in_place_is_clean() -> None:
    with started((_until_sigterm, 0)) as processes:
        supervisor = Supervisor(processes, list, grace_s=5)
        os.kill(processes[0].pid, signal.SIGKILL)  # stands for SIGTERM's default action
        processes[0].join()
        assert Supervisor(processes, list, grace_s=5)._clean(-signal.SIGTERM) is False  # unasked: failure
        with pytest.raises(SystemExit):
            supervisor.forward(signal.SIGTERM)
        assert supervisor._clean(-signal.SIGTERM) and supervisor._clean(0)
        assert not supervisor._clean(-signal.SIGKILL) and not supervisor._clean(1)


def test_the_engine_core_ending_stops_every_frontend() -> None:
    engine_end, engine_alive = SPAWN.Pipe(duplex=False)  # readable once the "engine" side closes
    with started((_until_sigterm, 0), (_until_sigterm, 0)) as processes:
        supervisor = Supervisor(processes, lambda: [engine_end], grace_s=5)
        _later(1.0, engine_alive.close)
        assert supervisor.run() == 1
        assert [p.exitcode for p in processes] == [0, 0]


def test_frontends_that_outlast_the_grace_are_killed() -> None:
    with started((_until_sigterm, 0)) as processes:
        # A front-end stuck past grace + margin: the margin is 10 s, so the test shortens it.
        supervisor = Supervisor(processes, list, grace_s=0)
        old = frontends._EXIT_MARGIN_S
        frontends._EXIT_MARGIN_S = 0.5
        try:
            os.kill(processes[0].pid, signal.SIGSTOP)  # it cannot drain: stopped
            _later(0.2, lambda: supervisor.forward(signal.SIGTERM))
            started_at = time.monotonic()
            assert supervisor.run() == 1  # killed is not a clean exit
            assert time.monotonic() - started_at < 10
            assert processes[0].exitcode == -signal.SIGKILL
        finally:
            frontends._EXIT_MARGIN_S = old


# --- vLLM's pieces, as stand-ins with vLLM 0.25.1's signatures -----------------------------------------


@pytest.fixture
def stand_in_vllm(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """`vllm` modules that record how they are called: AsyncEngineArgs, AsyncLLM, launch_core_engines."""
    calls: dict[str, Any] = {"events": []}

    class AsyncEngineArgs:
        _api_process_count = 1
        _api_process_rank = 0

        def __init__(self, **kwargs: Any) -> None:
            self.kwargs = kwargs
            self.enable_log_requests = kwargs.get("enable_log_requests", False)
            self.disable_log_stats = False

        def create_engine_config(self, usage_context: Any) -> Any:
            return types.SimpleNamespace(
                api_count=self._api_process_count, api_rank=self._api_process_rank, usage=usage_context
            )

    class AsyncLLM:  # vLLM 0.25.1's signatures, so that a misspelt keyword fails here too
        @classmethod
        def from_vllm_config(
            cls,
            vllm_config: Any,
            start_engine_loop: bool = True,
            usage_context: Any = None,
            stat_loggers: Any = None,
            enable_log_requests: bool = False,
            aggregate_engine_logging: bool = False,
            disable_log_stats: bool = False,
            client_addresses: Any = None,
            client_count: int = 1,
            client_index: int = 0,
        ) -> Any:
            kwargs = dict(locals())
            del kwargs["cls"], kwargs["vllm_config"]
            calls["from_vllm_config"] = (vllm_config, kwargs)
            return "client"

        @classmethod
        def from_engine_args(
            cls,
            engine_args: Any,
            start_engine_loop: bool = True,
            usage_context: Any = None,
            stat_loggers: Any = None,
        ) -> Any:
            kwargs = {"usage_context": usage_context, "stat_loggers": stat_loggers}
            calls["from_engine_args"] = (engine_args, kwargs)
            return "own engine"

    def get_engine_zmq_addresses(
        config: Any, num_api_servers: int = 1, *, defer_api_server_ports: bool = True
    ) -> Any:
        calls["defer"] = defer_api_server_ports
        return types.SimpleNamespace(
            inputs=[f"ipc://in-{i}" for i in range(num_api_servers)],
            outputs=[f"ipc://out-{i}" for i in range(num_api_servers)],
        )

    class Manager:
        def sentinels(self) -> list[int]:
            return [7]

        def shutdown(self) -> None:
            calls["events"].append("shutdown")

    @contextmanager
    def launch_core_engines(
        vllm_config: Any, executor_class: Any, log_stats: bool, addresses: Any, num_api_servers: int = 1
    ) -> Any:
        config, executor, count = vllm_config, executor_class, num_api_servers
        calls["launch"] = (config, executor, log_stats, addresses, count)
        calls["events"].append("launched")
        yield Manager(), None, addresses, None
        calls["events"].append("handshake")

    modules = {
        "vllm": types.SimpleNamespace(AsyncEngineArgs=AsyncEngineArgs),
        "vllm.config": types.SimpleNamespace(StructuredOutputsConfig=lambda **kw: ("structured", kw)),
        "vllm.usage.usage_lib": types.SimpleNamespace(
            UsageContext=types.SimpleNamespace(OPENAI_API_SERVER="openai")
        ),
        "vllm.v1.engine.async_llm": types.SimpleNamespace(AsyncLLM=AsyncLLM),
        "vllm.v1.engine.utils": types.SimpleNamespace(
            get_engine_zmq_addresses=get_engine_zmq_addresses, launch_core_engines=launch_core_engines
        ),
        "vllm.v1.executor": types.SimpleNamespace(
            Executor=types.SimpleNamespace(get_class=lambda config: "executor")
        ),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return calls


KWARGS = {"model": "m", "structured_outputs_config": {"backend": "guidance"}}


def test_a_frontend_is_a_client_of_its_own_addresses(stand_in_vllm: dict[str, Any]) -> None:
    frontend = FrontEnd(index=2, count=3, input_address="ipc://in-2", output_address="ipc://out-2")
    assert vllm_compat.build_async_llm(KWARGS, "logger", frontend) == "client"
    config, kwargs = stand_in_vllm["from_vllm_config"]
    assert (config.api_count, config.api_rank, config.usage) == (3, 2, "openai")
    assert kwargs["client_addresses"] == {"input_address": "ipc://in-2", "output_address": "ipc://out-2"}
    assert (kwargs["client_count"], kwargs["client_index"]) == (3, 2)
    assert kwargs["stat_loggers"] == ["logger"] and kwargs["usage_context"] == "openai"
    assert "from_engine_args" not in stand_in_vllm


def test_without_a_frontend_the_generator_starts_its_own_engine(stand_in_vllm: dict[str, Any]) -> None:
    assert vllm_compat.build_async_llm(KWARGS, "logger") == "own engine"
    args, kwargs = stand_in_vllm["from_engine_args"]
    assert args.kwargs["structured_outputs_config"] == ("structured", {"backend": "guidance"})
    assert (args._api_process_count, args._api_process_rank) == (1, 0)
    assert kwargs["stat_loggers"] == ["logger"]


def test_the_shared_engine_core_is_launched_for_every_frontend(stand_in_vllm: dict[str, Any]) -> None:
    core = vllm_compat.SharedEngineCore(KWARGS, 3)
    assert core.frontends() == [FrontEnd(i, 3, f"ipc://in-{i}", f"ipc://out-{i}") for i in range(3)]
    assert core.sentinels() == []  # nothing launched yet
    with core.launching():
        stand_in_vllm["events"].append("front-ends started")
    config, executor, log_stats, addresses, count = stand_in_vllm["launch"]
    # The launching process is rank -1 of 3, as in `vllm serve --api-server-count 3`.
    assert (config.api_count, config.api_rank, executor, log_stats, count) == (3, -1, "executor", True, 3)
    assert addresses.inputs == ["ipc://in-0", "ipc://in-1", "ipc://in-2"]
    assert stand_in_vllm["defer"] is False  # our front-ends report no bound port back
    assert core.sentinels() == [7]
    core.shutdown()
    core.shutdown()  # twice is harmless
    # The front-ends start before the handshake (the engine core connects to them), as vLLM does.
    assert stand_in_vllm["events"] == ["launched", "front-ends started", "handshake", "shutdown"]


# --- joining the port together ------------------------------------------------------------------------


async def test_front_ends_join_the_port_only_when_all_have_warmed_up() -> None:
    barrier = threading.Barrier(2)
    first = asyncio.ensure_future(all_warmed(barrier, "front-end"))
    await asyncio.sleep(0.2)
    assert not first.done()  # the other front-end is still warming up
    await all_warmed(barrier, "front-end")
    await asyncio.wait_for(first, 5)


async def test_a_broken_barrier_fails_the_waiting_front_ends_at_once() -> None:
    barrier = threading.Barrier(2)
    waiting = asyncio.ensure_future(all_warmed(barrier, "front-end"))
    await asyncio.sleep(0.1)
    barrier.abort()  # what a stopped front-end's wait does (test below)
    with pytest.raises(RuntimeError, match="another front-end failed or stopped"):
        await asyncio.wait_for(waiting, 5)


async def test_a_warm_up_that_fails_breaks_the_barrier_for_the_others() -> None:
    barrier = threading.Barrier(2)

    async def failing() -> None:
        raise SystemExit("the generator did not answer")

    waiting = asyncio.ensure_future(warm_up_together(asyncio.sleep(0), barrier, "edge worker", 60))
    await asyncio.sleep(0.1)
    with pytest.raises(SystemExit):
        await warm_up_together(failing(), barrier, "edge worker", 60)
    with pytest.raises(RuntimeError, match="another edge worker failed or stopped"):
        await asyncio.wait_for(waiting, 5)  # at once, not after 60 s


async def test_waiting_past_the_timeout_says_so() -> None:
    with pytest.raises(RuntimeError, match=r"the other edge workers did not warm up within 0\.2s"):
        await all_warmed(threading.Barrier(2), "edge worker", timeout_s=0.2)


async def test_a_stop_while_waiting_releases_every_waiter() -> None:
    barrier = threading.Barrier(3)
    one = asyncio.ensure_future(all_warmed(barrier, "front-end"))
    other = asyncio.ensure_future(all_warmed(barrier, "front-end"))
    await asyncio.sleep(0.1)
    one.cancel()
    with pytest.raises(asyncio.CancelledError):
        await one
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(other, 5)  # not left waiting out the timeout


def test_a_port_in_use_stops_the_supervisor_before_any_engine_starts() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot use 127.0.0.1:{port}"):
            frontends.check_port_free("127.0.0.1", port)
    frontends.check_port_free("127.0.0.1", port)  # free again


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_a_listener_that_shares_its_port_as_grpc_does_still_stops_the_supervisor(host: str) -> None:
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((host, 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot use 127.0.0.1:{port}"):
            frontends.check_port_free("127.0.0.1", port)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the check sets SO_REUSEADDR on Linux only")
def test_connections_an_earlier_generator_left_in_time_wait_do_not_hold_the_port() -> None:
    # The server side closes first, as a generator that stops does: its end of the connection stays
    # in TIME_WAIT on the port for a minute after the listener is gone.
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        served, _ = listener.accept()
        served.close()
        client.recv(1)  # the server's FIN
        client.close()
    with socket.socket() as plain:  # what the check did before: refused
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
    frontends.check_port_free("127.0.0.1", port)


def test_front_ends_left_at_the_end_are_killed_after_one_shared_timeout() -> None:
    with started((_until_sigterm, 0), (_until_sigterm, 0)) as processes:
        os.kill(processes[0].pid, signal.SIGSTOP)  # cannot act on SIGTERM
        started_at = time.monotonic()
        frontends.end_processes(processes, timeout_s=1.0)
        assert time.monotonic() - started_at < 5
        assert processes[0].exitcode == -signal.SIGKILL
        assert processes[1].exitcode == 0  # drained on SIGTERM
