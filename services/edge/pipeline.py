"""The one pipeline: any output contract (contract.py) is run the same way.

    redact -> model and output budget -> cache key -> cache look-up while the context is searched
    (a hit is replayed) -> join an identical generation in progress, or plan one (prompt fitted to the
    model's context, JSON schema) -> generator stream -> close and check the JSON -> finished
    -> in the background, for complete results only: cache store and index upsert.

Requests are validated before this (each contract module's `job()`), so bad input costs nothing. The
cache and the retriever are optional: when either fails the result is still written and `started`
says what was skipped. The generator is essential: its errors reach the caller with their status.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import zoneinfo
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

from prometheus_client import Counter
from til.v1 import common_pb2, edge_pb2, generator_pb2

from services.edge.background import Background
from services.edge.cache import (
    Cached,
    CacheLookup,
    cache_key,
    envelope,
    look_up,
    lookups,
    sampling_fields,
    unwrap,
)
from services.edge.call import CallContext
from services.edge.checks import resolve_max_tokens
from services.edge.clients import DocumentStore, ResultCache, TilGenerator
from services.edge.config import EdgeSettings
from services.edge.contract import F, J, OutputContract
from services.edge.fitting import PromptFitter
from services.edge.flights import JOINED_NOTICE, Listener, Plan, SingleFlight
from services.edge.generation import Outcome, closing_delta, parse_json_output, stream_generation
from services.edge.nearcache import NearCache
from services.edge.recent import Recent
from services.edge.redaction import redaction_notice
from services.edge.retrieval import Retrieval, search
from services.edge.til_format import Violation

RESULTS = Counter(
    "tilserve_edge_results_total",
    "Finished results by kind and whether they met every rule.",
    ["kind", "outcome"],
)
_results = functools.cache(RESULTS.labels)  # one child per (kind, outcome), looked up once

Event: TypeAlias = (
    edge_pb2.StreamStarted | common_pb2.TextDelta | edge_pb2.TilFinished | edge_pb2.QuestionsFinished
)


@dataclass
class Opened:
    """Where a call's output comes from: the cached result on a hit, else a generator stream that is a
    shared flight's (`listener`) or this call's own (`plan`)."""

    cache_status: int
    cached: Cached | None = None
    stream: AsyncIterator[generator_pb2.GenerateResponse] | None = None
    listener: Listener | None = None
    plan: Plan | None = None
    joined: bool = False
    expires_in_s: float | None = None  # of a hit: how long the cacher keeps it

    def used_plan(self) -> Plan:
        """The plan the stream was started with (a flight has its plan before its first response)."""
        plan = self.listener.flight.plan if self.listener is not None else self.plan
        assert plan is not None
        return plan

    def notices(self) -> list[str]:
        return [*self.used_plan().notices, *([JOINED_NOTICE] if self.joined else [])]


@dataclass(frozen=True)
class Replay:
    """A cached result made ready to send: its delta and its finished message (all but the timings),
    parsed and checked once, however often it is replayed."""

    cached: Cached
    delta: common_pb2.TextDelta
    finished: edge_pb2.TilFinished | edge_pb2.QuestionsFinished

    @property
    def size(self) -> int:
        return self.delta.ByteSize() + self.finished.ByteSize()


class Pipeline:
    def __init__(
        self,
        generator: TilGenerator,
        store: DocumentStore,
        cache: ResultCache,
        settings: EdgeSettings,
        *,
        background: Background | None = None,
        today: Callable[[], datetime.date] | None = None,
    ) -> None:
        self._generator = generator
        self._store = store
        self._cache = cache
        self._settings = settings
        self.background = background or Background()
        self._flights = SingleFlight(slack_s=settings.shared_deadline_slack_s)
        self._reads: dict[tuple[str, str], asyncio.Future[CacheLookup]] = {}
        self._fitter = PromptFitter(generator, self.background)
        self.near: NearCache[Replay] = NearCache(
            max_entries=settings.near_cache_entries,
            max_bytes=settings.near_cache_max_bytes,
            max_age_s=settings.near_cache_max_age_s,
        )
        zone = zoneinfo.ZoneInfo(settings.timezone)
        # The default date of a result: today in the configured time zone.
        self.today = today or (lambda: datetime.datetime.now(zone).date())

    async def run(self, contract: OutputContract[J, F], job: J, ctx: CallContext) -> AsyncIterator[Event]:
        """Streams `started`, deltas and the finished message for a validated job."""
        job, redacted = contract.redact(job)
        notices = contract.notices(job)
        if redaction := redaction_notice(redacted):
            notices.append(redaction)
        info = await self._generator.model_info(timeout=ctx.remaining())
        max_tokens = resolve_max_tokens(job.max_tokens, self._settings.default_max_tokens, info)
        key = pipeline_key(contract, job, model=info.model, max_tokens=job.max_tokens)

        if job.policy == edge_pb2.CACHE_POLICY_UNSPECIFIED and self.near.enabled:
            near = self.near.get(contract.namespace, key)
            if near is not None:  # a result the cacher holds, without asking it again
                lookups(contract.namespace, "near_hit").inc()
                for event in self._replay(contract, near, ctx, notices):
                    yield event
                return
        elif job.policy == edge_pb2.CACHE_POLICY_REFRESH:
            self.near.discard(contract.namespace, key)

        async def plan(retrieval: Retrieval) -> Plan:
            return await self._plan(contract, job, retrieval, max_tokens, ctx)

        opened = await self._open(contract, job, key, plan, ctx, notices)
        if opened.cached is not None:
            replay = self._ready(contract, job, opened.cached)
            if self.near.enabled:
                self.near.put(
                    contract.namespace, key, replay, size=replay.size, expires_in_s=opened.expires_in_s
                )
            for event in self._replay(contract, replay, ctx, notices):
                yield event
            return
        assert opened.stream is not None

        def started(gen: generator_pb2.GenerateStarted) -> edge_pb2.StreamStarted:
            used = opened.used_plan()
            return edge_pb2.StreamStarted(
                request_id=ctx.request_id,
                model=gen.model,
                cache_status=opened.cache_status,
                retrieval_status=used.retrieval.status,
                sources=used.sources,
                prompt_version=contract.prompt_version,
                prompt_tokens=gen.prompt_tokens,
                notices=[*notices, *opened.notices()],
            )

        outcome = Outcome()
        async for event in stream_generation(opened.stream, ctx, started, outcome):
            yield event

        document, json_text, problems = parse_json_output(outcome.text)
        truncated = outcome.finish_reason == common_pb2.FINISH_REASON_LENGTH
        retrieval = opened.used_plan().retrieval
        violations = [*problems, *contract.check(document, job, truncated=truncated, retrieval=retrieval)]
        complete = outcome.finish_reason == common_pb2.FINISH_REASON_STOP and not any(
            v.enforced for v in violations
        )
        RESULTS.labels(contract.kind, "complete" if complete else "incomplete").inc()
        if closing := closing_delta(outcome.text, json_text):
            yield closing
        result_id = contract.result_id(job, key, document) if complete and self._settings.index_tils else ""
        finished = contract.finished(document, json_text, result_id)
        _fill(finished, outcome.finish_reason, outcome.usage, outcome.timings(ctx), violations)
        # A shared result is stored and indexed once, by whichever listener gets here first.
        if complete and (opened.listener is None or opened.listener.flight.claim_writes()):
            # Only under the key's model: after a redeploy the key names the model no longer serving.
            if job.policy != edge_pb2.CACHE_POLICY_BYPASS and outcome.model == info.model:
                self._store_result(contract, job, key, json_text, outcome, result_id)
            if self._settings.index_tils:
                self._index(contract, finished, job, result_id, outcome.model)
        yield finished

    async def _open(
        self,
        contract: OutputContract[J, F],
        job: J,
        key: str,
        plan: Callable[[Retrieval], Any],
        ctx: CallContext,
        notices: list[str],
    ) -> Opened:
        """Looks the key up while the context is searched; on a miss, joins an identical call's
        generation or starts one.

        Identical calls that miss the cache together share one generation (see flights.py). A call that
        joins before its own look-up reports what the first call's look-up found. Cache notices go to
        `notices`.
        """
        s = self._settings
        shared = s.share_identical and job.policy == edge_pb2.CACHE_POLICY_UNSPECIFIED
        listener = self._flights.join(key, ctx.deadline) if shared else None
        if listener is not None:
            return Opened(listener.flight.cache_status, stream=listener, listener=listener, joined=True)
        # Search while the cache is read: a miss then waits for neither in turn.
        searching = asyncio.ensure_future(
            search(
                self._store,
                contract.search(job, key),
                owner=job.owner,
                timeout=ctx.bounded(s.retrieval_timeout_s),
                label=contract.kind,
            )
        )
        owns_search = True
        try:
            lookup = await self._look_up(contract.namespace, key, job.policy, ctx.bounded(s.cache_timeout_s))
            if lookup.notice:
                notices.append(lookup.notice)
            if lookup.value is not None:
                return Opened(lookup.status, cached=lookup.value, expires_in_s=lookup.expires_in_s)
            # Another call may have started the same generation while this one looked.
            listener = self._flights.join(key, ctx.deadline) if shared else None
            if listener is not None:
                return Opened(lookup.status, stream=listener, listener=listener, joined=True)

            async def prepare() -> Plan:
                planned: Plan = await plan(await searching)
                return planned

            def generate(
                request: generator_pb2.GenerateRequest,
            ) -> AsyncIterator[generator_pb2.GenerateResponse]:
                return self._generator.generate(request, timeout=ctx.remaining())

            if shared:
                listener = self._flights.start(
                    key,
                    ctx.deadline,
                    prepare,
                    generate,
                    cache_status=lookup.status,
                    cleanup=lambda: _settle(searching),
                )
                owns_search = False
                return Opened(lookup.status, stream=listener, listener=listener)
            own = await prepare()
            return Opened(lookup.status, stream=generate(own.request), plan=own)
        finally:
            if owns_search:
                _settle(searching)

    async def _look_up(self, namespace: str, key: str, policy: int, timeout_s: float) -> CacheLookup:
        """The cache read for `key`, shared by the calls that ask while it is under way: a burst of
        identical requests (a near cache still cold) costs the cacher one read, not one per call."""
        if policy != edge_pb2.CACHE_POLICY_UNSPECIFIED:
            return await look_up(self._cache, namespace, key, policy, timeout_s)
        address = (namespace, key)
        reading = self._reads.get(address)
        if reading is None:
            reading = asyncio.ensure_future(look_up(self._cache, namespace, key, policy, timeout_s))
            self._reads[address] = reading
            reading.add_done_callback(lambda _: self._reads.pop(address, None))
        # Shielded: a caller that leaves does not cancel the read the others wait for.
        return await asyncio.shield(reading)

    async def _plan(
        self,
        contract: OutputContract[J, F],
        job: J,
        retrieval: Retrieval,
        max_tokens: int,
        ctx: CallContext,
    ) -> Plan:
        """The generator request with the context found, and what to tell the caller about it."""
        notices = [retrieval.notice] if retrieval.notice else []
        chat, body, budget = await self._fitter.fit(contract, job, retrieval, max_tokens, ctx, notices)
        request = generator_pb2.GenerateRequest(
            request_id=ctx.request_id,
            chat=chat,
            sampling=job.sampling,
            stopping=common_pb2.StoppingCriteria(max_tokens=max_tokens, ignore_eos=job.ignore_eos),
            output=generator_pb2.OutputFormat(
                json_schema=json.dumps(contract.schema(job, budget, body), ensure_ascii=False)
            ),
        )
        sources = tuple(contract.source(found) for found in retrieval.found)
        return Plan(request, retrieval, sources, tuple(notices))

    def _ready(self, contract: OutputContract[J, F], job: J, cached: Cached) -> Replay:
        """`cached` parsed and checked for `job` (whose key it was found under), ready to replay."""
        document = json.loads(cached.json_text)
        violations = contract.check(document, job, truncated=False, retrieval=Retrieval())
        finished = contract.finished(document, cached.json_text, cached.result_id)
        _fill(finished, common_pb2.FINISH_REASON_STOP, cached.usage, common_pb2.Timings(), violations)
        delta = common_pb2.TextDelta(text=cached.json_text, token_count=cached.usage.completion_tokens)
        return Replay(cached, delta, finished)

    def _replay(
        self, contract: OutputContract[J, F], replay: Replay, ctx: CallContext, notices: list[str]
    ) -> Iterator[Event]:
        cached = replay.cached
        yield edge_pb2.StreamStarted(
            request_id=ctx.request_id,
            model=cached.model,
            cache_status=edge_pb2.CACHE_STATUS_HIT,
            retrieval_status=edge_pb2.RETRIEVAL_STATUS_SKIPPED,
            prompt_version=contract.prompt_version,
            prompt_tokens=cached.usage.prompt_tokens,
            notices=notices,
        )
        first_token_ms = ctx.elapsed_ms()
        yield replay.delta
        _results(contract.kind, "cached").inc()
        finished = type(replay.finished)()
        finished.CopyFrom(replay.finished)
        finished.timings.queue_ms = ctx.queued_s * 1000.0
        finished.timings.time_to_first_token_ms = first_token_ms
        finished.timings.total_ms = ctx.elapsed_ms()
        yield finished

    def _store_result(
        self,
        contract: OutputContract[J, F],
        job: J,
        key: str,
        json_text: str,
        outcome: Outcome,
        result_id: str,
    ) -> None:
        s = self._settings
        extra = {"til_id": result_id} if result_id else {}
        value = envelope(json_text=json_text, model=outcome.model, usage=outcome.usage, **extra)

        async def store() -> None:
            await self._cache.put(
                contract.namespace, key, value, ttl_s=s.cache_ttl_s, timeout=s.write_timeout_s
            )
            # Near only once the cacher has it, as a hit there would read it back.
            cached = unwrap(value) if self.near.enabled else None
            if cached is not None:
                replay = self._ready(contract, job, cached)
                self.near.put(
                    contract.namespace, key, replay, size=replay.size, expires_in_s=s.cache_ttl_s or None
                )

        self.background.spawn(f"{contract.kind} cache store", store())

    def _index(self, contract: OutputContract[J, F], finished: F, job: J, result_id: str, model: str) -> None:
        documents = contract.documents(finished, job, result_id=result_id, model=model)
        if documents:
            self.background.spawn(
                f"{contract.kind} index upsert",
                self._store.upsert(documents, timeout=self._settings.write_timeout_s),
            )


def pipeline_key(contract: OutputContract[J, F], job: J, *, model: str, max_tokens: int | None) -> str:
    """Everything that shapes a result: the contract's fields, the model, the sampling, the budget
    asked for, the prompt version, and the owner (context is per owner, and results are not shared
    across owners)."""
    return _keys(
        (
            tuple(contract.key_fields(job).items()),
            contract.prompt_version,
            model,
            # Its wire form: unlike a dict of the fields set, hashable, and 0.0 and -0.0 differ here too.
            job.sampling.SerializeToString(deterministic=True),
            max_tokens,
            job.owner,
            job.ignore_eos,
        )
    )


def _key(parts: tuple[tuple[tuple[str, Any], ...], str, str, bytes, int | None, str, bool]) -> str:
    fields, prompt_version, model, sampling, max_tokens, owner, ignore_eos = parts
    return cache_key(
        {
            **dict(fields),
            "prompt_version": prompt_version,
            "model": model,
            "sampling": sampling_fields(common_pb2.SamplingParams.FromString(sampling)),
            "max_tokens": max_tokens,
            "owner": owner,
            # Only when set, so that the keys of every other request stay as they were.
            **({"ignore_eos": True} if ignore_eos else {}),
        }
    )


# The keys of the requests seen lately: a request asked again (a cache hit) skips the JSON and the hash.
# Safe: `_key` is a pure function of its parts (text and integers; the sampling as its bytes).
_keys = Recent(_key)


def _fill(
    finished: F,
    finish_reason: int,
    usage: common_pb2.TokenUsage,
    timings: common_pb2.Timings,
    violations: list[Violation],
) -> None:
    finished.finish_reason = finish_reason  # type: ignore[assignment]
    finished.usage.CopyFrom(usage)
    finished.timings.CopyFrom(timings)
    finished.violations.extend(v.message for v in violations)


def _settle(task: asyncio.Future[Any]) -> None:
    """Cancels `task` if it still runs; otherwise marks its exception, if any, as seen."""
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()
