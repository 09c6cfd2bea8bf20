"""What the per-request TIL grammar costs: schema build on the edge, the generator's grammar build (schema ->
checked llguidance grammar, `json_schema_to_grammar`), and (with --tokens N) the generator's time to first
token and per token with and without it, on the packaged model through the llama.cpp engine.

    python -m bench.quality.grammar_cost --tokens 64 --out bench/results/quality/grammar_cost.json

Rows: every corpus diff plus synthetic 5,000- and 20,000-line diffs. Build times are cold (the layout
cache cleared) and warm (the same request again).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.quality.run import load_corpus
from services.edge.diffs import quotable_lines
from services.edge.til_format import _cached_layout, _quotable, til_schema


def synthetic(lines: int) -> str:
    body = "".join(f"+    value_{i} = compute(item_{i}, 'k{i % 7}')  # step {i}\n" for i in range(lines))
    return f"diff --git a/m.py b/m.py\n--- a/m.py\n+++ b/m.py\n@@ -0,0 +1,{lines} @@\n{body}"


def build_costs(diffs: list[tuple[str, str]], budget: int) -> list[dict[str, Any]]:
    from services.generator.json_grammar import json_schema_to_grammar

    rows = []
    for name, diff in diffs:
        _cached_layout.cache_clear()
        _quotable.cache_clear()
        t0 = time.perf_counter()
        schema = til_schema("2026-11-29", budget, diff=diff)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        til_schema("2026-11-29", budget, diff=diff)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        grammar = json_schema_to_grammar(schema)
        gbnf = time.perf_counter() - t0
        rows.append(
            {
                "diff": name,
                "diff_lines": diff.count("\n"),
                "quotable_lines": len(quotable_lines(diff)),
                "content_pattern_chars": len(schema["properties"]["content"]["pattern"]),
                "schema_build_ms_cold": round(cold * 1000, 2),
                "schema_build_ms_warm": round(warm * 1000, 3),
                "generator_grammar_ms": round(gbnf * 1000, 1),
                "generator_grammar_chars": len(grammar),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def token_costs(diff: str, budget: int, tokens: int, threads: int) -> dict[str, Any]:
    """Seconds per token on the packaged model through the generator's llama.cpp engine, with the TIL
    schema for `diff` and with none; the prompt is the same short one (prefix-cached after the first)."""
    import asyncio

    from services.generator.config import GeneratorSettings
    from services.generator.engine import EngineDelta, EngineFinished, EngineRequest, Sampling
    from services.generator.llama_cpp_engine import LlamaCppEngine

    schema = til_schema("2026-11-29", budget, diff=diff)

    async def run() -> dict[str, Any]:
        engine = LlamaCppEngine(GeneratorSettings(max_model_len=4096, n_threads=threads))
        await engine.start()
        out: dict[str, Any] = {"model": engine.info.model, "engine_settings": engine.info.engine_settings}
        try:
            for label, json_schema in (("none", None), ("til", schema), ("none", None), ("til", schema)):
                request = EngineRequest(
                    request_id=label,
                    prompt="Write a Korean TIL as JSON for this change:\n" + diff[:1500],
                    messages=None,
                    max_tokens=tokens,
                    sampling=Sampling(temperature=0.0),
                    ignore_eos=True,
                    json_schema=json_schema,
                )
                stamps: list[float] = []
                count = 0
                t0 = time.perf_counter()
                async for event in engine.generate(request):
                    if isinstance(event, EngineDelta):
                        stamps.append(time.perf_counter())
                        count += event.token_count
                    elif isinstance(event, EngineFinished):
                        count = event.completion_tokens
                first = stamps[0] - t0 if stamps else 0.0
                per_token = (stamps[-1] - stamps[0]) / max(count - 1, 1) if len(stamps) > 1 else 0.0
                out[label] = {
                    "tokens": count,
                    "first_token_s": round(first, 3),
                    "s_per_token": round(per_token, 4),
                }
        finally:
            await engine.close()
        return out

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", type=int, default=627, help="content characters (627: 1024 tokens)")
    parser.add_argument("--tokens", type=int, default=0, help="also time N tokens per engine run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    corpus = load_corpus(Path(__file__).with_name("corpus.jsonl.gz"), None)
    diffs = [(row["id"], row["diff"]) for row in corpus] + [
        ("synthetic-5000", synthetic(5000)),
        ("synthetic-20000", synthetic(20000)),
    ]
    rows = build_costs(diffs, args.budget)
    corpus_rows = rows[: len(corpus)]
    result: dict[str, Any] = {
        "budget_chars": args.budget,
        "corpus_median": {
            key: statistics.median(r[key] for r in corpus_rows)
            for key in (
                "schema_build_ms_cold",
                "schema_build_ms_warm",
                "generator_grammar_ms",
                "content_pattern_chars",
            )
        },
        "rows": rows,
    }
    if args.tokens:
        result["per_token"] = {
            name: token_costs(diff, args.budget, args.tokens, args.threads)
            for name, diff in (diffs[0], diffs[-2])
        }
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
