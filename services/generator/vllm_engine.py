"""`GenerationEngine` on vLLM's V1 `AsyncLLM` (GPU).

The only module that imports vLLM, and only inside `VllmEngine.start()` and `generate()`, so the
service, its tests and CI run without it. Verified with vLLM 0.25.1 on an H100.

How a request flows: the chat template and tokenizer run in a worker thread (a long diff must not
stall the event loop), the token ids go to `AsyncLLM.generate()` with `RequestOutputKind.DELTA`,
and each `RequestOutput` becomes at most one `EngineDelta`.

JSON schemas go to llguidance (vLLM's `guidance` structured-outputs backend), which matches a
`pattern` against the decoded string as JSON Schema says, as the llama.cpp backend's grammar does.
xgrammar, vLLM's default, matches it against the raw JSON text (`\\n` in a pattern then asks for a
raw newline, which no JSON string holds) and forbids every escape in a string with maxLength. A
schema is checked as the llama.cpp backend checks it, so both refuse the same schemas with the same
message, and a string's pattern and length bounds are folded into one pattern, which llguidance
matches ~15x faster per token than the pair. Cancelling the consuming task aborts
the request inside vLLM (`AsyncLLM.generate` catches `CancelledError` and calls `abort`); a
deadline aborts it explicitly through a timer, so no per-token clock check is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import time
from collections.abc import AsyncGenerator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

from services.common.errors import InvalidArgument, Unavailable
from services.generator.engine import (
    EngineDelta,
    EngineEvent,
    EngineFinished,
    EngineLoad,
    EngineRequest,
    EngineStarted,
    ModelInfo,
    PromptTooLong,
)
from services.generator.json_grammar import fold_lengths_into_patterns, json_schema_to_grammar

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

# How often vLLM's own stats line ("Avg prompt throughput ..., Running: N reqs") is logged,
# as `vllm serve` does.
_STATS_LOG_INTERVAL_S = 10.0

# vLLM's StructuredOutputsConfig. Compact JSON and no properties beyond those listed, as the
# llama.cpp backend's grammar allows (its `space` is at most one blank; listed properties only).
STRUCTURED_OUTPUTS: dict[str, Any] = {
    "backend": "guidance",
    "disable_any_whitespace": True,
    "disable_additional_properties": True,
}
_SCHEMA_CACHE_SIZE = 64

_WARMUP_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


class VllmSettings(Protocol):
    """The generator settings this backend reads (`GeneratorSettings` has them all)."""

    @property
    def model(self) -> str: ...
    @property
    def model_id(self) -> str: ...
    @property
    def tokenizer(self) -> str | None: ...
    @property
    def max_model_len(self) -> int | None: ...
    @property
    def default_max_tokens(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def gpu_memory_utilization(self) -> float: ...
    @property
    def tensor_parallel_size(self) -> int: ...
    @property
    def quantization(self) -> str | None: ...
    @property
    def max_num_seqs(self) -> int | None: ...
    @property
    def enable_prefix_caching(self) -> bool | None: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def load_format(self) -> str: ...
    @property
    def trust_remote_code(self) -> bool: ...


def engine_args(settings: VllmSettings) -> dict[str, Any]:
    """Keyword arguments for `vllm.AsyncEngineArgs`; settings left unset keep vLLM's defaults."""
    args: dict[str, Any] = {
        "model": settings.model,
        "served_model_name": settings.model_id,
        "dtype": settings.dtype,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "load_format": settings.load_format,
        "trust_remote_code": settings.trust_remote_code,
        # Requests are logged by the servicer; vLLM's per-request log lines would double them.
        "enable_log_requests": False,
        "structured_outputs_config": dict(STRUCTURED_OUTPUTS),
    }
    optional = {
        "tokenizer": settings.tokenizer,
        "max_model_len": settings.max_model_len,
        "quantization": settings.quantization,
        "max_num_seqs": settings.max_num_seqs,
        "enable_prefix_caching": settings.enable_prefix_caching,
        "seed": settings.seed,
    }
    # "" counts as unset too: an empty environment variable means "vLLM decides".
    args.update({k: v for k, v in optional.items() if v is not None and v != ""})
    return args


# Generation-config keys vLLM reports as the model's defaults that map onto `Sampling` fields.
_DEFAULTABLE = ("temperature", "top_p", "top_k", "repetition_penalty", "min_p")


def sampling_kwargs(request: EngineRequest, model_defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams`, without the vLLM-typed ones (output kind, schema).

    Unset sampling fields take the model's generation-config defaults (as `vllm serve` does), then
    vLLM's neutral ones.
    """
    kwargs = {k: v for k, v in model_defaults.items() if k in _DEFAULTABLE}
    s = request.sampling
    for name, value in (
        ("temperature", s.temperature),
        ("top_p", s.top_p),
        ("top_k", s.top_k),
        ("repetition_penalty", s.repetition_penalty),
        ("seed", s.seed),
    ):
        if value is not None:
            kwargs[name] = value
    kwargs["max_tokens"] = request.max_tokens
    kwargs["ignore_eos"] = request.ignore_eos
    if request.stop:
        kwargs["stop"] = list(request.stop)
    return kwargs


@functools.lru_cache(maxsize=_SCHEMA_CACHE_SIZE)
def _prepared_schema(schema_json: str) -> str:
    schema = json.loads(schema_json)
    try:
        json_schema_to_grammar(schema)  # refuses what the llama.cpp backend refuses
        return json.dumps(fold_lengths_into_patterns(schema), ensure_ascii=False)
    except ValueError as exc:
        raise InvalidArgument(f"output.json_schema: {exc}") from exc


def prepared_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema as llguidance gets it (see the module's docstring); InvalidArgument if refused."""
    key = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # A copy each time: vLLM edits the schema it is given (additionalProperties).
    return json.loads(_prepared_schema(key))


def check_fits(prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    if prompt_tokens + max_tokens > max_model_len:
        raise PromptTooLong(
            f"the prompt has {prompt_tokens} tokens and {max_tokens} output tokens were asked for, "
            f"but the model's context holds {max_model_len} tokens"
        )


def finish_reason_of(vllm_reason: str | None) -> Literal["stop", "length"] | None:
    """Our finish reason for vLLM's, or None where the request did not finish normally."""
    if vllm_reason == "length":
        return "length"
    # "repetition": vLLM stopped a degenerate loop, which is a stop, not a budget running out.
    if vllm_reason in ("stop", "repetition"):
        return "stop"
    return None  # "abort", "error"


class SchedulerSnapshot:
    """The latest scheduler counts, kept by a vLLM stat logger (duck-typed to `StatLoggerBase`).

    vLLM sends scheduler stats with each engine step's outputs, so the counts go stale when the
    engine falls idle; `VllmEngine.load()` bounds them by the live request count.
    """

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0

    def factory(self, vllm_config: Any, engine_index: int = 0) -> SchedulerSnapshot:
        """vLLM's `PerEngineStatLoggerFactory`: one engine core here, so one shared snapshot."""
        return self

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            self.running = scheduler_stats.num_running_reqs
            self.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs

    def log(self) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass


def split_load(unfinished: int, scheduler_waiting: int) -> EngineLoad:
    """Running and waiting out of the requests vLLM still holds.

    `unfinished` is exact at every moment (it drops as soon as a request is aborted);
    `scheduler_waiting` is as of the last engine step.
    """
    waiting = min(scheduler_waiting, unfinished)
    return EngineLoad(running=unfinished - waiting, waiting=waiting)


@dataclass(frozen=True)
class _Loaded:
    """What `start()` learns from the built engine."""

    llm: AsyncLLM
    tokenizer: Any
    max_model_len: int
    model_defaults: dict[str, Any]


class VllmEngine:
    """vLLM's AsyncLLM behind the `GenerationEngine` protocol."""

    def __init__(self, settings: VllmSettings) -> None:
        self._settings = settings
        self._snapshot = SchedulerSnapshot()
        self._loaded: _Loaded | None = None
        self._stats_task: asyncio.Task[None] | None = None
        # Deadline aborts run as tasks; held here so they are not collected mid-flight.
        self._aborts: set[asyncio.Task[None]] = set()
        # vLLM aborts by the id it was given; callers' ids need not be unique, these are.
        self._sequence = itertools.count()
        # One thread, as vLLM's own server does: a fast tokenizer's truncation and padding are
        # shared mutable state, and the GIL serializes the work anyway; the point is only to keep
        # a long chat template off the event loop.
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self.info = ModelInfo(
            model=settings.model_id,
            backend="vllm",
            model_path=settings.model,
            max_model_len=settings.max_model_len or 0,
            default_max_tokens=settings.default_max_tokens,
            engine_settings={k: str(v) for k, v in engine_args(settings).items()},
        )

    @property
    def async_llm(self) -> AsyncLLM:
        """The running vLLM engine, for benchmarks that drive it directly."""
        return self._require_loaded().llm

    async def start(self) -> None:
        import vllm
        from vllm import AsyncEngineArgs
        from vllm.config import StructuredOutputsConfig
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        started = time.monotonic()
        kwargs = engine_args(self._settings)
        kwargs["structured_outputs_config"] = StructuredOutputsConfig(**kwargs["structured_outputs_config"])
        args = AsyncEngineArgs(**kwargs)
        # Built on the event loop, as `vllm serve` builds it: the constructor blocks until the
        # engine core process has loaded the model, and its queues bind to this loop.
        # OPENAI_API_SERVER picks the same batch defaults as `vllm serve` on this GPU.
        llm = AsyncLLM.from_engine_args(
            args, usage_context=UsageContext.OPENAI_API_SERVER, stat_loggers=[self._snapshot.factory]
        )
        config = llm.vllm_config
        self._loaded = _Loaded(
            llm=llm,
            tokenizer=llm.get_tokenizer(),
            # vLLM may shrink the context to what the KV cache holds; this is the real limit.
            max_model_len=config.model_config.max_model_len,
            model_defaults=config.model_config.get_diff_sampling_param(),
        )
        self.info = replace(
            self.info,
            max_model_len=config.model_config.max_model_len,
            engine_settings=self._engine_settings(vllm.__version__),
        )
        log.info(
            "vLLM %s engine up in %.1fs: %s",
            vllm.__version__,
            time.monotonic() - started,
            self.info.engine_settings,
        )
        await self._warm_up()
        self._stats_task = asyncio.create_task(self._log_stats())

    def _engine_settings(self, version: str) -> dict[str, str]:
        config = self._require_loaded().llm.vllm_config
        model, cache, sched = config.model_config, config.cache_config, config.scheduler_config
        resolved: dict[str, Any] = {
            "vllm_version": version,
            "dtype": str(model.dtype).removeprefix("torch."),
            "quantization": model.quantization or "none",
            "max_model_len": model.max_model_len,
            "gpu_memory_utilization": cache.gpu_memory_utilization,
            "tensor_parallel_size": config.parallel_config.tensor_parallel_size,
            "max_num_seqs": sched.max_num_seqs,
            "max_num_batched_tokens": sched.max_num_batched_tokens,
            "enable_prefix_caching": cache.enable_prefix_caching,
            "kv_cache_blocks": cache.num_gpu_blocks,
            "kv_block_size": cache.block_size,
            "seed": model.seed,
            "load_format": config.load_config.load_format,
            "structured_outputs_backend": config.structured_outputs_config.backend,
        }
        return {k: str(v) for k, v in resolved.items()}

    async def _warm_up(self) -> None:
        """One plain and one schema-constrained request, so the first real ones pay no set-up."""
        for schema in (None, _WARMUP_SCHEMA):
            request = EngineRequest(
                request_id=f"warmup-{'json' if schema else 'text'}",
                prompt="Hello",
                messages=None,
                max_tokens=8,
                json_schema=schema,
            )
            async for _ in self.generate(request):
                pass

    async def _log_stats(self) -> None:
        llm = self._require_loaded().llm
        while True:
            await asyncio.sleep(_STATS_LOG_INTERVAL_S)
            await llm.do_log_stats()

    def load(self) -> EngineLoad:
        if self._loaded is None:
            return EngineLoad(running=0, waiting=0)
        unfinished = self._loaded.llm.output_processor.get_num_unfinished_requests()
        return split_load(unfinished, self._snapshot.waiting)

    async def close(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_task
        if self._loaded is not None:
            self._loaded.llm.shutdown()
            self._loaded = None
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        loaded = self._require_loaded()
        llm = loaded.llm
        from vllm import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        prompt_ids, schema = await asyncio.get_running_loop().run_in_executor(
            self._tokenizer_thread, self._prepare, loaded.tokenizer, request
        )
        if not prompt_ids:
            raise InvalidArgument("the prompt is empty")
        check_fits(len(prompt_ids), request.max_tokens, loaded.max_model_len)
        try:
            params = self._sampling_params(request, schema)
        except ValueError as exc:
            raise InvalidArgument(f"invalid generation parameters: {exc}") from exc
        engine_request_id = f"{request.request_id}-{next(self._sequence)}"
        arrival = time.monotonic()
        expiry = self._arm_deadline(llm, engine_request_id, request.deadline, arrival)
        outputs = llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, engine_request_id)
        prompt_tokens = len(prompt_ids)
        completion_tokens = 0
        # Tokens whose text the detokenizer holds back (part of a multi-byte character) are
        # counted with the next text that carries them.
        pending_tokens = 0
        started = False
        try:
            # Closing `outputs` when this generator is closed early makes vLLM abort the request.
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    completion = out.outputs[0]
                    if not started:
                        started = True
                        yield EngineStarted(prompt_tokens=prompt_tokens, queue_s=_queue_s(out, arrival))
                    n = len(completion.token_ids)
                    completion_tokens += n
                    pending_tokens += n
                    if completion.text:
                        yield EngineDelta(text=completion.text, token_count=pending_tokens)
                        pending_tokens = 0
                    if out.finished:
                        reason = finish_reason_of(completion.finish_reason)
                        if reason is None:
                            raise self._abnormal_end(request, completion.finish_reason)
                        yield EngineFinished(
                            finish_reason=reason,
                            prompt_tokens=prompt_tokens,
                            completion_tokens=completion_tokens,
                            cached_prompt_tokens=out.num_cached_tokens or 0,
                        )
        except EngineDeadError as exc:
            raise Unavailable("the vLLM engine has died; the generator must restart") from exc
        except ValueError as exc:
            if started:
                raise
            # vLLM's request validation (e.g. a JSON Schema its grammar backend cannot compile).
            raise InvalidArgument(f"vLLM rejected the request: {exc}") from exc
        finally:
            if expiry is not None:
                expiry.cancel()

    @classmethod
    def _prepare(cls, tokenizer: Any, request: EngineRequest) -> tuple[list[int], dict[str, Any] | None]:
        """The prompt's token ids and the schema for vLLM: the CPU work before a request is sent."""
        schema = prepared_schema(request.json_schema) if request.json_schema is not None else None
        return cls._tokenize(tokenizer, request), schema

    @staticmethod
    def _tokenize(tokenizer: Any, request: EngineRequest) -> list[int]:
        if request.messages is None:
            return list(tokenizer.encode(request.prompt or ""))
        messages = [{"role": turn.role, "content": turn.content} for turn in request.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja2 TemplateError, or ValueError for a model with no template
            raise InvalidArgument(f"the chat cannot be rendered with the model's template: {exc}") from exc
        # The template writes the special tokens (BOS) itself.
        return list(tokenizer.encode(text, add_special_tokens=False))

    def _sampling_params(self, request: EngineRequest, schema: dict[str, Any] | None) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = None
        if schema is not None:
            structured = StructuredOutputsParams(json=schema)
        return SamplingParams(
            **sampling_kwargs(request, self._require_loaded().model_defaults),
            output_kind=RequestOutputKind.DELTA,
            structured_outputs=structured,
        )

    def _arm_deadline(
        self, llm: AsyncLLM, engine_request_id: str, deadline: float | None, now: float
    ) -> asyncio.TimerHandle | None:
        if deadline is None:
            return None
        remaining = deadline - now
        if remaining <= 0:
            raise TimeoutError("deadline exceeded before generation started")

        def expire() -> None:
            # Aborting ends the stream with finish_reason "abort", which `generate` turns into
            # TimeoutError; the generating task itself is left alone.
            task = asyncio.create_task(llm.abort(engine_request_id))
            self._aborts.add(task)
            task.add_done_callback(self._aborts.discard)

        return asyncio.get_running_loop().call_later(remaining, expire)

    @staticmethod
    def _abnormal_end(request: EngineRequest, reason: str | None) -> Exception:
        if request.deadline is not None and time.monotonic() >= request.deadline:
            return TimeoutError("deadline exceeded during generation")
        if reason == "error":
            return Unavailable("vLLM failed the request (retryable)")
        return Unavailable(f"vLLM ended the request early ({reason})")

    def _require_loaded(self) -> _Loaded:
        if self._loaded is None:
            raise Unavailable("the vLLM engine is not started")
        return self._loaded


def _queue_s(out: Any, arrival: float) -> float:
    """Seconds from our hand-off to vLLM until its scheduler first ran the request.

    vLLM stamps `scheduled_ts` with the engine core's `time.monotonic()`, the same clock as ours
    on one host.
    """
    metrics = out.metrics
    scheduled = getattr(metrics, "scheduled_ts", 0.0) if metrics is not None else 0.0
    if not scheduled:
        return 0.0
    return min(max(scheduled - arrival, 0.0), time.monotonic() - arrival)
