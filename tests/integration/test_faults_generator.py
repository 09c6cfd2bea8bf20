"""The generator's fault suite on a real process (`python -m services.generator`, llama.cpp and the
packaged SmolLM2): bad requests are refused before they wait for the single engine slot, hostile
schemas never reach the engine, counting tokens never waits behind a generation, and a bad setting
stops the service with the variable's name. Each test prints what it measured (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from til.v1 import common_pb2, generator_pb2, generator_pb2_grpc

from tests.unit.test_generator_llama_cpp import port_once_serving

pytestmark = [pytest.mark.integration, pytest.mark.model]

CONTEXT = 2048


def _env(**settings: str) -> dict[str, str]:
    return {
        **os.environ,
        "GENERATOR_PORT": "0",
        "GENERATOR_METRICS_PORT": "0",
        "GENERATOR_N_THREADS": "1",
        "GENERATOR_MAX_MODEL_LEN": str(CONTEXT),
        **settings,
    }


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def generator() -> AsyncIterator[generator_pb2_grpc.GeneratorServiceStub]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.generator", env=_env(), stderr=asyncio.subprocess.PIPE
    )
    stderr = process.stderr
    assert stderr is not None

    async def drain() -> None:  # keep the pipe from filling up
        while await stderr.readline():
            pass

    try:
        port = await asyncio.wait_for(port_once_serving(stderr), 120)
        draining = asyncio.create_task(drain())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield generator_pb2_grpc.GeneratorServiceStub(channel)
        draining.cancel()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def generate(
    *, prompt: str = "Hi", chat: list[tuple[str, str]] | None = None, max_tokens: int = 8, schema: str = ""
) -> generator_pb2.GenerateRequest:
    request = generator_pb2.GenerateRequest(
        sampling=common_pb2.SamplingParams(temperature=0.0),
        stopping=common_pb2.StoppingCriteria(max_tokens=max_tokens),
        output=generator_pb2.OutputFormat(json_schema=schema),
    )
    if chat:
        request.chat.messages.extend(generator_pb2.ChatMessage(role=r, content=c) for r, c in chat)
    else:
        request.prompt = prompt
    return request


BAD = {
    "max_tokens 2^32-1": (generate(max_tokens=2**32 - 1), "stopping.max_tokens is 4294967295"),
    "pattern (": (generate(schema=json.dumps({"type": "string", "pattern": "("})), "missing ')'"),
    "a prompt over the context": (generate(prompt="word " * 2500), "the prompt has"),
    "20 turns of 18k characters": (
        generate(chat=[("user", "가" * 18_000), ("assistant", "네")] * 10),
        "the prompt has",
    ),
    "65 turns": (generate(chat=[("user", "x")] * 65), "at most 64"),
    "a 5,000-deep schema": (
        generate(schema='{"type": "array", "items": ' * 5000 + "{}" + "}" * 5000),
        "nests 5001 levels deep; at most 64",
    ),
    "10k optional properties": (
        generate(schema=json.dumps({"type": "object", "properties": {f"p{i}": {} for i in range(10_000)}})),
        "an object has 10000 properties; at most 256",
    ),
    "an enum of 100k values": (
        generate(schema=json.dumps({"enum": list(range(100_000))})),
        "an enum has 100000 values; at most 1000",
    ),
    "a lookaround": (generate(schema=json.dumps({"type": "string", "pattern": "^(?!x)"})), "lookarounds"),
}


async def test_bad_requests_are_refused_within_a_second_while_the_engine_is_busy(
    generator: generator_pb2_grpc.GeneratorServiceStub,
) -> None:
    long_request = generate(prompt="Once upon a time", max_tokens=1500)
    long_request.stopping.ignore_eos = True
    long = generator.Generate(long_request, timeout=300)
    assert (await long.read()).WhichOneof("event") == "started"
    assert (await long.read()).WhichOneof("event") == "delta"
    try:
        for name, (message, says) in BAD.items():
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as error:
                _ = [r async for r in generator.Generate(message, timeout=30)]
            elapsed = time.monotonic() - started
            print(f"{name}: {error.value.code().name} in {elapsed * 1000:.0f} ms")
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.value.details())
            assert says in (error.value.details() or ""), (name, error.value.details())
            assert elapsed < 1.0, (name, elapsed)

        started = time.monotonic()
        counted = await generator.Tokenize(
            generator_pb2.TokenizeRequest(inputs=[generator_pb2.TokenizeInput(text="캐시 " * 10_000)]),
            timeout=5,
        )
        elapsed = time.monotonic() - started
        print(f"Tokenize of 30,000 characters while generating: {elapsed * 1000:.0f} ms")
        assert counted.results[0].token_count >= 10_000 and elapsed < 1.0
        # The long generation never stopped for any of them.
        assert (await long.read()).WhichOneof("event") == "delta"
    finally:
        long.cancel()

    started = time.monotonic()
    responses = [r async for r in generator.Generate(generate(max_tokens=4), timeout=60)]
    print(f"next request after the long one was cancelled: {(time.monotonic() - started) * 1000:.0f} ms")
    assert responses[-1].WhichOneof("event") == "finished"


async def test_hostile_schemas_never_hold_the_engine(
    generator: generator_pb2_grpc.GeneratorServiceStub,
) -> None:
    """Each hostile schema is refused; a small valid request right after them is served at once."""
    for name, (message, _) in BAD.items():
        if "schema" in name or "enum" in name or "properties" in name:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                _ = [r async for r in generator.Generate(message, timeout=30)]
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    schema = json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})
    started = time.monotonic()
    responses = [r async for r in generator.Generate(generate(max_tokens=48, schema=schema), timeout=60)]
    text = "".join(r.delta.text for r in responses if r.WhichOneof("event") == "delta")
    print(f"a valid schema request after the hostile ones: {(time.monotonic() - started) * 1000:.0f} ms")
    assert isinstance(json.loads(text)["ok"], bool)
    info = await generator.GetModelInfo(generator_pb2.GetModelInfoRequest())
    assert info.engine_settings["structured_output"] == "llguidance"


@pytest.mark.parametrize(
    ("variable", "value"),
    [("GENERATOR_SCHEMA_COMPILE_TIMEOUT_S", "-1"), ("GENERATOR_MAX_MODEL_LEN", "lots")],
)
async def test_a_bad_setting_stops_the_service_naming_the_variable(variable: str, value: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.generator",
        env=_env(**{variable: value}),
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode != 0
    assert variable in stderr.decode(), stderr.decode()[-2000:]
