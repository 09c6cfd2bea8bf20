"""Where a structured-output request waits inside vLLM's engine core, when `TILSERVE_VLLM_TRACE_GRAMMAR`
is set (seconds between two summaries in the engine core's log).

For each request with a JSON schema, our vLLM plugin (`vllm_plugin`, loaded in the engine core) notes
four times on the engine core's clock:

- received: the engine core took the request in (`StructuredOutputManager.grammar_init`);
- compile start / end: vLLM's grammar pool compiled its grammar (`_create_grammar`), until then the
  scheduler leaves the request waiting (WAITING_FOR_FSM);
- first masked step: the first step that built a token mask for it (`grammar_bitmask`), i.e. the step
  that samples its first token.

Every `interval` seconds, the requests that reached their first masked step since the last summary
are logged as p50 / p99 of each gap (`GrammarTimeline.summary`). It is for finding which of these a
burst of schema requests waits on (bench/results/issue13-h200-s20): the pool, the compile, or the
scheduler's queue. Nothing is recorded without the variable.

With `TILSERVE_VLLM_TRACE_DIR` set too, each engine core also writes every request's and every step's
times as JSON lines to `<dir>/engine-core-<pid>.jsonl` (`RawTimeline`, read by bench/engine_timeline.py),
every request, with or without a schema:

- `{"clock": ...}` first: the engine core's wall and monotonic clocks at one moment (to place it);
Lines are written every interval and at the process's exit, so the file lags by at most one interval.

- a request once first scheduled: `arrival` (wall, stamped by the front-end's input processor),
  `received` (the engine core's input thread took it), `compile_start` / `compile_end` (schema only),
  `added` (the busy loop handed it to the scheduler), `scheduled` (the step that first ran it began),
  `first_step_end` (that step's output reached the scheduler), `prompt_tokens`, `schema`;
- a step once its output is back: `t` (scheduling began), `schedule_ms`, `tokens` scheduled, `new`
  requests first scheduled, `running` / `waiting` / `skipped` (the scheduler's queues after
  scheduling), `end` (its output reached the scheduler).

Monotonic times are the engine core's `time.monotonic()`, seconds. The class-level hooks on vLLM's
`Scheduler` and `EngineCore` (`trace_engine`) are installed only when the directory is set.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import multiprocessing.util
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from services.common.stats import percentile

log = logging.getLogger(__name__)

ENV_TRACE = "TILSERVE_VLLM_TRACE_GRAMMAR"
ENV_TRACE_DIR = "TILSERVE_VLLM_TRACE_DIR"
# Requests noted but not yet scheduled, at most (aborted ones never are): the oldest go first.
MAX_PENDING = 10_000
GAPS = ("pool wait", "compile", "compiled to first step", "received to first step")


def trace_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between summaries asked by the environment; None when tracing is off. ValueError if bad."""
    raw = env.get(ENV_TRACE, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_TRACE} must be a number of seconds, not {raw!r}") from None
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{ENV_TRACE} must be a positive number of seconds, not {raw!r}")
    return value


class GrammarTimeline:
    """The four times of each structured request, and their summary every `interval_s` seconds."""

    def __init__(
        self,
        interval_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        emit: Callable[[str], None] = log.info,
    ) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._emit = emit
        self._lock = threading.Lock()  # compiles end on vLLM's pool threads
        # request id -> [received, compile start, compile end]
        self._pending: OrderedDict[str, list[float]] = OrderedDict()
        self._done: list[tuple[float, float, float, float]] = []
        self._since = clock()

    def received(self, request_id: str) -> None:
        with self._lock:
            self._pending[request_id] = [self._clock(), math.nan, math.nan]
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)

    def compile_started(self, request_id: str) -> None:
        self._set(request_id, 1)

    def compile_ended(self, request_id: str) -> None:
        self._set(request_id, 2)

    def _set(self, request_id: str, index: int) -> None:
        with self._lock:
            times = self._pending.get(request_id)
            if times is not None:
                times[index] = self._clock()

    def masked(self, request_ids: Iterable[str]) -> None:
        """A step built masks for these requests; the first time for some of them."""
        now = self._clock()
        with self._lock:
            for request_id in request_ids:
                times = self._pending.pop(request_id, None)
                if times is not None:
                    self._done.append((times[0], times[1], times[2], now))
            due = now - self._since >= self._interval_s and bool(self._done)
            done = self._done if due else []
            if due:
                self._done, self._since = [], now
        if done:
            self._emit(self.summary(done))

    @staticmethod
    def summary(done: Sequence[tuple[float, float, float, float]]) -> str:
        gaps: dict[str, list[float]] = {name: [] for name in GAPS}
        for received, start, end, first in done:
            for name, value in zip(
                GAPS, (start - received, end - start, first - end, first - received), strict=True
            ):
                if not math.isnan(value):
                    gaps[name].append(value * 1000)
        parts = [
            f"{name} p50 {percentile(values, 50):.1f} p99 {percentile(values, 99):.1f} ms"
            for name, values in gaps.items()
            if values
        ]
        return f"structured requests at their first masked step: {len(done)}; " + ", ".join(parts)


def trace(manager: Any, timeline: GrammarTimeline) -> None:
    """Notes `timeline`'s times on one StructuredOutputManager (its own methods, wrapped on the instance:
    `grammar_init` submits `self._create_grammar`, which then finds the wrapper)."""
    grammar_init = manager.grammar_init
    create_grammar = manager._create_grammar
    grammar_bitmask = manager.grammar_bitmask

    def traced_init(request: Any) -> Any:
        if getattr(request, "structured_output_request", None) is not None:
            timeline.received(request.request_id)
        return grammar_init(request)

    def traced_create(request: Any) -> Any:
        timeline.compile_started(request.request_id)
        _noting(lambda raw: raw.note(request.request_id, "compile_start"))
        try:
            return create_grammar(request)
        finally:
            timeline.compile_ended(request.request_id)
            _noting(lambda raw: raw.note(request.request_id, "compile_end"))

    def traced_bitmask(requests: Any, structured_output_request_ids: Any, *args: Any, **kwargs: Any) -> Any:
        timeline.masked(structured_output_request_ids)
        return grammar_bitmask(requests, structured_output_request_ids, *args, **kwargs)

    manager.grammar_init = traced_init
    manager._create_grammar = traced_create
    manager.grammar_bitmask = traced_bitmask


def trace_dir(env: Mapping[str, str] = os.environ) -> Path | None:
    """Where engine cores write their raw timelines; None unless both variables are set."""
    raw = env.get(ENV_TRACE_DIR, "").strip()
    if not raw or trace_interval(env) is None:
        return None
    return Path(raw)


class RawTimeline:
    """Every request's and every step's engine-core times, as JSON lines; `start` writes them out every
    `interval_s` and at exit."""

    def __init__(
        self,
        path: Path,
        interval_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._path = path
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()  # the input thread, the busy loop and the grammar pool write
        self._requests: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._steps: dict[int, dict[str, Any]] = {}  # by id(scheduler output), until its output is back
        self._wall = wall
        self._lines: list[str] = []

    def received(self, request_id: str, arrival: float, prompt_tokens: int, schema: bool) -> None:
        record = {
            "id": request_id,
            "arrival": arrival,
            "received": self._clock(),
            "prompt_tokens": prompt_tokens,
        }
        record["schema"] = schema
        with self._lock:
            self._requests[request_id] = record
            while len(self._requests) > MAX_PENDING:
                self._requests.popitem(last=False)

    def note(self, request_id: str, name: str) -> None:
        """`compile_start`, `compile_end` or `added`, now."""
        now = self._clock()
        with self._lock:
            record = self._requests.get(request_id)
            if record is not None:
                record[name] = now

    def scheduled(self, output: Any, started: float, *, running: int, waiting: int, skipped: int) -> None:
        """The scheduler returned `output` for a step it began at `started`."""
        now = self._clock()
        new = [r.req_id for r in getattr(output, "scheduled_new_reqs", ())]
        step = {
            "t": started,
            "schedule_ms": (now - started) * 1000,
            "tokens": output.total_num_scheduled_tokens,
        }
        step.update(new=len(new), running=running, waiting=waiting, skipped=skipped, ids=new)
        with self._lock:
            self._steps[id(output)] = step
            for request_id in new:
                record = self._requests.get(request_id)
                if record is not None:
                    record["scheduled"] = started

    def stepped(self, output: Any) -> None:
        """`output`'s step is back from the model: its line and its new requests' lines are complete."""
        now = self._clock()
        with self._lock:
            step = self._steps.pop(id(output), None)
            if step is not None:
                step["end"] = now
                for request_id in step.pop("ids"):
                    record = self._requests.pop(request_id, None)
                    if record is not None:
                        record["first_step_end"] = now
                        self._lines.append(json.dumps(record))
                self._lines.append(json.dumps({"step": step}))

    def flush(self) -> None:
        """Writes the lines completed so far (every `interval_s` on a writer thread, and at exit)."""
        with self._lock:
            lines, self._lines = self._lines, []
        if lines:
            self._write(lines)

    def start(self) -> None:
        """The writer thread (a daemon: an engine core's exit is not held up) and the flush at exit."""

        def write_every_interval() -> None:
            while True:
                time.sleep(self._interval_s)
                self.flush()

        threading.Thread(target=write_every_interval, name="engine-timeline", daemon=True).start()
        atexit.register(self.flush)
        # vLLM forks its engine core unless CUDA is up already, and a forked multiprocessing child
        # ends with os._exit, past atexit: multiprocessing's own finalizers still run there.
        multiprocessing.util.Finalize(None, self.flush, exitpriority=10)

    def _clock_line(self) -> str:
        return json.dumps({"clock": {"wall": self._wall(), "monotonic": self._clock()}, "pid": os.getpid()})

    def _write(self, lines: list[str]) -> None:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            if not self._path.exists():  # a new file (or one removed meanwhile) starts with the clocks
                lines = [self._clock_line(), *lines]
            with self._path.open("a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
        except OSError as exc:
            log.warning("engine timeline not written to %s: %s", self._path, exc)


_raw: RawTimeline | None = None
_raw_lock = threading.Lock()


def raw_timeline() -> RawTimeline | None:
    """This process's raw timeline (one engine core a process), made on first use; None when not asked."""
    global _raw
    if _raw is not None:
        return _raw
    try:
        directory = trace_dir()
        interval = trace_interval()
    except ValueError:
        return None
    if directory is None or interval is None:
        return None
    with _raw_lock:
        if _raw is None:
            _raw = RawTimeline(directory / f"engine-core-{os.getpid()}.jsonl", interval)
            _raw.start()
        return _raw


_HOOKED = "_tilserve_traced"
_failed = False


def _noting(work: Callable[[RawTimeline], None]) -> None:
    """Runs a trace hook's own work with this process's timeline (if any); the first error is logged
    and turns the raw timeline off for this process, and none reaches vLLM (whose request or step
    goes on as if untraced)."""
    global _failed
    if _failed:
        return
    try:
        raw = raw_timeline()
        if raw is not None:
            work(raw)
    except Exception:
        _failed = True
        log.exception("engine timeline off in this process: a trace hook failed")


def trace_engine(scheduler_cls: type, core_cls: type) -> None:
    """Class-level hooks for the raw timeline: the engine core's input thread (`preprocess_add_request`)
    and the scheduler's `add_request`, `schedule` and `update_from_output`. Each finds this process's
    timeline when it runs (so a process that never runs an engine core writes nothing); idempotent."""

    def hook(cls: type, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        # Each wrapper notes through `_noting`, so that a failure of the trace never reaches vLLM.
        original = getattr(cls, name)
        if getattr(original, _HOOKED, False):
            return
        wrapped = functools.wraps(original)(wrap(original))
        setattr(wrapped, _HOOKED, True)
        setattr(cls, name, wrapped)

    def preprocess(original: Callable[..., Any]) -> Callable[..., Any]:
        def preprocess_add_request(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            def note(raw: RawTimeline) -> None:
                params = getattr(request, "sampling_params", None)
                schema = getattr(params, "structured_outputs", None) is not None
                tokens = len(getattr(request, "prompt_token_ids", None) or ())
                raw.received(request.request_id, float(request.arrival_time or 0.0), tokens, schema)

            _noting(note)
            return original(self, request, *args, **kwargs)

        return preprocess_add_request

    def add(original: Callable[..., Any]) -> Callable[..., Any]:
        def add_request(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            _noting(lambda raw: raw.note(request.request_id, "added"))
            return original(self, request, *args, **kwargs)

        return add_request

    def schedule(original: Callable[..., Any]) -> Callable[..., Any]:
        def traced_schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            output = original(self, *args, **kwargs)
            _noting(
                lambda raw: raw.scheduled(
                    output,
                    started,
                    running=len(self.running),
                    waiting=len(self.waiting),
                    skipped=len(getattr(self, "skipped_waiting", ())),
                )
            )
            return output

        return traced_schedule

    def update(original: Callable[..., Any]) -> Callable[..., Any]:
        def update_from_output(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            _noting(lambda raw: raw.stepped(scheduler_output))
            return original(self, scheduler_output, *args, **kwargs)

        return update_from_output

    hook(core_cls, "preprocess_add_request", preprocess)
    hook(scheduler_cls, "add_request", add)
    hook(scheduler_cls, "schedule", schedule)
    hook(scheduler_cls, "update_from_output", update)
