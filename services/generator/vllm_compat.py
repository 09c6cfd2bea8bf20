"""Everything that depends on which vLLM is installed (verified with 0.25.1), in one place.

Every vLLM import of the generator is here, inside the function that needs it, so importing this
module (and the service, its tests, CI) needs no vLLM. Where the generator reads something vLLM
does not promise to keep (fields of `SchedulerStats`, the output processor's request count, a
request's `scheduled_ts`), the reason is written beside it; a vLLM upgrade starts by reading this file.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from services.generator.vllm_plugin import REPORT_METHOD

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM


def version() -> str:
    import vllm

    return str(vllm.__version__)


@dataclass(frozen=True)
class FrontEnd:
    """One of several front-end processes that share one engine core (vLLM's multi-API-server layout:
    `vllm serve --api-server-count`). Each has its own `AsyncLLM` client, bound to its own pair of
    ZMQ addresses, which the engine core connects to."""

    index: int
    count: int
    input_address: str
    output_address: str


def _async_engine_args(engine_kwargs: dict[str, Any], *, api_count: int = 1, api_rank: int = 0) -> Any:
    """`AsyncEngineArgs(**engine_kwargs)`; `engine_kwargs["structured_outputs_config"]` is a plain dict
    (the tests have no vLLM). `api_count`/`api_rank`: front-ends sharing the engine, and which this is
    (-1: the process that launches the engine core), as `vllm serve` sets them."""
    from vllm import AsyncEngineArgs
    from vllm.config import StructuredOutputsConfig

    kwargs = dict(engine_kwargs)
    kwargs["structured_outputs_config"] = StructuredOutputsConfig(**kwargs["structured_outputs_config"])
    args = AsyncEngineArgs(**kwargs)
    # Fields of AsyncEngineArgs that vLLM's own `run_multi_api_server` and API server workers set.
    args._api_process_count = api_count
    args._api_process_rank = api_rank
    return args


def build_async_llm(
    engine_kwargs: dict[str, Any], stat_logger: Callable[..., Any], frontend: FrontEnd | None = None
) -> AsyncLLM:
    """vLLM's `AsyncLLM` for `AsyncEngineArgs(**engine_kwargs)`; blocks until the engine core is up.

    Without `frontend` it starts its own engine core. With one, it is that front-end's client of the
    engine core `SharedEngineCore` launched, as vLLM's API server workers build theirs.
    """
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    # OPENAI_API_SERVER picks the same batch defaults as `vllm serve` on this GPU.
    usage = UsageContext.OPENAI_API_SERVER
    if frontend is None:
        return AsyncLLM.from_engine_args(
            _async_engine_args(engine_kwargs), usage_context=usage, stat_loggers=[stat_logger]
        )
    args = _async_engine_args(engine_kwargs, api_count=frontend.count, api_rank=frontend.index)
    return AsyncLLM.from_vllm_config(
        args.create_engine_config(usage_context=usage),
        usage_context=usage,
        stat_loggers=[stat_logger],
        enable_log_requests=args.enable_log_requests,
        disable_log_stats=args.disable_log_stats,
        client_addresses={"input_address": frontend.input_address, "output_address": frontend.output_address},
        client_count=frontend.count,
        client_index=frontend.index,
    )


class SharedEngineCore:
    """vLLM's engine core for `count` front-ends, launched as `vllm serve --api-server-count` does
    (`run_multi_api_server`): the configuration and every front-end's addresses first, then
    `launching()`, inside which the front-ends must be started (the engine connects to them), and whose
    end waits until the engine core is up. `shutdown()` stops it."""

    def __init__(self, engine_kwargs: dict[str, Any], count: int) -> None:
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.utils import get_engine_zmq_addresses

        self.count = count
        self._args = _async_engine_args(engine_kwargs, api_count=count, api_rank=-1)
        self._config = self._args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        # Addresses fixed here: vLLM's own API servers may bind tcp://host:0 and report the port back
        # (`actual_address_pipe`); ours do not (one engine core on this host: IPC paths either way).
        self._addresses = get_engine_zmq_addresses(self._config, count, defer_api_server_ports=False)
        self._manager: Any = None
        self._coordinator: Any = None

    def frontends(self) -> list[FrontEnd]:
        inputs, outputs = self._addresses.inputs, self._addresses.outputs
        return [FrontEnd(i, self.count, inputs[i], outputs[i]) for i in range(self.count)]

    @contextlib.contextmanager
    def launching(self) -> Iterator[None]:
        from vllm.v1.engine.utils import launch_core_engines
        from vllm.v1.executor import Executor

        with launch_core_engines(
            self._config,
            Executor.get_class(self._config),
            not self._args.disable_log_stats,
            self._addresses,
            self.count,
        ) as (manager, coordinator, _addresses, _tensor_queue):
            self._manager, self._coordinator = manager, coordinator
            yield

    def sentinels(self) -> list[Any]:
        """What `multiprocessing.connection.wait` sees become ready when an engine process ends."""
        return list(self._manager.sentinels()) if self._manager is not None else []

    def shutdown(self) -> None:
        for part in (self._manager, self._coordinator):
            if part is not None:
                part.shutdown()
        self._manager = self._coordinator = None


def resolved_settings(llm: AsyncLLM) -> dict[str, str]:
    """The engine's settings as vLLM resolved them (the KV cache size is known only after start-up)."""
    from vllm import envs

    config = llm.vllm_config
    model, cache, sched = config.model_config, config.cache_config, config.scheduler_config
    resolved: dict[str, Any] = {
        "vllm_version": version(),
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
        "stream_interval": sched.stream_interval,
        # Requests the output handler processes between two yields of the event loop (an environment
        # variable of vLLM's, read when the handler runs: what it reads here is what it uses).
        "output_proc_chunk_size": envs.VLLM_V1_OUTPUT_PROC_CHUNK_SIZE,
        "load_format": config.load_config.load_format,
        "structured_outputs_backend": config.structured_outputs_config.backend,
    }
    return {k: str(v) for k, v in resolved.items()}


def max_model_len(llm: AsyncLLM) -> int:
    """The real context: vLLM may shrink the configured one to what the KV cache holds."""
    return int(llm.vllm_config.model_config.max_model_len)


def model_sampling_defaults(llm: AsyncLLM) -> dict[str, Any]:
    """The model's generation-config sampling defaults, as `vllm serve` applies them."""
    return dict(llm.vllm_config.model_config.get_diff_sampling_param())


def sampling_params(kwargs: dict[str, Any], json_schema: dict[str, Any] | None) -> Any:
    """`SamplingParams` streaming deltas, constrained by `json_schema` if given; ValueError if invalid."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = StructuredOutputsParams(json=json_schema) if json_schema is not None else None
    return SamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA, structured_outputs=structured)


def guidance_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """`json_grammar.llguidance_schema`'s output as vLLM 0.25's llguidance reads it as intended.

    vLLM 0.25 pins llguidance < 1.8, which lets any amount of whitespace through where
    `x-guidance.whitespace_pattern` asks for at most one blank or one indented newline (1.9 bounds
    it); without the option, vLLM's `disable_any_whitespace` writes compact JSON, which is one of
    the texts the llama.cpp engine's bounded whitespace allows.
    """
    options = {k: v for k, v in schema.get("x-guidance", {}).items() if k != "whitespace_pattern"}
    stripped = {k: v for k, v in schema.items() if k != "x-guidance"}
    return {**stripped, "x-guidance": options} if options else stripped


def tokens_prompt(token_ids: list[int]) -> Any:
    from vllm import TokensPrompt

    return TokensPrompt(prompt_token_ids=token_ids)


def engine_dead_error() -> type[BaseException]:
    """The exception `AsyncLLM.generate` raises once the engine core process has died."""
    from vllm.v1.engine.exceptions import EngineDeadError

    return EngineDeadError


def unfinished_requests(llm: AsyncLLM) -> int:
    """Requests vLLM still holds, exact at every moment (it drops as soon as one is aborted).

    No public API counts them; the output processor's count is what AsyncLLM's own
    `get_num_unfinished_requests` used to return.
    """
    return int(llm.output_processor.get_num_unfinished_requests())


def queue_s(out: Any, arrival: float) -> float:
    """Seconds from our hand-off to vLLM until its scheduler first ran the request.

    vLLM stamps `RequestOutput.metrics.scheduled_ts` (not a promised field, hence the getattr) with
    the engine core's `time.monotonic()`, the same clock as ours on one host.
    """
    metrics = out.metrics
    scheduled = getattr(metrics, "scheduled_ts", 0.0) if metrics is not None else 0.0
    if not scheduled:
        return 0.0
    return float(min(max(scheduled - arrival, 0.0), time.monotonic() - arrival))


@dataclass
class SchedulerCounts:
    """The scheduler's counts as of the engine's last step (vLLM sends them with each step's outputs)."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0

    def update(self, scheduler_stats: Any) -> None:
        # `SchedulerStats` "is not considered a stable interface" (vllm/v1/metrics/loggers.py): these
        # three fields are the ones read, as vLLM's own Prometheus logger reads them.
        self.running = scheduler_stats.num_running_reqs
        self.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
        self.kv_cache_usage = float(scheduler_stats.kv_cache_usage)


def scheduler_stat_logger(counts: SchedulerCounts) -> Callable[..., Any]:
    """A `PerEngineStatLoggerFactory` for `AsyncLLM(stat_loggers=[...])` that keeps `counts` current.

    Custom stat loggers subclassing `StatLoggerBase` are vLLM's supported way to observe the
    scheduler from the API process.
    """

    def factory(vllm_config: Any, engine_index: int = 0) -> Any:
        return _stat_logger_class()(counts)

    return factory


@functools.cache
def _stat_logger_class() -> type:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerCountsLogger(StatLoggerBase):
        def __init__(self, counts: SchedulerCounts) -> None:
            self.counts = counts

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                self.counts.update(scheduler_stats)

        def log_engine_initialized(self) -> None:
            pass

    return SchedulerCountsLogger


async def bitmask_parallelism_report(llm: AsyncLLM) -> dict[str, Any]:
    """What the engine core runs with, asked through the utility method our vLLM plugin adds there."""
    try:
        report = await llm.engine_core.call_utility_async(REPORT_METHOD)
    except Exception as exc:  # the method is missing when the plugin did not load in the engine core
        return {"applied": False, "reason": f"the engine core did not answer {REPORT_METHOD}: {exc}"}
    return dict(report) if isinstance(report, dict) else {"applied": False, "reason": f"report {report!r}"}


# vLLM validates each structured request's grammar (`validate_guidance_grammar`) inside
# `AsyncLLM.add_request`, on the event loop of the process calling `generate`, one request after another:
# 2-6 ms for a TIL schema (with the tokenizer), tens of ms for a large one, so a burst of 100 waits for
# them in turn. `prepare` has already validated the same schema with the same library on a worker thread
# (`vllm_inputs.prepared_schema`), so for exactly those schema objects vLLM's second validation is
# skipped; any other request is validated by vLLM as before. The caller has moved between releases: 0.25's
# `SamplingParams._validate_structured_outputs` imports the function from its backend module at each call
# (so the module's attribute is what it runs); earlier input processors held it as a module global.
_PROCESSOR_MODULES = (
    "vllm.v1.structured_output.backend_guidance",
    "vllm.v1.engine.input_processor",
    "vllm.v1.engine.processor",
)
_VALIDATED_LIMIT = 4096


class ValidatedSchemas:
    """Schema objects `prepare` validated, each until vLLM's validation has seen it (bounded)."""

    def __init__(self, limit: int = _VALIDATED_LIMIT) -> None:
        self._limit = limit
        # id -> the object itself: held, so its id cannot name another object meanwhile.
        self._objects: dict[int, Any] = {}
        self._lock = threading.Lock()
        self.skipped = 0  # validations vLLM did not repeat, for the log

    def add(self, schema: Any) -> None:
        with self._lock:
            self._objects[id(schema)] = schema
            while len(self._objects) > self._limit:  # requests refused or cancelled before generate
                del self._objects[next(iter(self._objects))]

    def take(self, schema: Any) -> bool:
        """True (once) when `schema` is an object `add` was given."""
        with self._lock:
            if self._objects.get(id(schema)) is not schema:
                return False
            del self._objects[id(schema)]
            self.skipped += 1
            return True

    def __len__(self) -> int:
        return len(self._objects)


VALIDATED = ValidatedSchemas()


def skip_revalidation(modules: tuple[str, ...] = _PROCESSOR_MODULES) -> str:
    """Makes vLLM's input processor skip validating schemas in `VALIDATED`; what it did, in words."""
    import importlib

    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        original = getattr(module, "validate_guidance_grammar", None)
        if not callable(original):
            continue
        module.validate_guidance_grammar = _skipping_validated(getattr(original, "__wrapped__", original))  # type: ignore[attr-defined]
        return f"once, in prepare ({name})"
    return "twice: vLLM's input processor has no validate_guidance_grammar here"


def _skipping_validated(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def validate_guidance_grammar(sampling_params: Any, *args: Any, **kwargs: Any) -> Any:
        structured = getattr(sampling_params, "structured_outputs", None)
        if structured is not None and VALIDATED.take(getattr(structured, "json", None)):
            return None  # validated by prepare, with the same llguidance
        return original(sampling_params, *args, **kwargs)

    return validate_guidance_grammar
