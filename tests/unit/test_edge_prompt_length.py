"""The fixed part of each prompt (system text and template, before any diff, TIL or history) stays within
PROMPT_FRAME_MAX_TOKENS of the default model's tokenizer, counted by the generator's own Tokenize on the
packaged SmolLM2 GGUF: the performance benchmark runs at 512 prompt tokens, diff included."""

from __future__ import annotations

from collections.abc import AsyncIterator

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
