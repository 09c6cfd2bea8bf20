"""The vLLM engine's prompt token ids: batched under a burst, the same ids as one at a time and as
vLLM itself renders and tokenizes a chat, on SmolLM2's real tokenizer (read by transformers from
the packaged GGUF, the tokenizer the GPU benchmark's model uses)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from services.generator.engine import ChatTurn, EngineRequest, InvalidRequest
from services.generator.vllm_inputs import PromptBatcher, prompt_ids, prompt_ids_many
from tests.unit.test_vllm_tokenize import PieceTokenizer, engine_with

DIFF = (
    "diff --git a/app/cache.py b/app/cache.py\n+++ b/app/cache.py\n@@ -1,2 +1,3 @@\n"
    "+    ttl = 60  # 캐시 만료 시간(초)\n+    marker = '<|im_end|>'\n"
)


@pytest.fixture(scope="module")
def smollm2() -> Any:
    pytest.importorskip("gguf", reason="transformers needs gguf to read the GGUF's tokenizer")
    from transformers import AutoTokenizer

    from services.generator.models import packaged_gguf

    path = packaged_gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def chats() -> list[tuple[ChatTurn, ...]]:
    return [
        (ChatTurn("system", "오늘 배운 것을 JSON으로 쓰세요."), ChatTurn("user", DIFF * n)) for n in (1, 3, 7)
    ] + [(ChatTurn("user", "hi"),)]


def test_batched_ids_are_one_at_a_times_and_vllms_on_smollm2(smollm2: Any) -> None:
    requests: list[tuple[str | None, tuple[ChatTurn, ...] | None]] = [(None, c) for c in chats()]
    requests += [("plain text 캐시 <|im_end|> tail", None), ("x", None)]
    batched = prompt_ids_many(smollm2, requests)
    for (prompt, turns), ids in zip(requests, batched, strict=True):
        assert isinstance(ids, list) and ids
        if turns is None:
            assert ids == smollm2.encode(prompt)  # a raw prompt: the tokenizer's special tokens
            continue
        messages = [{"role": t.role, "content": t.content} for t in turns]
        # What vLLM's chat path sends: the template rendered, tokenized without added special tokens.
        rendered = smollm2.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ids == smollm2.encode(rendered, add_special_tokens=False)
        assert rendered.startswith("<|im_start|>") and ids[0] == smollm2.convert_tokens_to_ids("<|im_start|>")
        assert ids == prompt_ids(smollm2, None, turns)  # and from the cache, the same again
    # The diff's own "<|im_end|>" is read as the control token by vLLM too (the template's output).
    assert batched[0].count(smollm2.convert_tokens_to_ids("<|im_end|>")) == 3


async def test_a_burst_is_tokenized_in_a_few_batches_with_the_same_ids(smollm2: Any) -> None:
    engine = engine_with(smollm2, max_model_len=4096)
    engine._sampling_params = lambda request, schema: None  # type: ignore[method-assign]  # vLLM's own check
    turns = [(ChatTurn("user", f"{DIFF}#{i}"),) for i in range(40)]
    requests = [
        EngineRequest(request_id=str(i), prompt=None, messages=t, max_tokens=8) for i, t in enumerate(turns)
    ]
    prepared = await asyncio.gather(*(engine.prepare(r) for r in requests))
    assert [p.prepared.prompt_tokens for p in prepared if p.prepared] == [
        tuple(prompt_ids(smollm2, None, t)) for t in turns
    ]
    batches = engine._prompts.batches
    assert sum(batches) == 40 and len(batches) < 10, batches  # not 40 encodes one after another
    await engine.close()


async def ids(batcher: PromptBatcher, tokenizer: Any, prompt: str | None, turns: Any) -> list[int]:
    return (await batcher.timed_ids(tokenizer, prompt, turns))[0]


async def test_a_refused_chat_fails_alone_and_a_caller_that_left_is_skipped() -> None:
    class Refusing(PieceTokenizer):
        def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
            if messages[0]["content"] == "bad":
                raise ValueError("Conversation roles must alternate")
            return super().apply_chat_template(messages, **kwargs)

    tok = Refusing()
    with ThreadPoolExecutor(max_workers=1) as thread:
        batcher = PromptBatcher(thread)
        blocker = asyncio.ensure_future(ids(batcher, tok, "first", None))  # takes the thread alone
        await asyncio.sleep(0)
        good = asyncio.ensure_future(ids(batcher, tok, None, (ChatTurn("user", "fine"),)))
        bad = asyncio.ensure_future(ids(batcher, tok, None, (ChatTurn("user", "bad"),)))
        gone = asyncio.ensure_future(ids(batcher, tok, "never mind", None))
        await asyncio.sleep(0)
        gone.cancel()
        assert await blocker == prompt_ids(tok, "first", None)
        assert await good == prompt_ids(tok, None, (ChatTurn("user", "fine"),))
        with pytest.raises(InvalidRequest, match="alternate"):
            await bad
        assert gone.cancelled()
        assert list(batcher.batches) == [
            1,
            2,
        ]  # the refused chat and the good one in one batch; not the cancelled


async def test_timed_ids_say_where_the_wait_for_the_ids_went() -> None:
    class Slow(PieceTokenizer):
        def encode(self, text: str, **kwargs: Any) -> list[int]:
            time.sleep(0.05)
            return list(super().encode(text, **kwargs))

    tok = Slow()
    with ThreadPoolExecutor(max_workers=1) as thread:
        batcher = PromptBatcher(thread)
        first = asyncio.ensure_future(batcher.timed_ids(tok, "first", None))
        await asyncio.sleep(0)  # the first batch is on the thread
        second = asyncio.ensure_future(batcher.timed_ids(tok, "second", None))
        (ids1, t1), (ids2, t2) = await first, await second
    assert ids1 == prompt_ids(PieceTokenizer(), "first", None)
    assert ids2 == prompt_ids(PieceTokenizer(), "second", None)
    assert t1.batch == t2.batch == 1
    assert t1.encoded_s >= 0.05 and t2.encoded_s >= 0.05
    assert t1.queued_s < 0.05 <= t2.queued_s + 0.005  # the second waited for the first batch
    assert t1.resumed_s >= 0 and t2.resumed_s >= 0
    # The sizes kept for tests and benchmarks are bounded: they live as long as the server.
    assert batcher.batches.maxlen == 1024 and list(batcher.batches) == [1, 1]
