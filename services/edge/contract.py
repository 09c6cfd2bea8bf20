"""The output contract: what a TIL, a question set and a revision each declare for the one pipeline.

A contract is data and small pure functions: its namespace and prompt version, the context it looks
for, how its prompt is built around the part that may be cut to fit, its JSON schema, the checker of a
finished document, and the messages and index documents it becomes. The pipeline (pipeline.py) runs any
contract the same way: validate, cache and search, plan, generate, close, check, store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, TypeVar

from til.v1 import common_pb2, edge_pb2, generator_pb2, retriever_pb2

from services.edge.retrieval import Found, Retrieval, Search
from services.edge.til_format import Violation


class Job(Protocol):
    """A validated request: what every contract's job carries besides its own fields."""

    @property
    def sampling(self) -> common_pb2.SamplingParams: ...

    @property
    def max_tokens(self) -> int | None: ...

    @property
    def policy(self) -> int: ...  # edge_pb2.CachePolicy

    @property
    def owner(self) -> str: ...

    @property
    def ignore_eos(self) -> bool: ...  # benchmarks only (EDGE_ALLOW_IGNORE_EOS): generate until max_tokens


Finished: TypeAlias = edge_pb2.TilFinished | edge_pb2.QuestionsFinished
J = TypeVar("J", bound=Job)
F = TypeVar("F", bound=Finished)


@dataclass(frozen=True)
class OutputBudget:
    """The tokens the output may take, and how many characters of the contract's text a token holds
    at worst with the model's tokenizer (to bound free text so the JSON closes within the budget)."""

    max_tokens: int
    chars_per_token: float


class OutputContract(Protocol[J, F]):
    kind: str  # names it in metrics and logs
    namespace: str  # of its cache entries
    prompt_version: str  # part of every cache key and `started`
    shortened: str  # what the caller shortens when the prompt does not fit the context

    def redact(self, job: J) -> tuple[J, list[str]]:
        """The job with secrets replaced in everything the caller wrote, and the kinds found."""
        ...

    def notices(self, job: J) -> list[str]:
        """What to tell the caller about the request itself (e.g. a guessed language)."""
        ...

    def key_fields(self, job: J) -> dict[str, Any]:
        """What shapes the result besides the model, sampling, budget, owner and prompt version: text,
        integers and tuples of them (hashable, as the keys of recent requests are kept; pipeline.py)."""
        ...

    def search(self, job: J, key: str) -> Search | None:
        """The context to look for, or None."""
        ...

    def source(self, found: Found) -> edge_pb2.Source: ...

    def body(self, job: J) -> str:
        """The part of the prompt that may be cut to fit the model's context ("" when none may)."""
        ...

    def cut(self, body: str, max_chars: int) -> tuple[str, str]:
        """`body` cut to at most `max_chars`, and the notice that says what was left out."""
        ...

    def chat(self, job: J, retrieval: Retrieval, body: str) -> generator_pb2.ChatMessages: ...

    def schema(self, job: J, budget: OutputBudget, body: str) -> dict[str, Any]:
        """The JSON schema of the output, for the prompt built with `body` (the body as cut to fit)."""
        ...

    def check(self, document: Any, job: J, *, truncated: bool, retrieval: Retrieval) -> list[Violation]: ...

    def finished(self, document: Any, json_text: str, result_id: str) -> F:
        """The finished message without what the pipeline fills in (finish reason, usage, timings,
        violations)."""
        ...

    def result_id(self, job: J, key: str, finished: F) -> str:
        """The id a complete result is indexed under ("" when it has none of its own)."""
        ...

    def documents(self, finished: F, job: J, *, result_id: str, model: str) -> list[retriever_pb2.Document]:
        """What to index of a complete result."""
        ...
