"""TILSERVE_VLLM_TRACE_GRAMMAR: the engine core notes when each schema request arrived, had its grammar
compiled and was first masked, and logs a summary. The manager is test_vllm_plugin's stand-in, whose
`grammar_init` submits `self._create_grammar` to a pool as vLLM 0.25.1's does."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from services.generator.vllm_plugin import BitmaskParallelism, install
from services.generator.vllm_trace import ENV_TRACE, GrammarTimeline, trace_interval
from tests.unit.test_vllm_plugin import config, vllm_classes  # noqa: F401  (a fixture)


def test_the_interval_comes_from_the_environment() -> None:
    assert trace_interval({}) is None
    assert trace_interval({ENV_TRACE: " "}) is None
    assert trace_interval({ENV_TRACE: "2.5"}) == 2.5
    for bad in ("0", "-1", "inf", "soon"):
        with pytest.raises(ValueError, match=ENV_TRACE):
            trace_interval({ENV_TRACE: bad})


def test_each_gap_of_each_request_is_summarized_once_its_first_step_came() -> None:
    now = [0.0]
    lines: list[str] = []
    timeline = GrammarTimeline(10.0, clock=lambda: now[0], emit=lines.append)

    def at(t: float, action: Any, *args: Any) -> None:
        now[0] = t
        action(*args)

    # a: pool wait 5 ms, compile 20 ms, first step 10.1 s later; b: 15, 40 and 50 ms.
    at(1.000, timeline.received, "a")
    at(1.002, timeline.received, "b")
    at(1.005, timeline.compile_started, "a")
    at(1.017, timeline.compile_started, "b")
    at(1.025, timeline.compile_ended, "a")
    at(1.057, timeline.compile_ended, "b")
    at(1.107, timeline.masked, ["b"])  # the first step to mask b; not yet 10 s since the last summary
    assert lines == []
    at(11.125, timeline.masked, ["a", "b", "unknown"])  # b's second step and an untraced id count nothing
    (line,) = lines
    assert line.startswith("structured requests at their first masked step: 2;")
    # Linear interpolation between the two values: p50 is their mean.
    assert "pool wait p50 10.0 p99 14.9 ms" in line
    assert "compile p50 30.0 p99 39.8 ms" in line
    assert "compiled to first step p50 5075.0 p99 9999.5 ms" in line  # a: 10,100 ms; b: 50
    assert "received to first step p50 5115.0 p99 10024.8 ms" in line  # a: 10,125 ms; b: 105
    at(30.0, timeline.masked, ["a"])  # nothing new: no line
    assert len(lines) == 1


def test_a_request_never_scheduled_does_not_stay_forever() -> None:
    timeline = GrammarTimeline(1.0, emit=lambda line: None)
    for i in range(10_050):
        timeline.received(f"r{i}")
    assert len(timeline._pending) == 10_000
    assert "r0" not in timeline._pending and "r10049" in timeline._pending


def test_the_plugin_traces_the_engine_cores_manager_when_asked(
    vllm_classes: tuple[type, type],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(ENV_TRACE, "0.001")
    manager_cls, core_cls = vllm_classes
    assert install(manager_cls, core_cls, lambda: BitmaskParallelism()) is None  # masks: vLLM's own
    manager = core_cls(config(256)).structured_output_manager
    ids = [f"req-{i}" for i in range(3)]
    requests = [SimpleNamespace(request_id=i, structured_output_request=SimpleNamespace()) for i in ids]
    plain = SimpleNamespace(request_id="plain", structured_output_request=None)
    with caplog.at_level("INFO", logger="services.generator.vllm_trace"):
        for request in [*requests, plain]:
            manager.grammar_init(request)
        grammars = [r.structured_output_request.grammar.result(timeout=5) for r in requests]
        assert grammars == [("grammar", i) for i in ids]  # vLLM's own compile still ran
        time.sleep(0.01)
        assert manager.grammar_bitmask({}, ids, {}) is None  # and its own bitmask
    (record,) = [r for r in caplog.records if r.name == "services.generator.vllm_trace"]
    assert "structured requests at their first masked step: 3;" in record.getMessage()
    assert "compile p50" in record.getMessage()


def test_without_the_variable_the_manager_is_left_alone(
    vllm_classes: tuple[type, type],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV_TRACE, raising=False)
    manager_cls, core_cls = vllm_classes
    install(manager_cls, core_cls, lambda: BitmaskParallelism())
    manager = core_cls(config(256)).structured_output_manager
    assert "grammar_init" not in vars(manager) and "_create_grammar" not in vars(manager)


def test_a_bad_trace_setting_leaves_the_mask_settings_applied(
    vllm_classes: tuple[type, type],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.generator.vllm_plugin import in_force

    monkeypatch.setenv(ENV_TRACE, "soon")
    manager_cls, core_cls = vllm_classes
    install(manager_cls, core_cls, lambda: BitmaskParallelism(threshold=0, workers=2))
    manager = core_cls(config(256)).structured_output_manager
    assert in_force(manager)["applied"] and in_force(manager)["threshold"] == 0
    assert "grammar_init" not in vars(manager)  # not traced
