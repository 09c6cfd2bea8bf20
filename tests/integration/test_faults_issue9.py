"""Issue 9's checks before the engine slot, on the edge's hop (the four real processes, llama.cpp with the
packaged SmolLM2, whose one slot a long generation holds). tests/integration/test_faults_generator.py
sends bad requests to the generator itself; here they come through the edge, as callers send them: a
ReviseTil of 20 turns of 18k characters (the issue's probe waited 90 s for DEADLINE_EXCEEDED), a TIL
asking for 2^32-1 tokens, questions about a TIL too long for the context. Each is refused within a
second or so with INVALID_ARGUMENT naming what the caller sent, nothing waits for the slot, and the long
generation streams on. Each test prints what it measured (`pytest -s`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from til.v1 import common_pb2, edge_pb2, edge_pb2_grpc, generator_pb2, generator_pb2_grpc

from services.stack import LocalStack
from tests.integration.test_faults import metric, read_all, report, til_request, until
from tests.unit.test_edge_service import GOOD_TIL

pytestmark = [pytest.mark.integration, pytest.mark.model]

CONTEXT = 2048


@pytest.fixture(scope="module")
async def stack(stack_factory: Any) -> AsyncIterator[LocalStack]:
    stack = stack_factory(generator={"GENERATOR_MAX_MODEL_LEN": str(CONTEXT), "GENERATOR_N_THREADS": "1"})
    await stack.start(timeout_s=240)
    yield stack
    stack.stop()


def load(stack: LocalStack) -> tuple[float, float]:
    """The generator's (running, waiting) requests."""
    return (
        metric(stack, "generator", "tilserve_generator_requests_running"),
        metric(stack, "generator", "tilserve_generator_requests_waiting"),
    )


def bad_edge_calls(edge: edge_pb2_grpc.EdgeServiceStub) -> dict[str, tuple[Any, str]]:
    turns = [
        edge_pb2.ConversationTurn(role=("user", "assistant")[i % 2], content="cache ttl " * 1800)
        for i in range(20)
    ]
    revise = edge_pb2.ReviseTilRequest(
        til=edge_pb2.Til(**GOOD_TIL), history=turns, instruction="제목을 더 짧게 바꿔 줘"
    )
    til = til_request("busy", generation=edge_pb2.GenerationOverrides(max_tokens=2**32 - 1))
    questions = edge_pb2.GenerateQuestionsRequest(
        til_text="# 2026-11-24 TIL\n" + "캐시 만료 " * 3000, difficulty=edge_pb2.DIFFICULTY_EASY, count=1
    )
    return {
        "ReviseTil 20 turns of 18k characters": (lambda: edge.ReviseTil(revise, timeout=90), "context"),
        "GenerateTil max_tokens 2^32-1": (lambda: edge.GenerateTil(til, timeout=90), "generation.max_tokens"),
        "GenerateQuestions over the context": (
            lambda: edge.GenerateQuestions(questions, timeout=90),
            "shorten til_text",
        ),
    }


async def test_the_edge_refuses_bad_calls_at_once_while_the_engine_is_busy(stack: LocalStack) -> None:
    async with (
        grpc.aio.insecure_channel(stack.address("generator")) as generator_channel,
        grpc.aio.insecure_channel(stack.address("edge")) as edge_channel,
    ):
        generator = generator_pb2_grpc.GeneratorServiceStub(generator_channel)
        edge = edge_pb2_grpc.EdgeServiceStub(edge_channel)
        long = generator.Generate(
            generator_pb2.GenerateRequest(
                prompt="Once upon a time",
                stopping=common_pb2.StoppingCriteria(max_tokens=1500, ignore_eos=True),
            ),
            timeout=600,
        )
        assert (await long.read()).WhichOneof("event") == "started"
        assert (await long.read()).WhichOneof("event") == "delta"
        assert load(stack) == (1, 0)  # the only slot is taken
        took: dict[str, int] = {}
        try:
            for name, (send, says) in bad_edge_calls(edge).items():
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await read_all(send())
                elapsed = time.monotonic() - started
                took[name] = round(elapsed * 1000)
                details = raised.value.details() or ""
                assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (name, raised.value)
                assert says in details and "stopping." not in details, (name, details)
                # A 360k-character revision is counted by the generator's tokenizer first: a busy box's
                # slack on top of the second.
                assert elapsed < 3.0, (name, elapsed)
                assert load(stack) == (1, 0), name  # nothing waits behind the long generation
            assert (await long.read()).WhichOneof("event") == "delta"  # which streams on
        finally:
            long.cancel()
        report("bad edge calls with the engine busy (ms)", **took)
        await until(lambda: load(stack) == (0, 0), 10, "the engine did not go idle")
