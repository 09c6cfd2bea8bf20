"""The TIL contract (a git diff in, a Korean TIL out) and the revision contract (a TIL and a
conversation in, the revised TIL out), and TilPipeline, which validates both kinds of request and runs
them through the one pipeline.

A TIL is cached by its request and indexed under an id derived from its cache key; related earlier TILs
of the same owner are its context, and its diff is cut to fit the model's context. A revision follows
a conversation: it is neither looked up nor stored in the cache, has no context to search, and is
indexed under an id derived from its text.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeAlias

from til.v1 import common_pb2, edge_pb2, generator_pb2, retriever_pb2

from services.common.errors import InvalidArgument
from services.edge.cache import cache_key
from services.edge.call import CallContext
from services.edge.checks import check_ignore_eos, check_max_tokens, check_owner, check_policy, parse_date
from services.edge.contract import OutputBudget
from services.edge.diffs import changed_files, changed_identifiers, fit_diff, guess_language, looks_like_diff
from services.edge.pipeline import Pipeline, pipeline_key
from services.edge.prompt import (
    REVISE_PROMPT_VERSION,
    TIL_PROMPT_VERSION,
    RelatedDocument,
    revise_chat,
    til_chat,
)
from services.edge.recent import Recent
from services.edge.redaction import redact_text
from services.edge.retrieval import MAX_QUERY_CHARS, Found, Retrieval, Search
from services.edge.til_format import Violation, check_til, content_budget, til_schema, to_til

MAX_LANGUAGE_CHARS = 40
MAX_INSTRUCTION_CHARS = 4000
MAX_HISTORY_TURNS = 20
MAX_TURN_CHARS = 20_000
MAX_TIL_CHARS = 20_000

TIL_NAMESPACE = "til"
TilEvent: TypeAlias = edge_pb2.StreamStarted | common_pb2.TextDelta | edge_pb2.TilFinished

_LANGUAGE = re.compile(rf"[A-Za-z0-9+#._ -]{{1,{MAX_LANGUAGE_CHARS}}}")
_TITLE_DATE = re.compile(r"^([0-9]{4}-[0-9]{2}-[0-9]{2}) TIL\b")
_HEADING_DATE = re.compile(r"^# ([0-9]{4}-[0-9]{2}-[0-9]{2}) TIL\b")


def _changed_files_and_language(diff: str) -> tuple[tuple[str, ...], str]:
    files = tuple(changed_files(diff))
    return files, guess_language(list(files))


# What a diff says of itself, for the diffs seen lately: a request asked again (a cache hit) skips the scans.
_is_diff = Recent(looks_like_diff)
_files_and_language = Recent(_changed_files_and_language)


def _kib(size: int) -> str:
    return f"{size / 1024:.1f} KiB ({size} bytes)"


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
    # Revisions follow a conversation: they are neither looked up nor stored in the cache.
    policy: int = edge_pb2.CACHE_POLICY_BYPASS
    language: str = ""
    ignore_eos: bool = False


class _TilDocument:
    """What a TIL and a revision share: the schema, the checks, the messages and the index entry."""

    kind = "til"
    namespace = TIL_NAMESPACE

    def schema(self, job: TilJob | Revision, budget: OutputBudget, body: str) -> dict[str, Any]:
        """Code lines are quoted from the diff as the prompt shows it (a revision has none: free code)."""
        content_chars = content_budget(budget.max_tokens, budget.chars_per_token)
        return til_schema(job.date, content_chars, diff=body or None, language=job.language or None)

    def check(
        self, document: Any, job: TilJob | Revision, *, truncated: bool, retrieval: Retrieval
    ) -> list[Violation]:
        diff = job.diff if isinstance(job, TilJob) else None
        return check_til(
            document, date=job.date, truncated=truncated, diff=diff, language=job.language or None
        )

    def finished(self, document: Any, json_text: str, result_id: str) -> edge_pb2.TilFinished:
        return edge_pb2.TilFinished(til=to_til(document), til_json=json_text, til_id=result_id)

    def documents(
        self, finished: edge_pb2.TilFinished, job: TilJob | Revision, *, result_id: str, model: str
    ) -> list[retriever_pb2.Document]:
        if not result_id:
            return []
        til = finished.til
        return [
            retriever_pb2.Document(
                id=result_id,
                kind=retriever_pb2.DOCUMENT_KIND_TIL,
                text=til.content,
                title=til.title,
                owner=job.owner,
                language=job.language,
                tags=list(til.keywords),
                attributes={"date": job.date, "model": model},
            )
        ]

    def source(self, found: Found) -> edge_pb2.Source:
        return edge_pb2.Source(id=found.id, kind=found.kind, title=found.title, score=found.score)

    def cut(self, body: str, max_chars: int) -> tuple[str, str]:
        fitted = fit_diff(body, max_chars)
        left_out = f"; left out: {', '.join(fitted.omitted_files[:10])}" if fitted.omitted_files else ""
        more = len(fitted.omitted_files) - 10
        notice = (
            f"the diff was cut to {len(fitted.text)} of {len(body)} characters to fit the model's "
            f"context{left_out}{f' and {more} more' if more > 0 else ''}"
        )
        return fitted.text, notice


@dataclass(frozen=True)
class TilContract(_TilDocument):
    top_k: int  # related TILs to look for

    prompt_version = TIL_PROMPT_VERSION
    shortened = "diff"

    def redact(self, job: TilJob) -> tuple[TilJob, list[str]]:
        """Everything downstream (cache key and value, retrieval query, prompt, index) sees only this."""
        found: list[str] = []
        diff = redact_text(job.diff, found)
        messages = tuple(redact_text(m, found) for m in job.commit_messages)
        if not found:
            return job, found
        return dataclasses.replace(job, diff=diff, commit_messages=messages), found

    def notices(self, job: TilJob) -> list[str]:
        if job.language_guessed and job.language:
            return [f"language guessed from the file names: {job.language}"]
        return []

    def key_fields(self, job: TilJob) -> dict[str, Any]:
        return {
            "diff": job.diff,
            "commit_messages": job.commit_messages,  # a JSON array, as a list would be
            "language": job.language,
            "date": job.date,
        }

    def search(self, job: TilJob, key: str) -> Search | None:
        if not self.top_k:
            return None  # retrieval off: the query (identifiers of the whole diff) is not worth building
        return Search(
            query=retrieval_query(job),
            kinds=(retriever_pb2.DOCUMENT_KIND_TIL,),
            top_k=self.top_k,
            degraded="writing without related TILs",
            exclude=self.result_id(job, key, None),  # this very TIL, from an earlier REFRESH
        )

    def body(self, job: TilJob) -> str:
        return job.diff

    def chat(self, job: TilJob, retrieval: Retrieval, body: str) -> generator_pb2.ChatMessages:
        related = [
            RelatedDocument(title=f.title or f.text[:80], keywords=f.tags[:3]) for f in retrieval.found
        ]
        return til_chat(
            diff=body,
            date=job.date,
            language=job.language,
            commit_messages=job.commit_messages,
            related=related,
        )

    def result_id(self, job: TilJob, key: str, document: Any) -> str:
        return f"til-{key[:32]}"


class RevisionContract(_TilDocument):
    kind = "revision"
    prompt_version = REVISE_PROMPT_VERSION
    shortened = "the history or the TIL"

    def redact(self, job: Revision) -> tuple[Revision, list[str]]:
        found: list[str] = []
        redacted = dataclasses.replace(
            job,
            current_json=redact_text(job.current_json, found),
            history=tuple((role, redact_text(content, found)) for role, content in job.history),
            instruction=redact_text(job.instruction, found),
        )
        return (redacted if found else job), found

    def notices(self, job: Revision) -> list[str]:
        return []

    def key_fields(self, job: Revision) -> dict[str, Any]:
        return {"til": job.current_json, "history": job.history, "instruction": job.instruction}

    def search(self, job: Revision, key: str) -> None:
        return None

    def body(self, job: Revision) -> str:
        return ""

    def chat(self, job: Revision, retrieval: Retrieval, body: str) -> generator_pb2.ChatMessages:
        return revise_chat(
            current_til_json=job.current_json, date=job.date, history=job.history, instruction=job.instruction
        )

    def result_id(self, job: Revision, key: str, document: Any) -> str:
        til = to_til(document)
        return "til-" + cache_key({"owner": job.owner, "title": til.title, "content": til.content})[:32]


class TilPipeline(Pipeline):
    """GenerateTil and ReviseTil: validation, then the one pipeline with the TIL or revision contract."""

    @property
    def til(self) -> TilContract:
        return TilContract(top_k=self._settings.retrieval_top_k)

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
        if not _is_diff(diff):
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
        date = parse_date(request.date.strip()) if request.date.strip() else self.today().isoformat()
        check_policy(request.cache_policy)
        max_tokens = check_max_tokens(request.generation, s.max_tokens_limit)
        owner = check_owner(request.owner, s)
        files, guessed_language = _files_and_language(diff)
        guessed = not language
        return TilJob(
            diff=diff,
            commit_messages=tuple(m.strip() for m in request.commit_messages if m.strip()),
            language=guessed_language if guessed else language,
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

    def generate(self, job: TilJob, ctx: CallContext) -> AsyncIterator[TilEvent]:
        """Streams a TIL for a request that `job()` validated."""
        return self.run(self.til, job, ctx)  # type: ignore[return-value]

    def revise(self, revision: Revision, ctx: CallContext) -> AsyncIterator[TilEvent]:
        """Streams the revised TIL for a request that `revision()` validated."""
        return self.run(RevisionContract(), revision, ctx)  # type: ignore[return-value]

    @staticmethod
    def cache_key(job: TilJob, *, model: str, max_tokens: int | None) -> str:
        """The key a TIL for `job` is cached under (the bench seeds the cache with it)."""
        return pipeline_key(TilContract(top_k=0), job, model=model, max_tokens=max_tokens)


def retrieval_query(job: TilJob) -> str:
    """What the change is about, for finding related TILs: messages, changed files, changed names."""
    parts = list(job.commit_messages)
    if job.files:
        parts.append(" ".join(job.files[:20]))
    identifiers = changed_identifiers(job.diff, limit=15)
    if identifiers:
        parts.append(" ".join(identifiers))
    return "\n".join(parts)[:MAX_QUERY_CHARS] or job.diff[:MAX_QUERY_CHARS]
