"""The fake engine (GENERATOR_BACKEND=fake) that the fault tests run the stack on: schema-shaped output, at a
fixed pace, with the real engines' handling of max_tokens, deadlines and cancellation."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from services.edge.til_format import check_til, til_schema
from services.generator.config import GeneratorSettings
from services.generator.engine import (
    ChatTurn,
    EngineDelta,
    EngineFinished,
    EngineRequest,
    EngineStarted,
    PromptTooLong,
)
from services.generator.fake_engine import FakeEngine, _literal_prefix, fake_output


def engine(interval_s: float = 0.0) -> FakeEngine:
    return FakeEngine(GeneratorSettings(backend="fake", fake_token_interval_s=interval_s, max_model_len=2048))


def request(max_tokens: int = 512, deadline: float | None = None, **fields: object) -> EngineRequest:
    return EngineRequest(
        request_id="r1",
        prompt=None,
        messages=(ChatTurn("system", "x"), ChatTurn("user", "<diff>\n+cache.set(k, v)\n</diff>")),
        max_tokens=max_tokens,
        json_schema=til_schema("2024-05-01"),
        deadline=deadline,
        **fields,  # type: ignore[arg-type]
    )


async def test_writes_a_valid_til_that_echoes_the_end_of_the_prompt() -> None:
    events = [e async for e in engine().generate(request())]
    assert isinstance(events[0], EngineStarted) and isinstance(events[-1], EngineFinished)
    text = "".join(e.text for e in events if isinstance(e, EngineDelta))
    document = json.loads(text)
    assert check_til(document, date="2024-05-01") == []
    assert "+cache.set(k, v)" in document["content"]
    assert events[-1].finish_reason == "stop" and events[-1].completion_tokens == len(events) - 2


async def test_stops_at_max_tokens_deadlines_and_cancellation() -> None:
    fake = engine(interval_s=0.01)
    events = [e async for e in fake.generate(request(max_tokens=3))]
    assert events[-1] == EngineFinished("length", events[0].prompt_tokens, 3)  # type: ignore[union-attr]

    began = time.monotonic()
    with pytest.raises(TimeoutError):
        async for _ in fake.generate(request(deadline=time.monotonic() + 0.1)):
            pass
    assert 0.09 < time.monotonic() - began < 0.5

    consumer = asyncio.ensure_future(asyncio.wait_for(_drain(fake), 10))
    await asyncio.sleep(0.05)
    assert fake.load().running == 1
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert fake.load().running == 0


async def _drain(fake: FakeEngine) -> None:
    async for _ in fake.generate(request()):
        pass


async def test_a_prompt_that_does_not_fit_is_refused() -> None:
    with pytest.raises(PromptTooLong):
        async for _ in engine().generate(request(max_tokens=2047)):
            pass


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        ("^2024-05-01 TIL - [^a]{0,3}$", "2024-05-01 TIL - "),
        ("^# 2024-05-01 TIL\\n", "# 2024-05-01 TIL\n"),
        ("^ab*c", "a"),
        ("^a+b", "a"),
        ("^\\d+", ""),
        ("no-anchor", ""),
    ],
)
def test_literal_prefix_of_a_pattern(pattern: str, prefix: str) -> None:
    assert _literal_prefix(pattern) == prefix


@pytest.mark.parametrize(
    "schema",
    [
        {},
        {"type": 5},
        {"properties": []},
        {"type": "array", "minItems": 10**9},
        {"type": ["null"]},
        {"$ref": "#"},
    ],
)
def test_any_schema_gives_json(schema: dict[str, object]) -> None:
    json.loads(fake_output(schema, echo="x"))
