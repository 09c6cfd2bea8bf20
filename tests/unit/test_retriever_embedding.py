"""The dense encoder's backends: ONNX Runtime gives PyTorch's vectors, or is not used."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest

from services.retriever import embedding
from services.retriever.embedding import ExportError, OnnxTransformer, SentenceTransformerEncoder

pytestmark = pytest.mark.model

TEXTS = [
    "asyncio.Queue",
    "Redis 캐시 TTL",
    "",
    "한국어 문장과 English words, query_cache() 호출 " * 60,  # past the model's 256 word pieces
    "x",
    *[f"document {i}: 큐와 스레드 {i}" for i in range(40)],  # more than one batch of 32
]


@pytest.fixture(scope="module")
def torch_encoder() -> SentenceTransformerEncoder:
    encoder = SentenceTransformerEncoder(threads=1, backend="torch")
    encoder.load()
    return encoder


def test_onnx_runtime_gives_pytorchs_vectors_in_the_callers_order(
    torch_encoder: SentenceTransformerEncoder,
) -> None:
    onnx = SentenceTransformerEncoder(threads=1)  # auto
    onnx.load()
    assert onnx.backend == "onnxruntime" and torch_encoder.backend == "torch"
    together = onnx.embed(TEXTS)
    expected = torch_encoder.embed(TEXTS)
    assert together.shape == expected.shape == (len(TEXTS), 384)
    assert together.dtype == np.float32
    assert float(np.abs(together - expected).max()) < 1e-4
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    # Each row is its own text's vector, not a neighbour's from the length-sorted batches.
    for i in (0, 3, 17):
        assert float(np.abs(onnx.embed([TEXTS[i]])[0] - together[i]).max()) < 1e-4
    assert onnx.embed([]).shape[0] == 0


def refuse(*_: Any, **__: Any) -> None:
    raise ExportError("this model has no exportable forward()")


def test_a_model_that_cannot_be_exported_stays_on_pytorch_or_stops_start_when_onnx_was_asked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(OnnxTransformer, "__init__", refuse)
    auto = SentenceTransformerEncoder(threads=1)
    with caplog.at_level(logging.WARNING, logger=embedding.__name__):
        auto.load()
    assert auto.backend == "torch"
    assert "stays on PyTorch: this model has no exportable forward()" in caplog.text
    assert auto.embed(["asyncio.Queue"]).shape == (1, 384)

    with pytest.raises(ExportError, match=r"RETRIEVER_EMBEDDING_BACKEND=onnx but .* no exportable forward"):
        SentenceTransformerEncoder(threads=1, backend="onnx").load()


def test_an_export_that_computes_other_vectors_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real_call = OnnxTransformer.__call__

    def drifting(self: OnnxTransformer, features: dict[str, Any]) -> np.ndarray:
        out = real_call(self, features)
        return out + np.float32(0.05) * np.sign(out)  # a wrong kernel, a mismatched export

    monkeypatch.setattr(OnnxTransformer, "__call__", drifting)
    with pytest.raises(ExportError, match="differ from PyTorch's"):
        SentenceTransformerEncoder(threads=1, backend="onnx").load()
    auto = SentenceTransformerEncoder(threads=1)
    auto.load()
    assert auto.backend == "torch"


def test_any_failure_of_onnx_runtime_at_the_check_leaves_auto_on_pytorch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def failing(self: OnnxTransformer, features: dict[str, Any]) -> np.ndarray:
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION")

    monkeypatch.setattr(OnnxTransformer, "__call__", failing)
    auto = SentenceTransformerEncoder(threads=1)
    auto.load()
    assert auto.backend == "torch" and auto.embed(["query_cache"]).shape == (1, 384)
    strict = SentenceTransformerEncoder(threads=1, backend="onnx")
    with pytest.raises(ExportError, match="RUNTIME_EXCEPTION"):
        strict.load()
    with pytest.raises(ExportError):  # not left half-loaded on PyTorch
        strict.load()


def test_onnx_runtime_is_for_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = SentenceTransformerEncoder(threads=1, backend="onnx", device="cuda")
    with pytest.raises(ExportError, match="CPU only, not cuda"):
        encoder._export(object())  # type: ignore[arg-type]  # refused before the model is read
