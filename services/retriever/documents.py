"""What the retriever stores and how it is asked: documents, searches, and the two interfaces around them.

`DocumentIndex` is what the servicer needs (documents in, hits out). `VectorStore` is the small interface
an index keeps its points in: one collection of points with a dense and a sparse (IDF) vector and a
payload, queried with a resolved `Plan`. It has two implementations, chosen at start: a Qdrant Edge
shard on disk in the process (`edge_store.EdgeStore`, the default) and a Qdrant server
(`server_store.ServerStore`). Both run the same Query API request for a plan, so the same data gives
the same hits.
"""

from __future__ import annotations

import enum
import re
import unicodedata
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.retriever.lexical import SparseTerms

DENSE = "dense"
SPARSE = "sparse"
# Payload keys that a `SearchFilter` matches on; each gets a keyword index.
CONDITION_KEYS = ("kind", "owner", "language", "difficulty", "tags")
FILTERED_KEYS = ("doc_id", *CONDITION_KEYS)
# Point ids must be UUIDs or integers; document ids are any string, mapped into this namespace.
POINT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "tilserve:retriever:point")
DOCUMENT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "tilserve:retriever:document")


@dataclass(frozen=True)
class Document:
    id: str
    kind: str
    text: str
    title: str = ""
    owner: str = ""
    language: str = ""
    difficulty: str = ""
    tags: tuple[str, ...] = ()
    attributes: dict[str, str] = field(default_factory=dict)


class SearchMode(enum.Enum):
    DENSE = "dense"
    SPARSE = "sparse"
    HYBRID = "hybrid"


@dataclass(frozen=True)
class SearchFilter:
    """Every condition must hold; `kinds` and `tags` match any of their values (none: any kind, any tags).

    `owner` always holds: a search sees only the documents written with exactly this owner, and the empty
    owner is a namespace of its own (documents written without one), never "every owner".
    """

    kinds: tuple[str, ...] = ()
    owner: str = ""
    language: str = ""
    difficulty: str = ""
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class SearchQuery:
    """A search. Scores, and so `score_threshold`, are on the mode's scale: cosine similarity for DENSE,
    the IDF-weighted term overlap for SPARSE, the reciprocal-rank-fusion score for HYBRID.
    `mmr_lambda` (0..1) re-ranks `top_k * mmr_candidates` candidates for diversity; hits keep their scores.
    """

    text: str
    top_k: int
    mode: SearchMode = SearchMode.HYBRID
    filter: SearchFilter = field(default_factory=SearchFilter)
    score_threshold: float | None = None
    mmr_lambda: float | None = None


@dataclass(frozen=True)
class Hit:
    document: Document
    score: float


class DocumentIndex(Protocol):
    """What the retriever servicer needs from an index. Errors: `Unavailable` when the store is down."""

    async def start(self) -> None:
        """Loads the models and opens the store (the service's warm-up)."""
        ...

    async def upsert(self, documents: Sequence[Document]) -> list[str]:
        """Stores the documents, replacing any with the same id; returns their ids in order."""
        ...

    async def search(self, query: SearchQuery) -> list[Hit]: ...

    async def get(self, doc_id: str) -> Document | None:
        """The document stored under `doc_id`, or None."""
        ...

    async def delete(self, ids: Sequence[str]) -> None:
        """Removes the documents with these ids; unknown ids are ignored."""
        ...

    async def close(self) -> None:
        """Releases the store; the index is not used again afterwards."""
        ...


@dataclass(frozen=True)
class Plan:
    """One search, resolved: which channels rank, with what, and how much each counts."""

    limit: int  # hits to rank (before MMR)
    prefetch_limit: int  # candidates each channel hands to the fusion
    filter: SearchFilter
    fused: bool  # hybrid: the channels' rankings are fused by weighted RRF
    dense: list[float] | None  # the query embedding, when the dense channel ranks
    dense_weight: float
    sparse: SparseTerms | None  # the query terms, when the sparse channel ranks
    score_threshold: float | None
    with_vectors: bool  # hits carry their dense vector (for MMR)


@dataclass(frozen=True)
class StoredPoint:
    id: str  # point_id(document id)
    dense: list[float]
    sparse: SparseTerms
    payload: dict[str, Any]


@dataclass(frozen=True)
class StoredHit:
    payload: dict[str, Any]
    score: float
    dense: list[float] | None = None


class VectorStore(Protocol):
    """One collection of points, dense + sparse (IDF) vectors and a payload. Blocking work happens off the
    event loop. Errors: `Unavailable` when the store cannot be reached, `FailedPrecondition` when what is
    on disk or on the server is not a collection the retriever can use."""

    def describe(self) -> str: ...

    async def open(self, dimensions: int) -> None:
        """Opens (or creates) the collection for `dimensions`-dim dense vectors; checks an existing one."""
        ...

    async def upsert(self, points: Sequence[StoredPoint]) -> None:
        """Stores the points durably (they survive a crash once this returns)."""
        ...

    async def query(self, plan: Plan) -> list[StoredHit]: ...

    async def retrieve(self, point_id: str) -> dict[str, Any] | None:
        """The payload of one point, or None."""
        ...

    async def delete(self, point_ids: Sequence[str]) -> None: ...

    async def count(self) -> int: ...

    def disk_bytes(self) -> int | None:
        """Bytes the collection takes on this machine's disk; None when it is elsewhere (a server)."""
        ...

    async def close(self) -> None: ...


def normalize_text(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()


def document_id(kind: str, text: str) -> str:
    """The id of a document stored without one: the same kind and text (up to whitespace) give the same id."""
    return str(uuid.uuid5(DOCUMENT_NAMESPACE, f"{kind}\n{normalize_text(text)}"))


def point_id(doc_id: str) -> str:
    return str(uuid.uuid5(POINT_NAMESPACE, doc_id))


def filter_conditions(f: SearchFilter) -> list[tuple[str, tuple[str, ...]]]:
    """The filter as (payload key, accepted values) pairs that must all hold; the owner always does."""
    conditions = [("kind", f.kinds), ("tags", f.tags), ("owner", (f.owner,))]
    conditions += [(key, (value,)) for key in ("language", "difficulty") if (value := getattr(f, key))]
    return [(key, values) for key, values in conditions if values]


def payload_of(doc: Document) -> dict[str, Any]:
    return {
        "doc_id": doc.id,
        "kind": doc.kind,
        "text": doc.text,
        "title": doc.title,
        "owner": doc.owner,
        "language": doc.language,
        "difficulty": doc.difficulty,
        "tags": list(doc.tags),
        "attributes": dict(doc.attributes),
    }


def document_of(payload: dict[str, Any]) -> Document:
    return Document(
        id=payload["doc_id"],
        kind=payload["kind"],
        text=payload["text"],
        title=payload.get("title", ""),
        owner=payload.get("owner", ""),
        language=payload.get("language", ""),
        difficulty=payload.get("difficulty", ""),
        tags=tuple(payload.get("tags", ())),
        attributes=dict(payload.get("attributes", {})),
    )
