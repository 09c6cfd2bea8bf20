"""A_til hands its request to vLLM as the generator does: params built per request inside the clock, and
the schema (validated when the prompt was made) marked so that vLLM does not validate it again on the
event loop. vLLM is a stand-in here, with 0.25.1's shapes: StructuredOutputsParams copies the dict it is
given (a pydantic dataclass), and the input processor validates unless `VALIDATED.take` says not to."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest
from til.v1 import common_pb2, generator_pb2

from bench.arms import EngineTilArm, EngineWrapperArm, EngineWrapperTilArm
from bench.prompts import Prompt
from bench.til_workload import TilRequest
from services.generator import vllm_compat
from services.generator.engine import ChatTurn, EngineDelta, EngineRequest, EngineStarted, Prepared

SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}


@dataclass
class StructuredOutputsParams:
    json: Any = None

    def __post_init__(self) -> None:
        self.json = copy.deepcopy(self.json)  # as vLLM's pydantic dataclass holds a copy


@dataclass
class SamplingParams:
    max_tokens: int = 16
    ignore_eos: bool = False
    temperature: float = 1.0
    output_kind: Any = None
    structured_outputs: StructuredOutputsParams | None = None


@dataclass
class StandInLLM:
    validated_again: list[bool] = field(default_factory=list)
    seen: list[SamplingParams] = field(default_factory=list)

    def get_tokenizer(self) -> Any:
        return types.SimpleNamespace(eos_token_id=2)

    async def generate(self, prompt: Any, params: SamplingParams, request_id: str) -> Any:
        # vLLM's input processor: validate unless prepare marked this very object.
        assert params.structured_outputs is not None
        self.validated_again.append(not vllm_compat.VALIDATED.take(params.structured_outputs.json))
        self.seen.append(params)
        await asyncio.sleep(0)
        out = types.SimpleNamespace(
            outputs=[types.SimpleNamespace(token_ids=[5, 6])], metrics=None, finished=True
        )
        yield out


@pytest.fixture
def stand_in_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    modules = {
        "vllm": types.SimpleNamespace(SamplingParams=SamplingParams, TokensPrompt=dict),
        "vllm.sampling_params": types.SimpleNamespace(
            RequestOutputKind=types.SimpleNamespace(DELTA="delta"),
            StructuredOutputsParams=StructuredOutputsParams,
        ),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr("bench.arms._engine_queue", lambda record, out: None)


def til_prompt() -> Prompt:
    request = generator_pb2.GenerateRequest(
        prompt="diff", stopping=common_pb2.StoppingCriteria(max_tokens=64, ignore_eos=True)
    )
    til = TilRequest(
        diff="diff", generate_request=request.SerializeToString(), prepared_schema=json.dumps(SCHEMA)
    )
    return Prompt(text="diff", token_ids=(1, 2, 3), til=til)


async def test_engine_til_requests_are_not_validated_again_and_each_has_its_own_params(
    stand_in_vllm: None,
) -> None:
    llm = StandInLLM()
    arm = EngineTilArm(types.SimpleNamespace(async_llm=llm))  # type: ignore[arg-type]
    records = await asyncio.gather(*(arm.one(til_prompt(), 32) for _ in range(5)))
    assert all(r.error is None for r in records), [r.error for r in records]
    assert llm.validated_again == [False] * 5  # every schema skipped vLLM's second validation
    assert len({id(p) for p in llm.seen}) == 5  # a mark is taken once: params are per request
    params = llm.seen[0]
    assert (params.max_tokens, params.ignore_eos, params.temperature, params.output_kind) == (
        32,
        True,
        0.0,
        "delta",
    )
    assert params.structured_outputs is not None and params.structured_outputs.json == SCHEMA
    assert len(vllm_compat.VALIDATED) == 0  # nothing left marked


class StandInEngine:
    """`VllmEngine`'s prepare and generate, recording what each was given and when."""

    def __init__(self, prepare_s: float) -> None:
        self.prepare_s = prepare_s
        self.calls: list[tuple[str, EngineRequest]] = []

    async def prepare(self, request: EngineRequest) -> EngineRequest:
        self.calls.append(("prepare", request))
        await asyncio.sleep(self.prepare_s)
        return dataclasses.replace(
            request, prepared=Prepared(prompt_tokens=(1, 2, 3), constraint=request.json_schema)
        )

    async def generate(self, request: EngineRequest) -> Any:
        self.calls.append(("generate", request))
        yield EngineStarted(prompt_tokens=3, queue_s=0.002)
        yield EngineDelta(text="{", token_count=2)
        yield EngineDelta(text="}", token_count=1)


def chat_prompt() -> Prompt:
    request = generator_pb2.GenerateRequest(
        chat=generator_pb2.ChatMessages(
            messages=[
                generator_pb2.ChatMessage(role="system", content="rules"),
                generator_pb2.ChatMessage(role="user", content="a diff"),
            ]
        ),
        output=generator_pb2.OutputFormat(json_schema=json.dumps(SCHEMA)),
        stopping=common_pb2.StoppingCriteria(max_tokens=64, ignore_eos=True, stop=["\n\n\n"]),
    )
    til = TilRequest(diff="a diff", generate_request=request.SerializeToString(), prepared_schema="{}")
    return Prompt(text="a diff", token_ids=(1, 2, 3), til=til)


async def test_engine_wrapper_til_sends_the_edge_request_through_prepare_then_generate() -> None:
    engine = StandInEngine(prepare_s=0.02)
    arm = EngineWrapperTilArm(engine)  # type: ignore[arg-type]
    record = await arm.one(chat_prompt(), 32)
    assert record.error is None
    assert [name for name, _ in engine.calls] == ["prepare", "generate"]
    sent = engine.calls[0][1]
    # The edge's own chat and schema text, readied by the engine (not the benchmark's prepared copy).
    assert sent.prompt is None
    assert sent.messages == (ChatTurn("system", "rules"), ChatTurn("user", "a diff"))
    assert sent.json_schema == SCHEMA and sent.prepared is None
    assert (sent.max_tokens, sent.ignore_eos, sent.sampling.temperature, sent.stop) == (
        32,
        True,
        0.0,
        ("\n\n\n",),
    )
    assert engine.calls[1][1].prepared is not None  # generate got what prepare made
    assert (record.tokens, record.prompt_tokens, len(record.message_times)) == (3, 3, 2)
    # The generator's own queue: prepare (20 ms here), then the engine's.
    assert record.server_queue_ms is not None and 20 + 2 <= record.server_queue_ms < 20 + 2 + 200


async def test_engine_wrapper_sends_the_plain_prompt_through_prepare_then_generate() -> None:
    engine = StandInEngine(prepare_s=0.0)
    record = await EngineWrapperArm(engine).one(Prompt(text="a prompt", token_ids=(1, 2, 3)), 16)  # type: ignore[arg-type]
    assert record.error is None
    assert [name for name, _ in engine.calls] == ["prepare", "generate"]
    sent = engine.calls[0][1]
    assert (sent.prompt, sent.messages, sent.json_schema) == ("a prompt", None, None)
    assert (sent.max_tokens, sent.ignore_eos, sent.sampling.temperature) == (16, True, 0.0)
    assert record.tokens == 3 and record.server_queue_ms is not None
