"""The study-question contract, and QuestionPipeline, which validates GenerateQuestions requests and
runs them through the one pipeline.

The TIL comes as text or as the id of a TIL the edge indexed for the same owner. Earlier questions of
the owner are the context: the prompt lists them as ones not to repeat, and the checker flags repeats.
If the retriever is down the questions are still written, and `started` says the check was skipped.
Results are cached by the normalized TIL text, difficulty, count, model and prompt version; new
questions are indexed for the next call.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeAlias

from til.v1 import common_pb2, edge_pb2, generator_pb2, retriever_pb2

from services.common.errors import InvalidArgument
from services.edge.cache import cache_key
from services.edge.call import CallContext
from services.edge.checks import check_ignore_eos, check_max_tokens, check_owner, check_policy
from services.edge.contract import OutputBudget
from services.edge.pipeline import Pipeline
from services.edge.prompt import QUESTIONS_PROMPT_VERSION, questions_chat
from services.edge.question_format import (
    DIFFICULTIES,
    check_questions,
    normalize_question,
    questions_schema,
    to_questions,
)
from services.edge.recent import Recent
from services.edge.redaction import redact_text
from services.edge.retrieval import Found, Retrieval, Search, load
from services.edge.til_format import Violation

DEFAULT_COUNT = 5
MAX_COUNT = 10
MAX_TIL_TEXT_CHARS = 20_000
MAX_TIL_ID_CHARS = 512
QuestionEvent: TypeAlias = edge_pb2.StreamStarted | common_pb2.TextDelta | edge_pb2.QuestionsFinished


@dataclass(frozen=True)
class QuestionJob:
    """A validated GenerateQuestions request: til_text, or til_id until the TIL is loaded."""

    til_text: str | None
    til_id: str | None
    difficulty: str
    count: int
    sampling: common_pb2.SamplingParams
    max_tokens: int | None
    policy: int
    owner: str
    ignore_eos: bool = False

    @property
    def til(self) -> str:
        assert self.til_text is not None, "the stored TIL is loaded before the pipeline runs"
        return self.til_text


def normalize_til(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# A TIL asked about again (a cache hit) skips the regex over its whole text: normalize_til is pure.
_normalized = Recent(normalize_til)


@dataclass(frozen=True)
class QuestionContract:
    history_k: int  # earlier questions to look for

    kind = "questions"
    namespace = "questions"
    prompt_version = QUESTIONS_PROMPT_VERSION
    shortened = "til_text"

    def redact(self, job: QuestionJob) -> tuple[QuestionJob, list[str]]:
        found: list[str] = []
        if job.til_id is not None:  # a stored TIL: the edge indexed it redacted already
            return job, found
        redacted = redact_text(job.til, found)
        return (dataclasses.replace(job, til_text=redacted) if found else job), found

    def notices(self, job: QuestionJob) -> list[str]:
        return []

    def key_fields(self, job: QuestionJob) -> dict[str, Any]:
        return {"til": _normalized(job.til), "difficulty": job.difficulty, "count": job.count}

    def search(self, job: QuestionJob, key: str) -> Search:
        return Search(
            query=job.til,
            kinds=(retriever_pb2.DOCUMENT_KIND_QUESTION,),
            top_k=self.history_k,
            degraded="earlier questions were not checked, so some may repeat",
        )

    def source(self, found: Found) -> edge_pb2.Source:
        return edge_pb2.Source(id=found.id, kind=found.kind, title=found.text[:200], score=found.score)

    def body(self, job: QuestionJob) -> str:
        return ""

    def cut(self, body: str, max_chars: int) -> tuple[str, str]:
        raise AssertionError("a question prompt has no part to cut")

    def chat(self, job: QuestionJob, retrieval: Retrieval, body: str) -> generator_pb2.ChatMessages:
        asked = [found.text for found in retrieval.found]
        return questions_chat(
            til_text=job.til, difficulty=job.difficulty, count=job.count, asked_before=asked
        )

    def schema(self, job: QuestionJob, budget: OutputBudget, body: str) -> dict[str, Any]:
        return questions_schema(job.difficulty, job.count)

    def check(
        self, document: Any, job: QuestionJob, *, truncated: bool, retrieval: Retrieval
    ) -> list[Violation]:
        asked = tuple(found.text for found in retrieval.found)
        return check_questions(
            document, difficulty=job.difficulty, count=job.count, truncated=truncated, asked_before=asked
        )

    def finished(self, document: Any, json_text: str, result_id: str) -> edge_pb2.QuestionsFinished:
        return edge_pb2.QuestionsFinished(questions=to_questions(document), questions_json=json_text)

    def result_id(self, job: QuestionJob, key: str, document: Any) -> str:
        return ""  # each question is indexed under its own id

    def documents(
        self, finished: edge_pb2.QuestionsFinished, job: QuestionJob, *, result_id: str, model: str
    ) -> list[retriever_pb2.Document]:
        return [
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
            for q in finished.questions
        ]


class QuestionPipeline(Pipeline):
    """GenerateQuestions: validation, the stored TIL loaded by id, then the one pipeline."""

    @property
    def contract(self) -> QuestionContract:
        return QuestionContract(history_k=self._settings.question_history_k)

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
        if job.til_id is not None:
            stored = await load(
                self._store,
                job.til_id,
                kinds=(retriever_pb2.DOCUMENT_KIND_TIL,),
                owner=job.owner,
                timeout=ctx.bounded(self._settings.til_fetch_timeout_s),
                what="TIL",
            )
            text = f"{stored.title}\n\n{stored.text}" if stored.title else stored.text
            job = dataclasses.replace(job, til_text=text)
        async for event in self.run(self.contract, job, ctx):
            yield event  # type: ignore[misc]
