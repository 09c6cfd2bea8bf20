"""Results of pure functions of what a caller sent, kept for the inputs seen lately: a request asked again
(a cache hit) pays a dictionary look-up instead of the work.

Only pure functions belong here (the same input always gives the same result, whatever else changed),
so a kept result is exactly what the function would return again. A function that raises keeps nothing.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def text_size(key: object) -> int:
    """The characters of the text in `key`: a string, or tuples of them (with anything else beside)."""
    if isinstance(key, str):
        return len(key)
    if isinstance(key, tuple):
        return sum(text_size(part) for part in key)
    return 0


class Recent(Generic[K, V]):
    """`compute(key)` for the keys seen lately, least recently used first out. Bounded by entries and by
    the size of each key (`size`, the characters of its text by default): a larger key is computed
    every time and never kept, so the entries keep at most `max_entries * max_size` alive."""

    def __init__(
        self,
        compute: Callable[[K], V],
        *,
        max_entries: int = 256,
        max_size: int = 64 * 1024,
        size: Callable[[K], int] = text_size,
    ) -> None:
        self._compute = compute
        self._size = size
        self.max_entries = max_entries
        self.max_size = max_size
        self._results: collections.OrderedDict[K, V] = collections.OrderedDict()

    def __call__(self, key: K) -> V:
        try:
            result = self._results[key]
        except KeyError:
            pass
        else:
            self._results.move_to_end(key)
            return result
        result = self._compute(key)
        if self._size(key) <= self.max_size:
            self._results[key] = result
            if len(self._results) > self.max_entries:
                self._results.popitem(last=False)
        return result

    def __len__(self) -> int:
        return len(self._results)

    def __contains__(self, key: K) -> bool:
        return key in self._results
