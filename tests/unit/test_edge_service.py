"""The edge service end to end over real gRPC, with fake generator, retriever and cacher servicers.

Each test starts the fakes and the edge on loopback ports; no model is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from til.v1 import (
    cacher_pb2,
    cacher_pb2_grpc,
    common_pb2,
    edge_pb2,
    edge_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    retriever_pb2,
    retriever_pb2_grpc,
)

from services.common.admission import Admission
from services.common.errors import InvalidArgument, ServiceError
from services.common.server import Service
from services.edge import til as til_module
from services.edge.background import Background
from services.edge.clients import CacherClient, GeneratorClient, RetrieverClient, RetryPolicy
from services.edge.config import EdgeSettings
from services.edge.questions import QuestionPipeline
from services.edge.servicer import EdgeServicer, edge_service
from services.edge.til import TilPipeline
from tests.conftest import in_process_server

DATE = "2024-05-01"
DIFF = """\
diff --git a/app/users.py b/app/users.py
index 3b18e51..a9c2f4d 100644
--- a/app/users.py
+++ b/app/users.py
@@ -1,6 +1,9 @@ def get_user(user_id):
-    return db.fetch_user(user_id)
+    cached = cache.get(f"user:{user_id}")
+    if cached is not None:
+        return cached
+    user = db.fetch_user(user_id)
+    cache.set(f"user:{user_id}", user, ttl=300)
+    return user
"""
GOOD_TIL: dict[str, Any] = {
    "title": f"{DATE} TIL - 사용자 조회결과 캐싱",
    "keywords": ["캐시", "Redis 캐시"],
    "content": (
        f"# {DATE} TIL\n\n"
        "- 사용자 조회 결과를 캐시에 저장하여 데이터베이스 호출을 줄인다.\n"
        '```python\ncache.set(f"user:{user_id}", user, ttl=300)\n```\n'
    ),
}
GOOD_TIL_JSON = json.dumps(GOOD_TIL, ensure_ascii=False)
QUESTIONS: dict[str, Any] = {
    "questions": [
        {"question": "캐시 TTL을 두는 이유는 무엇인가?", "answer": "오래된 데이터를 줄이기 위해서이다.",
         "difficulty": "medium", "keywords": ["캐시"]},
        {"question": "캐시 미스가 나면 어떻게 동작하는가?", "answer": "데이터베이스에서 읽고 캐시에 저장한다.",
         "difficulty": "medium", "keywords": ["캐시 미스"]},
    ]
}  # fmt: skip


def chunks(text: str, size: int = 7) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def token_ends(text: str) -> list[int]:
    """A tokenizer for the fake: up to 4 ASCII characters a token, one token per other character (as
    byte-level tokenizers treat Hangul); the end offset of each token."""
    ends: list[int] = []
    start = 0
    for i, char in enumerate(text):
        if ends and char.isascii() and text[i - 1].isascii() and i - start < 4:
            ends[-1] = i + 1
        else:
            start = i
            ends.append(i + 1)
    return ends


def counted_for_requests(generator: FakeGenerator) -> list[generator_pb2.TokenizeRequest]:
    """The Tokenize calls that counted a request's prompt: not those that counted a chat format (a
    placeholder in each message, beside a real chat)."""
    return [t for t in generator.tokenized if not is_format_count(t)]


def is_format_count(t: generator_pb2.TokenizeRequest) -> bool:
    return (
        len(t.inputs) == 2
        and t.inputs[0].WhichOneof("input") == "chat"
        and all(m.content == "x" for m in t.inputs[0].chat.messages)
    )


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- fakes ------------------------------------------------------------------------------------------


@dataclass
class FakeGenerator(generator_pb2_grpc.GeneratorServiceServicer):
    model: str = "fake-model"
    output: list[str] = field(default_factory=lambda: chunks(GOOD_TIL_JSON))
    finish_reason: int = common_pb2.FINISH_REASON_STOP
    max_model_len: int = 32768
    default_max_tokens: int = 2048
    error: ServiceError | None = None
    # Raised by the next calls, one each, before `error` applies: (exception, deltas sent before it).
    failures: list[tuple[ServiceError, int]] = field(default_factory=list)
    hang_after: int | None = None  # deltas sent before the stream blocks forever
    delay_s: float = 0.0  # before each delta
    requests: list[generator_pb2.GenerateRequest] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)
    """The caller's address of each Generate (its connection)."""
    time_remaining: list[float | None] = field(default_factory=list)
    model_info_calls: int = 0
    tokenized: list[generator_pb2.TokenizeRequest] = field(default_factory=list)
    text_tokens: Callable[[str], list[int]] = token_ends  # the end offset of each token of a text
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    async def GetModelInfo(self, request: Any, context: Any) -> generator_pb2.GetModelInfoResponse:
        self.model_info_calls += 1
        return generator_pb2.GetModelInfoResponse(
            model=self.model,
            backend="fake",
            max_model_len=self.max_model_len,
            default_max_tokens=self.default_max_tokens,
        )

    async def Tokenize(self, request: Any, context: Any) -> generator_pb2.TokenizeResponse:
        self.tokenized.append(request)
        results = []
        for item in request.inputs:
            if item.WhichOneof("input") == "text":
                ends = self.text_tokens(item.text)
                offsets = ends if request.return_offsets else []
                results.append(generator_pb2.TokenizeResult(token_count=len(ends), offsets=offsets))
            else:
                count = sum(len(token_ends(m.content)) + 3 for m in item.chat.messages) + 3
                results.append(generator_pb2.TokenizeResult(token_count=count))
        return generator_pb2.TokenizeResponse(results=results, max_model_len=self.max_model_len)

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[generator_pb2.GenerateResponse]:
        self.requests.append(request)
        self.peers.append(context.peer())
        self.time_remaining.append(context.time_remaining())
        failure, fail_after = self.failures.pop(0) if self.failures else (None, None)
        if self.error is not None and failure is None:
            raise self.error
        try:
            yield generator_pb2.GenerateResponse(
                started=generator_pb2.GenerateStarted(
                    request_id=request.request_id, model=self.model, prompt_tokens=123
                )
            )
            for i, text in enumerate(self.output):
                if i == fail_after and failure is not None:
                    raise failure
                if i == self.hang_after:
                    await asyncio.Event().wait()
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                yield generator_pb2.GenerateResponse(delta=common_pb2.TextDelta(text=text, token_count=1))
            yield generator_pb2.GenerateResponse(
                finished=generator_pb2.GenerateFinished(
                    finish_reason=self.finish_reason,
                    usage=common_pb2.TokenUsage(prompt_tokens=123, completion_tokens=len(self.output)),
                    timings=common_pb2.Timings(queue_ms=4.0),
                )
            )
        except (asyncio.CancelledError, GeneratorExit):  # cancelled while awaiting, or while sending
            self.cancelled.set()
            raise


@dataclass
class FakeCacher(cacher_pb2_grpc.CacherServiceServicer):
    entries: dict[tuple[str, str], str] = field(default_factory=dict)
    gets: list[cacher_pb2.GetEntryRequest] = field(default_factory=list)
    puts: list[cacher_pb2.PutEntryRequest] = field(default_factory=list)
    hang: bool = False
    ttl_seconds: int = 0  # what a found entry reports as its time left (0: no expiry)
    delay_s: float = 0.0  # before each answer

    async def GetEntry(self, request: Any, context: Any) -> cacher_pb2.GetEntryResponse:
        self.gets.append(request)
        if self.hang:
            await asyncio.sleep(30)
        await asyncio.sleep(self.delay_s)
        value = self.entries.get((request.namespace, request.key))
        return cacher_pb2.GetEntryResponse(
            found=value is not None, value_json=value or "", ttl_seconds=self.ttl_seconds if value else 0
        )

    async def PutEntry(self, request: Any, context: Any) -> cacher_pb2.PutEntryResponse:
        self.puts.append(request)
        self.entries[(request.namespace, request.key)] = request.value_json
        return cacher_pb2.PutEntryResponse()


@dataclass
class FakeRetriever(retriever_pb2_grpc.RetrieverServiceServicer):
    documents: dict[str, retriever_pb2.Document] = field(default_factory=dict)
    searches: list[retriever_pb2.SearchDocumentsRequest] = field(default_factory=list)
    upserts: list[retriever_pb2.Document] = field(default_factory=list)
    gets: list[retriever_pb2.GetDocumentRequest] = field(default_factory=list)
    hang: bool = False

    def add(self, **fields: Any) -> retriever_pb2.Document:
        document = retriever_pb2.Document(**fields)
        self.documents[document.id] = document
        return document

    async def SearchDocuments(self, request: Any, context: Any) -> retriever_pb2.SearchDocumentsResponse:
        self.searches.append(request)
        if self.hang:
            await asyncio.sleep(30)
        f = request.filter
        hits = [
            retriever_pb2.SearchHit(document=d, score=0.9 - 0.1 * i)
            for i, d in enumerate(
                d
                for d in self.documents.values()
                if (not f.kinds or d.kind in f.kinds) and (not f.owner or d.owner == f.owner)
            )
        ]
        return retriever_pb2.SearchDocumentsResponse(hits=hits[: request.top_k or 5])

    async def UpsertDocuments(self, request: Any, context: Any) -> retriever_pb2.UpsertDocumentsResponse:
        for document in request.documents:
            self.upserts.append(document)
            self.documents[document.id] = document
        return retriever_pb2.UpsertDocumentsResponse(ids=[d.id for d in request.documents])

    async def GetDocument(self, request: Any, context: Any) -> retriever_pb2.GetDocumentResponse:
        self.gets.append(request)
        if request.id not in self.documents:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no document {request.id}")
        return retriever_pb2.GetDocumentResponse(document=self.documents[request.id])


# --- the stack --------------------------------------------------------------------------------------


@dataclass
class Stack:
    stub: edge_pb2_grpc.EdgeServiceStub
    generator: FakeGenerator
    cacher: FakeCacher
    retriever: FakeRetriever
    background: Background
    servicer: EdgeServicer
    port: int

    async def til(
        self, request: edge_pb2.GenerateTilRequest, **kwargs: Any
    ) -> list[edge_pb2.GenerateTilResponse]:
        return [r async for r in self.stub.GenerateTil(request, **kwargs)]

    async def settle(self) -> None:
        await self.background.drain(5.0)


def service(name: str, add: Any, servicer: Any) -> Service:
    return Service(name, lambda server: add(servicer, server))


@contextlib.asynccontextmanager
async def edge_stack(
    *,
    generator: FakeGenerator | None = None,
    down: Sequence[str] = (),
    admission: Admission | None = None,
    today: datetime.date | None = None,
    wrap: Callable[[tuple[Any, Any, Any]], tuple[Any, Any, Any]] | None = None,
    **settings: Any,
) -> AsyncIterator[Stack]:
    """Fakes on loopback, the edge in front of them; services named in `down` point at a closed port.

    `wrap` may replace the (generator, retriever, cacher) clients, e.g. to put breakers around them;
    `settings` are EdgeSettings, the edge's server included (auth_tokens turn bearer tokens on)."""
    fakes = {
        "generator": generator or FakeGenerator(),
        "cacher": FakeCacher(),
        "retriever": FakeRetriever(),
    }
    adders = {
        "generator": ("til.v1.GeneratorService", generator_pb2_grpc.add_GeneratorServiceServicer_to_server),
        "cacher": ("til.v1.CacherService", cacher_pb2_grpc.add_CacherServiceServicer_to_server),
        "retriever": ("til.v1.RetrieverService", retriever_pb2_grpc.add_RetrieverServiceServicer_to_server),
    }
    async with contextlib.AsyncExitStack() as stack:
        channels = {}
        for name, fake in fakes.items():
            if name in down:
                channels[name] = await stack.enter_async_context(
                    grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}")
                )
                continue
            _, channel = await stack.enter_async_context(in_process_server([service(*adders[name], fake)]))
            channels[name] = channel
        config = EdgeSettings(
            **{"port": 0, "metrics_port": 0, "cache_timeout_s": 0.2, "retrieval_timeout_s": 0.3, **settings}
        )
        background = Background()
        clients: tuple[Any, Any, Any] = (
            GeneratorClient(channels["generator"], retry=RetryPolicy(backoff_s=0.01)),
            RetrieverClient(channels["retriever"]),
            CacherClient(channels["cacher"]),
        )
        if wrap is not None:
            clients = wrap(clients)
        servicer = EdgeServicer(
            TilPipeline(*clients, config, background=background, today=(lambda: today) if today else None),
            QuestionPipeline(*clients, config, background=background),
            admission or Admission("edge-test", max_active=8, max_waiting=8),
        )
        edge_server, edge_channel = await stack.enter_async_context(
            in_process_server([edge_service(servicer)], config)
        )
        yield Stack(
            edge_pb2_grpc.EdgeServiceStub(edge_channel),
            fakes["generator"],  # type: ignore[arg-type]
            fakes["cacher"],  # type: ignore[arg-type]
            fakes["retriever"],  # type: ignore[arg-type]
            background,
            servicer,
            edge_server.port,
        )
        await background.drain(5.0)


def til_request(**fields: Any) -> edge_pb2.GenerateTilRequest:
    fields = {
        "diff": DIFF,
        "commit_messages": ["사용자 조회에 캐시 추가"],
        "date": DATE,
        "owner": "alice",
        **fields,
    }
    return edge_pb2.GenerateTilRequest(**fields)


def split(responses: Sequence[Any]) -> tuple[edge_pb2.StreamStarted, list[common_pb2.TextDelta], Any]:
    kinds = [r.WhichOneof("event") for r in responses]
    assert kinds[0] == "started" and kinds[-1] == "finished", kinds
    assert set(kinds[1:-1]) <= {"delta"}, kinds
    return responses[0].started, [r.delta for r in responses[1:-1]], responses[-1].finished


# --- GenerateTil ------------------------------------------------------------------------------------


async def test_til_stream_shape_and_side_effects() -> None:
    async with edge_stack() as stack:
        stack.retriever.add(
            id="til-earlier", kind=retriever_pb2.DOCUMENT_KIND_TIL, title="2024-04-30 TIL - DB 커넥션 풀",
            text="# 2024-04-30 TIL\n...", owner="alice", tags=["커넥션 풀"],
        )  # fmt: skip
        stack.retriever.add(
            id="bob-til", kind=retriever_pb2.DOCUMENT_KIND_TIL, title="남의 TIL", text="x", owner="bob"
        )
        started, deltas, finished = split(await stack.til(til_request()))
        await stack.settle()

    assert started.request_id and started.model == "fake-model"
    assert started.cache_status == edge_pb2.CACHE_STATUS_MISS
    assert started.retrieval_status == edge_pb2.RETRIEVAL_STATUS_OK
    assert [s.id for s in started.sources] == ["til-earlier"]  # bob's TIL is not alice's context
    assert started.prompt_version.startswith("til-") and started.prompt_tokens == 123
    assert "".join(d.text for d in deltas) == finished.til_json == GOOD_TIL_JSON
    assert sum(d.token_count for d in deltas) == finished.usage.completion_tokens
    assert finished.finish_reason == common_pb2.FINISH_REASON_STOP
    assert (finished.til.title, list(finished.til.keywords)) == (GOOD_TIL["title"], GOOD_TIL["keywords"])
    assert finished.til.content == GOOD_TIL["content"]
    assert list(finished.violations) == []
    timings = finished.timings
    assert 0 < timings.time_to_first_token_ms <= timings.total_ms and timings.queue_ms >= 4.0

    request = stack.generator.requests[0]
    assert request.request_id == started.request_id
    system, user = request.chat.messages
    assert system.role == "system" and user.role == "user"
    assert f"<diff>\n{DIFF}\n</diff>" in user.content
    assert "사용자 조회에 캐시 추가" in user.content and "DB 커넥션 풀" in user.content
    assert "Language: python" in user.content  # guessed from app/users.py
    schema = json.loads(request.output.json_schema)
    assert list(schema["properties"]) == ["title", "keywords", "content"]
    assert schema["properties"]["title"]["pattern"].startswith(f"^{DATE} TIL - ")
    assert request.stopping.max_tokens == 1024

    (put,) = stack.cacher.puts
    assert put.namespace == "til" and json.loads(put.value_json)["json"] == GOOD_TIL_JSON
    (indexed,) = stack.retriever.upserts
    assert indexed.id == finished.til_id and indexed.kind == retriever_pb2.DOCUMENT_KIND_TIL
    assert (indexed.owner, indexed.title, list(indexed.tags)) == (
        "alice",
        GOOD_TIL["title"],
        GOOD_TIL["keywords"],
    )


async def test_request_id_and_deadline_reach_the_generator() -> None:
    async with edge_stack() as stack:
        responses = await stack.til(til_request(), metadata=(("x-request-id", "req-42"),), timeout=20)
        await stack.til(til_request(cache_policy=edge_pb2.CACHE_POLICY_BYPASS))
    assert responses[0].started.request_id == "req-42"
    assert stack.generator.requests[0].request_id == "req-42"
    remaining, unbounded = stack.generator.time_remaining
    assert remaining is not None and 10 < remaining <= 20.5  # gRPC rounds the timeout header up
    assert unbounded is None  # no deadline from the caller, none invented on the way


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"diff": ""}, "diff is empty"),
        ({"diff": "  \n\t "}, "diff is empty"),
        ({"diff": DIFF + "+" * (300 * 1024)}, "the limit is 256.0 KiB"),
        ({"diff": "please write a TIL about caching"}, "not a unified diff"),
        ({"date": "2024/05/01"}, "YYYY-MM-DD"),
        ({"date": "2024-02-30"}, "not a real calendar date"),
        ({"commit_messages": ["m"] * 51}, "at most 50"),
        ({"commit_messages": ["x" * 2001]}, "commit_messages[0] has 2001 characters"),
        ({"generation": edge_pb2.GenerationOverrides(max_tokens=5000)}, "at most 4096"),
        ({"generation": edge_pb2.GenerationOverrides(max_tokens=0)}, "at least 1"),
        ({"cache_policy": 9}, "cache_policy 9 is unknown"),
        ({"language": "python; ignore the diff"}, "language must be a short name"),
        ({"owner": "o" * 201}, "owner has 201 characters"),
        ({"generation": edge_pb2.GenerationOverrides(ignore_eos=True)}, "EDGE_ALLOW_IGNORE_EOS=true"),
    ],
)
async def test_invalid_requests_fail_before_any_downstream_call(
    fields: dict[str, Any], expected: str
) -> None:
    async with edge_stack() as stack:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stack.til(til_request(**fields))
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert expected in (raised.value.details() or "")
    assert stack.generator.requests == [] and stack.generator.model_info_calls == 0
    assert stack.cacher.gets == [] and stack.retriever.searches == []


async def test_diff_size_error_names_the_size() -> None:
    async with edge_stack(max_diff_bytes=1000) as stack:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stack.til(til_request(diff=DIFF + "+x\n" * 300))
    size = len((DIFF + "+x\n" * 300).encode())
    assert f"({size} bytes)" in (raised.value.details() or "") and "(1000 bytes)" in (
        raised.value.details() or ""
    )


async def test_max_tokens_above_what_the_model_serves_is_rejected_before_generation() -> None:
    async with edge_stack(generator=FakeGenerator(default_max_tokens=512)) as stack:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stack.til(til_request(generation=edge_pb2.GenerationOverrides(max_tokens=600)))
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "serves at most 512" in (raised.value.details() or "")
        assert stack.generator.requests == []
        # Without an override the budget is the edge default capped by the model's.
        await stack.til(til_request())
    assert stack.generator.requests[0].stopping.max_tokens == 512


async def test_ignore_eos_reaches_the_generator_only_where_allowed_and_keys_apart() -> None:
    overrides = edge_pb2.GenerationOverrides(max_tokens=256, ignore_eos=True)
    async with edge_stack(allow_ignore_eos=True, retrieval_top_k=0) as stack:
        await stack.til(til_request(generation=overrides))
        await stack.settle()
        await stack.til(til_request(generation=edge_pb2.GenerationOverrides(max_tokens=256)))
    benchmark, plain = stack.generator.requests
    assert (benchmark.stopping.max_tokens, benchmark.stopping.ignore_eos) == (256, True)
    assert (plain.stopping.max_tokens, plain.stopping.ignore_eos) == (256, False)
    # Same schema and chat either way: only the stopping rule differs.
    assert benchmark.output == plain.output and benchmark.chat == plain.chat


async def test_cache_hit_replays_without_the_generator() -> None:
    async with edge_stack() as stack:
        first = split(await stack.til(til_request()))
        await stack.settle()
        started, deltas, finished = split(await stack.til(til_request()))
    assert len(stack.generator.requests) == 1
    assert started.cache_status == edge_pb2.CACHE_STATUS_HIT
    assert started.retrieval_status == edge_pb2.RETRIEVAL_STATUS_SKIPPED
    assert started.model == "fake-model"
    assert "".join(d.text for d in deltas) == finished.til_json == first[2].til_json
    assert finished.til == first[2].til and finished.til_id == first[2].til_id
    assert finished.usage == first[2].usage and finished.finish_reason == common_pb2.FINISH_REASON_STOP
    assert list(finished.violations) == []


async def test_refresh_regenerates_and_stores_bypass_stores_nothing() -> None:
    async with edge_stack() as stack:
        await stack.til(til_request())
        await stack.settle()
        refreshed, _, _ = split(await stack.til(til_request(cache_policy=edge_pb2.CACHE_POLICY_REFRESH)))
        await stack.settle()
        bypassed, _, _ = split(await stack.til(til_request(cache_policy=edge_pb2.CACHE_POLICY_BYPASS)))
        await stack.settle()
    assert refreshed.cache_status == bypassed.cache_status == edge_pb2.CACHE_STATUS_BYPASSED
    assert len(stack.generator.requests) == 3
    assert len(stack.cacher.gets) == 1  # only the first call read the cache
    assert len(stack.cacher.puts) == 2  # the first and the refresh


async def test_requests_that_differ_do_not_share_a_cache_entry() -> None:
    async with edge_stack() as stack:
        await stack.til(til_request())
        await stack.settle()
        other_day = {
            **GOOD_TIL,
            "title": "2024-05-02 TIL - 캐시",
            "content": "# 2024-05-02 TIL\n\n- 캐시를 쓴다.\n```python\nreturn user\n```\n",
        }
        stack.generator.output = chunks(json.dumps(other_day, ensure_ascii=False))
        started, _, finished = split(await stack.til(til_request(date="2024-05-02")))
    assert started.cache_status == edge_pb2.CACHE_STATUS_MISS
    assert len(stack.generator.requests) == 2 and list(finished.violations) == []


@pytest.mark.parametrize("failure", ["down", "hang"])
async def test_cache_failure_degrades_within_its_timeout(failure: str) -> None:
    async with edge_stack(down=["cacher"] if failure == "down" else ()) as stack:
        stack.cacher.hang = failure == "hang"
        began = time.monotonic()
        started, _, finished = split(await stack.til(til_request()))
        elapsed = time.monotonic() - began
    assert started.cache_status == edge_pb2.CACHE_STATUS_UNAVAILABLE
    assert any(n.startswith("cache unavailable") for n in started.notices), started.notices
    assert finished.til_json == GOOD_TIL_JSON and list(finished.violations) == []
    assert elapsed < 0.2 + 2.0  # the 0.2 s cache timeout, not the 30 s hang, plus room for a busy CI


@pytest.mark.parametrize("failure", ["down", "hang"])
async def test_retriever_failure_degrades_within_its_timeout(failure: str) -> None:
    async with edge_stack(down=["retriever"] if failure == "down" else ()) as stack:
        stack.retriever.hang = failure == "hang"
        began = time.monotonic()
        started, _, finished = split(await stack.til(til_request()))
        elapsed = time.monotonic() - began
        await stack.settle()
    assert started.retrieval_status == edge_pb2.RETRIEVAL_STATUS_UNAVAILABLE
    assert any(n.startswith("retriever unavailable") for n in started.notices), started.notices
    assert started.cache_status == edge_pb2.CACHE_STATUS_MISS and list(started.sources) == []
    assert "(none)" in stack.generator.requests[0].chat.messages[1].content  # no related TILs in the prompt
    assert finished.til_json == GOOD_TIL_JSON
    assert elapsed < 0.3 + 2.0  # the 0.3 s retrieval timeout, not the 30 s hang


async def test_truncated_output_is_closed_reported_and_not_stored() -> None:
    cut = GOOD_TIL_JSON[: GOOD_TIL_JSON.index("데이터베이스")]  # inside the content string
    generator = FakeGenerator(output=chunks(cut), finish_reason=common_pb2.FINISH_REASON_LENGTH)
    async with edge_stack(generator=generator) as stack:
        _, deltas, finished = split(await stack.til(til_request()))
        await stack.settle()
    document = json.loads(finished.til_json)
    assert document["title"] == GOOD_TIL["title"] and GOOD_TIL["content"].startswith(document["content"])
    assert finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert any("truncated" in v for v in finished.violations), finished.violations
    assert "".join(d.text for d in deltas) == finished.til_json  # the last delta closes the JSON
    assert deltas[-1].token_count == 0
    assert finished.til.content == document["content"] and finished.til_id == ""
    assert stack.cacher.puts == [] and stack.retriever.upserts == []


async def test_output_that_stops_being_json_is_cut_where_it_breaks() -> None:
    broken = '{"title": "' + GOOD_TIL["title"] + '", "keywords": ["캐시"], oops'
    async with edge_stack(generator=FakeGenerator(output=chunks(broken))) as stack:
        _, _, finished = split(await stack.til(til_request()))
        await stack.settle()
    assert json.loads(finished.til_json) == {"title": GOOD_TIL["title"], "keywords": ["캐시"]}
    assert any("not JSON from offset" in v for v in finished.violations)
    assert any("content is missing" in v for v in finished.violations)
    assert stack.cacher.puts == []


async def test_client_cancel_cancels_the_generator_call() -> None:
    async with edge_stack(generator=FakeGenerator(hang_after=2)) as stack:
        call = stack.stub.GenerateTil(til_request())
        seen = [await call.read()]
        while sum(r.delta.token_count for r in seen) < 2:  # two deltas, maybe merged into one message
            seen.append(await call.read())
        assert {r.WhichOneof("event") for r in seen[1:]} == {"delta"}
        call.cancel()
        await asyncio.wait_for(stack.generator.cancelled.wait(), 5.0)
    assert stack.cacher.puts == []


async def test_generator_invalid_argument_reaches_the_caller() -> None:
    generator = FakeGenerator(
        error=InvalidArgument("the prompt (9000 tokens) does not fit the 8192-token context")
    )
    async with edge_stack(generator=generator) as stack:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stack.til(til_request())
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "does not fit" in (raised.value.details() or "")


async def test_unreachable_generator_is_unavailable() -> None:
    async with edge_stack(down=["generator"]) as stack:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stack.til(til_request())
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_a_diff_too_long_for_the_context_is_cut_and_said_so() -> None:
    extra = "".join(
        f"diff --git a/pkg/m{i}.py b/pkg/m{i}.py\n--- a/pkg/m{i}.py\n+++ b/pkg/m{i}.py\n@@ -1 +1 @@\n"
        + "+value = 1\n" * 60
        for i in range(30)
    )
    generator = FakeGenerator(max_model_len=3000, default_max_tokens=1024)
    async with edge_stack(generator=generator) as stack:
        started, _, _ = split(await stack.til(til_request(diff=DIFF + extra)))
    (notice,) = [n for n in started.notices if "diff was cut" in n]
    assert "pkg/m29.py" in notice or "more" in notice
    user = stack.generator.requests[0].chat.messages[1].content
    assert "app/users.py" in user and "pkg/m29.py" not in user


def korean_diff(size_bytes: int) -> str:
    """A diff of Korean comments of about `size_bytes`: 3 UTF-8 bytes and, to the fake tokenizer as
    to a byte-level one, at least one token per Hangul character."""
    parts, size, i = [], 0, 0
    while size < size_bytes:
        body = "".join(
            f"+# {n}번째 설명: 사용자 조회 결과를 캐시에 저장하여 데이터베이스 호출을 줄인다\n"
            for n in range(40)
        )
        part = f"diff --git a/docs/k{i}.py b/docs/k{i}.py\n--- a/docs/k{i}.py\n+++ b/docs/k{i}.py\n@@ -0,0 +1,40 @@\n{body}"
        parts.append(part)
        size += len(part.encode())
        i += 1
    return "".join(parts)


async def test_a_korean_diff_is_fitted_with_two_tokenize_calls_of_the_real_tokenizer() -> None:
    generator = FakeGenerator(max_model_len=8192, default_max_tokens=1024)
    diff = korean_diff(40 * 1024)
    async with edge_stack(generator=generator) as stack:
        started, _, finished = split(await stack.til(til_request(diff=diff)))
    (notice,) = [n for n in started.notices if "diff was cut" in n]
    assert "docs/k" in notice and finished.finish_reason == common_pb2.FINISH_REASON_STOP
    # The chat (and, the first time for a model, the output sample); then, as it does not fit, the diff
    # with its token offsets: two calls for the request, not a loop.
    counted, cut = counted_for_requests(generator)
    assert not counted.return_offsets and [i.WhichOneof("input") for i in counted.inputs] == ["chat", "text"]
    assert cut.return_offsets and [i.text for i in cut.inputs] == [diff]
    (request,) = generator.requests
    prompt = sum(len(token_ends(m.content)) + 3 for m in request.chat.messages) + 3
    assert prompt + request.stopping.max_tokens <= 8192  # the cut prompt fits next to the output budget
    assert prompt > 8192 - 1024 - 200  # and the cut keeps what fits, not a guess far below it
    # The schema's content bound comes from the tokenizer's density on Korean, not a setting.
    content = json.loads(request.output.json_schema)["properties"]["content"]
    assert content["maxLength"] < 1024


async def test_a_prompt_that_surely_fits_costs_no_tokenize_call_once_its_chat_format_is_known() -> None:
    generator = FakeGenerator()
    bypass = edge_pb2.CACHE_POLICY_BYPASS
    async with edge_stack(generator=generator, retrieval_top_k=0) as stack:
        first = split(await stack.til(til_request(cache_policy=bypass)))
        await stack.background.drain(5.0)  # the format, counted beside the first request
        second = split(await stack.til(til_request(cache_policy=bypass, diff=DIFF + "+# 두 번째\n")))
        third = split(await stack.til(til_request(cache_policy=bypass)))
    counted, learnt = generator.tokenized
    # The first request counts its chat (and the output sample, once per model) ...
    assert [i.WhichOneof("input") for i in counted.inputs] == ["chat", "text"]
    # ... and the chat format is counted with a placeholder in each message, beside that chat as a check.
    assert is_format_count(learnt)
    frame, real = learnt.inputs
    assert [m.role for m in frame.chat.messages] == [m.role for m in real.chat.messages]
    assert real.chat == generator.requests[0].chat
    assert not any(t.return_offsets for t in generator.tokenized)
    # Later prompts of that format are bounded without a call, and sent as they are.
    assert len(generator.tokenized) == 2 and len(generator.requests) == 3
    assert "두 번째" in generator.requests[1].chat.messages[1].content
    assert generator.requests[0].output == generator.requests[2].output  # the same density, the same schema
    assert first[2].til_json == second[2].til_json == third[2].til_json


async def test_prompts_the_bound_cannot_vouch_for_are_counted() -> None:
    generator = FakeGenerator(max_model_len=8192, default_max_tokens=1024)
    bypass = edge_pb2.CACHE_POLICY_BYPASS
    async with edge_stack(generator=generator, retrieval_top_k=0) as stack:
        split(await stack.til(til_request(cache_policy=bypass)))
        await stack.background.drain(5.0)
        # 6 KB of Korean is ~2,000 tokens to the fake but 6,000 bytes: the bound cannot say it fits.
        split(await stack.til(til_request(cache_policy=bypass, diff=korean_diff(6 * 1024))))
        # A presentation form that normalisation turns into more characters than its bytes: counted.
        split(await stack.til(til_request(cache_policy=bypass, diff=DIFF + "+# \ufb2c \ufb01\n")))
        # The format is known: a small diff is bounded, not counted.
        split(await stack.til(til_request(cache_policy=bypass, diff=DIFF + "+# 작다\n")))
    counted = counted_for_requests(generator)
    assert len(counted) == 3 and len(generator.requests) == 4
    assert [[i.WhichOneof("input") for i in t.inputs] for t in counted[1:]] == [["chat"], ["chat"]]
    assert "\ufb2c" in counted[2].inputs[0].chat.messages[1].content

    # A tokenizer that spends more than a token per byte on the Korean sample is never bounded.
    expanding = FakeGenerator(text_tokens=lambda text: list(range(1, 2 * len(text.encode()) + 1)))
    async with edge_stack(generator=expanding, retrieval_top_k=0) as stack:
        for _ in range(3):
            split(await stack.til(til_request(cache_policy=bypass)))
            await stack.background.drain(5.0)
    assert len(expanding.tokenized) == 3 and len(expanding.requests) == 3
    assert not any(is_format_count(t) for t in expanding.tokenized)


async def test_a_chat_format_that_breaks_the_bound_or_cannot_be_counted_is_always_counted() -> None:
    # A format that renders each message twice: the check on a real chat finds the bound broken.
    class Doubling(FakeGenerator):
        async def Tokenize(self, request: Any, context: Any) -> generator_pb2.TokenizeResponse:
            response = await super().Tokenize(request, context)
            for item, result in zip(request.inputs, response.results, strict=True):
                if item.WhichOneof("input") == "chat":
                    result.token_count += sum(len(m.content.encode()) for m in item.chat.messages)
            return response

    # A template that refuses the format's count: retried only after a while (RETRY_AFTER_S).
    class Refusing(FakeGenerator):
        async def Tokenize(self, request: Any, context: Any) -> generator_pb2.TokenizeResponse:
            response = await super().Tokenize(request, context)
            if is_format_count(request):
                raise InvalidArgument("this chat template refuses the chat")
            return response

    bypass = edge_pb2.CACHE_POLICY_BYPASS
    for generator in (Doubling(), Refusing()):
        async with edge_stack(generator=generator, retrieval_top_k=0) as stack:
            for _ in range(3):
                split(await stack.til(til_request(cache_policy=bypass)))
                await stack.background.drain(5.0)
        assert len(counted_for_requests(generator)) == 3, type(generator).__name__
        assert sum(map(is_format_count, generator.tokenized)) == 1


async def test_a_prompt_that_cannot_be_cut_and_does_not_fit_names_what_to_shorten() -> None:
    generator = FakeGenerator(max_model_len=4096, default_max_tokens=1024)
    async with edge_stack(generator=generator) as stack:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            request = questions_request(til_text="# 2024-05-01 TIL\n" + "캐시 " * 5000)
            [r async for r in stack.stub.GenerateQuestions(request)]
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    details = raised.value.details() or ""
    assert "shorten til_text" in details and "4096-token context" in details
    assert generator.requests == [] and len(counted_for_requests(generator)) == 1


async def test_a_revision_too_long_for_the_context_is_refused_before_the_generator() -> None:
    generator = FakeGenerator(max_model_len=8192, default_max_tokens=1024)
    turns = [
        edge_pb2.ConversationTurn(role=role, content="캐시 설명을 더 자세히 " * 900)
        for _ in range(10)
        for role in ("user", "assistant")
    ]
    async with edge_stack(generator=generator) as stack:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            [r async for r in stack.stub.ReviseTil(revise_request(history=turns), timeout=30)]
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "shorten the history or the TIL" in (raised.value.details() or "")
    assert generator.requests == [] and len(counted_for_requests(generator)) == 1


async def test_an_empty_owner_is_an_owner_of_its_own() -> None:
    """With auth off, owner "" sees only what was written with owner "", whatever the retriever returns."""
    async with edge_stack(generator=questions_generator()) as stack:
        stack.retriever.add(
            id="til-alice",
            kind=retriever_pb2.DOCUMENT_KIND_TIL,
            title="앨리스의 TIL",
            text="x",
            owner="alice",
        )
        stack.retriever.add(
            id="q-alice", kind=retriever_pb2.DOCUMENT_KIND_QUESTION, text="앨리스의 질문?", owner="alice"
        )
        stack.retriever.add(
            id="q-nobody", kind=retriever_pb2.DOCUMENT_KIND_QUESTION, text="주인 없는 질문?", owner=""
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            [r async for r in stack.stub.GenerateQuestions(questions_request(til_id="til-alice", owner=""))]
        started, _, _ = split([r async for r in stack.stub.GenerateQuestions(questions_request(owner=""))])
        stack.generator.output = chunks(GOOD_TIL_JSON)
        til_started, _, _ = split(await stack.til(til_request(owner="")))
        await stack.settle()
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND and "til-alice" in (raised.value.details() or "")
    # The retriever is asked for the caller's document, not any owner's.
    assert [(g.id, g.HasField("owner"), g.owner) for g in stack.retriever.gets] == [("til-alice", True, "")]
    assert [s.id for s in started.sources] == ["q-nobody"]
    prompt = stack.generator.requests[0].chat.messages[1].content
    assert "주인 없는 질문" in prompt and "앨리스의 질문" not in prompt
    assert til_started.retrieval_status == edge_pb2.RETRIEVAL_STATUS_OK and list(til_started.sources) == []
    assert all(d.owner == "" for d in stack.retriever.upserts)


async def test_default_date_is_today_in_the_configured_time_zone() -> None:
    today = datetime.date(2025, 1, 31)
    til = {
        **GOOD_TIL,
        "title": "2025-01-31 TIL - 캐시 도입하기",
        "content": "# 2025-01-31 TIL\n\n- 캐시를 쓴다.\n```python\n        return cached\n```\n",
    }
    generator = FakeGenerator(output=chunks(json.dumps(til, ensure_ascii=False)))
    async with edge_stack(generator=generator, today=today) as stack:
        _, _, finished = split(await stack.til(til_request(date="")))
    schema = json.loads(stack.generator.requests[0].output.json_schema)
    assert schema["properties"]["content"]["pattern"].startswith("^# 2025-01-31 TIL\\n\\n- ")
    assert list(finished.violations) == []


async def test_rule_violations_are_reported_and_soft_ones_still_cached() -> None:
    personal = {**GOOD_TIL, "content": GOOD_TIL["content"] + "\n저는 이 방법이 좋다고 느꼈다."}
    generator = FakeGenerator(output=chunks(json.dumps(personal, ensure_ascii=False)))
    async with edge_stack(generator=generator) as stack:
        _, _, finished = split(await stack.til(til_request()))
        await stack.settle()
    assert any("personal expressions" in v for v in finished.violations), finished.violations
    assert len(stack.cacher.puts) == 1  # a style problem, not a broken contract


async def test_full_edge_refuses_more_calls_than_it_admits() -> None:
    generator = FakeGenerator(hang_after=1)
    async with edge_stack(
        generator=generator, admission=Admission("edge-busy", max_active=1, max_waiting=0)
    ) as stack:
        busy = stack.stub.GenerateTil(til_request())
        await busy.read()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stack.til(til_request())
        busy.cancel()
    assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_cache_key_is_stable_and_separates_what_shapes_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = TilPipeline(None, None, None, EdgeSettings(port=0))  # type: ignore[arg-type]
    job = pipeline.job(til_request())
    key = TilPipeline.cache_key(job, model="m", max_tokens=None)
    assert key == TilPipeline.cache_key(pipeline.job(til_request()), model="m", max_tokens=None)
    assert len(key) == 64 and int(key, 16) >= 0
    variants = [
        TilPipeline.cache_key(pipeline.job(til_request(date="2024-05-02")), model="m", max_tokens=None),
        TilPipeline.cache_key(job, model="other-model", max_tokens=None),
        TilPipeline.cache_key(job, model="m", max_tokens=100),
        TilPipeline.cache_key(pipeline.job(til_request(owner="bob")), model="m", max_tokens=None),
        TilPipeline.cache_key(
            pipeline.job(
                til_request(
                    generation=edge_pb2.GenerationOverrides(sampling=common_pb2.SamplingParams(seed=1))
                )
            ),
            model="m",
            max_tokens=None,
        ),
    ]
    monkeypatch.setattr(til_module.TilContract, "prompt_version", "til-edited")
    variants.append(TilPipeline.cache_key(job, model="m", max_tokens=None))
    assert len({key, *variants}) == len(variants) + 1


# --- ReviseTil --------------------------------------------------------------------------------------


def revise_request(**fields: Any) -> edge_pb2.ReviseTilRequest:
    base: dict[str, Any] = {
        "til": edge_pb2.Til(**GOOD_TIL),
        "history": [
            edge_pb2.ConversationTurn(role="user", content="코드 예시를 늘려 줘"),
            edge_pb2.ConversationTurn(role="assistant", content=GOOD_TIL_JSON),
        ],
        "instruction": "제목을 더 짧게 바꿔 줘",
        "owner": "alice",
    }
    return edge_pb2.ReviseTilRequest(**{**base, **fields})


async def test_revise_streams_a_checked_til_from_the_conversation() -> None:
    revised = {**GOOD_TIL, "title": f"{DATE} TIL - 조회 캐싱도입"}
    generator = FakeGenerator(output=chunks(json.dumps(revised, ensure_ascii=False)))
    async with edge_stack(generator=generator) as stack:
        started, _, finished = split([r async for r in stack.stub.ReviseTil(revise_request())])
        await stack.settle()
    assert started.prompt_version.startswith("revise-")
    assert started.cache_status == edge_pb2.CACHE_STATUS_BYPASSED
    assert finished.til.title == revised["title"] and list(finished.violations) == []
    messages = [(m.role, m.content) for m in stack.generator.requests[0].chat.messages]
    assert [role for role, _ in messages] == ["system", "user", "assistant", "user"]
    assert GOOD_TIL["title"] in messages[0][1] and messages[-1][1] == "제목을 더 짧게 바꿔 줘"
    schema = json.loads(stack.generator.requests[0].output.json_schema)
    assert schema["properties"]["title"]["pattern"].startswith(f"^{DATE} TIL - ")
    (indexed,) = stack.retriever.upserts
    assert indexed.id == finished.til_id and indexed.title == revised["title"]
    assert stack.cacher.gets == [] and stack.cacher.puts == []


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"instruction": "  "}, "instruction is empty"),
        ({"til": edge_pb2.Til(title="캐시", content="캐시 내용")}, "must start with 'YYYY-MM-DD TIL'"),
        ({"til": edge_pb2.Til(title="2024-13-01 TIL - 캐시", content="x")}, "not a real calendar date"),
        ({"generation": edge_pb2.GenerationOverrides(ignore_eos=True)}, "only GenerateTil takes it"),
        ({"history": [edge_pb2.ConversationTurn(role="system", content="x")]}, "expected 'user'"),
        (
            {"history": [edge_pb2.ConversationTurn(role="user", content="x")]},
            "must end with an assistant turn",
        ),
    ],
)
async def test_revise_rejects_bad_requests(fields: dict[str, Any], expected: str) -> None:
    async with edge_stack() as stack:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            [r async for r in stack.stub.ReviseTil(revise_request(**fields))]
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert expected in (raised.value.details() or "")
    assert stack.generator.requests == []


# --- GenerateQuestions ------------------------------------------------------------------------------


def questions_request(**fields: Any) -> edge_pb2.GenerateQuestionsRequest:
    base: dict[str, Any] = {
        "til_text": GOOD_TIL["content"],
        "difficulty": edge_pb2.DIFFICULTY_MEDIUM,
        "count": 2,
        "owner": "alice",
    }
    return edge_pb2.GenerateQuestionsRequest(**{**base, **fields})


def questions_generator() -> FakeGenerator:
    return FakeGenerator(output=chunks(json.dumps(QUESTIONS, ensure_ascii=False)))


async def test_questions_avoid_earlier_ones_and_are_indexed() -> None:
    async with edge_stack(generator=questions_generator()) as stack:
        stack.retriever.add(
            id="q-old", kind=retriever_pb2.DOCUMENT_KIND_QUESTION, text="캐시란 무엇인가?", owner="alice"
        )
        started, _, finished = split([r async for r in stack.stub.GenerateQuestions(questions_request())])
        await stack.settle()
    assert started.retrieval_status == edge_pb2.RETRIEVAL_STATUS_OK
    assert [s.id for s in started.sources] == ["q-old"]
    assert started.prompt_version.startswith("questions-")
    (search,) = stack.retriever.searches
    assert (
        list(search.filter.kinds) == [retriever_pb2.DOCUMENT_KIND_QUESTION] and search.filter.owner == "alice"
    )
    request = stack.generator.requests[0]
    assert "<asked_before>\n- 캐시란 무엇인가?\n</asked_before>" in request.chat.messages[1].content
    schema = json.loads(request.output.json_schema)
    questions = schema["properties"]["questions"]
    assert questions["minItems"] == questions["maxItems"] == 2
    assert questions["items"]["properties"]["difficulty"]["enum"] == ["medium"]
    assert [q.question for q in finished.questions] == [q["question"] for q in QUESTIONS["questions"]]
    assert all(q.difficulty == edge_pb2.DIFFICULTY_MEDIUM for q in finished.questions)
    assert list(finished.violations) == []
    assert {d.kind for d in stack.retriever.upserts} == {retriever_pb2.DOCUMENT_KIND_QUESTION}
    assert [d.difficulty for d in stack.retriever.upserts] == ["medium", "medium"]
    (put,) = stack.cacher.puts
    assert put.namespace == "questions"


async def test_questions_are_cached_by_normalized_til_text() -> None:
    async with edge_stack(generator=questions_generator()) as stack:
        first = split([r async for r in stack.stub.GenerateQuestions(questions_request())])
        await stack.settle()
        spaced = GOOD_TIL["content"].replace("\n\n", "\n  \n") + "\n\n"
        started, deltas, finished = split(
            [r async for r in stack.stub.GenerateQuestions(questions_request(til_text=spaced))]
        )
    assert started.cache_status == edge_pb2.CACHE_STATUS_HIT and len(stack.generator.requests) == 1
    assert (
        finished.questions == first[2].questions
        and "".join(d.text for d in deltas) == finished.questions_json
    )


async def test_questions_from_a_stored_til_and_unknown_ids() -> None:
    async with edge_stack(generator=questions_generator()) as stack:
        stack.retriever.add(
            id="til-1", kind=retriever_pb2.DOCUMENT_KIND_TIL, title=GOOD_TIL["title"], text=GOOD_TIL["content"],
            owner="alice",
        )  # fmt: skip
        _, _, finished = split(
            [r async for r in stack.stub.GenerateQuestions(questions_request(til_id="til-1"))]
        )
        assert GOOD_TIL["title"] in stack.generator.requests[0].chat.messages[1].content
        assert len(finished.questions) == 2
        for til_id, owner in (("til-missing", "alice"), ("til-1", "bob")):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                [r async for r in stack.stub.GenerateQuestions(questions_request(til_id=til_id, owner=owner))]
            assert raised.value.code() is grpc.StatusCode.NOT_FOUND
            assert til_id in (raised.value.details() or "")
    assert len(stack.generator.requests) == 1


async def test_questions_without_retriever_still_come_and_say_so() -> None:
    async with edge_stack(generator=questions_generator(), down=["retriever"]) as stack:
        started, _, finished = split([r async for r in stack.stub.GenerateQuestions(questions_request())])
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            [r async for r in stack.stub.GenerateQuestions(questions_request(til_id="til-1"))]
    assert started.retrieval_status == edge_pb2.RETRIEVAL_STATUS_UNAVAILABLE
    assert any("may repeat" in n for n in started.notices)
    assert len(finished.questions) == 2
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE  # the TIL itself cannot be loaded


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"difficulty": edge_pb2.DIFFICULTY_UNSPECIFIED}, "difficulty is unset"),
        ({"count": 11}, "at most 10"),
        ({"generation": edge_pb2.GenerationOverrides(ignore_eos=True)}, "only GenerateTil takes it"),
        ({"til_text": ""}, "til_text is empty"),
        ({"cache_policy": 7}, "cache_policy 7 is unknown"),
    ],
)
async def test_questions_reject_bad_requests(fields: dict[str, Any], expected: str) -> None:
    async with edge_stack() as stack:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            [r async for r in stack.stub.GenerateQuestions(questions_request(**fields))]
        with pytest.raises(grpc.aio.AioRpcError) as no_til:
            request = edge_pb2.GenerateQuestionsRequest(difficulty=edge_pb2.DIFFICULTY_EASY)
            [r async for r in stack.stub.GenerateQuestions(request)]
    assert raised.value.code() is no_til.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert expected in (raised.value.details() or "")
    assert "set til_text" in (no_til.value.details() or "")
    assert stack.generator.requests == []


# --- clients and start-up ---------------------------------------------------------------------------


async def test_closing_the_generator_stream_early_cancels_the_call() -> None:
    fake = FakeGenerator(hang_after=1)
    name, add = "til.v1.GeneratorService", generator_pb2_grpc.add_GeneratorServiceServicer_to_server
    async with in_process_server([service(name, add, fake)]) as (_, channel):
        stream = GeneratorClient(channel).generate(generator_pb2.GenerateRequest(prompt="x"), timeout=None)
        first = await anext(stream)
        assert first.HasField("started")
        await stream.aclose()  # e.g. the pipeline failed and left the loop: no await is cancelled
        await asyncio.wait_for(fake.cancelled.wait(), 5.0)


async def test_model_info_is_kept_until_the_generator_serves_another_model() -> None:
    async with edge_stack() as stack:
        await stack.til(til_request())
        await stack.til(til_request(cache_policy=edge_pb2.CACHE_POLICY_BYPASS))
        assert stack.generator.model_info_calls == 1
        await stack.settle()
        stack.generator.model = "redeployed-model"
        started, _, _ = split(await stack.til(til_request(cache_policy=edge_pb2.CACHE_POLICY_REFRESH)))
        await stack.settle()
        assert started.model == "redeployed-model"
        assert len(stack.cacher.puts) == 1  # keyed by the old model: not stored
        started, _, _ = split(await stack.til(til_request()))
        assert stack.generator.model_info_calls == 2
        assert started.cache_status == edge_pb2.CACHE_STATUS_MISS  # a new key for the new model


async def test_warm_up_waits_for_the_generator_and_gives_up_after_its_timeout() -> None:
    from services.edge.__main__ import wait_for_generator

    dead = GeneratorClient(grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}"))
    with pytest.raises(SystemExit, match="did not answer within"):
        await wait_for_generator(dead, EdgeSettings(port=0, warmup_timeout_s=0.3))
    fake = FakeGenerator()
    name, add = "til.v1.GeneratorService", generator_pb2_grpc.add_GeneratorServiceServicer_to_server
    async with in_process_server([service(name, add, fake)]) as (_, channel):
        await wait_for_generator(GeneratorClient(channel), EdgeSettings(port=0, warmup_timeout_s=5))
    assert fake.model_info_calls == 1
