"""`GenerationEngine` on vLLM's V1 `AsyncLLM` (GPU).

vLLM itself is reached only through `vllm_compat` (every vLLM import and version detail is there),
so this module, the service, its tests and CI run without it. Verified with vLLM 0.25.1 on an H100.
With `GENERATOR_STRUCTURED_OUTPUT_PARALLEL_*` set, `start()` hands them to our vLLM plugin
(`vllm_plugin`) in the engine core process and refuses to start unless they are in force there.

How a request flows: `prepare` renders the chat, tokenizes it (in one batch with the requests that
arrive beside it), checks it fits and readies the schema (`vllm_inputs`) on worker threads, before
the request takes a slot (a long diff must not stall the event loop); `generate` sends the token ids to `AsyncLLM.generate()` with
`RequestOutputKind.DELTA`, and each `RequestOutput` becomes at most one `EngineDelta`. `tokenize`
counts with the same tokenizer and the same chat rendering. Engine errors are `engine.EngineError`s.

JSON schemas go to llguidance (vLLM's `guidance` structured-outputs backend) as the llama.cpp
engine compiles them (`json_grammar.llguidance_schema`: the same library, limits, refusals,
JSON-safe classes, folded length bounds and bounded whitespace), so a schema means the same on
both; vLLM does not validate again what `prepare` validated (`vllm_compat.skip_revalidation`: its
check runs on this event loop, 2-6 ms for a TIL schema, tens for a large one). Cancelling the
consuming task aborts the request inside vLLM (`AsyncLLM.generate` catches `CancelledError` and
calls `abort`); a deadline aborts it explicitly through a timer, so no per-token clock check is
needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

from services.generator import vllm_compat
from services.generator.engine import (
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
    TokenCount,
    TokenizeInput,
)
from services.generator.vllm_compat import SchedulerCounts
from services.generator.vllm_inputs import (
    PromptBatcher,
    SchemaProcesses,
    check_fits,
    count_tokens,
    prepared_schema_text,
    schema_key,
    timed_call,
)
from services.generator.vllm_plugin import BitmaskParallelism, check_in_force

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

# How often vLLM's own stats line ("Avg prompt throughput ..., Running: N reqs") is logged,
# as `vllm serve` does.
_STATS_LOG_INTERVAL_S = 10.0

# vLLM's StructuredOutputsConfig. Each schema carries its own whitespace rule (`x-guidance`, as on
# llama.cpp); no properties beyond those listed, as on llama.cpp.
STRUCTURED_OUTPUTS: dict[str, Any] = {
    "backend": "guidance",
    "disable_any_whitespace": True,
    "disable_additional_properties": True,
}

# Threads that ready JSON Schemas (our checks in Python, then llguidance's validation in Rust).
SCHEMA_THREADS = 4

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
    def stream_interval(self) -> int | None: ...
    @property
    def load_format(self) -> str: ...
    @property
    def trust_remote_code(self) -> bool: ...
    @property
    def schema_compile_timeout_s(self) -> float: ...
    @property
    def schema_workers(self) -> int: ...
    @property
    def structured_output_parallel_threshold(self) -> int | None: ...
    @property
    def structured_output_parallel_workers(self) -> int | None: ...
    @property
    def structured_output_parallel_batch_size(self) -> int | None: ...
    @property
    def structured_output_fill(self) -> str | None: ...


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
        "stream_interval": settings.stream_interval,
    }
    # "" counts as unset too: an empty environment variable means "vLLM decides".
    args.update({k: v for k, v in optional.items() if v is not None and v != ""})
    return args


def bitmask_parallelism(settings: VllmSettings, env: Mapping[str, str]) -> BitmaskParallelism:
    """How the engine core should fill structured-output bitmasks (our vLLM plugin applies it).

    The settings when they ask for anything; otherwise the plugin's own variables in `env`, so that
    a process driving the engine directly (a benchmark) can turn it on as a `vllm serve` would. A fill
    the settings leave unset comes from `TILSERVE_VLLM_BITMASK_FILL`.
    """
    asked = BitmaskParallelism(
        threshold=settings.structured_output_parallel_threshold,
        workers=settings.structured_output_parallel_workers,
        batch_size=settings.structured_output_parallel_batch_size,
        fill=settings.structured_output_fill,
    )
    from_env = BitmaskParallelism.from_environment(env)
    if not asked.requested:
        return from_env
    return asked if asked.fill is not None else replace(asked, fill=from_env.fill)


def apply_bitmask_environment(settings: VllmSettings) -> BitmaskParallelism:
    """Sets our vLLM plugin's variables in this process's environment (which the engine core process
    inherits) to the bitmask parallelism asked for, and returns it."""
    wanted = bitmask_parallelism(settings, os.environ)
    for name, value in wanted.environment().items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    return wanted


def frontend_report(frontend: vllm_compat.FrontEnd | None) -> dict[str, str]:
    """engine_settings entries for the front-end layout: how many share the engine core, and which
    one answered."""
    if frontend is None:
        return {"frontends": "1"}
    return {"frontends": str(frontend.count), "frontend_index": str(frontend.index)}


def asked_settings(settings: VllmSettings) -> dict[str, str]:
    """engine_settings before start: the engine arguments and the bitmask parallelism asked for."""
    asked = {k: str(v) for k, v in engine_args(settings).items()}
    wanted = bitmask_parallelism(settings, os.environ)
    asked.update({f"bitmask_parallel_{k}": str(v) for k, v in wanted.__dict__.items() if v is not None})
    return asked


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
        # Unset: 0, off, in vLLM as in llama.cpp's server.
        ("frequency_penalty", s.frequency_penalty),
        ("presence_penalty", s.presence_penalty),
        ("seed", s.seed),
    ):
        if value is not None:
            kwargs[name] = value
    kwargs["max_tokens"] = request.max_tokens
    kwargs["ignore_eos"] = request.ignore_eos
    if request.stop:
        kwargs["stop"] = list(request.stop)
    return kwargs


def finish_reason_of(vllm_reason: str | None) -> Literal["stop", "length"] | None:
    """Our finish reason for vLLM's, or None where the request did not finish normally."""
    if vllm_reason == "length":
        return "length"
    # "repetition": vLLM stopped a degenerate loop, which is a stop, not a budget running out.
    if vllm_reason in ("stop", "repetition"):
        return "stop"
    return None  # "abort", "error"


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

    def __init__(self, settings: VllmSettings, frontend: vllm_compat.FrontEnd | None = None) -> None:
        self._settings = settings
        # One of several front-ends sharing an engine core (services.generator.frontends), or None:
        # this process starts its own.
        self._frontend = frontend
        self._counts = SchedulerCounts()
        self._loaded: _Loaded | None = None
        self._stats_task: asyncio.Task[None] | None = None
        # Deadline aborts run as tasks; held here so they are not collected mid-flight.
        self._aborts: set[asyncio.Task[None]] = set()
        # vLLM aborts by the id it was given; callers' ids need not be unique, these are.
        self._sequence = itertools.count()
        # Front-ends share one engine core: each numbers its requests apart from the others'.
        self._id_tag = "" if frontend is None else f"f{frontend.index}."
        # One thread, as vLLM's own server does: a fast tokenizer's truncation and padding are
        # shared mutable state, and the GIL serializes the work anyway; the point is only to keep
        # a long chat template off the event loop.
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        # Requests that arrive together (a burst) are tokenized in one batch call on that thread.
        self._prompts = PromptBatcher(self._tokenizer_thread)
        # Schemas are readied in worker processes (`SchemaProcesses` says why), or with
        # GENERATOR_SCHEMA_WORKERS=0 on threads here (llguidance's half of the work without the GIL).
        self._schema_processes = SchemaProcesses(settings.schema_workers) if settings.schema_workers else None
        self._schema_thread = ThreadPoolExecutor(max_workers=SCHEMA_THREADS, thread_name_prefix="schema")
        self._schemas_in_flight = 0
        self.info = ModelInfo(
            model=settings.model_id,
            backend="vllm",
            model_path=settings.model,
            max_model_len=settings.max_model_len or 0,
            default_max_tokens=settings.default_max_tokens,
            engine_settings=asked_settings(settings),
        )

    @property
    def async_llm(self) -> AsyncLLM:
        """The running vLLM engine, for benchmarks that drive it directly."""
        return self._require_loaded().llm

    @property
    def scheduler_counts(self) -> SchedulerCounts:
        """The scheduler's counts as of the engine's last step."""
        return self._counts

    async def start(self) -> None:
        """Builds the engine, checks the bitmask parallelism asked for is in force, warms up.

        BitmaskParallelismNotApplied when it was asked for and the engine core does not run with it.
        """
        started = time.monotonic()
        # The engine core is another process: our vLLM plugin reads these there. (A shared engine core
        # was launched by the front-ends' parent, which set them the same way before.)
        wanted = apply_bitmask_environment(self._settings)
        # vLLM validates a schema again in `add_request`, on this event loop; prepare already did.
        validation = vllm_compat.skip_revalidation()
        # Built on the event loop, as `vllm serve` builds it: the constructor blocks until the
        # engine core process has loaded the model, and its queues bind to this loop.
        llm = vllm_compat.build_async_llm(
            engine_args(self._settings), vllm_compat.scheduler_stat_logger(self._counts), self._frontend
        )
        if self._schema_processes is not None:
            # After the engine is built: vLLM may fork its engine core from this process, which must
            # not inherit the pool's threads and pipes.
            await asyncio.get_running_loop().run_in_executor(None, self._schema_processes.warm)
        self._loaded = _Loaded(
            llm=llm,
            tokenizer=llm.get_tokenizer(),
            max_model_len=vllm_compat.max_model_len(llm),
            model_defaults=vllm_compat.model_sampling_defaults(llm),
        )
        report = await vllm_compat.bitmask_parallelism_report(llm) if wanted.requested else None
        in_force = check_in_force(wanted, report)
        self.info = replace(
            self.info,
            max_model_len=self._loaded.max_model_len,
            engine_settings={
                **vllm_compat.resolved_settings(llm),
                **in_force,
                "structured_outputs_validation": validation,
                "schema_workers": f"{self._settings.schema_workers} processes"
                if self._schema_processes is not None
                else f"{SCHEMA_THREADS} threads",
                **frontend_report(self._frontend),
            },
        )
        log.info("vLLM engine up in %.1fs: %s", time.monotonic() - started, self.info.engine_settings)
        await self._warm_up()
        self._stats_task = asyncio.create_task(self._log_stats())

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
        skipped = 0
        while True:
            await asyncio.sleep(_STATS_LOG_INTERVAL_S)
            await llm.do_log_stats()
            if vllm_compat.VALIDATED.skipped != skipped:
                skipped = vllm_compat.VALIDATED.skipped
                log.info("schemas vLLM did not validate again (prepare had): %d in all", skipped)

    def load(self) -> EngineLoad:
        if self._loaded is None:
            return EngineLoad(running=0, waiting=0)
        return split_load(vllm_compat.unfinished_requests(self._loaded.llm), self._counts.waiting)

    async def close(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_task
        if self._loaded is not None:
            self._loaded.llm.shutdown()
            self._loaded = None
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)
        self._schema_thread.shutdown(wait=False, cancel_futures=True)
        if self._schema_processes is not None:
            self._schema_processes.close()

    async def prepare(self, request: EngineRequest) -> EngineRequest:
        loaded = self._require_loaded()
        loop = asyncio.get_running_loop()
        # Tokenizing (Rust, batched with the requests beside it) and readying the schema (mostly
        # Python) overlap on their own threads.
        ids = asyncio.ensure_future(
            self._prompts.timed_ids(loaded.tokenizer, request.prompt, request.messages)
        )
        schema = None
        schema_parts: tuple[tuple[str, float], ...] = ()
        try:
            if request.json_schema is not None:
                schema, schema_parts = await self._compiled(loop, request.json_schema)
        finally:
            prompt, timing = await ids  # awaited even when the schema is refused, so no failure goes unseen
        if not prompt:
            raise InvalidRequest("the prompt is empty")
        check_fits(len(prompt), request.max_tokens, loaded.max_model_len)
        self._sampling_params(request, schema)  # vLLM's own validation of the parameters
        breakdown = (
            ("ids queued", timing.queued_s * 1000),
            (f"encoded (batch of {timing.batch})", timing.encoded_s * 1000),
            ("ids resumed", timing.resumed_s * 1000),
            *schema_parts,
        )
        prepared = Prepared(prompt_tokens=tuple(prompt), constraint=schema, breakdown=breakdown)
        return replace(request, prepared=prepared)

    async def _compiled(
        self, loop: asyncio.AbstractEventLoop, schema: dict[str, Any]
    ) -> tuple[dict[str, Any], tuple[tuple[str, float], ...]]:
        """The schema as vLLM gets it, and where the time went, for the log (ms): in all, and on a thread
        of this process the wait for the thread, the work on it and the wait to resume after it."""
        asked = time.monotonic()
        timeout = self._settings.schema_compile_timeout_s
        # A schema readied while no other is goes to a thread here: the round trip to a worker
        # process cost a lone TIL request about 2 ms on the H200 (prepare 4.4-6.7 ms on threads,
        # 7.2-8.0 in workers, bench/results/issue13-h200-s21). Under a burst the others go to the
        # workers, where they do not hold this process's GIL.
        processes = self._schema_processes
        key = schema_key(schema)
        text = processes.known(key) if processes is not None else None
        if text is not None:
            # A copy: vLLM edits the schema it is given.
            return json.loads(text), (("schema known", (time.monotonic() - asked) * 1000),)
        compiling: Awaitable[str | tuple[str, float, float]]
        if processes is not None and self._schemas_in_flight > 0:
            compiling = processes.text(key)
        else:
            compiling = loop.run_in_executor(self._schema_thread, timed_call, prepared_schema_text, key)
        self._schemas_in_flight += 1
        try:
            done = await asyncio.wait_for(compiling, timeout)
        except TimeoutError:
            # llguidance's own limits bound the work left in the thread.
            raise InvalidRequest(
                f"output.json_schema: compiling it took more than {timeout:g} s "
                "(GENERATOR_SCHEMA_COMPILE_TIMEOUT_S); simplify the schema"
            ) from None
        finally:
            self._schemas_in_flight -= 1
        resumed = time.monotonic()
        parts: tuple[tuple[str, float], ...]
        if isinstance(done, tuple):
            text, started, ended = done
            parts = (
                ("schema", (resumed - asked) * 1000),
                ("schema queued", (started - asked) * 1000),
                ("readied", (ended - started) * 1000),
                ("resumed", (resumed - ended) * 1000),
            )
        else:
            text = done
            parts = (("schema in a worker", (resumed - asked) * 1000),)
        if processes is not None:
            processes.keep(key, text)  # the next request with it, in a burst, is quick
        return json.loads(text), parts

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        llm = self._require_loaded().llm
        engine_dead = vllm_compat.engine_dead_error()
        if request.prepared is None:
            request = await self.prepare(request)
        assert request.prepared is not None
        prompt_ids = list(request.prepared.prompt_tokens)
        params = self._sampling_params(request, request.prepared.constraint)
        engine_request_id = f"{request.request_id}-{self._id_tag}{next(self._sequence)}"
        arrival = time.monotonic()
        expiry = self._arm_deadline(llm, engine_request_id, request.deadline, arrival)
        if request.prepared.constraint is not None:
            # Prepare validated this schema (vllm_compat.skip_revalidation). The object marked is the one
            # `params` carries, not `constraint`: vLLM's StructuredOutputsParams is a pydantic dataclass,
            # which copies the dict it is given.
            vllm_compat.VALIDATED.add(params.structured_outputs.json)
        outputs = llm.generate(vllm_compat.tokens_prompt(prompt_ids), params, engine_request_id)
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
                        yield EngineStarted(
                            prompt_tokens=prompt_tokens, queue_s=vllm_compat.queue_s(out, arrival)
                        )
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
        except engine_dead as exc:
            raise EngineUnavailable("the vLLM engine has died; the generator must restart") from exc
        except ValueError as exc:
            if started:
                raise
            # vLLM's request validation (e.g. a JSON Schema its grammar backend cannot compile).
            raise InvalidRequest(f"vLLM rejected the request: {exc}") from exc
        finally:
            if expiry is not None:
                expiry.cancel()

    async def tokenize(self, inputs: Sequence[TokenizeInput], *, offsets: bool) -> list[TokenCount]:
        tokenizer = self._require_loaded().tokenizer
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenizer_thread, count_tokens, tokenizer, list(inputs), offsets
        )

    def _sampling_params(self, request: EngineRequest, schema: dict[str, Any] | None) -> Any:
        try:
            kwargs = sampling_kwargs(request, self._require_loaded().model_defaults)
            return vllm_compat.sampling_params(kwargs, schema)
        except ValueError as exc:
            raise InvalidRequest(f"invalid generation parameters: {exc}") from exc

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
            return EngineUnavailable("vLLM failed the request (retryable)")
        return EngineUnavailable(f"vLLM ended the request early ({reason})")

    def _require_loaded(self) -> _Loaded:
        if self._loaded is None:
            raise EngineUnavailable("the vLLM engine is not started")
        return self._loaded
