"""The edge's side of the fault suite, on the four real processes (llama.cpp with the packaged SmolLM2, a
real redis-server): a diff far too long for the context is cut with the model's own tokenizer and said
so, never refused with a field the caller never sees; and an empty owner is an owner of its own in every
read path, whatever the retriever's filter does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from til.v1 import common_pb2, edge_pb2, edge_pb2_grpc, retriever_pb2, retriever_pb2_grpc

from services.stack import LocalStack
from tests.unit.test_edge_service import korean_diff

pytestmark = [pytest.mark.integration, pytest.mark.model]

DATE = "2026-11-24"
CONTEXT = 2048  # a small context keeps prompt processing on a CPU short; the fitting is the same
GREEDY = common_pb2.SamplingParams(temperature=0.0, repetition_penalty=1.3)


@pytest.fixture(scope="module")
async def stack(stack_factory: Any, redis_server: Any) -> AsyncIterator[LocalStack]:
    stack = stack_factory(
        cacher={"CACHER_REDIS_URL": redis_server.url},
        generator={"GENERATOR_MAX_MODEL_LEN": str(CONTEXT), "GENERATOR_DEFAULT_MAX_TOKENS": "512"},
        edge={"EDGE_RETRIEVAL_TIMEOUT_S": "5"},
    )
    await stack.start(timeout_s=240)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
async def edge(stack: LocalStack) -> AsyncIterator[edge_pb2_grpc.EdgeServiceStub]:
    async with grpc.aio.insecure_channel(stack.address("edge")) as channel:
        yield edge_pb2_grpc.EdgeServiceStub(channel)


def overrides(max_tokens: int) -> edge_pb2.GenerationOverrides:
    return edge_pb2.GenerationOverrides(max_tokens=max_tokens, sampling=GREEDY)


def split(messages: list[Any]) -> tuple[edge_pb2.StreamStarted, str, Any]:
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds[0] == "started" and kinds[-1] == "finished", kinds
    return messages[0].started, "".join(m.delta.text for m in messages[1:-1]), messages[-1].finished


async def test_a_40_kb_korean_diff_is_cut_to_the_context_with_a_notice(
    edge: edge_pb2_grpc.EdgeServiceStub,
) -> None:
    diff = korean_diff(40 * 1024)
    request = edge_pb2.GenerateTilRequest(
        diff=diff, date=DATE, generation=overrides(16), cache_policy=edge_pb2.CACHE_POLICY_BYPASS
    )
    started, text, finished = split([m async for m in edge.GenerateTil(request, timeout=300)])
    (notice,) = [n for n in started.notices if "diff was cut" in n]
    print(
        f"\n[faults-edge] 40 KB Korean diff: prompt_tokens={started.prompt_tokens}, notice={notice[:120]!r}"
    )
    assert f"of {len(diff)} characters" in notice and "left out: docs/k" in notice
    # The real tokenizer's count: the prompt fills the context next to the output budget, and no more.
    assert CONTEXT // 2 < started.prompt_tokens <= CONTEXT - 16
    assert text and finished.finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_a_prompt_that_cannot_be_cut_names_what_to_shorten(edge: edge_pb2_grpc.EdgeServiceStub) -> None:
    request = edge_pb2.GenerateQuestionsRequest(
        til_text="# 2026-11-24 TIL\n" + "캐시 만료 " * 3000, difficulty=edge_pb2.DIFFICULTY_EASY, count=1
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        [m async for m in edge.GenerateQuestions(request, timeout=60)]
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    details = raised.value.details() or ""
    assert "shorten til_text" in details and f"{CONTEXT}-token context" in details
    assert "stopping" not in details  # never a field of the edge's own call to the generator


TIL_TEXT = "# 2026-11-20 TIL\n\n- Redis 캐시의 TTL 만료 시간을 설정하여 오래된 데이터를 지운다.\n"


@pytest.fixture(scope="module")
async def alice(stack: LocalStack) -> str:
    """Alice's TIL and question, stored in the retriever as the edge would have indexed them."""
    async with grpc.aio.insecure_channel(stack.address("retriever")) as channel:
        retriever = retriever_pb2_grpc.RetrieverServiceStub(channel)
        await retriever.UpsertDocuments(
            retriever_pb2.UpsertDocumentsRequest(
                documents=[
                    retriever_pb2.Document(
                        id="til-alice-ttl", kind=retriever_pb2.DOCUMENT_KIND_TIL, owner="alice",
                        title="2026-11-20 TIL - Redis 캐시 TTL 만료", text=TIL_TEXT, tags=["캐시", "Redis TTL"],
                    ),
                    retriever_pb2.Document(
                        id="q-alice-ttl", kind=retriever_pb2.DOCUMENT_KIND_QUESTION, owner="alice",
                        text="Redis 캐시에서 TTL 만료 시간을 두는 이유는 무엇인가?", difficulty="easy",
                    ),
                ]
            ),
            timeout=60,
        )  # fmt: skip
    return "alice"


async def til(edge: edge_pb2_grpc.EdgeServiceStub, owner: str) -> edge_pb2.StreamStarted:
    request = edge_pb2.GenerateTilRequest(
        diff="diff --git a/cache.py b/cache.py\n--- a/cache.py\n+++ b/cache.py\n@@ -1 +1 @@\n"
        "-    redis.set(key, value)\n+    redis.set(key, value, ex=ttl)  # Redis 캐시 TTL 만료\n",
        commit_messages=["Redis 캐시 TTL 만료 설정"],
        date=DATE,
        owner=owner,
        generation=overrides(4),
        cache_policy=edge_pb2.CACHE_POLICY_BYPASS,
    )
    return split([m async for m in edge.GenerateTil(request, timeout=300)])[0]


async def questions(edge: edge_pb2_grpc.EdgeServiceStub, owner: str, **source: str) -> edge_pb2.StreamStarted:
    request = edge_pb2.GenerateQuestionsRequest(
        **source, owner=owner, difficulty=edge_pb2.DIFFICULTY_EASY, count=1, generation=overrides(4),
        cache_policy=edge_pb2.CACHE_POLICY_BYPASS,
    )  # fmt: skip
    return split([m async for m in edge.GenerateQuestions(request, timeout=300)])[0]


async def test_an_empty_owner_sees_nothing_of_alice(edge: edge_pb2_grpc.EdgeServiceStub, alice: str) -> None:
    # Alice sees her own: the documents are found (so what follows is not a search that found nothing).
    assert "til-alice-ttl" in [s.id for s in (await til(edge, alice)).sources]
    assert "q-alice-ttl" in [s.id for s in (await questions(edge, alice, til_text=TIL_TEXT)).sources]
    assert (await questions(edge, alice, til_id="til-alice-ttl")).model

    # Owner "" is an owner of its own: none of alice's TILs, questions or ids.
    assert [s.id for s in (await til(edge, "")).sources if "alice" in s.id] == []
    assert [s.id for s in (await questions(edge, "", til_text=TIL_TEXT)).sources if "alice" in s.id] == []
    for owner in ("", "bob"):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await questions(edge, owner, til_id="til-alice-ttl")
        assert raised.value.code() is grpc.StatusCode.NOT_FOUND


async def test_one_owners_oversized_document_degrades_only_that_owners_retrieval(
    stack: LocalStack, edge: edge_pb2_grpc.EdgeServiceStub, alice: str
) -> None:
    """A search result above what the edge reads back (1 MiB) fails that owner's retrieval, with a
    notice; the breaker, shared by every owner, does not count it, so alice's retrieval stays on."""
    huge = retriever_pb2.Document(
        id="til-big", kind=retriever_pb2.DOCUMENT_KIND_TIL, owner="big", title="Redis cache TTL " * 70_000,
        text="# 2026-11-20 TIL\n- Redis 캐시 TTL", tags=["캐시"],
    )  # fmt: skip
    async with grpc.aio.insecure_channel(stack.address("retriever")) as channel:
        try:
            await retriever_pb2_grpc.RetrieverServiceStub(channel).UpsertDocuments(
                retriever_pb2.UpsertDocumentsRequest(documents=[huge]), timeout=120
            )
            stored = True
        except grpc.aio.AioRpcError as exc:  # a retriever that bounds what it stores refuses it instead
            assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT, exc
            stored = False
    for _ in range(5):  # more than EDGE_BREAKER_FAILURES (3)
        started = await til(edge, "big")
        if stored:
            assert started.retrieval_status == edge_pb2.RETRIEVAL_STATUS_UNAVAILABLE
            assert any("RESOURCE_EXHAUSTED" in n for n in started.notices), list(started.notices)
    after = await til(edge, alice)
    print(
        f"\n[faults-edge] oversized document stored={stored}; alice's retrieval after: {after.retrieval_status}"
    )
    assert after.retrieval_status == edge_pb2.RETRIEVAL_STATUS_OK
    assert "til-alice-ttl" in [s.id for s in after.sources]
