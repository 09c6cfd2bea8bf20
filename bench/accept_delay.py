"""How long a call waits between its caller sending it and the server's handler starting, while the
server streams to many other calls: a CPU reproduction of issue 13's sent->handler delay.

A grpc.aio server in a child process serves `til.v1.GeneratorService/Generate` (the generated stubs, so
calls are accepted as the generator's are) with a stand-in engine: one step task wakes every stream
each `--interval-ms` (as vLLM's output handler does, on the same loop), and each stream then sends one
small delta (after `--work-us` of CPU on the loop, the per-token cost of the engine's output processing
and the servicer). A stream sends `--messages` deltas (+-`--spread`, so that the closed loop spreads
out). Client processes (`--client-procs`, each with `--channels` channels, 0: a connection per stream)
keep `--streams` calls in flight, each request a fresh `--request-bytes` of random text (a prompt, or
with `--chat` a chat plus a JSON schema string, as a TIL request) stamped with `x-tilserve-sent-at`; the
handler answers the stamp's delay in its `started` message. Reports the delay's percentiles over the
calls begun after `--warmup-s`, and the server loop's busy share and turns.

    python -m bench.accept_delay --request-bytes 2500 --duration-s 15
    python -m bench.accept_delay --request-bytes 8000 --chat --duration-s 15
    python -m bench.accept_delay --server-option grpc.http2.lookahead_bytes=65536 ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import faulthandler
import json
import multiprocessing as mp
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.metrics import nearest_rank
from services.stack import free_port


def _option(text: str) -> tuple[str, int | str]:
    name, _, value = text.partition("=")
    return (name, int(value)) if value.lstrip("-").isdigit() else (name, value)


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def serve(args: argparse.Namespace) -> None:
    import grpc
    from til.v1 import common_pb2, generator_pb2, generator_pb2_grpc

    from services.common import sent_at

    work_s = args.work_us / 1e6
    prepare_s = args.prepare_ms / 1e3
    thread_s = args.thread_ms / 1e3
    pool = ThreadPoolExecutor(max_workers=args.threads, thread_name_prefix="prepare")
    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    rng = random.Random(0)
    streams: set[asyncio.Queue[int]] = set()
    turns = 0

    calls: list[int] = []  # per server
    intercepted: contextvars.ContextVar[float | None] = contextvars.ContextVar("intercepted", default=None)

    class Stamp(grpc.aio.ServerInterceptor):
        """Notes how long the call took to be accepted: the interceptor runs once the server took the call
        from its queue, before the request message is read."""

        async def intercept_service(self, continuation: Any, details: Any) -> Any:
            intercepted.set(sent_at.delay_s(details.invocation_metadata))
            return await continuation(details)

    class Servicer(generator_pb2_grpc.GeneratorServiceServicer):
        def __init__(self, index: int) -> None:
            self.index = index

        async def Generate(self, request: Any, context: Any) -> Any:  # type: ignore[override]
            calls[self.index] += 1
            delay = sent_at.delay_s(context.invocation_metadata())
            accepted = intercepted.get()
            yield generator_pb2.GenerateResponse(
                started=generator_pb2.GenerateStarted(
                    request_id=f"{(delay or 0) * 1e3:.3f}", model=f"{(accepted or 0) * 1e3:.3f}"
                )
            )
            if prepare_s:
                _spin(prepare_s)  # a request's checks, on the loop
            if thread_s:
                # ... and off it, in Python on a worker thread (which holds the GIL while it runs)
                await asyncio.get_running_loop().run_in_executor(pool, _spin, thread_s)
            n = max(1, round(args.messages * (1 + args.spread * (2 * rng.random() - 1))))
            queue: asyncio.Queue[int] = asyncio.Queue()
            streams.add(queue)
            try:
                for _ in range(n):
                    await queue.get()
                    if work_s:
                        _spin(work_s)
                    yield generator_pb2.GenerateResponse(
                        delta=common_pb2.TextDelta(text=" tok", token_count=1)
                    )
            finally:
                streams.discard(queue)
            yield generator_pb2.GenerateResponse(finished=generator_pb2.GenerateFinished())

    async def step() -> None:
        due = time.monotonic()
        while True:
            if args.fixed_rate:
                # steps on a clock, as an engine core in its own process makes them, however long the
                # loop takes over each one's outputs (a step that comes late comes at once)
                due += args.interval_ms / 1e3
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            else:
                await asyncio.sleep(args.interval_ms / 1e3)
            for queue in list(streams):
                queue.put_nowait(0)
            if args.step_busy_ms:
                # the engine's output processing: in --step-chunks callbacks with the loop yielded between
                # them, as vLLM's output handler does every VLLM_V1_OUTPUT_PROC_CHUNK_SIZE requests
                for chunk in range(args.step_chunks):
                    if chunk:
                        await asyncio.sleep(0)
                    _spin(args.step_busy_ms / 1e3 / args.step_chunks)

    busy: list[float] = []  # each loop turn's time outside select(), while measuring

    def instrument(loop: asyncio.AbstractEventLoop) -> None:
        """Counts the loop's turns and times each one's callbacks (its time outside select())."""
        run_once, select = loop._run_once, loop._selector.select  # type: ignore[attr-defined]
        waited = 0.0

        def timed_select(timeout: float | None = None) -> Any:
            nonlocal waited
            began = time.perf_counter()
            try:
                return select(timeout)
            finally:
                waited = time.perf_counter() - began

        def timed_run_once() -> None:
            nonlocal turns
            began = time.perf_counter()
            run_once()
            turns += 1
            if "begin" in marks:
                busy.append(time.perf_counter() - began - waited)

        loop._selector.select = timed_select  # type: ignore[attr-defined]
        loop._run_once = timed_run_once  # type: ignore[attr-defined]

    async def main() -> None:
        interceptors: list[Any] = [Stamp()]
        if args.interceptor:
            from services.common.interceptors import ServiceInterceptor

            interceptors.append(ServiceInterceptor())
        options = [_option(o) for o in args.server_option]
        servers = []
        for _ in range(args.servers):
            server = grpc.aio.server(interceptors=interceptors, options=options)
            calls.append(0)
            generator_pb2_grpc.add_GeneratorServiceServicer_to_server(Servicer(len(calls) - 1), server)
            server.add_insecure_port(f"127.0.0.1:{args.serve}")
            await server.start()
            servers.append(server)
        stepping = asyncio.ensure_future(step())
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        stepping.cancel()
        await asyncio.gather(*(server.stop(0) for server in servers))

    loop: Any = None
    # The parent writes "mark" on stdin when measuring starts and closes it when it ends.
    marks: dict[str, tuple[float, float, int]] = {}

    def reader() -> None:
        for line in sys.stdin:
            if line.strip() == "mark":
                usage = resource.getrusage(resource.RUSAGE_SELF)
                marks["begin"] = (time.perf_counter(), usage.ru_utime + usage.ru_stime, turns)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        marks["end"] = (time.perf_counter(), usage.ru_utime + usage.ru_stime, turns)
        begin, end = marks.get("begin", marks["end"]), marks["end"]
        wall, cpu, n = end[0] - begin[0], end[1] - begin[1], end[2] - begin[2]
        turn_ms = sorted(1e3 * b for b in busy)
        print(json.dumps({"server_cpu_share": round(cpu / wall, 3) if wall else None,
                          "loop_busy_share": round(sum(turn_ms) / 1e3 / wall, 3) if wall else None,
                          "loop_turns_per_s": round(n / wall) if wall else None,
                          "turn_ms": _percentiles(turn_ms, digits=3), "calls_per_server": calls}), flush=True)  # fmt: skip
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=reader, daemon=True).start()

    async def run() -> None:
        nonlocal loop
        loop = asyncio.get_running_loop()
        if not args.uvloop:
            instrument(loop)
        await main()

    if args.uvloop:
        import uvloop

        uvloop.run(run())
    else:
        asyncio.run(run())


_HANGUL = [chr(c) for c in range(0xAC00, 0xD7A4)]


def _text(rng: random.Random, nbytes: int) -> str:
    """Random Hangul syllables and spaces, about `nbytes` in UTF-8: nothing in it repeats."""
    out = []
    size = 0
    while size < nbytes:
        if rng.random() < 0.2:
            out.append(" ")
            size += 1
        else:
            out.append(rng.choice(_HANGUL))
            size += 3
    return "".join(out)


def _request(rng: random.Random, args: argparse.Namespace) -> Any:
    from til.v1 import generator_pb2

    if not args.chat:
        return generator_pb2.GenerateRequest(prompt=_text(rng, args.request_bytes))
    schema_bytes = min(2000, args.request_bytes // 3)
    rest = args.request_bytes - schema_bytes
    schema = json.dumps({"type": "object", "description": _text(rng, schema_bytes - 60), "required": ["a"]})
    return generator_pb2.GenerateRequest(
        chat=generator_pb2.ChatMessages(
            messages=[
                generator_pb2.ChatMessage(role="system", content=_text(rng, rest // 4)),
                generator_pb2.ChatMessage(role="user", content=_text(rng, rest - rest // 4)),
            ]
        ),
        output=generator_pb2.OutputFormat(json_schema=schema),
    )


def client(
    args: argparse.Namespace, index: int, streams: int, begin_at: float, end_at: float, out: Any
) -> None:
    import grpc
    from til.v1 import generator_pb2_grpc

    from services.common import sent_at

    options = [_option(o) for o in args.client_option]
    rng = random.Random(index)
    delays: list[float] = []
    accepts: list[float] = []
    firsts: list[float] = []
    ids: list[str] = []  # the generator's mode: the calls measured, whose delays its log holds
    seq = 0

    async def worker(stub: Any) -> None:
        nonlocal seq
        while time.time() < end_at:
            request = _request(rng, args)
            if args.generator:
                seq += 1
                n = max(1, round(args.messages * (1 + args.spread * (2 * rng.random() - 1))))
                request.request_id = f"acc-{index}-{seq}"
                request.stopping.max_tokens = n
                request.stopping.ignore_eos = True
            began = time.time()
            call = stub.Generate(request, metadata=sent_at.stamp())
            first = True
            async for message in call:
                if first:
                    first = False
                    if began >= begin_at:
                        if args.generator:
                            ids.append(request.request_id)
                        else:
                            delays.append(float(message.started.request_id))
                            accepts.append(float(message.started.model))
                        firsts.append((time.time() - began) * 1e3)

    async def main() -> None:
        faulthandler.dump_traceback_later(end_at - time.time() + 60, exit=True)
        if args.channels:
            own = [("grpc.use_local_subchannel_pool", 1)] if args.channels > 1 else []
            channels = [
                grpc.aio.insecure_channel(f"127.0.0.1:{args.port}", options=options + own)
                for _ in range(args.channels)
            ]
        else:
            own = [("grpc.use_local_subchannel_pool", 1)]
            channels = [
                grpc.aio.insecure_channel(f"127.0.0.1:{args.port}", options=options + own)
                for _ in range(streams)
            ]
        for channel in channels:
            await channel.channel_ready()
        stubs = [generator_pb2_grpc.GeneratorServiceStub(c) for c in channels]
        tasks = [asyncio.ensure_future(worker(stubs[i % len(stubs)])) for i in range(streams)]
        await asyncio.wait(tasks, timeout=max(0.0, end_at - time.time()), return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        out.put((delays, firsts, ids, accepts))

    asyncio.run(main())
    out.close()
    out.join_thread()  # the results are in the pipe before the process goes
    os._exit(0)  # the calls still in flight are not waited for


def _percentiles(values: list[float], digits: int = 1) -> dict[str, float | int]:
    if not values:
        return {"n": 0}

    def q(p: float) -> float:
        return round(nearest_rank(values, p), digits)

    return {"n": len(values), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": round(max(values), digits),
            "mean": round(statistics.fmean(values), digits)}  # fmt: skip


def _clients(
    args: argparse.Namespace,
) -> tuple[list[float], list[float], list[str], list[float], float, float]:
    """Runs the client processes; their delays, times to `started`, request ids and accept delays (measured
    calls), and when measuring began and ended."""
    now = time.time()
    begin_at, end_at = now + args.warmup_s, now + args.warmup_s + args.duration_s
    ctx = mp.get_context("spawn")
    out: Any = ctx.Queue()
    share = [
        args.streams // args.client_procs + (i < args.streams % args.client_procs)
        for i in range(args.client_procs)
    ]
    procs = [
        ctx.Process(target=client, args=(args, i, n, begin_at, end_at, out)) for i, n in enumerate(share)
    ]
    for proc in procs:
        proc.start()
    delays: list[float] = []
    firsts: list[float] = []
    ids: list[str] = []
    accepts: list[float] = []
    for _ in procs:
        d, f, i, a = out.get(timeout=args.warmup_s + args.duration_s + 120)
        delays += d
        firsts += f
        ids += i
        accepts += a
    for proc in procs:
        proc.join(timeout=30)
    return delays, firsts, ids, accepts, begin_at, end_at


def _drive_generator(args: argparse.Namespace) -> int:
    """The real generator (`python -m services.generator`, fake engine at `--interval-ms` a token):
    the delays are those its log gives for the calls measured."""
    import re
    import tempfile

    fd, log_path = tempfile.mkstemp(prefix="accept-delay-generator-", suffix=".log")
    os.close(fd)
    env = {**os.environ, "GENERATOR_BACKEND": "fake", "GENERATOR_HOST": "127.0.0.1", "GENERATOR_PORT": str(args.port),
           "GENERATOR_METRICS_PORT": "0", "GENERATOR_FAKE_TOKEN_INTERVAL_S": str(args.interval_ms / 1e3),
           **dict(kv.split("=", 1) for kv in args.generator_env)}  # fmt: skip
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "services.generator"], env=env, stdout=log, stderr=log
        )
    try:
        deadline = time.time() + 60
        while "SERVING" not in Path(log_path).read_text():
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the generator did not start: {Path(log_path).read_text()[-2000:]}")
            time.sleep(0.2)
        _, firsts, ids, _, _, _ = _clients(args)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    wanted = set(ids)
    delays = []
    loop = re.search(r"event loop: (\w+)", Path(log_path).read_text())
    for line in Path(log_path).read_text().splitlines():
        m = re.search(r"request (\S+) finished.*reached this handler ([\d.]+) ms", line)
        if m and m.group(1) in wanted:
            delays.append(float(m.group(2)))
    row = {
        "server": "services.generator (fake engine)",
        "request": f"{'chat+schema' if args.chat else 'prompt'} {args.request_bytes} B",
        "streams": args.streams,
        "clients": f"{args.client_procs} procs x {args.channels or 'per-stream'} channels",
        "generator_env": args.generator_env,
        "event_loop": loop.group(1) if loop else "not logged",  # GENERATOR_UVLOOP
        "sent_to_handler_ms": _percentiles(delays),
        "sent_to_started_ms": _percentiles(firsts),
        "log": log_path,
        "load": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(row))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=100, help="calls kept in flight (closed loop)")
    p.add_argument("--messages", type=int, default=256, help="deltas per stream (mean)")
    p.add_argument("--spread", type=float, default=0.5, help="stream length varies by +- this share")
    p.add_argument("--interval-ms", type=float, default=10.0, help="the stand-in engine's step")
    p.add_argument("--work-us", type=float, default=0.0, help="CPU on the server's loop per delta")
    p.add_argument("--step-busy-ms", type=float, default=0.0, help="CPU on the loop per step")
    p.add_argument(
        "--fixed-rate",
        action="store_true",
        help="a step every --interval-ms on a clock (default: --interval-ms after the last step's work)",
    )
    p.add_argument(
        "--step-chunks",
        type=int,
        default=1,
        help="callbacks the step's CPU is split into (loop yielded between)",
    )
    p.add_argument("--prepare-ms", type=float, default=0.0, help="CPU on the server's loop per call")
    p.add_argument("--thread-ms", type=float, default=0.0, help="Python CPU per call on a worker thread")
    p.add_argument("--threads", type=int, default=4, help="worker threads for --thread-ms")
    p.add_argument(
        "--switch-interval-ms", type=float, default=0.0, help="sys.setswitchinterval in the server"
    )
    p.add_argument("--request-bytes", type=int, default=2500)
    p.add_argument("--chat", action="store_true", help="a chat and a JSON schema string, as a TIL request")
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--channels", type=int, default=1, help="channels per client process (0: one per stream)")
    p.add_argument("--servers", type=int, default=1, help="grpc.aio servers on the port (SO_REUSEPORT)")
    p.add_argument("--uvloop", action="store_true", help="the server's loop on uvloop (turns not counted)")
    p.add_argument("--interceptor", action="store_true", help="the services' ServiceInterceptor")
    p.add_argument("--server-option", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--client-option", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--warmup-s", type=float, default=4.0)
    p.add_argument("--duration-s", type=float, default=15.0)
    p.add_argument("--generator", action="store_true", help="drive services.generator (fake engine) instead")
    p.add_argument("--generator-env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve is not None:
        serve(args)
        return 0

    # Should a process hang, say where (a run ends well within this).
    faulthandler.dump_traceback_later(args.warmup_s + args.duration_s + 60, exit=True)
    args.port = port = free_port()
    if args.generator:
        return _drive_generator(args)
    command = [sys.executable, "-m", "bench.accept_delay", *sys.argv[1:], "--serve", str(port)]
    server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdin is not None
    try:
        if server.stdout.readline().strip() != "ready":
            raise SystemExit("the server did not start")
        now = time.time()
        begin_at, end_at = now + args.warmup_s, now + args.warmup_s + args.duration_s
        out: Any = mp.get_context("spawn").Queue()
        share = [args.streams // args.client_procs + (i < args.streams % args.client_procs)
                 for i in range(args.client_procs)]  # fmt: skip
        procs = [
            mp.get_context("spawn").Process(target=client, args=(args, i, n, begin_at, end_at, out))
            for i, n in enumerate(share)
        ]
        for proc in procs:
            proc.start()
        time.sleep(max(0.0, begin_at - time.time()))
        server.stdin.write("mark\n")
        server.stdin.flush()
        time.sleep(max(0.0, end_at - time.time()))
        server.stdin.close()
        stats = json.loads(server.stdout.readline())
        delays: list[float] = []
        firsts: list[float] = []
        accepts: list[float] = []
        for _ in procs:
            d, f, _ids, a = out.get(timeout=120)
            delays += d
            firsts += f
            accepts += a
        for proc in procs:
            proc.join(timeout=30)
    finally:
        if server.poll() is None:
            server.terminate()
        server.wait(timeout=30)
    row = {
        "request": f"{'chat+schema' if args.chat else 'prompt'} {args.request_bytes} B",
        "streams": args.streams,
        "clients": f"{args.client_procs} procs x {args.channels or 'per-stream'} channels",
        "servers": args.servers,
        "uvloop": args.uvloop,
        "server_options": args.server_option,
        "client_options": args.client_option,
        "work_us": args.work_us,
        "prepare_ms": args.prepare_ms,
        "step_busy_ms": args.step_busy_ms,
        "step_chunks": args.step_chunks,
        "fixed_rate": args.fixed_rate,
        "thread_ms": args.thread_ms,
        "switch_interval_ms": args.switch_interval_ms or None,
        "sent_to_handler_ms": _percentiles(delays),
        "sent_to_accepted_ms": _percentiles(accepts),
        "sent_to_started_ms": _percentiles(firsts),
        **stats,
        "load": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
