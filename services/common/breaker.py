"""A circuit breaker: stop calling a dependency that keeps failing, and find out by itself when it is back.

Closed, calls pass. After `failures` consecutive failed calls it opens: calls are refused at once, without
touching the network, for `cool_down_s`. Then one call goes through as a probe (half-open): its success
closes the breaker, its failure opens it for another cool-down.

Only what says something about the dependency counts as a failure (`counts`: by default every exception
of type `failure_type`); an error caused by one request, or a caller who left, counts as neither failure
nor success.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)

BREAKER_OPEN = Gauge(
    "tilserve_edge_breaker_open", "1 while calls to the dependency are skipped.", ["dependency"]
)
BREAKER_SKIPPED = Counter(
    "tilserve_edge_breaker_skipped_total", "Calls refused by an open breaker.", ["dependency"]
)


class CircuitBreaker:
    def __init__(
        self,
        dependency: str,
        *,
        failures: int,
        cool_down_s: float,
        refuse: Callable[[str], Exception],
        counts: Callable[[BaseException], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`refuse(message)` builds what an open breaker raises; `counts(exc)` says whether an exception
        from the call is the dependency's failure."""
        if failures < 1 or cool_down_s <= 0:
            raise ValueError("failures must be >= 1 and cool_down_s > 0")
        self.dependency = dependency
        self.failures = failures
        self.cool_down_s = cool_down_s
        self._refuse = refuse
        self._counts = counts
        self._clock = clock
        self._consecutive = 0
        self._open_until: float | None = None
        self._probing = False
        BREAKER_OPEN.labels(dependency).set(0)

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Wraps one call: refuses it at once while open; otherwise counts how it ended."""
        probe = False
        if self._open_until is not None:
            wait = self._open_until - self._clock()
            if wait > 0 or self._probing:
                BREAKER_SKIPPED.labels(self.dependency).inc()
                raise self._refuse(
                    f"{self.dependency}: skipped after {self.failures} consecutive failures; "
                    f"next try in {max(wait, 0.0):.1f}s"
                )
            probe = self._probing = True
        try:
            yield
        except Exception as exc:
            if self._counts(exc):
                self._failed()
            raise
        else:
            self._succeeded()
        finally:
            if probe:
                self._probing = False

    def _failed(self) -> None:
        self._consecutive += 1
        if self._consecutive >= self.failures:
            if self._open_until is None:
                log.warning(
                    "%s failed %d times in a row; skipping it for %.1fs",
                    self.dependency,
                    self._consecutive,
                    self.cool_down_s,
                )
            self._open_until = self._clock() + self.cool_down_s
            BREAKER_OPEN.labels(self.dependency).set(1)

    def _succeeded(self) -> None:
        if self._open_until is not None:
            log.info("%s answers again; calling it as usual", self.dependency)
        self._consecutive = 0
        self._open_until = None
        BREAKER_OPEN.labels(self.dependency).set(0)
