"""Index helpers that need no model: ids, filters, and how Qdrant failures become statuses."""

from __future__ import annotations

import uuid

import httpx
import pytest
from qdrant_client import models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from services.common.errors import FailedPrecondition, Unavailable
from services.retriever.index import (
    QdrantLocation,
    SearchFilter,
    document_id,
    payload_filter,
    point_id,
    qdrant_errors,
)

SERVER = QdrantLocation(url="http://qdrant:6333")


def test_document_ids_ignore_whitespace_but_not_kind_or_case() -> None:
    assert document_id("til", "a  b\n c") == document_id("til", " a b c ")
    assert document_id("til", "a b") != document_id("doc", "a b")
    assert document_id("til", "a b") != document_id("til", "A b")


def test_point_ids_are_stable_uuids() -> None:
    assert uuid.UUID(point_id("til-queue")) == uuid.UUID(point_id("til-queue"))
    assert point_id("til-queue") != point_id("til-queue ")


def test_an_empty_filter_is_no_filter() -> None:
    assert payload_filter(SearchFilter()) is None


def test_filter_conditions() -> None:
    f = payload_filter(SearchFilter(kinds=("til", "doc"), owner="alice", tags=("a", "b")))
    assert f is not None and isinstance(f.must, list)
    assert {c.key: c.match for c in f.must if isinstance(c, models.FieldCondition)} == {
        "kind": models.MatchAny(any=["til", "doc"]),
        "owner": models.MatchValue(value="alice"),
        "tags": models.MatchAny(any=["a", "b"]),
    }


def http_error(status: int) -> UnexpectedResponse:
    return UnexpectedResponse(status, "reason", b"{}", httpx.Headers())


@pytest.mark.parametrize(
    ("error", "expected", "words"),
    [
        (ResponseHandlingException(httpx.ConnectError("refused")), Unavailable, "unreachable"),
        (http_error(503), Unavailable, "answered 503"),
        (http_error(429), Unavailable, "answered 429"),
        (http_error(401), Unavailable, "RETRIEVER_QDRANT_API_KEY"),
        (http_error(404), FailedPrecondition, "no such collection"),
        (ConnectionResetError("reset"), Unavailable, "unreachable"),
    ],
)
def test_qdrant_failures_map_to_statuses(error: Exception, expected: type[Exception], words: str) -> None:
    with pytest.raises(expected, match=words), qdrant_errors(SERVER, "searching"):
        raise error


def test_a_bad_request_stays_an_internal_error() -> None:
    with pytest.raises(UnexpectedResponse), qdrant_errors(SERVER, "searching"):
        raise http_error(400)
