"""VllmEngine's streaming plumbing against a scripted stand-in for vLLM's AsyncLLM.

CI has no vLLM, so the few vLLM names `generate` imports are stand-ins here; the stand-in engine
behaves as AsyncLLM 0.25 does where it matters: DELTA outputs, `abort(id)` ending the stream with
finish_reason "abort", and an abort when its generator is closed. `bench/vllm_smoke.py` runs the
same paths against the real engine on a GPU.
"""

from __future__ import annotations

import asyncio
import sys
import time
import types
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from services.generator.engine import (
    EngineDelta,
    EngineFinished,
    EngineRequest,
    EngineStarted,
    InvalidRequest,
    PromptTooLong,
)
from services.generator.json_grammar import llguidance_schema
from services.generator.vllm_compat import guidance_schema
from services.generator.vllm_engine import VllmEngine, _Loaded
from tests.unit.test_vllm_engine import Settings


class EngineDeadError(Exception):
    pass


@pytest.fixture(autouse=True)
def vllm_names(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Just the vLLM names `VllmEngine.generate` imports."""
    vllm = types.ModuleType("vllm")
    vllm.TokensPrompt = dict  # type: ignore[attr-defined]
    vllm.SamplingParams = lambda **kwargs: SimpleNamespace(**kwargs)  # type: ignore[attr-defined]
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.RequestOutputKind = SimpleNamespace(DELTA="delta")  # type: ignore[attr-defined]
    sampling.StructuredOutputsParams = lambda **kwargs: SimpleNamespace(**kwargs)  # type: ignore[attr-defined]
    exceptions = types.ModuleType("vllm.v1.engine.exceptions")
    exceptions.EngineDeadError = EngineDeadError  # type: ignore[attr-defined]
    for name, module in {
        "vllm": vllm,
        "vllm.sampling_params": sampling,
        "vllm.v1": types.ModuleType("vllm.v1"),
        "vllm.v1.engine": types.ModuleType("vllm.v1.engine"),
        "vllm.v1.engine.exceptions": exceptions,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    yield


def output(text: str, tokens: int, finish: str | None = None, cached: int = 0) -> Any:
    completion = SimpleNamespace(text=text, token_ids=list(range(tokens)), finish_reason=finish)
    return SimpleNamespace(
        outputs=[completion], finished=finish is not None, num_cached_tokens=cached, metrics=None
    )


@dataclass
class ScriptedLLM:
    """Streams `script`, then (if `endless`) one token every 5 ms until aborted."""

    script: list[Any]
    endless: bool = False
    reject: Exception | None = None
    requests: list[tuple[list[int], Any, str]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    live: int = 0

    async def generate(self, prompt: dict[str, Any], params: Any, request_id: str) -> AsyncIterator[Any]:
        self.requests.append((prompt["prompt_token_ids"], params, request_id))
        if self.reject is not None:
            raise self.reject
        self.live += 1
        try:
            for out in self.script:
                yield out
            while self.endless:
                await asyncio.sleep(0.005)
                if request_id in self.aborted:
                    yield output("", 0, finish="abort")
                    return
                yield output("x", 1)
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)  # what AsyncLLM.generate does on the way out
            raise
        finally:
            self.live -= 1

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


class CharTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]


def engine_with(llm: ScriptedLLM, max_model_len: int = 64) -> VllmEngine:
    engine = VllmEngine(Settings())
    engine._loaded = _Loaded(
        llm=llm, tokenizer=CharTokenizer(), max_model_len=max_model_len, model_defaults={}
    )  # type: ignore[arg-type]
    return engine


def request(**overrides: Any) -> EngineRequest:
    fields: dict[str, Any] = {"request_id": "r", "prompt": "hello", "messages": None, "max_tokens": 16}
    fields.update(overrides)
    return EngineRequest(**fields)


async def events_of(engine: VllmEngine, req: EngineRequest) -> list[Any]:
    return [event async for event in engine.generate(req)]


async def test_a_stream_is_started_deltas_finished_with_token_counts() -> None:
    # The second output's token has no text yet (half a multi-byte character): it is counted
    # with the next text.
    llm = ScriptedLLM(
        [output("안", 2), output("", 1), output("녕", 1), output(".", 1, finish="length", cached=3)]
    )
    events = await events_of(engine_with(llm), request(json_schema={"type": "object"}))
    assert events == [
        EngineStarted(prompt_tokens=5, queue_s=0.0),
        EngineDelta(text="안", token_count=2),
        EngineDelta(text="녕", token_count=2),
        EngineDelta(text=".", token_count=1),
        EngineFinished(finish_reason="length", prompt_tokens=5, completion_tokens=5, cached_prompt_tokens=3),
    ]
    prompt_ids, params, _ = llm.requests[0]
    assert prompt_ids == [ord(c) for c in "hello"]
    assert params.output_kind == "delta"
    assert params.structured_outputs.json == guidance_schema(llguidance_schema({"type": "object"}))


async def test_callers_request_ids_need_not_be_unique() -> None:
    llm = ScriptedLLM([output("a", 1, finish="stop")])
    engine = engine_with(llm)
    await events_of(engine, request())
    await events_of(engine, request())
    first, second = (rid for _, _, rid in llm.requests)
    assert first != second and first.startswith("r-")


async def test_a_deadline_aborts_the_engine_request_and_raises_timeout() -> None:
    llm = ScriptedLLM([], endless=True)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="during generation"):
        # wait_for only guards against a hang: its own timeout would say "TimeoutError()".
        await asyncio.wait_for(events_of(engine_with(llm), request(deadline=time.monotonic() + 0.05)), 5)
    assert time.monotonic() - started < 0.5
    # Aborted by the deadline (and again, harmlessly, as the finished stream is closed).
    assert set(llm.aborted) == {llm.requests[0][2]}
    assert llm.live == 0


async def test_a_passed_deadline_never_reaches_the_engine() -> None:
    llm = ScriptedLLM([output("a", 1, finish="stop")])
    with pytest.raises(TimeoutError):
        await events_of(engine_with(llm), request(deadline=time.monotonic() - 1))
    assert llm.requests == []


async def test_closing_the_stream_early_aborts_the_engine_request() -> None:
    llm = ScriptedLLM([], endless=True)
    stream = engine_with(llm).generate(request())
    async for event in stream:
        if isinstance(event, EngineDelta):
            break
    await stream.aclose()  # what the servicer's `async for` does when its call ends
    assert llm.aborted == [llm.requests[0][2]]
    assert llm.live == 0


async def test_cancelling_the_consumer_aborts_the_engine_request() -> None:
    llm = ScriptedLLM([], endless=True)
    engine = engine_with(llm)
    task = asyncio.create_task(events_of(engine, request()))
    await asyncio.sleep(0.03)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert llm.aborted == [llm.requests[0][2]]
    assert llm.live == 0


async def test_an_abort_that_is_no_deadline_is_unavailable() -> None:
    from services.generator.engine import EngineUnavailable

    llm = ScriptedLLM([output("a", 1), output("", 0, finish="abort")])
    with pytest.raises(EngineUnavailable, match="abort"):
        await events_of(engine_with(llm), request())


async def test_a_request_vllm_rejects_is_invalid_argument() -> None:
    llm = ScriptedLLM([], reject=ValueError("Grammar error: Invalid type: nonsense"))
    with pytest.raises(InvalidRequest, match="nonsense"):
        await events_of(engine_with(llm), request(json_schema={"type": "nonsense"}))


async def test_a_dead_engine_is_unavailable() -> None:
    from services.generator.engine import EngineUnavailable

    llm = ScriptedLLM([], reject=EngineDeadError())
    with pytest.raises(EngineUnavailable, match="died"):
        await events_of(engine_with(llm), request())


async def test_prompt_too_long_comes_before_any_event_or_engine_request() -> None:
    llm = ScriptedLLM([output("a", 1, finish="stop")])
    with pytest.raises(PromptTooLong):
        await events_of(engine_with(llm, max_model_len=20), request(prompt="x" * 5, max_tokens=16))
    assert llm.requests == []


async def test_an_empty_prompt_is_invalid_argument() -> None:
    with pytest.raises(InvalidRequest, match="empty"):
        await events_of(engine_with(ScriptedLLM([])), request(prompt=""))


async def test_the_schema_reaches_vllm_folded_and_a_refused_one_never_does() -> None:
    llm = ScriptedLLM([output("{}", 1, finish="stop")])
    schema = {"type": "string", "pattern": "^# T\\n", "maxLength": 40}
    await events_of(engine_with(llm), request(json_schema=schema))
    sent = llm.requests[0][1].structured_outputs.json
    # Exactly what the llama.cpp engine compiles for it: the bound folded into the pattern.
    assert sent == guidance_schema(llguidance_schema(schema)) and "maxLength" not in sent
    assert sent["pattern"].startswith("^(?:# T\\n)") and sent["pattern"].endswith("{0,36}$")
    with pytest.raises(InvalidRequest, match="lookarounds"):
        await events_of(engine_with(llm), request(json_schema={"type": "string", "pattern": "(?!x)"}))
    assert len(llm.requests) == 1
