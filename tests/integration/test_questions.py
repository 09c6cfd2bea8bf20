"""Study questions and TIL revisions through the four real processes (real llama.cpp SmolLM2, real Redis):
streams end to end, a repeated request is answered from the cache without a new generation, bad
requests get their status, and questions are still written when the retriever is gone."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from til.v1 import common_pb2, edge_pb2, edge_pb2_grpc, retriever_pb2, retriever_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.model]

TIL_TEXT = """# 2026-11-24 TIL - Redis 캐시 만료

## 배운 점
- Redis의 `EXPIRE` 명령은 키의 만료 시간을 초 단위로 정한다.
- `SET key value EX 60`처럼 값을 쓰면서 만료 시간을 함께 줄 수 있다.
"""
# Greedy decoding; without a repetition penalty SmolLM2-135M tends to loop ("1.1.1.1...") until max_tokens.
GREEDY = common_pb2.SamplingParams(temperature=0.0, repetition_penalty=1.3)
TIL_CLI = Path(sys.executable).with_name("til")


@pytest.fixture(scope="module")
async def stack(stack_factory, redis_server):
    stack = stack_factory(
        cacher={"CACHER_REDIS_URL": redis_server.url},
        # A loaded CI machine may take longer than the default 0.5 s to embed a whole TIL as a query.
        edge={"EDGE_RETRIEVAL_TIMEOUT_S": "5"},
    )
    await stack.start(timeout_s=240)
    yield stack
    codes = stack.stop()
    retriever = codes.pop("retriever")
    assert codes == dict.fromkeys(codes, 0), f"a service did not exit cleanly on SIGTERM: {codes}"
    assert retriever in (0, -9)  # the last test kills it


def questions_request(**fields: object) -> edge_pb2.GenerateQuestionsRequest:
    defaults: dict[str, object] = {
        "til_text": TIL_TEXT,
        "difficulty": edge_pb2.DIFFICULTY_EASY,
        "count": 1,
        "generation": edge_pb2.GenerationOverrides(sampling=GREEDY, max_tokens=400),
    }
    return edge_pb2.GenerateQuestionsRequest(**{**defaults, **fields})  # type: ignore[arg-type]


async def collect(
    stack, request: edge_pb2.GenerateQuestionsRequest
) -> list[edge_pb2.GenerateQuestionsResponse]:
    async with grpc.aio.insecure_channel(stack.address("edge")) as channel:
        stub = edge_pb2_grpc.EdgeServiceStub(channel)
        return [m async for m in stub.GenerateQuestions(request, timeout=180)]


def check_stream(messages: list) -> tuple[edge_pb2.StreamStarted, str]:
    """started, then deltas, then finished; returns started and the streamed text."""
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds[0] == "started" and kinds[-1] == "finished", kinds
    assert set(kinds[1:-1]) <= {"delta"} and len(kinds) > 2, kinds
    return messages[0].started, "".join(m.delta.text for m in messages[1:-1])


def metric(stack, service: str, name: str, **labels: str) -> float:
    """The sum of a counter's samples with these labels, read from the service's /metrics."""
    port = stack.processes[service].metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def generations(stack) -> float:
    return metric(
        stack,
        "generator",
        "grpc_server_handled_total",
        grpc_service="til.v1.GeneratorService",
        grpc_method="Generate",
    )


def cache_writes(stack) -> float:
    return metric(
        stack,
        "cacher",
        "grpc_server_handled_total",
        grpc_service="til.v1.CacherService",
        grpc_method="PutEntry",
        grpc_code="OK",
    )


async def wait_for(condition, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def test_questions_stream_then_a_repeat_is_served_from_the_cache(stack) -> None:
    request = questions_request()
    writes, before = cache_writes(stack), generations(stack)
    first = await collect(stack, request)
    started, streamed = check_stream(first)
    assert started.cache_status == edge_pb2.CACHE_STATUS_MISS
    assert started.retrieval_status == edge_pb2.RETRIEVAL_STATUS_OK
    assert started.model and started.prompt_tokens > 0
    finished = first[-1].finished
    assert streamed and json.loads(finished.questions_json)  # the final text always parses
    assert generations(stack) == before + 1
    # Only complete results are cached. In a fresh stack (no earlier questions in the prompt) greedy
    # decoding of this TIL ends well within max_tokens, in the schema that the grammar enforces.
    assert finished.finish_reason == common_pb2.FINISH_REASON_STOP, list(finished.violations)
    assert [q.difficulty for q in finished.questions] == [edge_pb2.DIFFICULTY_EASY]
    assert finished.questions[0].question and finished.questions[0].answer

    await wait_for(lambda: cache_writes(stack) > writes)  # the edge stores complete results in the background
    second = await collect(stack, request)
    started, streamed = check_stream(second)
    assert started.cache_status == edge_pb2.CACHE_STATUS_HIT
    assert second[-1].finished.questions_json == finished.questions_json == streamed
    assert generations(stack) == before + 1  # the generator was not asked again


async def test_questions_for_a_stored_til_by_id(stack) -> None:
    async with grpc.aio.insecure_channel(stack.address("retriever")) as channel:
        await retriever_pb2_grpc.RetrieverServiceStub(channel).UpsertDocuments(
            retriever_pb2.UpsertDocumentsRequest(
                documents=[
                    retriever_pb2.Document(
                        id="til-integration-ttl", kind=retriever_pb2.DOCUMENT_KIND_TIL, text=TIL_TEXT
                    )
                ]
            )
        )
    request = questions_request(
        til_id="til-integration-ttl",
        difficulty=edge_pb2.DIFFICULTY_HARD,
        cache_policy=edge_pb2.CACHE_POLICY_BYPASS,
        generation=edge_pb2.GenerationOverrides(sampling=GREEDY, max_tokens=48),
    )
    messages = await collect(stack, request)
    started, _ = check_stream(messages)
    assert started.cache_status == edge_pb2.CACHE_STATUS_BYPASSED
    json.loads(messages[-1].finished.questions_json)


def test_the_cli_streams_questions_for_a_til_file(stack, tmp_path: Path) -> None:
    til = tmp_path / "til.md"
    til.write_text(TIL_TEXT)
    options = ["--count", "1", "--difficulty", "medium", "--max-tokens", "48", "--no-cache", "--json"]
    done = subprocess.run(
        [str(TIL_CLI), "questions", str(til), "--addr", stack.address("edge"), *options],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(document, dict)


async def test_revise_til_streams_a_revised_til(stack) -> None:
    request = edge_pb2.ReviseTilRequest(
        til=edge_pb2.Til(title="2026-11-24 TIL - Redis 캐시 만료", keywords=["캐시"], content=TIL_TEXT),
        instruction="예시 명령을 하나 더 추가해 줘.",
        generation=edge_pb2.GenerationOverrides(sampling=GREEDY, max_tokens=64),
    )
    before = generations(stack)
    async with grpc.aio.insecure_channel(stack.address("edge")) as channel:
        messages = [m async for m in edge_pb2_grpc.EdgeServiceStub(channel).ReviseTil(request, timeout=180)]
    started, streamed = check_stream(messages)
    assert started.cache_status == edge_pb2.CACHE_STATUS_BYPASSED  # a conversation is never cached
    assert streamed
    document = json.loads(messages[-1].finished.til_json)
    assert document["title"].startswith("2026-11-24 TIL")
    assert generations(stack) == before + 1


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"difficulty": 7}, grpc.StatusCode.INVALID_ARGUMENT, "difficulty is 7"),
        (
            {"difficulty": edge_pb2.DIFFICULTY_UNSPECIFIED},
            grpc.StatusCode.INVALID_ARGUMENT,
            "difficulty is unset",
        ),
        ({"count": 11}, grpc.StatusCode.INVALID_ARGUMENT, "count is 11"),
        ({"til_text": " \n"}, grpc.StatusCode.INVALID_ARGUMENT, "til_text is empty"),
        ({"til_id": "til-never-stored"}, grpc.StatusCode.NOT_FOUND, "til-never-stored"),
    ],
)
async def test_bad_question_requests_get_their_status(stack, fields: dict, code, words: str) -> None:
    before = generations(stack)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stack, questions_request(**fields))
    assert err.value.code() == code
    assert words in (err.value.details() or "")
    assert generations(stack) == before


async def test_questions_are_still_written_when_the_retriever_is_gone(stack) -> None:
    stack.kill("retriever")
    request = questions_request(
        cache_policy=edge_pb2.CACHE_POLICY_BYPASS,
        generation=edge_pb2.GenerationOverrides(sampling=GREEDY, max_tokens=48),
    )
    messages = await collect(stack, request)
    started, _ = check_stream(messages)
    assert started.retrieval_status == edge_pb2.RETRIEVAL_STATUS_UNAVAILABLE
    assert any("earlier questions were not checked" in n for n in started.notices), list(started.notices)
    json.loads(messages[-1].finished.questions_json)
