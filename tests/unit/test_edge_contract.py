"""The output contract interface: a contract declared here, not one of the edge's own, runs through the
one pipeline, which takes the namespace, prompt version, search, prompt, schema, checker and message
builders from it and nothing else. Real gRPC against the fakes of test_edge_service."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from til.v1 import common_pb2, edge_pb2, generator_pb2, retriever_pb2

from services.edge.call import CallContext
from services.edge.config import EdgeSettings
from services.edge.contract import OutputBudget, OutputContract
from services.edge.pipeline import Pipeline, pipeline_key
from services.edge.questions import QuestionContract, QuestionJob
from services.edge.retrieval import Found, Retrieval, Search
from services.edge.til import RevisionContract, TilContract, TilPipeline
from services.edge.til_format import Violation
from tests.unit.test_edge_service import QUESTIONS, FakeGenerator, chunks, edge_stack, split, til_request


@dataclass(frozen=True)
class GlossaryJob:
    text: str
    sampling: common_pb2.SamplingParams = dataclasses.field(default_factory=common_pb2.SamplingParams)
    max_tokens: int | None = None
    policy: int = edge_pb2.CACHE_POLICY_UNSPECIFIED
    owner: str = "alice"
    ignore_eos: bool = False


class GlossaryContract:
    """A contract of our own: study questions about a glossary text, cut to fit, with docs as context."""

    kind = "glossary"
    namespace = "glossary"
    prompt_version = "glossary-1"
    shortened = "text"

    def __init__(self) -> None:
        self.cuts: list[int] = []

    def redact(self, job: GlossaryJob) -> tuple[GlossaryJob, list[str]]:
        return dataclasses.replace(job, text=job.text.replace("hunter2", "[secret]")), (
            ["password"] if "hunter2" in job.text else []
        )

    def notices(self, job: GlossaryJob) -> list[str]:
        return ["glossary notice"]

    def key_fields(self, job: GlossaryJob) -> dict[str, Any]:
        return {"text": job.text}

    def search(self, job: GlossaryJob, key: str) -> Search:
        return Search(query=job.text, kinds=(retriever_pb2.DOCUMENT_KIND_DOC,), top_k=2, degraded="no docs")

    def source(self, found: Found) -> edge_pb2.Source:
        return edge_pb2.Source(id=found.id, kind=found.kind, title=f"doc: {found.title}", score=found.score)

    def body(self, job: GlossaryJob) -> str:
        return job.text

    def cut(self, body: str, max_chars: int) -> tuple[str, str]:
        self.cuts.append(max_chars)
        return body[:max_chars], f"glossary cut to {max_chars}"

    def chat(self, job: GlossaryJob, retrieval: Retrieval, body: str) -> generator_pb2.ChatMessages:
        docs = ",".join(found.title for found in retrieval.found)
        return generator_pb2.ChatMessages(
            messages=[generator_pb2.ChatMessage(role="user", content=f"docs=[{docs}] text=[{body}]")]
        )

    def schema(self, job: GlossaryJob, budget: OutputBudget, body: str) -> dict[str, Any]:
        return {"type": "object", "title": f"budget {budget.max_tokens}"}

    def check(
        self, document: Any, job: GlossaryJob, *, truncated: bool, retrieval: Retrieval
    ) -> list[Violation]:
        return [Violation(f"seen {len(retrieval.found)} docs", enforced=False)]

    def finished(self, document: Any, json_text: str, result_id: str) -> edge_pb2.QuestionsFinished:
        questions = [edge_pb2.Question(question=q["question"]) for q in document["questions"]]
        return edge_pb2.QuestionsFinished(questions=questions, questions_json=json_text)

    def result_id(self, job: GlossaryJob, key: str, document: Any) -> str:
        return f"glossary-{key[:8]}"

    def documents(
        self, finished: edge_pb2.QuestionsFinished, job: GlossaryJob, *, result_id: str, model: str
    ) -> list[retriever_pb2.Document]:
        return [retriever_pb2.Document(id=result_id, kind=retriever_pb2.DOCUMENT_KIND_DOC, owner=job.owner)]


async def test_a_contract_of_its_own_runs_through_the_one_pipeline() -> None:
    contract = GlossaryContract()
    captured: list[tuple[Any, Any, Any]] = []

    def capture(clients: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
        captured.append(clients)
        return clients

    generator = FakeGenerator(output=chunks(json.dumps(QUESTIONS, ensure_ascii=False)))
    async with edge_stack(generator=generator, wrap=capture) as stack:
        pipeline = Pipeline(*captured[0], EdgeSettings(port=0), background=stack.background)
        for owner in ("alice", "bob"):
            stack.retriever.add(
                id=f"doc-{owner}", kind=retriever_pb2.DOCUMENT_KIND_DOC, title=owner, owner=owner
            )
        job = GlossaryJob(text="TTL: time to live. password hunter2")
        first = split([e async for e in _responses(pipeline.run(contract, job, CallContext("r1")))])
        await stack.settle()
        again = split([e async for e in _responses(pipeline.run(contract, job, CallContext("r2")))])
        await stack.settle()

    started, deltas, finished = first
    assert started.prompt_version == "glossary-1" and started.cache_status == edge_pb2.CACHE_STATUS_MISS
    assert list(started.notices)[:2] == [
        "glossary notice",
        "secrets were found in the input and replaced before use: password",
    ]
    assert [(s.id, s.title) for s in started.sources] == [("doc-alice", "doc: alice")]
    (request,) = generator.requests
    assert request.chat.messages[0].content == "docs=[alice] text=[TTL: time to live. password [secret]]"
    assert json.loads(request.output.json_schema) == {"type": "object", "title": "budget 1024"}
    assert "".join(d.text for d in deltas) == finished.questions_json
    assert len(finished.questions) == 2 and list(finished.violations) == ["seen 1 docs"]
    assert finished.finish_reason == common_pb2.FINISH_REASON_STOP and finished.usage.completion_tokens > 0
    (put,) = stack.cacher.puts
    redacted = dataclasses.replace(job, text="TTL: time to live. password [secret]")
    key = pipeline_key(contract, redacted, model="fake-model", max_tokens=None)  # the key never sees secrets
    assert (put.namespace, put.key) == ("glossary", key)
    assert [d.id for d in stack.retriever.upserts] == [f"glossary-{key[:8]}"]
    # The replay comes from the contract's namespace, checked by its checker, built by its builder.
    started, _, finished = again
    assert started.cache_status == edge_pb2.CACHE_STATUS_HIT and len(generator.requests) == 1
    assert list(finished.violations) == ["seen 0 docs"] and len(finished.questions) == 2


async def test_the_contracts_body_is_what_gets_cut_to_fit_the_context() -> None:
    contract = GlossaryContract()
    captured: list[tuple[Any, Any, Any]] = []
    generator = FakeGenerator(
        output=chunks(json.dumps(QUESTIONS, ensure_ascii=False)), max_model_len=2000, default_max_tokens=1024
    )
    async with edge_stack(generator=generator, wrap=lambda c: captured.append(c) or c) as stack:
        pipeline = Pipeline(*captured[0], EdgeSettings(port=0), background=stack.background)
        job = GlossaryJob(text="용어 " * 5000)
        started, _, _ = split([e async for e in _responses(pipeline.run(contract, job, CallContext("r1")))])
    (max_chars,) = contract.cuts
    assert f"glossary cut to {max_chars}" in started.notices
    assert len(generator.requests[0].chat.messages[0].content) < len(job.text)


def test_the_edges_contracts_keep_their_results_apart() -> None:
    settings = EdgeSettings(port=0)
    pipeline = TilPipeline(None, None, None, settings)  # type: ignore[arg-type]
    contracts: list[OutputContract[Any, Any]] = [
        TilContract(top_k=3),
        RevisionContract(),
        QuestionContract(history_k=10),
    ]
    versions = {c.prompt_version.split("-")[0] for c in contracts}
    assert versions == {"til", "revise", "questions"}
    assert len({c.kind for c in contracts}) == 3
    job = pipeline.job(til_request())
    key = pipeline_key(contracts[0], job, model="m", max_tokens=None)
    assert key == TilPipeline.cache_key(job, model="m", max_tokens=None)
    question = QuestionJob(
        til_text="# TIL", til_id=None, difficulty="easy", count=1, sampling=common_pb2.SamplingParams(),
        max_tokens=None, policy=0, owner="alice",
    )  # fmt: skip
    assert pipeline_key(contracts[2], question, model="m", max_tokens=None) != pipeline_key(
        contracts[2], dataclasses.replace(question, owner=""), model="m", max_tokens=None
    )


def test_a_key_asked_again_is_the_sha256_of_its_canonical_json_as_the_first_time() -> None:
    """Keys of recent requests are remembered (pipeline.py): a remembered key is the one computed from
    the canonical JSON, for every sampling (0.0 and -0.0 differ) and for ignore_eos."""
    pipeline = TilPipeline(None, None, None, EdgeSettings(port=0))  # type: ignore[arg-type]
    job = pipeline.job(til_request(commit_messages=["Cache answers", "TTL 적용"]))
    keys = set()
    for temperature in (None, 0.0, -0.0, 0.7):
        sampling = common_pb2.SamplingParams(seed=1, temperature=temperature)
        for ignore_eos in (False, True):
            variant = dataclasses.replace(job, sampling=sampling, ignore_eos=ignore_eos)
            parts = {
                "diff": job.diff,
                "commit_messages": ["Cache answers", "TTL 적용"],
                "language": job.language,
                "date": job.date,
                "prompt_version": TilContract.prompt_version,
                "model": "m",
                # as set (0.7 as the float32 the field holds)
                "sampling": {"seed": 1}
                | ({} if temperature is None else {"temperature": sampling.temperature}),
                "max_tokens": 7,
                "owner": job.owner,
                **({"ignore_eos": True} if ignore_eos else {}),
            }
            canonical = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
            expected = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
            for _ in range(2):  # computed, then remembered
                assert pipeline_key(TilContract(top_k=0), variant, model="m", max_tokens=7) == expected
            keys.add(expected)
    assert len(keys) == 8


def test_a_question_key_normalizes_the_tils_whitespace_the_same_when_remembered() -> None:
    contract = QuestionContract(history_k=0)

    def fields(til: str) -> Any:
        job = QuestionJob(til_text=til, til_id="", difficulty="medium", count=3, sampling=common_pb2.SamplingParams(),
                          max_tokens=None, policy=0, owner="o")  # fmt: skip
        return contract.key_fields(job)

    til = "# 2025-01-01 TIL\n\n-  캐시 만료\t시간을 둔다.\n"
    for _ in range(2):  # computed, then remembered
        assert fields(til)["til"] == "# 2025-01-01 TIL - 캐시 만료 시간을 둔다."
        assert fields(til) == fields("  # 2025-01-01 TIL\n- 캐시 만료 시간을 둔다.  ")
    assert fields(til) != fields(til.replace("둔다", "정한다"))


async def _responses(events: Any) -> Any:
    """Pipeline events as the servicer sends them."""
    fields = {edge_pb2.StreamStarted: "started", common_pb2.TextDelta: "delta"}
    async for event in events:
        yield edge_pb2.GenerateQuestionsResponse(**{fields.get(type(event), "finished"): event})
