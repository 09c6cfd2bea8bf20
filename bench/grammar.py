"""Grammar cost on llama.cpp: compile time and per-token mask time of llguidance for the TIL schemas.

    .venv/bin/python -m bench.grammar [--tokens 120] [--lines 2000]

Rows: the TIL schema without a diff; with examples/sample.diff (its code lines quoted); and a
content pattern that quotes any of N real code lines (taken from services/), as one flat
alternation and as the edge's trie. For each: compile (schema -> checked llguidance grammar ->
matcher, cold), the first mask (llguidance builds its lexer lazily), and the mask per generated
token while SmolLM2 writes up to --tokens tokens under the grammar (median and p90, microseconds).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import LogitsProcessorList

from services.edge.til_format import lines_alternation, regex_literal, til_schema
from services.generator.guidance import Grammars, TokenMask
from services.generator.json_grammar import json_schema_to_grammar
from services.generator.llama_model import load_llama
from services.generator.models import packaged_gguf

DATE = "2026-11-24"
ROOT = Path(__file__).resolve().parents[1]


def code_lines(n: int) -> list[str]:
    """N distinct, non-blank code lines from this repository's services/, as a diff would quote them."""
    seen: dict[str, None] = {}
    for path in sorted((ROOT / "services").rglob("*.py")):
        for line in path.read_text().splitlines():
            line = line.rstrip()
            if line.strip() and len(line) <= 200 and "\t" not in line:
                seen.setdefault(line, None)
    lines = list(seen)
    if len(lines) < n:
        raise SystemExit(f"only {len(lines)} distinct lines in services/")
    return lines[:n]


def quoting_schema(alternation: str) -> dict[str, Any]:
    content = f"^# {DATE} TIL\\n\\n- [^\\n.]{{1,80}}\\.\\n```python\\n(?:(?:{alternation})\\n){{1,12}}```\\n$"
    schema = til_schema(DATE)
    schema["properties"]["content"] = {"type": "string", "pattern": content}
    return schema


def measure(name: str, schema: dict[str, Any], llama: Any, prompt: list[int], tokens: int) -> None:
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    started = time.perf_counter()
    json_schema_to_grammar(schema)
    checked_ms = (time.perf_counter() - started) * 1000
    grammars = Grammars(vocab, cache_size=1)
    started = time.perf_counter()
    matcher = grammars.matcher(schema)
    compile_ms = (time.perf_counter() - started) * 1000
    mask = TokenMask(matcher, llama.n_vocab())
    started = time.perf_counter()
    mask.allowed()
    first_ms = (time.perf_counter() - started) * 1000

    mask = TokenMask(grammars.matcher(schema), llama.n_vocab())
    per_token: list[float] = []

    def timed(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        before = mask.mask_s
        out = mask(input_ids, scores)
        per_token.append((mask.mask_s - before) * 1e6)
        return out

    generated = llama.generate(
        prompt, temp=0.7, top_k=40, top_p=0.95, logits_processor=LogitsProcessorList([timed])
    )
    for produced, token in enumerate(generated):
        if llama_cpp.llama_vocab_is_eog(vocab, token) or produced >= tokens:
            break
    pattern = schema["properties"]["content"]["pattern"]
    p90 = statistics.quantiles(per_token, n=10)[-1] if len(per_token) >= 10 else max(per_token)
    print(
        f"| {name} | {len(pattern):,} | {checked_ms:.0f} | {compile_ms:.0f} | {first_ms:.1f} | "
        f"{len(per_token)} | {statistics.median(per_token):.0f} | {p90:.0f} | {max(per_token):.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=120)
    parser.add_argument("--lines", type=int, default=2000)
    args = parser.parse_args()

    llama = load_llama(model_path=str(packaged_gguf()), n_ctx=2048, n_threads=1, verbose=False)
    prompt = llama.tokenize(
        b"<|im_start|>user\nWrite today's TIL about this diff as JSON.<|im_end|>\n<|im_start|>assistant\n",
        add_bos=False,
        special=True,
    )
    diff = (ROOT / "examples" / "sample.diff").read_text()
    lines = code_lines(args.lines)
    flat = "|".join(regex_literal(line) for line in lines)
    rows = [
        ("TIL, no diff", til_schema(DATE)),
        ("TIL, examples/sample.diff", til_schema(DATE, diff=diff, language="python")),
        (f"{args.lines} lines, flat alternation", quoting_schema(flat)),
        (f"{args.lines} lines, trie (edge)", quoting_schema(lines_alternation(lines))),
    ]
    print(
        f"SmolLM2-135M-Instruct vocabulary ({llama.n_vocab()} tokens); masks over up to {args.tokens} generated tokens\n"
    )
    print(
        "| schema | content pattern chars | checks ms | compile ms | first mask ms | masks | median us | p90 us | max us |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, schema in rows:
        measure(name, schema, llama, prompt, args.tokens)
    llama.close()


if __name__ == "__main__":
    main()
