"""What a request's input becomes before vLLM sees it: token ids, token counts, the JSON Schema.

CPU work only (the engine runs it on worker threads); the tokenizer is vLLM's, a Hugging Face one.
The schema becomes what the llama.cpp engine compiles (`json_grammar.llguidance_schema`: the same
library, so the same semantics, refusals and messages on both engines), but for whitespace, which
vLLM's llguidance writes compact (`vllm_compat.guidance_schema` says why).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

from llguidance import LLMatcher

from services.generator import vllm_compat
from services.generator.engine import ChatTurn, InvalidRequest, PromptTooLong, TokenCount, TokenizeInput
from services.generator.json_grammar import SchemaError, llguidance_schema

_SCHEMA_CACHE_SIZE = 64
_CHAT_CACHE_SIZE = 512


@functools.lru_cache(maxsize=_SCHEMA_CACHE_SIZE)
def _prepared_schema(schema_json: str) -> str:
    # What the llama.cpp engine compiles too (limits, named refusals, JSON-safe classes, folded
    # lengths; whitespace as vllm_compat says), compiled and checked by llguidance here so that a
    # bad schema is refused before the request takes a slot, with the llama.cpp engine's messages.
    try:
        schema = vllm_compat.guidance_schema(llguidance_schema(json.loads(schema_json)))
        error = LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(schema))
    except SchemaError as exc:
        raise InvalidRequest(f"output.json_schema: {exc}") from exc
    except (TypeError, ValueError, RecursionError) as exc:  # llguidance's own refusals
        raise InvalidRequest(f"output.json_schema: unsupported JSON schema: {exc}") from exc
    if error:
        raise InvalidRequest(f"output.json_schema: unsupported JSON schema: {error}")
    return json.dumps(schema, ensure_ascii=False)


def prepared_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema as vLLM's llguidance backend gets it; InvalidRequest if refused."""
    # Not sorted: llguidance writes properties in the schema's order (a TIL's title comes first).
    key = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    # A copy each time: vLLM edits the schema it is given (additionalProperties).
    return json.loads(_prepared_schema(key))


def prompt_ids(tokenizer: Any, prompt: str | None, turns: Sequence[ChatTurn] | None) -> list[int]:
    """The token ids `generate` sends: a raw prompt with the tokenizer's special tokens, or the chat."""
    if turns is None:
        return list(tokenizer.encode(prompt or ""))
    return chat_tokens(tokenizer, turns)


def chat_tokens(tokenizer: Any, turns: Sequence[ChatTurn]) -> list[int]:
    """The chat rendered with the model's template and tokenized, as `generate` sends it."""
    messages = [{"role": turn.role, "content": turn.content} for turn in turns]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja2 TemplateError, or ValueError for a model with no template
        raise InvalidRequest(f"the chat cannot be rendered with the model's template: {exc}") from exc
    return list(_rendered_chat_tokens(tokenizer, text))


# The edge counts a chat with Tokenize, then sends the same chat to Generate: the second
# tokenization, on the engine's one tokenizer thread, comes from here.
@functools.lru_cache(maxsize=_CHAT_CACHE_SIZE)
def _rendered_chat_tokens(tokenizer: Any, text: str) -> tuple[int, ...]:
    # The template writes the special tokens (BOS) itself.
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def count_tokens(tokenizer: Any, inputs: list[TokenizeInput], offsets: bool) -> list[TokenCount]:
    """`GenerationEngine.tokenize` with a Hugging Face tokenizer (vLLM's): texts as plain text."""
    counts = []
    for item in inputs:
        if not isinstance(item, str):
            counts.append(TokenCount(len(chat_tokens(tokenizer, item))))
            continue
        # split_special_tokens: "<|im_end|>" written in a diff is text, not the control token.
        try:
            encoded = tokenizer(
                item, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=offsets
            )
        except NotImplementedError as exc:  # a slow (Python) tokenizer has no offset mapping
            raise InvalidRequest(f"this model's tokenizer gives no offsets: {exc}") from exc
        ends = token_ends(encoded["offset_mapping"]) if offsets else None
        counts.append(TokenCount(len(encoded["input_ids"]), ends))
    return counts


def token_ends(offset_mapping: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """Each token's end in code points, from a fast tokenizer's (start, end) character spans.

    Byte-level tokens that split one character all get that character's span; every one but the
    last then ends inside it, so it counts up to the character's start (the next token's start).
    """
    ends = []
    last = 0
    for i, (_, end) in enumerate(offset_mapping):
        if i + 1 < len(offset_mapping):
            end = min(end, offset_mapping[i + 1][0])
        last = max(last, end)
        ends.append(last)
    return tuple(ends)


def check_fits(prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    if prompt_tokens + max_tokens > max_model_len:
        raise PromptTooLong(
            f"the prompt has {prompt_tokens} tokens and {max_tokens} output tokens were asked for, "
            f"but the model's context holds {max_model_len} tokens"
        )
