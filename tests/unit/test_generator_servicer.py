"""GeneratorService plumbing against a scripted engine: stream shape, validation, admission,
cancellation, deadlines, model info and metrics. Real stubs, in-process server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import types
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

import grpc
import pytest
from prometheus_client import REGISTRY
from til.v1 import common_pb2, generator_pb2, generator_pb2_grpc

from services.common import sent_at
from services.common.admission import Admission
from services.generator.engine import (
    ChatTurn,
    EngineDelta,
    EngineError,
    EngineEvent,
    EngineFinished,
    EngineLoad,
    EngineOverloaded,
    EngineRequest,
    EngineStarted,
    EngineUnavailable,
    GenerationEngine,
    InvalidRequest,
    ModelInfo,
    Prepared,
    PromptTooLong,
    Sampling,
    TokenCount,
    TokenizeInput,
)
from services.generator.servicer import GenerationLimits, GeneratorServicer
from tests.conftest import in_process_server

LIMITS = GenerationLimits(default_max_tokens=16, max_tokens_limit=64)


class ScriptedEngine:
    """Plays `deltas`, then finishes; with `hold`, waits after the deltas until its stream is closed.

    Records each request, how many streams are open, and when a stream was closed.
    """

    def __init__(
        self,
        deltas: Sequence[str] = ("Hello", ", ", "세계"),
        *,
        hold: bool = False,
        fail_before_start: Exception | None = None,
        fail_after_start: Exception | None = None,
        fail_prepare: Exception | None = None,
    ) -> None:
        self.info = ModelInfo(
            model="scripted-1",
            backend="scripted",
            model_path="/models/scripted.gguf",
            max_model_len=4096,
            default_max_tokens=99,
            engine_settings={"n_threads": "3"},
        )
        self.deltas = tuple(deltas)
        self.hold = hold
        self.fail_before_start = fail_before_start
        self.fail_after_start = fail_after_start
        self.fail_prepare = fail_prepare
        self.prepared: list[EngineRequest] = []
        self.requests: list[EngineRequest] = []
        self.tokenized: list[tuple[list[TokenizeInput], bool]] = []
        self.open_streams = 0
        self.holding = asyncio.Event()
        self.closed = asyncio.Event()
        # When set, generate() waits for it before the engine's first output (the prompt being worked on).
        self.first_output: asyncio.Event | None = None

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def load(self) -> EngineLoad:
        return EngineLoad(running=self.open_streams, waiting=0)

    async def tokenize(self, inputs: Sequence[TokenizeInput], *, offsets: bool) -> list[TokenCount]:
        """One token per word of a text, 10 per chat turn; offsets at the end of each word."""
        self.tokenized.append((list(inputs), offsets))
        counts = []
        for item in inputs:
            if isinstance(item, str):
                ends = tuple(m.end() for m in re.finditer(r"\S+", item))
                counts.append(TokenCount(len(ends), ends if offsets else None))
            else:
                counts.append(TokenCount(10 * len(item)))
        return counts

    async def prepare(self, request: EngineRequest) -> EngineRequest:
        self.prepared.append(request)
        if self.fail_prepare is not None:
            raise self.fail_prepare
        return replace(request, prepared=Prepared(prompt_tokens=tuple(range(7))))

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        self.requests.append(request)
        if self.fail_before_start is not None:
            raise self.fail_before_start
        self.open_streams += 1
        try:
            prompt_tokens = 7
            if self.first_output is not None:
                await self.first_output.wait()
            yield EngineStarted(prompt_tokens=prompt_tokens, queue_s=0.004)
            if self.fail_after_start is not None:
                raise self.fail_after_start
            for text in self.deltas:
                yield EngineDelta(text=text, token_count=2)
            if self.hold:
                self.holding.set()
                await asyncio.Event().wait()  # until the stream is closed
            yield EngineFinished(
                finish_reason="length",
                prompt_tokens=prompt_tokens,
                completion_tokens=2 * len(self.deltas),
                cached_prompt_tokens=3,
            )
        finally:
            self.open_streams -= 1
            self.closed.set()


@contextlib.asynccontextmanager
async def generator(
    engine: ScriptedEngine, *, limits: GenerationLimits = LIMITS, admission: Admission | None = None
) -> AsyncIterator[generator_pb2_grpc.GeneratorServiceStub]:
    admission = admission or Admission("generator-test", max_active=4, max_waiting=4)
    servicer = GeneratorServicer(engine, limits, admission)
    async with in_process_server([servicer.service()]) as (_, channel):
        yield generator_pb2_grpc.GeneratorServiceStub(channel)


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def chat(*turns: tuple[str, str]) -> generator_pb2.ChatMessages:
    return generator_pb2.ChatMessages(
        messages=[generator_pb2.ChatMessage(role=r, content=c) for r, c in turns]
    )


def test_scripted_engine_satisfies_the_protocol() -> None:
    assert isinstance(ScriptedEngine(), GenerationEngine)


async def test_stream_is_started_then_deltas_then_finished() -> None:
    engine = ScriptedEngine()
    output_before = metric("tilserve_generator_output_tokens_total")
    prompt_before = metric("tilserve_generator_prompt_tokens_total")
    ttft_before = metric("tilserve_generator_time_to_first_token_seconds_count")
    prepare_before = metric("tilserve_generator_prepare_seconds_count")
    async with generator(engine) as stub:
        responses = [
            r async for r in stub.Generate(generator_pb2.GenerateRequest(request_id="r-1", prompt="Hi"))
        ]

    kinds = [r.WhichOneof("event") for r in responses]
    assert kinds == ["started", "delta", "delta", "delta", "finished"]
    started, finished = responses[0].started, responses[-1].finished
    assert (started.request_id, started.model, started.prompt_tokens) == ("r-1", "scripted-1", 7)
    assert [r.delta.text for r in responses[1:-1]] == ["Hello", ", ", "세계"]
    assert [r.delta.token_count for r in responses[1:-1]] == [2, 2, 2]
    assert finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (finished.usage.prompt_tokens, finished.usage.completion_tokens) == (7, 6)
    assert finished.usage.cached_prompt_tokens == 3
    timings = finished.timings
    assert timings.queue_ms >= 4.0  # the engine's 4 ms in its queue, plus admission
    assert 0 < timings.time_to_first_token_ms <= timings.total_ms

    assert metric("tilserve_generator_output_tokens_total") - output_before == 6
    assert metric("tilserve_generator_prompt_tokens_total") - prompt_before == 7
    assert metric("tilserve_generator_time_to_first_token_seconds_count") - ttft_before == 1
    assert metric("tilserve_generator_prepare_seconds_count") - prepare_before == 1
    assert engine.open_streams == 0


async def test_request_reaches_the_engine_as_sent() -> None:
    engine = ScriptedEngine()
    request = generator_pb2.GenerateRequest(
        request_id="r-2",
        chat=chat(("system", "Be brief."), ("user", "안녕?"), ("assistant", "안녕!"), ("user", "TIL?")),
        sampling=common_pb2.SamplingParams(
            temperature=0.0, top_p=0.5, top_k=20, repetition_penalty=1.1, seed=7
        ),
        stopping=common_pb2.StoppingCriteria(max_tokens=40, stop=["\n\n", "END"], ignore_eos=True),
        output=generator_pb2.OutputFormat(
            json_schema='{"type": "object", "properties": {"a": {"type": "string"}}}'
        ),
    )
    async with generator(engine) as stub:
        sent_at = time.monotonic()
        _ = [r async for r in stub.Generate(request, timeout=30)]

    (seen,) = engine.requests
    assert seen.request_id == "r-2"
    assert seen.prompt is None
    assert seen.messages == (
        ChatTurn("system", "Be brief."),
        ChatTurn("user", "안녕?"),
        ChatTurn("assistant", "안녕!"),
        ChatTurn("user", "TIL?"),
    )
    assert seen.max_tokens == 40
    assert seen.stop == ("\n\n", "END")
    assert seen.ignore_eos is True
    assert seen.json_schema == {"type": "object", "properties": {"a": {"type": "string"}}}
    sampling = seen.sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == (0.0, 0.5, 20, 7)
    assert sampling.repetition_penalty == pytest.approx(1.1)  # a float32 on the wire
    # gRPC rounds the timeout it sends up, so the server's deadline may be a little later.
    assert seen.deadline is not None and seen.deadline - sent_at == pytest.approx(30, abs=0.2)


async def test_unset_fields_take_the_servers_defaults() -> None:
    engine = ScriptedEngine()
    async with generator(engine) as stub:
        responses = [r async for r in stub.Generate(generator_pb2.GenerateRequest(prompt="Hi"))]

    (seen,) = engine.requests
    assert seen.max_tokens == LIMITS.default_max_tokens
    assert seen.sampling == Sampling()
    assert (seen.stop, seen.ignore_eos, seen.json_schema, seen.deadline) == ((), False, None, None)
    # The server names requests that come without an id.
    assert len(seen.request_id) == 32 and responses[0].started.request_id == seen.request_id


def _with(**fields: object) -> generator_pb2.GenerateRequest:
    request = generator_pb2.GenerateRequest(prompt="Hi")
    for name, value in fields.items():
        if name == "prompt" and value is None:
            request.ClearField("input")
        elif isinstance(value, str):
            setattr(request, name, value)
        else:
            getattr(request, name).CopyFrom(value)
    return request


INVALID = {
    "no input": (_with(prompt=None), "set either prompt or chat"),
    "empty prompt": (_with(prompt=""), "prompt is empty"),
    "empty chat": (_with(chat=generator_pb2.ChatMessages()), "chat has no messages"),
    "unknown role": (_with(chat=chat(("user", "a"), ("tool", "b"))), "chat.messages[1].role is 'tool'"),
    "zero max_tokens": (
        _with(stopping=common_pb2.StoppingCriteria(max_tokens=0)),
        "stopping.max_tokens must be at least 1",
    ),
    "max_tokens over limit": (
        _with(stopping=common_pb2.StoppingCriteria(max_tokens=65)),
        "this server allows at most 64",
    ),
    "empty stop string": (_with(stopping=common_pb2.StoppingCriteria(stop=["a", ""])), "empty string"),
    "too many stop strings": (
        _with(stopping=common_pb2.StoppingCriteria(stop=[str(i) for i in range(17)])),
        "at most 16",
    ),
    "schema not JSON": (
        _with(output=generator_pb2.OutputFormat(json_schema="{type: object")),
        "not valid JSON",
    ),
    "schema not an object": (
        _with(output=generator_pb2.OutputFormat(json_schema='["a"]')),
        "must be a JSON object (a JSON Schema)",
    ),
    "negative temperature": (
        _with(sampling=common_pb2.SamplingParams(temperature=-0.5)),
        "sampling.temperature",
    ),
    "NaN temperature": (
        _with(sampling=common_pb2.SamplingParams(temperature=float("nan"))),
        "sampling.temperature",
    ),
    "zero top_p": (_with(sampling=common_pb2.SamplingParams(top_p=0.0)), "sampling.top_p"),
    "top_p above 1": (_with(sampling=common_pb2.SamplingParams(top_p=1.5)), "sampling.top_p"),
    "top_k below -1": (_with(sampling=common_pb2.SamplingParams(top_k=-2)), "sampling.top_k"),
    "zero repetition_penalty": (
        _with(sampling=common_pb2.SamplingParams(repetition_penalty=0.0)),
        "sampling.repetition_penalty",
    ),
    "long request_id": (_with(request_id="x" * 129), "request_id is longer than 128"),
    "frequency_penalty above 2": (
        _with(sampling=common_pb2.SamplingParams(frequency_penalty=2.5)),
        "sampling.frequency_penalty",
    ),
    "NaN presence_penalty": (
        _with(sampling=common_pb2.SamplingParams(presence_penalty=float("nan"))),
        "sampling.presence_penalty",
    ),
    "too many chat turns": (
        _with(chat=chat(*[("user", "a")] * (LIMITS.max_chat_messages + 1))),
        f"at most {LIMITS.max_chat_messages}",
    ),
}


@pytest.mark.parametrize(("request_", "says"), list(INVALID.values()), ids=list(INVALID))
async def test_invalid_requests_are_refused_before_the_engine(
    request_: generator_pb2.GenerateRequest, says: str
) -> None:
    engine = ScriptedEngine()
    async with generator(engine) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            _ = [r async for r in stub.Generate(request_)]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in (error.value.details() or "")
    assert engine.requests == []


async def test_prompt_too_long_is_invalid_argument_with_the_numbers() -> None:
    too_long = PromptTooLong(
        "the prompt has 4000 tokens and 200 output tokens were asked for, "
        "but the model's context holds 4096 tokens"
    )
    async with generator(ScriptedEngine(fail_before_start=too_long)) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            _ = [r async for r in stub.Generate(generator_pb2.GenerateRequest(prompt="long"))]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.value.details() or ""
    assert "4000 tokens" in details and "4096" in details and "lower stopping.max_tokens" in details


async def test_full_admission_is_resource_exhausted_with_retry_after() -> None:
    engine = ScriptedEngine(hold=True)
    admission = Admission("generator-test", max_active=1, max_waiting=0, retry_after_s=0.25)
    async with generator(engine, admission=admission) as stub:
        first = stub.Generate(generator_pb2.GenerateRequest(prompt="one"))
        await first.read()
        await asyncio.wait_for(engine.holding.wait(), 5)

        second = stub.Generate(generator_pb2.GenerateRequest(prompt="two"))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await second.read()
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("retry-after-ms", "250") in tuple(error.value.trailing_metadata() or ())
        assert len(engine.requests) == 1
        first.cancel()


async def test_running_and_waiting_gauges_follow_engine_and_admission() -> None:
    engine = ScriptedEngine(hold=True)
    admission = Admission("generator-test", max_active=1, max_waiting=2)
    async with generator(engine, admission=admission) as stub:
        first = stub.Generate(generator_pb2.GenerateRequest(prompt="one"))
        await first.read()
        await asyncio.wait_for(engine.holding.wait(), 5)
        second = stub.Generate(generator_pb2.GenerateRequest(prompt="two"))
        for _ in range(200):  # until the second call is parked in admission
            if admission.waiting:
                break
            await asyncio.sleep(0.01)
        assert metric("tilserve_generator_requests_running") == 1
        assert metric("tilserve_generator_requests_waiting") == 1
        first.cancel()
        second.cancel()
        await asyncio.wait_for(engine.closed.wait(), 5)


async def test_cancelled_call_closes_the_engine_stream() -> None:
    engine = ScriptedEngine(hold=True)
    cancelled_before = metric("tilserve_generator_requests_aborted_total", {"reason": "cancelled"})
    async with generator(engine) as stub:
        call = stub.Generate(generator_pb2.GenerateRequest(prompt="long story"))
        assert (await call.read()).WhichOneof("event") == "started"
        await asyncio.wait_for(engine.holding.wait(), 5)
        assert engine.open_streams == 1

        call.cancel()
        await asyncio.wait_for(engine.closed.wait(), 5)
        assert engine.open_streams == 0
    assert (
        metric("tilserve_generator_requests_aborted_total", {"reason": "cancelled"}) - cancelled_before == 1
    )


async def test_deadline_ends_the_call_and_closes_the_engine_stream() -> None:
    engine = ScriptedEngine(hold=True)
    deadline_before = metric("tilserve_generator_requests_aborted_total", {"reason": "deadline"})
    async with generator(engine) as stub:
        sent_at = time.monotonic()
        call = stub.Generate(generator_pb2.GenerateRequest(prompt="long story"), timeout=0.5)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            _ = [r async for r in call]
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(engine.closed.wait(), 2)
        closed_after = time.monotonic() - sent_at

    (seen,) = engine.requests
    assert seen.deadline is not None and seen.deadline - sent_at == pytest.approx(0.5, abs=0.15)
    assert closed_after < 1.5
    assert metric("tilserve_generator_requests_aborted_total", {"reason": "deadline"}) - deadline_before == 1


async def test_engine_timeout_is_deadline_exceeded() -> None:
    engine = ScriptedEngine(fail_after_start=TimeoutError("deadline exceeded during generation"))
    deadline_before = metric("tilserve_generator_requests_aborted_total", {"reason": "deadline"})
    async with generator(engine) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            _ = [r async for r in stub.Generate(generator_pb2.GenerateRequest(prompt="slow"))]
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "during generation" in (error.value.details() or "")
    assert metric("tilserve_generator_requests_aborted_total", {"reason": "deadline"}) - deadline_before == 1


async def test_get_model_info_reports_engine_and_limits() -> None:
    async with generator(ScriptedEngine()) as stub:
        info = await stub.GetModelInfo(generator_pb2.GetModelInfoRequest())
    assert (info.model, info.backend, info.model_path) == ("scripted-1", "scripted", "/models/scripted.gguf")
    assert info.max_model_len == 4096
    assert info.default_max_tokens == LIMITS.default_max_tokens
    assert dict(info.engine_settings) == {"n_threads": "3", "max_tokens_limit": "64"}


async def test_penalties_reach_the_engine() -> None:
    engine = ScriptedEngine()
    sampling = common_pb2.SamplingParams(frequency_penalty=0.5, presence_penalty=-0.25)
    async with generator(engine) as stub:
        _ = [r async for r in stub.Generate(generator_pb2.GenerateRequest(prompt="Hi", sampling=sampling))]
    (seen,) = engine.requests
    assert (seen.sampling.frequency_penalty, seen.sampling.presence_penalty) == (0.5, -0.25)
    assert seen.sampling.repetition_penalty is None


def tokenize_request(
    *inputs: str | generator_pb2.ChatMessages, offsets: bool = False
) -> generator_pb2.TokenizeRequest:
    return generator_pb2.TokenizeRequest(
        inputs=[
            generator_pb2.TokenizeInput(text=i) if isinstance(i, str) else generator_pb2.TokenizeInput(chat=i)
            for i in inputs
        ],
        return_offsets=offsets,
    )


async def test_tokenize_counts_each_input_in_order_with_the_context_size() -> None:
    engine = ScriptedEngine()
    conversation = chat(("system", "s"), ("user", "u"))
    async with generator(engine) as stub:
        response = await stub.Tokenize(tokenize_request("a bb ccc", conversation, "", offsets=True))

    assert [r.token_count for r in response.results] == [3, 20, 0]
    assert list(response.results[0].offsets) == [1, 4, 8]
    assert list(response.results[1].offsets) == []  # offsets only for texts
    assert response.max_model_len == 4096
    ((inputs, offsets),) = engine.tokenized
    assert offsets is True
    assert inputs == ["a bb ccc", (ChatTurn("system", "s"), ChatTurn("user", "u")), ""]


TOKENIZE_INVALID = {
    "no inputs": (generator_pb2.TokenizeRequest(), "inputs is empty"),
    "an input with neither": (
        generator_pb2.TokenizeRequest(inputs=[generator_pb2.TokenizeInput()]),
        "inputs[0] sets neither text nor chat",
    ),
    "too many inputs": (
        tokenize_request(*["a"] * (LIMITS.max_tokenize_inputs + 1)),
        f"at most {LIMITS.max_tokenize_inputs} per call",
    ),
    "too many characters": (
        tokenize_request("a" * (LIMITS.max_tokenize_chars // 2), "b" * (LIMITS.max_tokenize_chars // 2 + 1)),
        f"more than {LIMITS.max_tokenize_chars} characters",
    ),
    "empty chat": (tokenize_request("a", generator_pb2.ChatMessages()), "inputs[1].chat has no messages"),
    "unknown role": (
        tokenize_request(chat(("user", "a"), ("robot", "b"))),
        "inputs[0].chat.messages[1].role is 'robot'",
    ),
}


@pytest.mark.parametrize(("request_", "says"), list(TOKENIZE_INVALID.values()), ids=list(TOKENIZE_INVALID))
async def test_invalid_tokenize_requests_are_refused_before_the_engine(
    request_: generator_pb2.TokenizeRequest, says: str
) -> None:
    engine = ScriptedEngine()
    async with generator(engine) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Tokenize(request_)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in (error.value.details() or "")
    assert engine.tokenized == []


ENGINE_ERRORS = {
    "invalid request": (InvalidRequest("the chat cannot be rendered"), grpc.StatusCode.INVALID_ARGUMENT),
    "overloaded": (
        EngineOverloaded("the KV cache is full", retry_after_s=2.0),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
    "unavailable": (EngineUnavailable("the engine has died"), grpc.StatusCode.UNAVAILABLE),
    "any other engine error": (EngineError("a new kind of failure"), grpc.StatusCode.UNAVAILABLE),
}


@pytest.mark.parametrize(("error", "code"), list(ENGINE_ERRORS.values()), ids=list(ENGINE_ERRORS))
@pytest.mark.parametrize("where", ["prepare", "before start", "after start"])
async def test_engine_errors_become_statuses_with_their_message(
    error: EngineError, code: grpc.StatusCode, where: str
) -> None:
    engine = ScriptedEngine(
        fail_prepare=error if where == "prepare" else None,
        fail_before_start=error if where == "before start" else None,
        fail_after_start=error if where == "after start" else None,
    )
    async with generator(engine) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            _ = [r async for r in stub.Generate(generator_pb2.GenerateRequest(prompt="Hi"))]
    assert raised.value.code() == code
    assert str(error) in (raised.value.details() or "")
    if isinstance(error, EngineOverloaded):
        assert ("retry-after-ms", "2000") in tuple(raised.value.trailing_metadata() or ())


async def test_a_request_the_engine_refuses_is_refused_at_once_while_the_engine_is_busy() -> None:
    engine = ScriptedEngine(hold=True)
    admission = Admission("generator-busy", max_active=1, max_waiting=4)
    async with generator(engine, admission=admission) as stub:
        running = stub.Generate(generator_pb2.GenerateRequest(prompt="long"))
        await running.read()
        await asyncio.wait_for(engine.holding.wait(), 5)

        engine.fail_prepare = PromptTooLong("the prompt has 9000 tokens")
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            _ = [r async for r in stub.Generate(generator_pb2.GenerateRequest(prompt="x" * 100))]
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert time.monotonic() - started < 1.0
        # Only the running request reached generate(); the refused one never waited for its slot.
        assert [r.prompt for r in engine.requests] == ["long"]
        assert [r.prompt for r in engine.prepared] == ["long", "x" * 100]
        running.cancel()


async def test_started_goes_out_once_prepared_before_the_engine_has_any_output() -> None:
    # Everything in `started` is known after prepare: it must not wait for the prompt's processing, nor
    # sit in front of the first text as a second write. Over gRPC.
    engine = ScriptedEngine()
    engine.first_output = asyncio.Event()
    async with generator(engine) as stub:
        call = stub.Generate(generator_pb2.GenerateRequest(request_id="r-early", prompt="Hi"))
        async with asyncio.timeout(5):
            first = await call.read()
        assert first.WhichOneof("event") == "started"
        assert (first.started.request_id, first.started.prompt_tokens) == ("r-early", 7)
        engine.first_output.set()
        rest = []
        while (response := await call.read()) is not grpc.aio.EOF:
            rest.append(response.WhichOneof("event"))
    assert rest == ["delta", "delta", "delta", "finished"]


async def test_the_engine_has_the_request_before_started_is_written() -> None:
    # The handler itself, without a transport: while it is suspended at `started` (being written), the
    # engine's first step must already be under way, not wait for the write to finish.
    engine = ScriptedEngine()
    engine.first_output = asyncio.Event()
    servicer = GeneratorServicer(engine, LIMITS, Admission("generator-order", max_active=4, max_waiting=4))
    context = types.SimpleNamespace(invocation_metadata=lambda: (), time_remaining=lambda: None)
    handler = servicer.Generate(generator_pb2.GenerateRequest(prompt="Hi"), context)  # type: ignore[arg-type]
    try:
        assert (await anext(handler)).WhichOneof("event") == "started"
        await asyncio.sleep(0)  # one turn of the loop while the handler waits on its write
        assert len(engine.requests) == 1  # generate() has begun (it waits for its first output)
        engine.first_output.set()
        assert [r.WhichOneof("event") async for r in handler] == ["delta", "delta", "delta", "finished"]
    finally:
        await handler.aclose()  # type: ignore[attr-defined]  # an async generator, typed as an iterator


async def test_a_caller_that_leaves_after_started_before_any_output_stops_the_engine() -> None:
    # The engine's first step runs in a task of its own while `started` goes out: a caller that leaves
    # then must still stop it (the task is not left running, nor the stream open).
    engine = ScriptedEngine()
    engine.first_output = asyncio.Event()  # the engine works on the prompt until the caller has left
    async with generator(engine) as stub:
        call = stub.Generate(generator_pb2.GenerateRequest(prompt="Hi"))
        async with asyncio.timeout(5):
            assert (await call.read()).WhichOneof("event") == "started"
        call.cancel()
        async with asyncio.timeout(5):
            await engine.closed.wait()  # the engine's stream was closed: nothing left running
    assert engine.open_streams == 0


async def test_the_prepared_request_is_what_the_engine_generates() -> None:
    engine = ScriptedEngine()
    async with generator(engine) as stub:
        _ = [r async for r in stub.Generate(generator_pb2.GenerateRequest(prompt="Hi"))]
    (seen,) = engine.requests
    assert seen.prepared == Prepared(prompt_tokens=tuple(range(7)))


async def test_a_stamped_call_logs_how_long_it_took_to_reach_the_handler(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="services.generator.servicer")
    async with generator(ScriptedEngine()) as stub:
        sent = (("x-tilserve-sent-at", f"{time.time() - 0.25:.6f}"),)  # as if sent 250 ms ago
        [
            _
            async for _ in stub.Generate(
                generator_pb2.GenerateRequest(request_id="s", prompt="Hi"), metadata=sent
            )
        ]
        [_ async for _ in stub.Generate(generator_pb2.GenerateRequest(request_id="u", prompt="Hi"))]
    lines = {
        r.getMessage().split()[1]: r.getMessage() for r in caplog.records if " finished (" in r.getMessage()
    }
    waited = re.search(r"reached this handler ([\d.]+) ms after the caller sent it", lines["s"])
    assert waited is not None and 250 <= float(waited.group(1)) < 5000
    assert "reached this handler" not in lines["u"]


async def test_the_log_line_says_where_prepare_went_when_the_engine_says(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Breakdown(ScriptedEngine):
        async def prepare(self, request: EngineRequest) -> EngineRequest:
            prepared = Prepared(prompt_tokens=(1, 2, 3), breakdown=(("ids queued", 0.25), ("schema", 2.0)))
            return replace(await super().prepare(request), prepared=prepared)

    caplog.set_level(logging.INFO, logger="services.generator.servicer")
    async with generator(Breakdown()) as stub:
        [_ async for _ in stub.Generate(generator_pb2.GenerateRequest(request_id="b", prompt="Hi"))]
    async with generator(ScriptedEngine()) as stub:
        [_ async for _ in stub.Generate(generator_pb2.GenerateRequest(request_id="n", prompt="Hi"))]
    lines = {
        r.getMessage().split()[1]: r.getMessage() for r in caplog.records if " finished (" in r.getMessage()
    }
    assert re.search(r"prepare [\d.]+ ms \(ids queued 0\.2, schema 2\.0\), admitted", lines["b"]), lines["b"]
    assert re.search(r"prepare [\d.]+ ms, admitted", lines["n"]), lines["n"]


def test_sent_at_reads_only_its_own_well_formed_stamp() -> None:
    ((header, value),) = sent_at.stamp()
    assert header == sent_at.HEADER and abs(float(value) - time.time()) < 5
    assert sent_at.delay_s([("other", "1"), (header, value)]) is not None
    assert sent_at.delay_s([(header, f"{time.time() + 60:.6f}")]) == 0.0  # a clock ahead of ours
    assert sent_at.delay_s([(header, "soon")]) is None
    assert sent_at.delay_s([(header, b"1.0")]) is None  # a binary value is not a stamp
    assert sent_at.delay_s(None) is None


def test_inter_token_latency_is_per_token_when_a_message_carries_several(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.generator import servicer as module

    now = [100.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    name = "tilserve_generator_inter_token_latency_seconds"
    before_sum = REGISTRY.get_sample_value(f"{name}_sum") or 0.0
    before_count = REGISTRY.get_sample_value(f"{name}_count") or 0.0
    times = module._StreamTimes(arrived=99.9)
    times.text_sent(1)  # the first token: time to first token, not a gap
    now[0] += 0.040
    times.text_sent(4)  # 40 ms for 4 tokens (GENERATOR_STREAM_INTERVAL=4): 10 ms a token
    now[0] += 0.010
    times.text_sent(1)
    assert REGISTRY.get_sample_value(f"{name}_count") == before_count + 2
    assert REGISTRY.get_sample_value(f"{name}_sum") == pytest.approx(before_sum + 0.020)
