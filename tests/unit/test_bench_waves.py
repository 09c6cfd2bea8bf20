"""The benchmark reports each lockstep wave's TTFT p50, so that arms are compared wave by wave."""

from __future__ import annotations

from bench.metrics import RequestRecord, summarize, wave_ttft_p50
from bench.report import markdown


def record(start: float, ttft: float) -> RequestRecord:
    r = RequestRecord(start=start, end=start + 3.0, tokens=4, prompt_tokens=8)
    r.message_times = [start + ttft, start + ttft + 0.01, start + ttft + 0.02]
    return r


def test_waves_are_split_at_gaps_in_the_starts_and_small_ones_left_out() -> None:
    burst = [record(10.0 + i * 0.001, 0.5 + i * 0.01) for i in range(20)]  # p50: 0.595 s
    staggered = [record(13.0 + i * 0.04, 0.3) for i in range(20)]  # 0.76 s of starts, one wave
    lone = [record(20.0, 0.1)]  # fewer than 10: no wave
    assert wave_ttft_p50(burst + staggered + lone) == [595.0, 300.0]
    assert wave_ttft_p50(lone) == []


def test_the_row_and_the_report_carry_the_waves() -> None:
    records = [record(10.0 + i * 0.001, 0.5) for i in range(10)] + [
        record(14.0 + i * 0.001, 0.7) for i in range(10)
    ]
    row = summarize(records)
    assert row["ttft_ms_p50_by_wave"] == [500.0, 700.0]
    row.update(arm="edge", concurrency=100)
    params = {"prompts": "512 tokens (exact)", "output_len": 256, "rounds": 2, "min_requests": 8}
    text = markdown(
        {"label": "t", "command": "x", "started_at": "now", "device": "d", "params": params, "rows": [row]}
    )
    assert "TTFT p50 of each wave" in text and "- edge @ 100: 500.0, 700.0" in text
