"""A near cache: the complete results this edge process recently read from or wrote to the cacher,
kept in memory so that a repeated request is answered without the cacher hop.

It only ever holds what the cacher holds: an entry is added after the cacher returned it (with the
time it has left there) or after a store to the cacher succeeded, under the same namespace and key
(the key already names the owner, model, sampling, budget and prompt version), and it is dropped at
the earlier of the cacher's own expiry and `max_age_s` after it was added. `max_age_s` bounds how long
a result replaced elsewhere (a REFRESH through another worker or replica) may still be served here;
a REFRESH through this process replaces the entry at once. Bounded by entries and by bytes, least
recently used first out. One per process: workers do not share it.
"""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from prometheus_client import Counter

NEAR_CACHE = Counter(
    "tilserve_edge_near_cache_total",
    "Near-cache look-ups and changes by namespace and what happened (hit, miss, expired, evicted, stored).",
    ["namespace", "event"],
)
# One child per (namespace, event), looked up once: labels() costs more than the count.
_counted = functools.cache(NEAR_CACHE.labels)

V = TypeVar("V")


@dataclass(frozen=True)
class _Entry(Generic[V]):
    value: V
    size: int
    expires_at: float


class NearCache(Generic[V]):
    """At most `max_entries` values and `max_bytes` (as their owners size them), each for at most
    `max_age_s` and never past the expiry given when it was added. `max_entries` 0 keeps nothing."""

    def __init__(
        self,
        *,
        max_entries: int,
        max_bytes: int,
        max_age_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._clock = clock
        self._entries: collections.OrderedDict[tuple[str, str], _Entry[V]] = collections.OrderedDict()
        self.bytes = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_age_s > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, namespace: str, key: str) -> V | None:
        if not self._entries:
            return None
        entry = self._entries.get((namespace, key))
        if entry is None:
            _counted(namespace, "miss").inc()
            return None
        if self._clock() >= entry.expires_at:
            self._drop((namespace, key))
            _counted(namespace, "expired").inc()
            return None
        self._entries.move_to_end((namespace, key))
        _counted(namespace, "hit").inc()
        return entry.value

    def put(self, namespace: str, key: str, value: V, *, size: int, expires_in_s: float | None) -> None:
        """Keeps `value` for at most `max_age_s`, and at most `expires_in_s` (None: the cacher keeps it
        without expiry). A value larger than the whole cache, or already expired, is not kept."""
        self.discard(namespace, key)
        life = self.max_age_s if expires_in_s is None else min(self.max_age_s, expires_in_s)
        if not self.enabled or life <= 0 or size > self.max_bytes:
            return
        self._entries[(namespace, key)] = _Entry(value, size, self._clock() + life)
        self.bytes += size
        _counted(namespace, "stored").inc()
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            _counted(oldest[0], "evicted").inc()

    def discard(self, namespace: str, key: str) -> None:
        if (namespace, key) in self._entries:
            self._drop((namespace, key))

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def _drop(self, address: tuple[str, str]) -> None:
        entry = self._entries.pop(address)
        self.bytes -= entry.size
