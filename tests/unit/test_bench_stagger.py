"""Staggered arrivals: streams started spread over a few seconds keep their spacing, their ramp requests
are not measured, the throughput is the full-load window's, and staggered rows compare only with
staggered rows. No GPU, no model: a stand-in arm that takes a fixed time per request."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from bench import compare
from bench.load import Stagger, staggered_loop
from bench.metrics import RequestRecord, full_load_window, summarize, tokens_between
from bench.prompts import Prompt


class PacedArm:
    """Answers each request in `duration_s`, with 4 messages of 2 tokens evenly spread."""

    def __init__(self, duration_s: float) -> None:
        self.duration_s = duration_s
        self.starts: dict[str, float] = {}

    async def one(self, prompt: Prompt, output_len: int) -> RequestRecord:
        record = RequestRecord(start=time.monotonic(), prompt_tokens=len(prompt.token_ids))
        self.starts[prompt.text] = record.start
        for _ in range(4):
            await asyncio.sleep(self.duration_s / 4)
            record.message_times.append(time.monotonic())
        record.tokens = 8
        record.end = time.monotonic()
        return record


def prompts(count: int) -> list[Prompt]:
    return [Prompt(text=f"p{i}", token_ids=(1, 2, 3)) for i in range(count)]


def test_streams_start_spread_over_the_stagger_and_only_the_middle_requests_are_measured() -> None:
    arm = PacedArm(duration_s=0.2)
    streams, per = 4, 3
    stagger = Stagger(spread_s=0.16, start_at=time.monotonic() + 0.05, streams=streams)
    records = asyncio.run(staggered_loop(arm, prompts(streams * per), streams, 8, stagger))  # type: ignore[arg-type]

    assert len(records) == streams * per
    # Stream i sends prompts[i * per : (i + 1) * per]; its first starts i * 0.04 s after the first stream's.
    firsts = [arm.starts[f"p{i * per}"] for i in range(streams)]
    gaps = [b - a for a, b in itertools.pairwise(firsts)]
    assert all(0.03 <= g <= 0.06 for g in gaps), gaps
    assert [r.measured for r in records] == [False, True, False] * streams

    row = summarize(records)
    assert row["requests"] == streams  # the measured ones only
    assert row["arrivals"] == "staggered"
    # Every measured request ran while all four streams were running (0.16 s of starts < 0.2 s a request).
    assert row["measured_in_full_load"] == f"{streams}/{streams}"
    # Four streams of 8 tokens every 0.2 s: 160 tokens/s while they all run.
    assert row["output_tok_s"] == pytest.approx(160, rel=0.25)
    assert "ttft_ms_p50_by_wave" not in row


def test_a_share_of_the_streams_takes_its_place_in_the_stagger() -> None:
    now = time.monotonic()
    whole = Stagger(spread_s=1.0, start_at=now + 10.0, streams=100)
    second_process = Stagger(spread_s=1.0, start_at=now + 10.0, streams=100, first=50)
    assert second_process.delay_s(0) == pytest.approx(whole.delay_s(50), abs=0.01)
    assert whole.delay_s(99) - whole.delay_s(0) == pytest.approx(0.99, abs=0.01)
    assert Stagger(spread_s=1.0, start_at=now - 5.0, streams=10).delay_s(3) == 0.0  # late: at once


@pytest.mark.parametrize("count", [8, 10])
def test_staggered_load_refuses_prompts_that_do_not_give_each_stream_a_ramp_and_a_measured_request(
    count: int,
) -> None:
    stagger = Stagger(spread_s=0.1, start_at=time.monotonic(), streams=4)
    with pytest.raises(ValueError, match="at least 3 prompts per stream"):
        asyncio.run(staggered_loop(PacedArm(0.01), prompts(count), 4, 8, stagger))  # type: ignore[arg-type]


def paced(start: float, duration: float, *, measured: bool = True, messages: int = 4) -> RequestRecord:
    r = RequestRecord(
        start=start, end=start + duration, tokens=2 * messages, prompt_tokens=8, measured=measured
    )
    r.message_times = [start + duration * (k + 1) / messages for k in range(messages)]
    return r


def test_the_full_load_window_runs_from_the_last_ramp_up_start_to_the_first_ramp_down_end() -> None:
    ups = [paced(0.0, 1.0, measured=False), paced(0.5, 1.0, measured=False)]
    downs = [paced(2.0, 1.0, measured=False), paced(2.5, 1.0, measured=False)]
    assert full_load_window(ups + downs) == (0.5, 3.0)
    # Messages at 0.25, 0.5, 0.75, 1.0 (2 tokens each): three fall in [0.5, 1.0].
    assert tokens_between([paced(0.0, 1.0)], 0.5, 1.0) == 6


def test_lockstep_rows_keep_their_wall_time_throughput() -> None:
    records = [paced(0.0, 1.0), paced(0.0, 2.0)]
    row = summarize(records)
    assert row["output_tok_s"] == 8.0  # 16 tokens over 2 s
    assert "arrivals" not in row and "measured_in_full_load" not in row


def row(arm: str, *, staggered: bool, tok_s: float, ttft: float) -> dict[str, object]:
    r: dict[str, object] = {
        "arm": arm,
        "concurrency": 100,
        "output_tokens_mean": 256,
        "prompt_tokens_mean": 512,
        "output_tok_s": tok_s,
        "ttft_ms_p50": ttft,
        "tpot_ms_p50": 10.0,
    }
    if staggered:
        r["arrivals"] = "staggered"
    return r


def test_staggered_rows_are_compared_and_checked_only_with_staggered_rows() -> None:
    rows = [
        row("engine", staggered=False, tok_s=8000, ttft=560),
        row("engine-til", staggered=False, tok_s=7200, ttft=550),
        row("edge", staggered=False, tok_s=7100, ttft=730),
        row("engine", staggered=True, tok_s=7900, ttft=40),
        row("engine-til", staggered=True, tok_s=7300, ttft=45),
        row("edge", staggered=True, tok_s=7200, ttft=52),
    ]
    assert compare.arm_label(rows[-1]) == "edge (staggered)"
    found = {(r["what"], r["concurrency"]): r["value"] for r in compare.ratios(rows)}  # type: ignore[arg-type]
    assert found[("D/A output tok/s", 100)] == round(7100 / 8000, 3)
    assert found[("D/A output tok/s (staggered)", 100)] == round(7200 / 7900, 3)
    assert found[("D - A_til TTFT p50 (ms) (staggered)", 100)] == 7.0
    checks = {c["what"]: c for c in compare.checks(rows)}  # type: ignore[arg-type]
    assert checks["D TTFT p50 <= A_til's + 10 ms"]["met"] is False
    assert checks["D TTFT p50 <= A_til's + 10 ms (staggered)"]["met"] is True
    assert checks["D TTFT p50 <= A_til's + 10 ms (staggered)"]["bound"] == 55.0
    assert checks["D output tok/s >= 0.90 x A (staggered)"]["met"] is True
