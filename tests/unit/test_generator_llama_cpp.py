"""The generator on real llama.cpp with the packaged SmolLM2-135M-Instruct GGUF, through real stubs.

The model is loaded once for the module; outputs are kept short so the file runs in seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import jsonschema
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from til.v1 import common_pb2, generator_pb2
from til.v1.generator_pb2_grpc import GeneratorServiceStub

from services.common.admission import Admission
from services.generator.config import GeneratorSettings
from services.generator.engine import EngineDelta, EngineLoad, EngineRequest, EngineUnavailable
from services.generator.models import packaged_gguf
from services.generator.servicer import GenerationLimits, GeneratorServicer
from tests.conftest import in_process_server

llama_cpp = pytest.importorskip("llama_cpp")
from services.generator.llama_cpp_engine import LlamaCppEngine  # noqa: E402
from services.generator.llama_model import load_llama  # noqa: E402

pytestmark = pytest.mark.model

CONTEXT = 2048


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served() -> AsyncIterator[tuple[LlamaCppEngine, GeneratorServiceStub]]:
    # One thread: llama.cpp's spinning threads slow to a crawl when they compete for a small CI box.
    settings = GeneratorSettings(max_model_len=CONTEXT, n_threads=1, default_max_tokens=16)
    engine = LlamaCppEngine(settings)
    await engine.start()
    servicer = GeneratorServicer(
        engine,
        GenerationLimits(default_max_tokens=16),
        Admission("generator-llama", max_active=4, max_waiting=4),
    )
    async with in_process_server([servicer.service()]) as (_, channel):
        yield engine, GeneratorServiceStub(channel)
    await engine.close()


@pytest.fixture(scope="module")
def reference() -> Iterator[Any]:
    """A second, independent llama-cpp-python model: llama-cpp-python's own tokenizer and chat handler."""
    llama = load_llama(model_path=str(packaged_gguf()), n_ctx=512, n_threads=1, verbose=False)
    yield llama
    llama.close()


def request(
    *,
    prompt: str | None = None,
    chat: list[tuple[str, str]] | None = None,
    max_tokens: int = 16,
    ignore_eos: bool = False,
    stop: tuple[str, ...] = (),
    schema: dict[str, Any] | None = None,
) -> generator_pb2.GenerateRequest:
    message = generator_pb2.GenerateRequest(
        sampling=common_pb2.SamplingParams(temperature=0.0),
        stopping=common_pb2.StoppingCriteria(max_tokens=max_tokens, ignore_eos=ignore_eos, stop=stop),
    )
    if prompt is not None:
        message.prompt = prompt
    for role, content in chat or []:
        message.chat.messages.add(role=role, content=content)
    if schema is not None:
        message.output.json_schema = json.dumps(schema, ensure_ascii=False)
    return message


async def collect(
    stub: GeneratorServiceStub, message: generator_pb2.GenerateRequest
) -> list[generator_pb2.GenerateResponse]:
    return [r async for r in stub.Generate(message, timeout=120)]


def text_of(responses: list[generator_pb2.GenerateResponse]) -> str:
    return "".join(r.delta.text for r in responses if r.WhichOneof("event") == "delta")


IDLE = EngineLoad(running=0, waiting=0)


async def until_load(engine: LlamaCppEngine, load: EngineLoad, within_s: float) -> float:
    """Seconds until the engine reports `load`; fails after `within_s`."""
    started = time.monotonic()
    while (now := engine.load()) != load:
        assert time.monotonic() - started < within_s, f"engine load is {now}, expected {load}"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def test_streams_text_with_consistent_token_counts(
    served: tuple[LlamaCppEngine, GeneratorServiceStub], reference: Any
) -> None:
    _, stub = served
    prompt = "The three most useful git commands are"
    responses = await collect(stub, request(prompt=prompt, max_tokens=12, ignore_eos=True))

    kinds = [r.WhichOneof("event") for r in responses]
    assert kinds[0] == "started" and kinds[-1] == "finished" and set(kinds[1:-1]) == {"delta"}
    started, finished = responses[0].started, responses[-1].finished
    assert started.model == "SmolLM2-135M-Instruct.Q4_1"
    assert (
        started.prompt_tokens
        == len(reference.tokenize(prompt.encode(), add_bos=True))
        == finished.usage.prompt_tokens
    )
    assert finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert finished.usage.completion_tokens == 12
    assert sum(r.delta.token_count for r in responses[1:-1]) == 12
    assert text_of(responses).strip()
    timings = finished.timings
    assert 0 <= timings.queue_ms <= timings.time_to_first_token_ms <= timings.total_ms


async def test_korean_split_across_tokens_arrives_in_whole_characters(
    served: tuple[LlamaCppEngine, GeneratorServiceStub],
) -> None:
    _, stub = served
    korean = "안녕하세요, 오늘 배운 것"
    responses = await collect(
        stub, request(prompt="Say hello in Korean:", max_tokens=64, schema={"enum": [korean]})
    )

    deltas = [r.delta for r in responses if r.WhichOneof("event") == "delta"]
    assert json.loads("".join(d.text for d in deltas)) == korean
    assert all("\ufffd" not in d.text for d in deltas)
    # Hangul syllables are three UTF-8 bytes that this vocabulary splits: some deltas carry several tokens.
    assert any(d.token_count > 1 for d in deltas)
    finished = responses[-1].finished
    assert finished.finish_reason == common_pb2.FINISH_REASON_STOP
    assert sum(d.token_count for d in deltas) == finished.usage.completion_tokens


TIL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "pattern": "^2026-11-24 TIL - .{1,24}$"},
        "keywords": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 8},
            "minItems": 1,
            "maxItems": 2,
        },
        "content": {"type": "string", "pattern": "^# 2026-11-24 TIL\\n", "maxLength": 60},
    },
    "required": ["title", "keywords", "content"],
    "additionalProperties": False,
}


async def test_json_schema_output_parses_and_follows_the_schema(
    served: tuple[LlamaCppEngine, GeneratorServiceStub],
) -> None:
    _, stub = served
    chat = [
        ("system", "You write Today-I-Learned notes as JSON."),
        ("user", "Diff: added a Redis cache with a TTL to the search endpoint. Write the TIL."),
    ]
    responses = await collect(stub, request(chat=chat, max_tokens=200, schema=TIL_SCHEMA))

    assert responses[-1].finished.finish_reason == common_pb2.FINISH_REASON_STOP
    document = json.loads(text_of(responses))
    jsonschema.validate(document, TIL_SCHEMA)
    assert document["content"].startswith("# 2026-11-24 TIL\n")


async def test_chat_is_rendered_with_the_models_template(
    served: tuple[LlamaCppEngine, GeneratorServiceStub], reference: Any
) -> None:
    _, stub = served
    messages = [("system", "You are terse."), ("user", "Name one sorting algorithm.")]
    responses = await collect(stub, request(chat=messages, max_tokens=10))

    expected = reference.create_chat_completion(
        messages=[{"role": role, "content": content} for role, content in messages],
        temperature=0.0,
        max_tokens=10,
    )
    assert responses[0].started.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert text_of(responses) == expected["choices"][0]["message"]["content"]


async def test_generation_stops_before_a_stop_string(
    served: tuple[LlamaCppEngine, GeneratorServiceStub],
) -> None:
    _, stub = served
    prompt = "List of fruits: apple, banana,"
    full = text_of(await collect(stub, request(prompt=prompt, max_tokens=16, ignore_eos=True)))
    words = re.findall(r"[A-Za-z]{3,}", full)
    assert len(words) >= 2, full
    stop = words[1]

    responses = await collect(stub, request(prompt=prompt, max_tokens=16, ignore_eos=True, stop=(stop,)))
    assert text_of(responses) == full[: full.index(stop)]
    assert responses[-1].finished.finish_reason == common_pb2.FINISH_REASON_STOP


async def test_cancelling_mid_stream_frees_the_engine_at_once(
    served: tuple[LlamaCppEngine, GeneratorServiceStub],
) -> None:
    engine, stub = served
    long = stub.Generate(request(prompt="Once upon a time", max_tokens=1500, ignore_eos=True))
    assert (await long.read()).WhichOneof("event") == "started"
    for _ in range(3):
        assert (await long.read()).WhichOneof("event") == "delta"

    queued = stub.Generate(request(prompt="A queued request", max_tokens=4))
    await until_load(engine, EngineLoad(running=1, waiting=1), within_s=5.0)
    queued.cancel()  # leaves the queue without running
    await until_load(engine, EngineLoad(running=1, waiting=0), within_s=1.0)

    cancelled_at = time.monotonic()
    long.cancel()
    freed_s = await until_load(engine, IDLE, within_s=2.0)
    next_call = stub.Generate(request(prompt="Next request", max_tokens=4))
    assert (await next_call.read()).WhichOneof("event") == "started"
    started_s = time.monotonic() - cancelled_at
    while await next_call.read() is not grpc.aio.EOF:
        pass
    assert await next_call.code() == grpc.StatusCode.OK
    # One decode step of this model is ~20 ms; generous bounds for a busy CI machine.
    print(
        f"engine free {freed_s * 1000:.0f} ms and next request started {started_s * 1000:.0f} ms after cancel"
    )
    assert freed_s < 0.5, freed_s
    assert started_s < 1.0, started_s


async def test_closing_the_engine_ends_running_and_queued_requests_as_unavailable() -> None:
    engine = LlamaCppEngine(GeneratorSettings(max_model_len=512, default_max_tokens=16, n_threads=1))
    await engine.start()
    long = EngineRequest("long", prompt="Once upon a time", messages=None, max_tokens=400, ignore_eos=True)
    queued = EngineRequest("queued", prompt="Hello", messages=None, max_tokens=4)
    first_text = asyncio.Event()

    async def consume(request: EngineRequest) -> BaseException | None:
        try:
            async for event in engine.generate(request):
                if isinstance(event, EngineDelta):
                    first_text.set()
        except EngineUnavailable as exc:
            return exc
        return None

    running = asyncio.create_task(consume(long))
    await asyncio.wait_for(first_text.wait(), 10)
    waiting = asyncio.create_task(consume(queued))
    await until_load(engine, EngineLoad(running=1, waiting=1), within_s=5.0)

    await asyncio.wait_for(engine.close(), 5)
    errors = await asyncio.wait_for(asyncio.gather(running, waiting), 5)
    assert [type(e) for e in errors] == [EngineUnavailable, EngineUnavailable]
    with pytest.raises(EngineUnavailable):
        await anext(aiter(engine.generate(queued)))


async def test_deadline_stops_generation(served: tuple[LlamaCppEngine, GeneratorServiceStub]) -> None:
    engine, stub = served
    with pytest.raises(grpc.aio.AioRpcError) as error:
        _ = [
            r
            async for r in stub.Generate(
                request(prompt="Count to a thousand:", max_tokens=1500, ignore_eos=True), timeout=0.5
            )
        ]
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await until_load(engine, IDLE, within_s=2.0) < 0.5


async def test_prompt_longer_than_the_context_is_invalid_argument(
    served: tuple[LlamaCppEngine, GeneratorServiceStub],
) -> None:
    _, stub = served
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await collect(stub, request(prompt="word " * 2500, max_tokens=16))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.value.details() or ""
    assert re.search(r"the prompt has \d{4} tokens and 16 output tokens", details), details
    assert f"holds {CONTEXT} tokens" in details


async def test_schema_llama_cpp_cannot_express_is_invalid_argument(
    served: tuple[LlamaCppEngine, GeneratorServiceStub],
) -> None:
    _, stub = served
    schema = {"type": "string", "pattern": "^(?!x).*$"}
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await collect(stub, request(prompt="Hi", schema=schema))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lookarounds" in (error.value.details() or "")


async def test_model_info_describes_the_loaded_model(
    served: tuple[LlamaCppEngine, GeneratorServiceStub],
) -> None:
    _, stub = served
    info = await stub.GetModelInfo(generator_pb2.GetModelInfoRequest())
    assert (info.model, info.backend) == ("SmolLM2-135M-Instruct.Q4_1", "llama_cpp")
    assert info.model_path == str(packaged_gguf())
    assert info.max_model_len == CONTEXT and info.default_max_tokens == 16
    assert info.engine_settings["n_ctx"] == str(CONTEXT)
    assert info.engine_settings["n_threads"] == "1"
    assert info.engine_settings["chat_format"] == "gguf"
    assert info.engine_settings["repetition_penalty"] == "1.1"
    assert info.engine_settings["frequency_penalty"] == "0.3"


async def test_tokenize_counts_with_the_models_tokenizer_and_offsets_cut_whole_tokens(
    served: tuple[LlamaCppEngine, GeneratorServiceStub], reference: Any
) -> None:
    _, stub = served
    texts = [
        "def cache(key):\n    return redis.get(key)  # TTL 적용",
        "캐시 무효화를 정리했다. <|im_start|> is plain text here",
        "",
    ]
    request = generator_pb2.TokenizeRequest(
        inputs=[generator_pb2.TokenizeInput(text=t) for t in texts], return_offsets=True
    )
    started = time.monotonic()
    response = await stub.Tokenize(request)
    print(f"Tokenize of {sum(map(len, texts))} characters: {(time.monotonic() - started) * 1000:.1f} ms")

    assert response.max_model_len == CONTEXT
    for text, result in zip(texts, response.results, strict=True):
        tokens = reference.tokenize(text.encode(), add_bos=False, special=False) if text else []
        assert result.token_count == len(tokens)
        offsets = list(result.offsets)
        assert len(offsets) == len(tokens) and offsets == sorted(offsets)
        assert offsets[-1:] == ([len(text)] if text else [])
        # Every prefix cut at an offset is the detokenized prefix, up to a character split by a token.
        for i, end in enumerate(offsets):
            prefix = reference.detokenize(tokens[: i + 1]).decode("utf-8", "ignore")
            assert prefix == text[:end], (i, prefix, text[:end])


async def test_tokenize_counts_a_chat_as_generate_renders_it(
    served: tuple[LlamaCppEngine, GeneratorServiceStub],
) -> None:
    _, stub = served
    turns = [("system", "You write TILs."), ("user", "오늘 배운 것: Redis TTL")]
    chat = generator_pb2.ChatMessages(
        messages=[generator_pb2.ChatMessage(role=r, content=c) for r, c in turns]
    )
    response = await stub.Tokenize(
        generator_pb2.TokenizeRequest(inputs=[generator_pb2.TokenizeInput(chat=chat)], return_offsets=True)
    )
    responses = await collect(stub, request(chat=turns, max_tokens=1))

    (result,) = response.results
    assert result.token_count == responses[0].started.prompt_tokens > 10
    assert list(result.offsets) == []


async def test_tokenize_does_not_wait_for_a_running_generation(
    served: tuple[LlamaCppEngine, GeneratorServiceStub],
) -> None:
    engine, stub = served
    long = stub.Generate(request(prompt="Once upon a time", max_tokens=1500, ignore_eos=True))
    assert (await long.read()).WhichOneof("event") == "started"
    # `started` goes out as the engine takes the request, before it runs it: wait until it does.
    await until_load(engine, EngineLoad(running=1, waiting=0), within_s=5.0)
    text = "가나다 " * 5000
    started = time.monotonic()
    response = await stub.Tokenize(
        generator_pb2.TokenizeRequest(inputs=[generator_pb2.TokenizeInput(text=text)]), timeout=5
    )
    elapsed = time.monotonic() - started
    long.cancel()
    print(f"Tokenize of {len(text)} Korean characters while generating: {elapsed * 1000:.1f} ms")
    assert response.results[0].token_count > 5000
    assert elapsed < 1.0
    await until_load(engine, IDLE, within_s=2.0)


def _deep_schema(depth: int) -> str:
    return '{"type": "array", "items": ' * depth + "{}" + "}" * depth


BAD_WHILE_BUSY = {
    "max_tokens 2^32-1": (request(prompt="Hi", max_tokens=2**32 - 1), "stopping.max_tokens is 4294967295"),
    "pattern (": (request(prompt="Hi", schema={"type": "string", "pattern": "("}), "missing ')'"),
    "prompt over the context": (request(prompt="word " * 2500), "the prompt has"),
    "65 chat turns": (request(chat=[("user", "x" * 100)] * 65), "at most 64"),
    "5,000-deep schema": (
        generator_pb2.GenerateRequest(
            prompt="Hi", output=generator_pb2.OutputFormat(json_schema=_deep_schema(5000))
        ),
        "nests 5001 levels deep; at most 64",
    ),
    "10k optional properties": (
        request(prompt="Hi", schema={"type": "object", "properties": {f"p{i}": {} for i in range(10_000)}}),
        "an object has 10000 properties; at most 256",
    ),
    "enum of 100k values": (
        request(prompt="Hi", schema={"enum": list(range(100_000))}),
        "an enum has 100000 values; at most 1000",
    ),
    "lookaround": (request(prompt="Hi", schema={"type": "string", "pattern": "^(?=a)"}), "lookarounds"),
}


async def test_invalid_requests_are_refused_within_a_second_while_the_engine_is_busy(
    served: tuple[LlamaCppEngine, GeneratorServiceStub],
) -> None:
    engine, stub = served
    long = stub.Generate(request(prompt="Once upon a time", max_tokens=1500, ignore_eos=True))
    assert (await long.read()).WhichOneof("event") == "started"
    assert (await long.read()).WhichOneof("event") == "delta"
    try:
        for name, (message, says) in BAD_WHILE_BUSY.items():
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await collect(stub, message)
            elapsed = time.monotonic() - started
            print(f"{name}: {error.value.code().name} in {elapsed * 1000:.0f} ms")
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert says in (error.value.details() or ""), (name, error.value.details())
            assert elapsed < 1.0, (name, elapsed)
            # The long generation kept its slot, and nothing queued behind it.
            assert engine.load() == EngineLoad(running=1, waiting=0), name
        assert (await long.read()).WhichOneof("event") == "delta"
    finally:
        long.cancel()
    await until_load(engine, IDLE, within_s=2.0)


async def port_once_serving(stderr: asyncio.StreamReader, lines: list[bytes] | None = None) -> int:
    """Reads a starting `python -m services.generator`'s log until it serves; the port it listens on.
    `lines`, when given, gets every line read."""
    port = 0
    while b"SERVING til.v1.GeneratorService" not in (line := await stderr.readline()):
        assert line, "the generator exited before SERVING"
        if lines is not None:
            lines.append(line)
        if match := re.search(rb"listening on [\d.]+:(\d+)", line):
            port = int(match.group(1))
    return port


async def test_python_m_services_generator_turns_serving_and_drains() -> None:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "GENERATOR_PORT": "0",
        "GENERATOR_METRICS_PORT": "0",
        "GENERATOR_N_THREADS": "1",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.generator", env=env, stderr=asyncio.subprocess.PIPE
    )
    stderr = process.stderr
    assert stderr is not None

    try:
        log_lines: list[bytes] = []
        port = await asyncio.wait_for(port_once_serving(stderr, log_lines), 60)
        assert port
        # uvloop by default (GENERATOR_UVLOOP), as `vllm serve` runs: one loop carries every stream.
        assert any(b"event loop: uvloop" in line for line in log_lines), log_lines
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="til.v1.GeneratorService")
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
