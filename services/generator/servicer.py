"""til.v1.GeneratorService over any `GenerationEngine`: validation, admission, deadlines, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import Counter, Gauge, Histogram
from til.v1 import common_pb2, generator_pb2, generator_pb2_grpc

from services.common import sent_at
from services.common.admission import Admission
from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from services.common.server import Service
from services.common.streams import closing
from services.generator.engine import (
    ChatTurn,
    EngineDelta,
    EngineError,
    EngineEvent,
    EngineFinished,
    EngineOverloaded,
    EngineRequest,
    EngineStarted,
    EngineUnavailable,
    GenerationEngine,
    InvalidRequest,
    PromptTooLong,
    Sampling,
    TokenizeInput,
)
from services.generator.json_grammar import SchemaError, parse_schema

log = logging.getLogger(__name__)

SERVICE_NAME = generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"].full_name

RUNNING = Gauge("tilserve_generator_requests_running", "Requests the engine is generating for now.")
WAITING = Gauge(
    "tilserve_generator_requests_waiting", "Requests admitted or queued in the engine, not yet generating."
)
TIME_TO_FIRST_TOKEN = Histogram(
    "tilserve_generator_time_to_first_token_seconds", "From a call's arrival until its first text was sent.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)  # fmt: skip
PREPARE = Histogram(
    "tilserve_generator_prepare_seconds",
    "From a call's arrival until the engine's checks (tokenizing, the schema) were done, before admission.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
INTER_TOKEN_LATENCY = Histogram(
    "tilserve_generator_inter_token_latency_seconds",
    "Time between tokens of one stream: the gap between two text messages over the later one's tokens "
    "(several with GENERATOR_STREAM_INTERVAL, or when the engine merged steps).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28),
)  # fmt: skip
PROMPT_TOKENS = Counter("tilserve_generator_prompt_tokens", "Prompt tokens of requests the engine started.")
OUTPUT_TOKENS = Counter("tilserve_generator_output_tokens", "Generated tokens sent to callers.")
FINISHED = Counter("tilserve_generator_requests_finished", "Streams that ended normally.", ["finish_reason"])
ABORTED = Counter(
    "tilserve_generator_requests_aborted", "Streams stopped early: the caller left, or the deadline passed.",
    ["reason"],
)  # fmt: skip

_ROLES = ("system", "user", "assistant")
_FINISH_REASONS = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}


@dataclass(frozen=True)
class GenerationLimits:
    """What one request may ask for."""

    default_max_tokens: int
    # None: as many as the model's context leaves after the prompt (the engine checks).
    max_tokens_limit: int | None = None
    max_stop_strings: int = 16
    max_request_id_chars: int = 128
    # Tokenize: inputs per call, and code points over all of them (texts and chat contents).
    max_tokenize_inputs: int = 64
    max_tokenize_chars: int = 2_000_000
    # Chat turns in one Generate or one Tokenize input.
    max_chat_messages: int = 64


class GeneratorServicer(generator_pb2_grpc.GeneratorServiceServicer):
    """Streams a generation: `started`, then `delta`s, then `finished`; errors are statuses."""

    def __init__(self, engine: GenerationEngine, limits: GenerationLimits, admission: Admission) -> None:
        self._engine = engine
        self._limits = limits
        self._admission = admission
        # Read at scrape time, so the gauges are never stale.
        RUNNING.set_function(lambda: engine.load().running)
        WAITING.set_function(lambda: engine.load().waiting + admission.waiting)

    def service(self) -> Service:
        """This servicer as a `Service` to mount with `serve()` or `start_server()`."""
        return Service(
            SERVICE_NAME,
            lambda server: generator_pb2_grpc.add_GeneratorServiceServicer_to_server(self, server),
        )

    async def Generate(
        self, request: generator_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generator_pb2.GenerateResponse]:
        times = _StreamTimes(
            arrived=time.monotonic(), sent_delay_s=sent_at.delay_s(context.invocation_metadata())
        )
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the call's deadline passed before generation started")
        deadline = times.arrived + remaining if remaining is not None else None
        engine_request = self._engine_request(request, deadline)
        request_id = engine_request.request_id
        # Every check that needs the model runs before the request waits for a slot.
        try:
            engine_request = await self._engine.prepare(engine_request)
        except EngineError as exc:
            raise status_error(exc) from exc
        times.prepared = time.monotonic()
        PREPARE.observe(times.prepared - times.arrived)

        assert engine_request.prepared is not None  # prepare's contract
        async with self._admission.slot():
            times.admitted = time.monotonic()
            try:
                async with closing(self._engine.generate(engine_request)) as events:
                    # Everything `started` holds is known once the request is prepared. The engine takes
                    # the request first (its first step runs in a task); `started` is written while it
                    # works on the prompt, not as a second message in front of the first text.
                    first = asyncio.ensure_future(anext(events, None))
                    try:
                        yield generator_pb2.GenerateResponse(
                            started=generator_pb2.GenerateStarted(
                                request_id=request_id,
                                model=self._engine.info.model,
                                prompt_tokens=len(engine_request.prepared.prompt_tokens),
                            )
                        )
                        first_event = await first
                    finally:
                        if not first.done():  # the caller left while `started` was being written
                            first.cancel()
                        # Always read its outcome (an error left unread is logged as never retrieved);
                        # on this way out it is no longer the call's. The step is over before `events`
                        # is closed.
                        with contextlib.suppress(Exception, asyncio.CancelledError):
                            await first
                    async for event in _then(first_event, events):
                        if isinstance(event, EngineDelta):
                            times.text_sent(event.token_count)
                            OUTPUT_TOKENS.inc(event.token_count)
                            yield generator_pb2.GenerateResponse(
                                delta=common_pb2.TextDelta(text=event.text, token_count=event.token_count)
                            )
                        elif isinstance(event, EngineStarted):
                            times.started(event.queue_s)
                            PROMPT_TOKENS.inc(event.prompt_tokens)
                        elif isinstance(event, EngineFinished):
                            FINISHED.labels(event.finish_reason).inc()
                            timings = times.timings()
                            log.info(
                                "request %s finished (%s): %d prompt tokens (%d cached), %d generated; "
                                "prepare %.1f ms%s, admitted %.1f ms, queue %.1f ms, first output %.1f ms, "
                                "first text %.1f ms, total %.0f ms%s",
                                request_id, event.finish_reason, event.prompt_tokens, event.cached_prompt_tokens,
                                event.completion_tokens, (times.prepared - times.arrived) * 1000,
                                _breakdown(engine_request), (times.admitted - times.arrived) * 1000, timings.queue_ms,
                                (times.first_output_at - times.arrived) * 1000,
                                timings.time_to_first_token_ms, timings.total_ms, times.sent_note(),
                            )  # fmt: skip
                            yield generator_pb2.GenerateResponse(finished=_finished(event, timings))
                            return
            except EngineError as exc:
                raise status_error(exc) from exc
            except TimeoutError as exc:
                ABORTED.labels("deadline").inc()
                log.info("request %s stopped at its deadline", request_id)
                raise DeadlineExceeded(str(exc) or "deadline exceeded during generation") from exc
            except (asyncio.CancelledError, GeneratorExit):
                expired = deadline is not None and time.monotonic() >= deadline
                ABORTED.labels("deadline" if expired else "cancelled").inc()
                log.info(
                    "request %s stopped: %s",
                    request_id,
                    "its deadline passed" if expired else "the caller left",
                )
                raise
        raise RuntimeError(f"the engine ended request {request_id} without a finish event")

    async def GetModelInfo(
        self, request: generator_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> generator_pb2.GetModelInfoResponse:
        info = self._engine.info
        settings = dict(info.engine_settings)
        if self._limits.max_tokens_limit is not None:
            settings["max_tokens_limit"] = str(self._limits.max_tokens_limit)
        return generator_pb2.GetModelInfoResponse(
            model=info.model,
            backend=info.backend,
            model_path=info.model_path,
            max_model_len=info.max_model_len,
            default_max_tokens=self._limits.default_max_tokens,
            engine_settings=settings,
        )

    async def Tokenize(
        self, request: generator_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> generator_pb2.TokenizeResponse:
        limits = self._limits
        if not request.inputs:
            raise InvalidArgument("inputs is empty: send at least one text or chat to count")
        if len(request.inputs) > limits.max_tokenize_inputs:
            raise InvalidArgument(
                f"inputs has {len(request.inputs)} entries; at most {limits.max_tokenize_inputs} per call"
            )
        inputs: list[TokenizeInput] = []
        total = 0
        for i, item in enumerate(request.inputs):
            source = item.WhichOneof("input")
            if source == "text":
                inputs.append(item.text)
                total += len(item.text)
            elif source == "chat":
                turns = self._chat_turns(item.chat, f"inputs[{i}].chat")
                inputs.append(turns)
                total += sum(len(t.content) for t in turns)
            else:
                raise InvalidArgument(f"inputs[{i}] sets neither text nor chat")
            if total > limits.max_tokenize_chars:
                raise InvalidArgument(
                    f"inputs hold more than {limits.max_tokenize_chars} characters in all; split the call"
                )
        try:
            counts = await self._engine.tokenize(inputs, offsets=request.return_offsets)
        except EngineError as exc:
            raise status_error(exc) from exc
        return generator_pb2.TokenizeResponse(
            results=[
                generator_pb2.TokenizeResult(token_count=c.count, offsets=c.offsets or ()) for c in counts
            ],
            max_model_len=self._engine.info.max_model_len,
        )

    def _chat_turns(self, chat: generator_pb2.ChatMessages, name: str) -> tuple[ChatTurn, ...]:
        """The validated turns of a chat; InvalidArgument names the field (`name`) to fix."""
        if not chat.messages:
            raise InvalidArgument(f"{name} has no messages: send at least one user message")
        if len(chat.messages) > self._limits.max_chat_messages:
            raise InvalidArgument(
                f"{name} has {len(chat.messages)} messages; at most {self._limits.max_chat_messages}"
            )
        for i, message in enumerate(chat.messages):
            if message.role not in _ROLES:
                raise InvalidArgument(
                    f"{name}.messages[{i}].role is {message.role!r}: use one of {', '.join(_ROLES)}"
                )
        return tuple(ChatTurn(role=m.role, content=m.content) for m in chat.messages)

    def _engine_request(
        self, request: generator_pb2.GenerateRequest, deadline: float | None
    ) -> EngineRequest:
        """The validated request; InvalidArgument says what to fix."""
        limits = self._limits
        request_id = request.request_id or uuid.uuid4().hex
        if len(request_id) > limits.max_request_id_chars:
            raise InvalidArgument(f"request_id is longer than {limits.max_request_id_chars} characters")

        prompt: str | None = None
        messages: tuple[ChatTurn, ...] | None = None
        source = request.WhichOneof("input")
        if source == "prompt":
            if not request.prompt:
                raise InvalidArgument("prompt is empty: send the text to continue, or use chat")
            prompt = request.prompt
        elif source == "chat":
            messages = self._chat_turns(request.chat, "chat")
        else:
            raise InvalidArgument("set either prompt or chat")

        stopping = request.stopping
        max_tokens = limits.default_max_tokens
        if stopping.HasField("max_tokens"):
            max_tokens = stopping.max_tokens
            if max_tokens < 1:
                raise InvalidArgument(
                    f"stopping.max_tokens must be at least 1 (leave it unset for {limits.default_max_tokens})"
                )
            if limits.max_tokens_limit is not None and max_tokens > limits.max_tokens_limit:
                raise InvalidArgument(
                    f"stopping.max_tokens is {max_tokens}; this server allows at most {limits.max_tokens_limit}"
                )
            context = self._engine.info.max_model_len
            if max_tokens >= context:
                raise InvalidArgument(
                    f"stopping.max_tokens is {max_tokens}; the model's context holds {context} tokens, "
                    "prompt included"
                )
        if len(stopping.stop) > limits.max_stop_strings:
            raise InvalidArgument(
                f"stopping.stop has {len(stopping.stop)} strings; at most {limits.max_stop_strings}"
            )
        if any(not s for s in stopping.stop):
            raise InvalidArgument("stopping.stop contains an empty string")

        return EngineRequest(
            request_id=request_id,
            prompt=prompt,
            messages=messages,
            max_tokens=max_tokens,
            sampling=_sampling(request.sampling),
            stop=tuple(stopping.stop),
            ignore_eos=stopping.ignore_eos,
            json_schema=_json_schema(request.output.json_schema),
            deadline=deadline,
        )


def status_error(exc: EngineError) -> ServiceError:
    """The one place an engine's error becomes a gRPC status."""
    if isinstance(exc, PromptTooLong):
        return InvalidArgument(f"{exc}; shorten the prompt or lower stopping.max_tokens")
    if isinstance(exc, InvalidRequest):
        return InvalidArgument(str(exc))
    if isinstance(exc, EngineOverloaded):
        return ResourceExhausted(str(exc), retry_after_s=exc.retry_after_s)
    if isinstance(exc, EngineUnavailable):
        return Unavailable(str(exc))
    return Unavailable(f"the engine failed the request: {exc}")


@dataclass
class _StreamTimes:
    """Wall-clock marks of one stream, for its `Timings` and the latency histograms."""

    arrived: float
    # From the caller's stamp (services.common.sent_at) to this handler's start, when the caller stamped.
    sent_delay_s: float | None = None
    prepared: float = 0.0
    admitted: float = 0.0
    queue_s: float = 0.0
    # When the engine's first output (the prompt done, a first token made) reached this process.
    first_output_at: float = 0.0
    first_text_at: float | None = None
    last_text_at: float = 0.0

    def started(self, engine_queue_s: float) -> None:
        self.first_output_at = time.monotonic()
        self.queue_s = (self.admitted - self.arrived) + engine_queue_s

    def sent_note(self) -> str:
        if self.sent_delay_s is None:
            return ""
        return f"; reached this handler {self.sent_delay_s * 1000:.1f} ms after the caller sent it"

    def text_sent(self, tokens: int) -> None:
        now = time.monotonic()
        if self.first_text_at is None:
            self.first_text_at = now
            TIME_TO_FIRST_TOKEN.observe(now - self.arrived)
        else:
            INTER_TOKEN_LATENCY.observe((now - self.last_text_at) / max(tokens, 1))
        self.last_text_at = now

    def timings(self) -> common_pb2.Timings:
        first_text_s = self.first_text_at - self.arrived if self.first_text_at is not None else 0.0
        return common_pb2.Timings(
            queue_ms=self.queue_s * 1000,
            time_to_first_token_ms=first_text_s * 1000,
            total_ms=(time.monotonic() - self.arrived) * 1000,
        )


def _finished(event: EngineFinished, timings: common_pb2.Timings) -> generator_pb2.GenerateFinished:
    return generator_pb2.GenerateFinished(
        finish_reason=_FINISH_REASONS[event.finish_reason],
        usage=common_pb2.TokenUsage(
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            cached_prompt_tokens=event.cached_prompt_tokens,
        ),
        timings=timings,
    )


def _sampling(params: common_pb2.SamplingParams) -> Sampling:
    def field(name: str) -> Any:
        return getattr(params, name) if params.HasField(name) else None

    temperature, top_p, top_k = field("temperature"), field("top_p"), field("top_k")
    repetition_penalty, seed = field("repetition_penalty"), field("seed")
    frequency_penalty, presence_penalty = field("frequency_penalty"), field("presence_penalty")
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise InvalidArgument(f"sampling.temperature is {temperature}: it must be >= 0 (0 is greedy)")
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidArgument(f"sampling.top_p is {top_p}: it must be in (0, 1]")
    if top_k is not None and top_k < -1:
        raise InvalidArgument(f"sampling.top_k is {top_k}: it must be >= 1, or 0 or -1 to turn it off")
    if repetition_penalty is not None and not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise InvalidArgument(
            f"sampling.repetition_penalty is {repetition_penalty}: it must be > 0 (1 is off)"
        )
    for name, value in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
        if value is not None and not (math.isfinite(value) and -2 <= value <= 2):
            raise InvalidArgument(f"sampling.{name} is {value}: it must be in [-2, 2] (0 is off)")
    return Sampling(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
    )


def _json_schema(text: str) -> dict[str, Any] | None:
    """The parsed schema, within `json_grammar.LIMITS` (size, depth, counts); compiling it is the
    engine's `prepare`."""
    if not text:
        return None
    try:
        return parse_schema(text)
    except SchemaError as exc:
        raise InvalidArgument(f"output.json_schema: {exc}") from exc


def _breakdown(request: EngineRequest) -> str:
    """Where prepare's time went, if the engine says: " (ids queued 0.1, encoded (batch of 1) 0.6, ...)"."""
    if request.prepared is None or not request.prepared.breakdown:
        return ""
    return " (" + ", ".join(f"{what} {ms:.1f}" for what, ms in request.prepared.breakdown) + ")"


async def _then(first: EngineEvent | None, rest: AsyncIterator[EngineEvent]) -> AsyncIterator[EngineEvent]:
    """`first` (None: the stream had ended), then the rest of the stream."""
    if first is None:
        return
    yield first
    async for event in rest:
        yield event
