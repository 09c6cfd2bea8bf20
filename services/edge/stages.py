"""Stages every edge pipeline shares: the call's clock, cache keys and look-ups, the generator call, the
parsing of its JSON output, and the best-effort writes that run after a stream has ended."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Histogram
from til.v1 import common_pb2, edge_pb2, generator_pb2

from services.common.auth import caller_identity
from services.common.errors import DeadlineExceeded, InvalidArgument, PermissionDenied, Unavailable
from services.common.redaction import redact
from services.common.streams import closing
from services.edge.clients import DependencyUnavailable, ResultCache, TilGenerator
from services.edge.config import EdgeSettings
from services.edge.flights import JOINED_NOTICE, Listener, Plan, SingleFlight
from services.edge.json_closer import NotAJsonPrefix, close_json
from services.edge.til_format import Violation

log = logging.getLogger(__name__)

CACHE_LOOKUPS = Counter(
    "tilserve_edge_cache_lookups_total", "Cache look-ups by result.", ["namespace", "status"]
)
CACHE_LOOKUP_SECONDS = Histogram(
    "tilserve_edge_cache_lookup_seconds",
    "Time a stream spent on its cache look-up, by result (a dead cache should cost next to nothing).",
    ["namespace", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
RETRIEVALS = Counter("tilserve_edge_retrievals_total", "Context searches by result.", ["kind", "status"])
BACKGROUND_WRITES = Counter(
    "tilserve_edge_background_writes_total",
    "Cache stores and index upserts after a stream.",
    ["what", "result"],
)
SECRETS_REDACTED = Counter(
    "tilserve_edge_secrets_redacted_total", "Secrets found in requests and replaced, by kind.", ["kind"]
)
RESULTS = Counter(
    "tilserve_edge_results_total",
    "Finished results by kind and whether they met every rule.",
    ["kind", "outcome"],
)

CACHE_STATUS_NAMES = {
    edge_pb2.CACHE_STATUS_HIT: "hit",
    edge_pb2.CACHE_STATUS_MISS: "miss",
    edge_pb2.CACHE_STATUS_BYPASSED: "bypassed",
    edge_pb2.CACHE_STATUS_UNAVAILABLE: "unavailable",
}


@dataclass
class CallContext:
    """One call as the edge sees it: its id, when it arrived, its deadline, how long it waited for a slot."""

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


def cache_key(parts: dict[str, Any]) -> str:
    """SHA-256 (hex) of a canonical JSON form of `parts`."""
    canonical = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def sampling_fields(sampling: common_pb2.SamplingParams) -> dict[str, Any]:
    """The sampling fields the caller set (unset and zero differ), for cache keys."""
    return {f.name: value for f, value in sampling.ListFields()}


MAX_OWNER_CHARS = 200
MAX_QUERY_CHARS = 1000


def check_owner(owner: str, settings: EdgeSettings) -> str:
    """The owner a call acts for. With auth on, it is the caller's identity by default, and only an
    admin identity (EDGE_ADMIN_IDENTITIES) may name another owner."""
    if len(owner) > MAX_OWNER_CHARS:
        raise InvalidArgument(f"owner has {len(owner)} characters; at most {MAX_OWNER_CHARS}")
    if not settings.auth_enabled:
        return owner
    caller = caller_identity.get()
    if not owner:
        return caller
    if owner != caller and caller not in settings.admins:
        raise PermissionDenied(f"caller {caller!r} may only act as owner {caller!r}, not {owner!r}")
    return owner


def redact_text(text: str, found: list[str]) -> str:
    """`text` with its secrets replaced; the kinds of secrets found are appended to `found`."""
    result = redact(text)
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


def check_policy(policy: int) -> None:
    if policy not in edge_pb2.CachePolicy.values():
        raise InvalidArgument(f"cache_policy {policy} is unknown; use UNSPECIFIED, REFRESH or BYPASS")


def check_max_tokens(generation: edge_pb2.GenerationOverrides, limit: int) -> int | None:
    """The caller's max_tokens, if set and within `limit`."""
    if not generation.HasField("max_tokens"):
        return None
    value = generation.max_tokens
    if value < 1:
        raise InvalidArgument("generation.max_tokens must be at least 1 (leave it unset for the default)")
    if value > limit:
        raise InvalidArgument(f"generation.max_tokens is {value}; at most {limit} is allowed")
    return value


def check_ignore_eos(generation: edge_pb2.GenerationOverrides, *, allowed: bool) -> bool:
    """The caller's ignore_eos: a benchmark's way to get the same number of tokens from every request."""
    if generation.ignore_eos and not allowed:
        raise InvalidArgument(
            "generation.ignore_eos is for benchmarks: only GenerateTil takes it, and only on an edge started "
            "with EDGE_ALLOW_IGNORE_EOS=true"
        )
    return generation.ignore_eos


def resolve_max_tokens(requested: int | None, default: int, info: generator_pb2.GetModelInfoResponse) -> int:
    """The output budget: the caller's, or the default, never above what the model serves per request."""
    served = info.default_max_tokens or None
    if requested is not None:
        if served is not None and requested > served:
            raise InvalidArgument(
                f"generation.max_tokens is {requested}; the model {info.model!r} serves at most {served}"
            )
        return requested
    return min(default, served) if served else default


@dataclass(frozen=True)
class CacheLookup:
    status: int  # edge_pb2.CacheStatus
    value: dict[str, Any] | None = None
    notice: str | None = None


async def look_up(cache: ResultCache, namespace: str, key: str, policy: int, timeout_s: float) -> CacheLookup:
    """Reads the cache as the policy allows. Never raises: a cache problem is a status and a notice."""
    began = time.monotonic()
    if policy != edge_pb2.CACHE_POLICY_UNSPECIFIED:
        lookup = CacheLookup(edge_pb2.CACHE_STATUS_BYPASSED)
    else:
        try:
            raw = await cache.get(namespace, key, timeout=timeout_s)
        except DependencyUnavailable as exc:
            lookup = CacheLookup(
                edge_pb2.CACHE_STATUS_UNAVAILABLE, notice=f"cache unavailable ({exc}); generating without it"
            )
        else:
            value = _envelope(raw) if raw is not None else None
            if raw is not None and value is None:
                notice = "the cached entry could not be read; generating a new result"
                lookup = CacheLookup(edge_pb2.CACHE_STATUS_MISS, notice=notice)
            else:
                status = edge_pb2.CACHE_STATUS_HIT if value is not None else edge_pb2.CACHE_STATUS_MISS
                lookup = CacheLookup(status, value)
    status = CACHE_STATUS_NAMES[lookup.status]
    CACHE_LOOKUPS.labels(namespace, status).inc()
    CACHE_LOOKUP_SECONDS.labels(namespace, status).observe(time.monotonic() - began)
    return lookup


def _envelope(raw: str) -> dict[str, Any] | None:
    """A stored result, if `raw` is one this edge wrote: {"json": str, "model": str, "usage": {...}, ...}."""
    try:
        value = json.loads(raw)
        json.loads(value["json"])
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("model"), str):
        return None
    return value


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


def cached_usage(value: dict[str, Any]) -> common_pb2.TokenUsage:
    usage = value.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    return common_pb2.TokenUsage(
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
    )


def settle(task: asyncio.Future[Any]) -> None:
    """Cancels `task` if it still runs; otherwise marks its exception, if any, as seen."""
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()


@dataclass
class Opened:
    """Where a pipeline's output comes from: the cached value on a hit, else a generator stream that is a
    shared flight's (`listener`) or this call's own (`plan`)."""

    cache_status: int
    cached: Any = None
    stream: AsyncIterator[generator_pb2.GenerateResponse] | None = None
    listener: Listener | None = None
    plan: Plan | None = None
    joined: bool = False

    def used_plan(self) -> Plan | None:
        """The plan the stream was started with (a flight has its plan before its first response)."""
        return self.listener.flight.plan if self.listener is not None else self.plan

    def notices(self) -> list[str]:
        used = self.used_plan()
        return [*(used.notices if used is not None else ()), *([JOINED_NOTICE] if self.joined else [])]


async def open_generation(
    *,
    flights: SingleFlight,
    generator: TilGenerator,
    cache: ResultCache,
    namespace: str,
    key: str,
    policy: int,
    shared: bool,
    ctx: CallContext,
    cache_timeout_s: float,
    notices: list[str],
    search: Callable[[], Coroutine[Any, Any, Any]],
    plan: Callable[[Any], Plan],
) -> Opened:
    """Looks the key up while `search` runs; on a miss, joins an identical call's generation or starts one.

    Identical calls that miss the cache together share one generation (see flights.py). A call that joins
    before its own look-up reports what the first call's look-up found. Cache notices go to `notices`.
    """

    def generate(request: generator_pb2.GenerateRequest) -> AsyncIterator[generator_pb2.GenerateResponse]:
        return generator.generate(request, timeout=ctx.remaining())

    listener = flights.join(key, ctx.deadline) if shared else None
    if listener is not None:
        return Opened(listener.flight.cache_status, stream=listener, listener=listener, joined=True)
    # Search while the cache is read: a miss then waits for neither in turn.
    searching = asyncio.ensure_future(search())
    owns_search = True
    try:
        lookup = await look_up(cache, namespace, key, policy, ctx.bounded(cache_timeout_s))
        if lookup.notice:
            notices.append(lookup.notice)
        if lookup.value is not None:
            return Opened(lookup.status, cached=lookup.value)
        # Another call may have started the same generation while this one looked.
        listener = flights.join(key, ctx.deadline) if shared else None
        if listener is not None:
            return Opened(lookup.status, stream=listener, listener=listener, joined=True)

        async def prepare() -> Plan:
            return plan(await searching)

        if shared:
            listener = flights.start(
                key,
                ctx.deadline,
                prepare,
                generate,
                cache_status=lookup.status,
                cleanup=lambda: settle(searching),
            )
            owns_search = False
            return Opened(lookup.status, stream=listener, listener=listener)
        own = await prepare()
        return Opened(lookup.status, stream=generate(own.request), plan=own)
    finally:
        if owns_search:
            settle(searching)


class Background:
    """Best-effort writes (cache stores, index upserts) that must neither delay nor fail a stream."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, what: str, write: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(self._run(what, write))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _run(what: str, write: Coroutine[Any, Any, object]) -> None:
        try:
            await write
        except DependencyUnavailable as exc:
            BACKGROUND_WRITES.labels(what, "unavailable").inc()
            log.warning("%s skipped: %s", what, exc)
        except Exception:
            BACKGROUND_WRITES.labels(what, "error").inc()
            log.exception("%s failed", what)
        else:
            BACKGROUND_WRITES.labels(what, "ok").inc()

    async def drain(self, timeout_s: float | None = None) -> None:
        """Waits for the writes under way (at shutdown, and in tests)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)


@dataclass
class Outcome:
    """What one generator call produced, with the edge's own timings."""

    text: str = ""
    model: str = ""
    prompt_tokens: int = 0
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    usage: common_pb2.TokenUsage = field(default_factory=common_pb2.TokenUsage)
    queue_ms: float = 0.0
    first_token_ms: float = 0.0

    def timings(self, ctx: CallContext) -> common_pb2.Timings:
        total = ctx.elapsed_ms()
        return common_pb2.Timings(
            queue_ms=self.queue_ms, time_to_first_token_ms=self.first_token_ms or total, total_ms=total
        )


async def stream_generation(
    stream: AsyncIterator[generator_pb2.GenerateResponse],
    ctx: CallContext,
    started: Callable[[generator_pb2.GenerateStarted], edge_pb2.StreamStarted],
    outcome: Outcome,
) -> AsyncIterator[edge_pb2.StreamStarted | common_pb2.TextDelta]:
    """Streams one generation: our `started` (built once the generator's arrives), then the deltas.

    `stream` is the generator call (or a shared generation's listener); it is closed when this ends,
    however it ends. Fills `outcome` as it goes. Runs in the caller's task, so a client that leaves
    cancels the generator call (or leaves the shared generation).
    """
    async with closing(stream):
        first = await anext(aiter(stream), None)
        if first is None or not first.HasField("started"):
            raise Unavailable("the generator's stream did not begin with a started event")
        outcome.model = first.started.model
        outcome.prompt_tokens = first.started.prompt_tokens
        yield started(first.started)
        parts: list[str] = []
        finished: generator_pb2.GenerateFinished | None = None
        async for event in stream:
            kind = event.WhichOneof("event")
            if kind == "delta" and finished is None:
                if event.delta.text and not outcome.first_token_ms:
                    outcome.first_token_ms = ctx.elapsed_ms()
                parts.append(event.delta.text)
                yield event.delta
            elif kind == "finished":
                finished = event.finished
        if finished is None:
            raise Unavailable("the generator's stream ended without a finished event")
    outcome.text = "".join(parts)
    outcome.finish_reason = finished.finish_reason
    outcome.usage.CopyFrom(finished.usage)
    outcome.queue_ms = ctx.queued_s * 1000.0 + finished.timings.queue_ms


def parse_json_output(text: str) -> tuple[Any, str, list[Violation]]:
    """(parsed value, JSON text, problems) for model output that may be cut short or broken.

    The JSON text always parses: a truncated document is closed (see json_closer), and output that
    stops being JSON is cut where it does.
    """
    try:
        return json.loads(text), text, []
    except ValueError:
        pass
    problems: list[Violation] = []
    try:
        closed = close_json(text)
    except NotAJsonPrefix as exc:
        closed = close_json(text[: exc.position])
        problems.append(Violation(f"the output is not JSON from offset {exc.position} ({exc.reason})", True))
    return json.loads(closed), closed, problems


def closing_delta(streamed: str, json_text: str) -> common_pb2.TextDelta | None:
    """The text that completes the streamed output into `json_text`, when the fix only appended.

    Sent as a last delta (with no tokens), so that the deltas a client joins add up to valid JSON.
    """
    if len(json_text) > len(streamed) and json_text.startswith(streamed):
        return common_pb2.TextDelta(text=json_text[len(streamed) :], token_count=0)
    return None
