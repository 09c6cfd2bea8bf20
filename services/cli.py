"""`til`: run the stack locally and talk to it.

til up                      start the four services with embedded defaults; Ctrl-C stops them
til generate FILE|-         stream a TIL for a diff (git diff HEAD~1 | til generate -)
til demo                    up + a TIL for examples/sample.diff + down
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import grpc
from til.v1 import common_pb2, edge_pb2, edge_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIFF = REPO_ROOT / "examples" / "sample.diff"
DEFAULT_EDGE = os.environ.get("TIL_EDGE_ADDR", "127.0.0.1:50051")


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- rendering


class PartialJson:
    """Decodes top-level string fields of a JSON object that is still arriving, for live display."""

    def __init__(self) -> None:
        self.buffer = ""

    def feed(self, text: str) -> None:
        self.buffer += text

    def string_field(self, name: str) -> str | None:
        marker = f'"{name}"'
        start = self.buffer.find(marker)
        if start < 0:
            return None
        i = start + len(marker)
        while i < len(self.buffer) and self.buffer[i] in " \t\r\n:":
            i += 1
        if i >= len(self.buffer) or self.buffer[i] != '"':
            return None
        out: list[str] = []
        i += 1
        while i < len(self.buffer):
            ch = self.buffer[i]
            if ch == '"':
                break
            if ch == "\\":
                escape = (
                    self.buffer[i : i + 6] if self.buffer[i + 1 : i + 2] == "u" else self.buffer[i : i + 2]
                )
                if len(escape) < 2 or (escape[1] == "u" and len(escape) < 6):
                    break  # the rest of the escape has not arrived yet
                try:
                    out.append(json.loads(f'"{escape}"'))
                except json.JSONDecodeError:
                    out.append(escape)
                i += len(escape)
                continue
            out.append(ch)
            i += 1
        return "".join(out)


class LiveView:
    """Prints the TIL's content as it streams in (title first), then the keywords."""

    def __init__(self, out=sys.stdout) -> None:
        self.out = out
        self.partial = PartialJson()
        self.printed = {"title": 0, "content": 0}

    def feed(self, text: str) -> None:
        self.partial.feed(text)
        for name in ("title", "content"):
            value = self.partial.string_field(name)
            if value is None:
                continue
            if name == "content" and self.printed["content"] == 0 and self.printed["title"]:
                self.out.write("\n\n")
            new = value[self.printed[name] :]
            if new:
                self.out.write(new)
                self.printed[name] = len(value)
        self.out.flush()


# ---------------------------------------------------------------------------------------------- generate


def _read_diff(path: str) -> str:
    raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        _err(f"warning: the diff is not valid UTF-8 (byte {exc.start}); undecodable bytes are replaced")
        return raw.decode("utf-8", errors="replace")


async def _generate(args: argparse.Namespace) -> int:
    diff = _read_diff(args.diff)
    request = edge_pb2.GenerateTilRequest(
        diff=diff,
        commit_messages=args.message or [],
        language=args.language or "",
        date=args.date or "",
        owner=args.owner or "",
        cache_policy=edge_pb2.CACHE_POLICY_BYPASS if args.no_cache else edge_pb2.CACHE_POLICY_UNSPECIFIED,
    )
    if args.max_tokens:
        request.generation.max_tokens = args.max_tokens
    if args.temperature is not None:
        request.generation.sampling.temperature = args.temperature
    view = LiveView()
    live = sys.stdout.isatty() and not args.json
    async with grpc.aio.insecure_channel(args.addr) as channel:
        stub = edge_pb2_grpc.EdgeServiceStub(channel)
        try:
            async for message in stub.GenerateTil(request, timeout=args.timeout):
                event = message.WhichOneof("event")
                if event == "started":
                    s = message.started
                    _err(
                        f"request {s.request_id} | model {s.model} | cache "
                        f"{edge_pb2.CacheStatus.Name(s.cache_status).removeprefix('CACHE_STATUS_').lower()} | "
                        f"context {edge_pb2.RetrievalStatus.Name(s.retrieval_status).removeprefix('RETRIEVAL_STATUS_').lower()}"
                        f" ({len(s.sources)} related)"
                    )
                    for notice in s.notices:
                        _err(f"note: {notice}")
                elif event == "delta":
                    if live:
                        view.feed(message.delta.text)
                elif event == "finished":
                    f = message.finished
                    if args.json:
                        print(f.til_json)
                    elif live:
                        print(f"\n\nkeywords: {', '.join(f.til.keywords)}")
                    else:
                        print(f"{f.til.content}\n\nkeywords: {', '.join(f.til.keywords)}")
                    t = f.timings
                    _err(
                        f"done: {common_pb2.FinishReason.Name(f.finish_reason).removeprefix('FINISH_REASON_').lower()}"
                        f" | {f.usage.prompt_tokens} prompt + {f.usage.completion_tokens} output tokens | "
                        f"first token {t.time_to_first_token_ms:.0f} ms | total {t.total_ms:.0f} ms"
                    )
                    for violation in f.violations:
                        _err(f"warning: {violation}")
        except grpc.aio.AioRpcError as exc:
            _err(f"error: {exc.code().name}: {exc.details()}")
            if exc.code() is grpc.StatusCode.UNAVAILABLE:
                _err(f"is the stack running? start it with `til up` (edge expected at {args.addr})")
            return 1
    return 0


# ---------------------------------------------------------------------------------------------- up / demo


def _stack(args: argparse.Namespace):
    from services.stack import LocalStack

    env: dict[str, dict[str, str]] = {}
    if args.redis_url:
        env["cacher"] = {"CACHER_REDIS_URL": args.redis_url}
    if args.model:
        env["generator"] = {"GENERATOR_MODEL": args.model}
    return LocalStack(data_dir=Path(args.data_dir), env=env)


async def _up(args: argparse.Namespace, then=None) -> int:
    stack = _stack(args)
    _err(f"starting tilserve (logs in {Path(args.data_dir) / 'logs'}) ...")
    try:
        await stack.start(timeout_s=args.start_timeout, progress=lambda line: _err(f"  {line}"))
    except (RuntimeError, TimeoutError) as exc:
        _err(f"error: {exc}")
        return 1
    _err("ready:")
    for name, proc in stack.processes.items():
        _err(f"  {name:<10} {proc.address:<18} metrics http://127.0.0.1:{proc.metrics_port}/metrics")
    rc = 0
    try:
        if then is not None:
            rc = await then()
        else:
            _err(
                f"try: git diff HEAD~1 | til generate -    (Ctrl-C stops the stack; edge at {stack.address('edge')})"
            )
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
    finally:
        _err("stopping ...")
        codes = await asyncio.to_thread(stack.stop)
        _err("stopped: " + ", ".join(f"{name} exit {code}" for name, code in codes.items()))
    return rc


async def _demo(args: argparse.Namespace) -> int:
    args.diff = str(SAMPLE_DIFF)
    args.addr = DEFAULT_EDGE
    return await _up(args, then=lambda: _generate(args))


# ---------------------------------------------------------------------------------------------- main


def _add_generate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--message", action="append", help="a commit message (repeatable)")
    p.add_argument("--language", help="programming language of the change")
    p.add_argument("--date", help="the TIL's date, YYYY-MM-DD (default: today)")
    p.add_argument("--owner", help="who the TIL belongs to")
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float)
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--json", action="store_true", help="print only the final JSON object")
    p.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds")


def _add_stack_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=".data", help="where the index, logs and sockets live")
    p.add_argument("--redis-url", help="use this Redis instead of a private redis-server")
    p.add_argument("--model", help="GGUF path for the generator (default: packaged SmolLM2-135M-Instruct)")
    p.add_argument("--start-timeout", type=float, default=300.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="til", description="tilserve: Korean TILs from git diffs, streamed."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the four services locally and wait; Ctrl-C stops them")
    _add_stack_options(up)

    gen = sub.add_parser("generate", help="stream a TIL for a diff file, or - for stdin")
    gen.add_argument("diff", help="diff file, or - to read stdin")
    gen.add_argument("--addr", default=DEFAULT_EDGE, help="edge address (env TIL_EDGE_ADDR)")
    _add_generate_options(gen)

    demo = sub.add_parser("demo", help="start the stack, stream a TIL for examples/sample.diff, stop")
    _add_stack_options(demo)
    _add_generate_options(demo)

    args = parser.parse_args(argv)
    runner = {"up": _up, "generate": _generate, "demo": _demo}[args.command]
    try:
        return asyncio.run(runner(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
