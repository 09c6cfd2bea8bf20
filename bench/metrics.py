"""Per-request timings and their summary (TTFT, TPOT, ITL, end-to-end, throughput)."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from services.common.stats import nearest_rank, percentile

__all__ = ["RequestRecord", "nearest_rank", "percentile", "split_at_gaps", "summarize"]

T = TypeVar("T")


@dataclass
class RequestRecord:
    """One streamed request as the client saw it. Times are `time.monotonic()` seconds.

    `message_times` holds the arrival of every message that carried generated text; `tokens`
    is the output token count the server reported (or counted), not the number of messages.
    """

    start: float
    end: float = 0.0
    message_times: list[float] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None
    # Arm-specific facts worth checking afterwards (e.g. the edge's cache status).
    note: str | None = None
    # The server's own view (til.v1 Timings of the finished message), for time per hop: from the
    # call's arrival at the server to its first text, and its queueing before the engine ran it.
    server_ttft_ms: float | None = None
    server_queue_ms: float | None = None
    # In-process TIL arm: tokens up to and including the end-of-sequence token that closed the grammar
    # (what follows under ignore_eos is unconstrained); None where it is not known.
    constrained_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.message_times)

    @property
    def ttft(self) -> float:
        return self.message_times[0] - self.start

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first, as vLLM's benchmarks define it."""
        if self.tokens < 2:
            return None
        return (self.end - self.message_times[0]) / (self.tokens - 1)

    def itls(self) -> list[float]:
        """Gaps between consecutive text messages (one message may carry several tokens)."""
        t = self.message_times
        return [b - a for a, b in itertools.pairwise(t)]


def summarize(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """One row of the results table: throughput and latency percentiles over a measured batch."""
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    row: dict[str, Any] = {
        "requests": len(records),
        "failures": len(failed),
        "errors": dict(Counter(r.error or "no output" for r in failed)),
        "notes": dict(Counter(r.note for r in records if r.note)),
    }
    if not ok:
        return row
    wall = max(r.end for r in records) - min(r.start for r in records)
    tokens = sum(r.tokens for r in ok)
    messages = sum(len(r.message_times) for r in ok)
    ms = 1e3
    ttft = [r.ttft * ms for r in ok]
    tpot = [t * ms for r in ok if (t := r.tpot) is not None]
    itl = [gap * ms for r in ok for gap in r.itls()]
    e2e = [r.e2e * ms for r in ok]
    row.update(
        wall_s=round(wall, 3),
        output_tok_s=round(tokens / wall, 1),
        requests_s=round(len(ok) / wall, 3),
        prompt_tokens_mean=round(sum(r.prompt_tokens for r in ok) / len(ok), 1),
        output_tokens_mean=round(tokens / len(ok), 1),
        tokens_per_message=round(tokens / messages, 3),
    )
    constrained = [r.constrained_tokens for r in ok if r.constrained_tokens is not None]
    if constrained:
        row["constrained_tokens_mean"] = round(sum(constrained) / len(constrained), 1)
    server_ttft = [r.server_ttft_ms for r in ok if r.server_ttft_ms is not None]
    server_queue = [r.server_queue_ms for r in ok if r.server_queue_ms is not None]
    for name, values in (("server_ttft_ms", server_ttft), ("server_queue_ms", server_queue)):
        if values:
            row[f"{name}_p50"] = round(percentile(values, 50), 2)
            row[f"{name}_p99"] = round(percentile(values, 99), 2)
    for name, values in (("ttft_ms", ttft), ("tpot_ms", tpot), ("itl_ms", itl), ("e2e_ms", e2e)):
        row[f"{name}_p50"] = round(percentile(values, 50), 2)
        row[f"{name}_p99"] = round(percentile(values, 99), 2)
    by_wave = wave_ttft_p50(ok)
    if by_wave:
        row["ttft_ms_p50_by_wave"] = by_wave
    # Every request's TTFT and E2E (in request order), to look at a distribution afterwards.
    row["samples"] = {
        "ttft_ms": [round(r.ttft * ms, 2) for r in ok],
        "e2e_ms": [round(r.e2e * ms, 1) for r in ok],
    }
    return row


# Starts further apart than this end a wave (a closed loop of equal requests sends them in bursts:
# 100 streams of 256 tokens send the next wave ~2.5 s after the last).
WAVE_GAP_S = 0.9
MIN_WAVE = 10


def wave_ttft_p50(records: Sequence[RequestRecord], gap_s: float = WAVE_GAP_S) -> list[float]:
    """TTFT p50 (ms) of each wave of at least MIN_WAVE requests, in order; [] when there is none.

    At 100 equal streams the requests run in lockstep waves, and a wave's TTFT p50 moves by a whole
    prefill step with how many requests the engine's first step of the wave caught
    (bench/results/issue13-h200-s21): the arm's p50 over two waves is then as much the luck of its
    waves as its cost. The per-wave figures show it. Starts are `time.monotonic()`, one clock for
    every client process of a host (Linux)."""
    waves = split_at_gaps(records, lambda r: r.start, gap_s)
    return [round(percentile([r.ttft * 1e3 for r in w], 50), 1) for w in waves if len(w) >= MIN_WAVE]


def split_at_gaps(items: Iterable[T], at: Callable[[T], float], gap_s: float = WAVE_GAP_S) -> list[list[T]]:
    """`items` in order of `at(item)` (seconds), in runs split wherever two in a row are more than
    `gap_s` apart: the waves of a closed loop (here its requests' starts; bench.engine_timeline: their
    arrivals at the engine core)."""
    runs: list[list[T]] = []
    for item in sorted(items, key=at):
        if runs and at(item) - at(runs[-1][-1]) <= gap_s:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs
