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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from pydantic_core import from_json
from til.v1 import common_pb2, edge_pb2, edge_pb2_grpc

from services.ingest import discover, documents_from_file, ingest

__all__ = ["PartialJson", "discover", "documents_from_file", "main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIFF = REPO_ROOT / "examples" / "sample.diff"
DEFAULT_EDGE = os.environ.get("TIL_EDGE_ADDR", "127.0.0.1:50051")
DEFAULT_RETRIEVER = os.environ.get("TIL_RETRIEVER_ADDR", "127.0.0.1:50053")
DEFAULT_TIMEOUT_S = 600.0  # the servers' connection-age grace must outlast it (docs/operating.md)
DIFFICULTIES = {
    "easy": edge_pb2.DIFFICULTY_EASY,
    "medium": edge_pb2.DIFFICULTY_MEDIUM,
    "hard": edge_pb2.DIFFICULTY_HARD,
}


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- rendering


class PartialJson:
    """Top-level string fields of a JSON object that is still arriving, for live display.

    pydantic-core's JSON parser reads the text so far in partial mode: an open string is given as far as
    it goes (a half-written escape left out until its rest arrives).
    """

    def __init__(self) -> None:
        self.buffer = ""

    def feed(self, text: str) -> None:
        self.buffer += text

    def string_field(self, name: str) -> str | None:
        try:
            document = from_json(self.buffer, allow_partial="trailing-strings")
        except ValueError:
            return None
        value = document.get(name) if isinstance(document, dict) else None
        return value if isinstance(value, str) else None


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
    return await _stream_til(args, lambda stub: stub.GenerateTil(request, timeout=args.timeout))


def _print_json_line(text: str) -> None:
    """The final object on one line (the model may write JSON over several), so `--json` output pipes into
    line-oriented tools (jq -c, JSON Lines) whatever whitespace the model chose."""
    print(json.dumps(json.loads(text), ensure_ascii=False))


async def _stream_til(args: argparse.Namespace, call: Callable[[edge_pb2_grpc.EdgeServiceStub], Any]) -> int:
    """Shows a TIL stream (GenerateTil or ReviseTil): live on a terminal, else the result at the end."""
    view = LiveView()
    live = sys.stdout.isatty() and not args.json
    async with grpc.aio.insecure_channel(args.addr) as channel:
        try:
            async for message in call(edge_pb2_grpc.EdgeServiceStub(channel)):
                event = message.WhichOneof("event")
                if event == "started":
                    _print_started(message.started)
                elif event == "delta" and live:
                    view.feed(message.delta.text)
                elif event == "finished":
                    f = message.finished
                    if args.json:
                        _print_json_line(f.til_json)
                    elif live:
                        print(f"\n\nkeywords: {', '.join(f.til.keywords)}")
                    else:
                        print(f"{f.til.title}\n\n{f.til.content}\n\nkeywords: {', '.join(f.til.keywords)}")
                    _print_done(f.finish_reason, f.usage, f.timings, f.violations)
        except grpc.aio.AioRpcError as exc:
            return _rpc_error(exc, args.addr)
    return 0


def _status_name(enum, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix).lower()


def _print_started(s: edge_pb2.StreamStarted) -> None:
    _err(
        f"request {s.request_id} | model {s.model} | cache "
        f"{_status_name(edge_pb2.CacheStatus, s.cache_status, 'CACHE_STATUS_')} | context "
        f"{_status_name(edge_pb2.RetrievalStatus, s.retrieval_status, 'RETRIEVAL_STATUS_')} ({len(s.sources)} related)"
    )
    for notice in s.notices:
        _err(f"note: {notice}")


def _print_done(finish_reason: int, usage: common_pb2.TokenUsage, t: common_pb2.Timings, violations) -> None:
    _err(
        f"done: {_status_name(common_pb2.FinishReason, finish_reason, 'FINISH_REASON_')}"
        f" | {usage.prompt_tokens} prompt + {usage.completion_tokens} output tokens | "
        f"first token {t.time_to_first_token_ms:.0f} ms | total {t.total_ms:.0f} ms"
    )
    for violation in violations:
        _err(f"warning: {violation}")


def _rpc_error(exc: grpc.aio.AioRpcError, addr: str) -> int:
    _err(f"error: {exc.code().name}: {exc.details()}")
    if exc.code() is grpc.StatusCode.UNAVAILABLE:
        _err(f"is the stack running? start it with `til up` (expected at {addr})")
    return 1


def _til_text(path: str) -> str:
    text = _read_diff(path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return text
    if isinstance(document, dict) and isinstance(document.get("content"), str):
        return document["content"]
    return text


async def _questions(args: argparse.Namespace) -> int:
    request = edge_pb2.GenerateQuestionsRequest(
        difficulty=DIFFICULTIES[args.difficulty],
        count=args.count,
        owner=args.owner or "",
        cache_policy=edge_pb2.CACHE_POLICY_BYPASS if args.no_cache else edge_pb2.CACHE_POLICY_UNSPECIFIED,
    )
    if args.til_id:
        request.til_id = args.til_id
    elif args.til:
        request.til_text = _til_text(args.til)
    else:
        _err("error: give a TIL file (or - for stdin) or --til-id")
        return 2
    if args.max_tokens:
        request.generation.max_tokens = args.max_tokens
    async with grpc.aio.insecure_channel(args.addr) as channel:
        stub = edge_pb2_grpc.EdgeServiceStub(channel)
        try:
            async for message in stub.GenerateQuestions(request, timeout=args.timeout):
                event = message.WhichOneof("event")
                if event == "started":
                    _print_started(message.started)
                elif event == "delta" and sys.stderr.isatty() and not args.json:
                    sys.stderr.write(".")
                    sys.stderr.flush()
                elif event == "finished":
                    f = message.finished
                    if sys.stderr.isatty() and not args.json:
                        sys.stderr.write("\n")
                    if args.json:
                        _print_json_line(f.questions_json)
                    else:
                        for i, q in enumerate(f.questions, 1):
                            level = _status_name(edge_pb2.Difficulty, q.difficulty, "DIFFICULTY_")
                            print(f"{i}. [{level}] {q.question}\n   답: {q.answer}")
                            if q.keywords:
                                print(f"   키워드: {', '.join(q.keywords)}")
                    _print_done(f.finish_reason, f.usage, f.timings, f.violations)
        except grpc.aio.AioRpcError as exc:
            return _rpc_error(exc, args.addr)
    return 0


async def _revise(args: argparse.Namespace) -> int:
    try:
        document = json.loads(_read_diff(args.til))
        til = edge_pb2.Til(
            title=document["title"], keywords=document["keywords"], content=document["content"]
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        _err("error: the TIL must be the JSON object `til generate --json` prints (title, keywords, content)")
        return 2
    request = edge_pb2.ReviseTilRequest(til=til, instruction=args.instruction, owner=args.owner or "")
    if args.max_tokens:
        request.generation.max_tokens = args.max_tokens
    return await _stream_til(args, lambda stub: stub.ReviseTil(request, timeout=args.timeout))


async def _ingest(args: argparse.Namespace) -> int:
    try:
        return await ingest(args.paths, addr=args.addr, owner=args.owner or "", batch_size=args.batch_size)
    except grpc.aio.AioRpcError as exc:
        return _rpc_error(exc, args.addr)


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


DEFAULT_MODEL_NOTE = """\
about the default model: SmolLM2-135M-Instruct (Q4_1 GGUF, 135M parameters), picked for a 2-core CPU by
bench/results/quality/table.md. The grammar holds every TIL to the format (the heading, bullets each followed
by code quoted from the diff, a title that never repeats the date, 1-3 Korean keywords), and the output is
always valid JSON. What a model this small cannot do: write fluent Korean, or say true things about the
change; read its TILs as a format demo. For TILs worth reading, point the stack at a real model:
  til up --model /path/to/model.gguf                                   (llama.cpp, any GGUF)
  GENERATOR_BACKEND=vllm GENERATOR_MODEL=/path/to/model-dir til up     (vLLM on a GPU; docs/gpu.md)
and judge it on 32 real diffs before using it:
  python -m bench.quality.run --model mine=/path/to/model.gguf --out bench/results/quality"""


async def _demo(args: argparse.Namespace) -> int:
    args.diff = str(SAMPLE_DIFF)
    args.addr = DEFAULT_EDGE

    async def generate_then_explain() -> int:
        rc = await _generate(args)
        if not args.model:
            _err("\n" + DEFAULT_MODEL_NOTE)
        return rc

    return await _up(args, then=generate_then_explain)


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
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="deadline in seconds")


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

    questions = sub.add_parser("questions", help="stream study questions for a TIL")
    questions.add_argument(
        "til", nargs="?", help="TIL file (Markdown, or JSON from `til generate --json`), or -"
    )
    questions.add_argument("--til-id", help="the id of a TIL stored in the retriever instead of a file")
    questions.add_argument("--difficulty", choices=sorted(DIFFICULTIES), default="medium")
    questions.add_argument("--count", type=int, default=5)
    questions.add_argument("--owner")
    questions.add_argument("--max-tokens", type=int, default=0)
    questions.add_argument("--no-cache", action="store_true")
    questions.add_argument("--json", action="store_true", help="print only the final JSON")
    questions.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    questions.add_argument("--addr", default=DEFAULT_EDGE)

    revise = sub.add_parser("revise", help="revise a TIL (JSON) following an instruction")
    revise.add_argument("til", help="the TIL as JSON (from `til generate --json`), or -")
    revise.add_argument("-i", "--instruction", required=True, help="what to change")
    revise.add_argument("--owner")
    revise.add_argument("--max-tokens", type=int, default=0)
    revise.add_argument("--json", action="store_true")
    revise.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    revise.add_argument("--addr", default=DEFAULT_EDGE)

    ingest = sub.add_parser("ingest", help="index Markdown / JSON files in the retriever")
    ingest.add_argument("paths", nargs="+", help="files or folders")
    ingest.add_argument("--owner")
    ingest.add_argument("--batch-size", type=int, default=32)
    ingest.add_argument(
        "--addr", default=DEFAULT_RETRIEVER, help="retriever address (env TIL_RETRIEVER_ADDR)"
    )

    args = parser.parse_args(argv)
    runner = {
        "up": _up,
        "generate": _generate,
        "demo": _demo,
        "questions": _questions,
        "revise": _revise,
        "ingest": _ingest,
    }[args.command]
    try:
        return asyncio.run(runner(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
