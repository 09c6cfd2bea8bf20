"""The seam between the generator servicer and a model engine (llama.cpp on CPU, vLLM on GPU).

An engine turns an `EngineRequest` into a stream of `EngineEvent`s: one `EngineStarted` (once the
prompt is tokenized), `EngineDelta`s with new text, and one `EngineFinished`. Cancelling the
consuming task (the gRPC call ending) must stop the generation and free the engine at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class Sampling:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    # Exactly one of prompt and messages is set.
    prompt: str | None
    messages: tuple[ChatTurn, ...] | None
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # A parsed JSON Schema the output must follow, or None.
    json_schema: dict[str, Any] | None = None
    # Monotonic time (time.monotonic()) after which the engine must stop; None for no deadline.
    deadline: float | None = None


@dataclass(frozen=True)
class EngineStarted:
    prompt_tokens: int
    # Seconds the request waited before the engine started on it.
    queue_s: float = 0.0


@dataclass(frozen=True)
class EngineDelta:
    text: str
    token_count: int


@dataclass(frozen=True)
class EngineFinished:
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0


EngineEvent = EngineStarted | EngineDelta | EngineFinished


# What `tokenize` counts: a plain text, or chat turns rendered as `generate` renders them.
TokenizeInput = str | tuple[ChatTurn, ...]


@dataclass(frozen=True)
class TokenCount:
    count: int
    # For each token, the end of its text in the input in code points (str indices); None unless
    # offsets were asked for and the input is a text.
    offsets: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ModelInfo:
    model: str
    backend: str
    model_path: str
    max_model_len: int
    default_max_tokens: int
    engine_settings: dict[str, str]


@dataclass(frozen=True)
class EngineLoad:
    """What the engine is doing now, for metrics and admission."""

    running: int
    waiting: int


class PromptTooLong(ValueError):
    """The prompt plus the requested output does not fit in the model's context."""


@runtime_checkable
class GenerationEngine(Protocol):
    info: ModelInfo

    async def start(self) -> None:
        """Loads the model and warms it up; the service turns SERVING after this returns."""

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        """Streams events for one request. Raises PromptTooLong before any event if it cannot fit."""

    async def tokenize(self, inputs: Sequence[TokenizeInput], *, offsets: bool) -> list[TokenCount]:
        """Counts tokens with the model's own tokenizer, one result per input, in order.

        A text is tokenized as plain text: no beginning-of-sequence token, and markers of special
        tokens count as text. A chat is rendered exactly as `generate` renders it (the chat format,
        generation prompt included) and counted with the special tokens the template writes.
        With `offsets`, each text's result carries the end offset of every token in code points
        (Python str indices; a token that ends inside a character counts up to that character's
        start). Never waits for a generation slot; CPU work runs off the event loop.
        """

    def load(self) -> EngineLoad:
        """Requests running and waiting inside the engine."""

    async def close(self) -> None:
        """Stops the engine and frees its memory."""
