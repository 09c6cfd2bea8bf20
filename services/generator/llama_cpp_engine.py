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
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import llama_cpp
import numpy as np
from llama_cpp import Llama, LogitsProcessorList
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llguidance import LLMatcher

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
from services.generator.models import packaged_gguf
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
        self._chat: Jinja2ChatFormatter | None = None
        self._pieces: dict[int, bytes] = {}
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
        async for _ in self.generate(warmup):
            pass

    def _load(self) -> None:
        settings = self._settings
        path = Path(settings.model) if settings.model else packaged_gguf()
        if not path.is_file():
            raise FileNotFoundError(f"GENERATOR_MODEL: no GGUF file at {path}")
        threads = settings.n_threads or _default_threads()
        llama = load_llama(
            model_path=str(path),
            n_ctx=settings.max_model_len or DEFAULT_CONTEXT,
            n_batch=settings.n_batch,
            n_ubatch=settings.n_batch,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        vocab = self._vocab(llama)
        self._grammars = Grammars(vocab)
        template = llama.metadata.get("tokenizer.chat_template")
        if template:
            self._chat = Jinja2ChatFormatter(
                template=template,
                eos_token=_token_text(vocab, llama_cpp.llama_vocab_eos(vocab)),
                bos_token=_token_text(vocab, llama_cpp.llama_vocab_bos(vocab)),
                add_generation_prompt=True,
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
                "chat_template": "gguf" if template else "none",
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
                ends = self._offsets(item, tokens) if offsets else None
                counts.append(TokenCount(len(tokens), ends))
            else:
                counts.append(TokenCount(len(self._chat_tokens(item))))
        return counts

    def _offsets(self, text: str, tokens: list[int]) -> tuple[int, ...]:
        """The end of each token in `text`, in code points (see `GenerationEngine.tokenize`)."""
        data = text.encode("utf-8")
        vocab = self._vocab(self._require_loaded())
        ends = np.fromiter(
            itertools.accumulate(len(self._piece(vocab, t)) for t in tokens),
            dtype=np.int64,
            count=len(tokens),
        )
        if ends.size and ends[-1] > len(data):  # SentencePiece vocabularies add a leading space
            ends -= ends[-1] - len(data)
        ends = np.clip(ends, 0, len(data))
        starts = (np.frombuffer(data, dtype=np.uint8) & 0xC0) != 0x80  # first bytes of characters
        chars_before = np.concatenate(([0], np.cumsum(starts)))
        # A token that ends inside a character counts up to that character's start.
        inside = np.append(~starts, False)[ends]
        return tuple(int(n) for n in chars_before[ends] - inside)

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
        context = self.info.max_model_len
        if len(tokens) + request.max_tokens > context:
            raise PromptTooLong(
                f"the prompt has {len(tokens)} tokens and {request.max_tokens} output tokens were asked "
                f"for, but the model's context holds {context} tokens"
            )
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
        llama = self._require_loaded()
        if request.messages is not None:
            tokens = self._chat_tokens(request.messages)
        elif request.prompt:
            tokens = llama.tokenize(request.prompt.encode("utf-8"), add_bos=True, special=False)
        else:
            tokens = []
        if not tokens:
            raise InvalidRequest("the prompt is empty")
        return tokens

    def _matcher(self, schema: dict[str, Any]) -> LLMatcher:
        assert self._grammars is not None
        try:
            return self._grammars.matcher(schema)
        except SchemaError as exc:
            raise InvalidRequest(f"output.json_schema: {exc}") from exc

    def _chat_tokens(self, turns: Sequence[ChatTurn]) -> list[int]:
        llama = self._require_loaded()
        if self._chat is None:
            raise InvalidRequest("this model has no chat template; send a prompt instead of chat messages")
        messages: Any = [{"role": turn.role, "content": turn.content} for turn in turns]
        try:
            text = self._chat(messages=messages).prompt
        except Exception as exc:  # jinja2 errors, or raise_exception() inside the template
            raise InvalidRequest(f"the chat cannot be rendered with the model's template: {exc}") from exc
        # The template writes the special tokens (BOS, turn markers) itself.
        return llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)

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
        vocab = self._vocab(llama)
        s = request.sampling
        llama.set_seed(
            s.seed % llama_cpp.LLAMA_DEFAULT_SEED if s.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
        )
        text = TextStream(request.stop)
        completion_tokens = 0
        finish: Literal["stop", "length"] | None = None
        mask = TokenMask(job.matcher, llama.n_vocab()) if job.matcher is not None else None
        # The prompt is already evaluated, so generate() starts sampling at once.
        tokens = llama.generate(
            job.tokens,
            temp=s.temperature if s.temperature is not None else 0.8,
            top_k=s.top_k if s.top_k is not None else 40,
            top_p=s.top_p if s.top_p is not None else 0.95,
            min_p=0.05,
            repeat_penalty=s.repetition_penalty if s.repetition_penalty is not None else 1.0,
            frequency_penalty=s.frequency_penalty if s.frequency_penalty is not None else 0.0,
            presence_penalty=s.presence_penalty if s.presence_penalty is not None else 0.0,
            logits_processor=LogitsProcessorList([mask]) if mask is not None else None,
        )
        try:
            for token in tokens:
                if job.stop.is_set():
                    return None, completion_tokens
                # Past a complete document only end-of-sequence is allowed, ignore_eos or not.
                if llama_cpp.llama_vocab_is_eog(vocab, token) and (
                    not request.ignore_eos or mask is not None
                ):
                    finish = "stop"
                    break
                completion_tokens += 1
                delta, count = text.push(self._piece(vocab, token))
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

    def _piece(self, vocab: Any, token: int) -> bytes:
        """The bytes of one token (a special token has none)."""
        piece = self._pieces.get(token)
        if piece is None:
            size = 64
            while True:
                buffer = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, False)
                if n >= 0:
                    break
                size = -n  # a negative result is the size it needs
            piece = self._pieces[token] = buffer.raw[:n]
        return piece

    # -- helpers ------------------------------------------------------------------------------

    @property
    def _model(self) -> Llama:
        """The model, for the worker thread: jobs only exist once `start()` has loaded it."""
        assert self._llama is not None
        return self._llama

    def _require_loaded(self) -> Llama:
        if self._llama is None or self._closed:
            raise EngineUnavailable("the llama.cpp engine is not running")
        return self._llama

    @staticmethod
    def _vocab(llama: Llama) -> Any:
        return llama_cpp.llama_model_get_vocab(llama.model)


_PARAMS_LOCK = threading.Lock()


def load_llama(**kwargs: Any) -> Llama:
    """`Llama(**kwargs)` without llama.cpp's extra buffer types (weight repacking, AMX kernels).

    On an AMX-capable Xeon in a VM, a build of llama-cpp-python 0.3.36 for the host CPU segfaults
    on the first batch of more than one token when those buffers are in use; the plain CPU buffers
    are as fast for small models. `Llama` has no argument for it, so its default model parameters
    are adjusted while it loads.
    """
    import llama_cpp.llama as llama_module

    defaults = llama_module.llama_cpp.llama_model_default_params

    def params() -> Any:
        value = defaults()
        value.use_extra_bufts = False
        return value

    with _PARAMS_LOCK:
        llama_module.llama_cpp.llama_model_default_params = params
        try:
            return Llama(**kwargs)
        finally:
            llama_module.llama_cpp.llama_model_default_params = defaults


def _token_text(vocab: Any, token: int) -> str:
    if token < 0:
        return ""
    return (llama_cpp.llama_vocab_get_text(vocab, token) or b"").decode("utf-8", "replace")


def _default_threads() -> int:
    """Half the CPUs this process may run on (its affinity mask, which containers narrow).

    llama.cpp's threads spin while they wait for each other; when they compete with the event loop
    and gRPC's threads for every CPU, decoding slows down tenfold, so some CPUs are left free.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // 2)
