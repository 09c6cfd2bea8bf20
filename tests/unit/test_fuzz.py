"""Hypothesis throws random bytes and random-valued requests at every RPC of every service.

Bad input must come back as a clear status (INVALID_ARGUMENT, NOT_FOUND, ...), never as UNKNOWN or
INTERNAL, never hang, and never take a service down: health stays SERVING. The four servicers run
in-process on loopback behind the real interceptor: the edge in front of fake peers, the generator on
the fake engine, the retriever on an embedded Qdrant with a tiny hashing encoder, the cacher on a
dict. Redaction, which sees every diff, is fuzzed for crashes and for slow (backtracking) inputs.

Strategies reach the limits' edges: fields one past their size limits, deep and huge schemas, integer
extremes (max_tokens 2^31, 2^32-1), owners next to "alice", repeated fields far past their counts.
Requests per RPC and strategy: 50 by default, 1,000 with CI=true, or TILSERVE_FUZZ_EXAMPLES (the
"tilserve-fuzz" profile); `pytest -s` prints the calls and statuses per RPC.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import numpy as np
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from til.v1 import cacher_pb2, cacher_pb2_grpc, common_pb2, edge_pb2, generator_pb2, retriever_pb2

from services.cacher.config import CacherSettings
from services.cacher.servicer import CacherServicer
from services.cacher.store import CacheEntry
from services.common.admission import Admission
from services.common.redaction import redact
from services.common.server import Service
from services.generator.config import GeneratorSettings
from services.generator.fake_engine import FakeEngine
from services.generator.servicer import GenerationLimits, GeneratorServicer
from services.retriever.edge_store import EdgeStore
from services.retriever.index import HybridIndex
from services.retriever.lexical import LexicalEncoder
from services.retriever.servicer import RequestLimits, RetrieverServicer, retriever_service
from tests.conftest import in_process_server
from tests.unit.test_edge_service import (
    DATE,
    DIFF,
    GOOD_TIL_JSON,
    edge_stack,
    questions_request,
    revise_request,
    til_request,
)


def _examples() -> int:
    """Requests per RPC and strategy: TILSERVE_FUZZ_EXAMPLES if set, 1,000 under CI (CI=true), else 50.
    At 1,000 each RPC of the four services gets 1,000 random requests and 1,000 random byte strings."""
    if value := os.environ.get("TILSERVE_FUZZ_EXAMPLES", "").strip():
        return int(value)
    return 1000 if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes") else 50


EXAMPLES = _examples()
CALL_TIMEOUT_S = 10.0
# Statuses bad input may get. UNKNOWN and INTERNAL mean an unhandled error; DEADLINE_EXCEEDED a hang.
ACCEPTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}

# Small enough that random values cross every limit on what the retriever stores.
RETRIEVER_LIMITS = RequestLimits(
    max_text_chars=4_000,
    max_title_chars=40,
    max_field_chars=24,
    max_tags=3,
    max_attributes=3,
    max_attribute_chars=40,
)

SERVICES: dict[str, ServiceDescriptor] = {
    "edge": edge_pb2.DESCRIPTOR.services_by_name["EdgeService"],
    "generator": generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"],
    "retriever": retriever_pb2.DESCRIPTOR.services_by_name["RetrieverService"],
    "cacher": cacher_pb2.DESCRIPTOR.services_by_name["CacherService"],
}
RPCS = [(name, method) for name, service in SERVICES.items() for method in service.methods]


# --- backends ---------------------------------------------------------------------------------------


class DictStore:
    """`CacheStore` in a dict (the fuzz is about the servicer's checks, not Redis)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], str] = {}

    async def get(self, namespace: str, key: str) -> CacheEntry | None:
        value = self._entries.get((namespace, key))
        return None if value is None else CacheEntry(value, None)

    async def put(self, namespace: str, key: str, value_json: str, ttl_s: int) -> None:
        self._entries[(namespace, key)] = value_json

    async def delete(self, namespace: str, key: str) -> bool:
        return self._entries.pop((namespace, key), None) is not None

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


class HashEncoder:
    """A 16-dimensional unit vector per text, from its hash: no model to load."""

    name = "hash-16"

    def load(self) -> int:
        return 16

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for text in texts:
            digest = hashlib.sha256(text.encode("utf-8", "replace")).digest()
            row = np.frombuffer(digest[:16], dtype=np.uint8).astype(np.float32) + 1.0
            rows.append(row / np.linalg.norm(row))
        return np.stack(rows) if rows else np.zeros((0, 16), dtype=np.float32)


@contextlib.asynccontextmanager
async def fleet_servers(data_dir: Path) -> AsyncIterator[dict[str, int]]:
    """The four servicers on loopback; yields each one's port."""
    async with contextlib.AsyncExitStack() as stack:
        edge = await stack.enter_async_context(edge_stack())

        engine = FakeEngine(GeneratorSettings(backend="fake", fake_token_interval_s=0.0, max_model_len=4096))
        generator = GeneratorServicer(
            engine,
            GenerationLimits(default_max_tokens=64, max_tokens_limit=512),
            Admission("fuzz-generator", max_active=4, max_waiting=16),
        )
        generator_server, _ = await stack.enter_async_context(in_process_server([generator.service()]))

        index = HybridIndex(EdgeStore(data_dir / "shard"), HashEncoder(), LexicalEncoder())
        await index.start()
        stack.push_async_callback(index.close)
        retriever_server, _ = await stack.enter_async_context(
            in_process_server([retriever_service(RetrieverServicer(index, RETRIEVER_LIMITS))])
        )

        cacher = CacherServicer(DictStore(), CacherSettings(port=0, metrics_port=0))
        cacher_service = Service(
            SERVICES["cacher"].full_name,
            lambda server: cacher_pb2_grpc.add_CacherServiceServicer_to_server(cacher, server),
        )
        cacher_server, _ = await stack.enter_async_context(in_process_server([cacher_service]))
        yield {
            "edge": edge.port,
            "generator": generator_server.port,
            "retriever": retriever_server.port,
            "cacher": cacher_server.port,
        }


@pytest.fixture(scope="module")
def channels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, grpc.Channel]]:
    """Runs the servers on an event loop in a thread of their own, so Hypothesis can drive plain
    blocking stubs; yields a channel to each service."""
    ready: dict[str, Any] = {}
    started = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def serve() -> None:
        try:
            async with fleet_servers(tmp_path_factory.mktemp("fuzz")) as ports:
                ready["ports"] = ports
                started.set()
                await stop.wait()
        except BaseException as exc:
            ready["error"] = exc
            started.set()
            raise

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    assert started.wait(60), "the fuzz servers did not start"
    if "error" in ready:
        raise ready["error"]
    opened = {name: grpc.insecure_channel(f"127.0.0.1:{port}") for name, port in ready["ports"].items()}
    yield opened
    for channel in opened.values():
        channel.close()
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)


def call(channel: grpc.Channel, service: ServiceDescriptor, method: MethodDescriptor, data: bytes) -> Any:
    """Sends `data` as the request bytes; returns (status code, details), the stream read to its end."""
    path = f"/{service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            for _ in channel.unary_stream(path)(data, timeout=CALL_TIMEOUT_S):
                pass
        else:
            channel.unary_unary(path)(data, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def assert_serving(channels: dict[str, grpc.Channel]) -> None:
    for name, channel in channels.items():
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICES[name].full_name), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


# --- random requests from the protos ----------------------------------------------------------------

# Values that get past the first checks, so the fuzz reaches the code behind them.
INTERESTING_STRINGS = [
    "",
    " ",
    DIFF,
    DIFF + "\n+\x00\ud7a3\U0001f600",
    DATE,
    "2024-02-30",
    "til",
    "questions",
    "user",
    "assistant",
    "system",
    "alice",
    GOOD_TIL_JSON,
    '{"type": "object", "properties": {"a": {"type": "string", "pattern": "^x$"}}}',
    '{"type": "array", "minItems": 1000000000}',
    '{"$ref": "#"}',
    "[1, 2",
    "\ud7a3" * 3000,
    "til-" + "0" * 32,
]

# The issue-9 limits' edges: each limit's size plus one (owner 200, title 300, til_id 512, query 1,000,
# search text 2,000, instruction 4,000, til_text and turns 20,000, diff 256 KiB), a ReviseTil turn of
# 18k Hangul, deep and huge schemas, owners next to alice. Sent in any string field, one time in five.
HOSTILE_SCHEMAS = [
    '{"type": "array", "items": ' * 5000 + "{}" + "}" * 5000,
    json.dumps({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(10_000)}}),
    json.dumps({"enum": list(range(100_000))}),
    json.dumps({"type": "string", "pattern": "(" * 2000 + ")" * 2000}),
    json.dumps({"type": "string", "pattern": "(a|" * 300 + "b" + ")" * 300}),
    json.dumps({"type": "string", "pattern": "^(a{1,1000}){1,1000}$"}),
    json.dumps({"type": "string", "minLength": 16_000, "maxLength": 16_384}),
    json.dumps({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}),
    json.dumps({"anyOf": [{"type": "string", "pattern": f"^{i}"} for i in range(256)]}),
]
EDGE_STRINGS = [
    *("a" * n for n in (65, 201, 301, 513, 1_001, 2_001, 4_001, 20_001, 256 * 1024 + 1)),
    *("\ud7a3" * n for n in (201, 2_001, 18_000, 20_001)),
    *HOSTILE_SCHEMAS,
    "bob",
    "alice ",
    "ALICE",
    "alice\x00",
    "\uff41lice",
]
# Repeated fields far past their counts (50 commit messages, 20 turns, 64 chat messages and Tokenize
# inputs, 10 tags...), the element repeated; capped near 2 MB a list.
MANY = (11, 21, 51, 65, 257, 2_001)
# Integer extremes (max_tokens 2^31 and 2^32-1 among them).
INT32_EDGES = (-(2**31), -1, 0, 1, 2**31 - 1)
UINT32_EDGES = (0, 1, 2**31 - 1, 2**31, 2**32 - 1)
INT64_EDGES = (-(2**63), -(2**31), -1, 0, 2**31, 2**32 - 1, 2**63 - 1)


def _many(element: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    def repeat(pair: tuple[Any, int]) -> list[Any]:
        value, count = pair
        return [value] * max(1, min(count, 2_000_000 // max(1, len(repr(value)))))

    return st.tuples(element, st.sampled_from(MANY)).map(repeat)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        small = st.one_of(st.text(max_size=64), st.sampled_from(INTERESTING_STRINGS))
        return st.one_of(small, small, small, small, st.sampled_from(EDGE_STRINGS))
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, 12)  # known values and unknown ones (proto3 enums are open)
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.one_of(st.integers(0, 16), st.integers(0, 2**32 - 1), st.sampled_from(UINT32_EDGES))
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.one_of(st.integers(0, 16), st.integers(0, 2**64 - 1), st.sampled_from((2**64 - 1, 2**63)))
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from(INT64_EDGES))
    return st.one_of(st.integers(-2, 16), st.integers(-(2**31), 2**31 - 1), st.sampled_from(INT32_EDGES))


def message_values(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Field values for a message: any subset of its fields, each with a random value."""
    return st.fixed_dictionaries({}, optional=field_values(descriptor, depth))


def field_values(descriptor: Descriptor, depth: int = 0) -> dict[str, st.SearchStrategy[Any]]:
    """A strategy per field of a message (sub-messages three levels deep at most)."""
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            optional[field.name] = st.one_of(
                st.dictionaries(_scalar(key), _scalar(value), max_size=3),
                # Far past any count limit (the retriever's attributes).
                st.sampled_from((65, 1_001, 20_000)).map(lambda n: {f"k{i}": f"v{i}" for i in range(n)}),
            )
            continue
        if field.message_type is not None:
            if depth >= 3:
                continue
            value_strategy: st.SearchStrategy[Any] = message_values(field.message_type, depth + 1)
        else:
            value_strategy = _scalar(field)
        if field.is_repeated:
            value_strategy = st.one_of(st.lists(value_strategy, max_size=4), _many(value_strategy))
        optional[field.name] = value_strategy
    return optional


def fill(message: Any, values: dict[str, Any]) -> Any:
    """Sets `values` on `message`; a value the field cannot hold (a float32 overflow...) is skipped.
    Setting several members of a oneof leaves the last one set, as on the wire."""
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        with contextlib.suppress(ValueError, TypeError, OverflowError):
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                target.update(value)
            elif field.message_type is not None and field.is_repeated:
                for item in value:
                    fill(target.add(), item)
            elif field.message_type is not None:
                fill(target, value)
                target.SetInParent()
            elif field.is_repeated:
                target.extend(value)
            else:
                setattr(message, name, value)
    return message


# A valid request per RPC: mutating some of its fields reaches the code behind the first checks.
VALID: dict[str, Any] = {
    "GenerateTil": til_request(),
    "GenerateQuestions": questions_request(),
    "ReviseTil": revise_request(),
    "Generate": generator_pb2.GenerateRequest(
        chat=generator_pb2.ChatMessages(messages=[generator_pb2.ChatMessage(role="user", content="hi")]),
        stopping=common_pb2.StoppingCriteria(max_tokens=8),
    ),
    "Tokenize": generator_pb2.TokenizeRequest(
        inputs=[
            generator_pb2.TokenizeInput(text="def f():\n    return 1  # 캐시"),
            generator_pb2.TokenizeInput(
                chat=generator_pb2.ChatMessages(
                    messages=[generator_pb2.ChatMessage(role="user", content="hi")]
                )
            ),
        ],
        return_offsets=True,
    ),
    "UpsertDocuments": retriever_pb2.UpsertDocumentsRequest(
        documents=[retriever_pb2.Document(id="d1", kind=retriever_pb2.DOCUMENT_KIND_TIL, text="캐시 TTL")]
    ),
    "SearchDocuments": retriever_pb2.SearchDocumentsRequest(query="캐시", top_k=3),
    "GetDocument": retriever_pb2.GetDocumentRequest(id="d1"),
    "DeleteDocuments": retriever_pb2.DeleteDocumentsRequest(ids=["d1"]),
    "GetEntry": cacher_pb2.GetEntryRequest(namespace="til", key="k1"),
    "PutEntry": cacher_pb2.PutEntryRequest(namespace="til", key="k1", value_json='{"a": 1}'),
    "DeleteEntry": cacher_pb2.DeleteEntryRequest(namespace="til", key="k1"),
}


def request_bytes(method: MethodDescriptor) -> st.SearchStrategy[bytes]:
    """Requests built from nothing, valid requests with some fields replaced, and valid requests with
    one field replaced (which gets past the other fields' checks to the code behind them)."""
    cls = message_factory.GetMessageClass(method.input_type)
    base = VALID.get(method.name, cls())

    def mutated(values: dict[str, Any]) -> bytes:
        message = cls()
        message.CopyFrom(base)
        for name in values:
            message.ClearField(name)
        return fill(message, values).SerializeToString()

    values = message_values(method.input_type)
    one_field = [
        strategy.map(lambda value, name=name: {name: value})
        for name, strategy in field_values(method.input_type).items()
    ]
    return st.one_of(
        values.map(lambda v: fill(cls(), v).SerializeToString()),
        values.map(mutated),
        *(st.one_of(one_field).map(mutated) for _ in range(2 if one_field else 0)),
    )


# --- the tests --------------------------------------------------------------------------------------


# Calls made and statuses seen per RPC, printed at the end of the module (`pytest -s`).
SEEN: collections.Counter[tuple[str, str]] = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _print_statuses() -> Iterator[None]:
    yield
    for rpc in sorted({rpc for rpc, _ in SEEN}):
        codes = {code: n for (r, code), n in sorted(SEEN.items()) if r == rpc}
        print(f"[fuzz] {rpc}: {sum(codes.values())} calls {codes}")


def _check(channels: dict[str, grpc.Channel], name: str, method: MethodDescriptor, data: bytes) -> None:
    code, details = call(channels[name], SERVICES[name], method, data)
    SEEN[(f"{name}.{method.name}", code.name)] += 1
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and len(data) > 1024 * 1024:
        # The transport's own answer to a message above the server's max_message_bytes (1 MiB at the edge).
        assert "larger than max" in details, details
        return
    assert code in ACCEPTED, f"{SERVICES[name].full_name}/{method.name} -> {code.name}: {details}"


# A profile of its own (not loaded globally: other modules' Hypothesis tests keep their settings).
settings.register_profile(
    "tilserve-fuzz",
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_SETTINGS = settings(settings.get_profile("tilserve-fuzz"))


@pytest.mark.parametrize(("name", "method"), RPCS, ids=[f"{n}.{m.name}" for n, m in RPCS])
def test_random_bytes_get_a_clear_status(channels: dict[str, grpc.Channel], name: str, method: Any) -> None:
    @FUZZ_SETTINGS
    @given(st.binary(max_size=1024))
    def check(data: bytes) -> None:
        _check(channels, name, method, data)

    check()
    assert_serving(channels)


@pytest.mark.parametrize(("name", "method"), RPCS, ids=[f"{n}.{m.name}" for n, m in RPCS])
def test_random_requests_get_a_clear_status(
    channels: dict[str, grpc.Channel], name: str, method: Any
) -> None:
    @FUZZ_SETTINGS
    @given(request_bytes(method))
    def check(data: bytes) -> None:
        _check(channels, name, method, data)

    check()
    assert_serving(channels)


def _sized_text(limit: int) -> st.SearchStrategy[str]:
    """Strings at, under and over `limit` characters, Hangul and ASCII."""
    return st.integers(0, 2 * limit).flatmap(
        lambda n: st.sampled_from(["a", "\ud7a3", " "]).map(lambda c: c * n)
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    title=_sized_text(RETRIEVER_LIMITS.max_title_chars),
    owner=_sized_text(RETRIEVER_LIMITS.max_field_chars),
    tags=st.lists(_sized_text(RETRIEVER_LIMITS.max_field_chars), max_size=2 * RETRIEVER_LIMITS.max_tags),
    attributes=st.dictionaries(
        _sized_text(RETRIEVER_LIMITS.max_field_chars),
        _sized_text(RETRIEVER_LIMITS.max_attribute_chars),
        max_size=2 * RETRIEVER_LIMITS.max_attributes,
    ),
    text=st.one_of(st.just("캐시 TTL"), _sized_text(RETRIEVER_LIMITS.max_text_chars)),
)
def test_the_retriever_stores_only_documents_within_its_limits(
    channels: dict[str, grpc.Channel],
    title: str,
    owner: str,
    tags: list[str],
    attributes: dict[str, str],
    text: str,
) -> None:
    doc = retriever_pb2.Document(
        id="sized", kind=retriever_pb2.DOCUMENT_KIND_TIL, text=text, title=title, owner=owner, tags=tags,
        attributes=attributes,
    )  # fmt: skip
    limits = RETRIEVER_LIMITS
    within = (
        bool(text.strip())
        and len(text) <= limits.max_text_chars
        and len(title) <= limits.max_title_chars
        and len(owner) <= limits.max_field_chars
        and len(tags) <= limits.max_tags
        and all(len(t) <= limits.max_field_chars for t in tags)
        and len(attributes) <= limits.max_attributes
        and all(
            len(k) <= limits.max_field_chars and len(v) <= limits.max_attribute_chars
            for k, v in attributes.items()
        )
    )
    service = SERVICES["retriever"]
    request = retriever_pb2.UpsertDocumentsRequest(documents=[doc]).SerializeToString()
    code, details = call(channels["retriever"], service, service.methods_by_name["UpsertDocuments"], request)
    if within:
        assert code is grpc.StatusCode.OK, details
        got = retriever_pb2.GetDocumentRequest(id="sized", owner=owner).SerializeToString()
        assert (
            call(channels["retriever"], service, service.methods_by_name["GetDocument"], got)[0]
            is grpc.StatusCode.OK
        )
    else:
        assert code is grpc.StatusCode.INVALID_ARGUMENT, details
        assert "RETRIEVER_MAX_" in details or "is empty" in details, details


def test_an_error_that_quotes_a_huge_input_is_cut_to_fit_in_a_header(
    channels: dict[str, grpc.Channel],
) -> None:
    """Unquoted, 3000 Hangul characters take 27 KB percent-encoded: clients would drop the status."""
    request = cacher_pb2.GetEntryRequest(namespace="\ud7a3" * 3000, key="k")
    code, details = call(
        channels["cacher"],
        SERVICES["cacher"],
        SERVICES["cacher"].methods_by_name["GetEntry"],
        request.SerializeToString(),
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("namespace is") and details.endswith("…")
    assert len(quote(details.encode(), safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")) <= 4096


# --- the generator's schemas ----------------------------------------------------------------------

SCHEMA_KEYWORDS = [
    "type", "properties", "items", "enum", "const", "pattern", "minLength", "maxLength", "minItems",
    "maxItems", "required", "anyOf", "oneOf", "allOf", "$ref", "$defs", "additionalProperties", "format",
    "minimum", "maximum", "x-guidance",
]  # fmt: skip
_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["string", "object", "array", "integer", "number", "boolean", "null", "#", "#/$defs/a"]),
    # Regular-expression soup: anchors, groups, classes, quantifiers, escapes, lookarounds, Hangul.
    st.text(alphabet='ab^$.*+?()[]{}|\\-,0123456789dwsbBku<>=!:P가\n\t"', max_size=24),
)
_SCHEMA_LIKE = st.recursive(
    _LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(SCHEMA_KEYWORDS), st.text(max_size=6)), children, max_size=5
        ),
    ),
    max_leaves=40,
)
_SCHEMA_TEXTS = st.one_of(
    _SCHEMA_LIKE.map(json.dumps),
    _SCHEMA_LIKE.map(lambda v: json.dumps({"type": "object", "properties": {"a": v}})),
    st.sampled_from(HOSTILE_SCHEMAS),
    st.text(max_size=40),
)


@settings(
    max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(schema=_SCHEMA_TEXTS, max_tokens=st.integers(1, 2**32 - 1), tokenize=st.booleans())
def test_a_thousand_fuzzed_schemas_and_token_counts_get_clear_statuses(
    channels: dict[str, grpc.Channel], schema: str, max_tokens: int, tokenize: bool
) -> None:
    service = SERVICES["generator"]
    if tokenize:
        method = service.methods_by_name["Tokenize"]
        # Past the input-count limit only with small texts: 4 MB is the transport's own limit.
        count = 65 if len(schema) < 1000 and max_tokens % 5 == 0 else 1 + max_tokens % 4
        request: Any = generator_pb2.TokenizeRequest(
            inputs=[generator_pb2.TokenizeInput(text=schema)] * count, return_offsets=True
        )
    else:
        method = service.methods_by_name["Generate"]
        request = generator_pb2.GenerateRequest(
            prompt="Write JSON.",
            stopping=common_pb2.StoppingCriteria(
                max_tokens=max_tokens % 600 + 1 if max_tokens % 3 else max_tokens
            ),
            output=generator_pb2.OutputFormat(json_schema=schema),
        )
    started = time.perf_counter()
    code, details = call(channels["generator"], service, method, request.SerializeToString())
    assert code in ACCEPTED, f"{method.name} -> {code.name}: {details}"
    assert time.perf_counter() - started < 5.0


# --- redaction --------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from("aA0 =:'\"\n.-_/+@AKIASpasswordtokenghp_eyJ-----BEGIN KEY"), max_size=400
    )
)
def test_redaction_never_fails_and_is_idempotent(text: str) -> None:
    once = redact(text)
    assert redact(once.text).text == once.text
    assert len(once.kinds) == once.text.count("[REDACTED:")


ADVERSARIAL = [
    "a." * (128 * 1024),
    "a-" * (128 * 1024),
    "password" * (32 * 1024),
    "\n" * (256 * 1024),
    " \n" * (128 * 1024),
    "pwd" * (85 * 1024),
    "x://" + "a" * (256 * 1024),
    "://a:" * (50 * 1024),
    "Aws_key=" * (32 * 1024),
    "TOKEN=\n" * (36 * 1024),
    "-----BEGIN PRIVATE KEY-----" * 9000,
]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=[repr(t[:8]) for t in ADVERSARIAL])
def test_redaction_of_a_largest_diff_is_linear(text: str) -> None:
    """Inputs that make backtracking patterns quadratic: a 256 KiB diff must take well under a second."""
    began = time.perf_counter()
    redact(text)
    assert time.perf_counter() - began < 1.5
