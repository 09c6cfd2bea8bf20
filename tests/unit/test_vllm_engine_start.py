"""VllmEngine.start(): the plugin's settings reach the engine core, are read back, or stop the start.

vLLM's `AsyncLLM` is a stand-in whose engine core answers utility calls as vLLM's does (the method
looked up by name on the core, an error when it has none); the engine core's structured-output
manager is the stand-in from test_vllm_plugin with the plugin installed, or not.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from services.generator import vllm_compat
from services.generator.engine import EngineLoad
from services.generator.vllm_compat import SchedulerCounts
from services.generator.vllm_engine import VllmEngine
from services.generator.vllm_plugin import (
    ENV_BATCH_SIZE,
    ENV_THRESHOLD,
    ENV_WORKERS,
    BitmaskParallelism,
    BitmaskParallelismNotApplied,
    install,
)
from tests.unit.test_vllm_engine import Settings
from tests.unit.test_vllm_plugin import config, vllm_classes  # noqa: F401  (a fixture)


class UtilityError(Exception):
    """What vLLM's client raises when the engine core's utility method failed."""


@dataclass
class StandInEngineCore:
    core: Any
    calls: list[str] = field(default_factory=list)

    async def call_utility_async(self, method: str, *args: Any) -> Any:
        self.calls.append(method)
        try:
            return getattr(self.core, method)(*args)
        except AttributeError as exc:
            raise UtilityError(f"Call to {method} method failed: {exc}") from None


@dataclass
class StandInLLM:
    engine_core: StandInEngineCore
    stat_logger: Any
    environment: dict[str, str]
    shut_down: bool = False
    unfinished: int = 0

    def get_tokenizer(self) -> Any:
        return object()

    def shutdown(self) -> None:
        self.shut_down = True


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in (ENV_THRESHOLD, ENV_WORKERS, ENV_BATCH_SIZE):
        monkeypatch.delenv(name, raising=False)
    yield
    for name in (ENV_THRESHOLD, ENV_WORKERS, ENV_BATCH_SIZE):
        os.environ.pop(name, None)


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch, vllm_classes: tuple[type, type]) -> dict[str, Any]:  # noqa: F811
    """Replaces vLLM's construction; `built["plugin"]` says whether the engine core loaded the plugin."""
    manager_cls, core_cls = vllm_classes
    state: dict[str, Any] = {"plugin": True}

    def build(engine_kwargs: dict[str, Any], stat_logger: Any, frontend: Any = None) -> StandInLLM:
        state["frontend"] = frontend
        # The engine core starts here: what the plugin sees there is the environment now.
        environment = {k: v for k, v in os.environ.items() if k.startswith("TILSERVE_VLLM_")}
        if state["plugin"] and environment:
            install(manager_cls, core_cls, lambda: BitmaskParallelism.from_environment(environment))
        llm = StandInLLM(StandInEngineCore(core_cls(config(256))), stat_logger, environment)
        state["llm"] = llm
        return llm

    monkeypatch.setattr(vllm_compat, "build_async_llm", build)
    monkeypatch.setattr(vllm_compat, "resolved_settings", lambda llm: {"vllm_version": "stand-in"})
    monkeypatch.setattr(vllm_compat, "max_model_len", lambda llm: 4096)
    monkeypatch.setattr(vllm_compat, "model_sampling_defaults", lambda llm: {})
    monkeypatch.setattr(vllm_compat, "unfinished_requests", lambda llm: llm.unfinished)
    monkeypatch.setattr(VllmEngine, "_warm_up", _no_warm_up)
    return state


async def _no_warm_up(self: VllmEngine) -> None:
    pass


async def test_asked_parallelism_reaches_the_engine_core_and_is_read_back(built: dict[str, Any]) -> None:
    engine = VllmEngine(
        Settings(structured_output_parallel_threshold=0, structured_output_parallel_workers=6)
    )
    assert engine.info.engine_settings["bitmask_parallel_threshold"] == "0"  # asked, before start
    await engine.start()
    try:
        llm = built["llm"]
        assert llm.environment == {ENV_THRESHOLD: "0", ENV_WORKERS: "6"}
        assert llm.engine_core.calls == ["tilserve_bitmask_parallelism"]
        settings = engine.info.engine_settings
        assert settings["vllm_version"] == "stand-in"
        assert settings["bitmask_parallelism"] == "applied"
        assert (settings["bitmask_parallel_threshold"], settings["bitmask_parallel_workers"]) == ("0", "6")
        assert settings["bitmask_parallel_batch_size"] == "16"  # vLLM's, read back
        assert engine.info.max_model_len == 4096
    finally:
        await engine.close()
    assert llm.shut_down


async def test_asked_parallelism_the_engine_core_lacks_stops_the_start(built: dict[str, Any]) -> None:
    built["plugin"] = False  # e.g. VLLM_PLUGINS left tilserve out, or the metadata is missing
    engine = VllmEngine(Settings(structured_output_parallel_threshold=0))
    with pytest.raises(BitmaskParallelismNotApplied, match="did not answer tilserve_bitmask_parallelism"):
        await engine.start()
    await engine.close()  # what serve() does after a failed warm-up
    assert built["llm"].shut_down


async def test_nothing_asked_leaves_vllm_alone(built: dict[str, Any]) -> None:
    engine = VllmEngine(Settings())
    await engine.start()
    try:
        assert built["llm"].environment == {}
        assert built["llm"].engine_core.calls == []
        assert engine.info.engine_settings["bitmask_parallelism"] == "vllm default"
    finally:
        await engine.close()


async def test_the_plugins_variables_count_when_the_settings_ask_nothing(built: dict[str, Any]) -> None:
    """A benchmark driving the engine in-process turns it on as for `vllm serve`, and is checked too."""
    os.environ[ENV_THRESHOLD] = "0"
    engine = VllmEngine(Settings())
    await engine.start()
    try:
        assert built["llm"].environment == {ENV_THRESHOLD: "0"}
        assert engine.info.engine_settings["bitmask_parallel_threshold"] == "0"
        assert engine.info.engine_settings["bitmask_parallelism"] == "applied"
    finally:
        await engine.close()


async def test_the_plugins_variables_are_checked_too(built: dict[str, Any]) -> None:
    built["plugin"] = False
    os.environ[ENV_THRESHOLD] = "0"
    with pytest.raises(BitmaskParallelismNotApplied):
        await VllmEngine(Settings()).start()


async def test_settings_override_the_plugins_variables(built: dict[str, Any]) -> None:
    os.environ[ENV_THRESHOLD] = "3"
    os.environ[ENV_WORKERS] = "2"
    engine = VllmEngine(Settings(structured_output_parallel_threshold=0))
    await engine.start()
    try:
        assert built["llm"].environment == {ENV_THRESHOLD: "0"}
    finally:
        await engine.close()


async def test_load_comes_from_live_requests_and_the_stat_loggers_counts(built: dict[str, Any]) -> None:
    engine = VllmEngine(Settings())
    await engine.start()
    try:
        built["llm"].unfinished = 10
        engine.scheduler_counts.waiting = 4
        assert engine.load() == EngineLoad(running=6, waiting=4)
    finally:
        await engine.close()


def test_the_stat_logger_is_a_vllm_stat_logger_feeding_the_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    class StatLoggerBase:
        """vLLM's abstract base, as far as a subclass sees it."""

    loggers = types.ModuleType("vllm.v1.metrics.loggers")
    loggers.StatLoggerBase = StatLoggerBase  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm.v1.metrics.loggers", loggers)
    vllm_compat._stat_logger_class.cache_clear()
    try:
        counts = SchedulerCounts()
        logger = vllm_compat.scheduler_stat_logger(counts)(None, 0)  # (vllm_config, engine_index)
        assert isinstance(logger, StatLoggerBase)
        stats = types.SimpleNamespace(
            num_running_reqs=3, num_waiting_reqs=1, num_skipped_waiting_reqs=1, kv_cache_usage=0.5
        )
        logger.record(stats, None)
        logger.record(None, None)  # steps without scheduler stats change nothing
        assert counts == SchedulerCounts(running=3, waiting=2, kv_cache_usage=0.5)
    finally:
        vllm_compat._stat_logger_class.cache_clear()


def test_generator_settings_name_the_parallelism(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from services.generator.config import GeneratorSettings
    from services.generator.vllm_engine import bitmask_parallelism

    monkeypatch.setenv("GENERATOR_BACKEND", "vllm")
    monkeypatch.setenv("GENERATOR_MODEL", "/models/m")
    assert bitmask_parallelism(GeneratorSettings(), {}) == BitmaskParallelism()  # vLLM as it is
    monkeypatch.setenv("GENERATOR_STRUCTURED_OUTPUT_PARALLEL_THRESHOLD", "0")
    monkeypatch.setenv("GENERATOR_STRUCTURED_OUTPUT_PARALLEL_WORKERS", "12")
    monkeypatch.setenv("GENERATOR_STRUCTURED_OUTPUT_FILL", "threads")
    settings = GeneratorSettings()
    assert bitmask_parallelism(settings, {}) == BitmaskParallelism(threshold=0, workers=12, fill="threads")
    # A fill the settings leave unset comes from the plugin's variable.
    monkeypatch.setenv("GENERATOR_STRUCTURED_OUTPUT_FILL", "")
    fill = {"TILSERVE_VLLM_BITMASK_FILL": "llguidance"}
    assert bitmask_parallelism(GeneratorSettings(), fill) == BitmaskParallelism(
        threshold=0, workers=12, fill="llguidance"
    )
    monkeypatch.setenv("GENERATOR_STRUCTURED_OUTPUT_FILL", "rust")
    with pytest.raises(ValidationError, match="structured_output_fill"):
        GeneratorSettings()
    monkeypatch.delenv("GENERATOR_STRUCTURED_OUTPUT_FILL")
    monkeypatch.setenv("GENERATOR_STRUCTURED_OUTPUT_PARALLEL_WORKERS", "0")
    with pytest.raises(ValidationError, match="structured_output_parallel_workers"):
        GeneratorSettings()


async def test_a_frontend_builds_its_client_of_the_shared_engine_core_and_says_which(
    built: dict[str, Any],
) -> None:
    frontend = vllm_compat.FrontEnd(
        index=1, count=4, input_address="ipc://in-1", output_address="ipc://out-1"
    )
    engine = VllmEngine(Settings(), frontend)
    await engine.start()
    try:
        assert built["frontend"] is frontend
        settings = engine.info.engine_settings
        assert (settings["frontends"], settings["frontend_index"]) == ("4", "1")
    finally:
        await engine.close()


async def test_a_lone_generator_starts_its_own_engine_core(built: dict[str, Any]) -> None:
    engine = VllmEngine(Settings())
    await engine.start()
    try:
        assert built["frontend"] is None
        assert engine.info.engine_settings["frontends"] == "1"
        assert "frontend_index" not in engine.info.engine_settings
    finally:
        await engine.close()
