"""The TIL workload: what the edge sends the generator for a diff, rebuilt so that arms A and C can
send exactly the same request without the edge.

The edge (arm D) turns a diff into a chat (`services.edge.prompt.til_chat`) and a JSON Schema
(`services.edge.til_format.til_schema`). `engine-til` (A) and `generator-til` (C) build the same chat
and schema from the same kind of diff, so D can be compared with A and C request for request. The
diff is sized so that the whole chat prompt has about `--til-input-len` tokens.

Arm E (`edge-hit`) needs a cached TIL. A model with random weights never closes the TIL's JSON within
a few hundred tokens, so the edge would never store one; `seed_cache` stores a TIL under the key the
edge computes for the request, through the cacher's own API.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bench.prompts import Prompt, PromptFactory

DATE = "2025-01-01"
LANGUAGE = "markdown"
COMMIT_MESSAGES = ("Add benchmark notes",)
# A TIL that meets every rule of the format (for the cache seed).
SEED_TIL = {
    "title": f"{DATE} TIL - 벤치마크 메모 추가",
    "keywords": ["벤치마크", "캐시"],
    "content": f"# {DATE} TIL\n\n- `notes/bench.md`에 벤치마크 메모가 추가되었다.\n",
}


def diff_for(prompt: Prompt) -> str:
    """A unified diff that adds the prompt's words as a Markdown file."""
    words = prompt.text.split()
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    header = (
        "diff --git a/notes/bench.md b/notes/bench.md\n"
        "--- a/notes/bench.md\n+++ b/notes/bench.md\n"
        f"@@ -0,0 +1,{len(lines)} @@\n"
    )
    return header + "".join(f"+{line}\n" for line in lines)


def chat(diff: str) -> Any:
    """The chat (generator_pb2.ChatMessages) the edge sends for `diff`, with no related TILs: the
    benchmark runs the edge without a retriever."""
    from services.edge.prompt import til_chat

    return til_chat(diff=diff, date=DATE, language=LANGUAGE, commit_messages=COMMIT_MESSAGES)


def chat_messages(diff: str) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in chat(diff).messages]


def schema() -> dict[str, Any]:
    from services.edge.til_format import til_schema

    return til_schema(DATE)


def chat_tokens(tokenizer: Any, diff: str) -> list[int]:
    text = tokenizer.apply_chat_template(chat_messages(diff), tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def words_for_prompt_tokens(factory: PromptFactory, tokenizer: Any, target: int) -> int:
    """How many word tokens a diff needs for the chat prompt to have about `target` tokens."""
    frame = len(chat_tokens(tokenizer, diff_for(factory.make(2))))
    if frame >= target:
        raise ValueError(f"the TIL prompt has {frame} tokens with an empty diff; ask for more than that")
    low, high = 2, target
    while low < high:  # the diff's tokens grow with its words; find the last size not above target
        mid = (low + high + 1) // 2
        if len(chat_tokens(tokenizer, diff_for(factory.make(mid)))) <= target:
            low = mid
        else:
            high = mid - 1
    return low


@dataclass(frozen=True)
class CacheSeed:
    namespace: str
    key: str
    value_json: str


def cache_seed(diff: str, output_len: int, model: str, sampling: Any) -> CacheSeed:
    """The entry the edge would store after generating a TIL for this GenerateTil request."""
    from til.v1 import common_pb2

    from services.edge.config import EdgeSettings
    from services.edge.pipeline import TIL_NAMESPACE, TilPipeline
    from services.edge.stages import envelope

    request = edge_request(diff, output_len, sampling, policy=0)
    pipeline = TilPipeline(None, None, None, EdgeSettings())  # type: ignore[arg-type]
    job = pipeline.job(request)
    key = TilPipeline.cache_key(job, model=model, max_tokens=job.max_tokens)
    til_json = json.dumps(SEED_TIL, ensure_ascii=False)
    usage = common_pb2.TokenUsage(prompt_tokens=512, completion_tokens=output_len)
    return CacheSeed(TIL_NAMESPACE, key, envelope(json_text=til_json, model=model, usage=usage, til_id=""))


def edge_request(diff: str, output_len: int, sampling: Any, policy: int) -> Any:
    from til.v1 import edge_pb2

    return edge_pb2.GenerateTilRequest(
        diff=diff,
        commit_messages=list(COMMIT_MESSAGES),
        language=LANGUAGE,
        date=DATE,
        generation=edge_pb2.GenerationOverrides(sampling=sampling, max_tokens=output_len),
        cache_policy=policy,
        owner="bench",
    )
