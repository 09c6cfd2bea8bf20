"""What a request's input becomes before vLLM sees it: token ids, token counts, the JSON Schema.

CPU work only (the engine runs it on worker threads); the tokenizer is vLLM's, a Hugging Face one.
The schema becomes what the llama.cpp engine compiles (`json_grammar.llguidance_schema`: the same
library, so the same semantics, refusals and messages on both engines), but for whitespace, which
vLLM's llguidance writes compact (`vllm_compat.guidance_schema` says why).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import multiprocessing
import os
import re
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, TypeVar

from llguidance import LLMatcher

from services.common.workers import die_with_parent
from services.generator import vllm_compat
from services.generator.engine import (
    ChatTurn,
    EngineError,
    EngineUnavailable,
    InvalidRequest,
    PromptTooLong,
    TokenCount,
    TokenizeInput,
)
from services.generator.json_grammar import SchemaError, llguidance_schema

_SCHEMA_CACHE_SIZE = 64
_CHAT_CACHE_SIZE = 512
T = TypeVar("T")


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


def schema_key(schema: dict[str, Any]) -> str:
    """The schema as one string: the cache key, and what a schema worker process is sent."""
    # Not sorted: llguidance writes properties in the schema's order (a TIL's title comes first).
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def prepared_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema as vLLM's llguidance backend gets it; InvalidRequest if refused."""
    # A copy each time: vLLM edits the schema it is given (additionalProperties).
    return json.loads(_prepared_schema(schema_key(schema)))


def prepared_schema_text(key: str) -> str:
    """`prepared_schema` of `schema_key(schema)`, as JSON text: what a schema worker process runs."""
    return _prepared_schema(key)


def prepared_schema_uncached(key: str) -> str:
    """`prepared_schema_text(key)` readied anew and not kept: for a benchmark that must leave the
    generator's work to be done again in its own process."""
    return _prepared_schema.__wrapped__(key)


def _schema_worker_init(parent: int) -> None:
    # A Ctrl-C reaches the whole process group: the serving process shuts the pool down, and a
    # worker that took it too would print a traceback mid-task. A worker whose parent dies without
    # shutting it down (SIGKILL, the OOM killer) gets SIGTERM and goes with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)


class SchemaProcesses:
    """Worker processes that ready request schemas (`prepared_schema_text`), with the last results
    kept here.

    Readying a TIL schema is Python (our checks, the pattern rewrites: ~0.9 ms on the 2-core
    development machine) and llguidance's validation (~1.4 ms). On threads of the serving process,
    a burst of schema requests held the GIL that its event loop and gRPC's poller need to take each
    new call: on the H200, 100 TIL calls reached the generator's handler 46-70 ms (p50) after they
    were sent, plain calls 3-5 ms (bench/results/issue13-h200-s21; bench/handler_reach.py
    reproduces it on CPU). In worker
    processes the serving process only sends the schema's text and reads the result back: TIL
    calls then reached the handler 26-28 ms after they were sent. `VllmEngine` sends a schema here
    only while another is being readied (a lone request is quicker on a thread).

    Spawned, not forked: the serving process holds threads (gRPC's, vLLM's) that a fork would copy
    mid-state. A worker that dies (the kernel's OOM killer, a crash in the library) breaks the pool;
    the next request builds a new one and is tried once more there.
    """

    def __init__(self, workers: int, cache_size: int = _SCHEMA_CACHE_SIZE) -> None:
        if workers < 1:
            raise ValueError("SchemaProcesses needs at least one worker")
        self.workers = workers
        self._cache_size = cache_size
        self._texts: OrderedDict[str, str] = OrderedDict()
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.rebuilt = 0  # pools replaced after a worker died, for the log and tests

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise EngineUnavailable("the generator is shutting down")
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=self.workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_schema_worker_init,
                    initargs=(os.getpid(),),
                )
            return self._pool

    def known(self, key: str) -> str | None:
        """The prepared text of `schema_key(schema)` if it is among the last results, else None."""
        text = self._texts.get(key)
        if text is not None:
            self._texts.move_to_end(key)
        return text

    def keep(self, key: str, text: str) -> None:
        """Keeps a result among the last ones (readied here or on the serving process's thread)."""
        self._texts[key] = text
        self._texts.move_to_end(key)
        while len(self._texts) > self._cache_size:
            self._texts.popitem(last=False)

    def warm(self) -> None:
        """Starts every worker and readies a small schema on each (blocking: call it off the loop)."""
        pool = self._executor()
        key = schema_key({"type": "object", "properties": {"a": {"type": "string"}}})
        for future in [pool.submit(prepared_schema_text, key) for _ in range(self.workers)]:
            future.result()

    async def text(self, key: str) -> str:
        """`prepared_schema_text(key)` run in a worker (the last results not looked at)."""
        for attempt in (1, 2):
            pool = self._executor()
            try:
                return await asyncio.wrap_future(pool.submit(prepared_schema_text, key))
            except BrokenProcessPool:
                with self._lock:
                    if self._pool is pool:  # not yet replaced by another request
                        self._pool = None
                        self.rebuilt += 1
                pool.shutdown(wait=False, cancel_futures=True)
                if attempt == 2:
                    # Every request in flight in a pool fails when one of its workers dies, so the
                    # culprit cannot be told apart: this is the server's failure (UNAVAILABLE).
                    raise EngineError(
                        "the worker processes readying JSON schemas died twice while this request's "
                        "schema was being readied; retry, and report it if it happens again"
                    ) from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def prompt_ids(tokenizer: Any, prompt: str | None, turns: Sequence[ChatTurn] | None) -> list[int]:
    """The token ids `generate` sends: a raw prompt with the tokenizer's special tokens, or the chat."""
    (ids,) = prompt_ids_many(tokenizer, [(prompt, turns)])
    if isinstance(ids, InvalidRequest):
        raise ids
    return ids


def prompt_ids_many(
    tokenizer: Any, requests: Sequence[tuple[str | None, Sequence[ChatTurn] | None]]
) -> list[list[int] | InvalidRequest]:
    """`prompt_ids` for each (prompt, turns), or the InvalidRequest that request gets.

    The same ids as one request at a time, but a fast tokenizer encodes all the texts in one call
    (`encode_batch`: its Rust encoder spreads them over the cores, without the GIL), so a burst of
    requests is not tokenized one after another.
    """
    results: list[list[int] | InvalidRequest | None] = [None] * len(requests)
    # (index, text, chat cache key or None) of the texts to encode, by add_special_tokens.
    todo: dict[bool, list[tuple[int, str, tuple[int, str] | None]]] = {True: [], False: []}
    for i, (prompt, turns) in enumerate(requests):
        if turns is None:
            todo[True].append((i, prompt or "", None))
            continue
        try:
            text = render_chat(tokenizer, turns)
        except InvalidRequest as exc:
            results[i] = exc
            continue
        key = (id(tokenizer), text)
        cached = _CHATS.get(tokenizer, key)
        if cached is not None:
            results[i] = list(cached)
        else:
            # The template writes the special tokens (BOS) itself.
            todo[False].append((i, text, key))
    for special, items in todo.items():
        if not items:
            continue
        encoded = encode_batch(tokenizer, [text for _, text, _ in items], add_special_tokens=special)
        for (i, _, chat_key), ids in zip(items, encoded, strict=True):
            results[i] = ids
            if chat_key is not None:
                _CHATS.put(tokenizer, chat_key, tuple(ids))
    return [r if r is not None else [] for r in results]


def encode_batch(tokenizer: Any, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
    """`tokenizer.encode(text, add_special_tokens=...)` for each text: by its Rust tokenizer where that
    is the same, all the texts in one call."""
    encoder = _ENCODERS.get(tokenizer)
    if encoder is None:
        return [list(tokenizer.encode(text, add_special_tokens=add_special_tokens)) for text in texts]
    return encoder.encode(texts, add_special_tokens=add_special_tokens)


# Pre-tokenizers that split each piece of text between added tokens on its own, whatever comes before
# it (`Metaspace` only where it prepends to every piece, not to the first one alone).
_PIECEWISE_PRE_TOKENIZERS = frozenset(
    {
        "BertPreTokenizer",
        "ByteLevel",
        "CharDelimiterSplit",
        "Digits",
        "Metaspace",
        "Punctuation",
        "Sequence",
        "Split",
        "UnicodeScripts",
        "Whitespace",
        "WhitespaceSplit",
    }
)
_SEGMENT_CACHE_SIZE = 256


class _RustEncoder:
    """`tokenizer.encode` of a transformers fast tokenizer, run by its Rust tokenizer directly.

    transformers' `encode` sets the Rust tokenizer's truncation, padding and `encode_special_tokens`
    for the call, then runs `encode_batch` on the one text and copies its ids out: about 0.1 ms of
    Python, and `encode_batch` lets the GIL go, so taking it back waits out another thread's switch
    interval (5 ms) when one holds it. Here a lone text is run by `encode`, which keeps the GIL, with
    the same settings (a tokenizer given truncation or padding is left to transformers).

    A chat's text (without added special tokens: the template writes them) is encoded piece by piece
    between its added tokens, each piece's ids kept by its text: the system prompt and instructions
    of every request are tokenized once. That is what the Rust tokenizer does with the whole text (it
    splits on the added tokens first, leftmost-longest, then normalizes, pre-tokenizes and encodes
    each piece alone), so it is used only where nothing else depends on a piece's place: no added
    token strips the space around it or must be a whole word, `_PIECEWISE_PRE_TOKENIZERS`, a model
    without dropout.
    """

    def __init__(self, tokenizer: Any, backend: Any) -> None:
        self._tokenizer = tokenizer
        self._backend = backend
        # New tokens added later (transformers' add_tokens) change the pieces: a new encoder is built when
        # the vocabulary grows. Not caught: a token of the vocabulary made an added one, or an added
        # token's flags changed, which leave its size alone (listing the added tokens on every call
        # would cost ms on a tokenizer with thousands). The generator never changes the tokenizer vLLM
        # loaded; a caller that does must not use it here afterwards.
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._added_ids, self._splitter = _added_token_splitter(backend)
        # A piece's ids depend only on its text and this tokenizer (see above); bounded, least
        # recently used first out. Most pieces are one request's own (a diff); the shared ones stay.
        self._pieces: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    def stale(self) -> bool:
        return self._backend.get_vocab_size(with_added_tokens=True) != self._vocab_size

    def usable(self) -> bool:
        # transformers' encode clears a truncation or padding set on the Rust tokenizer: left to it.
        return self._backend.truncation is None and self._backend.padding is None

    def encode(self, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
        split_special = bool(self._tokenizer.split_special_tokens)
        if self._backend.encode_special_tokens != split_special:
            self._backend.encode_special_tokens = split_special  # as transformers' encode sets it
        if add_special_tokens or split_special or self._splitter is None:
            return self._run(texts, add_special_tokens)
        pieces = [self._splitter.split(text) for text in texts]
        # split() with the pattern's one group: text, token, text, token, ..., text.
        new = list(dict.fromkeys(p for parts in pieces for p in parts[::2] if p and p not in self._pieces))
        for piece, piece_ids in zip(new, self._run(new, False), strict=True):
            self._pieces[piece] = tuple(piece_ids)
        out = []
        for parts in pieces:
            ids: list[int] = []
            for i, part in enumerate(parts):
                if i % 2:
                    ids.append(self._added_ids[part])
                elif part:
                    ids.extend(self._pieces[part])
                    self._pieces.move_to_end(part)
            out.append(ids)
        while len(self._pieces) > _SEGMENT_CACHE_SIZE:
            self._pieces.popitem(last=False)
        return out

    def _run(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        if len(texts) == 1:
            return [self._backend.encode(texts[0], add_special_tokens=add_special_tokens).ids]
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)]


def _added_token_splitter(backend: Any) -> tuple[dict[str, int], re.Pattern[str] | None]:
    """The added tokens' ids by text, and a pattern that splits a text on them as the Rust tokenizer
    does (None where pieces between them do not encode alone as they do in the whole text)."""
    decoder = backend.get_added_tokens_decoder()
    added = list(decoder.values())
    ids = {token.content: token_id for token_id, token in decoder.items()}
    if (
        not added
        or any(token.lstrip or token.rstrip or token.single_word for token in added)
        or getattr(backend.model, "dropout", None)
        or not _piecewise(backend.pre_tokenizer)
    ):
        return ids, None
    # Tokens the normalizer sees are matched inside each piece after normalizing, as in the whole text.
    raw = sorted((t.content for t in added if not t.normalized), key=len, reverse=True)
    if not raw:
        return ids, None
    # Longest first: at the leftmost place a token starts, the longest one there (leftmost-longest).
    return ids, re.compile("(" + "|".join(re.escape(text) for text in raw) + ")")


def _piecewise(pre_tokenizer: Any) -> bool:
    if pre_tokenizer is None:
        return True

    def ok(config: dict[str, Any]) -> bool:
        if config.get("type") not in _PIECEWISE_PRE_TOKENIZERS or config.get("prepend_scheme") == "first":
            return False
        return all(ok(inner) for inner in config.get("pretokenizers", ()))

    return ok(json.loads(pre_tokenizer.__getstate__()))


class _RustEncoders:
    """Each tokenizer's `_RustEncoder`, or None where transformers' own `encode` must run."""

    def __init__(self, size: int) -> None:
        self._size = size
        # The tokenizer is kept with its encoder, so that its id() cannot name another one meanwhile.
        self._encoders: OrderedDict[int, tuple[Any, _RustEncoder | None]] = OrderedDict()

    def get(self, tokenizer: Any) -> _RustEncoder | None:
        entry = self._encoders.get(id(tokenizer))
        if entry is None or entry[0] is not tokenizer or (entry[1] is not None and entry[1].stale()):
            entry = (tokenizer, _rust_encoder(tokenizer))
            self._encoders[id(tokenizer)] = entry
            while len(self._encoders) > self._size:
                self._encoders.popitem(last=False)
        encoder = entry[1]
        return encoder if encoder is not None and encoder.usable() else None


_ENCODERS = _RustEncoders(8)


def _rust_encoder(tokenizer: Any) -> _RustEncoder | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from transformers import PreTrainedTokenizerFast

    # The class's encode path is transformers' own (CodeLlama's, Mistral's and others' are not).
    names = ("encode", "_encode_plus", "_batch_encode_plus")
    if not isinstance(tokenizer, PreTrainedTokenizerFast) or any(
        getattr(type(tokenizer), name, None) is not getattr(PreTrainedTokenizerFast, name, None)
        for name in names
    ):
        return None
    return _RustEncoder(tokenizer, backend)


def render_chat(tokenizer: Any, turns: Sequence[ChatTurn]) -> str:
    """The chat as the model's template writes it, ready for the assistant's turn."""
    messages = [{"role": turn.role, "content": turn.content} for turn in turns]
    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    except Exception as exc:  # jinja2 TemplateError, or ValueError for a model with no template
        raise InvalidRequest(f"the chat cannot be rendered with the model's template: {exc}") from exc


def chat_tokens(tokenizer: Any, turns: Sequence[ChatTurn]) -> list[int]:
    """The chat rendered with the model's template and tokenized, as `generate` sends it."""
    return prompt_ids(tokenizer, None, turns)


class _ChatCache:
    """The last rendered chats' token ids, by (tokenizer, text). The edge counts a chat with
    Tokenize, then sends the same chat to Generate: the second tokenization comes from here."""

    def __init__(self, size: int) -> None:
        self._size = size
        # The tokenizer is kept with its ids, so that its id() cannot name another one meanwhile.
        self._ids: OrderedDict[tuple[int, str], tuple[Any, tuple[int, ...]]] = OrderedDict()
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._ids.clear()

    def get(self, tokenizer: Any, key: tuple[int, str]) -> tuple[int, ...] | None:
        with self._lock:
            entry = self._ids.get(key)
            if entry is None or entry[0] is not tokenizer:
                return None
            self._ids.move_to_end(key)
            return entry[1]

    def put(self, tokenizer: Any, key: tuple[int, str], ids: tuple[int, ...]) -> None:
        with self._lock:
            self._ids[key] = (tokenizer, ids)
            while len(self._ids) > self._size:
                self._ids.popitem(last=False)


_CHATS = _ChatCache(_CHAT_CACHE_SIZE)


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


@dataclass(frozen=True)
class PromptTiming:
    """Where a request's wait for its token ids went (seconds): for the generator's log, to tell the
    tokenizer's own time from the time its thread or the event loop took to get to it."""

    queued_s: float  # from asking until the tokenizer thread started its batch
    encoded_s: float  # the batch's encoding on that thread (the whole batch's)
    resumed_s: float  # from the batch's end until the request ran again in the event loop
    batch: int  # requests encoded in that batch


class PromptBatcher:
    """Token ids for the prompts of requests that arrive together, in one call on the tokenizer thread.

    While the thread encodes one batch, the requests that arrive wait in the next, so a burst of 100
    chats costs a few batch calls (`prompt_ids_many`) instead of 100 encodes one after another; a
    lone request is encoded at once.
    """

    def __init__(self, executor: Executor, max_batch: int = 32) -> None:
        self._executor = executor
        self._max_batch = max_batch
        self._pending: list[
            tuple[
                Any,
                str | None,
                Sequence[ChatTurn] | None,
                asyncio.Future[tuple[list[int], float, float, int]],
            ]
        ] = []
        self._task: asyncio.Task[None] | None = None
        # The size of the last batches encoded, for tests and benchmarks (bounded: it lives as long as
        # the server).
        self.batches: collections.deque[int] = collections.deque(maxlen=1024)

    async def timed_ids(
        self, tokenizer: Any, prompt: str | None, turns: Sequence[ChatTurn] | None
    ) -> tuple[list[int], PromptTiming]:
        """`prompt_ids(tokenizer, prompt, turns)`, computed with the requests waiting beside it, and
        where the wait for them went."""
        loop = asyncio.get_running_loop()
        asked = time.monotonic()
        future: asyncio.Future[tuple[list[int], float, float, int]] = loop.create_future()
        self._pending.append((tokenizer, prompt, turns, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        ids, started, ended, batch = await future
        timing = PromptTiming(started - asked, ended - started, time.monotonic() - ended, batch)
        return ids, timing

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            tokenizer = self._pending[0][0]
            batch = [p for p in self._pending if p[0] is tokenizer][: self._max_batch]
            taken = {id(p[3]) for p in batch}
            self._pending = [p for p in self._pending if id(p[3]) not in taken]
            batch = [p for p in batch if not p[3].done()]  # callers that left are not encoded
            if not batch:
                continue
            self.batches.append(len(batch))
            try:
                results, started, ended = await loop.run_in_executor(
                    self._executor, timed_call, prompt_ids_many, tokenizer, [(p[1], p[2]) for p in batch]
                )
            except BaseException as exc:
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
                if not isinstance(exc, Exception):
                    raise
                continue
            for (*_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, InvalidRequest):
                    future.set_exception(result)
                else:
                    future.set_result((result, started, ended, len(batch)))


def timed_call(work: Callable[..., T], *args: Any) -> tuple[T, float, float]:
    """`work(*args)`, with when the thread that ran it started and ended it (`time.monotonic()`): for
    prepare's log, to tell a helper thread's own work from the waits to get to it and back."""
    started = time.monotonic()
    result = work(*args)
    return result, started, time.monotonic()
