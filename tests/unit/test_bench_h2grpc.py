"""The benchmark's h2load client for gRPC (bench/h2grpc.py) and its edge-hit rows: framing, the command,
h2load's log and counts, the summary, the edge's metrics check, and the rows and table of bench.serving.
The last tests run the real h2load against the edge in process (skipped where h2load is absent)."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from til.v1 import cacher_pb2_grpc, common_pb2, edge_pb2

from bench import compare, h2grpc
from bench.arms import ArmSpec, seed_hit
from bench.metrics import RequestRecord
from bench.prompts import Prompt
from bench.report import markdown
from bench.serving import arm_runs, h2load_row, parse_args
from bench.til_workload import cache_seed, diff_of_words, edge_request
from services.common.admission import Admission
from tests.conftest import in_process_server
from tests.unit.test_edge_service import FakeCacher, FakeGenerator, edge_stack, service

# What h2load 1.52 printed for a run against a grpc.aio server.
H2LOAD_STDOUT = """\
starting benchmark...
spawning thread #0: 5 total client(s). 100 total requests
Application protocol: h2c
progress: 100% done

finished in 83.65ms, 2390.89 req/s, 457.75KB/s
requests: 200 total, 200 started, 198 done, 197 succeeded, 3 failed, 2 errored, 1 timeout
status codes: 197 2xx, 0 3xx, 0 4xx, 0 5xx
"""


def test_a_grpc_body_is_one_uncompressed_length_prefixed_message() -> None:
    request = edge_pb2.GenerateTilRequest(diff="diff --git a/x b/x\n", owner="bench")
    body = h2grpc.grpc_frame(request)
    data = request.SerializeToString()
    assert body[0] == 0 and struct.unpack(">I", body[1:5])[0] == len(data) == len(body) - 5
    assert edge_pb2.GenerateTilRequest.FromString(body[5:]) == request
    assert h2grpc.grpc_frame(data) == body
    assert h2grpc.grpc_frame(b"") == b"\x00\x00\x00\x00\x00"


def test_the_command_sends_grpc_headers_and_the_body_over_the_asked_connections(tmp_path: Path) -> None:
    load = h2grpc.Load(requests=20000, connections=100, threads=4)
    url = h2grpc.grpc_url("127.0.0.1:50051", h2grpc.EDGE_GENERATE_TIL)
    assert url == "http://127.0.0.1:50051/til.v1.EdgeService/GenerateTil"
    command = h2grpc.h2load_command("/x/h2load", url, tmp_path / "b", tmp_path / "l", load)
    assert command == [
        "/x/h2load", "-n", "20000", "-c", "100", "-m", "1", "-t", "4",
        "-d", str(tmp_path / "b"), "--log-file", str(tmp_path / "l"),
        "-H", "content-type: application/grpc", "-H", "te: trailers", url,
    ]  # fmt: skip
    assert load.concurrency == 100
    assert load.describe() == "20000 requests, 100 concurrent (100 connections x 1 stream, 4 h2load threads)"
    # Never more threads than connections, nor more than four by default.
    assert h2grpc.Load(10, 2, threads=8).thread_count == 2
    assert 1 <= h2grpc.Load(400, 100).thread_count <= min(4, os.cpu_count() or 1)
    assert h2grpc.Load(400, 50, streams=2).concurrency == 100
    with pytest.raises(ValueError, match="at least one request per connection"):
        h2grpc.Load(requests=50, connections=100)


def test_the_log_and_the_counts_read_as_h2load_writes_them() -> None:
    log = "1795961080959339\t200\t20421\n1795961080959590\t-1\t917\n\n"
    assert h2grpc.parse_log(log) == [
        h2grpc.Entry(1795961080959339, 200, 20421),
        h2grpc.Entry(1795961080959590, -1, 917),
    ]
    with pytest.raises(ValueError, match="line 1"):
        h2grpc.parse_log("1795961080959339 200 20421\n")
    assert h2grpc.parse_counts(H2LOAD_STDOUT) == {
        "total": 200, "started": 200, "done": 198, "succeeded": 197, "failed": 3, "errored": 2, "timeout": 1,
    }  # fmt: skip
    assert h2grpc.parse_counts("h2load: connect failed\n") == {}


def _run(entries: list[h2grpc.Entry], requests: int, cpu_s: float = 0.5) -> h2grpc.Run:
    load = h2grpc.Load(requests=requests, connections=10, threads=2)
    return h2grpc.Run(load, "http://h/x/y", entries, {}, cpu_s, 0, "", [])


def test_the_summary_gives_percentiles_failures_by_status_and_the_clients_cpu() -> None:
    start = 1_700_000_000_000_000
    # 100 good calls of 1..100 ms, started 10 ms apart; one failed stream, one HTTP 503, two never done.
    entries = [h2grpc.Entry(start + 10_000 * i, 200, 1000 * (i + 1)) for i in range(100)]
    entries += [h2grpc.Entry(start, -1, 5), h2grpc.Entry(start, 503, 7)]
    summary = h2grpc.summarize(_run(entries, requests=104))
    assert summary["requests"] == 104 and summary["done"] == 102 and summary["concurrency"] == 10
    assert summary["failures"] == 4
    assert summary["failures_by_status"] == {"stream failed": 1, "HTTP 503": 1, "not done (no log line)": 2}
    assert summary["end_of_stream_ms_p50"] == pytest.approx(50.5)
    assert summary["end_of_stream_ms_p99"] == pytest.approx(99.01)
    assert summary["end_of_stream_ms_max"] == 100.0
    # The first start to the last end: 990 ms + 100 ms.
    assert summary["wall_s"] == pytest.approx(1.09)
    assert summary["requests_per_s"] == pytest.approx(100 / 1.09, abs=0.1)
    assert summary["h2load_cpu_ms_per_request"] == pytest.approx(500 / 102, abs=1e-3)
    assert len(summary["end_of_stream_ms_samples"]) == 100
    line = h2grpc.describe(summary)
    assert line.startswith("h2load: 104 requests, 10 concurrent (10 connections x 1 stream, 2 threads)")
    assert "p50 50.50 ms, p99 99.01 ms, max 100.00 ms" in line and "4 failed" in line

    nothing = h2grpc.summarize(_run([], requests=10))
    assert nothing["failures"] == 10 and "end_of_stream_ms_p50" not in nothing
    assert h2grpc.describe(nothing).endswith("10 failed {'not done (no log line)': 10}")


def test_h2load_is_found_through_its_variable_or_the_path_and_missing_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "h2load"
    fake.write_text("#!/bin/sh\n")
    monkeypatch.setenv("H2LOAD", str(fake))
    with pytest.raises(h2grpc.H2loadMissing, match="not an executable"):
        h2grpc.find_h2load()
    fake.chmod(0o755)
    assert h2grpc.find_h2load() == str(fake)
    monkeypatch.delenv("H2LOAD")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert h2grpc.find_h2load() == str(fake)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(h2grpc.H2loadMissing, match=r"nghttp2-client.*h2load_kit\.sh"):
        h2grpc.find_h2load()


def _page(ok: int, cached: int, cpu_s: float | None = None, **codes: int) -> str:
    lines = [
        "# TYPE grpc_server_handled_total counter",
        f'grpc_server_handled_total{{grpc_code="OK",grpc_method="GenerateTil",grpc_service="til.v1.EdgeService"}} {ok}.0',
        # Another method's calls and the questions' cached results are not GenerateTil hits.
        'grpc_server_handled_total{grpc_code="OK",grpc_method="GenerateQuestions",grpc_service="til.v1.EdgeService"} 7.0',
        "# TYPE tilserve_edge_results_total counter",
        f'tilserve_edge_results_total{{kind="til",outcome="cached"}} {cached}.0',
        'tilserve_edge_results_total{kind="questions",outcome="cached"} 5.0',
        'tilserve_edge_results_total{kind="til",outcome="complete"} 3.0',
    ]
    lines += [
        f'grpc_server_handled_total{{grpc_code="{code}",grpc_method="GenerateTil",grpc_service="til.v1.EdgeService"}} {n}.0'
        for code, n in codes.items()
    ]
    if cpu_s is not None:
        lines += ["# TYPE process_cpu_seconds_total counter", f"process_cpu_seconds_total {cpu_s}"]
    return "\n".join(lines) + "\n"


def test_the_edges_counts_are_summed_over_workers_and_must_match_every_call_sent() -> None:
    before = h2grpc.EdgeCounts.from_text([_page(10, 8), _page(5, 5)])
    assert before == h2grpc.EdgeCounts({"OK": 15.0}, 13.0)
    after = h2grpc.EdgeCounts.from_text([_page(60, 58), _page(55, 55)])
    delta = after.minus(before)
    assert delta == h2grpc.EdgeCounts({"OK": 100.0}, 100.0)
    assert h2grpc.hit_problems(delta, 100) == []
    # One call refused, two of the OK ones not answered from the cache.
    short = h2grpc.EdgeCounts.from_text([_page(59, 55, INVALID_ARGUMENT=1), _page(55, 55)]).minus(before)
    assert h2grpc.hit_problems(short, 100) == [
        "the edge counted 99 GenerateTil calls OK, h2load sent 100",
        "the edge answered GenerateTil with other codes: {'INVALID_ARGUMENT': 1}",
        "the edge replayed 97 cached results, h2load sent 100 calls",
    ]
    # Calls from someone else during the run do not pass for h2load's.
    assert h2grpc.hit_problems(h2grpc.EdgeCounts({"OK": 101.0}, 101.0), 100) != []
    # Each worker's page has its own process's CPU seconds: summed, and the run's share is the difference.
    cpu_before = h2grpc.EdgeCounts.from_text([_page(10, 8, cpu_s=1.5), _page(5, 5, cpu_s=2.0)])
    cpu_after = h2grpc.EdgeCounts.from_text([_page(60, 58, cpu_s=1.55), _page(55, 55, cpu_s=2.03)])
    assert cpu_after.minus(cpu_before).cpu_s == pytest.approx(0.08)
    assert h2grpc.edge_metrics_endpoints("127.0.0.1:9100", workers=3) == [
        "127.0.0.1:9100",
        "127.0.0.1:9101",
        "127.0.0.1:9102",
    ]


# --- bench.serving's edge-hit rows ---------------------------------------------------------------


def _args(*extra: str) -> Any:
    return parse_args(["--arms", "edge,edge-hit", "--model", "m", "--out", "o", *extra])


def test_the_hit_client_picks_which_edge_hit_rows_are_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h2grpc, "find_h2load", lambda: "/usr/bin/h2load")
    assert arm_runs(_args()) == [("edge", None), ("edge-hit", None)]
    assert arm_runs(_args("--hit-client", "h2load")) == [("edge", None), ("edge-hit", "h2load")]
    assert arm_runs(_args("--hit-client", "both")) == [
        ("edge", None),
        ("edge-hit", None),
        ("edge-hit", "h2load"),
    ]
    with pytest.raises(SystemExit):
        parse_args(["--arms", "edge", "--model", "m", "--out", "o", "--hit-client", "h2load"])


def test_an_h2load_row_has_the_tables_fields_and_counts_only_the_calls_the_edge_confirmed() -> None:
    start = 1_700_000_000_000_000
    entries = [h2grpc.Entry(start + 1000 * i, 200, 2000 + 10 * i) for i in range(200)]
    summary = h2grpc.summarize(_run(entries, requests=200, cpu_s=0.02))
    check = RequestRecord(start=0.0, tokens=256, prompt_tokens=512, note="CACHE_STATUS_HIT")
    row = h2load_row(summary, check, h2grpc.EdgeCounts({"OK": 200.0}, 200.0), [])
    assert row["failures"] == 0 and row["errors"] == {} and row["notes"] == {"CACHE_STATUS_HIT": 200}
    assert row["ttft_ms_p50"] == row["e2e_ms_p50"] == summary["end_of_stream_ms_p50"]
    assert row["ttft_ms_p99"] == row["e2e_ms_p99"] == summary["end_of_stream_ms_p99"]
    assert (row["output_tokens_mean"], row["prompt_tokens_mean"]) == (256.0, 512.0)
    assert row["output_tok_s"] == pytest.approx(256 * 200 / summary["wall_s"], rel=1e-3)
    assert row["client_cpu_ms_per_request"] == pytest.approx(0.1)
    assert row["latency"] == "end of stream" and len(row["samples"]["e2e_ms"]) == 200
    assert "edge_cpu_ms_per_request" not in row  # no CPU figures on the edge's pages
    with_cpu = h2load_row(summary, check, h2grpc.EdgeCounts({"OK": 200.0}, 200.0, cpu_s=0.1), [])
    assert with_cpu["edge_cpu_ms_per_request"] == 0.5
    assert with_cpu["edge_cpu_cores"] == pytest.approx(0.1 / summary["wall_s"], abs=0.01)

    problems = ["the edge replayed 190 cached results, h2load sent 200 calls"]
    partly = h2load_row(summary, check, h2grpc.EdgeCounts({"OK": 200.0}, 190.0), problems)
    assert partly["failures"] == 10 and partly["edge_problems"] == problems
    assert partly["errors"] == {"HTTP 200 but not counted OK and a hit by the edge": 10}
    none = h2load_row(summary, check, h2grpc.EdgeCounts({"UNAVAILABLE": 200.0}, 0.0), ["x"])
    assert none["failures"] == 200 and "ttft_ms_p50" not in none


def test_the_table_tells_the_two_edge_hit_rows_apart_and_checks_each() -> None:
    base = {"concurrency": 100, "output_tokens_mean": 256.0, "prompt_tokens_mean": 512.0, "output_tok_s": 1.0}
    python_row = {**base, "arm": "edge-hit", "ttft_ms_p50": 7.0, "ttft_ms_p99": 24.0}
    h2load = {**base, "arm": "edge-hit", "client": "h2load", "ttft_ms_p50": 1.2, "ttft_ms_p99": 3.5}
    rows = [python_row, h2load]
    found = {c["what"]: c for c in compare.checks(rows)}
    assert (found["E TTFT p50 <= 5 ms"]["value"], found["E TTFT p50 <= 5 ms"]["met"]) == (7.0, False)
    assert found["E end of stream p50 <= 5 ms (h2load)"]["value"] == 1.2
    assert found["E end of stream p99 <= 15 ms (h2load)"]["met"] is True
    params = {"prompts": "p", "output_len": 256, "rounds": 2, "min_requests": 8}
    text = markdown(
        {"label": "t", "command": "c", "started_at": "s", "device": "d", "params": params, "rows": rows}
    )
    assert "| 100 | edge-hit | - |" in text and "| 100 | edge-hit (h2load) | - |" in text
    assert "bounds its TTFT from above" in text


# --- the real h2load against the edge -----------------------------------------------------------

needs_h2load = pytest.mark.skipif(
    shutil.which("h2load") is None and not os.environ.get("H2LOAD"), reason="h2load is not installed"
)


@needs_h2load
async def test_h2load_hits_the_edge_and_the_edges_counts_confirm_every_call() -> None:
    """The request `seed_hit` seeds (through a cacher) and returns, sent by h2load to the edge in process:
    as many log lines as requests, and the edge counted each call OK and replayed from the cache."""
    generator = FakeGenerator()
    seeding = FakeCacher()
    prompt = Prompt(text=" ".join(["alpha", "beta", "gamma"] * 30), token_ids=tuple(range(300)))
    spec = ArmSpec(name="edge-hit", target="", model=generator.model)
    async with in_process_server(
        [service("til.v1.CacherService", cacher_pb2_grpc.add_CacherServiceServicer_to_server, seeding)]
    ) as (server, _):
        request = await seed_hit(
            ArmSpec(spec.name, spec.target, spec.model, f"127.0.0.1:{server.port}"), prompt, 64
        )
    sampling = common_pb2.SamplingParams(temperature=0.0)
    diff = diff_of_words(prompt.text.split())
    assert request == edge_request(diff, 64, sampling, edge_pb2.CACHE_POLICY_UNSPECIFIED)
    seed = cache_seed(diff, 64, generator.model, sampling, prompt_tokens=300)
    assert [(p.namespace, p.key, p.value_json) for p in seeding.puts] == [
        (seed.namespace, seed.key, seed.value_json)
    ]
    admission = Admission("h2load-test", max_active=64, max_waiting=64)
    async with edge_stack(generator=generator, retrieval_top_k=0, admission=admission) as stack:
        stack.cacher.entries.update(seeding.entries)
        url = h2grpc.grpc_url(f"127.0.0.1:{stack.port}", h2grpc.EDGE_GENERATE_TIL)
        body = h2grpc.grpc_frame(request)
        before = h2grpc.EdgeCounts.from_text([generate_latest().decode()])
        load = h2grpc.Load(requests=300, connections=16, threads=2)
        run = await asyncio.to_thread(h2grpc.run_h2load, url, body, load)
        delta = h2grpc.EdgeCounts.from_text([generate_latest().decode()]).minus(before)

        # A request the edge refuses is HTTP 200 to h2load too: only the edge's counts catch it.
        refused = edge_pb2.GenerateTilRequest()
        refused.CopyFrom(request)
        refused.diff = ""
        before_refused = h2grpc.EdgeCounts.from_text([generate_latest().decode()])
        bad = await asyncio.to_thread(
            h2grpc.run_h2load, url, h2grpc.grpc_frame(refused), h2grpc.Load(20, 4, threads=1)
        )
        bad_delta = h2grpc.EdgeCounts.from_text([generate_latest().decode()]).minus(before_refused)
    summary = h2grpc.summarize(run)
    assert len(run.entries) == 300 and summary["failures"] == 0
    assert run.counts["succeeded"] == 300
    assert (
        summary["end_of_stream_ms_p50"] <= summary["end_of_stream_ms_p99"] <= summary["end_of_stream_ms_max"]
    )
    assert run.cpu_s > 0
    assert (delta.codes, delta.cached) == ({"OK": 300.0}, 300.0)
    assert delta.cpu_s > 0  # the edge's own process CPU over the run, from its metrics page
    assert h2grpc.hit_problems(delta, 300) == []
    assert generator.requests == []  # every call was a hit

    assert [e.status for e in bad.entries] == [200] * 20
    assert bad_delta.codes == {"INVALID_ARGUMENT": 20.0} and bad_delta.cached == 0
    assert h2grpc.hit_problems(bad_delta, 20)[0] == "the edge counted 0 GenerateTil calls OK, h2load sent 20"


@needs_h2load
def test_h2load_reports_calls_it_could_not_make_as_not_done(tmp_path: Path) -> None:
    from services.stack import free_port

    run = h2grpc.run_h2load(
        f"http://127.0.0.1:{free_port()}/til.v1.EdgeService/GenerateTil", b"\x00" * 5, h2grpc.Load(6, 2)
    )
    assert run.entries == [] and run.counts["failed"] == 6
    assert h2grpc.summarize(run)["failures_by_status"] == {"not done (no log line)": 6}
