"""Cancel N generator streams mid-generation and time how long the engine takes to hold none of them.

    python -m bench.cancel --generator-addr 127.0.0.1:50052 --metrics-url http://127.0.0.1:9092/metrics \\
        --streams 100 --out cancel.json

Opens N `Generate` streams (ignore_eos, a long output), waits until every one has received text,
cancels all the calls at once, then polls the generator's Prometheus endpoint every 10 ms:
`tilserve_generator_requests_running` / `_waiting` (the generator's engine load, read at scrape
time from vLLM's live request count and last scheduler step) and vLLM's own
`vllm:num_requests_running` / `_waiting` (the scheduler's counts as of its last step). vLLM only
reports scheduler counts after a step, so once the generator reads 0/0 the test sends one small
probe request: the step that runs it reports what the scheduler holds besides the probe.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from til.v1 import common_pb2, generator_pb2, generator_pb2_grpc

GAUGES = (
    "tilserve_generator_requests_running",
    "tilserve_generator_requests_waiting",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
)


def scrape(url: str) -> dict[str, float]:
    """The gauges above (summed over label sets) from a Prometheus text endpoint."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, rest = line.partition(" ")
        base = name.split("{", 1)[0]
        if base in GAUGES:
            values[base] = values.get(base, 0.0) + float(rest.rsplit(" ", 1)[-1] if " " in rest else rest)
    return values


async def run(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()

    async def metrics() -> dict[str, float]:
        return await loop.run_in_executor(None, scrape, args.metrics_url)

    async with grpc.aio.insecure_channel(args.generator_addr) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        started = [asyncio.Event() for _ in range(args.streams)]
        deltas = [0] * args.streams
        calls = []
        for i in range(args.streams):
            request = generator_pb2.GenerateRequest(
                request_id=f"cancel-{i}",
                prompt=f"Request {i}: tell a very long story about the sea.",
                sampling=common_pb2.SamplingParams(temperature=0.0),
                stopping=common_pb2.StoppingCriteria(max_tokens=args.max_tokens, ignore_eos=True),
            )
            calls.append(stub.Generate(request, timeout=600))

        async def read(i: int) -> None:
            try:
                async for message in calls[i]:
                    if message.WhichOneof("event") == "delta":
                        deltas[i] += 1
                        if deltas[i] >= args.deltas_before_cancel:
                            started[i].set()
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.CANCELLED:
                    raise

        readers = [asyncio.create_task(read(i)) for i in range(args.streams)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), args.start_timeout_s)
        before = await metrics()
        cancelled_at = time.monotonic()
        for call in calls:
            call.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        samples: list[dict[str, float]] = []
        idle_after_s: float | None = None
        while time.monotonic() - cancelled_at < args.watch_s:
            values = await metrics()
            values["t_s"] = round(time.monotonic() - cancelled_at, 4)
            samples.append(values)
            ours = (values.get(GAUGES[0]), values.get(GAUGES[1]))
            if idle_after_s is None and ours == (0.0, 0.0):
                idle_after_s = values["t_s"]
                break
            await asyncio.sleep(0.01)
        # A fresh engine step: the scheduler's counts include only the probe if the rest are gone.
        probe = generator_pb2.GenerateRequest(
            request_id="cancel-probe",
            prompt="Hi",
            stopping=common_pb2.StoppingCriteria(max_tokens=2, ignore_eos=True),
        )
        async for _ in stub.Generate(probe, timeout=60):
            pass
        after_probe = await metrics()
    return {
        "streams": args.streams,
        "deltas_before_cancel_min": min(deltas),
        "before_cancel": before,
        "generator_idle_after_s": idle_after_s,
        "samples": samples,
        "after_probe": after_probe,
        "vllm_gauges_seen": GAUGES[2] in after_probe,
        "ok": idle_after_s is not None
        and idle_after_s <= 1.0
        and after_probe.get("vllm:num_requests_running", 0.0) <= 1.0
        and after_probe.get("vllm:num_requests_waiting", 0.0) == 0.0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator-addr", default="127.0.0.1:50052")
    p.add_argument("--metrics-url", default="http://127.0.0.1:9092/metrics")
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--deltas-before-cancel", type=int, default=3)
    p.add_argument("--start-timeout-s", type=float, default=120.0)
    p.add_argument("--watch-s", type=float, default=5.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    result = asyncio.run(run(args))
    line = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(line), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
