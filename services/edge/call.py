"""One call as the edge sees it: its id, when it arrived, its deadline, how long it waited for a slot."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from services.common.errors import DeadlineExceeded


@dataclass
class CallContext:
    request_id: str
    arrived: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() value
    queued_s: float = 0.0

    def remaining(self) -> float | None:
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the call's deadline passed before the edge could finish")
        return left

    def bounded(self, limit_s: float) -> float:
        """`limit_s`, or less when the call's deadline is nearer."""
        left = self.remaining()
        return limit_s if left is None else min(limit_s, left)

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.arrived) * 1000.0
