"""The `til` CLI: live rendering of a streaming JSON object, ingestion, and a streamed TIL against a real stub."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from til.v1 import common_pb2, edge_pb2, edge_pb2_grpc, retriever_pb2, retriever_pb2_grpc

from services import cli
from services.common.server import Service
from tests.conftest import in_process_server


@settings(max_examples=200, deadline=None)
@given(
    title=st.text(max_size=40),
    content=st.text(max_size=200),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=20),
)
def test_partial_json_shows_a_growing_prefix_of_each_field(title: str, content: str, cuts: list[int]) -> None:
    document = json.dumps({"title": title, "keywords": ["캐시"], "content": content})
    partial = cli.PartialJson()
    previous = ""
    bounds = sorted({min(c, len(document)) for c in cuts} | {len(document)})
    start = 0
    for end in bounds:
        partial.feed(document[start:end])
        start = end
        shown = partial.string_field("content") or ""
        assert content.startswith(shown)
        assert shown.startswith(previous)
        previous = shown
    assert partial.string_field("title") == title
    assert partial.string_field("content") == content


def test_documents_from_files_have_stable_ids_and_kinds(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "day.md").write_text(
        "# 2026-11-24 TIL\n\n- Redis TTL을 적용하였다.\n", encoding="utf-8"
    )
    (tmp_path / "guide.md").write_text("# gRPC 가이드\n본문", encoding="utf-8")
    (tmp_path / "q.json").write_text(
        json.dumps(
            {"questions": [{"question": "TTL이란?", "answer": "만료 시간", "difficulty": "easy"}] * 2}
        ),
        encoding="utf-8",
    )
    files = cli.discover([str(tmp_path)])
    docs = [d for path, root in files for d in cli.documents_from_file(path, root, "team-a")]
    by_id = {d.id: d for d in docs}
    assert by_id["ingest:notes/day.md"].kind == retriever_pb2.DOCUMENT_KIND_TIL
    assert by_id["ingest:guide.md"].kind == retriever_pb2.DOCUMENT_KIND_DOC
    assert by_id["ingest:q.json#1"].kind == retriever_pb2.DOCUMENT_KIND_QUESTION
    assert by_id["ingest:q.json#0"].difficulty == "easy"
    assert {d.owner for d in docs} == {"team-a"}
    again = [
        d.id for path, root in cli.discover([str(tmp_path)]) for d in cli.documents_from_file(path, root, "")
    ]
    assert sorted(again) == sorted(by_id)


class RecordingRetriever(retriever_pb2_grpc.RetrieverServiceServicer):
    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    async def UpsertDocuments(self, request, context):
        self.batches.append([d.id for d in request.documents])
        return retriever_pb2.UpsertDocumentsResponse(ids=[d.id for d in request.documents])


async def test_ingest_upserts_in_batches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(5):
        (tmp_path / f"{i}.md").write_text(f"# doc {i}", encoding="utf-8")
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    fake = RecordingRetriever()
    service = Service(
        "til.v1.RetrieverService",
        lambda s: retriever_pb2_grpc.add_RetrieverServiceServicer_to_server(fake, s),
    )
    async with in_process_server([service]) as (running, _):
        rc = await asyncio.to_thread(
            cli.main, ["ingest", str(tmp_path), "--batch-size", "2", "--addr", f"127.0.0.1:{running.port}"]
        )
    assert rc == 1  # one file was skipped
    assert [len(b) for b in fake.batches] == [2, 2, 1]
    err = capsys.readouterr().err
    assert "skipped" in err and "ingested 5 documents" in err


class ScriptedEdge(edge_pb2_grpc.EdgeServiceServicer):
    async def GenerateTil(self, request, context):
        # Over several lines, as a model may write it.
        document = json.dumps(
            {"title": f"{request.date} TIL - 캐시", "keywords": ["캐시"], "content": "# x"}, indent=2
        )
        yield edge_pb2.GenerateTilResponse(started=edge_pb2.StreamStarted(request_id="r1", model="m"))
        for i in range(0, len(document), 7):
            yield edge_pb2.GenerateTilResponse(
                delta=common_pb2.TextDelta(text=document[i : i + 7], token_count=1)
            )
        yield edge_pb2.GenerateTilResponse(
            finished=edge_pb2.TilFinished(til_json=document, finish_reason=common_pb2.FINISH_REASON_STOP)
        )


async def test_generate_prints_the_final_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    diff = tmp_path / "change.diff"
    diff.write_bytes(b"diff --git a/x b/x\n+caf\xe9\n")  # not UTF-8: replaced, with a warning
    service = Service(
        "til.v1.EdgeService", lambda s: edge_pb2_grpc.add_EdgeServiceServicer_to_server(ScriptedEdge(), s)
    )
    async with in_process_server([service]) as (running, _):
        rc = await asyncio.to_thread(
            cli.main,
            ["generate", str(diff), "--json", "--date", "2026-11-24", "--addr", f"127.0.0.1:{running.port}"],
        )
    assert rc == 0
    out, err = capsys.readouterr()
    (line,) = out.splitlines()  # one line: `--json` output feeds line-oriented tools
    assert json.loads(line)["title"] == "2026-11-24 TIL - 캐시"
    assert "not valid UTF-8" in err and "request r1" in err


def test_generate_against_nothing_says_how_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    diff = tmp_path / "d.diff"
    diff.write_text("diff --git a/x b/x\n")
    assert cli.main(["generate", str(diff), "--addr", "127.0.0.1:1", "--timeout", "2"]) == 1
    assert "til up" in capsys.readouterr().err
