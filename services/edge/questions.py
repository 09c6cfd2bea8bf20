"""QuestionPipeline: study questions for a TIL that do not repeat the ones asked before.

The TIL comes as text or as the id of a TIL the edge indexed. Earlier questions are searched in the
retriever and listed in the prompt as ones not to repeat; if the retriever is down the questions are
still written, and `started` says the check was skipped. Results are cached by the normalized TIL
text, difficulty, count, model and prompt version; new questions are indexed for the next call.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from til.v1 import common_pb2, edge_pb2, generator_pb2, retriever_pb2

from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.edge.clients import DependencyUnavailable, DocumentStore, ResultCache, TilGenerator
from services.edge.config import EdgeSettings
from services.edge.flights import Plan, SingleFlight
from services.edge.prompt import QUESTIONS_PROMPT_VERSION, questions_chat
from services.edge.question_format import (
    DIFFICULTIES,
    check_questions,
    normalize_question,
    questions_schema,
    to_questions,
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

QUESTIONS_NAMESPACE = "questions"
QuestionEvent: TypeAlias = edge_pb2.StreamStarted | common_pb2.TextDelta | edge_pb2.QuestionsFinished

DEFAULT_COUNT = 5
MAX_COUNT = 10
MAX_TIL_TEXT_CHARS = 20_000
MAX_TIL_ID_CHARS = 512


@dataclass(frozen=True)
class QuestionJob:
    """A validated GenerateQuestions request; exactly one of til_text and til_id is set."""

    til_text: str | None
    til_id: str | None
    difficulty: str
    count: int
    sampling: common_pb2.SamplingParams
    max_tokens: int | None
    policy: int
    owner: str


def normalize_til(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


class QuestionPipeline:
    def __init__(
        self,
        generator: TilGenerator,
        store: DocumentStore,
        cache: ResultCache,
        settings: EdgeSettings,
        *,
        background: Background | None = None,
    ) -> None:
        self._generator = generator
        self._store = store
        self._cache = cache
        self._settings = settings
        self.background = background or Background()
        self._flights = SingleFlight(slack_s=settings.shared_deadline_slack_s)

    def job(self, request: edge_pb2.GenerateQuestionsRequest) -> QuestionJob:
        source = request.WhichOneof("til")
        til_text = til_id = None
        if source is None:
            raise InvalidArgument("set til_text (the TIL's Markdown) or til_id (the id GenerateTil returned)")
        if source == "til_text":
            if not request.til_text.strip():
                raise InvalidArgument("til_text is empty")
            if len(request.til_text) > MAX_TIL_TEXT_CHARS:
                raise InvalidArgument(
                    f"til_text has {len(request.til_text)} characters; at most {MAX_TIL_TEXT_CHARS}"
                )
            til_text = request.til_text
        else:
            til_id = request.til_id.strip()
            if not til_id or len(til_id) > MAX_TIL_ID_CHARS:
                raise InvalidArgument(f"til_id must hold 1 to {MAX_TIL_ID_CHARS} characters")
        if request.difficulty not in DIFFICULTIES:
            given = (
                "unset" if request.difficulty == edge_pb2.DIFFICULTY_UNSPECIFIED else str(request.difficulty)
            )
            raise InvalidArgument(
                f"difficulty is {given}: choose DIFFICULTY_EASY, DIFFICULTY_MEDIUM or DIFFICULTY_HARD"
            )
        count = request.count or DEFAULT_COUNT
        if count > MAX_COUNT:
            raise InvalidArgument(f"count is {count}; at most {MAX_COUNT} questions per call")
        check_policy(request.cache_policy)
        check_ignore_eos(request.generation, allowed=False)
        return QuestionJob(
            til_text=til_text,
            til_id=til_id,
            difficulty=DIFFICULTIES[request.difficulty],
            count=count,
            sampling=request.generation.sampling,
            max_tokens=check_max_tokens(request.generation, self._settings.max_tokens_limit),
            policy=request.cache_policy,
            owner=check_owner(request.owner, self._settings),
        )

    async def generate(self, job: QuestionJob, ctx: CallContext) -> AsyncIterator[QuestionEvent]:
        """Streams questions for a request that `job()` validated."""
        s = self._settings
        redacted: list[str] = []
        if job.til_text is not None:
            til_text = redact_text(job.til_text, redacted)
        else:
            til_text = await self._stored_til(job, ctx)  # indexed by the edge: redacted already
        info = await self._generator.model_info(timeout=ctx.remaining())
        max_tokens = resolve_max_tokens(job.max_tokens, s.default_max_tokens, info)
        key = cache_key(
            {
                "prompt_version": QUESTIONS_PROMPT_VERSION,
                "model": info.model,
                "til": normalize_til(til_text),
                "difficulty": job.difficulty,
                "count": job.count,
                "sampling": sampling_fields(job.sampling),
                "max_tokens": job.max_tokens,
                "owner": job.owner,
            }
        )
        notices: list[str] = []
        if redaction := redaction_notice(redacted):
            notices.append(redaction)

        opened = await open_generation(
            flights=self._flights,
            generator=self._generator,
            cache=self._cache,
            namespace=QUESTIONS_NAMESPACE,
            key=key,
            policy=job.policy,
            shared=s.share_identical and job.policy == edge_pb2.CACHE_POLICY_UNSPECIFIED,
            ctx=ctx,
            cache_timeout_s=s.cache_timeout_s,
            notices=notices,
            search=lambda: self._earlier_questions(til_text, job, ctx),
            plan=lambda context: self._plan(til_text, job, max_tokens, ctx, context),
        )
        if opened.cached is not None:
            async for event in self._replay(opened.cached, job, ctx, notices):
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
                prompt_version=QUESTIONS_PROMPT_VERSION,
                prompt_tokens=gen.prompt_tokens,
                notices=[*notices, *opened.notices()],
            )

        outcome = Outcome()
        async for event in stream_generation(opened.stream, ctx, started, outcome):
            yield event
        used = opened.used_plan()
        asked = list(used.asked_before) if used is not None else []
        document, questions_json, problems = parse_json_output(outcome.text)
        violations = [
            *problems,
            *check_questions(
                document,
                difficulty=job.difficulty,
                count=job.count,
                truncated=outcome.finish_reason == common_pb2.FINISH_REASON_LENGTH,
                asked_before=tuple(asked),
            ),
        ]
        complete = outcome.finish_reason == common_pb2.FINISH_REASON_STOP and not any(
            v.enforced for v in violations
        )
        RESULTS.labels("questions", "complete" if complete else "incomplete").inc()
        closing = closing_delta(outcome.text, questions_json)
        if closing is not None:
            yield closing
        finished = edge_pb2.QuestionsFinished(
            questions=to_questions(document),
            questions_json=questions_json,
            finish_reason=outcome.finish_reason,
            usage=outcome.usage,
            timings=outcome.timings(ctx),
            violations=[v.message for v in violations],
        )
        # A shared result is stored and indexed once, by whichever listener gets here first.
        if complete and (listener is None or listener.flight.claim_writes()):
            if job.policy != edge_pb2.CACHE_POLICY_BYPASS and outcome.model == info.model:
                value = envelope(json_text=questions_json, model=outcome.model, usage=outcome.usage)
                self.background.spawn(
                    "questions cache store",
                    self._cache.put(
                        QUESTIONS_NAMESPACE, key, value, ttl_s=s.cache_ttl_s, timeout=s.write_timeout_s
                    ),
                )
            if s.index_tils:
                self._index(finished.questions, job)
        yield finished

    @staticmethod
    def _plan(
        til_text: str,
        job: QuestionJob,
        max_tokens: int,
        ctx: CallContext,
        context: tuple[int, list[edge_pb2.Source], list[str], str | None],
    ) -> Plan:
        """The generator request with the earlier questions found, and what to tell the caller."""
        status, sources, asked, notice = context
        request = generator_pb2.GenerateRequest(
            request_id=ctx.request_id,
            chat=questions_chat(
                til_text=til_text, difficulty=job.difficulty, count=job.count, asked_before=asked
            ),
            sampling=job.sampling,
            stopping=common_pb2.StoppingCriteria(max_tokens=max_tokens),
            output=generator_pb2.OutputFormat(
                json_schema=json.dumps(questions_schema(job.difficulty, job.count), ensure_ascii=False)
            ),
        )
        return Plan(request, status, tuple(sources), (notice,) if notice else (), asked_before=tuple(asked))

    async def _stored_til(self, job: QuestionJob, ctx: CallContext) -> str:
        assert job.til_id is not None
        try:
            document = await self._store.get(
                job.til_id, timeout=ctx.bounded(self._settings.til_fetch_timeout_s)
            )
        except DependencyUnavailable as exc:
            raise Unavailable(f"cannot load TIL {job.til_id!r}: {exc}") from exc
        # Another owner's TIL is reported as missing, not as forbidden: ids do not leak across owners.
        if (
            document is None
            or document.kind != retriever_pb2.DOCUMENT_KIND_TIL
            or (job.owner and document.owner and document.owner != job.owner)
        ):
            raise NotFound(f"no TIL with id {job.til_id!r}")
        return f"{document.title}\n\n{document.text}" if document.title else document.text

    async def _earlier_questions(
        self, til_text: str, job: QuestionJob, ctx: CallContext
    ) -> tuple[int, list[edge_pb2.Source], list[str], str | None]:
        """(retrieval status, sources, earlier question texts, notice)."""
        k = self._settings.question_history_k
        if k == 0:
            return edge_pb2.RETRIEVAL_STATUS_SKIPPED, [], [], None
        request = retriever_pb2.SearchDocumentsRequest(
            query=til_text[:MAX_QUERY_CHARS],
            top_k=k,
            filter=retriever_pb2.SearchFilter(kinds=[retriever_pb2.DOCUMENT_KIND_QUESTION], owner=job.owner),
        )
        try:
            hits = await self._store.search(request, timeout=ctx.bounded(self._settings.retrieval_timeout_s))
        except DependencyUnavailable as exc:
            RETRIEVALS.labels("questions", "unavailable").inc()
            notice = f"retriever unavailable ({exc}); earlier questions were not checked, so some may repeat"
            return edge_pb2.RETRIEVAL_STATUS_UNAVAILABLE, [], [], notice
        RETRIEVALS.labels("questions", "ok").inc()
        sources = [
            edge_pb2.Source(
                id=h.document.id, kind=h.document.kind, title=h.document.text[:200], score=h.score
            )
            for h in hits
        ]
        return edge_pb2.RETRIEVAL_STATUS_OK, sources, [h.document.text for h in hits], None

    async def _replay(
        self, value: dict[str, object], job: QuestionJob, ctx: CallContext, notices: list[str]
    ) -> AsyncIterator[QuestionEvent]:
        questions_json = str(value["json"])
        usage = cached_usage(value)
        yield edge_pb2.StreamStarted(
            request_id=ctx.request_id,
            model=str(value["model"]),
            cache_status=edge_pb2.CACHE_STATUS_HIT,
            retrieval_status=edge_pb2.RETRIEVAL_STATUS_SKIPPED,
            prompt_version=QUESTIONS_PROMPT_VERSION,
            prompt_tokens=usage.prompt_tokens,
            notices=notices,
        )
        first_token_ms = ctx.elapsed_ms()
        yield common_pb2.TextDelta(text=questions_json, token_count=usage.completion_tokens)
        document = json.loads(questions_json)
        violations = check_questions(document, difficulty=job.difficulty, count=job.count)
        RESULTS.labels("questions", "cached").inc()
        yield edge_pb2.QuestionsFinished(
            questions=to_questions(document),
            questions_json=questions_json,
            finish_reason=common_pb2.FINISH_REASON_STOP,
            usage=usage,
            timings=common_pb2.Timings(
                queue_ms=ctx.queued_s * 1000.0,
                time_to_first_token_ms=first_token_ms,
                total_ms=ctx.elapsed_ms(),
            ),
            violations=[v.message for v in violations],
        )

    def _index(self, questions: Sequence[edge_pb2.Question], job: QuestionJob) -> None:
        documents = [
            retriever_pb2.Document(
                id="q-" + cache_key({"owner": job.owner, "question": normalize_question(q.question)})[:32],
                kind=retriever_pb2.DOCUMENT_KIND_QUESTION,
                text=q.question,
                title=q.question[:200],
                owner=job.owner,
                difficulty=job.difficulty,
                tags=list(q.keywords),
                attributes={"answer": q.answer, "til_id": job.til_id or ""},
            )
            for q in questions
        ]
        if documents:
            self.background.spawn(
                "questions index upsert",
                self._store.upsert(documents, timeout=self._settings.write_timeout_s),
            )
