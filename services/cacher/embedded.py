"""A private redis-server, run as a child of the cacher when no CACHER_REDIS_URL is given.

It listens only on a unix socket (mode 700) in a private folder, keeps nothing on disk, and evicts
least recently used keys at its memory cap. On Linux it is told to die with the process that
started it (parent-death signal), so even a SIGKILLed cacher leaves no redis-server behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType

from prometheus_client import Counter
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from services.common.process import dying_with_parent

log = logging.getLogger(__name__)

_MAX_UNIX_SOCKET_PATH = 107  # sun_path is 108 bytes on Linux, including the terminating NUL

RESTARTS = Counter("tilserve_cacher_redis_restarts", "Times the embedded redis-server was restarted.")


class EmbeddedRedisError(RuntimeError):
    """The private redis-server could not be started."""


class EmbeddedRedis:
    """Runs `redis-server` on a unix socket in `directory` until `close()`.

    `start()` must run on a thread that lives as long as the child: Linux delivers the
    parent-death signal when the thread that forked it ends (the event loop's thread does).
    Usable as `async with EmbeddedRedis(...) as redis:`; `start()` after `close()` starts it again
    on the same socket.
    """

    def __init__(
        self,
        *,
        server_bin: str = "redis-server",
        directory: str | os.PathLike[str] | None = None,
        maxmemory: str = "256mb",
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self._server_bin = server_bin
        self._given_dir = Path(directory) if directory else None
        self._dir: Path | None = None
        self._maxmemory = maxmemory
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        if self._dir is None:
            raise RuntimeError("EmbeddedRedis is not started")
        return self._dir / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        """Starts redis-server and returns once it answers PING; raises `EmbeddedRedisError` otherwise."""
        if self._process is not None:
            raise RuntimeError("EmbeddedRedis is already running")
        if self._dir is None:
            self._dir = self._prepare_dir()
        try:
            await self._launch()
        except BaseException:
            await self.close()
            raise

    async def _launch(self) -> None:
        """Spawns redis-server in the prepared folder and waits for PING; leaves nothing running on failure."""
        binary = shutil.which(self._server_bin)
        if binary is None:
            raise EmbeddedRedisError(
                f"cannot start the embedded Redis: {self._server_bin!r} was not found on PATH. "
                "Install Redis (e.g. `apt-get install redis-server`), set CACHER_REDIS_SERVER_BIN to its "
                "path, or set CACHER_REDIS_URL to use a Redis you run yourself."
            )
        self._process = self._spawn(binary)
        try:
            await self._wait_until_ready()
        except BaseException:
            process, self._process = self._process, None
            if process.poll() is None:
                process.kill()
                process.wait()
            raise
        log.info("embedded redis-server (pid %d) is ready on %s", self._process.pid, self.socket_path)

    async def supervise(
        self,
        on_down: Callable[[], Awaitable[None]],
        on_up: Callable[[], Awaitable[None]],
        *,
        max_backoff_s: float = 5.0,
    ) -> None:
        """Runs until cancelled: when redis-server exits, reaps it, logs why, calls `on_down`, starts it
        again on the same socket (with growing pauses while that fails), then calls `on_up`."""
        while True:
            process = self._process
            if process is None:
                raise RuntimeError("EmbeddedRedis is not started")
            code = await _exited(process)  # reaped: no zombie is left
            if self._process is not process:  # close() stopped it on purpose
                return
            self._process = None
            log.error(
                "embedded redis-server (pid %d) exited with code %s; the cache is down until it is "
                "restarted. Its log: %s",
                process.pid,
                code,
                _tail(self._log_path, 500),
            )
            await on_down()
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(EmbeddedRedisError),
                wait=wait_exponential(multiplier=0.1, max=max_backoff_s),
                before_sleep=_log_restart_failure,
            ):
                with attempt:
                    await self._launch()
            RESTARTS.inc()
            log.warning("embedded redis-server restarted (pid %d); the cache is empty", self.pid or 0)
            await on_up()

    async def close(self) -> None:
        """Stops redis-server (SIGTERM, then SIGKILL after `stop_timeout_s`) and removes a temporary folder."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, self._stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("redis-server (pid %d) ignored SIGTERM; killing it", process.pid)
                process.kill()
                await asyncio.to_thread(process.wait)
        if self._dir is not None and self._given_dir is None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def __aenter__(self) -> EmbeddedRedis:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _prepare_dir(self) -> Path:
        if self._given_dir is None:
            return Path(tempfile.mkdtemp(prefix="tilserve-redis-"))
        self._given_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self._given_dir

    def _spawn(self, binary: str) -> subprocess.Popen[bytes]:
        if len(os.fsencode(self.socket_path)) > _MAX_UNIX_SOCKET_PATH:
            raise EmbeddedRedisError(
                f"unix socket path {self.socket_path} is longer than {_MAX_UNIX_SOCKET_PATH} bytes; "
                "set CACHER_EMBEDDED_DIR to a shorter folder"
            )
        command = [
            binary,
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.socket_path.parent),
            "--save", "",
            "--appendonly", "no",
            "--maxmemory", self._maxmemory,
            "--maxmemory-policy", "allkeys-lru",
            "--loglevel", "warning",
        ]  # fmt: skip
        # Synchronous on purpose: the parent-death signal follows the thread that forks, so the fork
        # must happen on this (long-lived) thread, not in a worker thread.
        with open(self._log_path, "ab") as log_file:
            return subprocess.Popen(
                dying_with_parent(command),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches the cacher, which then drains first
            )

    @property
    def _log_path(self) -> Path:
        return self.socket_path.parent / "redis.log"

    async def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self._start_timeout_s
        while True:
            code = self._process.poll()
            if code is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with code {code} while starting: {_tail(self._log_path)}"
                )
            if await _answers_ping(self.socket_path):
                return
            if time.monotonic() > deadline:
                raise EmbeddedRedisError(
                    f"redis-server did not answer PING on {self.socket_path} within "
                    f"{self._start_timeout_s:g}s: {_tail(self._log_path)}"
                )
            await asyncio.sleep(0.01)


def _log_restart_failure(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    sleep = state.next_action.sleep if state.next_action is not None else 0.0
    log.error("restarting the embedded redis-server failed (try %d): %s; next try in %.1fs",
              state.attempt_number, error, sleep)  # fmt: skip


async def _exited(process: subprocess.Popen[bytes]) -> int:
    """Waits until `process` exits and reaps it; woken by a pidfd where Linux has one, else by a thread."""
    try:
        fd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        return await asyncio.to_thread(process.wait)
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    loop.add_reader(fd, exited.set)
    try:
        while (code := process.poll()) is None:
            await exited.wait()
            exited.clear()
        return code
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def _answers_ping(socket_path: Path) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(socket_path)), 1.0)
    except (TimeoutError, OSError):
        return False
    try:
        writer.write(b"PING\r\n")
        return await asyncio.wait_for(reader.readline(), 1.0) == b"+PONG\r\n"
    except (TimeoutError, OSError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    return text[-limit:] or "(empty log)"
