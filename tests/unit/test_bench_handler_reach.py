"""bench.handler_reach reads each call's reach and readiness from the generator's own log lines."""

from __future__ import annotations

from bench.handler_reach import figures


def line(request_id: str, prepare: float, reach: float) -> str:
    return (
        f"2026-11-29 23:24:00,239 INFO services.generator.servicer: request {request_id} finished (length): "
        f"733 prompt tokens (0 cached), 1 generated; prepare {prepare} ms, admitted {prepare} ms, queue 0.0 ms, "
        f"first output 20.0 ms, first text 20.1 ms, total 21 ms; reached this handler {reach} ms after the caller sent it"
    )


def test_each_kind_is_summarized_and_the_warm_up_burst_left_out() -> None:
    log = "\n".join(
        [
            *(line(f"plain-{i}", 1.0, 900.0) for i in range(2)),  # the warm-up burst (ids 0..burst-1)
            line("plain-0", 2.0, 4.0),  # the first measured plain burst
            line("plain-1", 2.0, 6.0),
            line("til-0", 10.0, 40.0),
            line("til-1", 12.0, 60.0),
            line("sized-0", 3.0, 5.0),
            line("sized-1", 3.0, 7.0),
        ]
    )
    result = figures(log, burst=2)
    assert result["plain"]["calls"] == 2 and result["plain"]["reached_p50_ms"] == 5.0
    assert result["til"]["reached_p50_ms"] == 50.0 and result["til"]["reached_p90_ms"] == 60.0
    assert result["til"]["ready_p50_ms"] == 11.0
    assert result["plain, TIL-sized"]["reached_p50_ms"] == 6.0
