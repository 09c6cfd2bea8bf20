"""TilPipeline: a git diff in, a Korean TIL streamed out; and revisions of a TIL.

GenerateTil: validate -> model info -> cache key -> cache look-up (a hit is replayed) -> related earlier
TILs from the retriever -> prompt -> generator stream -> close and check the JSON -> finished. Cache
stores and index upserts run after the finished message, in the background, and only for complete
results. The cache and the retriever are optional: when either fails the TIL is still written and
`started` says what was skipped.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
import zoneinfo
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeAlias

from til.v1 import common_pb2, edge_pb2, generator_pb2, retriever_pb2

from services.common.errors import InvalidArgument
from services.edge.clients import DependencyUnavailable, DocumentStore, ResultCache, TilGenerator
from services.edge.config import EdgeSettings
from services.edge.diffs import changed_files, changed_identifiers, fit_diff, guess_language, looks_like_diff
from services.edge.flights import Plan, SingleFlight
from services.edge.prompt import (
    REVISE_PROMPT_VERSION,
    TIL_PROMPT_VERSION,
    RelatedDocument,
    revise_chat,
    til_chat,
)
from services.edge.stages import (
    MAX_QUERY_CHARS,
    RESULTS,
    RETRIEVALS,
    Background,
    CallContext,
    Outcome,
    cache_key,
    cached_usage,
    check_ignore_eos,
    check_max_tokens,
    check_owner,
    check_policy,
    closing_delta,
    envelope,
    open_generation,
    parse_json_output,
    redact_text,
    redaction_notice,
    resolve_max_tokens,
    sampling_fields,
    stream_generation,
)
from services.edge.til_format import check_til, content_budget, til_schema, to_til

TIL_NAMESPACE = "til"
TilEvent: TypeAlias = edge_pb2.StreamStarted | common_pb2.TextDelta | edge_pb2.TilFinished

MAX_LANGUAGE_CHARS = 40
# Tokens the chat template adds around the messages, beyond the estimate from their characters.
CHAT_TEMPLATE_TOKENS = 64
MAX_INSTRUCTION_CHARS = 4000
MAX_HISTORY_TURNS = 20
MAX_TURN_CHARS = 20_000
MAX_TIL_CHARS = 20_000

_LANGUAGE = re.compile(rf"[A-Za-z0-9+#._ -]{{1,{MAX_LANGUAGE_CHARS}}}")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_TITLE_DATE = re.compile(r"^([0-9]{4}-[0-9]{2}-[0-9]{2}) TIL\b")
_HEADING_DATE = re.compile(r"^# ([0-9]{4}-[0-9]{2}-[0-9]{2}) TIL\b")


def _kib(size: int) -> str:
    return f"{size / 1024:.1f} KiB ({size} bytes)"


def parse_date(value: str, field: str = "date") -> str:
    if not _DATE.fullmatch(value):
        raise InvalidArgument(f"{field} {value!r} is not in YYYY-MM-DD form, e.g. 2024-05-01")
    try:
        datetime.date.fromisoformat(value)
    except ValueError:
        raise InvalidArgument(f"{field} {value!r} is not a real calendar date") from None
    return value


@dataclass(frozen=True)
class TilJob:
    """A validated GenerateTil request."""

    diff: str
    commit_messages: tuple[str, ...]
    language: str
    language_guessed: bool
    date: str
    files: tuple[str, ...]
    sampling: common_pb2.SamplingParams
    max_tokens: int | None
    policy: int
    owner: str
    # Benchmarks only (EDGE_ALLOW_IGNORE_EOS): generate until max_tokens.
    ignore_eos: bool = False


@dataclass(frozen=True)
class Revision:
    """A validated ReviseTil request."""

    current_json: str
    date: str
    history: tuple[tuple[str, str], ...]
    instruction: str
    sampling: common_pb2.SamplingParams
    max_tokens: int | None
    owner: str


class TilPipeline:
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
        zone = zoneinfo.ZoneInfo(settings.timezone)
        self._today = today or (lambda: datetime.datetime.now(zone).date())

    # --- validation -------------------------------------------------------------------------------

    def job(self, request: edge_pb2.GenerateTilRequest) -> TilJob:
        """Checks a request before any other work; raises InvalidArgument saying what to fix."""
        s = self._settings
        diff = request.diff
        if not diff.strip():
            raise InvalidArgument("diff is empty: pass the output of `git diff`")
        size = len(diff.encode("utf-8"))
        if size > s.max_diff_bytes:
            raise InvalidArgument(
                f"diff is {_kib(size)}; the limit is {_kib(s.max_diff_bytes)}: "
                "split the change or leave generated and vendored files out"
            )
        if not looks_like_diff(diff):
            raise InvalidArgument(
                "diff is not a unified diff (it has no 'diff --git', '---'/'+++' or '@@' lines): "
                "pass the output of `git diff` or `git show`"
            )
        if len(request.commit_messages) > s.max_commit_messages:
            raise InvalidArgument(
                f"{len(request.commit_messages)} commit messages; at most {s.max_commit_messages}"
            )
        for i, message in enumerate(request.commit_messages):
            if len(message) > s.max_commit_message_chars:
                raise InvalidArgument(
                    f"commit_messages[{i}] has {len(message)} characters; at most {s.max_commit_message_chars}"
                )
        language = request.language.strip()
        if language and not _LANGUAGE.fullmatch(language):
            raise InvalidArgument(
                "language must be a short name such as 'python' or 'c++' "
                f"(letters, digits, spaces and + # . _ -; at most {MAX_LANGUAGE_CHARS} characters)"
            )
        date = parse_date(request.date.strip()) if request.date.strip() else self._today().isoformat()
        check_policy(request.cache_policy)
        max_tokens = check_max_tokens(request.generation, s.max_tokens_limit)
        owner = check_owner(request.owner, s)
        files = tuple(changed_files(diff))
        guessed = not language
        return TilJob(
            diff=diff,
            commit_messages=tuple(m.strip() for m in request.commit_messages if m.strip()),
            language=guess_language(list(files)) if guessed else language,
            language_guessed=guessed,
            date=date,
            files=files,
            sampling=request.generation.sampling,
            max_tokens=max_tokens,
            policy=request.cache_policy,
            owner=owner,
            ignore_eos=check_ignore_eos(request.generation, allowed=s.allow_ignore_eos),
        )

    def revision(self, request: edge_pb2.ReviseTilRequest) -> Revision:
        s = self._settings
        til = request.til
        if not til.title.strip() or not til.content.strip():
            raise InvalidArgument("til needs its title and content")
        if len(til.title) + len(til.content) > MAX_TIL_CHARS:
            raise InvalidArgument(f"til is longer than {MAX_TIL_CHARS} characters")
        found = _TITLE_DATE.match(til.title) or _HEADING_DATE.match(til.content)
        if found is None:
            raise InvalidArgument(
                "til.title must start with 'YYYY-MM-DD TIL' (or til.content with '# YYYY-MM-DD TIL') "
                "so that the revision keeps the TIL's date"
            )
        date = parse_date(found.group(1), "the TIL's date")
        instruction = request.instruction.strip()
        if not instruction:
            raise InvalidArgument("instruction is empty: say what to change")
        if len(instruction) > MAX_INSTRUCTION_CHARS:
            raise InvalidArgument(
                f"instruction has {len(instruction)} characters; at most {MAX_INSTRUCTION_CHARS}"
            )
        turns = list(request.history)
        if len(turns) > MAX_HISTORY_TURNS:
            raise InvalidArgument(f"history has {len(turns)} turns; at most {MAX_HISTORY_TURNS}")
        for i, turn in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if turn.role != expected:
                raise InvalidArgument(
                    f"history[{i}].role is {turn.role!r}, expected {expected!r}: "
                    "turns alternate user, assistant, starting with user"
                )
            if not turn.content.strip() or len(turn.content) > MAX_TURN_CHARS:
                raise InvalidArgument(f"history[{i}].content must hold 1 to {MAX_TURN_CHARS} characters")
        if turns and turns[-1].role != "assistant":
            raise InvalidArgument(
                "history must end with an assistant turn; put the new request in instruction"
            )
        check_ignore_eos(request.generation, allowed=False)
        current = {"title": til.title, "keywords": list(til.keywords), "content": til.content}
        return Revision(
            current_json=json.dumps(current, ensure_ascii=False),
            date=date,
            history=tuple((t.role, t.content) for t in turns),
            instruction=instruction,
            sampling=request.generation.sampling,
            max_tokens=check_max_tokens(request.generation, s.max_tokens_limit),
            owner=check_owner(request.owner, s),
        )

    # --- GenerateTil ------------------------------------------------------------------------------

    async def generate(self, job: TilJob, ctx: CallContext) -> AsyncIterator[TilEvent]:
        """Streams a TIL for a request that `job()` validated."""
        s = self._settings
        job, redacted = self._redacted(job)
        info = await self._generator.model_info(timeout=ctx.remaining())
        max_tokens = resolve_max_tokens(job.max_tokens, s.default_max_tokens, info)
        key = self.cache_key(
            job,
            model=info.model,
            max_tokens=job.max_tokens,
            content_chars=content_budget(max_tokens, s.output_chars_per_token),
        )
        til_id = f"til-{key[:32]}" if s.index_tils else ""
        notices: list[str] = []
        if job.language_guessed and job.language:
            notices.append(f"language guessed from the file names: {job.language}")
        if redaction := redaction_notice(redacted):
            notices.append(redaction)

        opened = await open_generation(
            flights=self._flights,
            generator=self._generator,
            cache=self._cache,
            namespace=TIL_NAMESPACE,
            key=key,
            policy=job.policy,
            shared=s.share_identical and job.policy == edge_pb2.CACHE_POLICY_UNSPECIFIED,
            ctx=ctx,
            cache_timeout_s=s.cache_timeout_s,
            notices=notices,
            search=lambda: self._related_tils(job, ctx, exclude=til_id),
            plan=lambda context: self._plan(job, info, max_tokens, ctx, context),
        )
        if opened.cached is not None:
            async for event in self._replay(opened.cached, job.date, ctx, notices):
                yield event
            return
        assert opened.stream is not None
        listener = opened.listener

        def started(gen: generator_pb2.GenerateStarted) -> edge_pb2.StreamStarted:
            used = opened.used_plan()
            assert used is not None  # a flight has its plan before its first response
            return edge_pb2.StreamStarted(
                request_id=ctx.request_id,
                model=gen.model,
                cache_status=opened.cache_status,
                retrieval_status=used.retrieval_status,
                sources=used.sources,
                prompt_version=TIL_PROMPT_VERSION,
                prompt_tokens=gen.prompt_tokens,
                notices=[*notices, *opened.notices()],
            )

        outcome = Outcome()
        async for event in stream_generation(opened.stream, ctx, started, outcome):
            yield event
        closing, finished, complete = self._finish(
            outcome, job.date, ctx, diff=job.diff, language=job.language
        )
        if closing is not None:
            yield closing
        if complete:
            if til_id:
                finished.til_id = til_id
            # A shared result is stored and indexed once, by whichever listener gets here first.
            if listener is None or listener.flight.claim_writes():
                # Only under the key's model: after a redeploy the key names the model no longer serving.
                if job.policy != edge_pb2.CACHE_POLICY_BYPASS and outcome.model == info.model:
                    value = envelope(
                        json_text=finished.til_json, model=outcome.model, usage=outcome.usage, til_id=til_id
                    )
                    self.background.spawn(
                        "til cache store",
                        self._cache.put(
                            TIL_NAMESPACE, key, value, ttl_s=s.cache_ttl_s, timeout=s.write_timeout_s
                        ),
                    )
                if til_id:
                    self._index(finished.til, til_id, job.owner, job.language, job.date, outcome.model)
        yield finished

    def _plan(
        self,
        job: TilJob,
        info: generator_pb2.GetModelInfoResponse,
        max_tokens: int,
        ctx: CallContext,
        context: tuple[int, list[edge_pb2.Source], list[RelatedDocument], str | None],
    ) -> Plan:
        """The generator request for `job` with the related TILs found, and what to tell the caller."""
        status, sources, related, notice = context
        notices = [notice] if notice else []
        request = generator_pb2.GenerateRequest(
            request_id=ctx.request_id,
            chat=self._fitted_chat(job, related, info, max_tokens, notices),
            sampling=job.sampling,
            stopping=common_pb2.StoppingCriteria(max_tokens=max_tokens, ignore_eos=job.ignore_eos),
            output=generator_pb2.OutputFormat(
                json_schema=json.dumps(
                    til_schema(
                        job.date,
                        content_budget(max_tokens, self._settings.output_chars_per_token),
                        diff=job.diff,
                        language=job.language,
                    ),
                    ensure_ascii=False,
                )
            ),
        )
        return Plan(request, status, tuple(sources), tuple(notices))

    @staticmethod
    def _redacted(job: TilJob) -> tuple[TilJob, list[str]]:
        """The job with secrets replaced in the diff and commit messages, and the kinds found.

        Everything downstream (cache key and value, retrieval query, prompt, index) sees only this."""
        found: list[str] = []
        diff = redact_text(job.diff, found)
        messages = tuple(redact_text(m, found) for m in job.commit_messages)
        if not found:
            return job, found
        return dataclasses.replace(job, diff=diff, commit_messages=messages), found

    @staticmethod
    def cache_key(
        job: TilJob, *, model: str, max_tokens: int | None, content_chars: int | None = None
    ) -> str:
        """Everything that shapes the result: the request, the model, the prompt version and the content
        budget (with the diff, date and language, what the grammar is built from)."""
        return cache_key(
            {
                "content_chars": content_chars,
                "prompt_version": TIL_PROMPT_VERSION,
                "model": model,
                "diff": job.diff,
                "commit_messages": list(job.commit_messages),
                "language": job.language,
                "date": job.date,
                "sampling": sampling_fields(job.sampling),
                "max_tokens": max_tokens,
                # Retrieval context is per owner, and one owner's TILs are not served to another.
                "owner": job.owner,
                # Only when set, so that the keys of every other request stay as they were.
                **({"ignore_eos": True} if job.ignore_eos else {}),
            }
        )

    async def _replay(
        self, value: dict[str, object], date: str, ctx: CallContext, notices: list[str]
    ) -> AsyncIterator[TilEvent]:
        til_json = str(value["json"])
        usage = cached_usage(value)
        yield edge_pb2.StreamStarted(
            request_id=ctx.request_id,
            model=str(value["model"]),
            cache_status=edge_pb2.CACHE_STATUS_HIT,
            retrieval_status=edge_pb2.RETRIEVAL_STATUS_SKIPPED,
            prompt_version=TIL_PROMPT_VERSION,
            prompt_tokens=usage.prompt_tokens,
            notices=notices,
        )
        first_token_ms = ctx.elapsed_ms()
        yield common_pb2.TextDelta(text=til_json, token_count=usage.completion_tokens)
        document = json.loads(til_json)
        violations = check_til(document, date=date)
        RESULTS.labels("til", "cached").inc()
        yield edge_pb2.TilFinished(
            til=to_til(document),
            til_json=til_json,
            finish_reason=common_pb2.FINISH_REASON_STOP,
            usage=usage,
            timings=common_pb2.Timings(
                queue_ms=ctx.queued_s * 1000.0,
                time_to_first_token_ms=first_token_ms,
                total_ms=ctx.elapsed_ms(),
            ),
            violations=[v.message for v in violations],
            til_id=str(value.get("til_id") or ""),
        )

    async def _related_tils(
        self, job: TilJob, ctx: CallContext, *, exclude: str
    ) -> tuple[int, list[edge_pb2.Source], list[RelatedDocument], str | None]:
        """(retrieval status, sources, what the prompt shows of them, notice)."""
        s = self._settings
        if s.retrieval_top_k == 0:
            return edge_pb2.RETRIEVAL_STATUS_SKIPPED, [], [], None
        request = retriever_pb2.SearchDocumentsRequest(
            query=retrieval_query(job),
            # One more than needed, in case this very TIL (an earlier REFRESH) is among the hits.
            top_k=s.retrieval_top_k + 1,
            filter=retriever_pb2.SearchFilter(kinds=[retriever_pb2.DOCUMENT_KIND_TIL], owner=job.owner),
        )
        try:
            hits = await self._store.search(request, timeout=ctx.bounded(s.retrieval_timeout_s))
        except DependencyUnavailable as exc:
            RETRIEVALS.labels("til", "unavailable").inc()
            notice = f"retriever unavailable ({exc}); writing without related TILs"
            return edge_pb2.RETRIEVAL_STATUS_UNAVAILABLE, [], [], notice
        RETRIEVALS.labels("til", "ok").inc()
        hits = [h for h in hits if h.document.id != exclude][: s.retrieval_top_k]
        sources = [
            edge_pb2.Source(id=h.document.id, kind=h.document.kind, title=h.document.title, score=h.score)
            for h in hits
        ]
        related = [
            RelatedDocument(
                title=h.document.title or h.document.text[:80], keywords=tuple(h.document.tags[:3])
            )
            for h in hits
        ]
        return edge_pb2.RETRIEVAL_STATUS_OK, sources, related, None

    def _fitted_chat(
        self,
        job: TilJob,
        related: list[RelatedDocument],
        info: generator_pb2.GetModelInfoResponse,
        max_tokens: int,
        notices: list[str],
    ) -> generator_pb2.ChatMessages:
        """The chat, with the diff cut to what the model's context can hold next to the output budget."""

        def chat(diff: str) -> generator_pb2.ChatMessages:
            return til_chat(
                diff=diff,
                date=job.date,
                language=job.language,
                commit_messages=job.commit_messages,
                related=related,
            )

        if not info.max_model_len:
            return chat(job.diff)
        per_token = self._settings.prompt_chars_per_token
        frame_tokens = sum(len(m.content) for m in chat("").messages) / per_token + CHAT_TEMPLATE_TOKENS
        room_tokens = info.max_model_len - max_tokens - frame_tokens
        if room_tokens < 1:
            raise InvalidArgument(
                f"an output budget of {max_tokens} tokens leaves no room for the diff in the model's "
                f"{info.max_model_len}-token context: ask for fewer generation.max_tokens"
            )
        fitted = fit_diff(job.diff, int(room_tokens * per_token))
        if fitted.trimmed:
            left_out = f"; left out: {', '.join(fitted.omitted_files[:10])}" if fitted.omitted_files else ""
            more = len(fitted.omitted_files) - 10
            notices.append(
                f"the diff was cut to {len(fitted.text)} of {len(job.diff)} characters to fit the model's "
                f"context{left_out}{f' and {more} more' if more > 0 else ''}"
            )
        return chat(fitted.text)

    def _finish(
        self,
        outcome: Outcome,
        date: str,
        ctx: CallContext,
        *,
        diff: str | None = None,
        language: str | None = None,
    ) -> tuple[common_pb2.TextDelta | None, edge_pb2.TilFinished, bool]:
        """(delta that closes the streamed JSON, if one can, finished message, complete?)."""
        document, til_json, problems = parse_json_output(outcome.text)
        truncated = outcome.finish_reason == common_pb2.FINISH_REASON_LENGTH
        violations = [
            *problems,
            *check_til(document, date=date, truncated=truncated, diff=diff, language=language),
        ]
        complete = outcome.finish_reason == common_pb2.FINISH_REASON_STOP and not any(
            v.enforced for v in violations
        )
        RESULTS.labels("til", "complete" if complete else "incomplete").inc()
        finished = edge_pb2.TilFinished(
            til=to_til(document),
            til_json=til_json,
            finish_reason=outcome.finish_reason,
            usage=outcome.usage,
            timings=outcome.timings(ctx),
            violations=[v.message for v in violations],
        )
        return closing_delta(outcome.text, til_json), finished, complete

    def _index(
        self, til: edge_pb2.Til, til_id: str, owner: str, language: str, date: str, model: str
    ) -> None:
        document = retriever_pb2.Document(
            id=til_id,
            kind=retriever_pb2.DOCUMENT_KIND_TIL,
            text=til.content,
            title=til.title,
            owner=owner,
            language=language,
            tags=list(til.keywords),
            attributes={"date": date, "model": model},
        )
        self.background.spawn(
            "til index upsert", self._store.upsert([document], timeout=self._settings.write_timeout_s)
        )

    # --- ReviseTil --------------------------------------------------------------------------------

    async def revise(self, revision: Revision, ctx: CallContext) -> AsyncIterator[TilEvent]:
        """Streams the revised TIL for a request that `revision()` validated."""
        s = self._settings
        revision, redacted = self._redacted_revision(revision)
        notice = redaction_notice(redacted)
        info = await self._generator.model_info(timeout=ctx.remaining())
        max_tokens = resolve_max_tokens(revision.max_tokens, s.default_max_tokens, info)
        generate_request = generator_pb2.GenerateRequest(
            request_id=ctx.request_id,
            chat=revise_chat(
                current_til_json=revision.current_json,
                date=revision.date,
                history=revision.history,
                instruction=revision.instruction,
            ),
            sampling=revision.sampling,
            stopping=common_pb2.StoppingCriteria(max_tokens=max_tokens),
            output=generator_pb2.OutputFormat(
                json_schema=json.dumps(
                    til_schema(
                        revision.date, content_budget(max_tokens, self._settings.output_chars_per_token)
                    ),
                    ensure_ascii=False,
                )
            ),
        )

        def started(gen: generator_pb2.GenerateStarted) -> edge_pb2.StreamStarted:
            return edge_pb2.StreamStarted(
                request_id=ctx.request_id,
                model=gen.model,
                # Revisions follow a conversation; they are neither looked up nor stored.
                cache_status=edge_pb2.CACHE_STATUS_BYPASSED,
                retrieval_status=edge_pb2.RETRIEVAL_STATUS_SKIPPED,
                prompt_version=REVISE_PROMPT_VERSION,
                prompt_tokens=gen.prompt_tokens,
                notices=[notice] if notice else [],
            )

        outcome = Outcome()
        stream = self._generator.generate(generate_request, timeout=ctx.remaining())
        async for event in stream_generation(stream, ctx, started, outcome):
            yield event
        closing, finished, complete = self._finish(outcome, revision.date, ctx)
        if closing is not None:
            yield closing
        if complete and s.index_tils:
            til = finished.til
            finished.til_id = (
                "til-" + cache_key({"owner": revision.owner, "title": til.title, "content": til.content})[:32]
            )
            self._index(til, finished.til_id, revision.owner, "", revision.date, outcome.model)
        yield finished

    @staticmethod
    def _redacted_revision(revision: Revision) -> tuple[Revision, list[str]]:
        found: list[str] = []
        redacted = dataclasses.replace(
            revision,
            current_json=redact_text(revision.current_json, found),
            history=tuple((role, redact_text(content, found)) for role, content in revision.history),
            instruction=redact_text(revision.instruction, found),
        )
        return (redacted if found else revision), found


def retrieval_query(job: TilJob) -> str:
    """What the change is about, for finding related TILs: messages, changed files, changed names."""
    parts = list(job.commit_messages)
    if job.files:
        parts.append(" ".join(job.files[:20]))
    identifiers = changed_identifiers(job.diff, limit=15)
    if identifiers:
        parts.append(" ".join(identifiers))
    return "\n".join(parts)[:MAX_QUERY_CHARS] or job.diff[:MAX_QUERY_CHARS]
