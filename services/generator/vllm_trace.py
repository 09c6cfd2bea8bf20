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
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from services.common.stats import percentile

log = logging.getLogger(__name__)

ENV_TRACE = "TILSERVE_VLLM_TRACE_GRAMMAR"
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
        try:
            return create_grammar(request)
        finally:
            timeline.compile_ended(request.request_id)

    def traced_bitmask(requests: Any, structured_output_request_ids: Any, *args: Any, **kwargs: Any) -> Any:
        timeline.masked(structured_output_request_ids)
        return grammar_bitmask(requests, structured_output_request_ids, *args, **kwargs)

    manager.grammar_init = traced_init
    manager._create_grammar = traced_create
    manager.grammar_bitmask = traced_bitmask
