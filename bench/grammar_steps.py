"""Per-step CPU cost of structured output in vLLM's engine core, measured on CPU.

    .venv/bin/python -m bench.grammar_steps --tokenizer DIR [--streams 100] [--steps 256] [--out FILE]

DIR is a Hugging Face tokenizer folder; by default SmolLM2's, read from the packaged GGUF (the GPU
benchmark's dummy model, the kit's `llama3-8b-shape-smollm2-tok-dummy`, uses the same tokenizer). What vLLM 0.25's `guidance` backend does, call for call
(`vllm/v1/structured_output/backend_guidance.py`, `__init__.py`, the scheduler's `update_from_output`):
an `LLTokenizer` from the HF tokenizer (`llguidance.hf.from_tokenizer`, vocabulary `max(config vocab,
len(tokenizer))`), one `LLMatcher` per request from `grammar_from_json_schema(schema,
whitespace_flexible=False)`; each step, the grammar bitmask of every structured request
(`fill_next_token_bitmask` into one shared int32 tensor, or all ones once the request is terminated),
then, after sampling, `accept_tokens` for each request (`consume_tokens`, `is_stopped`, `get_error`).

The requests are the edge's real TIL requests (`bench.til_workload`: the edge's own pipeline builds the
chat and the schema with its content budget for diffs sized to --prompt-tokens), as the GPU arms send
them. The dummy model's greedy pick over random logits is a random allowed token here (seeded per
stream); once the grammar stops, end-of-sequence, which terminates it, then anything (ignore_eos). The
first strategy records each stream's tokens and every other one replays them, so each row does exactly
the same work and the same tokens must be accepted by every grammar formulation.

Rows (fill strategies; accept is vLLM's serial loop unless named):
- `serial`: vLLM's loop when a step holds no more than `fill_bitmask_parallel_threshold` structured requests.
- `threads W x B`: vLLM's parallel path as tilserve's plugin configures it (W threads, B requests a task).
- `plugin llguidance fill`: tilserve's plugin with `TILSERVE_VLLM_BITMASK_FILL=llguidance`
  (`vllm_plugin.fill_with_llguidance`): one `LLExecutor` call for the step's batch (llguidance's own
  Rust thread pool, no Python per request, the GIL released once).
Times are wall-clock per engine step over the steps where at least one grammar was still open, and per
call; this machine's other load disturbs them (say so beside any figure).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

FillStrategy = Callable[[list["Stream"], Any], None]


def load_tokenizer(path: str | None) -> Any:
    """A Hugging Face tokenizer folder, or SmolLM2's read from the packaged GGUF (needs `gguf`)."""
    from transformers import AutoTokenizer

    if path:
        return AutoTokenizer.from_pretrained(path)
    from services.generator.models import packaged_gguf

    gguf = packaged_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def til_items(tokenizer: Any, count: int, prompt_tokens: int, output_len: int, *, seed: int) -> list[Any]:
    """The edge's own TIL requests (bench.til_workload's `item.til`) for `count` diffs sized to
    `prompt_tokens`, built by the edge's code against a stand-in generator."""
    from til.v1 import generator_pb2

    from bench.prompts import PromptFactory
    from bench.til_workload import TilWorkload, edge_settings

    info = generator_pb2.GetModelInfoResponse(
        model="bench", backend="vllm", max_model_len=4096, default_max_tokens=output_len
    )

    async def make() -> list[Any]:
        workload = TilWorkload(
            tokenizer,
            PromptFactory(tokenizer, seed=seed),
            target_tokens=prompt_tokens,
            output_len=output_len,
            info=info,
            settings=edge_settings(),
        )
        items = [await workload.item(i) for i in range(count)]
        return [item.til for item in items if item.til is not None]

    return asyncio.run(make())


def til_schemas(tokenizer: Any, count: int, prompt_tokens: int, output_len: int) -> list[dict[str, Any]]:
    """The JSON Schemas the generator hands vLLM for `count` TIL requests, built by the edge's own code."""
    tils = til_items(tokenizer, count, prompt_tokens, output_len, seed=2)
    return [json.loads(til.prepared_schema) for til in tils]


def vllm_grammar(schema: dict[str, Any]) -> str:
    """What vLLM 0.25's guidance backend compiles for a `json` request (disable_any_whitespace on)."""
    from llguidance import LLMatcher

    return str(LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False}))


@dataclass
class Stream:
    """One structured request in the engine core: vLLM's GuidanceGrammar where the fill and the
    scheduler touch it (`ll_matcher`, `is_terminated`, `check_error`), and the dummy model's tokens."""

    ll_matcher: Any
    rng: np.random.Generator
    script: list[int] | None = None  # tokens to replay instead of choosing
    tokens: list[int] = field(default_factory=list)
    terminated: bool = False

    @property
    def matcher(self) -> Any:
        return self.ll_matcher

    def is_terminated(self) -> bool:
        return self.terminated

    def check_error(self) -> None:
        self.ll_matcher.get_error()


def fill_serial(streams: list[Stream], bitmask: Any) -> None:
    import llguidance.torch

    for i, stream in enumerate(streams):
        if stream.terminated:
            bitmask[i].fill_(-1)
        else:
            llguidance.torch.fill_next_token_bitmask(stream.matcher, bitmask, i)
            stream.matcher.get_error()  # GuidanceGrammar.check_error


def fill_threads(workers: int, batch_size: int) -> tuple[FillStrategy, Callable[[], None]]:
    """vLLM's parallel path: tasks of `batch_size` requests on a pool of `workers` threads."""
    pool = ThreadPoolExecutor(max_workers=workers)

    def fill(streams: list[Stream], bitmask: Any) -> None:
        indexed = list(enumerate(streams))
        tasks = [
            pool.submit(_fill_some, indexed[i : i + batch_size], bitmask)
            for i in range(0, len(indexed), batch_size)
        ]
        for task in tasks:
            task.result()

    return fill, pool.shutdown


def _fill_some(batch: list[tuple[int, Stream]], bitmask: Any) -> None:
    import llguidance.torch

    for i, stream in batch:
        if stream.terminated:
            bitmask[i].fill_(-1)
        else:
            llguidance.torch.fill_next_token_bitmask(stream.matcher, bitmask, i)
            stream.matcher.get_error()


def fill_plugin_llguidance(threads: int) -> tuple[FillStrategy, Callable[[], None]]:
    """tilserve's plugin with TILSERVE_VLLM_BITMASK_FILL=llguidance: its own function, one task a step."""
    import llguidance
    import torch

    from services.generator.vllm_plugin import fill_with_llguidance

    executor = llguidance.LLExecutor(num_threads=threads)

    def fill(streams: list[Stream], bitmask: Any) -> None:
        manager = SimpleNamespace(
            _grammar_bitmask=bitmask, _full_mask=torch.tensor(-1, dtype=torch.int32), _fill_bitmasks=None
        )
        fill_with_llguidance(manager, executor, [(s, i, True) for i, s in enumerate(streams)]).result()

    return fill, lambda: None


def accept(stream: Stream, token: int, eos: int) -> None:
    """vLLM's GuidanceGrammar.accept_tokens for one sampled token."""
    if token == eos:
        stream.terminated = True
    if stream.matcher.is_stopped():
        return
    if not stream.matcher.consume_tokens([token]):
        raise RuntimeError(f"the grammar refused token {token}: {stream.matcher.get_error()}")
    stream.matcher.get_error()


def choose(stream: Stream, row: np.ndarray, n_vocab: int, eos: int) -> int:
    """The dummy model's pick: a random allowed token (replayed when the stream has a script)."""
    step = len(stream.tokens)
    if stream.script is not None:
        return stream.script[step]
    if stream.terminated:
        return int(stream.rng.integers(3, n_vocab))
    allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:n_vocab])
    if allowed.size == 1:
        return int(allowed[0])
    return int(stream.rng.choice(allowed[allowed != eos]))


@dataclass
class StepCosts:
    name: str
    fill_ms: list[float]
    accept_ms: list[float]
    open_per_step: list[int]
    constrained_tokens: float

    def row(self) -> dict[str, Any]:
        fill = [f for f, n in zip(self.fill_ms, self.open_per_step, strict=True) if n]
        acc = [a for a, n in zip(self.accept_ms, self.open_per_step, strict=True) if n]
        calls = sum(self.open_per_step)
        return {
            "strategy": self.name,
            "open_steps": len(fill),
            "constrained_tokens_mean": round(self.constrained_tokens, 1),
            "fill_ms_p50": round(statistics.median(fill), 3),
            "fill_ms_mean": round(statistics.fmean(fill), 3),
            "accept_ms_p50": round(statistics.median(acc), 3),
            "accept_ms_mean": round(statistics.fmean(acc), 3),
            "fill_us_per_open_grammar": round(sum(fill) * 1000 / calls, 1),
            "accept_us_per_open_grammar": round(sum(acc) * 1000 / calls, 1),
            "cpu_ms_per_step_mean": round(statistics.fmean(fill) + statistics.fmean(acc), 3),
        }


def run_steps(
    name: str,
    matchers: Sequence[Any],
    fill: FillStrategy,
    *,
    steps: int,
    n_vocab: int,
    eos: int,
    scripts: list[list[int]] | None,
    seed: int,
) -> tuple[StepCosts, list[list[int]]]:
    import llguidance.torch

    streams = [
        Stream(m, np.random.default_rng(seed + i), None if scripts is None else scripts[i])
        for i, m in enumerate(matchers)
    ]
    bitmask = llguidance.torch.allocate_token_bitmask(len(streams), n_vocab)
    fill_ms, accept_ms, open_per_step = [], [], []
    for _ in range(steps):
        open_per_step.append(sum(not s.terminated and not s.matcher.is_stopped() for s in streams))
        started = time.perf_counter()
        fill(streams, bitmask)
        fill_ms.append((time.perf_counter() - started) * 1000)
        rows = bitmask.numpy()
        picked = [choose(s, rows[i], n_vocab, eos) for i, s in enumerate(streams)]
        started = time.perf_counter()
        for stream, token in zip(streams, picked, strict=True):
            accept(stream, token, eos)
        accept_ms.append((time.perf_counter() - started) * 1000)
        for stream, token in zip(streams, picked, strict=True):
            stream.tokens.append(token)
    constrained = sum(open_per_step) / len(streams)
    return StepCosts(name, fill_ms, accept_ms, open_per_step, constrained), [s.tokens for s in streams]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", help="Hugging Face tokenizer folder (default: the packaged SmolLM2's)")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=768)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=49152, help="the model config's vocab_size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import llguidance
    import llguidance.hf

    tokenizer = load_tokenizer(args.tokenizer)
    # vLLM's: max(the model config's vocabulary, the tokenizer's); SmolLM2's config says 49,152 too.
    vocab = max(args.vocab_size, len(tokenizer))
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, vocab)
    eos = ll_tokenizer.eos_token
    schemas = til_schemas(tokenizer, args.streams, args.prompt_tokens, args.steps)
    grammars = [vllm_grammar(s) for s in schemas]

    def matchers() -> list[Any]:
        return [llguidance.LLMatcher(ll_tokenizer, g, log_level=1) for g in grammars]

    strategies: list[tuple[str, Callable[[], tuple[FillStrategy, Callable[[], None]]]]] = [
        ("serial", lambda: (fill_serial, lambda: None)),
        (f"threads {args.workers} x {args.batch_size}", lambda: fill_threads(args.workers, args.batch_size)),
        (f"plugin llguidance fill, {args.workers} threads", lambda: fill_plugin_llguidance(args.workers)),
    ]
    # A first serial pass records each stream's tokens (and warms the process); every measured run
    # replays them, the strategies in a rotated order each round.
    _, scripts = run_steps(
        "record",
        matchers(),
        fill_serial,
        steps=args.steps,
        n_vocab=vocab,
        eos=eos,
        scripts=None,
        seed=args.seed,
    )
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in strategies}
    for round_ in range(args.rounds):
        for name, make in strategies[round_ % len(strategies) :] + strategies[: round_ % len(strategies)]:
            fill, close = make()
            costs, _ = run_steps(
                name,
                matchers(),
                fill,
                steps=args.steps,
                n_vocab=vocab,
                eos=eos,
                scripts=scripts,
                seed=args.seed,
            )
            close()
            runs[name].append(costs.row())
            print(json.dumps(runs[name][-1]), file=sys.stderr, flush=True)
    rows = [
        {k: (statistics.median(r[k] for r in results) if k != "strategy" else name) for k in results[0]}
        for name, results in runs.items()
    ]
    print(
        f"{args.streams} TIL streams (the edge's schemas, {args.prompt_tokens}-token chats), {args.steps} steps, "
        f"{rows[0]['constrained_tokens_mean']:.0f} tokens a stream under an open grammar; llguidance "
        f"{getattr(llguidance, '__version__', '?')}; medians of {args.rounds} rounds\n"
    )
    print(
        "| strategy | fill ms/step p50 | fill ms/step mean | accept ms/step mean | fill us/grammar | accept us/grammar |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['strategy']} | {row['fill_ms_p50']:.2f} | {row['fill_ms_mean']:.2f} | {row['accept_ms_mean']:.2f} "
            f"| {row['fill_us_per_open_grammar']:.0f} | {row['accept_us_per_open_grammar']:.1f} |"
        )
    if args.out:
        args.out.write_text(
            json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows, "runs": runs}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
