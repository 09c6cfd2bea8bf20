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
    # False for a staggered stream's ramp-up and ramp-down requests (bench.load.Stagger): they load the
    # server, and count in its throughput, but their latencies are not the measured ones.
    measured: bool = True

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
    """One row of the results table: throughput and latency percentiles over a measured batch.

    Latencies are the measured requests'. Throughput is over the batch's wall time, or, for a staggered
    batch (one with ramp requests), over its full-load window (`full_load_window`)."""
    every = list(records)
    records = [r for r in every if r.measured]
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
    tokens = sum(r.tokens for r in ok)
    messages = sum(len(r.message_times) for r in ok)
    ms = 1e3
    ttft = [r.ttft * ms for r in ok]
    tpot = [t * ms for r in ok if (t := r.tpot) is not None]
    itl = [gap * ms for r in ok for gap in r.itls()]
    e2e = [r.e2e * ms for r in ok]
    ramps = [r for r in every if not r.measured]
    if ramps:
        begin, end = full_load_window(ramps)
        wall = max(end - begin, 1e-9)
        in_window = [r for r in records if r.start >= begin and r.end <= end]
        row.update(
            arrivals="staggered",
            wall_s=round(wall, 3),
            output_tok_s=round(tokens_between([r for r in every if r.ok], begin, end) / wall, 1),
            requests_s=round(len([r for r in every if r.ok and begin <= r.end <= end]) / wall, 3),
            measured_in_full_load=f"{len(in_window)}/{len(records)}",
        )
    else:
        wall = max(r.end for r in records) - min(r.start for r in records)
        row.update(
            wall_s=round(wall, 3), output_tok_s=round(tokens / wall, 1), requests_s=round(len(ok) / wall, 3)
        )
    row.update(
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
    by_wave = [] if ramps else wave_ttft_p50(ok)
    if by_wave:
        row["ttft_ms_p50_by_wave"] = by_wave
    # Every request's TTFT and E2E (in request order), to look at a distribution afterwards.
    row["samples"] = {
        "ttft_ms": [round(r.ttft * ms, 2) for r in ok],
        "e2e_ms": [round(r.e2e * ms, 1) for r in ok],
    }
    return row


def full_load_window(ramps: Sequence[RequestRecord]) -> tuple[float, float]:
    """When every stream of a staggered batch was running: from the last ramp-up's start to the
    first ramp-down's end. `ramps` are the batch's unmeasured requests, one ramp-up and one ramp-down
    a stream, told apart by time: a stream's ramp-down starts after its ramp-up ends."""
    ordered = sorted(ramps, key=lambda r: r.start)
    half = len(ordered) // 2
    ups, downs = ordered[:half], ordered[half:]
    return max(r.start for r in ups), min(r.end for r in downs)


def tokens_between(records: Iterable[RequestRecord], begin: float, end: float) -> float:
    """Output tokens the records received between `begin` and `end`, each message counted as an equal
    share of its request's tokens (the streams' tokens per message are even)."""
    total = 0.0
    for r in records:
        if r.message_times:
            share = r.tokens / len(r.message_times)
            total += share * sum(1 for t in r.message_times if begin <= t <= end)
    return total


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
