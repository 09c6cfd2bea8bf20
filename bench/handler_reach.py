"""How long a burst of calls takes to reach the generator's handler, on CPU: TIL calls against plain ones.

    .venv/bin/python -m bench.handler_reach [--schema-workers 0 2] [--burst 25] [--rounds 3] [--out DIR]

On the H200 (bench/results/issue13-h200-s21) a burst of 100 TIL calls reached the generator's handler
46-70 ms (p50) after the caller sent them, plain calls 3-5 ms, with the front-ends' event loops idle:
the threads readying the TIL schemas held the GIL that the event loop and gRPC's poller need to take
each new call. This reproduces it without vLLM: the generator (`python -m services.generator`, its
servicer, interceptors and `VllmEngine.prepare` as they are, with the packaged SmolLM2 tokenizer) runs
in a child process with a stand-in for vLLM's `generate` (one token at once), for each
GENERATOR_SCHEMA_WORKERS value asked. One client connection per call (as bench.serving's gRPC arms)
sends bursts of `--burst` calls, interleaved:

- `plain`: the diff's chat as a raw prompt;
- `til`: the edge's own TIL request for a diff (chat + its JSON Schema), a new diff each burst;
- `plain, TIL-sized`: the plain prompt padded to the TIL request's size (so the size alone is ruled out).

"Reached" is the generator's own figure (its log: the handler's start less the caller's send stamp),
"ready" the time until the request was prepared (chat tokenized, schema readied). This machine's
other load moves the figures; compare rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from services.common.stats import nearest_rank

KINDS = ("plain", "til", "plain, TIL-sized")
LOG_LINE = re.compile(
    r"request (?P<id>[\w-]+) finished .*?prepare (?P<prepare>[\d.]+) ms.*reached this handler (?P<reach>[\d.]+) ms"
)


def serve() -> None:
    """The child: the generator with VllmEngine's real prepare and a stand-in for vLLM's generate."""
    from bench.grammar_steps import load_tokenizer
    from services.generator import __main__ as generator
    from services.generator.engine import EngineDelta, EngineFinished, EngineStarted
    from services.generator.vllm_engine import VllmEngine, _Loaded

    tokenizer = load_tokenizer(None)

    def build_engine(settings: Any, frontend: Any = None) -> Any:
        engine = VllmEngine(settings)

        async def start() -> None:
            if engine._schema_processes is not None:
                await asyncio.get_running_loop().run_in_executor(None, engine._schema_processes.warm)
            engine._loaded = _Loaded(
                llm=SimpleNamespace(shutdown=lambda: None),
                tokenizer=tokenizer,
                max_model_len=4096,
                model_defaults={},
            )  # type: ignore[arg-type]

        async def generate(request: Any) -> Any:
            if request.prepared is None:
                request = await engine.prepare(request)
            n = len(request.prepared.prompt_tokens)
            yield EngineStarted(prompt_tokens=n)
            yield EngineDelta(text="x", token_count=1)
            yield EngineFinished(finish_reason="length", prompt_tokens=n, completion_tokens=1)

        engine.start = start  # type: ignore[method-assign]
        engine._sampling_params = lambda request, schema: None  # type: ignore[method-assign]  # vLLM's check
        engine.generate = generate  # type: ignore[method-assign]
        return engine

    generator.build_engine = build_engine  # type: ignore[assignment]
    generator.run()


def requests(count: int, prompt_tokens: int) -> dict[str, list[Any]]:
    """`count` calls of each kind, each TIL call with its own diff (and so its own schema)."""
    from til.v1 import common_pb2, generator_pb2

    from bench.grammar_steps import load_tokenizer, til_items

    tils = til_items(load_tokenizer(None), count, prompt_tokens, 256, seed=11)
    out: dict[str, list[Any]] = {kind: [] for kind in KINDS}
    for i, til in enumerate(tils):
        request = til.request()
        request.request_id, request.stopping.max_tokens = f"til-{i}", 4
        out["til"].append(request)
        text = "\n".join(m["content"] for m in til.messages())
        for kind, body in (
            ("plain", text),
            ("plain, TIL-sized", text + "x" * (request.ByteSize() - len(text.encode()))),
        ):
            out[kind].append(
                generator_pb2.GenerateRequest(
                    request_id=f"{'sized' if 'sized' in kind else 'plain'}-{i}",
                    prompt=body,
                    sampling=common_pb2.SamplingParams(temperature=0.0),
                    stopping=common_pb2.StoppingCriteria(max_tokens=4, ignore_eos=True),
                )
            )
    return out


async def bursts(address: str, calls: dict[str, list[Any]], burst: int, rounds: int) -> None:
    import grpc
    from til.v1 import generator_pb2_grpc

    from services.common import sent_at

    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(burst)
    ]
    try:
        stubs = [generator_pb2_grpc.GeneratorServiceStub(c) for c in channels]
        await asyncio.gather(*(c.channel_ready() for c in channels))

        async def one(stub: Any, request: Any) -> None:
            async for _ in stub.Generate(request, metadata=sent_at.stamp(), timeout=60):
                pass

        await asyncio.gather(
            *(one(s, r) for s, r in zip(stubs, calls["plain"][:burst], strict=False))
        )  # warm-up
        for r in range(rounds):
            for kind in KINDS:
                batch = calls[kind][r * burst : (r + 1) * burst]
                await asyncio.gather(*(one(s, q) for s, q in zip(stubs, batch, strict=True)))
                await asyncio.sleep(0.3)
            print(f"  round {r + 1}/{rounds} sent", flush=True)
    finally:
        for channel in channels:
            await channel.close()


def figures(log: str, burst: int) -> dict[str, dict[str, float]]:
    """p50 / p90 of reach and prepare per kind, from the generator's log (the warm-up burst left out)."""
    got: dict[str, list[tuple[float, float]]] = {kind: [] for kind in KINDS}
    warm = {f"plain-{i}" for i in range(burst)}
    seen_warm: set[str] = set()
    for m in LOG_LINE.finditer(log):
        request_id = m["id"]
        if request_id in warm and request_id not in seen_warm:
            seen_warm.add(request_id)
            continue
        kind = (
            "til"
            if request_id.startswith("til-")
            else "plain, TIL-sized"
            if request_id.startswith("sized-")
            else "plain"
        )
        got[kind].append((float(m["reach"]), float(m["prepare"])))

    return {
        kind: {
            "calls": len(v),
            "reached_p50_ms": statistics.median(x for x, _ in v) if v else math.nan,
            "reached_p90_ms": nearest_rank([x for x, _ in v], 0.9),
            "ready_p50_ms": statistics.median(y for _, y in v) if v else math.nan,
        }
        for kind, v in got.items()
    }


def run_one(
    workers: int, calls: dict[str, list[Any]], burst: int, rounds: int, log_path: Path
) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "GENERATOR_BACKEND": "vllm",
        "GENERATOR_MODEL": "stand-in",
        "GENERATOR_MAX_MODEL_LEN": "4096",
        "GENERATOR_PORT": str(port),
        "GENERATOR_METRICS_PORT": "0",
        "GENERATOR_SCHEMA_WORKERS": str(workers),
    }
    with log_path.open("w") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "bench.handler_reach", "--serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        for _ in range(120):
            if "SERVING" in log_path.read_text():
                break
            if child.poll() is not None:
                raise RuntimeError(f"the generator exited: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        asyncio.run(bursts(f"127.0.0.1:{port}", calls, burst, rounds))
    finally:
        child.terminate()
        child.wait(30)
    return figures(log_path.read_text(), burst)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--schema-workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--burst", type=int, default=25, help="calls at once (a front-end's share of 100)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("/tmp/handler-reach"))
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"building {args.burst * (args.rounds + 1)} TIL requests with the edge's code...", flush=True)
    calls = requests(args.burst * (args.rounds + 1), args.prompt_tokens)
    results: dict[str, Any] = {
        "burst": args.burst,
        "rounds": args.rounds,
        "prompt_tokens": args.prompt_tokens,
        "cpus": os.cpu_count(),
    }
    for workers in args.schema_workers:
        print(
            f"GENERATOR_SCHEMA_WORKERS={workers}: {args.rounds} rounds of {args.burst} calls of each kind",
            flush=True,
        )
        results[str(workers)] = run_one(
            workers, calls, args.burst, args.rounds, args.out / f"generator-{workers}.log"
        )
    print(f"\n{args.burst} calls at once, {args.rounds} bursts of each kind, {os.cpu_count()} CPUs\n")
    print("| GENERATOR_SCHEMA_WORKERS | calls of | reached p50 ms | reached p90 ms | ready p50 ms | n |")
    print("|---|---|---|---|---|---|")
    for workers in args.schema_workers:
        for kind, f in results[str(workers)].items():
            print(
                f"| {workers or '0 (4 threads)'} | {kind} | {f['reached_p50_ms']:.1f} | {f['reached_p90_ms']:.1f} "
                f"| {f['ready_p50_ms']:.1f} | {f['calls']} |"
            )
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults in {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
