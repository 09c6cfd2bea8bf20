"""The seam between the generator servicer and a model engine (llama.cpp on CPU, vLLM on GPU).

An engine turns an `EngineRequest` into a stream of `EngineEvent`s: one `EngineStarted` (once the
prompt is tokenized), `EngineDelta`s with new text, and one `EngineFinished`. Cancelling the
consuming task (the gRPC call ending) must stop the generation and free the engine at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
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

    def load(self) -> EngineLoad:
        """Requests running and waiting inside the engine."""

    async def close(self) -> None:
        """Stops the engine and frees its memory."""
