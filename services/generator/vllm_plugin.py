"""A vLLM general plugin that fills structured-output token masks on several threads.

vLLM 0.25's `StructuredOutputManager` (engine core) fills each step's grammar bitmask on one thread
unless the batch holds more than `fill_bitmask_parallel_threshold` structured requests, a number
fixed at 128 in its constructor; at 100 TIL streams that one thread halves output throughput.
There is no engine argument for it, so this plugin sets the threshold, the size of the thread
pool (`executor_for_fillmask`) and the requests per pool task on every manager vLLM builds, and
gives the engine core one read-only utility method, `REPORT_METHOD`, through which the generator
reads back the values in force there.

vLLM calls `register()` (entry point group `vllm.general_plugins`, see pyproject.toml) in every
process it starts: the API process, the engine core, the GPU workers. It acts only when the
environment asks (the `ENV_*` names below; `VllmEngine` sets them from the generator's settings
before the engine core starts, and any `vllm serve` may set them by hand), and where vLLM's
internals are not the shape it knows, it logs why and reports "not applied" instead of failing.
Nothing here imports vLLM at module level.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

from services.generator.vllm_trace import (
    ENV_TRACE,
    GrammarTimeline,
    trace,
    trace_dir,
    trace_engine,
    trace_interval,
)

log = logging.getLogger(__name__)

ENV_THRESHOLD = "TILSERVE_VLLM_BITMASK_PARALLEL_THRESHOLD"
ENV_WORKERS = "TILSERVE_VLLM_BITMASK_WORKERS"
ENV_BATCH_SIZE = "TILSERVE_VLLM_BITMASK_BATCH_SIZE"
ENV_FILL = "TILSERVE_VLLM_BITMASK_FILL"

# How a task of the pool fills its requests' masks: vLLM's own loop (a Python call per request on
# its thread pool), or one call into llguidance's Rust thread pool (`LLExecutor`) for the whole task,
# which holds the GIL once per task instead of once per request.
FILLS = ("threads", "llguidance")
# With the llguidance fill, one task per step unless a batch size is asked for.
LLGUIDANCE_BATCH_SIZE = 1024

# The engine core's utility method (AsyncLLM.engine_core.call_utility_async) that reports what is in force.
REPORT_METHOD = "tilserve_bitmask_parallelism"

# vLLM 0.25's own choices where a setting is left unset (vllm/v1/structured_output/__init__.py).
VLLM_BATCH_SIZE = 16

# Set on each manager the plugin configured: the settings it applied, or why it could not.
_APPLIED = "_tilserve_bitmask_parallelism"
_FAILED = "_tilserve_bitmask_parallelism_failed"


@dataclass(frozen=True)
class BitmaskParallelism:
    """How vLLM fills structured-output bitmasks; None leaves vLLM's own choice."""

    # Fill in parallel when a step holds more than this many structured requests (0: always).
    threshold: int | None = None
    # Threads that fill them.
    workers: int | None = None
    # Requests per task handed to a thread.
    batch_size: int | None = None
    # One of FILLS; None is "threads", vLLM's own.
    fill: str | None = None

    def __post_init__(self) -> None:
        if self.fill is not None and self.fill not in FILLS:
            raise ValueError(f"fill must be one of {', '.join(FILLS)}, not {self.fill!r}")
        for name, least in (("threshold", 0), ("workers", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise ValueError(f"{name} must be an integer >= {least}, not {value!r}")

    @property
    def requested(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    def environment(self) -> dict[str, str | None]:
        """The plugin's variables for these settings; None means the variable must be unset."""
        return {
            ENV_THRESHOLD: _str_or_none(self.threshold),
            ENV_WORKERS: _str_or_none(self.workers),
            ENV_BATCH_SIZE: _str_or_none(self.batch_size),
            ENV_FILL: self.fill,
        }

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> BitmaskParallelism:
        """ValueError naming the variable when one is not a valid number."""
        values: dict[str, Any] = {}
        for name, var in (
            ("threshold", ENV_THRESHOLD),
            ("workers", ENV_WORKERS),
            ("batch_size", ENV_BATCH_SIZE),
        ):
            text = env.get(var, "").strip()
            try:
                values[name] = int(text) if text else None
            except ValueError:
                raise ValueError(f"{var}={text!r} is not an integer") from None
        values["fill"] = env.get(ENV_FILL, "").strip() or None
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(f"TILSERVE_VLLM_BITMASK_*: {exc}") from None


def _str_or_none(value: int | None) -> str | None:
    return None if value is None else str(value)


def vllm_default_workers() -> int:
    """vLLM 0.25's pool size: half the CPUs, at least 1, at most 8."""
    return max(1, min((os.cpu_count() or 1) // 2, 8))


def llguidance_default_workers() -> int:
    """The llguidance fill's pool: all CPUs but two (the engine core's scheduler and I/O), at least 1.
    14 on the H200 host's 16 filled 100 TIL streams' masks in time for every step."""
    return max(1, (os.cpu_count() or 1) - 2)


def register() -> None:
    """The entry point vLLM calls in each of its processes; never raises."""
    try:
        wanted = requested_now()
        tracing = trace_interval()
    except ValueError as exc:
        log.error("tilserve vLLM plugin: not applied: %s", exc)
        return
    if not wanted.requested and tracing is None:
        return  # nothing asked: leave vLLM exactly as it is
    try:
        from vllm.v1.engine.core import EngineCore
        from vllm.v1.structured_output import StructuredOutputManager

        problem = install(StructuredOutputManager, EngineCore)
        if problem is None and tracing is not None and trace_dir() is not None:
            from vllm.v1.core.sched.scheduler import Scheduler

            trace_engine(Scheduler, EngineCore)
    except Exception as exc:  # a vLLM without these modules, or one that fails to import them
        problem = f"vLLM's structured-output manager not found: {exc}"
    if problem is not None:
        log.warning("tilserve vLLM plugin: not applied: %s", problem)
        return
    if wanted.requested:
        log.info("tilserve vLLM plugin: structured-output bitmasks will be filled with %s", wanted)
    if tracing is not None:
        log.info(
            "tilserve vLLM plugin: structured requests' grammar timeline every %gs (%s); raw timeline: %s",
            tracing,
            ENV_TRACE,
            trace_dir() or "off",
        )


def requested_now() -> BitmaskParallelism:
    """What this process's environment asks for; ValueError naming a bad variable."""
    return BitmaskParallelism.from_environment(os.environ)


def install(
    manager_cls: type, core_cls: type, wanted: Callable[[], BitmaskParallelism] = requested_now
) -> str | None:
    """Configures every manager built from now on and adds the report method; why not, if it cannot.

    `wanted` is read as each manager is built, not now: with vLLM's default `fork`, an engine core
    inherits a class this process patched for an earlier engine, and must follow today's settings.
    Safe to call more than once (vLLM may load plugins again): the original constructor is wrapped once.
    """
    missing = [
        name for name in ("__init__", "grammar_bitmask", "_async_submit_fill_bitmask")
        if not callable(getattr(manager_cls, name, None))
    ]  # fmt: skip
    if missing:
        return f"{manager_cls.__name__} has no {', '.join(missing)} (a vLLM this plugin does not know)"
    init = vars(manager_cls).get("__init__", manager_cls.__init__)  # type: ignore[misc]
    original = getattr(init, "__wrapped__", init)

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        try:
            asked = wanted()
        except ValueError as exc:
            setattr(self, _FAILED, str(exc))
            asked = BitmaskParallelism()
        if asked.requested:
            configure(self, asked)
        try:
            interval = trace_interval()
        except ValueError as exc:  # a bad trace setting leaves the masks' settings as they are
            log.warning("tilserve vLLM plugin: grammar timeline not traced: %s", exc)
            interval = None
        if interval is not None:
            try:
                trace(self, GrammarTimeline(interval))
            except AttributeError as exc:  # a manager without the methods traced
                log.warning("tilserve vLLM plugin: grammar timeline not traced: %s", exc)

    manager_cls.__init__ = __init__  # type: ignore[misc]
    setattr(core_cls, REPORT_METHOD, _report)
    return None


def configure(manager: Any, wanted: BitmaskParallelism) -> None:
    """Applies `wanted` to one built manager; on a shape it does not know, records why and leaves it."""
    try:
        if not isinstance(getattr(manager, "fill_bitmask_parallel_threshold", None), int):
            raise LookupError("the manager has no integer fill_bitmask_parallel_threshold")
        if wanted.threshold is not None:
            manager.fill_bitmask_parallel_threshold = wanted.threshold
        default_batch = LLGUIDANCE_BATCH_SIZE if wanted.fill == "llguidance" else VLLM_BATCH_SIZE
        if (
            wanted.batch_size is not None
            or wanted.fill
            or not hasattr(manager, "fill_bitmask_parallel_batch_size")
        ):
            manager.fill_bitmask_parallel_batch_size = wanted.batch_size or default_batch
        # vLLM builds the pool only when its own threshold is below max_num_seqs.
        previous = getattr(manager, "executor_for_fillmask", None)
        workers = wanted.workers or (
            llguidance_default_workers() if wanted.fill == "llguidance" else vllm_default_workers()
        )
        if wanted.workers is not None or wanted.fill == "llguidance" or previous is None:
            # With the llguidance fill this pool runs one task a step, which hands it to llguidance's
            # pool of the same size (the size reported as `workers`).
            manager.executor_for_fillmask = ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix="fill-bitmask"
            )
            if previous is not None:
                previous.shutdown(wait=False)
        if wanted.fill == "llguidance":
            import llguidance

            executor = llguidance.LLExecutor(num_threads=workers)
            manager._async_submit_fill_bitmask = functools.partial(fill_with_llguidance, manager, executor)
        setattr(manager, _APPLIED, wanted)
    except Exception as exc:
        setattr(manager, _FAILED, str(exc))
        log.warning("tilserve vLLM plugin: not applied to the structured-output manager: %s", exc)


def in_force(manager: Any) -> dict[str, Any]:
    """What one manager runs with now, read from its attributes (what vLLM itself reads)."""
    executor = getattr(manager, "executor_for_fillmask", None)
    failed = getattr(manager, _FAILED, None)
    return {
        "applied": failed is None and hasattr(manager, _APPLIED),
        "reason": failed
        or ("" if hasattr(manager, _APPLIED) else "the manager was built without the plugin"),
        "threshold": getattr(manager, "fill_bitmask_parallel_threshold", None),
        # ThreadPoolExecutor keeps its size in `_max_workers` (CPython 3.8 onwards).
        "workers": getattr(executor, "_max_workers", None),
        "batch_size": getattr(manager, "fill_bitmask_parallel_batch_size", None),
        "fill": "llguidance"
        if getattr(getattr(manager, "_async_submit_fill_bitmask", None), "func", None) is fill_with_llguidance
        else "threads",
    }


def fill_with_llguidance(manager: Any, executor: Any, batch: list[tuple[Any, int, bool]]) -> Future[None]:
    """`_async_submit_fill_bitmask` for the llguidance fill: the batch's masks in one executor call.

    Does what vLLM's `_fill_bitmasks` does for each (grammar, row, apply_bitmask): the grammar's mask
    where it applies and the grammar is not terminated, all ones otherwise; grammars that are not
    llguidance's (no `ll_matcher`) go through vLLM's own per-request fill. Returns a done future: the
    executor's call returns when every mask is written.
    """
    done: Future[None] = Future()
    try:
        bitmask = manager._grammar_bitmask
        own: list[tuple[Any, int]] = []
        grammars = []
        rest = []
        for grammar, index, apply_bitmask in batch:
            if apply_bitmask and not grammar.is_terminated():
                matcher = getattr(grammar, "ll_matcher", None)
                if matcher is None:
                    rest.append((grammar, index, apply_bitmask))
                    continue
                own.append((matcher, index))
                grammars.append(grammar)
            else:
                bitmask[index].fill_(manager._full_mask)
        if own:
            import llguidance.torch

            llguidance.torch.fill_next_token_bitmask_par(executor, own, bitmask)
            for grammar in grammars:
                grammar.check_error()  # as vLLM's GuidanceGrammar.fill_bitmask does after each mask
        if rest:
            manager._fill_bitmasks(rest)
        done.set_result(None)
    except Exception as exc:
        done.set_exception(exc)
    return done


def _report(core: Any) -> dict[str, Any]:
    """`REPORT_METHOD` on vLLM's EngineCore: the values in force in the engine core process."""
    manager = getattr(core, "structured_output_manager", None)
    if manager is None:
        return {"applied": False, "reason": "the engine core has no structured_output_manager"}
    return in_force(manager)


class BitmaskParallelismNotApplied(RuntimeError):
    """Settings were asked for and the engine core does not run with them."""


def check_in_force(wanted: BitmaskParallelism, report: Mapping[str, Any] | None) -> dict[str, str]:
    """engine_settings entries for what is in force; BitmaskParallelismNotApplied if asked and not in force.

    `report` is the engine core's answer to `REPORT_METHOD`, or None when nothing was asked.
    """
    if not wanted.requested:
        return {"bitmask_parallelism": "vllm default"}
    report = report or {"applied": False, "reason": "no report from the engine core"}
    entries = {"bitmask_parallelism": "applied" if report.get("applied") else "not applied"}
    for name in ("threshold", "workers", "batch_size", "fill"):
        if report.get(name) is not None:
            entries[f"bitmask_parallel_{name}"] = str(report[name])
    differ = [
        f"{name} is {report[name]!r}, not {getattr(wanted, name)!r}"
        for name in ("threshold", "workers", "batch_size", "fill")
        if getattr(wanted, name) is not None and name in report and report[name] != getattr(wanted, name)
    ]
    if not report.get("applied") or differ:
        why = "; ".join([str(report.get("reason") or ""), *differ]).strip("; ")
        raise BitmaskParallelismNotApplied(
            f"structured-output bitmask parallelism was asked for ({wanted}) but the engine core does "
            f"not run with it: {why}. Check that tilserve is installed where vLLM runs (its "
            "vllm.general_plugins entry point) and that VLLM_PLUGINS, if set, names 'tilserve'."
        )
    return entries


def main() -> int:
    """`python -m services.generator.vllm_plugin`: can vLLM find the plugin here, and what will it apply?"""
    from importlib.metadata import entry_points

    found = [f"{e.name} = {e.value}" for e in entry_points(group="vllm.general_plugins")]
    ours = "tilserve = services.generator.vllm_plugin:register" in found
    print("vllm.general_plugins:", ", ".join(found) or "none")
    try:
        print("asked in this environment:", BitmaskParallelism.from_environment(os.environ))
    except ValueError as exc:
        print("asked in this environment: invalid:", exc)
        return 1
    if not ours:
        print("the tilserve plugin is not registered here: install the package (pip install .), or write its")
        print("metadata onto PYTHONPATH (docs/gpu.md, 'Grammar masks in parallel')")
    return 0 if ours else 1


if __name__ == "__main__":
    raise SystemExit(main())
