"""Starts the cacher, one or more generators and the edge as local processes, runs commands against them,
stops them.

    python -m bench.gpu_stack --data /tmp/stack \\
        --env GENERATOR_BACKEND=vllm --env GENERATOR_MODEL=/tmp/vkit_models/smollm2-135m-instruct-bf16 \\
        --run "python3 -m bench.til_check --out til_check.json"

`--env NAME=VALUE` goes to the service its prefix names (GENERATOR_, EDGE_, CACHER_). The retriever is
left out (the edge works without it and says so); benchmarks turn retrieval off in the edge. Each
`--run` is a shell command, run in turn; the exit status is the first failure's. Service logs stay
in `<data>/logs` (a generator replica's in `<data>/generator-<i>/logs`).

`--replicas N` starts N generators, replica i on its own GPUs through CUDA_VISIBLE_DEVICES (
`--gpus-per-replica` of them each; more than one is tensor parallelism, with
GENERATOR_TENSOR_PARALLEL_SIZE set to match and NVLink multicast off), on ports 50052, 50062, ...;
the edge reaches them all through EDGE_GENERATOR_ADDR (a comma list), the first one is
`--generator-addr` for the generator arms. `--hold` keeps the stack up after the commands until
SIGTERM (a benchmark on the same machine in a later call), writing `<data>/ready` once SERVING.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from services.stack import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, LocalStack

SERVICES = ("cacher", "generator", "edge")
# Replica i listens on the generator's port plus i times this.
PORT_STRIDE = 10


def replica_gpus(index: int, gpus_per_replica: int) -> str:
    """CUDA_VISIBLE_DEVICES of replica `index`: its own consecutive GPUs."""
    first = index * gpus_per_replica
    return ",".join(str(g) for g in range(first, first + gpus_per_replica))


def generator_env(base: dict[str, str], index: int, replicas: int, gpus_per_replica: int) -> dict[str, str]:
    """One replica's environment: its GPUs (only when several replicas or TP split the machine)."""
    env = dict(base)
    if replicas > 1 or gpus_per_replica > 1:
        env["CUDA_VISIBLE_DEVICES"] = replica_gpus(index, gpus_per_replica)
    if gpus_per_replica > 1:
        env.setdefault("GENERATOR_TENSOR_PARALLEL_SIZE", str(gpus_per_replica))
        # NVLink SHARP (multicast) is off on the lent machines' fabric (device docs): NCCL must not try it.
        env.setdefault("NCCL_NVLS_ENABLE", "0")
    return env


def generator_addresses(replicas: int, offset: int = 0) -> list[str]:
    return [f"127.0.0.1:{DEFAULT_PORTS['generator'] + offset + i * PORT_STRIDE}" for i in range(replicas)]


def build(args: argparse.Namespace) -> tuple[list[LocalStack], LocalStack]:
    """(one stack per generator replica, the cacher + edge stack)."""
    env: dict[str, dict[str, str]] = {name: {} for name in SERVICES}
    for item in args.env:
        key, sep, value = item.partition("=")
        service = key.split("_", 1)[0].lower()
        if not sep or service not in env:
            raise SystemExit(f"--env {item!r}: expected GENERATOR_/EDGE_/CACHER_NAME=VALUE")
        env[service][key] = value
    data = Path(args.data)
    offset = getattr(args, "port_offset", 0)
    addresses = generator_addresses(args.replicas, offset)
    generators = []
    for i, address in enumerate(addresses):
        port = int(address.rsplit(":", 1)[1])
        generators.append(
            LocalStack(
                data / f"generator-{i}" if args.replicas > 1 else data,
                ports={"generator": port},
                metrics_ports={"generator": DEFAULT_METRICS_PORTS["generator"] + offset + i * PORT_STRIDE},
                env={"generator": generator_env(env["generator"], i, args.replicas, args.gpus_per_replica)},
                services=("generator",),
                python=sys.executable,
            )
        )
    edge_env = {"EDGE_GENERATOR_ADDR": ",".join(addresses), **env["edge"]}
    front = LocalStack(
        data,
        ports={name: port + offset for name, port in DEFAULT_PORTS.items()},
        metrics_ports={name: port + offset for name, port in DEFAULT_METRICS_PORTS.items()},
        env={"cacher": env["cacher"], "edge": edge_env},
        services=("cacher", "edge"),
        python=sys.executable,
    )
    return generators, front


async def run(args: argparse.Namespace) -> int:
    generators, front = build(args)
    t0 = time.monotonic()

    def progress(line: str) -> None:
        print(line, flush=True)

    status = 0
    try:
        # Replicas on their own GPUs start together; the edge waits for them in its warm-up.
        await asyncio.gather(
            *(g.start(timeout_s=args.start_timeout_s, progress=progress) for g in generators)
        )
        await front.start(timeout_s=args.start_timeout_s, progress=progress)
        print(f"stack SERVING after {time.monotonic() - t0:.1f}s", flush=True)
        for command in args.run:
            print(f"$ {command}", flush=True)
            process = await asyncio.create_subprocess_shell(command)
            code = await process.wait()
            print(f"exit {code}", flush=True)
            status = status or code
        if args.hold:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            ready = ",".join(generator_addresses(args.replicas, args.port_offset))
            (Path(args.data) / "ready").write_text(ready + "\n")
            print("holding until SIGTERM", flush=True)
            await stop.wait()
    finally:
        with contextlib.suppress(OSError):
            (Path(args.data) / "ready").unlink()
        for stack in (front, *generators):  # edge first: it drains before its generators go
            print(f"stopped: {stack.stop()}", flush=True)
    return status


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/tilserve-stack")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE for the service its prefix names")
    p.add_argument("--run", action="append", default=[], help="a shell command to run against the stack")
    p.add_argument("--replicas", type=int, default=1, help="generator processes, each on its own GPUs")
    p.add_argument("--gpus-per-replica", type=int, default=1, help="more than 1: tensor parallelism")
    p.add_argument("--hold", action="store_true", help="stay up after the commands until SIGTERM")
    p.add_argument(
        "--port-offset", type=int, default=0, help="added to every default port (another stack on this host)"
    )
    p.add_argument("--start-timeout-s", type=float, default=400.0)
    args = p.parse_args()
    if args.replicas < 1 or args.gpus_per_replica < 1:
        p.error("--replicas and --gpus-per-replica must be at least 1")
    os.makedirs(args.data, exist_ok=True)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
