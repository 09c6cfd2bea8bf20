"""End-to-end check of a running stack: a TIL for a real diff through the edge, and a JSON-schema
request straight to the generator, each parsed and checked against its rules.

    python -m bench.til_check --edge-addr 127.0.0.1:50051 --generator-addr 127.0.0.1:50052 \\
        --diff examples/sample.diff --out til_check.json

Exits non-zero unless the TIL's JSON parses and breaks no rule the schema enforces (running out of
tokens aside, which the result reports), and the generator's JSON parses and has the schema's keys.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from til.v1 import common_pb2, edge_pb2, edge_pb2_grpc, generator_pb2, generator_pb2_grpc

from services.edge.til_format import check_til

# Escapes, a pattern and bounds: what xgrammar used to get wrong.
GENERATOR_SCHEMA = {
    "type": "object",
    "properties": {
        "summary": {"type": "string", "pattern": "^Summary:\\n", "maxLength": 400},
        "files": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
    },
    "required": ["summary", "files"],
    "additionalProperties": False,
}


async def til_through_edge(addr: str, diff: str, max_tokens: int) -> dict[str, Any]:
    date = dt.date.today().isoformat()
    request = edge_pb2.GenerateTilRequest(
        diff=diff,
        commit_messages=["Cache answers in Redis with a TTL"],
        date=date,
        generation=edge_pb2.GenerationOverrides(max_tokens=max_tokens),
        cache_policy=edge_pb2.CACHE_POLICY_BYPASS,
    )
    streamed, started, finished = [], None, None
    t0 = time.monotonic()
    first_text_s = None
    async with grpc.aio.insecure_channel(addr) as channel:
        async for message in edge_pb2_grpc.EdgeServiceStub(channel).GenerateTil(request, timeout=300):
            kind = message.WhichOneof("event")
            if kind == "started":
                started = message.started
            elif kind == "delta":
                first_text_s = first_text_s or time.monotonic() - t0
                streamed.append(message.delta.text)
            else:
                finished = message.finished
    assert started is not None and finished is not None, "the stream lacked started or finished"
    document = json.loads(finished.til_json)
    truncated = finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
    broken = check_til(document, date=date, truncated=truncated)
    enforced = [v.message for v in broken if v.enforced and not v.message.startswith("truncated")]
    return {
        "ok": not enforced and "".join(streamed) != "",
        "model": started.model,
        "notices": list(started.notices),
        "prompt_tokens": started.prompt_tokens,
        "deltas": len(streamed),
        "first_text_s": round(first_text_s or 0.0, 3),
        "total_s": round(time.monotonic() - t0, 3),
        "finish_reason": common_pb2.FinishReason.Name(finished.finish_reason),
        "usage": {"prompt": finished.usage.prompt_tokens, "completion": finished.usage.completion_tokens},
        "enforced_violations": enforced,
        "other_violations": [v.message for v in broken if v not in enforced and not v.enforced],
        "til": document,
    }


async def json_from_generator(addr: str) -> dict[str, Any]:
    request = generator_pb2.GenerateRequest(
        chat=generator_pb2.ChatMessages(
            messages=[
                generator_pb2.ChatMessage(
                    role="user",
                    content="Summarize this change as JSON: a summary starting with 'Summary:' and a "
                    "new line, and the changed files. The change: app/cache.py now caches answers in "
                    'Redis with a TTL; tests/test_cache.py tests it. Quote "TTL" in the summary.',
                )
            ]
        ),
        stopping=common_pb2.StoppingCriteria(max_tokens=300),
        output=generator_pb2.OutputFormat(json_schema=json.dumps(GENERATOR_SCHEMA)),
    )
    text, finished = "", None
    async with grpc.aio.insecure_channel(addr) as channel:
        async for message in generator_pb2_grpc.GeneratorServiceStub(channel).Generate(request, timeout=120):
            if message.WhichOneof("event") == "delta":
                text += message.delta.text
            elif message.WhichOneof("event") == "finished":
                finished = message.finished
    assert finished is not None
    result: dict[str, Any] = {
        "text": text,
        "finish_reason": common_pb2.FinishReason.Name(finished.finish_reason),
    }
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        return {**result, "ok": False, "error": str(exc)}
    summary = document.get("summary", "")
    ok = (
        set(document) == {"summary", "files"}
        and summary.startswith("Summary:\n")
        and len(summary) <= 400
        and 1 <= len(document["files"]) <= 3
    )
    return {**result, "ok": ok, "json": document}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, check in (
        ("til_through_edge", til_through_edge(args.edge_addr, args.diff.read_text(), args.max_tokens)),
        ("json_from_generator", json_from_generator(args.generator_addr)),
    ):
        try:
            results[name] = await check
        except Exception as exc:
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(
            name,
            "PASS" if results[name]["ok"] else "FAIL",
            json.dumps(results[name], ensure_ascii=False)[:1500],
        )
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edge-addr", default="127.0.0.1:50051")
    p.add_argument("--generator-addr", default="127.0.0.1:50052")
    p.add_argument("--diff", type=Path, default=Path("examples/sample.diff"))
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    results = asyncio.run(run(args))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
