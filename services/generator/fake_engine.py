"""A deterministic stand-in for a model (GENERATOR_BACKEND=fake), for fault tests of the whole stack.

It drafts the smallest document the request's JSON Schema suggests (objects with their properties in
order, the fewest array items, an enum's first value, strings that start with their pattern's literal
prefix and go on in Korean; the first open-ended string, or one that asks for code fences, gets a bullet,
the diff lines at the end of the prompt in a code block and the prompt's last characters in a paragraph,
so a test can see what the model was shown), then walks the draft through the same grammar the real
engines use (llguidance, one byte at a time): what the grammar refuses is left out and what it still
needs is filled in, so the document always follows the schema. The text streams in 4-character tokens,
one every GENERATOR_FAKE_TOKEN_INTERVAL_S, honours max_tokens, deadlines and cancellation like the real
engines, and counts the requests it is running.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper

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
from services.generator.json_grammar import SchemaError, json_schema_to_grammar, schema_key

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
    draft = json.dumps(_Writer(echo).value(schema, 0), ensure_ascii=False)
    try:
        matcher = _byte_matcher(schema)
    except SchemaError:
        return draft
    return _follow(matcher, draft)


# The draft is written one JSON unit at a time (an escape sequence is one); a unit the grammar refuses is
# left out, and once the draft runs out these complete the document, the first the grammar allows.
_UNITS = re.compile(r"\\u[0-9a-fA-F]{4}|\\.|.", re.DOTALL)
_FILLERS = ['"', "}", "]", "\\n", "\n", ".", "가", " ", "a", "`", "-", "#", ",", ":", "0", "[", "{", "t", "e"]
_FILLERS += [chr(c) for c in range(0x21, 0x7F) if chr(c) not in _FILLERS]
_MAX_BYTES = 20_000


def _follow(matcher: LLMatcher, draft: str) -> str:
    """The draft, bent to the grammar: a document it accepts (or, past _MAX_BYTES, the draft)."""
    out: list[str] = []
    size = 0
    units = iter(_UNITS.findall(draft))
    while not matcher.is_stopped() and size < _MAX_BYTES:
        unit = next(units, None)
        if unit is None:
            if matcher.is_accepting():
                break
            unit = next((f for f in _FILLERS if _take(matcher, f)), None)
            if unit is None:
                return draft
        elif not _take(matcher, unit):
            if out and out[-1] == "\\n":  # a line the grammar refuses from its start goes whole
                while unit not in (None, "\\n"):
                    unit = next(units, None)
            continue
        out.append(unit)
        size += len(unit.encode())
    return "".join(out) if matcher.is_accepting() else draft


def _take(matcher: LLMatcher, unit: str) -> bool:
    data = list(unit.encode())
    taken = matcher.try_consume_tokens(data)
    if taken < len(data):
        matcher.rollback(taken)
        return False
    return True


class _Bytes:
    """A vocabulary of the 256 bytes and an end token, for walking a grammar one byte at a time."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([b]) for b in range(256)] + [b"<eos>"]

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


_BYTE_TOKENIZER = LLTokenizer(TokenizerWrapper(_Bytes()))


@functools.lru_cache(maxsize=64)
def _compiled(key: str, schema_json: str) -> LLMatcher | SchemaError:
    grammar = json_schema_to_grammar(json.loads(schema_json), validate=False)
    matcher = LLMatcher(_BYTE_TOKENIZER, grammar, log_level=0)
    return SchemaError(matcher.get_error()) if matcher.is_error() else matcher


def _byte_matcher(schema: dict[str, Any]) -> LLMatcher:
    compiled = _compiled(schema_key(schema), json.dumps(schema, ensure_ascii=False))
    if isinstance(compiled, SchemaError):
        raise compiled
    return compiled.deep_copy()


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
        branches = schema.get("anyOf")
        if isinstance(branches, list) and branches and isinstance(branches[0], dict):  # the first branch
            merged = {k: v for k, v in schema.items() if k != "anyOf"}
            return self.value({**merged, **branches[0]}, depth + 1)
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
            prefix = schema.get("prefixItems")
            prefix = prefix if isinstance(prefix, list) else []
            return [
                self.value(prefix[i] if i < len(prefix) else schema.get("items"), depth + 1)
                for i in range(count)
            ]
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
        prefix = _literal_prefix(pattern)
        text = prefix + _NAMES[(self._strings - 1) % len(_NAMES)]
        if self._echo is not None and (not pattern.endswith("$") or "```" in pattern):
            # A bullet, code lines of the diff in the prompt (markers dropped), and the echo in a paragraph.
            code = "\n".join(
                line[1:]
                for line in self._echo.splitlines()
                if line[:1] in "+- " and line[1:].strip() and line[:3] not in ("+++", "---")
            )
            fence = re.search(r"```([A-Za-z0-9+#._-]+)\\n", pattern)
            flat = " ".join(self._echo.split())
            body = (
                f"변경 내용을 요약한다.\n\n```{fence.group(1) if fence else 'text'}\n{code or self._echo}\n```\n\n"
                f"프롬프트의 끝: {flat}"
            )
            text = prefix + (body if prefix.endswith("- ") else f"\n\n- {body}")
            self._echo = None
        limit = schema.get("maxLength")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
            text = text[:limit]
        return text


_NAMES = [
    "캐시 정리하기",
    "캐시",
    "설정값 변경",
    "변경 사항들",
]  # words of different lengths: titles allow no other


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
