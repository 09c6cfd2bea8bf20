"""The seam between the generator servicer and a model engine (llama.cpp on CPU, vLLM on GPU).

A request goes through two steps. `prepare` does every check that needs the model (chat rendering,
tokenization, the prompt's fit in the context, compiling the JSON schema) before the request takes
or waits for a slot, so a bad request is refused at once even while the engine is busy. `generate`
then turns the prepared `EngineRequest` into a stream of `EngineEvent`s: one `EngineStarted`,
`EngineDelta`s with new text, and one `EngineFinished`. Cancelling the consuming task (the gRPC call
ending) must stop the generation and free the engine at once.

Engines know nothing of gRPC: they raise the `EngineError` subclasses below (and `TimeoutError` at
a deadline), and the servicer maps them to statuses in one place (`servicer.status_error`).
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
    # Set by the engine's own `prepare`, for its `generate`; None until then.
    prepared: Prepared | None = None


@dataclass(frozen=True)
class Prepared:
    """What `prepare` computed, so that `generate` does not do it again."""

    # The prompt's token ids, as the engine will evaluate them.
    prompt_tokens: tuple[int, ...]
    # The engine's compiled form of `json_schema` (a grammar, a matcher...), or None.
    constraint: Any = None
    # Where prepare's time went, as (what, milliseconds), for the generator's log; empty if not known.
    breakdown: tuple[tuple[str, float], ...] = ()


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


class EngineError(Exception):
    """A request an engine refused or could not serve; the message is shown to the caller."""


class InvalidRequest(EngineError):
    """The request cannot be served as sent: a chat the template refuses, a schema beyond the
    limits, an empty prompt (INVALID_ARGUMENT)."""


class PromptTooLong(InvalidRequest):
    """The prompt plus the requested output does not fit in the model's context (INVALID_ARGUMENT)."""


class EngineOverloaded(EngineError):
    """No room for the request now; the caller may retry after `retry_after_s` (RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineUnavailable(EngineError):
    """The engine is not running: not started, shutting down, or dead (UNAVAILABLE)."""


@runtime_checkable
class GenerationEngine(Protocol):
    info: ModelInfo

    async def start(self) -> None:
        """Loads the model and warms it up; the service turns SERVING after this returns."""

    async def prepare(self, request: EngineRequest) -> EngineRequest:
        """Every check that needs the model, before the request waits for a slot.

        Renders the chat, tokenizes the prompt, raises PromptTooLong when it does not fit with
        `max_tokens`, and compiles `json_schema` (InvalidRequest naming the limit it breaks).
        Runs its CPU work off the event loop, bounded in time, and never waits behind a running
        generation. Returns the request with `prepared` set.
        """

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        """Streams events for one request, prepared or not (then it prepares it first)."""

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
