"""Secrets in what a caller sends are replaced before the prompt, the cache key, the index or any log."""

from __future__ import annotations

import collections
from collections.abc import Sequence

from prometheus_client import Counter

from services.common.redaction import redact
from services.edge.recent import Recent

SECRETS_REDACTED = Counter(
    "tilserve_edge_secrets_redacted_total", "Secrets found in requests and replaced, by kind.", ["kind"]
)


# A text asked again (a cache hit) pays a dictionary look-up instead of the patterns.
_redacted = Recent(redact)


def redact_text(text: str, found: list[str]) -> str:
    """`text` with its secrets replaced; the kinds of secrets found are appended to `found`."""
    result = _redacted(text)
    found.extend(result.kinds)
    for kind in result.kinds:
        SECRETS_REDACTED.labels(kind).inc()
    return result.text


def redaction_notice(kinds: Sequence[str]) -> str | None:
    """A notice naming the kinds of secrets replaced (never the secrets), or None."""
    if not kinds:
        return None
    counts = collections.Counter(kinds)
    listed = ", ".join(f"{kind} x{n}" if n > 1 else kind for kind, n in sorted(counts.items()))
    return f"secrets were found in the input and replaced before use: {listed}"
