"""`GenerationEngine` on llama.cpp (llama-cpp-python), for CPUs and GGUF models.

One llama.cpp context serves every request, so requests run one at a time on a single worker
thread, in arrival order; `load()` reports the one running and those queued behind it. The worker
hands events to the event loop with `call_soon_threadsafe`, and checks a `threading.Event` before
every prompt batch and after every token: when the consuming task is cancelled (the gRPC call
ended) or the request's deadline passes, generation stops within one decode step and the next
request starts.

Text is decoded incrementally (`TextStream`), so a Korean syllable split across tokens is sent
whole. Chat messages are rendered with the GGUF's own chat template. A JSON Schema is compiled by
llguidance (`guidance`, with the semantics `json_grammar` defines for both engines), once per
schema, in `prepare`; a logits processor masks every sampling step. Unset sampling fields take llama.cpp's defaults: temperature 0.8, top_k 40, top_p 0.95,
min_p 0.05, no repetition penalty; a request without a seed draws a random one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import llama_cpp
import numpy as np
from llama_cpp import Llama, LogitsProcessorList
from llguidance import LLMatcher

from services.generator.chat_format import RenderedChat, Renderer, chat_renderer, render_plain
from services.generator.config import GeneratorSettings
from services.generator.engine import (
    ChatTurn,
    EngineDelta,
    EngineEvent,
    EngineFinished,
    EngineLoad,
    EngineRequest,
    EngineStarted,
    EngineUnavailable,
    InvalidRequest,
    ModelInfo,
    Prepared,
    PromptTooLong,
    Sampling,
    TokenCount,
    TokenizeInput,
)
from services.generator.guidance import Grammars, TokenMask
from services.generator.json_grammar import SchemaError
from services.generator.llama_model import Vocabulary, default_threads, load_llama
from services.generator.models import packaged_gguf
from services.generator.repetition import RepetitionPenalty
from services.generator.text_stream import TextStream

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 8192
_WARMUP_SCHEMA = {"type": "boolean"}


@dataclass
class _Job:
    """One request on its way through the worker thread."""

    request: EngineRequest
    tokens: list[int]
    matcher: LLMatcher | None
    arrived: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[EngineEvent | BaseException] = field(default_factory=asyncio.Queue)
    # Set when the consumer leaves or the deadline passes; the worker checks it per token.
    stop: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: EngineEvent | BaseException) -> None:
        # The consumer may be gone, and at interpreter exit its loop with it.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class LlamaCppEngine:
    """llama-cpp-python's `Llama` behind the `GenerationEngine` protocol."""

    def __init__(self, settings: GeneratorSettings) -> None:
        self._settings = settings
        self._llama: Llama | None = None
        self._render: Renderer = render_plain
        self._vocabulary: Vocabulary | None = None
        self._grammars: Grammars | None = None
        # Every llama.cpp call on the context runs on this one thread.
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-cpp")
        # Tokenizing and compiling schemas (prepare), beside the worker and bounded apart from it.
        self._preparer = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="llama-prepare"
        )
        self._pending = 0  # jobs submitted and not finished, the running one included
        self._pending_lock = threading.Lock()
        self._running: _Job | None = None
        self._closed = False
        self.info = ModelInfo(
            model=settings.model_id,
            backend="llama_cpp",
            model_path=settings.model,
            max_model_len=settings.max_model_len or DEFAULT_CONTEXT,
            default_max_tokens=settings.default_max_tokens,
            engine_settings={},
        )

    async def start(self) -> None:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._worker, self._load)
        log.info(
            "llama.cpp loaded %s in %.1fs: %s",
            self.info.model_path,
            time.monotonic() - started,
            self.info.engine_settings,
        )
        warmup = EngineRequest(
            request_id="warmup",
            prompt="Hello",
            messages=None,
            max_tokens=4,
            sampling=Sampling(temperature=0.0),
            json_schema=_WARMUP_SCHEMA,
        )
        # Prepared here, not by `prepare`: the warm-up's schema is ours, and the first compilation (the
        # tokenizer's tables) may take longer than GENERATOR_SCHEMA_COMPILE_TIMEOUT_S allows a caller's.
        tokens = await loop.run_in_executor(self._preparer, self._prompt_tokens, warmup)
        matcher = await loop.run_in_executor(self._preparer, self._matcher, _WARMUP_SCHEMA)
        warmup = replace(warmup, prepared=Prepared(prompt_tokens=tuple(tokens), constraint=matcher))
        async for _ in self.generate(warmup):
            pass

    def _load(self) -> None:
        settings = self._settings
        path = Path(settings.model) if settings.model else packaged_gguf()
        if not path.is_file():
            raise FileNotFoundError(f"GENERATOR_MODEL: no GGUF file at {path}")
        threads = settings.n_threads or default_threads()
        llama = load_llama(
            model_path=str(path),
            n_ctx=settings.max_model_len or DEFAULT_CONTEXT,
            n_batch=settings.n_batch,
            n_ubatch=settings.n_batch,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        vocabulary = self._vocabulary = Vocabulary(llama)
        self._grammars = Grammars(vocabulary.vocab)
        chat_format, self._render = chat_renderer(
            settings.chat_format,
            template=llama.metadata.get("tokenizer.chat_template"),
            eos_token=vocabulary.text(llama_cpp.llama_vocab_eos(vocabulary.vocab)),
            bos_token=vocabulary.text(llama_cpp.llama_vocab_bos(vocabulary.vocab)),
        )
        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(llama.model, desc, len(desc))
        self._llama = llama
        self.info = replace(
            self.info,
            model_path=str(path),
            max_model_len=llama.n_ctx(),
            engine_settings={
                "llama_cpp_python_version": llama_cpp.__version__,
                "model_desc": desc.value.decode("utf-8", "replace"),
                "n_ctx": str(llama.n_ctx()),
                "n_ctx_train": str(llama_cpp.llama_model_n_ctx_train(llama.model)),
                "n_batch": str(llama.n_batch),
                "n_threads": str(threads),
                "chat_format": chat_format,
                "repetition_penalty": str(settings.default_repetition_penalty),
                "frequency_penalty": str(settings.default_frequency_penalty),
                "presence_penalty": str(settings.default_presence_penalty),
                "penalty_last_n": str(settings.penalty_last_n),
                "structured_output": "llguidance",
                "max_concurrent_generations": "1",
            },
        )

    async def tokenize(self, inputs: Sequence[TokenizeInput], *, offsets: bool) -> list[TokenCount]:
        self._require_loaded()
        return await asyncio.to_thread(self._count, list(inputs), offsets)

    def _count(self, inputs: list[TokenizeInput], offsets: bool) -> list[TokenCount]:
        llama = self._require_loaded()
        counts = []
        for item in inputs:
            if isinstance(item, str):
                tokens = llama.tokenize(item.encode("utf-8"), add_bos=False, special=False) if item else []
                ends = self._vocabulary_().end_offsets(item, tokens) if offsets else None
                counts.append(TokenCount(len(tokens), ends))
            else:
                counts.append(TokenCount(len(self._chat_tokens(item))))
        return counts

    def load(self) -> EngineLoad:
        running = 1 if self._running is not None else 0
        return EngineLoad(running=running, waiting=max(self._pending - running, 0))

    async def close(self) -> None:
        self._closed = True
        running = self._running
        if running is not None:
            running.emit(EngineUnavailable("the generator is shutting down"))
            running.stop.set()
        # Queued jobs are cancelled; `_job_done` tells their consumers.
        await asyncio.to_thread(self._worker.shutdown, wait=True, cancel_futures=True)
        self._preparer.shutdown(wait=False, cancel_futures=True)
        if self._llama is not None:
            self._llama.close()
            self._llama = None

    async def prepare(self, request: EngineRequest) -> EngineRequest:
        self._require_loaded()
        loop = asyncio.get_running_loop()
        tokens = await loop.run_in_executor(self._preparer, self._prompt_tokens, request)
        matcher = None
        if request.json_schema is not None:
            timeout = self._settings.schema_compile_timeout_s
            compiling = loop.run_in_executor(self._preparer, self._matcher, request.json_schema)
            try:
                matcher = await asyncio.wait_for(compiling, timeout)
            except TimeoutError:
                # llguidance's own limits bound the work left in the thread.
                raise InvalidRequest(
                    f"output.json_schema: compiling it took more than {timeout:g} s "
                    "(GENERATOR_SCHEMA_COMPILE_TIMEOUT_S); simplify the schema"
                ) from None
        return replace(request, prepared=Prepared(prompt_tokens=tuple(tokens), constraint=matcher))

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        self._require_loaded()
        arrived = time.monotonic()
        if request.prepared is None:
            request = await self.prepare(request)
        assert request.prepared is not None
        loop = asyncio.get_running_loop()
        job = _Job(
            request=request,
            tokens=list(request.prepared.prompt_tokens),
            matcher=request.prepared.constraint,
            arrived=arrived,
            loop=loop,
        )
        expiry = None
        if request.deadline is not None:
            remaining = request.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("deadline exceeded before generation started")
            expiry = loop.call_later(remaining, self._expire, job)
        with self._pending_lock:
            self._pending += 1
        future = self._worker.submit(self._run, job)
        future.add_done_callback(functools.partial(self._job_done, job))
        try:
            while True:
                item = await job.events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, EngineFinished):
                    return
        finally:
            # Whether the consumer left, the deadline passed or the stream ended: stop the worker
            # at its next token, or drop the job if it has not started.
            job.stop.set()
            future.cancel()
            if expiry is not None:
                expiry.cancel()

    @staticmethod
    def _expire(job: _Job) -> None:
        job.stop.set()
        job.events.put_nowait(TimeoutError("deadline exceeded during generation"))

    def _job_done(self, job: _Job, future: concurrent.futures.Future[None]) -> None:
        with self._pending_lock:
            self._pending -= 1
        if future.cancelled() and not job.stop.is_set():
            job.emit(EngineUnavailable("the generator shut down before this request started"))

    # -- preparation (any thread) -------------------------------------------------------------

    def _prompt_tokens(self, request: EngineRequest) -> list[int]:
        """The prompt's tokens; PromptTooLong when they cannot fit with the output (from the text's
        size alone when that already says so, before tokenizing a huge prompt)."""
        llama = self._require_loaded()
        if request.messages is not None:
            rendered = self._rendered(request.messages)
        else:
            rendered = RenderedChat(request.prompt or "", add_bos=True, special=False)
        data = rendered.text.encode("utf-8")
        room = self.info.max_model_len - request.max_tokens
        at_least = -(-len(data) // self._vocabulary_().max_piece_bytes)
        if at_least > room:
            raise PromptTooLong(
                f"the prompt has at least {at_least} tokens ({len(data)} bytes) and {request.max_tokens} "
                f"output tokens were asked for, but the model's context holds {self.info.max_model_len} tokens"
            )
        tokens = llama.tokenize(data, add_bos=rendered.add_bos, special=rendered.special) if data else []
        if not tokens:
            raise InvalidRequest("the prompt is empty")
        if len(tokens) > room:
            raise PromptTooLong(
                f"the prompt has {len(tokens)} tokens and {request.max_tokens} output tokens were asked "
                f"for, but the model's context holds {self.info.max_model_len} tokens"
            )
        return tokens

    def _matcher(self, schema: dict[str, Any]) -> LLMatcher:
        assert self._grammars is not None
        try:
            return self._grammars.matcher(schema)
        except SchemaError as exc:
            raise InvalidRequest(f"output.json_schema: {exc}") from exc

    def _chat_tokens(self, turns: Sequence[ChatTurn]) -> list[int]:
        rendered = self._rendered(turns)
        return self._require_loaded().tokenize(
            rendered.text.encode("utf-8"), add_bos=rendered.add_bos, special=rendered.special
        )

    def _rendered(self, turns: Sequence[ChatTurn]) -> RenderedChat:
        try:
            return self._render(turns)
        except Exception as exc:  # jinja2 errors, or raise_exception() inside the template
            raise InvalidRequest(f"the chat cannot be rendered with the model's chat format: {exc}") from exc

    # -- the worker thread ----------------------------------------------------------------------

    def _run(self, job: _Job) -> None:
        if job.stop.is_set():
            return
        self._running = job
        try:
            job.emit(EngineStarted(prompt_tokens=len(job.tokens), queue_s=time.monotonic() - job.arrived))
            cached = self._prefill(job)
            if cached is None:
                return
            finish, completion_tokens = self._decode(job)
            if finish is not None:
                job.emit(
                    EngineFinished(
                        finish_reason=finish,
                        prompt_tokens=len(job.tokens),
                        completion_tokens=completion_tokens,
                        cached_prompt_tokens=cached,
                    )
                )
        except Exception as exc:
            log.exception("llama.cpp failed request %s", job.request.request_id)
            # The context may hold half a batch; start the next request from a clean state.
            self._model.reset()
            job.emit(EngineUnavailable(f"llama.cpp failed: {exc}"))
        finally:
            self._running = None

    def _prefill(self, job: _Job) -> int | None:
        """Evaluates the prompt, reusing the KV cache of the longest prefix it shares with the
        previous request; returns the reused token count, or None when stopped."""
        llama = self._model
        tokens = job.tokens
        n = min(llama.n_tokens, len(tokens))
        mismatch = np.flatnonzero(llama.input_ids[:n] != np.asarray(tokens[:n], dtype=llama.input_ids.dtype))
        # The last prompt token is always evaluated again: sampling needs its logits.
        reuse = min(int(mismatch[0]) if mismatch.size else n, len(tokens) - 1)
        memory = llama_cpp.llama_get_memory(llama.ctx)
        if reuse > 0 and memory is not None and llama_cpp.llama_memory_seq_rm(memory, -1, reuse, -1):
            llama.n_tokens = reuse
        else:
            llama.reset()
            reuse = 0
        for start in range(reuse, len(tokens), llama.n_batch):
            if job.stop.is_set():
                return None
            llama.eval(tokens[start : start + llama.n_batch])
        return reuse

    def _decode(self, job: _Job) -> tuple[Literal["stop", "length"] | None, int]:
        """Samples tokens until end of sequence, a stop string or max_tokens; (None, n) when stopped."""
        llama = self._model
        request = job.request
        vocabulary = self._vocabulary_()
        s = request.sampling
        llama.set_seed(
            s.seed % llama_cpp.LLAMA_DEFAULT_SEED if s.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
        )
        text = TextStream(request.stop)
        completion_tokens = 0
        finish: Literal["stop", "length"] | None = None
        mask = TokenMask(job.matcher, llama.n_vocab()) if job.matcher is not None else None
        settings = self._settings
        penalty = RepetitionPenalty(
            vocabulary.words,
            repetition=_or(s.repetition_penalty, settings.default_repetition_penalty),
            frequency=_or(s.frequency_penalty, settings.default_frequency_penalty),
            presence=_or(s.presence_penalty, settings.default_presence_penalty),
            last_n=settings.penalty_last_n,
        )
        processors = [p for p in (mask, penalty if penalty.active else None) if p is not None]
        # The prompt is already evaluated, so generate() starts sampling at once.
        tokens = llama.generate(
            job.tokens,
            temp=s.temperature if s.temperature is not None else 0.8,
            top_k=s.top_k if s.top_k is not None else 40,
            top_p=s.top_p if s.top_p is not None else 0.95,
            min_p=0.05,
            # Penalties are RepetitionPenalty's: llama.cpp's own would weigh the JSON syntax too.
            repeat_penalty=1.0,
            logits_processor=LogitsProcessorList(processors) if processors else None,
        )
        try:
            for token in tokens:
                if job.stop.is_set():
                    return None, completion_tokens
                # Past a complete document only end-of-sequence is allowed, ignore_eos or not.
                if vocabulary.is_end(token) and (not request.ignore_eos or mask is not None):
                    finish = "stop"
                    break
                completion_tokens += 1
                delta, count = text.push(vocabulary.pieces[token])
                if delta:
                    job.emit(EngineDelta(text=delta, token_count=count))
                if text.stopped:
                    finish = "stop"
                    break
                if completion_tokens >= request.max_tokens:
                    finish = "length"
                    break
        finally:
            tokens.close()
            if mask is not None and mask.masks:
                log.debug(
                    "request %s: %d token masks, %.0f us each",
                    request.request_id, mask.masks, mask.mask_s / mask.masks * 1e6,
                )  # fmt: skip
        delta, count = text.flush()
        if delta:
            job.emit(EngineDelta(text=delta, token_count=count))
        return finish, completion_tokens

    # -- helpers ------------------------------------------------------------------------------

    @property
    def _model(self) -> Llama:
        """The model, for the worker thread: jobs only exist once `start()` has loaded it."""
        assert self._llama is not None
        return self._llama

    def _vocabulary_(self) -> Vocabulary:
        assert self._vocabulary is not None
        return self._vocabulary

    def _require_loaded(self) -> Llama:
        if self._llama is None or self._closed:
            raise EngineUnavailable("the llama.cpp engine is not running")
        return self._llama


def _or(value: float | None, default: float) -> float:
    return default if value is None else value
