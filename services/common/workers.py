"""Running a service: its event loop (asyncio or uvloop), and several worker processes on one port.

Workers are forked before any gRPC object exists (gRPC's threads do not survive a fork); each then
builds its own server, and the kernel spreads connections over them (gRPC listens with SO_REUSEPORT).
They join the port together, once every one has warmed up (`all_warmed`).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# The longest one process waits for the others to warm up (they start together and warm up within
# seconds of each other; vLLM's own wait for an engine core is 600 s).
WARM_UP_TIMEOUT_S = 600.0


def run_loop(main: Callable[[], Coroutine[Any, Any, None]], *, uvloop: bool = False) -> None:
    """Runs `main()` to completion on a new event loop: uvloop's when asked, else asyncio's."""
    if uvloop:
        import uvloop as uv

        uv.run(main())
    else:
        asyncio.run(main())


def die_with_parent(parent: int) -> None:
    """Linux: this process gets SIGTERM when its parent dies (and exits now if it already has)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def worker_metrics_port(metrics_port: int, index: int) -> int:
    """Worker `index`'s metrics port: the service's own plus the index (0, metrics off, stays 0)."""
    return metrics_port + index if metrics_port else 0


async def all_warmed(barrier: Any, who: str, timeout_s: float = WARM_UP_TIMEOUT_S) -> None:
    """Waits until every process sharing `barrier` has warmed up. A connection stays with the process
    it reached, so the first one up must not take every early client (a caller's long-lived channels)
    while the others warm up, nor may one still warming up be handed calls: they join the port together.
    `who`: what the processes are, for the error."""
    started = time.monotonic()
    try:
        await asyncio.to_thread(barrier.wait, timeout_s)
    except threading.BrokenBarrierError:
        if time.monotonic() - started >= timeout_s:
            raise RuntimeError(f"the other {who}s did not warm up within {timeout_s:g}s") from None
        raise RuntimeError(f"another {who} failed or stopped before it warmed up") from None
    except asyncio.CancelledError:
        barrier.abort()  # a stop while waiting: free this thread (and the others') now
        raise


async def warm_up_together(warmup: Awaitable[None], barrier: Any, who: str, timeout_s: float) -> None:
    """`warmup`, then `all_warmed`. A warm-up that fails or is stopped breaks the barrier, so that the
    others, waiting at it or to come, fail at once instead of waiting out `timeout_s`."""
    try:
        await warmup
    except BaseException:
        barrier.abort()
        raise
    await all_warmed(barrier, who, timeout_s)


def run_workers(count: int, work: Callable[[int, Any], None]) -> int:
    """Forks `count` processes, each running `work(index, barrier)`; returns once all have exited.
    `barrier` (shared by the workers) is for `all_warmed`.

    SIGTERM and SIGINT are passed on to every worker (each drains by itself). A worker that exits
    with an error stops the others: the service is then restarted whole, by whatever supervises it.
    Returns the first non-zero exit code, else 0.
    """
    parent = os.getpid()
    barrier = multiprocessing.get_context("fork").Barrier(count)
    workers: dict[int, int] = {}
    for index in range(count):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which leaves through os._exit
            code = 1
            try:
                die_with_parent(parent)
                work(index, barrier)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if exc.code is not None and not isinstance(exc.code, int):
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        workers[pid] = index

    def forward(signum: int, _frame: object) -> None:
        for pid in workers:
            os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    result = 0
    while workers:
        pid, status = os.wait()
        if pid not in workers:
            continue
        index = workers.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and result == 0:
            result = code if code > 0 else 1
            print(f"edge worker {index} (pid {pid}) exited with {code}; stopping the others", file=sys.stderr)
            for other in workers:
                os.kill(other, signal.SIGTERM)
    return result
