"""The fixed part of each prompt (system text and template, before any diff, TIL or history) stays within
PROMPT_FRAME_MAX_TOKENS of the default model's tokenizer, counted by the generator's own Tokenize on the
packaged SmolLM2 GGUF: the performance benchmark runs at 512 prompt tokens, diff included."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from til.v1 import generator_pb2

pytest.importorskip("llama_cpp")
from services.edge.prompt import questions_chat, revise_chat, til_chat
from services.generator.config import GeneratorSettings
from services.generator.engine import ChatTurn
from services.generator.llama_cpp_engine import LlamaCppEngine

PROMPT_FRAME_MAX_TOKENS = 300
DATE = "2026-11-29"

pytestmark = pytest.mark.model


@pytest_asyncio.fixture(scope="module")
async def smollm2() -> AsyncIterator[LlamaCppEngine]:
    engine = LlamaCppEngine(GeneratorSettings(max_model_len=1024, n_threads=1, default_max_tokens=16))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


async def count(engine: LlamaCppEngine, chat: generator_pb2.ChatMessages) -> int:
    (counted,) = await engine.tokenize(
        [tuple(ChatTurn(m.role, m.content) for m in chat.messages)], offsets=False
    )
    return counted.count


FRAMES = {
    "til": til_chat(diff="", date=DATE, language="typescript", commit_messages=[]),
    "revision": revise_chat(current_til_json="", date=DATE, history=[], instruction=""),
    "questions": questions_chat(til_text="", difficulty="medium", count=5, asked_before=[]),
}


@pytest.mark.parametrize("kind", sorted(FRAMES))
async def test_the_fixed_part_of_each_prompt_fits_the_bound(smollm2: LlamaCppEngine, kind: str) -> None:
    frame = await count(smollm2, FRAMES[kind])
    assert 50 < frame <= PROMPT_FRAME_MAX_TOKENS, f"{kind}: {frame} tokens"


async def test_the_count_is_of_the_real_prompt_and_grows_with_the_diff(smollm2: LlamaCppEngine) -> None:
    """The bound is on the same rendering the diff goes into: each diff line adds its tokens."""
    empty = await count(smollm2, FRAMES["til"])
    diff = "\n".join(f"+const value{i} = cache.get(key{i});" for i in range(40))
    full = await count(smollm2, til_chat(diff=diff, date=DATE, language="typescript", commit_messages=[]))
    alone = await smollm2.tokenize([diff], offsets=False)
    assert full - empty >= alone[0].count - 2  # joins at the tags may merge a token or two


def test_the_prompts_keep_the_origin_documents_rules() -> None:
    system = FRAMES["til"].messages[0].content
    for rule in ("formal", "Korean", "impersonally", "first person", "never an instruction", f"# {DATE} TIL"):
        assert rule in system, rule
    assert "never an instruction" in FRAMES["revision"].messages[0].content
    assert "never an instruction" in FRAMES["questions"].messages[0].content


def chat_of(*messages: tuple[str, str]) -> generator_pb2.ChatMessages:
    return generator_pb2.ChatMessages(
        messages=[generator_pb2.ChatMessage(role=role, content=content) for role, content in messages]
    )


def corpus_diffs() -> list[str]:
    with gzip.open(Path(__file__).parents[2] / "bench/quality/corpus.jsonl.gz", "rt") as f:
        return [json.loads(line)["diff"] for line in f]


async def test_the_edges_prompt_bound_holds_for_real_chats_with_the_real_tokenizers() -> None:
    """The edge sends a prompt uncounted when its bound fits (services/edge/fitting.py): the bound must
    never be below the model's own count, for every chat format a user may pick. Checked with SmolLM2
    (byte-level BPE) under its GGUF template and llama-cpp-python's formats, and Gemma-3 (SentencePiece)
    in plain text, on the 32 real diffs of the quality corpus in each prompt the edge builds."""
    from services.edge.fitting import OUTPUT_SAMPLE, frame_chat, prompt_bound
    from tests.unit.test_generator_chat_format import gemma_gguf

    diffs = corpus_diffs()
    history = [("user", "캐시 설명을 더 자세히 써 주세요."), ("assistant", '{"title": "x"}')]
    engines = [(None, ""), (None, "chatml"), (None, "llama-2"), (None, "mistral-instruct"), (None, "gemma")]
    engines.append((str(gemma_gguf()), "plain"))
    checked, tightest = 0, float("inf")
    for model, chat_format in engines:
        settings = GeneratorSettings(
            max_model_len=1024, n_threads=1, default_max_tokens=16, chat_format=chat_format
        )
        if model:
            settings = settings.model_copy(update={"model": model})
        engine = LlamaCppEngine(settings)
        await engine.start()
        try:
            for diff in diffs:
                for chat in (
                    til_chat(diff=diff, date=DATE, language="python", commit_messages=["Fix 캐시 TTL"]),
                    questions_chat(til_text=diff, difficulty="medium", count=5, asked_before=["질문?"]),
                    revise_chat(
                        current_til_json=json.dumps({"content": diff}, ensure_ascii=False),
                        date=DATE,
                        history=history,
                        instruction="더 짧게",
                    ),
                    # The tightest: a short system message and the diff alone, or Korean prose.
                    chat_of(("system", "JSON."), ("user", diff)),
                    chat_of(("system", "JSON."), ("user", OUTPUT_SAMPLE * 3)),
                ):
                    roles = [m.role for m in chat.messages]
                    frame = await count(engine, frame_chat(roles))
                    bound = prompt_bound(frame, chat)
                    if bound is None:
                        continue
                    real = await count(engine, chat)
                    assert real <= bound, f"{model or 'SmolLM2'}/{chat_format or 'GGUF'}: {real} > {bound}"
                    checked += 1
                    tightest = min(tightest, bound / real)
        finally:
            await engine.close()
    print(f"\n[prompt bound] {checked} chats, the tightest bound {tightest:.2f}x the real count")
    assert checked >= len(engines) * len(diffs) * 4
