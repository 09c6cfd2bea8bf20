"""A deterministic stand-in for a model (GENERATOR_BACKEND=fake), for fault tests of the whole stack.

It writes the smallest document the request's JSON Schema allows: objects with their properties in
order, the fewest array items, an enum's first value, and strings that start with their pattern's
literal prefix and go on in Korean. The first open-ended string (a pattern without `$`, or none) ends
with the last characters of the prompt in a code block, so a test can see what the model was shown.
The text streams in 4-character tokens, one every GENERATOR_FAKE_TOKEN_INTERVAL_S, honours max_tokens,
deadlines and cancellation like the real engines, and counts the requests it is running.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from services.generator.config import GeneratorSettings
from services.generator.engine import (
    ChatTurn,
    EngineDelta,
    EngineEvent,
    EngineFinished,
    EngineLoad,
    EngineRequest,
    EngineStarted,
    InvalidRequest,
    ModelInfo,
    Prepared,
    PromptTooLong,
    TokenCount,
    TokenizeInput,
)
from services.generator.json_grammar import SchemaError, json_schema_to_grammar

CHARS_PER_TOKEN = 4
ECHO_CHARS = 240
DEFAULT_CONTEXT = 8192
_MAX_DEPTH = 8
_MAX_ITEMS = 16
# Characters that end a pattern's literal prefix.
_PATTERN_SYNTAX = set("[](){}.*+?|$^")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


class FakeEngine:
    """`GenerationEngine` that needs no model: schema-shaped output at a fixed pace."""

    def __init__(self, settings: GeneratorSettings) -> None:
        self._interval_s = settings.fake_token_interval_s
        self._running = 0
        self.info = ModelInfo(
            model=settings.model_id,
            backend="fake",
            model_path="",
            max_model_len=settings.max_model_len or DEFAULT_CONTEXT,
            default_max_tokens=settings.default_max_tokens,
            engine_settings={
                "token_interval_s": str(self._interval_s),
                "chars_per_token": str(CHARS_PER_TOKEN),
            },
        )

    async def start(self) -> None:
        return None

    def load(self) -> EngineLoad:
        return EngineLoad(running=self._running, waiting=0)

    async def close(self) -> None:
        return None

    async def tokenize(self, inputs: Sequence[TokenizeInput], *, offsets: bool) -> list[TokenCount]:
        counts = []
        for item in inputs:
            if isinstance(item, str):
                n = -(-len(item) // CHARS_PER_TOKEN)
                ends = tuple(min((i + 1) * CHARS_PER_TOKEN, len(item)) for i in range(n))
                counts.append(TokenCount(n, ends if offsets else None))
            else:
                counts.append(TokenCount(_prompt_tokens(_chat_text(item))))
        return counts

    async def prepare(self, request: EngineRequest) -> EngineRequest:
        prompt = request.prompt if request.prompt is not None else _chat_text(request.messages or ())
        prompt_tokens = _prompt_tokens(prompt)
        if prompt_tokens + request.max_tokens > self.info.max_model_len:
            raise PromptTooLong(
                f"the prompt has {prompt_tokens} tokens and {request.max_tokens} output tokens were asked "
                f"for, but the model's context holds {self.info.max_model_len} tokens"
            )
        if request.json_schema is not None:  # refused as the real engines refuse it
            try:
                await asyncio.to_thread(json_schema_to_grammar, request.json_schema)
            except SchemaError as exc:
                raise InvalidRequest(f"output.json_schema: {exc}") from exc
        # The fake's "tokens" are 4-character chunks; only their number matters.
        return replace(request, prepared=Prepared(prompt_tokens=tuple(range(prompt_tokens))))

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        if request.prepared is None:
            request = await self.prepare(request)
        assert request.prepared is not None
        prompt_tokens = len(request.prepared.prompt_tokens)
        prompt = request.prompt if request.prompt is not None else _chat_text(request.messages or ())
        last = request.messages[-1].content if request.messages else prompt
        text = fake_output(request.json_schema, echo=last[-ECHO_CHARS:])
        self._running += 1
        try:
            yield EngineStarted(prompt_tokens=prompt_tokens)
            sent = 0
            for start in range(0, len(text), CHARS_PER_TOKEN):
                if sent == request.max_tokens:
                    yield EngineFinished("length", prompt_tokens, sent)
                    return
                if request.deadline is not None and time.monotonic() + self._interval_s > request.deadline:
                    await asyncio.sleep(max(request.deadline - time.monotonic(), 0))
                    raise TimeoutError("deadline exceeded during generation")
                await asyncio.sleep(self._interval_s)
                sent += 1
                yield EngineDelta(text=text[start : start + CHARS_PER_TOKEN], token_count=1)
            while request.ignore_eos and sent < request.max_tokens:  # like the real engines: on to max_tokens
                await asyncio.sleep(self._interval_s)
                sent += 1
                yield EngineDelta(text=" " * CHARS_PER_TOKEN, token_count=1)
            if request.ignore_eos:
                yield EngineFinished("length", prompt_tokens, sent)
                return
            yield EngineFinished("stop", prompt_tokens, sent)
        finally:
            self._running -= 1


def _chat_text(turns: Sequence[ChatTurn]) -> str:
    return "\n".join(t.content for t in turns)


def _prompt_tokens(prompt: str) -> int:
    return max(1, -(-len(prompt) // CHARS_PER_TOKEN))


def fake_output(schema: dict[str, Any] | None, *, echo: str) -> str:
    """The text the fake model writes: JSON for a schema, else a Korean sentence and the echo."""
    if schema is None:
        return f"변경 내용을 요약한다.\n\n```text\n{echo}\n```\n"
    writer = _Writer(echo)
    return json.dumps(writer.value(schema, 0), ensure_ascii=False)


class _Writer:
    def __init__(self, echo: str) -> None:
        self._echo: str | None = echo
        self._strings = 0

    def value(self, schema: Any, depth: int) -> Any:
        if not isinstance(schema, dict) or depth > _MAX_DEPTH:
            return self.string({})
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[0]
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind == "object" or (kind is None and isinstance(schema.get("properties"), dict)):
            properties = schema.get("properties")
            if not isinstance(properties, dict):
                return {}
            return {str(name): self.value(sub, depth + 1) for name, sub in properties.items()}
        if kind == "array":
            low = schema.get("minItems")
            count = min(low, _MAX_ITEMS) if isinstance(low, int) and low > 0 else 1
            return [self.value(schema.get("items"), depth + 1) for _ in range(count)]
        if kind in ("integer", "number"):
            low = schema.get("minimum")
            return low if isinstance(low, (int, float)) and not isinstance(low, bool) else 0
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        return self.string(schema)

    def string(self, schema: dict[str, Any]) -> str:
        self._strings += 1
        pattern = schema.get("pattern")
        pattern = pattern if isinstance(pattern, str) else ""
        text = _literal_prefix(pattern) + f"항목 {self._strings}"
        if self._echo is not None and not pattern.endswith("$"):
            text += f"\n\n- 변경 내용을 요약한다.\n\n```text\n{self._echo}\n```\n"
            self._echo = None
        limit = schema.get("maxLength")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
            text = text[:limit]
        return text


def _literal_prefix(pattern: str) -> str:
    """The text every match of `^...` must start with: "^# 2024 TIL\\n" -> "# 2024 TIL\n"."""
    if not pattern.startswith("^"):
        return ""
    out: list[str] = []
    i = 1
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            escaped = pattern[i + 1]
            if escaped.isalnum() and escaped not in _ESCAPES:
                break  # \d, \w, \s, \b ...: a class, not a literal
            out.append(_ESCAPES.get(escaped, escaped))
            i += 2
            continue
        if char in _PATTERN_SYNTAX:
            # A quantifier makes the character before it optional or repeated: not part of the prefix.
            if char in "*?{" and out:
                out.pop()
            break
        out.append(char)
        i += 1
    return "".join(out)
