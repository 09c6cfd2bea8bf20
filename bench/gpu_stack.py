"""Starts the cacher, generator and edge as local processes, runs commands against them, stops them.

    python -m bench.gpu_stack --data /tmp/stack \\
        --env GENERATOR_BACKEND=vllm --env GENERATOR_MODEL=/tmp/vkit_models/smollm2-135m-instruct-bf16 \\
        --run "python3 -m bench.til_check --out til_check.json"

`--env NAME=VALUE` goes to the service its prefix names (GENERATOR_, EDGE_, CACHER_). The retriever is
left out (the edge works without it and says so); benchmarks turn retrieval off in the edge. Each
`--run` is a shell command, run in turn; the exit status is the first failure's. Service logs stay
in `<data>/logs`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from services.stack import LocalStack

SERVICES = ("cacher", "generator", "edge")


async def run(args: argparse.Namespace) -> int:
    env: dict[str, dict[str, str]] = {name: {} for name in SERVICES}
    for item in args.env:
        key, sep, value = item.partition("=")
        service = key.split("_", 1)[0].lower()
        if not sep or service not in env:
            raise SystemExit(f"--env {item!r}: expected GENERATOR_/EDGE_/CACHER_NAME=VALUE")
        env[service][key] = value
    stack = LocalStack(Path(args.data), env=env, services=SERVICES, python=sys.executable)
    t0 = time.monotonic()
    await stack.start(timeout_s=args.start_timeout_s, progress=lambda line: print(line, flush=True))
    print(f"stack SERVING after {time.monotonic() - t0:.1f}s", flush=True)
    status = 0
    try:
        for command in args.run:
            print(f"$ {command}", flush=True)
            process = await asyncio.create_subprocess_shell(command)
            code = await process.wait()
            print(f"exit {code}", flush=True)
            status = status or code
    finally:
        codes = stack.stop()
        print(f"stopped: {codes}", flush=True)
    return status


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/tilserve-stack")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE for the service its prefix names")
    p.add_argument("--run", action="append", default=[], help="a shell command to run against the stack")
    p.add_argument("--start-timeout-s", type=float, default=400.0)
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
