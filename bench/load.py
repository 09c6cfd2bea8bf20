"""Closed-loop load: `concurrency` streams at a time until the prompts run out.

In-process arms run in the driver's event loop. Network arms can run in several client processes
so that one Python process parsing ~10k messages/s does not become the thing being measured.

Two shapes: `closed_loop` starts every stream at once, so equal requests run in lockstep waves;
with a `Stagger`, the streams start spread over a few seconds and keep their spacing (see Stagger).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

from bench.arms import Arm, ArmSpec, network_arm
from bench.metrics import RequestRecord
from bench.prompts import Prompt


async def closed_loop(
    arm: Arm,
    prompts: Sequence[Prompt],
    concurrency: int,
    output_len: int,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> list[RequestRecord]:
    """Keeps `concurrency` requests in flight; returns one record per prompt, in prompt order."""
    records: list[RequestRecord | None] = [None] * len(prompts)
    queue = iter(range(len(prompts)))

    async def stream_worker() -> None:
        for i in queue:  # shared iterator: each index is taken once
            record = await arm.one(prompts[i], output_len)
            records[i] = record
            if on_done is not None:
                on_done(record)

    await asyncio.gather(*(stream_worker() for _ in range(min(concurrency, len(prompts)))))
    return [r for r in records if r is not None]


@dataclass(frozen=True)
class Stagger:
    """Staggered arrivals: stream k of `streams` sends its first request `k * spread_s / streams` after
    `start_at`, then keeps one request in flight, so the streams keep their spacing and the engine
    takes requests one by one instead of 100 at a time.

    Started together, 100 equal streams run in lockstep waves, and a wave's TTFT p50 moves by a whole
    prefill step with how many requests the engine's first step of the wave caught
    (bench/results/issue13-h200-s21): a lottery, not the serving path's cost. Staggered, each request
    arrives beside requests that are decoding, as users' requests do.

    Each stream's first request (the ramp up) and last (the ramp down) are not measured: while a
    request lasts longer than `spread_s`, every measured request runs with all the streams running
    (`bench.metrics.summarize` reports whether they did). `start_at` is `time.monotonic()`, one clock
    for every process of a host (Linux); `first` is the index of a client process's first stream.
    """

    spread_s: float
    start_at: float
    streams: int
    first: int = 0

    def delay_s(self, stream: int) -> float:
        """How long stream `stream` of this share waits, from now, before its first request."""
        due = self.start_at + (self.first + stream) * self.spread_s / self.streams
        return max(0.0, due - time.monotonic())


async def staggered_loop(
    arm: Arm,
    prompts: Sequence[Prompt],
    concurrency: int,
    output_len: int,
    stagger: Stagger,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> list[RequestRecord]:
    """`concurrency` staggered streams; stream i sends prompts[i * n : (i + 1) * n] in turn, where
    n = len(prompts) / concurrency (at least 3: a ramp up, one measured, a ramp down). Returns every
    record in prompt order, the ramps' marked `measured=False`."""
    per, rest = divmod(len(prompts), concurrency)
    if rest or per < 3:
        raise ValueError(
            f"staggered load needs at least 3 prompts per stream and the same number for each: "
            f"{len(prompts)} prompts for {concurrency} streams"
        )
    records: list[RequestRecord | None] = [None] * len(prompts)

    async def stream(i: int) -> None:
        await asyncio.sleep(stagger.delay_s(i))
        for j in range(per):
            record = await arm.one(prompts[i * per + j], output_len)
            record.measured = 0 < j < per - 1
            records[i * per + j] = record
            if on_done is not None:
                on_done(record)

    await asyncio.gather(*(stream(i) for i in range(concurrency)))
    return [r for r in records if r is not None]


def split(total: int, parts: int) -> list[int]:
    """`total` as `parts` near-equal shares, largest first, zeros dropped."""
    shares = [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
    return [s for s in shares if s]


# --- client worker processes --------------------------------------------------------------------

_loop: asyncio.AbstractEventLoop | None = None
_arms: dict[ArmSpec, Arm] = {}


def _run_in_worker(
    spec: ArmSpec, prompts: list[Prompt], concurrency: int, output_len: int, stagger: Stagger | None = None
) -> tuple[list[RequestRecord], float, float]:
    """Runs in a client process; its loop and connections persist between calls (warm-up counts).
    Returns the records, and the CPU seconds this process spent on them and the wall seconds they took."""
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
        asyncio.set_event_loop(_loop)

    async def run() -> list[RequestRecord]:
        arm = _arms.get(spec)
        if arm is None:
            arm = network_arm(spec)
            await arm.open()
            _arms[spec] = arm
        if stagger is not None:
            return await staggered_loop(arm, prompts, concurrency, output_len, stagger)
        return await closed_loop(arm, prompts, concurrency, output_len)

    cpu, wall = time.process_time(), time.monotonic()
    records = _loop.run_until_complete(run())
    return records, time.process_time() - cpu, time.monotonic() - wall


def _worker_init(path: list[str]) -> None:
    sys.path[:] = path


class ClientProcesses:
    """A pool of client processes that run a network arm's share of the streams each."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        # Of the last run: CPU seconds of all client processes, and the busiest one's share of its wall
        # time (near 1: the client, not the server, set the pace).
        self.cpu_s = 0.0
        self.busiest = 0.0
        # spawn, not fork: the driver may hold a CUDA context and a running event loop.
        self._pool = ProcessPoolExecutor(
            max_workers=processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(list(sys.path),),
        )

    async def run(
        self,
        spec: ArmSpec,
        prompts: Sequence[Prompt],
        concurrency: int,
        output_len: int,
        stagger: Stagger | None = None,
    ) -> list[RequestRecord]:
        # Each process takes a share of the streams and a matching share of the prompts (staggered:
        # its streams' own prompts, and their places in the stagger).
        streams = split(concurrency, self.processes)
        counts = [len(prompts) * s // concurrency for s in streams]
        counts[0] += len(prompts) - sum(counts)
        if stagger is not None and len(prompts) % concurrency:
            raise ValueError(
                f"staggered load: {len(prompts)} prompts do not divide among {concurrency} streams"
            )
        loop = asyncio.get_running_loop()
        jobs, start, first = [], 0, 0
        for share, count in zip(streams, counts, strict=True):
            chunk = list(prompts[start : start + count])
            start += count
            mine = None if stagger is None else replace(stagger, first=first)
            first += share
            if chunk:
                jobs.append(
                    loop.run_in_executor(self._pool, _run_in_worker, spec, chunk, share, output_len, mine)
                )
        results = await asyncio.gather(*jobs)
        self.cpu_s = sum(cpu for _, cpu, _ in results)
        self.busiest = max((cpu / wall for _, cpu, wall in results if wall > 0), default=0.0)
        return [record for records, _, _ in results for record in records]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def default_client_processes() -> int:
    return max(1, min(4, (os.cpu_count() or 2) // 4))


class Ticker:
    """Prints progress every `every_s` seconds while a batch runs."""

    def __init__(self, label: str, total: int, *, counting: bool = True, every_s: float = 10.0) -> None:
        self.label = label
        self.counting = counting
        self.total = total
        self.done = 0
        self._every = every_s
        self._started = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def count(self, _: RequestRecord) -> None:
        self.done += 1

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._every)
            elapsed = time.monotonic() - self._started
            done = f"{self.done}/{self.total} requests" if self.counting else f"{self.total} requests"
            print(f"  {self.label}: {done}, {elapsed:.0f}s", flush=True)

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
