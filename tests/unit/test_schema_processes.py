"""GENERATOR_SCHEMA_WORKERS: request schemas readied in spawned worker processes, as the in-process
`prepared_schema` readies them, refused with its messages, and a dead worker replaced."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from types import SimpleNamespace
from typing import Any

import pytest

from services.generator.engine import EngineRequest, InvalidRequest
from services.generator.vllm_inputs import SchemaProcesses, prepared_schema, prepared_schema_text, schema_key

TIL = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "pattern": "^2026-11-29 TIL - [가-힣]{1,8}$"},
        "keywords": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "content": {"type": "string", "pattern": "^# 2026-11-29 TIL\\n\\n- [^\\n]{1,80}\\n$"},
    },
    "required": ["title", "keywords", "content"],
}


async def prepared(workers: SchemaProcesses, schema: dict[str, Any]) -> dict[str, Any]:
    """The schema readied in a worker, or found among the last results: the engine's worker path."""
    key = schema_key(schema)
    text = workers.known(key) or await workers.text(key)
    workers.keep(key, text)
    return json.loads(text)  # a copy each time: vLLM edits the schema it is given


@pytest.fixture
def workers() -> Any:
    processes = SchemaProcesses(1)
    processes.warm()
    yield processes
    processes.close()


async def test_a_worker_readies_a_schema_as_this_process_does(workers: SchemaProcesses) -> None:
    first = await prepared(workers, TIL)
    assert first == prepared_schema(TIL)
    assert list(first["properties"]) == ["title", "keywords", "content"]  # the schema's order kept
    again = await prepared(workers, TIL)
    assert again == first and again is not first  # a copy each time: vLLM edits what it is given


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"type": "string", "pattern": "^(?=a)"}, "lookarounds"),
        ({"type": "string", "maxLength": 10**9}, "maxLength must be an integer"),
    ],
)
async def test_a_refused_schema_comes_back_with_the_same_message(
    workers: SchemaProcesses, schema: dict[str, Any], says: str
) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(says)) as refused:
        await prepared(workers, schema)
    with pytest.raises(InvalidRequest) as here:
        prepared_schema(schema)
    assert str(refused.value) == str(here.value)


async def test_a_dead_worker_is_replaced_and_the_request_tried_again(workers: SchemaProcesses) -> None:
    await prepared(workers, TIL)
    pool = workers._executor()
    (pid,) = list(pool._processes)  # type: ignore[attr-defined]
    os.kill(pid, signal.SIGKILL)
    await _gone([pid])  # the pool notices its worker's death on its own thread
    other = {**TIL, "description": "not cached"}
    assert await prepared(workers, other) == prepared_schema(other)
    assert workers.rebuilt == 1
    assert workers._executor() is not pool


def engine_with_workers() -> Any:
    """A VllmEngine with one schema worker, a loaded stand-in (no vLLM) and vLLM's own check left out."""
    from services.generator.vllm_engine import VllmEngine, _Loaded
    from tests.unit.test_vllm_engine import Settings
    from tests.unit.test_vllm_tokenize import PieceTokenizer

    engine = VllmEngine(Settings(schema_workers=1))  # type: ignore[arg-type]
    engine._loaded = _Loaded(
        llm=SimpleNamespace(shutdown=lambda: None),
        tokenizer=PieceTokenizer(),
        max_model_len=64,
        model_defaults={},
    )  # type: ignore[arg-type]
    engine._sampling_params = lambda request, schema: None  # type: ignore[method-assign]  # vLLM's own check
    return engine


async def test_the_vllm_engine_readies_schemas_in_its_workers_before_the_request_queues() -> None:
    engine = engine_with_workers()
    try:
        request = EngineRequest(request_id="r", prompt="x", messages=None, max_tokens=4, json_schema=TIL)
        prepared = await engine.prepare(request)
        assert prepared.prepared is not None and prepared.prepared.constraint == prepared_schema(TIL)
        bad = EngineRequest(
            request_id="b",
            prompt="x",
            messages=None,
            max_tokens=4,
            json_schema={"type": "string", "pattern": "^(?=a)"},
        )
        with pytest.raises(InvalidRequest, match="lookarounds"):
            await engine.prepare(bad)
        processes = engine._schema_processes
        assert processes is not None
        pids = list(processes._executor()._processes)  # type: ignore[attr-defined]
    finally:
        await engine.close()
    await _gone(pids)
    assert not any(_alive(pid) for pid in pids)  # closing the engine ends its workers


async def _gone(pids: list[int], timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if not any(_alive(pid) for pid in pids):
            return
        await asyncio.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


async def test_a_lone_schema_is_readied_here_and_the_ones_beside_it_in_the_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.generator import vllm_engine

    here: list[dict[str, Any]] = []

    def slow_here(key: str) -> str:
        here.append(json.loads(key))
        time.sleep(0.5)  # still being readied when the next request comes
        return prepared_schema_text(key)

    monkeypatch.setattr(vllm_engine, "prepared_schema_text", slow_here)
    engine = engine_with_workers()
    processes = engine._schema_processes
    assert processes is not None
    second = {**TIL, "description": "beside the first"}
    try:

        def request(schema: dict[str, Any]) -> EngineRequest:
            return EngineRequest(request_id="r", prompt="x", messages=None, max_tokens=4, json_schema=schema)

        first_task = asyncio.create_task(engine.prepare(request(TIL)))
        await asyncio.sleep(0.1)  # the first is on the thread now
        beside = await engine.prepare(request(second))
        first = await first_task
        assert here == [TIL]  # only the lone one was readied in this process
        assert processes._pool is not None  # the other went to a worker
        assert first.prepared is not None and beside.prepared is not None
        assert beside.prepared.constraint == prepared_schema(second)
        alone = await engine.prepare(request({**TIL, "description": "alone again"}))
        assert len(here) == 2 and alone.prepared is not None  # nothing in flight: here again
    finally:
        await engine.close()


def test_workers_go_with_a_serving_process_killed_without_shutting_them_down() -> None:
    import subprocess
    import sys

    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from services.generator.vllm_inputs import SchemaProcesses\n"
            "p = SchemaProcesses(2)\n"
            "p.warm()\n"
            "print(*p._executor()._processes, flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    pids = [int(pid) for pid in parent.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(pid) for pid in pids)
    parent.kill()  # SIGKILL: no close(), no atexit
    parent.wait()
    for _ in range(200):
        if not any(_alive(pid) for pid in pids):
            break
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


async def test_a_closed_pool_is_not_built_again(workers: SchemaProcesses) -> None:
    from services.generator.engine import EngineUnavailable

    workers.close()
    with pytest.raises(EngineUnavailable, match="shutting down"):
        await prepared(workers, {**TIL, "description": "after close"})


async def test_prepare_says_where_a_schemas_time_went(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.generator import vllm_engine

    def slow(key: str) -> str:
        time.sleep(0.05)
        return prepared_schema_text(key)

    monkeypatch.setattr(vllm_engine, "prepared_schema_text", slow)
    engine = engine_with_workers()
    try:
        request = EngineRequest(request_id="r", prompt="x", messages=None, max_tokens=4, json_schema=TIL)
        lone = await engine.prepare(request)
        again = await engine.prepare(request)
    finally:
        await engine.close()
    assert lone.prepared is not None and again.prepared is not None
    parts = dict(lone.prepared.breakdown)
    # On the thread: its own work (the 50 ms), and the waits before and after it, within the whole.
    assert {"schema", "schema queued", "readied", "resumed"} <= parts.keys()
    assert parts["readied"] >= 50
    assert parts["schema queued"] + parts["readied"] + parts["resumed"] <= parts["schema"] + 0.01
    # Asked again: the text readied before, no thread.
    assert "readied" not in dict(again.prepared.breakdown) and "schema known" in dict(
        again.prepared.breakdown
    )
