"""A burst of requests through the vLLM engine's `prepare` on CPU: what a request waits before vLLM sees it.

    .venv/bin/python -m bench.prepare_burst [--tokenizer DIR] [--requests 100] [--rounds 3]

At 100 streams of equal length a closed loop sends 100 requests at once. Before a request reaches
vLLM, `VllmEngine.prepare` renders its chat and tokenizes it (the tokenizer thread) and readies its JSON
Schema (the schema thread: our checks, llguidance's validation). This drives the real `prepare` (vLLM's
own parameter check, which needs vLLM, left out) with the edge's real TIL requests (`bench.til_workload`:
chats of --prompt-tokens tokens, each with its own schema), all at once, and reports when each is ready:

- `one at a time`: each prompt encoded alone on the tokenizer thread (before PromptBatcher).
- `batched`: `PromptBatcher`, the requests waiting together encoded in one `encode_batch` call.
- `schema threads`: 1, then `vllm_engine.SCHEMA_THREADS` (GENERATOR_SCHEMA_WORKERS=0; the default now
  readies schemas in worker processes, bench.handler_reach measures what that is for).
Rows without a schema are the plain arms (C); with it, the TIL arms (C_til, D). The tokenizer
defaults to SmolLM2's, read from the packaged GGUF (the GPU benchmark's dummy model uses it). This
machine's other load disturbs the times; compare rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

from bench.grammar_steps import load_tokenizer, til_items
from services.generator.vllm_engine import SCHEMA_THREADS


def til_requests(tokenizer: Any, count: int, prompt_tokens: int, output_len: int) -> list[tuple[Any, Any]]:
    """(chat turns, JSON Schema) of `count` TIL requests as the edge sends them."""
    from services.generator.engine import ChatTurn

    tils = til_items(tokenizer, count, prompt_tokens, output_len, seed=5)
    assert len(tils) == count
    return [(tuple(ChatTurn(m["role"], m["content"]) for m in til.messages()), til.schema()) for til in tils]


async def burst(
    tokenizer: Any, requests: list[tuple[Any, Any]], *, batched: bool, schema: bool, schema_threads: int
) -> dict[str, Any]:
    from services.generator import vllm_inputs
    from services.generator.config import GeneratorSettings
    from services.generator.engine import EngineRequest
    from services.generator.vllm_engine import VllmEngine, _Loaded
    from services.generator.vllm_inputs import PromptBatcher

    engine = VllmEngine(GeneratorSettings(backend="vllm", model="bench", schema_workers=0))
    engine._loaded = _Loaded(
        llm=SimpleNamespace(shutdown=lambda: None), tokenizer=tokenizer, max_model_len=4096, model_defaults={}
    )  # type: ignore[arg-type]
    engine._sampling_params = lambda request, schema: None  # type: ignore[method-assign]  # vLLM's own check
    if not batched:
        engine._prompts = PromptBatcher(engine._tokenizer_thread, max_batch=1)
    engine._schema_thread.shutdown()
    engine._schema_thread = ThreadPoolExecutor(max_workers=schema_threads, thread_name_prefix="schema")
    vllm_inputs._CHATS.clear()
    vllm_inputs._prepared_schema.cache_clear()
    ready: list[float] = []
    started = time.perf_counter()

    async def one(i: int, turns: Any, json_schema: Any) -> None:
        request = EngineRequest(
            request_id=str(i),
            prompt=None,
            messages=turns,
            max_tokens=256,
            json_schema=json_schema if schema else None,
        )
        await engine.prepare(request)
        ready.append((time.perf_counter() - started) * 1000)

    await asyncio.gather(*(one(i, t, s) for i, (t, s) in enumerate(requests)))
    batches = list(engine._prompts.batches)
    await engine.close()
    return {
        "ready_ms_p50": round(statistics.median(ready), 1),
        "ready_ms_max": round(max(ready), 1),
        "tokenizer_calls": len(batches),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", help="Hugging Face tokenizer folder (default: the packaged SmolLM2's)")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--prompt-tokens", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    requests = til_requests(tokenizer, args.requests, args.prompt_tokens, 256)
    # (schema, batched tokenizing, schema threads): before this change 1 schema thread, one at a time.
    modes = [
        (False, False, 1),
        (False, True, 1),
        (True, False, 1),
        (True, True, 1),
        (True, True, SCHEMA_THREADS),
    ]
    rows: dict[tuple[bool, bool, int], list[dict[str, Any]]] = {}
    for _ in range(args.rounds):  # rows interleaved, so the machine's load falls on all of them
        for schema, batched, threads in modes:
            result = asyncio.run(
                burst(tokenizer, requests, batched=batched, schema=schema, schema_threads=threads)
            )
            rows.setdefault((schema, batched, threads), []).append(result)
    print(
        f"{args.requests} TIL requests at once, {args.prompt_tokens}-token chats; medians of {args.rounds} rounds\n"
    )
    print("| schema | tokenizing | schema threads | ready p50 ms | last ready ms | tokenizer calls |")
    print("|---|---|---|---|---|---|")
    for (schema, batched, threads), results in rows.items():
        p50 = statistics.median(r["ready_ms_p50"] for r in results)
        last = statistics.median(r["ready_ms_max"] for r in results)
        calls = statistics.median(r["tokenizer_calls"] for r in results)
        print(
            f"| {'TIL' if schema else 'none'} | {'batched' if batched else 'one at a time'} | "
            f"{threads if schema else '-'} | {p50:.1f} | {last:.1f} | {calls:.0f} |"
        )
    print(json.dumps({"rows": {f"{s}/{b}/{t}": r for (s, b, t), r in rows.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
