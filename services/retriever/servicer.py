"""til.v1.RetrieverService: validates requests, turns them into index calls, and counts what it did."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from prometheus_client import Counter, Gauge, Histogram
from til.v1 import retriever_pb2, retriever_pb2_grpc

from services.common.errors import InvalidArgument, NotFound
from services.common.server import Service
from services.retriever.documents import Document, DocumentIndex, SearchFilter, SearchMode, SearchQuery

SEARCH_SECONDS = Histogram(
    "tilserve_retriever_search_seconds",
    "Time to answer a search, query embedding included.",
    ["mode"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
DOCUMENTS_UPSERTED = Counter("tilserve_retriever_documents_upserted_total", "Documents stored or replaced.")
DOCUMENTS_DELETED = Counter("tilserve_retriever_documents_deleted_total", "Document ids asked to be deleted.")
INDEX_DISK_BYTES = Gauge(
    "tilserve_retriever_index_disk_bytes",
    "Bytes the index takes on this machine's disk (the Edge shard's folder); 0 with a Qdrant server.",
)

SERVICE_NAME = retriever_pb2.DESCRIPTOR.services_by_name["RetrieverService"].full_name
MAX_ID_CHARS = 512

KIND_NAMES = {
    retriever_pb2.DOCUMENT_KIND_TIL: "til",
    retriever_pb2.DOCUMENT_KIND_QUESTION: "question",
    retriever_pb2.DOCUMENT_KIND_DOC: "doc",
}
KIND_VALUES = {name: value for value, name in KIND_NAMES.items()}
MODES = {
    retriever_pb2.SEARCH_MODE_UNSPECIFIED: SearchMode.HYBRID,
    retriever_pb2.SEARCH_MODE_DENSE: SearchMode.DENSE,
    retriever_pb2.SEARCH_MODE_SPARSE: SearchMode.SPARSE,
    retriever_pb2.SEARCH_MODE_HYBRID: SearchMode.HYBRID,
}


@dataclass(frozen=True)
class RequestLimits:
    """What one call may ask for and one document may hold (the RETRIEVER_* settings of the same names)."""

    default_top_k: int = 5
    max_top_k: int = 100
    max_text_chars: int = 20_000
    max_title_chars: int = 1_000
    max_field_chars: int = 256
    max_tags: int = 64
    max_attributes: int = 64
    max_attribute_chars: int = 2_000
    max_batch: int = 256

    def chars(self, value: str, field: str, setting: str) -> str:
        limit = getattr(self, setting)
        if len(value) > limit:
            raise InvalidArgument(
                f"{field} has {len(value)} characters; at most {limit} (RETRIEVER_{setting.upper()})"
            )
        return value

    def count(self, size: int, field: str, setting: str) -> None:
        limit = getattr(self, setting)
        if size > limit:
            raise InvalidArgument(
                f"{field} has {size} entries; at most {limit} (RETRIEVER_{setting.upper()})"
            )

    def tags(self, tags: Sequence[str], field: str) -> tuple[str, ...]:
        self.count(len(tags), field, "max_tags")
        return tuple(self.chars(tag, f"{field}[{i}]", "max_field_chars") for i, tag in enumerate(tags))


def _kind(value: int, field: str) -> str:
    if value not in KIND_NAMES:
        known = ", ".join(retriever_pb2.DocumentKind.Name(v) for v in KIND_NAMES)
        shown = "unset" if value == retriever_pb2.DOCUMENT_KIND_UNSPECIFIED else f"unknown ({value})"
        raise InvalidArgument(f"{field} is {shown}; use one of {known}")
    return KIND_NAMES[value]


def _text(value: str, field: str, limits: RequestLimits) -> str:
    if not value.strip():
        raise InvalidArgument(f"{field} is empty")
    return limits.chars(value, field, "max_text_chars")


class RetrieverServicer(retriever_pb2_grpc.RetrieverServiceServicer):
    def __init__(self, index: DocumentIndex, limits: RequestLimits | None = None) -> None:
        self._index = index
        self.limits = limits or RequestLimits()

    def _batch(self, size: int, field: str) -> None:
        if size == 0:
            raise InvalidArgument(f"{field} is empty")
        if size > self.limits.max_batch:
            raise InvalidArgument(
                f"{field} has {size} entries; at most {self.limits.max_batch} per call, split the batch"
            )

    def _document(self, doc: retriever_pb2.Document, i: int) -> Document:
        field, limits = f"documents[{i}]", self.limits
        if len(doc.id) > MAX_ID_CHARS:
            raise InvalidArgument(f"{field}.id is longer than {MAX_ID_CHARS} characters")
        limits.count(len(doc.attributes), f"{field}.attributes", "max_attributes")
        for key, value in doc.attributes.items():
            limits.chars(key, f"{field}.attributes key {key[:40]!r}", "max_field_chars")
            limits.chars(value, f"{field}.attributes[{key[:40]!r}]", "max_attribute_chars")
        return Document(
            id=doc.id,
            kind=_kind(doc.kind, f"{field}.kind"),
            text=_text(doc.text, f"{field}.text", limits),
            title=limits.chars(doc.title, f"{field}.title", "max_title_chars"),
            owner=limits.chars(doc.owner, f"{field}.owner", "max_field_chars"),
            language=limits.chars(doc.language, f"{field}.language", "max_field_chars"),
            difficulty=limits.chars(doc.difficulty, f"{field}.difficulty", "max_field_chars"),
            tags=limits.tags(doc.tags, f"{field}.tags"),
            attributes=dict(doc.attributes),
        )

    async def UpsertDocuments(
        self, request: retriever_pb2.UpsertDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> retriever_pb2.UpsertDocumentsResponse:
        self._batch(len(request.documents), "documents")
        documents = [self._document(doc, i) for i, doc in enumerate(request.documents)]
        ids = await self._index.upsert(documents)
        DOCUMENTS_UPSERTED.inc(len(ids))
        return retriever_pb2.UpsertDocumentsResponse(ids=ids)

    def _query(self, request: retriever_pb2.SearchDocumentsRequest) -> SearchQuery:
        limits = self.limits
        text = _text(request.query, "query", limits)
        if request.top_k > limits.max_top_k:
            raise InvalidArgument(f"top_k is {request.top_k}; at most {limits.max_top_k}")
        if request.mode not in MODES:
            raise InvalidArgument(f"mode {request.mode} is unknown; use DENSE, SPARSE or HYBRID")
        threshold = request.score_threshold if request.HasField("score_threshold") else None
        if threshold is not None and not math.isfinite(threshold):
            raise InvalidArgument("score_threshold must be a finite number")
        mmr_lambda = request.mmr_lambda if request.HasField("mmr_lambda") else None
        if mmr_lambda is not None and not 0.0 <= mmr_lambda <= 1.0:
            raise InvalidArgument(f"mmr_lambda is {mmr_lambda}; it must be between 0 and 1")
        f = request.filter
        return SearchQuery(
            text=text,
            top_k=request.top_k or limits.default_top_k,
            mode=MODES[request.mode],
            filter=SearchFilter(
                kinds=tuple(sorted({_kind(k, f"filter.kinds[{i}]") for i, k in enumerate(f.kinds)})),
                owner=limits.chars(f.owner, "filter.owner", "max_field_chars"),
                language=limits.chars(f.language, "filter.language", "max_field_chars"),
                difficulty=limits.chars(f.difficulty, "filter.difficulty", "max_field_chars"),
                tags=limits.tags(f.tags, "filter.tags"),
            ),
            score_threshold=threshold,
            mmr_lambda=mmr_lambda,
        )

    async def SearchDocuments(
        self, request: retriever_pb2.SearchDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> retriever_pb2.SearchDocumentsResponse:
        query = self._query(request)
        started = time.perf_counter()
        try:
            hits = await self._index.search(query)
        finally:
            SEARCH_SECONDS.labels(query.mode.value).observe(time.perf_counter() - started)
        return retriever_pb2.SearchDocumentsResponse(
            hits=[retriever_pb2.SearchHit(document=to_proto(h.document), score=h.score) for h in hits]
        )

    async def GetDocument(
        self, request: retriever_pb2.GetDocumentRequest, context: grpc.aio.ServicerContext
    ) -> retriever_pb2.GetDocumentResponse:
        if not request.id:
            raise InvalidArgument("id is empty")
        if len(request.id) > MAX_ID_CHARS:
            raise InvalidArgument(f"id is longer than {MAX_ID_CHARS} characters")
        owner = self.limits.chars(request.owner, "owner", "max_field_chars")
        doc = await self._index.get(request.id)
        # Another owner's document is answered as if it did not exist (the empty owner is an owner too).
        if doc is None or (request.HasField("owner") and doc.owner != owner):
            raise NotFound(f"no document has id {request.id[:MAX_ID_CHARS]!r}")
        return retriever_pb2.GetDocumentResponse(document=to_proto(doc))

    async def DeleteDocuments(
        self, request: retriever_pb2.DeleteDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> retriever_pb2.DeleteDocumentsResponse:
        self._batch(len(request.ids), "ids")
        for i, doc_id in enumerate(request.ids):
            if not doc_id:
                raise InvalidArgument(f"ids[{i}] is empty")
            if len(doc_id) > MAX_ID_CHARS:
                raise InvalidArgument(f"ids[{i}] is longer than {MAX_ID_CHARS} characters")
        await self._index.delete(list(request.ids))
        DOCUMENTS_DELETED.inc(len(request.ids))
        return retriever_pb2.DeleteDocumentsResponse()


def to_proto(doc: Document) -> retriever_pb2.Document:
    return retriever_pb2.Document(
        id=doc.id,
        kind=KIND_VALUES.get(doc.kind, retriever_pb2.DOCUMENT_KIND_UNSPECIFIED),
        text=doc.text,
        title=doc.title,
        owner=doc.owner,
        language=doc.language,
        difficulty=doc.difficulty,
        tags=doc.tags,
        attributes=doc.attributes,
    )


def retriever_service(servicer: RetrieverServicer) -> Service:
    """The servicer as a `Service` to hand to `serve()` or `start_server()`."""

    def register(server: grpc.aio.Server) -> None:
        retriever_pb2_grpc.add_RetrieverServiceServicer_to_server(servicer, server)

    return Service(SERVICE_NAME, register)
