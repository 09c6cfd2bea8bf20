"""VllmEngine.tokenize and prepare: counts with the model's tokenizer, offsets in code points.

`PieceTokenizer` answers as a Hugging Face fast tokenizer does (the calls vLLM's tokenizer takes):
`__call__` with offset mapping, `encode`, `apply_chat_template`. Its vocabulary splits each Hangul
syllable into two byte-level tokens sharing the syllable's span, as GPT-2-style BPE does.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import pytest

from services.generator.engine import ChatTurn, EngineRequest, InvalidRequest, PromptTooLong, TokenCount
from services.generator.vllm_engine import VllmEngine, _Loaded
from services.generator.vllm_inputs import count_tokens, prompt_ids, token_ends
from tests.unit.test_vllm_engine import Settings
from tests.unit.test_vllm_engine_stream import ScriptedLLM, output, vllm_names  # noqa: F401  (a fixture)

SPECIAL = "<|im_end|>"


class PieceTokenizer:
    """Words, single characters of punctuation, `<|im_end|>` as one special token (id 2) unless split."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def _pieces(self, text: str, split_special: bool) -> list[tuple[int, int, int]]:
        pieces = []
        pattern = r"\w+|\S" if split_special else re.escape(SPECIAL) + r"|\w+|\S"
        for match in re.finditer(pattern, text):
            if match.group() == SPECIAL:
                pieces.append((2, match.start(), match.end()))
            elif re.fullmatch(r"[가-힣]+", match.group()):
                for i, _ in enumerate(match.group()):  # two byte-level tokens per syllable
                    start = match.start() + i
                    pieces += [(100, start, start + 1), (101, start, start + 1)]
            else:
                pieces.append((10 + len(match.group()), match.start(), match.end()))
        return pieces

    def __call__(
        self, text: str, *, add_special_tokens: bool, split_special_tokens: bool, return_offsets_mapping: bool
    ) -> dict[str, Any]:
        self.calls.append({"add_special_tokens": add_special_tokens, "split": split_special_tokens})
        pieces = self._pieces(text, split_special_tokens)
        encoded: dict[str, Any] = {"input_ids": [p[0] for p in pieces]}
        if return_offsets_mapping:
            encoded["offset_mapping"] = [(p[1], p[2]) for p in pieces]
        return encoded

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls.append({"encode": text})
        return ([1] if add_special_tokens else []) + [p[0] for p in self._pieces(text, False)]

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        assert kwargs == {"tokenize": False, "add_generation_prompt": True}
        return "".join(f"<s>{m['role']}: {m['content']}{SPECIAL}" for m in messages) + "<s>assistant:"


def test_texts_count_as_plain_text_with_code_point_offsets() -> None:
    tok = PieceTokenizer()
    text = f"Fix 캐시 {SPECIAL}!"
    (count,) = count_tokens(tok, [text], offsets=True)
    # Fix | 캐(2) 시(2) | < | im | _ | end ... the marker is text: split into pieces, not token 2.
    assert count.count == len(tok._pieces(text, split_special=True))
    assert tok.calls == [{"add_special_tokens": False, "split": True}]
    assert count.offsets is not None and len(count.offsets) == count.count
    # The first half of a syllable ends at the syllable's start; the second at its end.
    assert count.offsets[:5] == (3, 4, 5, 5, 6)
    assert count.offsets[-1] == len(text)
    assert list(count.offsets) == sorted(count.offsets)


def test_chats_count_as_generate_sends_them_and_offsets_only_when_asked() -> None:
    tok = PieceTokenizer()
    chat = (ChatTurn("system", "be brief"), ChatTurn("user", "hi"))
    counts = count_tokens(tok, [chat, "a b"], offsets=False)
    rendered = tok.apply_chat_template(
        [{"role": t.role, "content": t.content} for t in chat], tokenize=False, add_generation_prompt=True
    )
    assert counts == [TokenCount(len(tok.encode(rendered, add_special_tokens=False))), TokenCount(2, None)]
    assert SPECIAL in rendered  # the template's control tokens count as one token each
    assert tok.encode(rendered, add_special_tokens=False).count(2) == 2


def test_token_ends_never_go_back() -> None:
    assert token_ends([(0, 3), (3, 4), (3, 4), (4, 4), (5, 9)]) == (3, 3, 4, 4, 9)
    assert token_ends([]) == ()


def engine_with(tokenizer: Any, llm: Any = None, max_model_len: int = 64) -> VllmEngine:
    llm = llm or SimpleNamespace(shutdown=lambda: None)
    engine = VllmEngine(Settings())
    engine._loaded = _Loaded(llm=llm, tokenizer=tokenizer, max_model_len=max_model_len, model_defaults={})  # type: ignore[arg-type]
    return engine


async def test_engine_tokenize_runs_off_the_event_loop() -> None:
    tok = PieceTokenizer()
    engine = engine_with(tok)
    counts = await engine.tokenize(["one two", (ChatTurn("user", "x"),)], offsets=True)
    assert counts[0] == TokenCount(2, (3, 7))
    assert counts[1].offsets is None and counts[1].count > 0
    await engine.close()


async def test_a_chat_the_template_refuses_is_invalid_in_tokenize_too() -> None:
    class Refusing(PieceTokenizer):
        def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
            raise ValueError("Conversation roles must alternate")

    with pytest.raises(InvalidRequest, match="alternate"):
        await engine_with(Refusing()).tokenize([(ChatTurn("user", "x"),)], offsets=False)


@pytest.mark.usefixtures("vllm_names")
async def test_prepare_checks_everything_before_a_slot_and_generate_reuses_it() -> None:
    tok = PieceTokenizer()
    llm = ScriptedLLM([output("ok", 1, finish="stop")])
    engine = engine_with(tok, llm, max_model_len=8)
    base = EngineRequest(request_id="r", prompt="one two three", messages=None, max_tokens=4)
    prepared = await engine.prepare(base)
    assert prepared.prepared is not None and prepared.prepared.prompt_tokens == (1, 13, 13, 15)
    with pytest.raises(PromptTooLong):
        await engine.prepare(EngineRequest(request_id="r", prompt="a " * 8, messages=None, max_tokens=4))
    with pytest.raises(InvalidRequest, match="json_schema"):
        await engine.prepare(
            EngineRequest(
                request_id="r", prompt="x", messages=None, max_tokens=4, json_schema={"pattern": "(?=x)"}
            )
        )
    assert llm.requests == []  # nothing refused reached vLLM
    calls = len(tok.calls)
    events = [event async for event in engine.generate(prepared)]
    assert len(tok.calls) == calls  # generate did not tokenize again
    assert llm.requests[0][0] == [1, 13, 13, 15] and events[-1].completion_tokens == 1


async def test_a_chat_counted_by_tokenize_is_not_tokenized_again_by_prepare() -> None:
    tok = PieceTokenizer()
    engine = engine_with(tok)
    chat = (ChatTurn("system", "rules"), ChatTurn("user", "a diff nobody sent before"))
    (counted,) = await engine.tokenize([chat], offsets=False)
    encodes = [c for c in tok.calls if "encode" in c]
    prepared = prompt_ids(tok, None, chat)
    assert [c for c in tok.calls if "encode" in c] == encodes  # the rendered chat came from the cache
    assert len(prepared) == counted.count
    other = PieceTokenizer()  # another model's tokenizer never shares the cache
    assert len(prompt_ids(other, None, chat)) == counted.count
    assert [c for c in other.calls if "encode" in c]


@pytest.mark.usefixtures("vllm_names")
async def test_a_schema_that_compiles_too_long_is_refused_at_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    from services.generator import vllm_engine

    def slow(key: str) -> str:
        time.sleep(2.0)
        return key

    monkeypatch.setattr(vllm_engine, "prepared_schema_text", slow)
    engine = VllmEngine(Settings(schema_compile_timeout_s=0.05))
    engine._loaded = _Loaded(llm=None, tokenizer=PieceTokenizer(), max_model_len=64, model_defaults={})  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(InvalidRequest, match="GENERATOR_SCHEMA_COMPILE_TIMEOUT_S"):
        await engine.prepare(
            EngineRequest(
                request_id="r", prompt="x", messages=None, max_tokens=4, json_schema={"type": "object"}
            )
        )
    assert time.monotonic() - started < 1.5  # not waiting for the compilation
