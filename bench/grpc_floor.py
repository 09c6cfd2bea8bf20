"""The floor under a cache hit: what grpc.aio itself costs per server-streaming call, on this machine.

Serves `/til.v1.EdgeService/GenerateTil` from a bare grpc.aio server in a child process (no
interceptor, no servicer, no protobuf: a generic handler whose messages are bytes) and drives it with
h2load exactly as `bench.edge_hit --client h2load` drives the edge, then reports the server's CPU ms per
call and h2load's p50 / p99. `--messages 0` is the empty handler (trailers only); `--messages 3` sends
three messages the size of a hit's `started`, `delta` and `finished` (`--message-bytes` each).

    python -m bench.grpc_floor --messages 0 --concurrency 100 --requests 20000
    python -m bench.grpc_floor --messages 3 --uvloop --concurrency 100 --requests 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench import h2grpc
from bench.edge_hit import cpu_seconds
from services.stack import free_port


def serve(port: int, messages: int, size: int, uvloop: bool) -> None:
    import grpc

    replies = [bytes([i]) * size for i in range(messages)]

    async def handler(request: bytes, context: object):  # type: ignore[no-untyped-def]
        for reply in replies:
            yield reply

    identity = lambda data: data  # noqa: E731
    method = grpc.unary_stream_rpc_method_handler(
        handler, request_deserializer=identity, response_serializer=identity
    )

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("til.v1.EdgeService", {"GenerateTil": method})]
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    if uvloop:
        import uvloop as uv

        uv.run(main())
    else:
        asyncio.run(main())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=0, help="messages per call (0: the empty handler)")
    p.add_argument("--message-bytes", type=int, default=700, help="bytes per message")
    p.add_argument("--uvloop", action="store_true")
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--out", default=None, help="append the JSON line here too")
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve is not None:
        serve(args.serve, args.messages, args.message_bytes, args.uvloop)
        return 0

    port = free_port()
    command = [sys.executable, "-m", "bench.grpc_floor", "--serve", str(port), "--messages", str(args.messages),
               "--message-bytes", str(args.message_bytes), *(["--uvloop"] if args.uvloop else [])]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise SystemExit("the floor server did not start")
        url = h2grpc.grpc_url(f"127.0.0.1:{port}", h2grpc.EDGE_GENERATE_TIL)
        body = h2grpc.grpc_frame(b"x" * 400)
        h2grpc.run_h2load(url, body, h2grpc.Load(min(args.requests, 2 * args.concurrency), args.concurrency))
        load = h2grpc.Load(args.requests, args.concurrency)
        before, began = cpu_seconds(server.pid), time.perf_counter()
        run = h2grpc.run_h2load(url, body, load)
        cpu, wall = cpu_seconds(server.pid) - before, time.perf_counter() - began
    finally:
        server.terminate()
        server.wait(timeout=10)
    summary = h2grpc.summarize(run)
    row = {
        "floor": "empty handler" if args.messages == 0 else f"{args.messages} x {args.message_bytes} B",
        "uvloop": args.uvloop,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "failures": summary["failures"],
        "p50_ms": summary.get("end_of_stream_ms_p50"),
        "p99_ms": summary.get("end_of_stream_ms_p99"),
        "requests_per_s": summary.get("requests_per_s", round(args.requests / wall, 1)),
        "server_cpu_ms_per_request": round(1000 * cpu / args.requests, 3),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
    }
    line = json.dumps(row)
    print(line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
