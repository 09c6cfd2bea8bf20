"""Many concurrent gRPC calls from a compiled client: h2load (nghttp2) speaking gRPC over HTTP/2.

A Python grpc.aio client spends ~0.7 ms of CPU on each call it reads, so at 100 callers on a few cores
the client, not the server, sets the latency. h2load is a C++ HTTP/2 load generator; a unary-request
gRPC call is an HTTP/2 POST to `/package.Service/Method` with `content-type: application/grpc`,
`te: trailers` and a length-prefixed message as the body (`grpc_frame`), so h2load can send it. Its
`--log-file` gives each request's start and the time until its response ended (`parse_log`), hence
p50 / p99 (`summarize`).

h2load does not read gRPC's `grpc-status` trailer: an error answer is HTTP 200 to it. Success is
therefore checked on the server: the edge's Prometheus counters (`grpc_server_handled_total` by code,
`tilserve_edge_results_total{outcome="cached"}` for each replayed hit), read from every edge worker's
metrics port before and after the run (`EdgeCounts`, `hit_problems`).

What h2load times is the whole response: for a server-streaming call, until its last message and
trailers. A cache hit's messages are replayed at once, so this bounds the time to the first message
from above.

h2load is found through the `H2LOAD` environment variable, else on PATH (`bench/h2load_kit.sh` makes
one that runs on a machine without it).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import shutil
import struct
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.metrics import percentile

GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
EDGE_GENERATE_TIL = "/til.v1.EdgeService/GenerateTil"
END_OF_STREAM_NOTE = (
    "h2load times each call to the end of its response (last message and trailers); a cache hit is "
    "replayed at once, so this bounds the time to the first message from above"
)


class H2loadMissing(RuntimeError):
    pass


def grpc_frame(message: bytes | Any) -> bytes:
    """A gRPC request body: one uncompressed length-prefixed message (a protobuf message or its bytes)."""
    data = message if isinstance(message, bytes | bytearray) else message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(data)) + bytes(data)


def grpc_url(target: str, method: str) -> str:
    """`http://HOST:PORT/package.Service/Method` for a plaintext target `HOST:PORT`."""
    return f"http://{target}/{method.lstrip('/')}"


def find_h2load() -> str:
    """The h2load to run: `$H2LOAD`, else `h2load` on PATH."""
    if configured := os.environ.get("H2LOAD"):
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise H2loadMissing(f"H2LOAD={configured} is not an executable file")
        return configured
    found = shutil.which("h2load")
    if found is None:
        raise H2loadMissing(
            "h2load not found: install nghttp2-client (apt-get install nghttp2-client), or run "
            "bash bench/h2load_kit.sh and set H2LOAD=$PWD/.h2l/h2load"
        )
    return found


def default_threads(clients: int) -> int:
    return max(1, min(4, os.cpu_count() or 1, clients))


@dataclasses.dataclass(frozen=True)
class Load:
    """How h2load loads the server: `requests` calls over `connections` connections with at most
    `streams` calls in flight on each (closed loop), on `threads` threads."""

    requests: int
    connections: int
    streams: int = 1
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.connections < 1 or self.streams < 1:
            raise ValueError("connections and streams must be at least 1")
        if self.requests < self.connections:
            raise ValueError(
                f"h2load needs at least one request per connection: {self.requests} requests, "
                f"{self.connections} connections"
            )

    @property
    def concurrency(self) -> int:
        return self.connections * self.streams

    @property
    def thread_count(self) -> int:
        return min(self.threads or default_threads(self.connections), self.connections)

    def describe(self) -> str:
        return (
            f"{self.requests} requests, {self.concurrency} concurrent ({self.connections} connections x "
            f"{self.streams} stream{'s' if self.streams > 1 else ''}, {self.thread_count} h2load threads)"
        )


def h2load_command(binary: str, url: str, body: Path, log: Path, load: Load) -> list[str]:
    command = [
        binary,
        "-n", str(load.requests),
        "-c", str(load.connections),
        "-m", str(load.streams),
        "-t", str(load.thread_count),
        "-d", str(body),
        "--log-file", str(log),
    ]  # fmt: skip
    for header in GRPC_HEADERS:
        command += ["-H", header]
    return [*command, url]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One request in h2load's log: its start (µs since the epoch), HTTP status (-1: failed) and the µs
    from sending it until its response ended."""

    start_us: int
    status: int
    duration_us: int


def parse_log(text: str) -> list[Entry]:
    """h2load's `--log-file`: one tab-separated line per request."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"h2load log line {number} is not start<TAB>status<TAB>duration: {line!r}")
        entries.append(Entry(int(fields[0]), int(fields[1]), int(fields[2])))
    return entries


_COUNTS = re.compile(
    r"requests: (?P<total>\d+) total, (?P<started>\d+) started, (?P<done>\d+) done, "
    r"(?P<succeeded>\d+) succeeded, (?P<failed>\d+) failed, (?P<errored>\d+) errored, (?P<timeout>\d+) timeout"
)


def parse_counts(stdout: str) -> dict[str, int]:
    """h2load's own request counts ("requests: N total, N started, ..."), or {} if it printed none."""
    found = _COUNTS.search(stdout)
    return {k: int(v) for k, v in found.groupdict().items()} if found else {}


@dataclasses.dataclass
class Run:
    """One h2load run: what it was asked, what it logged and printed, and the CPU it used."""

    load: Load
    url: str
    entries: list[Entry]
    counts: dict[str, int]
    cpu_s: float
    returncode: int
    output: str
    command: list[str]


def summarize(run: Run) -> dict[str, Any]:
    """Requests, failures by HTTP status, end-of-stream p50 / p99 / max (ms), requests/s, h2load's CPU."""
    ok = [e for e in run.entries if e.status == 200]
    failures: collections.Counter[str] = collections.Counter(
        f"HTTP {e.status}" if e.status >= 0 else "stream failed" for e in run.entries if e.status != 200
    )
    if missing := run.load.requests - len(run.entries):
        failures["not done (no log line)"] += missing
    ms = [e.duration_us / 1000 for e in ok]
    row: dict[str, Any] = {
        "client": "h2load",
        "requests": run.load.requests,
        "concurrency": run.load.concurrency,
        "connections": run.load.connections,
        "streams_per_connection": run.load.streams,
        "h2load_threads": run.load.thread_count,
        "done": len(run.entries),
        "failures": run.load.requests - len(ok),
        "failures_by_status": dict(failures),
        "h2load_counts": run.counts,
        "h2load_cpu_s": round(run.cpu_s, 3),
        "h2load_cpu_ms_per_request": round(1000 * run.cpu_s / max(len(run.entries), 1), 4),
    }
    if ok:
        first = min(e.start_us for e in run.entries)
        last = max(e.start_us + e.duration_us for e in run.entries)
        wall_s = max(last - first, 1) / 1e6
        row |= {
            "wall_s": round(wall_s, 3),
            "requests_per_s": round(len(ok) / wall_s, 1),
            "end_of_stream_ms_p50": round(percentile(ms, 50), 3),
            "end_of_stream_ms_p99": round(percentile(ms, 99), 3),
            "end_of_stream_ms_max": round(max(ms), 3),
            "end_of_stream_ms_samples": [round(v, 3) for v in ms],
        }
    return row


def describe(summary: dict[str, Any]) -> str:
    """One line: the run's lengths and its figures."""
    streams = summary["streams_per_connection"]
    head = (
        f"h2load: {summary['requests']} requests, {summary['concurrency']} concurrent "
        f"({summary['connections']} connections x {streams} stream{'s' if streams > 1 else ''}, "
        f"{summary['h2load_threads']} threads)"
    )
    failed = f"{summary['failures']} failed" + (
        f" {summary['failures_by_status']}" if summary["failures_by_status"] else ""
    )
    if "end_of_stream_ms_p50" not in summary:
        return f"{head}: {failed}"
    return (
        f"{head}: end of stream p50 {summary['end_of_stream_ms_p50']:.2f} ms, p99 "
        f"{summary['end_of_stream_ms_p99']:.2f} ms, max {summary['end_of_stream_ms_max']:.2f} ms; "
        f"{summary['requests_per_s']:,.0f} req/s; {failed}; "
        f"h2load CPU {summary['h2load_cpu_s']:.2f} s ({summary['h2load_cpu_ms_per_request']:.3f} ms/request)"
    )


def run_h2load(
    url: str,
    body: bytes,
    load: Load,
    *,
    binary: str | None = None,
    timeout_s: float = 600.0,
    workdir: Path | None = None,
) -> Run:
    """Runs h2load (blocking: call it in a thread from a running event loop) and reads what it logged.

    Its CPU time comes from wait4() on its own process id: that child's user + system seconds only."""
    binary = binary or find_h2load()
    with contextlib.ExitStack() as stack:
        where = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="h2grpc-")))
        where.mkdir(parents=True, exist_ok=True)
        body_path, log_path, out_path = where / "body.bin", where / "h2load.log", where / "h2load.out"
        body_path.write_bytes(body)
        log_path.unlink(missing_ok=True)
        command = h2load_command(binary, url, body_path, log_path, load)
        with out_path.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        killer = threading.Timer(timeout_s, process.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            killer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        output = out_path.read_text(errors="replace")
        entries = parse_log(log_path.read_text()) if log_path.exists() else []
    run = Run(
        load=load,
        url=url,
        entries=entries,
        counts=parse_counts(output),
        cpu_s=usage.ru_utime + usage.ru_stime,
        returncode=process.returncode,
        output=output,
        command=command,
    )
    if run.returncode != 0:
        raise RuntimeError(
            f"h2load exited with {run.returncode} ({load.describe()}): {' '.join(command)}\n{output[-2000:]}"
        )
    return run


# --- the edge's own counts ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EdgeCounts:
    """The edge's counters for GenerateTil: calls by gRPC code, and results replayed from the cache; and
    the CPU seconds its worker processes have used (prometheus_client's process_cpu_seconds_total)."""

    codes: dict[str, float]
    cached: float
    cpu_s: float = 0.0

    @classmethod
    def from_text(cls, texts: Iterable[str], method: str = EDGE_GENERATE_TIL) -> EdgeCounts:
        """Summed over the metrics pages of every edge worker (Prometheus text format)."""
        from prometheus_client.parser import text_string_to_metric_families

        service, _, name = method.lstrip("/").rpartition("/")
        codes: dict[str, float] = collections.defaultdict(float)
        cached = cpu_s = 0.0
        for text in texts:
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    labels = sample.labels
                    if (
                        sample.name == "grpc_server_handled_total"
                        and labels.get("grpc_service") == service
                        and labels.get("grpc_method") == name
                    ):
                        codes[labels["grpc_code"]] += sample.value
                    elif (
                        sample.name == "tilserve_edge_results_total"
                        and labels.get("kind") == "til"
                        and labels.get("outcome") == "cached"
                    ):
                        # One per replayed hit (near cache or cacher). Not the cache look-ups: calls that
                        # ask for one key at once share a single cacher read.
                        cached += sample.value
                    elif sample.name == "process_cpu_seconds_total":
                        cpu_s += sample.value
        return cls(dict(codes), cached, cpu_s)

    def minus(self, before: EdgeCounts) -> EdgeCounts:
        codes = {code: n - before.codes.get(code, 0.0) for code, n in self.codes.items()}
        return EdgeCounts(
            {c: n for c, n in codes.items() if n}, self.cached - before.cached, self.cpu_s - before.cpu_s
        )


def fetch_metrics(endpoint: str, timeout_s: float = 5.0) -> str:
    """The metrics page of `HOST:PORT` (or a full URL)."""
    url = endpoint if "://" in endpoint else f"http://{endpoint}/metrics"
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return str(response.read().decode("utf-8"))


def edge_metrics_endpoints(first: str, workers: int = 0, limit: int = 256) -> list[str]:
    """The metrics endpoints of the edge's workers: worker i serves on the first's port + i.

    `workers` 0: as many consecutive ports from the first as answer with the edge's metrics."""
    host, _, port = first.rpartition(":")
    if workers:
        return [f"{host}:{int(port) + i}" for i in range(workers)]
    found = []
    for i in range(limit):
        endpoint = f"{host}:{int(port) + i}"
        try:
            page = fetch_metrics(endpoint, timeout_s=2.0)
        except OSError:
            break
        if "tilserve_edge_" not in page:
            break
        found.append(endpoint)
    if not found:
        raise RuntimeError(f"no edge metrics at {first} (EDGE_METRICS_PORT of the first edge worker)")
    return found


def read_edge_counts(endpoints: Sequence[str]) -> EdgeCounts:
    return EdgeCounts.from_text(fetch_metrics(e) for e in endpoints)


def hit_problems(delta: EdgeCounts, sent: int) -> list[str]:
    """What keeps `delta` (the edge's counts over an h2load run) from saying that each of the `sent`
    calls was answered OK from the cache, and nothing else was; empty when it does."""
    problems = []
    ok = delta.codes.get("OK", 0.0)
    if ok != sent:
        problems.append(f"the edge counted {ok:.0f} GenerateTil calls OK, h2load sent {sent}")
    if others := {code: int(n) for code, n in delta.codes.items() if code != "OK"}:
        problems.append(f"the edge answered GenerateTil with other codes: {others}")
    if delta.cached != sent:
        problems.append(f"the edge replayed {delta.cached:.0f} cached results, h2load sent {sent} calls")
    return problems


def settled_delta(
    endpoints: Sequence[str], before: EdgeCounts, sent: int, wait_s: float = 3.0
) -> tuple[EdgeCounts, list[str]]:
    """The edge's counts since `before` and their problems, re-read for up to `wait_s` while short (a
    worker counts a call as its status goes out, which may be a moment after h2load saw the end)."""
    deadline = time.monotonic() + wait_s
    while True:
        delta = read_edge_counts(endpoints).minus(before)
        problems = hit_problems(delta, sent)
        short = sum(delta.codes.values()) < sent or delta.cached < sent
        if not problems or not short or time.monotonic() > deadline:
            return delta, problems
        time.sleep(0.1)
