"""Where each arm's requests waited inside vLLM's engine core, from the raw timelines that our vLLM
plugin writes with `TILSERVE_VLLM_TRACE_GRAMMAR` and `TILSERVE_VLLM_TRACE_DIR` set
(services/generator/vllm_trace.py `RawTimeline`; bench/gpu_til.sh `TRACE_GRAMMAR=...` sets both).

    python -m bench.engine_timeline TRACE_DIR [--times serving-times.log] [--json out.json]

Requests are put in arms by their request id (the benchmark's ids: `bench-at-` A_til, `bench-a-` A,
`bench-c-` the generator arms, with a schema C_til and without C; any other id with a schema is the
edge's, D), and, given bench/gpu_til.sh's `serving-times.log`, only those that reached the engine core
while that arm was being measured (`[c=N arm] measuring` until its result line) count, under
`c=N arm`. Its times of day are read as UTC (`--utc-offset-s` for another zone).

For each arm, p50 and p99 (ms) of each gap of a request's way through the engine core, and the core's
steps in its measured window (without the times log: from its first request's arrival at the core to
its last one's first step).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.metrics import WAVE_GAP_S, split_at_gaps
from services.common.stats import percentile

# (name, from, to): each a field of the request's line; "ready" is when it could first be scheduled
# (added to the scheduler and, with a schema, its grammar compiled).
GAPS = (
    ("front-end to core", "arrival", "received"),
    ("core to scheduler", "received", "added"),
    ("grammar pool wait", "received", "compile_start"),
    ("grammar compile", "compile_start", "compile_end"),
    ("ready to scheduled", "ready", "scheduled"),
    # With async scheduling this holds the rest of the step before it too.
    ("scheduled to first step end", "scheduled", "first_step_end"),
    ("arrival to first step end", "arrival", "first_step_end"),
)
ARM_BY_PREFIX = (
    ("bench-at-", "engine-til"),
    ("bench-a-", "engine"),
    ("bench-wt-", "engine-wrapper-til"),
    ("bench-w-", "engine-wrapper"),
)
MEASURING = re.compile(r"^(\d\d):(\d\d):(\d\d(?:\.\d+)?) \[(c=\d+ [\w-]+)\] measuring")
RESULT = re.compile(r"^(\d\d):(\d\d):(\d\d(?:\.\d+)?) \[(c=\d+ [\w-]+)\] [\d,]+ tok/s")


def arm_of(request: dict[str, Any]) -> str:
    request_id = str(request["id"])
    for prefix, arm in ARM_BY_PREFIX:
        if request_id.startswith(prefix):
            return arm
    if request_id.startswith("bench-c-"):
        return "generator-til" if request.get("schema") else "generator"
    return "edge" if request.get("schema") else "other"


@dataclass
class Core:
    """One engine core's file: its requests (times on the wall clock) and its steps."""

    path: Path
    requests: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)


def clock_offset(path: Path) -> float | None:
    """Wall minus monotonic time, from the file's first clock line; None if it has none."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if '"clock"' in line:
            clock = json.loads(line)["clock"]
            return float(clock["wall"] - clock["monotonic"])
    return None


def read_core(path: Path, default_offset: float | None = None) -> Core:
    """Monotonic times become wall times with the file's clock line, so that every core and the
    front-ends' `arrival` share one clock. A file without one (its first lines removed while the core
    ran) takes `default_offset`: on Linux `time.monotonic()` is CLOCK_MONOTONIC, one clock for every
    process of the host, so another core's clock line serves."""
    core = Core(path)
    offset = default_offset
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "clock" in record:
            offset = record["clock"]["wall"] - record["clock"]["monotonic"]
        elif offset is None:
            raise ValueError(f"{path}: a record before the clock line")
        elif "step" in record:
            step = dict(record["step"])
            step["t"] += offset
            step["end"] += offset
            core.steps.append(step)
        else:
            request = dict(record)
            for name in ("received", "compile_start", "compile_end", "added", "scheduled", "first_step_end"):
                if name in request:
                    request[name] += offset
            ready = [request[n] for n in ("added", "compile_end") if n in request]
            if ready:
                request["ready"] = max(ready)
            core.requests.append(request)
    return core


def windows(times_log: str, utc_offset_s: float = 0.0) -> list[tuple[str, float, float]]:
    """(`c=N arm`, start, end) as seconds of the day (UTC) from serving-times.log's lines."""
    found: list[tuple[str, float, float]] = []
    open_: dict[str, float] = {}
    for line in times_log.splitlines():
        for pattern, is_start in ((MEASURING, True), (RESULT, False)):
            m = pattern.match(line)
            if m is None:
                continue
            at = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) - utc_offset_s
            if is_start:
                open_[m[4]] = at
            elif m[4] in open_:
                found.append((m[4], open_.pop(m[4]), at))
    return found


def _day_seconds(wall: float) -> float:
    return wall % 86400


def summarize_gaps(requests: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, start, end in GAPS:
        values = [(r[end] - r[start]) * 1000 for r in requests if start in r and end in r]
        if values:
            out[name] = {"p50": percentile(values, 50), "p99": percentile(values, 99), "n": len(values)}
    return out


def summarize_steps(steps: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The steps that ran tokens. With async scheduling (vLLM 0.25's default) a step is scheduled
    while the one before it still runs, so a step's own `end - t` also holds the rest of the one
    before; its time is `end` minus the previous step's `end` here."""
    ran = sorted((s for s in steps if s["tokens"] > 0), key=lambda s: s["end"])
    own = {
        id(s): (s["end"] - max(s["t"], ran[i - 1]["end"] if i else s["t"])) * 1000 for i, s in enumerate(ran)
    }
    prefill = [s for s in ran if s["new"] > 0]
    decode = [s for s in ran if s["new"] == 0]
    return {
        "steps that ran tokens": len(ran),
        "steps with new requests": len(prefill),
        "their ms p50 (end to the previous end)": percentile([own[id(s)] for s in prefill], 50),
        "their tokens p50": percentile([s["tokens"] for s in prefill], 50),
        "their new requests p50": percentile([s["new"] for s in prefill], 50),
        "steps with requests left waiting": sum(1 for s in ran if s["waiting"] + s["skipped"] > 0),
        # vLLM's skipped queue holds requests whose grammar was not ready, and ones it put back there
        # for want of budget.
        "steps leaving requests in the skipped queue": sum(1 for s in ran if s["skipped"] > 0),
        "decode steps": len(decode),
        "decode ms p50 (end to the previous end)": percentile([own[id(s)] for s in decode], 50),
        "schedule ms p50": percentile([s["schedule_ms"] for s in ran], 50),
    }


def waves(requests: Sequence[dict[str, Any]], gap_s: float = WAVE_GAP_S) -> list[dict[str, float]]:
    """A closed loop of equal requests runs in waves: its requests reach the core in bursts, apart by
    more than `gap_s`. For each: the spread of its arrivals, its prefill steps (the steps that first
    scheduled one of its requests: their distinct `scheduled` times), how many requests the first of
    them took, and the p50 from arrival to the end of a request's first step. At 100 prompts of 512
    tokens and 8,192 tokens a step, a wave takes 7 prefill steps when the first holds 4 or more of them
    and 8 when it holds fewer, and with 1 the median request waits a whole step more
    (bench/results/issue13-h200-s21)."""
    scheduled = [r for r in requests if "scheduled" in r and "first_step_end" in r]
    groups = split_at_gaps(scheduled, lambda r: float(r["arrival"]), gap_s)
    rows = []
    for group in groups:
        start = group[0]["arrival"]
        steps = sorted({r["scheduled"] for r in group})
        rows.append(
            {
                "requests": len(group),
                "arrivals p50 ms": percentile([(r["arrival"] - start) * 1000 for r in group], 50),
                "arrivals max ms": (group[-1]["arrival"] - start) * 1000,
                "prefill steps": len(steps),
                "first step new": sum(1 for r in group if r["scheduled"] == steps[0]),
                "arrival to first step end p50 ms": percentile(
                    [(r["first_step_end"] - r["arrival"]) * 1000 for r in group], 50
                ),
            }
        )
    return rows


def analyse(cores: Iterable[Core], times: Sequence[tuple[str, float, float]] = ()) -> dict[str, Any]:
    """Per arm (or `c=N arm` window): its requests' gaps, and the steps of the core(s) that ran it."""
    requests: dict[str, list[dict[str, Any]]] = defaultdict(list)
    steps: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for core in cores:
        here: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for request in core.requests:
            arm = arm_of(request)
            key = arm
            if times:
                at = _day_seconds(request.get("received", request["arrival"]))
                inside = [w for w, start, end in times if w.endswith(f" {arm}") and start <= at <= end]
                if not inside:
                    continue
                key = inside[0]
            here[key].append(request)
        for key, group in here.items():
            requests[key] += group
            if times:  # the steps of the measured window
                spans = [(start, end) for w, start, end in times if w == key]
                steps[key] += [s for s in core.steps if any(a <= _day_seconds(s["t"]) <= b for a, b in spans)]
            else:  # the steps from its first request's arrival at this core to its last one's first step
                first = min(r["received"] for r in group if "received" in r)
                last = max(r.get("first_step_end", first) for r in group)
                steps[key] += [s for s in core.steps if first <= s["t"] <= last]
    return {
        key: {
            "requests": len(group),
            "gaps_ms": summarize_gaps(group),
            "steps": summarize_steps(steps[key]),
            "waves": waves(group),
        }
        for key, group in sorted(requests.items())
    }


def render(result: dict[str, Any]) -> str:
    lines = []
    for key, arm in result.items():
        lines.append(f"{key}: {arm['requests']} requests")
        for name, gap in arm["gaps_ms"].items():
            lines.append(f"  {name:<30} p50 {gap['p50']:8.1f}  p99 {gap['p99']:8.1f} ms  (n={gap['n']})")
        for name, value in arm["steps"].items():
            if isinstance(value, float) and math.isnan(value):
                continue
            shown = f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"
            lines.append(f"  {name:<44} {shown}")
        # c=1 sends one request at a time: those are not waves.
        shown_waves = [w for w in arm.get("waves", ()) if w["requests"] >= 10]
        for i, wave in enumerate(shown_waves, 1):
            lines.append(
                f"  wave {i}: {wave['requests']} requests arriving over {wave['arrivals max ms']:.0f} ms "
                f"(p50 {wave['arrivals p50 ms']:.0f}), {wave['prefill steps']} prefill steps, the first with "
                f"{wave['first step new']}; arrival to first step end p50 {wave['arrival to first step end p50 ms']:.1f} ms"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trace_dir", type=Path, help="the folder of engine-core-<pid>.jsonl files")
    parser.add_argument("--times", type=Path, help="bench/gpu_til.sh's serving-times.log: measured windows")
    parser.add_argument("--utc-offset-s", type=float, default=0.0, help="the times log's zone, from UTC")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    files = sorted(args.trace_dir.glob("engine-core-*.jsonl"))
    if not files:
        print(f"no engine-core-*.jsonl in {args.trace_dir}", file=sys.stderr)
        return 2
    offsets = [o for o in map(clock_offset, files) if o is not None]
    cores = []
    for path in files:
        print(f"reading {path}", file=sys.stderr)
        cores.append(read_core(path, offsets[0] if offsets else None))
    times = windows(args.times.read_text(encoding="utf-8"), args.utc_offset_s) if args.times else []
    result = analyse(cores, times)
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
