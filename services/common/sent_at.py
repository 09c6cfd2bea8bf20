"""When a caller sent a call, carried as gRPC metadata.

The receiver's own clock starts when its handler runs; the time before that (the transport, HTTP/2 flow
control, the receiving event loop's backlog of other calls) is invisible to it. A caller that stamps its
calls lets the receiver log that share. Wall-clock time, so the figure is exact on one host and as good
as the clocks' sync across hosts; it is for logs and benchmarks, never for decisions.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

HEADER = "x-tilserve-sent-at"  # Unix time in seconds, by the caller's clock


def stamp() -> tuple[tuple[str, str]]:
    """Metadata for a call sent now."""
    return ((HEADER, f"{time.time():.6f}"),)


def delay_s(metadata: Iterable[tuple[str, str | bytes]] | None) -> float | None:
    """Seconds since the caller stamped the call (0 if its clock is ahead), or None without a stamp."""
    for key, value in metadata or ():
        if key == HEADER and isinstance(value, str):
            try:
                sent = float(value)
            except ValueError:
                return None
            return max(time.time() - sent, 0.0)
    return None
