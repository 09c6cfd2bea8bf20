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


class _Scheduler:
    """vLLM 0.25.1's Scheduler as the raw timeline sees it: queues, and the three methods it hooks."""

    def __init__(self) -> None:
        self.running: list[Any] = []
        self.waiting: list[Any] = []
        self.skipped_waiting: list[Any] = []

    def add_request(self, request: Any) -> None:
        self.waiting.append(request)

    def schedule(self) -> Any:
        new, self.waiting = self.waiting, []
        self.running += new
        return SimpleNamespace(
            scheduled_new_reqs=[SimpleNamespace(req_id=r.request_id) for r in new],
            total_num_scheduled_tokens=sum(r.tokens for r in new) + len(self.running) - len(new),
        )

    def update_from_output(self, scheduler_output: Any, model_output: Any) -> str:
        return f"outputs of {len(scheduler_output.scheduled_new_reqs)} new"


class _Core:
    def __init__(self, scheduler: _Scheduler) -> None:
        self.scheduler = scheduler

    def preprocess_add_request(self, request: Any) -> tuple[Any, int]:
        return SimpleNamespace(request_id=request.request_id, tokens=len(request.prompt_token_ids)), 0


def test_the_raw_timeline_holds_every_request_and_step_as_the_engine_core_ran_them(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import engine_timeline
    from services.generator import vllm_trace

    monkeypatch.setenv(ENV_TRACE, "30")
    monkeypatch.setenv(vllm_trace.ENV_TRACE_DIR, str(tmp_path))
    monkeypatch.setattr(vllm_trace, "_raw", None)
    scheduler_cls, core_cls = type("Scheduler", (_Scheduler,), {}), type("EngineCore", (_Core,), {})
    vllm_trace.trace_engine(scheduler_cls, core_cls)
    vllm_trace.trace_engine(scheduler_cls, core_cls)  # a second load of the plugin hooks nothing twice
    scheduler = scheduler_cls()
    core = core_cls(scheduler)
    arrival = time.time()
    for request_id, tokens, schema in (("bench-at-0-x", 512, True), ("bench-a-0-y", 256, False)):
        params = SimpleNamespace(structured_outputs=object() if schema else None)
        engine_request = SimpleNamespace(
            request_id=request_id, arrival_time=arrival, prompt_token_ids=[1] * tokens, sampling_params=params
        )
        request, _ = core.preprocess_add_request(engine_request)
        scheduler.add_request(request)
    first = scheduler.schedule()
    assert scheduler.update_from_output(first, None) == "outputs of 2 new"  # vLLM's own methods still run
    time.sleep(0.002)
    second = scheduler.schedule()  # a decode step: nothing new
    scheduler.update_from_output(second, None)
    vllm_trace._raw.flush()  # as its writer thread does every interval, and at exit

    (path,) = tmp_path.glob("engine-core-*.jsonl")
    core_file = engine_timeline.read_core(path)
    assert [s["tokens"] for s in core_file.steps] == [768, 2]
    assert [s["new"] for s in core_file.steps] == [2, 0]
    assert all(s["end"] >= s["t"] for s in core_file.steps)
    requests = {r["id"]: r for r in core_file.requests}
    assert set(requests) == {"bench-at-0-x", "bench-a-0-y"}
    a_til = requests["bench-at-0-x"]
    assert (a_til["prompt_tokens"], a_til["schema"]) == (512, True)
    assert arrival <= a_til["received"] <= a_til["added"] <= a_til["scheduled"] <= a_til["first_step_end"]
    # On one clock with the front-end's `arrival` (wall), whatever the engine core's monotonic clock.
    assert 0 <= a_til["received"] - arrival < 5

    result = engine_timeline.analyse([core_file])
    assert set(result) == {"engine-til", "engine"}
    assert result["engine-til"]["gaps_ms"]["front-end to core"]["n"] == 1
    assert result["engine"]["steps"]["steps with new requests"] == 1
    assert "grammar compile" not in result["engine"]["gaps_ms"]  # no schema, no compile


def test_without_a_trace_dir_the_hooks_record_nothing(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.generator import vllm_trace

    monkeypatch.setenv(ENV_TRACE, "0.000001")
    monkeypatch.delenv(vllm_trace.ENV_TRACE_DIR, raising=False)
    monkeypatch.setattr(vllm_trace, "_raw", None)
    assert vllm_trace.trace_dir() is None and vllm_trace.raw_timeline() is None
    monkeypatch.setenv(vllm_trace.ENV_TRACE_DIR, str(tmp_path))
    monkeypatch.delenv(ENV_TRACE)
    assert vllm_trace.trace_dir() is None  # the directory alone asks for nothing


def test_arms_are_told_apart_by_id_and_by_the_measured_windows() -> None:
    from bench.engine_timeline import arm_of, windows

    assert arm_of({"id": "bench-at-3-abcd", "schema": True}) == "engine-til"
    assert arm_of({"id": "bench-a-3-abcd", "schema": False}) == "engine"
    assert arm_of({"id": "bench-c-3-f0n1-abcd", "schema": True}) == "generator-til"
    assert arm_of({"id": "bench-c-3-f0n1-abcd", "schema": False}) == "generator"
    assert arm_of({"id": "0b5e-f2n7-abcd", "schema": True}) == "edge"
    log = (
        "20:50:25.011 [c=100 engine-til] warm-up: 100 requests\n"
        "20:50:29.080 [c=100 engine-til] measuring: 200 requests\n"
        "20:50:40.875 [c=100 engine-til] 7,339 tok/s, 256 out tok/req, 512 prompt tok/req, TTFT p50 531.3\n"
        "20:50:42.400 [c=100 edge] measuring: 200 requests\n"
    )
    (window,) = windows(log)  # the edge's never ended: not a window
    assert window == ("c=100 engine-til", 20 * 3600 + 50 * 60 + 29.080, 20 * 3600 + 50 * 60 + 40.875)


def test_waves_are_told_apart_and_their_prefill_steps_counted() -> None:
    from bench.engine_timeline import waves

    def request(i: int, arrival: float, scheduled: float) -> dict[str, Any]:
        return {"id": f"r{i}", "arrival": arrival, "scheduled": scheduled, "first_step_end": scheduled + 0.1}

    # Wave 1: 5 requests within 4 ms, the first step takes 1 of them and the next 4 (2 prefill steps);
    # wave 2, 3 s later: 3 requests in one step.
    first = [request(0, 10.000, 10.001)] + [request(i, 10.001 * 1 + i * 0.001, 10.2) for i in range(1, 5)]
    second = [request(10 + i, 13.0 + i * 0.01, 13.05) for i in range(3)]
    rows = waves(first + second)
    assert [(w["requests"], w["prefill steps"], w["first step new"]) for w in rows] == [(5, 2, 1), (3, 1, 3)]
    assert rows[0]["arrivals max ms"] == pytest.approx(5.0, abs=0.01)
    assert rows[1]["arrival to first step end p50 ms"] == pytest.approx(140.0, abs=0.01)


def test_a_timeline_file_removed_while_the_core_runs_starts_again_with_the_clocks(tmp_path: Any) -> None:
    import json

    from services.generator.vllm_trace import RawTimeline

    path = tmp_path / "engine-core-1.jsonl"
    raw = RawTimeline(path, 1.0)
    output = SimpleNamespace(scheduled_new_reqs=[], total_num_scheduled_tokens=4)
    for _ in range(2):
        raw.scheduled(output, time.monotonic(), running=1, waiting=0, skipped=0)
        raw.stepped(output)
        raw.flush()
        first, *rest = [json.loads(line) for line in path.read_text().splitlines()]
        assert "clock" in first and rest and all("step" in r for r in rest)
        path.unlink()  # as an operator clearing the folder between two runs would


def test_a_failing_trace_never_reaches_vllm_and_turns_itself_off(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from services.generator import vllm_trace

    monkeypatch.setenv(ENV_TRACE, "30")
    monkeypatch.setenv(vllm_trace.ENV_TRACE_DIR, str(tmp_path))
    monkeypatch.setattr(vllm_trace, "_raw", None)
    monkeypatch.setattr(vllm_trace, "_failed", False)
    scheduler_cls = type("Scheduler", (_Scheduler,), {})
    vllm_trace.trace_engine(scheduler_cls, type("EngineCore", (_Core,), {}))
    scheduler = scheduler_cls()
    scheduler.add_request(SimpleNamespace(request_id="r", tokens=4))
    calls = []

    def broken(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        raise RuntimeError("a bug in the trace")

    monkeypatch.setattr(vllm_trace.RawTimeline, "scheduled", broken)
    with caplog.at_level("ERROR", logger="services.generator.vllm_trace"):
        output = scheduler.schedule()  # vLLM's step goes on with its output
        again = scheduler.schedule()
    assert [r.req_id for r in output.scheduled_new_reqs] == ["r"] and again.total_num_scheduled_tokens == 1
    assert len(calls) == 1  # off after the first failure
    assert "engine timeline off" in caplog.text
