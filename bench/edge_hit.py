"""The edge hop on CPU: cache hits under many callers, and pass-through of many streams.

Starts the cacher (private redis-server), the generator's fake engine (no model: a schema-shaped TIL at
a fixed pace) and the edge (retrieval off, so that only the edge's own path is measured), then:

- `hit`: seeds one cached TIL per distinct diff (under the key the edge computes), then keeps `--concurrency` callers asking for them
  (closed loop); reports time to the first message and to the end of the stream, p50 / p99, and the
  edge's CPU time per hit. `--client h2load` sends the callers' hits from h2load (bench/h2grpc.py, a
  compiled HTTP/2 client: `--concurrency` connections with one call in flight each, all asking for the
  first diff) instead of this process's grpc.aio client, whose ~0.7 ms of CPU per hit is otherwise
  what 100 callers on a few cores measure; h2load times each call to the end of its stream, which for
  a hit (replayed at once) bounds the time to the first message from above, and the edge's metrics
  must count every call it sent as OK and answered from the cache.
- `stream`: `--concurrency` streams at a time with the cache bypassed, each `--tokens` tokens long
  (`ignore_eos`), the fake engine emitting one token every `--token-interval-ms`; reports tokens per
  message the caller received and the edge's CPU time per token.

The edge's CPU time is read from /proc (user + system, the edge and its worker processes). Prints one
JSON line per run and appends it to `--out`. Example:

    python -m bench.edge_hit --mode hit --concurrency 100 --requests 2000
    python -m bench.edge_hit --mode hit --client h2load --concurrency 100 --requests 20000 --edge-env EDGE_WORKERS=2
    python -m bench.edge_hit --mode hit --edge-env EDGE_NEAR_CACHE_ENTRIES=1024 --edge-env EDGE_WORKERS=2
    python -m bench.edge_hit --mode stream --concurrency 100 --requests 300 --edge-env EDGE_COALESCE_MS=5
    python -m bench.edge_hit --mode hit --profile /tmp/edge.svg   # py-spy record of the edge meanwhile
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from til.v1 import cacher_pb2, cacher_pb2_grpc, common_pb2, edge_pb2, edge_pb2_grpc

from bench import h2grpc
from bench.metrics import nearest_rank
from bench.til_workload import cache_seed, edge_request
from services.stack import SERVICES, LocalStack, free_port


def diff(i: int) -> str:
    return (
        f"diff --git a/app/cache_{i}.py b/app/cache_{i}.py\n--- a/app/cache_{i}.py\n+++ b/app/cache_{i}.py\n"
        f"@@ -1,2 +1,3 @@ def configure():\n     client = connect()\n+    ttl_{i} = {60 * (i + 1)}\n"
        "     return client\n"
    )


SAMPLING = common_pb2.SamplingParams(temperature=0.0)
HIT_TOKENS = 64


def request(i: int, args: argparse.Namespace) -> edge_pb2.GenerateTilRequest:
    if args.mode == "stream":
        return edge_request(diff(i), args.tokens, SAMPLING, edge_pb2.CACHE_POLICY_BYPASS, ignore_eos=True)
    return edge_request(diff(i), HIT_TOKENS, SAMPLING, edge_pb2.CACHE_POLICY_UNSPECIFIED)


async def seed(cacher_addr: str, args: argparse.Namespace) -> None:
    """Stores a TIL under the edge's own key for each distinct diff, through the cacher's API."""
    async with grpc.aio.insecure_channel(cacher_addr) as channel:
        stub = cacher_pb2_grpc.CacherServiceStub(channel)
        for i in range(args.distinct):
            entry = cache_seed(diff(i), HIT_TOKENS, "fake", SAMPLING)
            await stub.PutEntry(
                cacher_pb2.PutEntryRequest(
                    namespace=entry.namespace, key=entry.key, value_json=entry.value_json
                ),
                timeout=30,
            )


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and of its children (edge workers), living or reaped."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime, stime, cutime, cstime (fields 14-17 of stat; after the name they start at index 11)
        total += sum(int(x) for x in fields[11:15]) / ticks
    return total


async def one(stub: edge_pb2_grpc.EdgeServiceStub, req: edge_pb2.GenerateTilRequest) -> dict[str, Any]:
    began = time.perf_counter()
    first = None
    messages = tokens = 0
    status = -1
    async for message in stub.GenerateTil(req, timeout=120):
        if first is None:
            first = time.perf_counter() - began
        kind = message.WhichOneof("event")
        if kind == "started":
            status = message.started.cache_status
        elif kind == "delta":
            messages += 1
            tokens += message.delta.token_count
    return {"first_s": first, "total_s": time.perf_counter() - began, "deltas": messages, "tokens": tokens,
            "cache_status": status}  # fmt: skip


async def closed_loop(stubs: list[Any], args: argparse.Namespace, count: int) -> list[dict[str, Any]]:
    """`--concurrency` callers spread over the channels, until `count` calls have been made."""
    results: list[dict[str, Any]] = []
    todo = iter(range(count))

    async def caller(stub: Any) -> None:
        for i in todo:
            results.append(await one(stub, request(i % args.distinct, args)))

    await asyncio.gather(*(caller(stubs[n % len(stubs)]) for n in range(args.concurrency)))
    return results


def edge_metrics(stack: LocalStack, edge_env: dict[str, str]) -> list[str]:
    """The metrics endpoints of the edge's workers (worker i: the edge's metrics port + i)."""
    workers = edge_env.get("EDGE_WORKERS", "1")
    first = f"127.0.0.1:{stack.processes['edge'].metrics_port}"
    return h2grpc.edge_metrics_endpoints(first, int(workers) if workers.isdigit() else 0)


def h2load_load(args: argparse.Namespace, requests: int) -> h2grpc.Load:
    return h2grpc.Load(
        requests=max(requests, args.concurrency // args.h2load_streams),
        connections=args.concurrency // args.h2load_streams,
        streams=args.h2load_streams,
        threads=args.h2load_threads,
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    services = ("cacher", "generator", "edge")
    ports = {name: free_port() for name in SERVICES}
    edge_env = {
        "EDGE_RETRIEVAL_TOP_K": "0",
        "EDGE_QUESTION_HISTORY_K": "0",
        "EDGE_INDEX_TILS": "false",
        "EDGE_ALLOW_IGNORE_EOS": "true",
        "EDGE_MAX_ACTIVE": "1024",
        "EDGE_MAX_WAITING": "4096",
        "EDGE_SHARE_IDENTICAL": "false",
        "EDGE_LOG_LEVEL": "WARNING",
        **dict(item.split("=", 1) for item in args.edge_env),
    }
    stack = LocalStack(
        data_dir=Path(tempfile.mkdtemp(prefix="edge-bench-")),
        ports=ports,
        metrics_ports={name: free_port() for name in SERVICES},
        services=services,
        env={
            "edge": edge_env,
            "generator": {
                "GENERATOR_BACKEND": "fake",
                "GENERATOR_FAKE_TOKEN_INTERVAL_S": str(args.token_interval_ms / 1000),
                "GENERATOR_MAX_ACTIVE_REQUESTS": "1024",
                "GENERATOR_MAX_WAITING_REQUESTS": "4096",
                "GENERATOR_LOG_LEVEL": "WARNING",
            },
        },
    )
    await stack.start(timeout_s=120)
    edge_pid = stack.processes["edge"].process.pid  # type: ignore[union-attr]
    profiler = None
    try:
        # Channels with connections of their own (edge workers balance connections, not calls).
        own = [("grpc.use_local_subchannel_pool", 1)]
        channels = [
            grpc.aio.insecure_channel(stack.address("edge"), options=own) for _ in range(args.channels)
        ]
        stubs = [edge_pb2_grpc.EdgeServiceStub(channel) for channel in channels]
        stub = stubs[0]
        try:
            if args.mode == "hit":  # every call is a hit
                await seed(stack.address("cacher"), args)
                check = await one(stub, request(0, args))
                if check["cache_status"] != edge_pb2.CACHE_STATUS_HIT:
                    raise SystemExit(f"the seed did not make a cache hit: {check}")
            if args.client == "h2load":
                url = h2grpc.grpc_url(stack.address("edge"), h2grpc.EDGE_GENERATE_TIL)
                body = h2grpc.grpc_frame(request(0, args))
                endpoints = edge_metrics(stack, edge_env)
                warm = h2load_load(args, min(args.requests, 2 * args.concurrency))
                print(f"warm-up: {warm.describe()}", file=sys.stderr, flush=True)
                await asyncio.to_thread(h2grpc.run_h2load, url, body, warm)
            else:
                await closed_loop(stubs, args, min(args.requests, 2 * args.concurrency))  # warm-up
            if args.profile:
                profiler = subprocess.Popen(  # noqa: ASYNC220 (started once, before the timing)
                    [shutil.which("py-spy") or "py-spy", "record", "--subprocesses", "--nonblocking",
                     "--format", "raw" if args.profile.endswith(".txt") else "flamegraph",
                     "-o", args.profile, "-p", str(edge_pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                await asyncio.sleep(1.0)
            if args.client == "h2load":
                load = h2load_load(args, args.requests)
                print(f"measuring: {load.describe()}", file=sys.stderr, flush=True)
                counts_before = h2grpc.read_edge_counts(endpoints)
                cpu_before = cpu_seconds(edge_pid)
                h2 = await asyncio.to_thread(h2grpc.run_h2load, url, body, load)
                cpu = cpu_seconds(edge_pid) - cpu_before
                delta, problems = h2grpc.settled_delta(endpoints, counts_before, load.requests)
            else:
                cpu_before, wall_before = cpu_seconds(edge_pid), time.perf_counter()
                client_before = time.process_time()
                results = await closed_loop(stubs, args, args.requests)
                wall = time.perf_counter() - wall_before
                cpu = cpu_seconds(edge_pid) - cpu_before
                client_cpu = time.process_time() - client_before
            cacher_cpu = cpu_seconds(stack.processes["cacher"].process.pid)  # type: ignore[union-attr]
        finally:
            for channel in channels:
                await channel.close()
    finally:
        if profiler is not None:
            profiler.send_signal(2)
            profiler.wait(timeout=60)
        stack.stop()
    edge_settings = {
        k: v
        for k, v in edge_env.items()
        if k in ("EDGE_COALESCE_MS", "EDGE_WORKERS", "EDGE_UVLOOP", "EDGE_NEAR_CACHE_ENTRIES")
    }
    if args.client == "h2load":
        return h2load_row(args, h2, delta, problems, cpu, cacher_cpu, edge_settings)
    firsts = [r["first_s"] * 1000 for r in results]
    totals = [r["total_s"] * 1000 for r in results]
    tokens = sum(r["tokens"] for r in results)
    deltas = sum(r["deltas"] for r in results)
    row: dict[str, Any] = {
        "mode": args.mode,
        "client": "python",
        "concurrency": args.concurrency,
        "requests": len(results),
        "edge_env": edge_settings,
        "cache_statuses": dict(
            collections.Counter(edge_pb2.CacheStatus.Name(r["cache_status"]) for r in results)
        ),
        "first_message_ms_p50": round(nearest_rank(firsts, 0.5), 2),
        "first_message_ms_p99": round(nearest_rank(firsts, 0.99), 2),
        "total_ms_p50": round(nearest_rank(totals, 0.5), 2),
        "total_ms_p99": round(nearest_rank(totals, 0.99), 2),
        "requests_per_s": round(len(results) / wall, 1),
        "edge_cpu_s": round(cpu, 3),
        "edge_cpu_ms_per_request": round(1000 * cpu / len(results), 3),
        # The benchmark's own client (one process): when it nears 1000 ms / requests_per_s, it is the limit.
        "client_cpu_ms_per_request": round(1000 * client_cpu / len(results), 3),
        "cacher_cpu_s_whole_run": round(cacher_cpu, 2),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
    }
    if args.mode == "stream":
        row |= {
            "tokens_per_request": round(tokens / len(results), 1),
            "tokens_per_message": round(tokens / max(deltas, 1), 2),
            "edge_cpu_us_per_token": round(1e6 * cpu / max(tokens, 1), 1),
            "token_interval_ms": args.token_interval_ms,
            "mean_tokens_per_s_per_stream": round(
                statistics.mean(r["tokens"] / r["total_s"] for r in results), 1
            ),
        }
    return row


def h2load_row(
    args: argparse.Namespace,
    h2: h2grpc.Run,
    delta: h2grpc.EdgeCounts,
    problems: list[str],
    cpu: float,
    cacher_cpu: float,
    edge_settings: dict[str, str],
) -> dict[str, Any]:
    """The run's JSON line with h2load as the client: the Python client's fields, its times being the end
    of each stream (an upper bound on the first message's for a hit, replayed at once)."""
    summary = h2grpc.summarize(h2)
    print(h2grpc.describe(summary), file=sys.stderr, flush=True)
    done = max(summary["done"], 1)
    p50, p99 = summary.get("end_of_stream_ms_p50"), summary.get("end_of_stream_ms_p99")
    return {
        "mode": args.mode,
        "client": "h2load",
        "concurrency": summary["concurrency"],
        "connections": summary["connections"],
        "streams_per_connection": summary["streams_per_connection"],
        "h2load_threads": summary["h2load_threads"],
        "requests": summary["requests"],
        "distinct": 1,  # one request body: every call asks for the first diff
        "edge_env": edge_settings,
        "failures": summary["failures"],
        "failures_by_status": summary["failures_by_status"],
        # The edge's own counts over the measured run; `edge_problems` is empty when they say that every
        # call h2load sent was answered OK from the cache.
        "edge_counted": {"codes": {k: int(v) for k, v in delta.codes.items()}, "cached": int(delta.cached)},
        "edge_problems": problems,
        "times": h2grpc.END_OF_STREAM_NOTE,
        "first_message_ms_p50": p50,  # end of stream: an upper bound
        "first_message_ms_p99": p99,
        "total_ms_p50": p50,
        "total_ms_p99": p99,
        "total_ms_max": summary.get("end_of_stream_ms_max"),
        "requests_per_s": summary.get("requests_per_s"),
        "edge_cpu_s": round(cpu, 3),
        "edge_cpu_ms_per_request": round(1000 * cpu / done, 3),
        "client_cpu_ms_per_request": summary["h2load_cpu_ms_per_request"],
        "cacher_cpu_s_whole_run": round(cacher_cpu, 2),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("hit", "stream"), default="hit")
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--channels", type=int, default=8, help="client channels, each with its own connection")
    p.add_argument(
        "--client",
        choices=("python", "h2load"),
        default="python",
        help="hit: who sends the calls; h2load: --concurrency connections / --h2load-streams (bench/h2grpc.py)",
    )
    p.add_argument("--h2load-streams", type=int, default=1, help="h2load: calls in flight per connection")
    p.add_argument("--h2load-threads", type=int, default=None, help="h2load: threads (default min(4, CPUs))")
    p.add_argument("--distinct", type=int, default=20, help="distinct diffs (hit: cached TILs)")
    p.add_argument("--tokens", type=int, default=256, help="stream: output tokens per request")
    p.add_argument("--token-interval-ms", type=float, default=5.0, help="stream: the fake engine's pace")
    p.add_argument("--edge-env", action="append", default=[], help="NAME=VALUE for the edge (repeatable)")
    p.add_argument(
        "--profile",
        help="py-spy record of the edge while measuring: a flame graph (.svg) or collapsed stacks (.txt)",
    )
    p.add_argument("--out", default="bench/results/edge_cpu.jsonl")
    args = p.parse_args()
    if args.client == "h2load":
        if args.mode != "hit":
            p.error("--client h2load measures hits only (--mode hit)")
        if args.concurrency % args.h2load_streams:
            p.error("--concurrency must be a multiple of --h2load-streams")
        try:
            h2grpc.find_h2load()
        except h2grpc.H2loadMissing as exc:
            p.error(str(exc))
    row = asyncio.run(run(args))
    row["command"] = "python -m bench.edge_hit " + " ".join(sys.argv[1:])
    print(json.dumps(row, ensure_ascii=False))
    if row.get("edge_problems"):
        print(f"the edge's counts do not confirm the hits: {row['edge_problems']}", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return 1 if row.get("edge_problems") or row.get("failures") else 0


if __name__ == "__main__":
    raise SystemExit(main())
