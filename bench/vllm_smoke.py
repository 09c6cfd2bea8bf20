"""GPU smoke test of `services.generator.vllm_engine.VllmEngine` on a real (small) model.

    PYTHONPATH=/tmp/site:. python3 -m bench.vllm_smoke \\
        --model /tmp/vkit_models/smollm2-135m-instruct-bf16 --out smoke.json

Checks: streamed chat text, a JSON-schema request that parses, cancellation (one and several
streams) freeing the engine within a second, a deadline ending a stream with TimeoutError,
PromptTooLong before any event, a bad schema as InvalidRequest, and token counts that add up.
Prints PASS/FAIL per check, writes them as JSON, and exits non-zero if any failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.serving import EngineSettings
from services.generator.engine import (
    ChatTurn,
    EngineDelta,
    EngineFinished,
    EngineLoad,
    EngineRequest,
    EngineStarted,
    InvalidRequest,
    PromptTooLong,
    Sampling,
)
from services.generator.vllm_engine import VllmEngine

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "keywords": {
            "type": "array",
            "items": {"type": "string", "maxLength": 20},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["title", "keywords"],
    "additionalProperties": False,
}


def chat(request_id: str, text: str, **fields: Any) -> EngineRequest:
    fields.setdefault("max_tokens", 64)
    fields.setdefault("sampling", Sampling(temperature=0.0))
    return EngineRequest(request_id=request_id, prompt=None, messages=(ChatTurn("user", text),), **fields)


async def collect(engine: VllmEngine, request: EngineRequest) -> tuple[list[Any], str]:
    events = [event async for event in engine.generate(request)]
    return events, "".join(e.text for e in events if isinstance(e, EngineDelta))


def check_shape(events: list[Any]) -> None:
    """Started first, Finished last, deltas between, and delta token counts adding up."""
    assert isinstance(events[0], EngineStarted), events[0]
    assert isinstance(events[-1], EngineFinished), events[-1]
    assert all(isinstance(e, EngineDelta) for e in events[1:-1])
    counted = sum(e.token_count for e in events[1:-1])
    finished = events[-1]
    # Tokens whose text is still held back at the end (a cut multi-byte character) carry no delta.
    assert 0 <= finished.completion_tokens - counted <= 1, (counted, finished.completion_tokens)


async def wait_idle(engine: VllmEngine, limit_s: float) -> float:
    started = time.monotonic()
    while engine.load() != EngineLoad(running=0, waiting=0):
        if time.monotonic() - started > limit_s:
            raise AssertionError(f"still {engine.load()} after {limit_s}s")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def engine_side_running(engine: VllmEngine) -> int:
    """Requests the scheduler itself reports running, read from a fresh engine step."""
    await collect(engine, chat("probe", "Hi", max_tokens=2))
    return engine.scheduler_counts.running  # the scheduler's count as of the probe's last step


async def run_checks(engine: VllmEngine) -> dict[str, Any]:
    results: dict[str, Any] = {}

    async def check(name: str, body: Callable[[], Awaitable[Any]]) -> None:
        started = time.monotonic()
        try:
            detail = await body()
            results[name] = {"ok": True, "detail": detail, "s": round(time.monotonic() - started, 3)}
            print(f"PASS {name}: {detail}", flush=True)
        except Exception as exc:
            results[name] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()

    async def stream_text() -> Any:
        request = chat("text", "What is the capital of France? Answer in one sentence.")
        t0 = time.monotonic()
        events, text = await collect(engine, request)
        check_shape(events)
        deltas = sum(isinstance(e, EngineDelta) for e in events)
        assert deltas >= 2 and text.strip(), (deltas, text)
        assert "Paris" in text, text
        return {"text": text, "deltas": deltas, "finished": events[-1].__dict__, "s": time.monotonic() - t0}

    async def json_schema() -> Any:
        request = chat(
            "json",
            "Write a TIL title and one to three keywords about Python asyncio, as JSON.",
            max_tokens=160,
            json_schema=SCHEMA,
        )
        events, text = await collect(engine, request)
        check_shape(events)
        document = json.loads(text)
        assert set(document) == {"title", "keywords"} and 1 <= len(document["keywords"]) <= 3, document
        return {"json": document, "finish": events[-1].finish_reason}

    async def korean() -> Any:
        events, text = await collect(
            engine, chat("ko", "오늘 배운 것을 한국어로 한 문장으로 써 주세요.", max_tokens=48)
        )
        check_shape(events)
        assert "\ufffd" not in text, text  # no torn multi-byte characters
        return {"text": text}

    async def cancel_one() -> Any:
        request = chat("cancel", "Count from one to one thousand.", max_tokens=1500, ignore_eos=True)
        seen = 0
        enough = asyncio.Event()

        async def consume() -> None:
            nonlocal seen
            async for event in engine.generate(request):
                if isinstance(event, EngineDelta):
                    seen += 1
                    if seen == 5:
                        enough.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(enough.wait(), 30)
        assert engine.load().running == 1, engine.load()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        idle_s = await wait_idle(engine, 1.0)
        running = await engine_side_running(engine)
        assert running <= 1, running  # only the probe itself
        return {"deltas_before_cancel": seen, "idle_after_s": round(idle_s, 4), "scheduler_running": running}

    async def cancel_many() -> Any:
        requests = [
            chat(f"many-{i}", "Tell a long story.", max_tokens=1500, ignore_eos=True) for i in range(16)
        ]
        tasks = [asyncio.create_task(collect(engine, r)) for r in requests]
        await asyncio.sleep(1.0)
        before = engine.load()
        assert before.running + before.waiting == 16, before
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        idle_s = await wait_idle(engine, 1.0)
        running = await engine_side_running(engine)
        assert running <= 1, running
        return {
            "load_before": before.__dict__,
            "idle_after_s": round(idle_s, 4),
            "scheduler_running": running,
        }

    async def deadline() -> Any:
        request = chat(
            "deadline",
            "Tell a long story.",
            # Fits the 2048-token context and takes seconds, so the 0.5 s deadline ends it.
            max_tokens=1500,
            ignore_eos=True,
            deadline=time.monotonic() + 0.5,
        )
        t0 = time.monotonic()
        deltas = 0
        try:
            async for event in engine.generate(request):
                deltas += isinstance(event, EngineDelta)
        except TimeoutError:
            elapsed = time.monotonic() - t0
            assert elapsed < 1.5, elapsed
            await wait_idle(engine, 1.0)
            return {"ended_after_s": round(elapsed, 3), "deltas": deltas}
        raise AssertionError(f"no TimeoutError ({deltas} deltas)")

    async def too_long() -> Any:
        limit = engine.info.max_model_len
        request = EngineRequest(request_id="long", prompt="hello " * limit, messages=None, max_tokens=16)
        events = []
        try:
            async for event in engine.generate(request):
                events.append(event)
        except PromptTooLong as exc:
            assert not events
            return str(exc)
        raise AssertionError("no PromptTooLong")

    async def bad_schema() -> Any:
        request = chat("bad", "x", json_schema={"type": "object", "properties": {"a": {"type": "nonsense"}}})
        try:
            await collect(engine, request)
        except InvalidRequest as exc:
            return str(exc)[:200]
        raise AssertionError("an invalid schema was accepted")

    async def concurrent() -> Any:
        requests = [chat(f"par-{i}", f"Name {i + 2} colours.", max_tokens=32) for i in range(16)]
        outcomes = await asyncio.gather(*(collect(engine, r) for r in requests))
        for events, _ in outcomes:
            check_shape(events)
        return {"streams": len(outcomes), "tokens": sum(e[-1].completion_tokens for e, _ in outcomes)}

    async def tokenize() -> Any:
        """Counts agree with what Generate evaluates; offsets cover the text in code points."""
        text = "캐시에 TTL을 적용했다. <|im_end|> def f(x): return x"
        turns = (ChatTurn("user", "What is the capital of France?"),)
        plain, chat_count = await engine.tokenize([text, turns], offsets=True)
        events, _ = await collect(engine, chat("tok", "What is the capital of France?", max_tokens=1))
        assert chat_count.count == events[0].prompt_tokens, (chat_count, events[0])
        assert plain.offsets is not None and len(plain.offsets) == plain.count
        assert list(plain.offsets) == sorted(plain.offsets) and plain.offsets[-1] == len(text), plain
        tokenizer = engine._require_loaded().tokenizer
        as_control = len(tokenizer.encode(text, add_special_tokens=False))
        assert plain.count > as_control, (plain.count, as_control)  # the marker counted as text
        pieces = [text[a:b] for a, b in zip((0, *plain.offsets[:-1]), plain.offsets, strict=True)]
        return {"count": plain.count, "chat": chat_count.count, "pieces": pieces[:12]}

    for name, body in [
        ("tokenize", tokenize),
        ("stream_text", stream_text),
        ("json_schema", json_schema),
        ("korean_utf8", korean),
        ("cancel_one", cancel_one),
        ("cancel_many", cancel_many),
        ("deadline", deadline),
        ("prompt_too_long", too_long),
        ("bad_schema", bad_schema),
        ("concurrent", concurrent),
    ]:
        await check(name, body)
    return results


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--bitmask-parallel-threshold",
        type=int,
        help="GENERATOR_STRUCTURED_OUTPUT_PARALLEL_THRESHOLD: start fails unless the plugin applies it",
    )
    parser.add_argument(
        "--bitmask-parallel-workers", type=int, help="GENERATOR_STRUCTURED_OUTPUT_PARALLEL_WORKERS"
    )
    args = parser.parse_args()
    settings = EngineSettings(
        model=args.model,
        model_id=Path(args.model).name,
        tokenizer=None,
        max_model_len=args.max_model_len,
        default_max_tokens=256,
        dtype="bfloat16",
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=1,
        quantization=None,
        max_num_seqs=64,
        enable_prefix_caching=True,
        seed=0,
        load_format="auto",
        trust_remote_code=False,
        structured_output_parallel_threshold=args.bitmask_parallel_threshold,
        structured_output_parallel_workers=args.bitmask_parallel_workers,
    )
    engine = VllmEngine(settings)
    t0 = time.monotonic()
    await engine.start()
    start_s = time.monotonic() - t0
    print(f"engine started and warmed up in {start_s:.1f}s; info: {engine.info}", flush=True)
    try:
        results = await run_checks(engine)
    finally:
        await engine.close()
    summary = {
        "model": args.model,
        "start_s": round(start_s, 1),
        "info": engine.info.__dict__,
        "checks": results,
        "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")},
    }
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1, ensure_ascii=False, default=str) + "\n")
    failed = [name for name, r in results.items() if not r["ok"]]
    print("SMOKE", "FAILED: " + ", ".join(failed) if failed else "PASSED", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
