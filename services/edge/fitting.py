"""Fitting a prompt into the model's context next to the output budget, with the model's own tokenizer.

A prompt that surely fits costs no call: its tokens are at most the chat format's own (its messages
each holding one placeholder character, counted once per model and list of roles, and checked on a
real chat of that shape) plus one per UTF-8 byte of the contents and a few at each join. A token of a
byte-level BPE, or of SentencePiece with byte fallback, covers at least one byte of text; the model's
tokenizer must also have kept to that on a sample of Korean Markdown, and contents that Unicode
normalisation could lengthen (not NFC and NFKC already) are always counted.
Otherwise one Tokenize call counts the whole prompt; only when it does not fit, a second counts the
part of it that may be cut (with the end offset of each token, so a cut lands on a token boundary).
Once per model, a sample of Korean Markdown is counted too (how densely the tokenizer packs what the
model writes, to bound free text in the schema). Nothing is estimated from characters: Korean and code
break every ratio; the bound only decides when counting cannot change the answer.
"""

from __future__ import annotations

import logging
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence

from prometheus_client import Counter
from til.v1 import generator_pb2

from services.common.errors import InvalidArgument
from services.edge.background import Background
from services.edge.call import CallContext
from services.edge.clients import TilGenerator
from services.edge.contract import F, J, OutputBudget, OutputContract
from services.edge.retrieval import Retrieval

# What the model writes at its least dense: Korean prose in Markdown (code packs more into a token).
OUTPUT_SAMPLE = (
    "# 2024-05-01 TIL\n\n"
    "- 사용자 조회 결과를 캐시에 저장하여 데이터베이스 호출을 줄인다.\n"
    "- 만료 시간을 두어 오래된 데이터가 남지 않도록 한다.\n"
    "- 캐시 미스가 발생하면 데이터베이스에서 읽은 뒤 캐시에 다시 기록한다.\n"
    "유지보수성과 확장성을 함께 고려해야 하며, 장애 상황에서의 동작도 검토해야 한다.\n"
)
# Tokens a cut body may differ by from its count alone, once it sits in the prompt (merges at its edges,
# escaping of the tags it sits in).
EDGE_TOKENS = 16
# Tokens a message's content may add beyond one per byte where it meets the chat format (a tokenizer's
# prefix space, a merge across the join undone).
JOIN_TOKENS = 4
# What each message holds when its chat format is counted: formats render an empty message differently
# (some drop its separator or its whole block), one character they render as any other.
PLACEHOLDER = "x"
# Chat shapes (model, roles) whose format is remembered, least recently used first out.
MAX_SHAPES = 256
# After a failed count of a format, how long its prompts are counted before it is tried again.
RETRY_AFTER_S = 60.0
FORMAT_COUNT_TIMEOUT_S = 10.0

log = logging.getLogger(__name__)

PROMPT_COUNTS = Counter(
    "tilserve_edge_prompt_counts_total",
    "Prompts fitted to the context, by how: bound (surely fits: no Tokenize call), counted (one call), "
    "cut (two calls and a cut body).",
    ["how"],
)

Shape = tuple[str, tuple[str, ...]]  # (model, the roles of its messages)


def _unchanged_by_normalisation(text: str) -> bool:
    return unicodedata.is_normalized("NFC", text) and unicodedata.is_normalized("NFKC", text)


def frame_chat(roles: Sequence[str]) -> generator_pb2.ChatMessages:
    """The chat whose token count is the format's own for these roles: a placeholder in each message."""
    return generator_pb2.ChatMessages(
        messages=[generator_pb2.ChatMessage(role=role, content=PLACEHOLDER) for role in roles]
    )


def prompt_bound(frame_tokens: int, chat: generator_pb2.ChatMessages) -> int | None:
    """At most how many tokens `chat` is, given its format's own count (`frame_chat`); None when a
    content could be lengthened by Unicode normalisation."""
    if not all(_unchanged_by_normalisation(m.content) for m in chat.messages):
        return None
    return frame_tokens + sum(len(m.content.encode()) + JOIN_TOKENS for m in chat.messages)


class PromptFitter:
    """Fits prompts with the generator's tokenizer. How densely the model's tokenizer packs Korean
    Markdown is the same for every request to one model: it is counted once per model id. A request
    then costs no call when its prompt surely fits, else one Tokenize call (the chat) when it fits, and
    a second (the body, with token offsets) only when the body must be cut."""

    def __init__(self, generator: TilGenerator, background: Background) -> None:
        self._generator = generator
        self._background = background
        self._chars_per_token: dict[str, float] = {}
        # Per model: whether its tokenizer kept to a token per byte on the output sample.
        self._bytes_bound: dict[str, bool] = {}
        # Per model: the smallest context a Tokenize answer gave (replicas may differ).
        self._context: dict[str, int] = {}
        # Per shape: the chat format's tokens (None: being counted, or not bounded).
        self._frames: OrderedDict[Shape, int | None] = OrderedDict()
        self._retry_at: dict[Shape, float] = {}

    def _bound(self, model: str, chat: generator_pb2.ChatMessages) -> int | None:
        """At most how many tokens `chat` is, without counting it; None when that is not known."""
        if not self._bytes_bound.get(model):
            return None
        shape = (model, tuple(m.role for m in chat.messages))
        if shape not in self._frames:
            if time.monotonic() >= self._retry_at.get(shape, 0.0):
                self._retry_at.pop(shape, None)
                self._frames[shape] = None  # counted in the background; prompts are counted meanwhile
                while len(self._frames) > MAX_SHAPES:
                    self._frames.popitem(last=False)
                self._background.spawn("chat format count", self._count_format(shape, chat))
            return None
        self._frames.move_to_end(shape)
        frame = self._frames[shape]
        return None if frame is None else prompt_bound(frame, chat)

    async def _count_format(self, shape: Shape, chat: generator_pb2.ChatMessages) -> None:
        """Counts the chat format of `shape` (a placeholder in each message) and `chat` beside it: a format
        that does not keep to the bound on it (one that repeats a message, say) is never bounded."""
        model, roles = shape
        request = generator_pb2.TokenizeRequest(
            inputs=[
                generator_pb2.TokenizeInput(chat=frame_chat(roles)),
                generator_pb2.TokenizeInput(chat=chat),
            ]
        )
        try:
            counted = await self._generator.tokenize(request, timeout=FORMAT_COUNT_TIMEOUT_S)
        except BaseException:
            self._frames.pop(shape, None)  # counted again after a while: the failure may pass
            self._retry_at[shape] = time.monotonic() + RETRY_AFTER_S
            raise  # logged and counted by Background
        frame, real = (r.token_count for r in counted.results)
        if shape not in self._frames:
            return  # evicted meanwhile
        bound = prompt_bound(frame, chat)
        if bound is None:  # this chat cannot check the format: the next one of its shape will
            self._frames.pop(shape, None)
        elif real <= bound:
            self._frames[shape] = frame
        else:  # stays None: always counted
            log.info("the chat format of %s with roles %s exceeds the bound: always counted", model, roles)

    async def fit(
        self,
        contract: OutputContract[J, F],
        job: J,
        retrieval: Retrieval,
        max_tokens: int,
        ctx: CallContext,
        notices: list[str],
    ) -> tuple[generator_pb2.ChatMessages, str, OutputBudget]:
        """The chat, with the contract's body cut to what the context holds; the body as shown; the budget."""
        info = await self._generator.model_info(timeout=ctx.remaining())
        model = info.model
        density = self._chars_per_token.get(model)
        body = contract.body(job)
        chat = contract.chat(job, retrieval, body)
        context = min(info.max_model_len, self._context.get(model, info.max_model_len))
        if density is not None and context:
            bound = self._bound(model, chat)
            if bound is not None and bound + max_tokens <= context:
                PROMPT_COUNTS.labels("bound").inc()
                return chat, body, OutputBudget(max_tokens, density)
        inputs = [generator_pb2.TokenizeInput(chat=chat)]
        if density is None:
            inputs.append(generator_pb2.TokenizeInput(text=OUTPUT_SAMPLE))
        counted = await self._generator.tokenize(
            generator_pb2.TokenizeRequest(inputs=inputs), timeout=ctx.remaining()
        )
        prompt = counted.results[0]
        if density is None:
            sample_tokens = counted.results[1].token_count
            density = len(OUTPUT_SAMPLE) / max(sample_tokens, 1)
            self._chars_per_token[model] = density
            self._bytes_bound[model] = 0 < sample_tokens <= len(OUTPUT_SAMPLE.encode())
            self._bound(model, chat)  # starts learning this chat's format
        budget = OutputBudget(max_tokens, density)
        context = counted.max_model_len
        if context:
            self._context[model] = min(context, self._context.get(model, context))
        if not context or prompt.token_count + max_tokens <= context:
            PROMPT_COUNTS.labels("counted").inc()
            return chat, body, budget
        if not body:
            raise InvalidArgument(
                f"the prompt is {prompt.token_count} tokens and the output budget {max_tokens}: together more "
                f"than the model's {context}-token context; shorten {contract.shortened} or ask for fewer "
                "generation.max_tokens"
            )
        counted = await self._generator.tokenize(
            generator_pb2.TokenizeRequest(
                inputs=[generator_pb2.TokenizeInput(text=body)], return_offsets=True
            ),
            timeout=ctx.remaining(),
        )
        whole = counted.results[0]
        room = context - max_tokens - (prompt.token_count - whole.token_count) - EDGE_TOKENS
        if room < 1:
            raise InvalidArgument(
                f"an output budget of {max_tokens} tokens leaves no room for the {contract.shortened} in the "
                f"model's {context}-token context: ask for fewer generation.max_tokens"
            )
        cut, notice = contract.cut(body, _chars_in(whole.offsets, room))
        notices.append(notice)
        PROMPT_COUNTS.labels("cut").inc()
        return contract.chat(job, retrieval, cut), cut, budget


def _chars_in(offsets: Sequence[int], tokens: int) -> int:
    """The characters the first `tokens` tokens cover."""
    return int(offsets[min(tokens, len(offsets)) - 1]) if offsets else 0
