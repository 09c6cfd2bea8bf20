"""The four services as real processes with a real redis-server: a TIL streams end to end, over grpcurl
too, and keeps streaming when Redis dies."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from til.v1 import common_pb2, edge_pb2, edge_pb2_grpc

from services.stack import SERVICE_NAMES

pytestmark = [pytest.mark.integration, pytest.mark.model]

SAMPLE_DIFF = (Path(__file__).resolve().parents[2] / "examples" / "sample.diff").read_text()
DATE = "2026-11-24"
GRPCURL = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(Path(sys.executable).parent))


@pytest.fixture(scope="module")
async def stack(stack_factory, redis_server):
    stack = stack_factory(cacher={"CACHER_REDIS_URL": redis_server.url})
    await stack.start(timeout_s=240)
    yield stack
    codes = stack.stop()
    assert codes == dict.fromkeys(codes, 0), f"a service did not exit cleanly on SIGTERM: {codes}"


async def collect(address: str, request: edge_pb2.GenerateTilRequest) -> list[edge_pb2.GenerateTilResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = edge_pb2_grpc.EdgeServiceStub(channel)
        return [message async for message in stub.GenerateTil(request, timeout=300)]


def check_til_stream(messages: list[edge_pb2.GenerateTilResponse]) -> edge_pb2.TilFinished:
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds[0] == "started" and kinds[-1] == "finished", kinds
    assert set(kinds[1:-1]) <= {"delta"}
    finished = messages[-1].finished
    streamed = "".join(m.delta.text for m in messages if m.WhichOneof("event") == "delta")
    document = json.loads(finished.til_json)  # the final text always parses
    assert set(document) == {"title", "keywords", "content"}
    assert finished.til.title == document["title"]
    assert finished.til.title.startswith(f"{DATE} TIL - ")
    assert finished.til.content.startswith(f"# {DATE} TIL")
    assert 1 <= len(finished.til.keywords) <= 3
    assert streamed, "no text was streamed"
    return finished


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (scripts/setup.sh installs it)")
def test_reflection_lists_each_service_on_its_port(stack) -> None:
    for name, proc in stack.processes.items():
        out = subprocess.run(
            [GRPCURL, "-plaintext", proc.address, "list"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        assert SERVICE_NAMES[name] in out, (name, out)
        assert "grpc.health.v1.Health" in out


async def test_til_streams_end_to_end_then_hits_the_cache(stack) -> None:
    # A small model does not always finish within its token budget, and only finished TILs are cached: try a few
    # seeds until one finishes (each attempt is a real generation through the four processes).
    for seed in (7, 8, 1, 2):
        request = edge_pb2.GenerateTilRequest(
            diff=SAMPLE_DIFF,
            commit_messages=["Cache answers in Redis with a TTL"],
            language="python",
            date=DATE,
            generation=edge_pb2.GenerationOverrides(sampling=common_pb2.SamplingParams(seed=seed)),
        )
        first = await collect(stack.address("edge"), request)
        started = first[0].started
        assert started.cache_status == edge_pb2.CACHE_STATUS_MISS
        assert started.retrieval_status == edge_pb2.RETRIEVAL_STATUS_OK
        finished = check_til_stream(first)
        assert finished.usage.completion_tokens > 0
        assert finished.timings.time_to_first_token_ms > 0
        if finished.finish_reason == common_pb2.FINISH_REASON_STOP:
            break
        assert any("truncated" in v for v in finished.violations)
        # A truncated TIL is never cached: the same request misses again.
        again = await collect(stack.address("edge"), request)
        assert again[0].started.cache_status == edge_pb2.CACHE_STATUS_MISS
    else:
        pytest.fail("no seed produced a finished TIL")

    second = await collect(stack.address("edge"), request)
    assert second[0].started.cache_status == edge_pb2.CACHE_STATUS_HIT
    assert second[-1].finished.til_json == finished.til_json
    assert "".join(m.delta.text for m in second if m.WhichOneof("event") == "delta") == finished.til_json


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (scripts/setup.sh installs it)")
def test_grpcurl_streams_a_til_from_json(stack) -> None:
    body = json.dumps(
        {
            "diff": SAMPLE_DIFF,
            "date": DATE,
            "cachePolicy": "CACHE_POLICY_BYPASS",
            "generation": {"maxTokens": 64},
        }
    )
    out = subprocess.run(
        [GRPCURL, "-plaintext", "-d", "@", stack.address("edge"), "til.v1.EdgeService/GenerateTil"],
        input=body,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    # grpcurl prints one JSON object per stream message.
    decoder, messages, i = json.JSONDecoder(), [], 0
    while i < len(out.strip()):
        message, i = decoder.raw_decode(out, i)
        messages.append(message)
        while i < len(out) and out[i].isspace():
            i += 1
    assert "started" in messages[0] and "finished" in messages[-1]
    finished = messages[-1]["finished"]
    # grpcurl prints the protos' own field names.
    document = json.loads(finished["til_json"])
    assert document["title"].startswith(f"{DATE} TIL - ")
    assert finished["finish_reason"] == "FINISH_REASON_LENGTH"  # 64 tokens cannot hold a whole TIL
    assert finished["violations"]


async def test_til_still_streams_after_redis_is_killed(stack, redis_server) -> None:
    redis_server.kill()
    request = edge_pb2.GenerateTilRequest(
        diff=SAMPLE_DIFF.replace("3600", "7200"),
        date=DATE,
        generation=edge_pb2.GenerationOverrides(max_tokens=96),
    )
    messages = await collect(stack.address("edge"), request)
    assert messages[0].started.cache_status == edge_pb2.CACHE_STATUS_UNAVAILABLE
    assert messages[0].started.notices
    json.loads(messages[-1].finished.til_json)
