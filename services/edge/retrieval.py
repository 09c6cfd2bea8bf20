"""Reading from the retriever: searches and documents by id, bounded and scoped to one owner.

Every read keeps only documents of the call's owner, whatever the retriever's own filter does: an
empty owner is an owner of its own (documents written with owner ""), never "every owner". What a
document carries is bounded here before it reaches a prompt or a `started` message, so one oversized
document cannot blow up a stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import Counter
from til.v1 import edge_pb2, retriever_pb2

from services.common.errors import NotFound, Unavailable
from services.edge.clients import DependencyUnavailable, DocumentStore

RETRIEVALS = Counter("tilserve_edge_retrievals_total", "Context searches by result.", ["kind", "status"])
DOCUMENTS_CLIPPED = Counter(
    "tilserve_edge_documents_clipped_total",
    "Retrieved documents with a field cut to the edge's bounds.",
    ["field"],
)

MAX_QUERY_CHARS = 1000
# Bounds on what the edge takes from a retrieved document.
MAX_TITLE_CHARS = 300
MAX_TAGS = 10
MAX_TAG_CHARS = 64
MAX_SEARCH_TEXT_CHARS = 2000  # a search hit is shown in a prompt as a line or two
MAX_DOCUMENT_TEXT_CHARS = 20_000  # a document loaded by id is the input itself


@dataclass(frozen=True)
class Found:
    """One retrieved document, as much of it as the edge uses."""

    id: str
    kind: int  # retriever_pb2.DocumentKind
    title: str
    text: str
    tags: tuple[str, ...]
    score: float = 0.0


@dataclass(frozen=True)
class Retrieval:
    """What a search found for a call: its status, the documents, and a notice when it was skipped."""

    status: int = edge_pb2.RETRIEVAL_STATUS_SKIPPED
    found: tuple[Found, ...] = ()
    notice: str | None = None


@dataclass(frozen=True)
class Search:
    """What a contract looks for: a query, the kinds, how many, an id to leave out (the result's own),
    and what to tell the caller when the retriever cannot be asked."""

    query: str
    kinds: tuple[int, ...]
    top_k: int
    degraded: str
    exclude: str = ""


def _clip(text: str, limit: int, field: str) -> str:
    if len(text) <= limit:
        return text
    DOCUMENTS_CLIPPED.labels(field).inc()
    return text[:limit]


def bounded(document: retriever_pb2.Document, *, text_chars: int, score: float = 0.0) -> Found:
    tags = list(document.tags)
    if len(tags) > MAX_TAGS:
        DOCUMENTS_CLIPPED.labels("tags").inc()
    return Found(
        id=document.id,
        kind=document.kind,
        title=_clip(document.title, MAX_TITLE_CHARS, "title"),
        text=_clip(document.text, text_chars, "text"),
        tags=tuple(_clip(tag, MAX_TAG_CHARS, "tag") for tag in tags[:MAX_TAGS]),
        score=score,
    )


async def search(
    store: DocumentStore, search: Search | None, *, owner: str, timeout: float, label: str
) -> Retrieval:
    """Runs `search` for `owner`. Never raises: a retriever problem is a status and a notice."""
    if search is None or search.top_k == 0:
        return Retrieval()
    request = retriever_pb2.SearchDocumentsRequest(
        query=search.query[:MAX_QUERY_CHARS],
        # One more than needed when the result's own id may be among the hits (an earlier REFRESH).
        top_k=search.top_k + (1 if search.exclude else 0),
        filter=retriever_pb2.SearchFilter(kinds=search.kinds, owner=owner),
    )
    try:
        hits = await store.search(request, timeout=timeout)
    except DependencyUnavailable as exc:
        RETRIEVALS.labels(label, "unavailable").inc()
        return Retrieval(
            edge_pb2.RETRIEVAL_STATUS_UNAVAILABLE, notice=f"retriever unavailable ({exc}); {search.degraded}"
        )
    RETRIEVALS.labels(label, "ok").inc()
    found = [
        bounded(h.document, text_chars=MAX_SEARCH_TEXT_CHARS, score=h.score)
        for h in hits
        if h.document.owner == owner and h.document.kind in search.kinds and h.document.id != search.exclude
    ]
    return Retrieval(edge_pb2.RETRIEVAL_STATUS_OK, tuple(found[: search.top_k]))


async def load(
    store: DocumentStore, document_id: str, *, kinds: Sequence[int], owner: str, timeout: float, what: str
) -> Found:
    """The document `document_id` of `owner`; NotFound when there is none (another owner's included:
    ids do not leak across owners), Unavailable when the retriever cannot be asked."""
    try:
        document = await store.get(document_id, owner=owner, timeout=timeout)
    except DependencyUnavailable as exc:
        raise Unavailable(f"cannot load {what} {document_id!r}: {exc}") from exc
    if document is None or document.kind not in kinds or document.owner != owner:
        raise NotFound(f"no {what} with id {document_id!r}")
    return bounded(document, text_chars=MAX_DOCUMENT_TEXT_CHARS)
