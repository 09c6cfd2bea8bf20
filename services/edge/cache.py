"""The cache envelope: keys, look-ups that never fail a stream, and the stored form of a result."""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Histogram
from til.v1 import common_pb2, edge_pb2

from services.edge.clients import DependencyUnavailable, ResultCache

CACHE_LOOKUPS = Counter(
    "tilserve_edge_cache_lookups_total", "Cache look-ups by result.", ["namespace", "status"]
)
CACHE_LOOKUP_SECONDS = Histogram(
    "tilserve_edge_cache_lookup_seconds",
    "Time a stream spent on its cache look-up, by result (a dead cache should cost next to nothing).",
    ["namespace", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
# Children looked up once per (namespace, status), a handful: labels() costs more than the count.
lookups = functools.cache(CACHE_LOOKUPS.labels)
lookup_seconds = functools.cache(CACHE_LOOKUP_SECONDS.labels)

CACHE_STATUS_NAMES = {
    edge_pb2.CACHE_STATUS_HIT: "hit",
    edge_pb2.CACHE_STATUS_MISS: "miss",
    edge_pb2.CACHE_STATUS_BYPASSED: "bypassed",
    edge_pb2.CACHE_STATUS_UNAVAILABLE: "unavailable",
}


# What json.dumps(sort_keys=True, ensure_ascii=False, separators=(",", ":")) builds on every call, built once.
_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def cache_key(parts: dict[str, Any]) -> str:
    """SHA-256 (hex) of a canonical JSON form of `parts`."""
    return hashlib.sha256(_CANONICAL.encode(parts).encode("utf-8")).hexdigest()


def sampling_fields(sampling: common_pb2.SamplingParams) -> dict[str, Any]:
    """The sampling fields the caller set (unset and zero differ), for cache keys."""
    return {f.name: value for f, value in sampling.ListFields()}


@dataclass(frozen=True)
class Cached:
    """A result this edge stored: the exact JSON, the model that wrote it, its token counts."""

    json_text: str
    model: str
    usage: common_pb2.TokenUsage
    result_id: str = ""


@dataclass(frozen=True)
class CacheLookup:
    status: int  # edge_pb2.CacheStatus
    value: Cached | None = None
    notice: str | None = None
    expires_in_s: float | None = None  # of a hit: how long the cache keeps it (None: no expiry)


async def look_up(cache: ResultCache, namespace: str, key: str, policy: int, timeout_s: float) -> CacheLookup:
    """Reads the cache as the policy allows. Never raises: a cache problem is a status and a notice."""
    began = time.monotonic()
    if policy != edge_pb2.CACHE_POLICY_UNSPECIFIED:
        lookup = CacheLookup(edge_pb2.CACHE_STATUS_BYPASSED)
    else:
        try:
            read = await cache.get(namespace, key, timeout=timeout_s)
        except DependencyUnavailable as exc:
            lookup = CacheLookup(
                edge_pb2.CACHE_STATUS_UNAVAILABLE, notice=f"cache unavailable ({exc}); generating without it"
            )
        else:
            value = unwrap(read.value_json) if read is not None else None
            if read is not None and value is None:
                notice = "the cached entry could not be read; generating a new result"
                lookup = CacheLookup(edge_pb2.CACHE_STATUS_MISS, notice=notice)
            elif read is None or value is None:
                lookup = CacheLookup(edge_pb2.CACHE_STATUS_MISS)
            else:
                lookup = CacheLookup(edge_pb2.CACHE_STATUS_HIT, value, expires_in_s=read.expires_in_s)
    status = CACHE_STATUS_NAMES[lookup.status]
    lookups(namespace, status).inc()
    lookup_seconds(namespace, status).observe(time.monotonic() - began)
    return lookup


def unwrap(raw: str) -> Cached | None:
    """The stored result, if `raw` is one this edge wrote: {"json": str, "model": str, "usage": {...}, ...}."""
    try:
        value = json.loads(raw)
        json.loads(value["json"])
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("model"), str):
        return None
    usage = value.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    try:
        tokens = common_pb2.TokenUsage(
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
        )
    except (TypeError, ValueError):
        return None
    return Cached(value["json"], value["model"], tokens, str(value.get("til_id") or ""))


def envelope(*, json_text: str, model: str, usage: common_pb2.TokenUsage, **extra: Any) -> str:
    return json.dumps(
        {
            "json": json_text,
            "model": model,
            "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens},
            **extra,
        },
        ensure_ascii=False,
    )
